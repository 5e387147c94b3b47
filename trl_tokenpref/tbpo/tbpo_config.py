import math
import warnings
from dataclasses import dataclass, field

from ..base import TokenLevelDPOConfig
from ..losses import BREGMAN_GENERATORS, validate_generator, validate_log_ratio_clamp


TBPO_VARIANTS = ("tbpo_a", "tbpo_q")


@dataclass
class TBPOConfig(TokenLevelDPOConfig):
    r"""
    Configuration class for the [`TBPOTrainer`].

    It accepts every [`~trl.DPOConfig`] parameter and adds those of Token-level Bregman Preference Optimization
    ([TBPO](https://huggingface.co/papers/2605.12288), "TokenRatio"). Defaults follow the paper and its official code
    (β = 0.1, SBA generator with λ = 0 and s = 4, log R clamped to ±30, TBPO-Q head trained by AdamW at lr 1e-3 with
    log w clamped to ±10).

    Parameters:
        > Parameters that control the TBPO loss

        variant (`str`, *optional*, defaults to `"tbpo_a"`):
            How the per-state weight `w_t` of the token ratio `log R_t = β[(ρ^l_t − ρ^w_t) + log w_t]` is obtained.
            Possible values are:

                - `"tbpo_a"`: advantage normalisation, `log w_t = κ^l_t − κ^w_t` with `κ_t = KL(π_ref(·|s_t) ‖
                  πθ(·|s_t))`, computed exactly over the vocabulary, in chunks, without stop-gradient (as the official
                  code). No extra parameters.
                - `"tbpo_q"`: a learned state baseline `b_φ` on the policy's detached final hidden states,
                  `log w_t = b_φ(s^l_t) − b_φ(s^w_t)`, centred per pair and clamped to `±baseline_clamp`. The head has
                  its own AdamW optimizer and is saved with every checkpoint.

            Ignored when `token_level=False`.
        generator (`str`, *optional*, defaults to `"sba"`):
            Bregman generator `h` of the per-token loss `ℓ_h(R) = h′(R)R − h(R) − h′(1/R)`. Possible values are:
            `"lr"` (logistic, `log(1 + R)`: DPO's loss), `"kliep"` (`R + log R`), `"lsif"` (`R² − 2/R`), `"ba"`
            (`R^{λ+1} − ((λ+1)/λ) R^{−λ}`) and `"sba"` (`BA / (s(λ+1))`; `(R + log R)/s` at λ = 0).
        generator_lambda (`float`, *optional*, defaults to `0.0`):
            λ > −1 of the `"ba"` and `"sba"` generators (ignored by the others). λ sets the emphasis on confident
            (R ≪ 1) versus uncertain (R ≈ 1) tokens; the paper's default is 0.
        sba_scale (`float`, *optional*, defaults to `4.0`):
            Scale s > 0 of the `"sba"` generator. With s = 4, dℓ/dR = 1/2 at R = 1 for every λ, DPO's value at
            initialisation.
        log_ratio_clamp (`float`, *optional*, defaults to `30.0`):
            `log R_t` is clamped to `[−log_ratio_clamp, log_ratio_clamp]` before `ℓ_h` (zero gradient outside), so that
            no loss overflows for extreme logits.
        log_ratio_floor (`float` or `None`, *optional*, defaults to `None`):
            A lower bound `f < 0` on `log R_t`: it is clamped to `[f, log_ratio_clamp]` instead, so a token whose ratio
            is already below `e^f` stops pushing (zero gradient), as BPO clips R from below. The paper's default
            generator SBA(λ = 0) never saturates (`∂ℓ/∂log R = (1 + R)/s ≥ 1/s`), and a per-token `log R_t` is about
            1/T of DPO's sequence margin, so at small β (≤ 0.1) every token keeps pushing and TBPO (TBPO-Q above all,
            whose state term does not anchor the policy to `π_ref`) drifts far from the reference. Since
            `log R_t = β[(ρ^l_t − ρ^w_t) + …]`, `f = −c·β` bounds each token's contrast by `c` nats. Measured
            (docs/tbpo_trainer.md): TBPO-Q at β ≤ 0.1 with `f = −β` stayed within 1.6–3.5 nats of the reference over
            three new seeds where the official loss drifted 49–259; TBPO-A needs it less (`−3β` if it drifts). BPO's
            `log(0.01)` never binds at these β. Check `log_R/frac_at_floor`. `None` (default) keeps the official loss
            exactly.
        token_level (`bool`, *optional*, defaults to `True`):
            Whether to match the ratio per token. `False` gives sequence-level BPO
            ([BPO](https://huggingface.co/papers/2505.19601)): one macro-token per response,
            `log R = β(Σ_t ρ^l_t − Σ_t ρ^w_t)`, `w = 1`; with `generator="lr"` this is exactly DPO's sigmoid loss.

        > Parameters that control the TBPO-Q state baseline head

        baseline_hidden_size (`int`, *optional*, defaults to `1024`):
            Width of the head's hidden layer: `Linear(H → baseline_hidden_size) → GELU → Linear(→ 1)` (the paper's
            App. C.3). `0` gives a single `Linear(H → 1)` (the official yaml default).
        baseline_learning_rate (`float`, *optional*, defaults to `1e-3`):
            Constant learning rate of the head's AdamW optimizer.
        baseline_weight_decay (`float`, *optional*, defaults to `0.0`):
            Weight decay of the head's AdamW optimizer (the official config's `baseline_weight_decay`).
        baseline_max_grad_norm (`float` or `None`, *optional*):
            Gradient-norm clip of the head, applied before its optimizer step. `None` uses `max_grad_norm`, as the
            official code clips the policy and the head with one bound; `0` disables clipping.
        baseline_clamp (`float`, *optional*, defaults to `10.0`):
            Bound of the centred `log w_t` (official `baseline_l`/`baseline_u` = ∓10). `math.inf` disables the clamp.
        token_chunk_size (`int` or `None`, *optional*):
            Number of completion tokens projected through the LM head at once (see [`TokenLevelDPOConfig`]).

        > Parameters of [`~trl.DPOConfig`] with a TBPO meaning

        label_smoothing (`float`, *optional*, defaults to `0.0`):
            ε in [0, 0.5]: the per-token loss becomes `(1 − ε) ℓ_h(R_t) + ε ℓ_h(1/R_t)` (official code), the loss
            under labels flipped with probability ε. With `token_level=False` and `generator="lr"` this is
            conservative DPO, `−(1 − ε) log σ(u) − ε log σ(−u)`. Note that TRL's `DPOTrainer` ignores
            `label_smoothing` for its default `"sigmoid"` loss.

    > [!NOTE]
    > Every other default is [`~trl.DPOConfig`]'s (e.g. `learning_rate=1e-6`, `beta=0.1`). The paper trains with
    > RMSprop at `learning_rate=5e-7`, a cosine schedule with 5% warm-up, and `max_grad_norm=10`.
    > `precompute_ref_log_probs=True`: TBPO-A stores the reference cache (the reference's top-`ref_top_k` tokens per
    > completion token, for its KL state term; docs/algorithms.md §9); sequence-level BPO (`token_level=False`)
    > stores DPOTrainer's summed log-probabilities, all its loss needs; TBPO-Q is refused (its loss needs the
    > reference's log-probability of every completion token, which neither store is built for).
    """

    variant: str = field(
        default="tbpo_a",
        metadata={
            "help": "How the per-state weight w_t is obtained: 'tbpo_a' (forward-KL state term, no extra parameters) "
            "or 'tbpo_q' (a learned state baseline head with its own optimizer). Ignored when token_level=False.",
            "choices": list(TBPO_VARIANTS),
        },
    )
    generator: str = field(
        default="sba",
        metadata={
            "help": "Bregman generator h of the per-token loss: 'lr' (DPO's logistic loss), 'kliep', 'lsif', 'ba' "
            "or 'sba' (the paper's default).",
            "choices": list(BREGMAN_GENERATORS),
        },
    )
    generator_lambda: float = field(
        default=0.0,
        metadata={"help": "lambda > -1 of the 'ba' and 'sba' generators (ignored by the others)."},
    )
    sba_scale: float = field(
        default=4.0,
        metadata={"help": "Scale s > 0 of the 'sba' generator; s=4 matches DPO's gradient at initialisation."},
    )
    log_ratio_clamp: float = field(
        default=30.0,
        metadata={"help": "log R_t is clamped to [-log_ratio_clamp, log_ratio_clamp] before the loss."},
    )
    log_ratio_floor: float | None = field(
        default=None,
        metadata={
            "help": "Lower bound f < 0 on log R_t (clamped to [f, log_ratio_clamp], zero gradient below), as BPO "
            "clips R from below: stops the drift of TBPO (TBPO-Q above all) at small beta. f = -c*beta bounds each "
            "token's contrast by c nats: -beta measured for TBPO-Q at beta <= 0.1, -3*beta for TBPO-A if it drifts. "
            "None: the official loss."
        },
    )
    token_level: bool = field(
        default=True,
        metadata={
            "help": "Match the ratio per token (TBPO). False gives sequence-level BPO: one macro-token per "
            "response and w = 1 (with generator='lr', exactly DPO)."
        },
    )
    baseline_hidden_size: int = field(
        default=1024,
        metadata={"help": "TBPO-Q head width: Linear(H, n) -> GELU -> Linear(n, 1); 0 gives a single Linear(H, 1)."},
    )
    baseline_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Constant learning rate of the TBPO-Q head's AdamW optimizer."},
    )
    baseline_weight_decay: float = field(
        default=0.0,
        metadata={"help": "Weight decay of the TBPO-Q head's AdamW optimizer."},
    )
    baseline_max_grad_norm: float | None = field(
        default=None,
        metadata={
            "help": "Gradient-norm clip of the TBPO-Q head. None uses max_grad_norm (as the official code); 0 "
            "disables clipping."
        },
    )
    baseline_clamp: float = field(
        default=10.0,
        metadata={"help": "Bound of the centred TBPO-Q log-weights log w_t (inf disables the clamp)."},
    )

    _method_name = "TBPO"
    # TBPO's own loss defines ε-label smoothing ((1−ε)ℓ(log R) + εℓ(−log R), docs/algorithms.md §3.5): validated below
    _unsupported_dpo_options = {
        name: default
        for name, default in TokenLevelDPOConfig._unsupported_dpo_options.items()
        if name != "label_smoothing"
    }

    @property
    def _needs_reference_distribution(self) -> bool:
        # Only TBPO-A's state term κ_t needs the reference's whole next-token distribution
        return self.token_level and self.variant == "tbpo_a"

    def __post_init__(self):
        # Our checks first (as the base class does), so that a wrong TBPO value is the error the user sees
        if self.variant not in TBPO_VARIANTS:
            raise ValueError(
                f"`variant` must be one of {list(TBPO_VARIANTS)}, got {self.variant!r}. Use 'tbpo_a' for the "
                "forward-KL state term (no extra parameters) or 'tbpo_q' for a learned state baseline."
            )
        validate_generator(self.generator, self.generator_lambda, self.sba_scale)
        validate_log_ratio_clamp(self.generator, self.generator_lambda, self.log_ratio_clamp)
        if self.log_ratio_floor is not None:
            if not (math.isfinite(self.log_ratio_floor) and self.log_ratio_floor < 0):
                raise ValueError(
                    f"`log_ratio_floor` must be a finite number < 0 or None, got {self.log_ratio_floor}: it is a lower "
                    "bound on log R (log R = 0 at the start of training, so a floor >= 0 would stop every token). "
                    "BPO's R >= 0.01 is log_ratio_floor=-4.6."
                )
            if self.log_ratio_floor <= -self.log_ratio_clamp:
                raise ValueError(
                    f"`log_ratio_floor={self.log_ratio_floor}` is at or below `-log_ratio_clamp="
                    f"{-self.log_ratio_clamp}`, so it would have no effect: the clamp already bounds log R there. Set a "
                    "floor above it, or None."
                )
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(
                f"`label_smoothing` must be in [0, 0.5], got {self.label_smoothing}: it is the probability that a "
                "preference label is flipped."
            )
        if self.baseline_hidden_size < 0:
            raise ValueError(
                f"`baseline_hidden_size` must be >= 0, got {self.baseline_hidden_size} (0 gives a single linear "
                "layer; the paper uses 1024)."
            )
        if not (self.baseline_learning_rate > 0 and math.isfinite(self.baseline_learning_rate)):
            raise ValueError(
                f"`baseline_learning_rate` must be a finite number > 0, got {self.baseline_learning_rate}. The "
                "paper uses 1e-3."
            )
        if not (self.baseline_weight_decay >= 0 and math.isfinite(self.baseline_weight_decay)):
            raise ValueError(f"`baseline_weight_decay` must be >= 0 and finite, got {self.baseline_weight_decay}.")
        if self.baseline_max_grad_norm is not None and not self.baseline_max_grad_norm >= 0:
            raise ValueError(
                f"`baseline_max_grad_norm` must be >= 0 (0 disables clipping) or None (use `max_grad_norm`), got "
                f"{self.baseline_max_grad_norm}."
            )
        if not self.baseline_clamp > 0:
            raise ValueError(
                f"`baseline_clamp` must be > 0, got {self.baseline_clamp}. The official value is 10; use `math.inf` "
                "to disable the clamp."
            )
        # TBPO-A precomputes the reference cache (its state term needs the reference distribution); TBPO-Q pairs
        # per-token log-ratios through its learned head, and is not supported with the cache
        if self.precompute_ref_log_probs and self.token_level and self.variant == "tbpo_q":
            raise ValueError(
                "TBPO-Q cannot use `precompute_ref_log_probs=True`: its loss pairs the chosen and rejected log-ratios "
                "token by token, so it needs the reference's log-probability of every completion token, whereas "
                "precomputing only keeps the summed log-probability of each completion. Set "
                "`precompute_ref_log_probs=False` (with PEFT the reference is the model with its adapter disabled, "
                "so it costs no extra memory), or use `token_level=False` (sequence-level BPO), which only needs the "
                "sums."
            )
        if not self.token_level and self.variant == "tbpo_q":
            warnings.warn(
                "`variant='tbpo_q'` has no effect with `token_level=False`: sequence-level BPO has a single "
                "macro-token per response, whose state weight is w = 1, so no baseline head is created or trained.",
                UserWarning,
                stacklevel=3,  # the user's `TBPOConfig(...)` call (through the dataclass `__init__`)
            )
        super().__post_init__()
