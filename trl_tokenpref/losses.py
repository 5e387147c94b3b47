"""Token-level preference losses: TDPO, TGDPO, TBPO (Bregman ratio matching) and the BPO generators.

Every function in this module is a pure function of tensors, in the style of the ``preference_loss`` of the
reference DPO implementation and of torchtune's loss modules: no model, trainer or accelerate import; per-pair
losses come back unreduced (shape ``[B]``) so that the caller owns the batch reduction (TRL: ``.mean()``).

Notation (docs/algorithms.md §0): for one response y with completion mask m_t,

* ``ρ_t = log πθ(y_t|s_t) − log π_ref(y_t|s_t)``, the per-token log-ratio, and ``S^ρ(y) = Σ_t m_t ρ_t``;
* ``κ_t = KL(π_ref(·|s_t) ‖ πθ(·|s_t))``, the per-position forward KL, and ``S^κ(y) = Σ_t m_t κ_t``;
* ``w`` and ``l`` mark the chosen and rejected response of a pair, B is the number of pairs.

The output contract: every loss returns a ``NamedTuple`` whose first field is ``losses`` (``[B]``, unreduced), whose
middle fields are the loss's own intermediate tensors (for tests and callers), and whose last field is ``metrics``, a
dict of the loss's own metrics by the name they are logged under, each a [`Metric`]. The trainers log the
``metrics`` of any loss with one function (``TokenLevelDPOTrainer._log_metrics``).

Numerics: inputs are upcast to at least float32 (float64 stays float64), log-sigmoids are computed with
``logsigmoid`` / ``softplus`` and the Bregman losses from log R, never from R. Masked positions are removed with
``torch.where`` before any arithmetic, so NaN / inf garbage in padding or prompt slots reaches neither the value
nor the gradient (``0 * nan`` would be ``nan``; ``where`` is not).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


__all__ = [
    "BREGMAN_GENERATORS",
    "TDPO_VARIANTS",
    "Metric",
    "TBPOLossOutput",
    "TDPOLossOutput",
    "TGDPOLossOutput",
    "bregman_loss",
    "center_log_weights",
    "sequence_sum",
    "tbpo_loss",
    "tdpo_loss",
    "tgdpo_loss",
    "sequential_kl_metrics",
    "validate_generator",
    "validate_log_ratio_clamp",
]

TDPO_VARIANTS = ("tdpo1", "tdpo2")
BREGMAN_GENERATORS = ("lr", "kliep", "lsif", "ba", "sba")


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype the maths runs in: float32, or wider when an input is wider (float64 stays float64)."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value}.")
    return value


def _same_shape(names: tuple[str, ...], tensors: tuple[Tensor, ...], ndim: int | None = None) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if any(shape != shapes[0] for shape in shapes):
        listed = ", ".join(f"{n}={s}" for n, s in zip(names, shapes))
        raise ValueError(f"Expected {', '.join(names)} to have the same shape, got {listed}.")
    if ndim is not None and len(shapes[0]) != ndim:
        raise ValueError(f"Expected {', '.join(names)} to have {ndim} dimension(s), got shape {shapes[0]}.")


# Largest exponent of R (as a multiple of log R) in each generator's ℓ_h, evaluated at the clamp: ℓ_h must stay far
# from float32's exp overflow (exp(88.7)), since per-token losses are also summed. "ba"/"sba" depend on λ.
_MAX_SAFE_EXPONENT = 80.0


def _exponent_coefficient(generator: str, generator_lambda: float) -> float:
    """c such that the largest term of ℓ_h at |log R| ≤ clamp is exp(c · clamp) (BPO Table 2 closed forms)."""
    if generator == "lr":
        return 0.0  # softplus(log R) grows linearly
    if generator == "kliep":
        return 1.0  # R + log R
    if generator == "lsif":
        return 2.0  # R² − 2/R
    # BA / SBA: R^{λ+1} and R^{−λ}, i.e. exp((λ+1) log R) and exp(−λ log R)
    return max(generator_lambda + 1.0, abs(generator_lambda))


def validate_generator(generator: str, generator_lambda: float, sba_scale: float) -> None:
    """Refuse a Bregman generator that does not exist or parameters that make it non-convex. `TBPOConfig` calls it at
    construction, `bregman_loss` and `tbpo_loss` at every call."""
    if generator not in BREGMAN_GENERATORS:
        raise ValueError(
            f"Unknown Bregman generator {generator!r}: `generator` must be one of {list(BREGMAN_GENERATORS)}. The "
            "paper's default is 'sba'; 'lr' is DPO's logistic loss."
        )
    if generator in ("ba", "sba") and not float(generator_lambda) > -1.0:
        raise ValueError(
            f"`generator_lambda` must be > -1 for the {generator!r} generator, got {generator_lambda}: "
            "h(R) = (R^(1+λ) − R)/λ is strictly convex only for λ > −1 (λ = 0 is its KLIEP limit). The paper's default "
            "is 0."
        )
    if generator == "sba" and not (float(sba_scale) > 0 and math.isfinite(sba_scale)):
        raise ValueError(
            f"`sba_scale` must be a finite number > 0, got {sba_scale}. The paper's default is 4 (DPO's gradient at "
            "initialisation)."
        )


def validate_log_ratio_clamp(generator: str, generator_lambda: float, log_ratio_clamp: float) -> None:
    """Refuse a clamp of log R at which the generator's loss overflows float32 (checked by `TBPOConfig`; the pure
    loss computes in whatever dtype it is given)."""
    if not (float(log_ratio_clamp) > 0 and math.isfinite(log_ratio_clamp)):
        raise ValueError(
            f"`log_ratio_clamp` must be a finite number > 0, got {log_ratio_clamp}. The official value is 30."
        )
    coefficient = _exponent_coefficient(generator, float(generator_lambda))
    if coefficient * log_ratio_clamp > _MAX_SAFE_EXPONENT:
        raise ValueError(
            f"With generator={generator!r} (λ={generator_lambda}) and log_ratio_clamp={log_ratio_clamp}, the loss "
            f"reaches exp({coefficient * log_ratio_clamp:g}), which overflows float32 (exp(88.7) is the largest finite "
            f"value). Set `log_ratio_clamp` to at most {_MAX_SAFE_EXPONENT / coefficient:g}."
        )


class Metric(NamedTuple):
    """A value a loss reports for logging: per pair (``values`` ``[B]``, ``mask`` None: logged as the mean over the
    pairs) or per token (``values`` and a bool ``mask`` of the same shape: logged as the mean over the masked
    tokens). Detached by the logger."""

    values: Tensor
    mask: Tensor | None = None


def sequential_kl_metrics(chosen_kl: Tensor, rejected_kl: Tensor) -> dict[str, Metric]:
    """`kl/chosen`, `kl/rejected`, `kl/margin`: the sequential KL S^κ of each completion (the official TDPO code's
    `kl_{train,eval}/*`; the paper plots |margin|), logged by TDPO and TBPO-A."""
    return {
        "kl/chosen": Metric(chosen_kl),
        "kl/rejected": Metric(rejected_kl),
        "kl/margin": Metric(chosen_kl - rejected_kl),
    }


def sequence_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Masked sum over the last dimension, NaN-safe: ``S(y) = Σ_t m_t v_t``.

    Args:
        values: ``[..., T]`` per-token values (ρ_t, κ_t, ...); any float dtype.
        mask: ``[..., T]`` completion mask, bool or 0/1 (broadcastable against ``values``).

    Returns:
        ``[...]`` sums in at least float32. Masked-out entries contribute exactly 0 to the value and receive exactly 0
        gradient, even if they hold NaN / inf.
    """
    values = values.to(_compute_dtype(values))
    return torch.where(mask.bool(), values, 0.0).sum(-1)


# ------------------------------------------------------------------------------------------------------------------
# TDPO (Zeng et al., ICML 2024, arXiv 2404.11999)
# ------------------------------------------------------------------------------------------------------------------


class TDPOLossOutput(NamedTuple):
    losses: Tensor  # [B]
    chosen_rewards: Tensor  # [B], detached: β(S^ρ_w + S^κ_w)
    rejected_rewards: Tensor  # [B], detached: β(S^ρ_l + S^κ_l)
    metrics: dict[str, Metric]  # kl/* and tdpo_rewards/*


def tdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_kl: Tensor,
    rejected_kl: Tensor,
    beta: float,
    alpha: float = 0.5,
    variant: str = "tdpo2",
) -> TDPOLossOutput:
    """Compute the TDPO loss for a batch of policy and reference per-sequence statistics.

    With the DPO margin ``u = β(S^ρ_w − S^ρ_l)`` and the sequential-KL margin ``δ = β(S^κ_l − S^κ_w)``:

    * TDPO1 (Eq. 15): ``L = −log σ(u − δ)``;
    * TDPO2 (Eqs. 17–18): ``L = −log σ(u − α δ₂)`` with ``δ₂ = β S^κ_l − sg(β S^κ_w)``.

    Args:
        chosen_logratios: ``[B]`` S^ρ_w = Σ_t m_t (log πθ − log π_ref) over the chosen completion.
        rejected_logratios: ``[B]`` S^ρ_l, same for the rejected completion.
        chosen_kl: ``[B]`` S^κ_w = Σ_t m_t KL(π_ref(·|s_t) ‖ πθ(·|s_t)) over the chosen completion.
        rejected_kl: ``[B]`` S^κ_l, same for the rejected completion.
        beta: temperature β > 0 (paper default 0.1).
        alpha: weight α of the KL margin in TDPO2 (paper default 0.5); ignored by TDPO1, as in the official code.
        variant: ``"tdpo1"`` or ``"tdpo2"``.

    Returns:
        ``TDPOLossOutput(losses [B], chosen_rewards [B], rejected_rewards [B], metrics)``. The rewards are the paper's
        Σ_t A_{π_ref}(s_t, y_t) = β(S^ρ + S^κ) (App. A.4, Eq. 59; the official code logs exactly this), detached.
        ``metrics``: ``kl/{chosen,rejected,margin}`` and ``tdpo_rewards/{chosen,rejected,margins}``, per pair.
    """
    beta = _positive("beta", beta)
    if variant not in TDPO_VARIANTS:
        raise ValueError(f"Unknown TDPO variant {variant!r}; expected one of {TDPO_VARIANTS}.")
    _same_shape(
        ("chosen_logratios", "rejected_logratios", "chosen_kl", "rejected_kl"),
        (chosen_logratios, rejected_logratios, chosen_kl, rejected_kl),
    )
    dtype = _compute_dtype(chosen_logratios, rejected_logratios, chosen_kl, rejected_kl)
    chosen_logratios, rejected_logratios = chosen_logratios.to(dtype), rejected_logratios.to(dtype)
    chosen_kl, rejected_kl = chosen_kl.to(dtype), rejected_kl.to(dtype)

    logratio_margin = chosen_logratios - rejected_logratios  # u / β (Eq. 13)
    if variant == "tdpo1":
        logits = logratio_margin - (rejected_kl - chosen_kl)  # (u − δ)/β, δ of Eq. 14 (Eq. 15)
    else:
        # δ₂ of Eq. 18: the chosen sequential KL is a stop-gradient baseline, the rejected one keeps its gradient.
        logits = logratio_margin - alpha * (rejected_kl - chosen_kl.detach())  # (u − α δ₂)/β (Eq. 17)
    losses = -F.logsigmoid(beta * logits)

    chosen_rewards = (beta * (chosen_logratios + chosen_kl)).detach()  # Eq. 59
    rejected_rewards = (beta * (rejected_logratios + rejected_kl)).detach()
    metrics = {
        **sequential_kl_metrics(chosen_kl, rejected_kl),
        # The paper's reward, which the official code logs as `rewards/*`; the trainers' `rewards/*` keep DPOTrainer's
        # meaning β·S^ρ, so these have their own prefix
        "tdpo_rewards/chosen": Metric(chosen_rewards),
        "tdpo_rewards/rejected": Metric(rejected_rewards),
        "tdpo_rewards/margins": Metric(chosen_rewards - rejected_rewards),
    }
    return TDPOLossOutput(losses, chosen_rewards, rejected_rewards, metrics)


# ------------------------------------------------------------------------------------------------------------------
# TGDPO (Zhu et al., ICML 2025, arXiv 2506.14574)
# ------------------------------------------------------------------------------------------------------------------


class TGDPOLossOutput(NamedTuple):
    losses: Tensor  # [B]
    chosen_weights: Tensor  # [B, T_w] f_w = 1 + α r̂^w (optionally clamped), 0 where masked; constant
    rejected_weights: Tensor  # [B, T_l] f_l = 1 − α r̂^l (optionally clamped), 0 where masked; constant
    metrics: dict[str, Metric]  # token_rewards/*


def _tgdpo_weights(
    token_rewards: Tensor,
    mask: Tensor,
    signed_alpha: float,
    weight_clamp: tuple[float, float] | None,
    dtype: torch.dtype,
) -> Tensor:
    rewards = torch.where(mask, token_rewards.detach().to(dtype), 0.0)  # r̂ is a constant (no_grad guidance model)
    weights = 1.0 + signed_alpha * rewards
    if weight_clamp is not None:
        weights = weights.clamp(weight_clamp[0], weight_clamp[1])
    return torch.where(mask, weights, 0.0)


def tgdpo_loss(
    chosen_token_logratios: Tensor,
    rejected_token_logratios: Tensor,
    chosen_token_rewards: Tensor,
    rejected_token_rewards: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float,
    alpha: float = 0.5,
    weight_clamp: tuple[float, float] | None = None,
) -> TGDPOLossOutput:
    """Compute the TGDPO loss: DPO with a per-token weight β·f(r̂_t) on every token log-ratio.

    ``L = −log σ(β Σ_t m^w_t f_w(r̂^w_t) ρ^w_t − β Σ_t m^l_t f_l(r̂^l_t) ρ^l_t)``, with ``f_w(r) = 1 + α r`` and
    ``f_l(r) = 1 − α r`` (official code ``dpo_loss``, ``loss_type="sigmoid"``; docs/algorithms.md §2.2). No clipping,
    normalisation or centring of r̂ by default. With α = 0 or r̂ ≡ 0 this is exactly DPO.

    Args:
        chosen_token_logratios: ``[B, T_w]`` ρ^w_t = log πθ − log π_ref per chosen token.
        rejected_token_logratios: ``[B, T_l]`` ρ^l_t per rejected token (T_l may differ from T_w).
        chosen_token_rewards: ``[B, T_w]`` r̂^w_t = β(log π_guide − log π_ref), already scaled by β; detached here.
        rejected_token_rewards: ``[B, T_l]`` r̂^l_t.
        chosen_mask: ``[B, T_w]`` completion mask, bool or 0/1. Use the same mask as for ρ (§2.5 e).
        rejected_mask: ``[B, T_l]`` completion mask.
        beta: temperature β > 0 (official default 0.1).
        alpha: guidance strength α (official default 0.5).
        weight_clamp: optional ``(lo, hi)``: clamp f to [lo, hi] (a guard against sign flips when
            |r̂| > 1/α, §2.5 a). ``None`` (default) matches the official code.

    Returns:
        ``TGDPOLossOutput(losses [B], chosen_weights [B, T_w], rejected_weights [B, T_l], metrics)``. Masked
        positions contribute exactly 0 and get exactly 0 gradient even when they hold NaN / inf. ``metrics``:
        ``token_rewards/{chosen,rejected}`` (mean r̂ per side) and ``token_rewards/negative_weights`` (fraction of
        tokens whose weight is negative), per token.
    """
    beta = _positive("beta", beta)
    alpha = float(alpha)
    if weight_clamp is not None:
        lo, hi = (float(v) for v in weight_clamp)
        if not lo <= hi:
            raise ValueError(f"`weight_clamp` must be a (lo, hi) pair with lo <= hi, got {weight_clamp}.")
        weight_clamp = (lo, hi)
    _same_shape(
        ("chosen_token_logratios", "chosen_token_rewards", "chosen_mask"),
        (chosen_token_logratios, chosen_token_rewards, chosen_mask),
        ndim=2,
    )
    _same_shape(
        ("rejected_token_logratios", "rejected_token_rewards", "rejected_mask"),
        (rejected_token_logratios, rejected_token_rewards, rejected_mask),
        ndim=2,
    )
    if chosen_token_logratios.shape[0] != rejected_token_logratios.shape[0]:
        raise ValueError(
            f"Chosen and rejected batch sizes differ: {chosen_token_logratios.shape[0]} vs "
            f"{rejected_token_logratios.shape[0]}."
        )
    dtype = _compute_dtype(
        chosen_token_logratios, rejected_token_logratios, chosen_token_rewards, rejected_token_rewards
    )
    chosen_mask, rejected_mask = chosen_mask.bool(), rejected_mask.bool()

    chosen_weights = _tgdpo_weights(chosen_token_rewards, chosen_mask, alpha, weight_clamp, dtype)  # f_w
    rejected_weights = _tgdpo_weights(rejected_token_rewards, rejected_mask, -alpha, weight_clamp, dtype)  # f_l
    # Sanitise ρ before the product: the gradient of f·ρ w.r.t. ρ is f, so garbage must not survive in either factor.
    chosen_rho = torch.where(chosen_mask, chosen_token_logratios.to(dtype), 0.0)
    rejected_rho = torch.where(rejected_mask, rejected_token_logratios.to(dtype), 0.0)

    logits = (chosen_weights * chosen_rho).sum(-1) - (rejected_weights * rejected_rho).sum(-1)
    losses = -F.logsigmoid(beta * logits)
    metrics = {
        # Mean token reward r̂ per side, and how often a weight 1 ± α r̂ is negative (the token's update is reversed,
        # §2.5 a; `weight_clamp=(0, inf)` prevents it)
        "token_rewards/chosen": Metric(chosen_token_rewards, chosen_mask),
        "token_rewards/rejected": Metric(rejected_token_rewards, rejected_mask),
        "token_rewards/negative_weights": Metric(
            torch.cat([(chosen_weights < 0).flatten(), (rejected_weights < 0).flatten()]).float(),
            torch.cat([chosen_mask.flatten(), rejected_mask.flatten()]),
        ),
    }
    return TGDPOLossOutput(losses, chosen_weights, rejected_weights, metrics)


# ------------------------------------------------------------------------------------------------------------------
# BPO generators (Kim et al., NeurIPS 2025, arXiv 2505.19601)
# ------------------------------------------------------------------------------------------------------------------


def bregman_loss(
    log_ratio: Tensor,
    generator: str = "sba",
    generator_lambda: float = 0.0,
    sba_scale: float = 4.0,
) -> Tensor:
    """Per-sample Bregman ratio-matching loss ``ℓ_h(R) = h′(R)R − h(R) − h′(1/R)`` (BPO Thm 3), from log R.

    ``R`` is the model ratio p(≺)/p(≻) (for DPO's margin u, R = e^{−u}); ℓ_h is strictly increasing in R for every
    valid h (Prop. 4: dℓ/dR = G_h(R) = h″(R)R + h″(1/R)/R² > 0). Closed forms (BPO Table 2, docs/algorithms.md §4.2),
    additive constants dropped, all evaluated as exponentials of log R:

    ==========  ===========================  ================================================
    generator   h(R)                         ℓ(R)
    ==========  ===========================  ================================================
    ``lr``      ½[R log R − (1+R) log(1+R)]  log(1 + R) = softplus(log R)   (= DPO)
    ``kliep``   R log R − R                  R + log R
    ``lsif``    (R − 1)²                     R² − 2/R  (not the "R² − 2R" typo of the table / TBPO code)
    ``ba``      (R^{1+λ} − R)/λ              R^{λ+1} − ((λ+1)/λ) R^{−λ};  λ = 0: R + log R
    ``sba``     (R^{1+λ} − R)/(sλ(λ+1))      R^{λ+1}/(s(λ+1)) − R^{−λ}/(sλ);  λ = 0: (R + log R)/s
    ==========  ===========================  ================================================

    SBA with s = 4 has dℓ/dR = ½ at R = 1 for every λ (DPO's value); SBA(−½, 4) is √R = e^{−u/2}.

    Args:
        log_ratio: ``[...]`` log R. Callers clamp it first (``tbpo_loss`` does): R^{λ+1} overflows float32 once
            (λ+1)·log R > 88.
        generator: one of ``BREGMAN_GENERATORS``.
        generator_lambda: λ > −1 for ``ba`` and ``sba``; ignored otherwise.
        sba_scale: s > 0 for ``sba``; ignored otherwise.

    Returns:
        ``[...]`` elementwise ℓ_h, in at least float32.
    """
    validate_generator(generator, generator_lambda, sba_scale)
    u = log_ratio.to(_compute_dtype(log_ratio))  # u = log R
    lam = float(generator_lambda)
    if generator == "lr":
        return F.softplus(u)  # log(1 + R) = −log σ(−log R) (App. A.5)
    if generator == "kliep":
        return torch.exp(u) + u
    if generator == "lsif":
        return torch.exp(2.0 * u) - 2.0 * torch.exp(-u)
    if generator == "ba":
        if lam == 0.0:
            return torch.exp(u) + u  # λ → 0 limit (KLIEP)
        return torch.exp((lam + 1.0) * u) - ((lam + 1.0) / lam) * torch.exp(-lam * u)
    scale = float(sba_scale)  # "sba": BA scaled by 1/(s(λ+1))
    if lam == 0.0:
        return (torch.exp(u) + u) / scale  # λ → 0 limit (KLIEP/s), the TBPO default
    return torch.exp((lam + 1.0) * u) / (scale * (lam + 1.0)) - torch.exp(-lam * u) / (scale * lam)


# ------------------------------------------------------------------------------------------------------------------
# TBPO (TokenRatio, ICML 2026, arXiv 2605.12288)
# ------------------------------------------------------------------------------------------------------------------


class TBPOLossOutput(NamedTuple):
    losses: Tensor  # [B]
    log_ratio: Tensor  # [B, K] clamped log R_t, 0 where masked (not detached)
    per_token_losses: Tensor  # [B, K] ℓ_h(R_t), 0 where masked (not detached)
    metrics: dict[str, Metric]  # log_R/*


def tbpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    pair_mask: Tensor,
    beta: float,
    log_weights: Tensor | None = None,
    generator: str = "sba",
    generator_lambda: float = 0.0,
    sba_scale: float = 4.0,
    log_ratio_clamp: float = 30.0,
    label_smoothing: float = 0.0,
    log_ratio_floor: float | None = None,
) -> TBPOLossOutput:
    """Compute the TBPO (token-level Bregman preference optimisation) loss over completion-index-aligned tokens.

    Per aligned position t ≤ T = min(n_w, n_l) (TBPO §4.5, Thm 4.4; docs/algorithms.md §3.3–3.5):

    * ``log R_t = β[(ρ^l_t − ρ^w_t) + log w_t]``, clamped to ``[−c, c]`` before ℓ_h (zero gradient outside), or to
      ``[f, c]`` with a floor ``f = log_ratio_floor`` (BPO's lower bound on R, docs/algorithms.md §4.3, §10);
    * ``ℓ_t = (1 − ε) ℓ_h(log R_t) + ε ℓ_h(−log R_t)`` (ε = label smoothing, 0 by default);
    * per pair, ``L = Σ_t m_t ℓ_t / max(Σ_t m_t, 1)``.

    Args:
        chosen_logratios: ``[B, K]`` ρ^w_t, aligned by completion index (``TokenBatch.aligned_pairs``).
        rejected_logratios: ``[B, K]`` ρ^l_t, aligned the same way.
        pair_mask: ``[B, K]`` bool or 0/1, true for k < min(n_w, n_l).
        beta: temperature β > 0 (paper default 0.1).
        log_weights: optional ``[B, K]`` log w_t (``None`` → 0). TBPO-A: κ^l_t − κ^w_t, no stop-gradient
            (official code). TBPO-Q: ``center_log_weights(b_l − b_w, pair_mask)``. Sequence-level BPO: pass summed
            log-ratios of shape ``[B, 1]``, an all-ones mask and no weights.
        generator, generator_lambda, sba_scale: the Bregman generator h (see ``bregman_loss``); default SBA(0, 4).
        log_ratio_clamp: c > 0 (official 30). With ``ba``/``sba`` keep (λ+1)·c < 88 for finite float32 values.
        label_smoothing: ε in [0, 0.5].
        log_ratio_floor: optional f < 0: log R_t is clamped to ``[max(f, −c), c]`` instead of ``[−c, c]``, so a token
            whose ratio is already below e^f gets no gradient (its loss is constant). ``None`` (default): no floor,
            the official code's loss exactly. With label smoothing the flipped term sees the same clamped value.

    Returns:
        ``TBPOLossOutput(losses [B], log_ratio [B, K], per_token_losses [B, K], metrics)``; masked positions hold
        exactly 0 and get exactly 0 gradient even when the inputs there are NaN / inf. A pair without aligned tokens
        has loss 0. ``metrics``: ``log_R/mean`` and ``log_R/frac_below_zero`` over the aligned tokens, and with a floor
        ``log_R/frac_at_floor`` (the share of tokens the floor stops).
    """
    beta = _positive("beta", beta)
    clamp = _positive("log_ratio_clamp", log_ratio_clamp)
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"`label_smoothing` must be in [0, 0.5], got {label_smoothing}.")
    validate_generator(generator, generator_lambda, sba_scale)
    if log_ratio_floor is not None and not (math.isfinite(log_ratio_floor) and log_ratio_floor < 0):
        raise ValueError(
            f"`log_ratio_floor` must be a finite number < 0 (a lower bound on log R; log(0.01) ≈ -4.6 is BPO's R ≥ "
            f"0.01) or None for no floor, got {log_ratio_floor}."
        )
    lower = -clamp if log_ratio_floor is None else max(float(log_ratio_floor), -clamp)
    names = ("chosen_logratios", "rejected_logratios", "pair_mask")
    tensors = (chosen_logratios, rejected_logratios, pair_mask)
    if log_weights is not None:
        names, tensors = names + ("log_weights",), tensors + (log_weights,)
    _same_shape(names, tensors, ndim=2)

    dtype = _compute_dtype(chosen_logratios, rejected_logratios, log_weights)
    mask = pair_mask.bool()
    chosen_rho = torch.where(mask, chosen_logratios.to(dtype), 0.0)
    rejected_rho = torch.where(mask, rejected_logratios.to(dtype), 0.0)
    log_ratio = rejected_rho - chosen_rho  # log of the π-ratio part of R_t (Props 4.1/4.2)
    if log_weights is not None:
        log_ratio = log_ratio + torch.where(mask, log_weights.to(dtype), 0.0)  # state weight w_t
    log_ratio = torch.clamp(beta * log_ratio, lower, clamp)  # invariant 27: clamp before ℓ_h

    per_token = bregman_loss(log_ratio, generator, generator_lambda, sba_scale)  # ℓ_h(R_t) (Thm 4.4)
    if label_smoothing > 0.0:
        flipped = bregman_loss(-log_ratio, generator, generator_lambda, sba_scale)
        per_token = (1.0 - label_smoothing) * per_token + label_smoothing * flipped
    per_token = torch.where(mask, per_token, 0.0)
    log_ratio = torch.where(mask, log_ratio, 0.0)

    losses = per_token.sum(-1) / mask.sum(-1).clamp(min=1)  # (1/T) Σ_{t ≤ T}
    metrics = {
        "log_R/mean": Metric(log_ratio, mask),
        "log_R/frac_below_zero": Metric((log_ratio < 0).float(), mask),
    }
    if log_ratio_floor is not None:
        metrics["log_R/frac_at_floor"] = Metric((log_ratio <= lower).float(), mask)
    return TBPOLossOutput(losses, log_ratio, per_token, metrics)


def center_log_weights(log_weights: Tensor, pair_mask: Tensor, clamp: float = 10.0) -> Tensor:
    """TBPO-Q: centre the learned log-weights per pair over the aligned positions, then clamp.

    ``log ŵ_t ← clamp(log w_t − Σ_s m_s log w_s / max(Σ_s m_s, 1), −clamp, clamp)``, as in the official
    ``Q_tbpo_concatenated_forward`` (docs/algorithms.md §3.4). Without the centring the TBPO loss alone would drive the
    head's log w → −∞ (∂ℓ/∂log R > 0); with it the head learns a zero-mean per-token reallocation.

    Note:
        Clamping after centring can break the exact zero sum Σ_t m_t log ŵ_t = 0 when values hit the clamp; that is
        the official code's order, kept for parity. Pass ``clamp=math.inf`` to disable the clamp.

    Args:
        log_weights: ``[B, K]`` raw log w_t = b_φ(s^l_t) − b_φ(s^w_t), aligned by completion index; differentiable.
        pair_mask: ``[B, K]`` bool or 0/1 aligned-pair mask.
        clamp: bound > 0 (official 10).

    Returns:
        ``[B, K]`` centred, clamped log-weights in at least float32, exactly 0 where masked.
    """
    clamp = float(clamp)
    if not clamp > 0:
        raise ValueError(f"`clamp` must be > 0 (math.inf disables it), got {clamp}.")
    _same_shape(("log_weights", "pair_mask"), (log_weights, pair_mask))
    mask = pair_mask.bool()
    values = torch.where(mask, log_weights.to(_compute_dtype(log_weights)), 0.0)
    mean = values.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    centred = torch.clamp(values - mean, -clamp, clamp)
    return torch.where(mask, centred, 0.0)
