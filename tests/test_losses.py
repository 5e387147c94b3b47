"""Unit tests for ``trl_tokenpref.losses``: hand-computed values and the invariants of docs/algorithms.md §6.

Invariant numbers in the test names and docstrings refer to docs/algorithms.md §6. Everything runs on CPU in float32 (or
float64 where a comparison against a generic formula needs the headroom).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from testing_utils import aligned_by_completion_index
from torch.testing import assert_close

from trl_tokenpref.losses import (
    BREGMAN_GENERATORS,
    TBPOLossOutput,
    TDPOLossOutput,
    TGDPOLossOutput,
    bregman_loss,
    center_log_weights,
    sequence_sum,
    tbpo_loss,
    tdpo_loss,
    tgdpo_loss,
)


LOG2 = math.log(2.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)).to(dtype).requires_grad_()


def _dpo(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL ``loss_type="sigmoid"``: −log σ(β(S^ρ_w − S^ρ_l))."""
    return -F.logsigmoid(beta * (chosen - rejected))


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    grads = torch.autograd.grad(loss.sum(), inputs, allow_unused=True, retain_graph=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


def _layout(completions: list[list[float]], side: str, length: int = 12, prompt: int = 3) -> tuple:
    """Rows of per-token values placed in a [R, length] grid; every non-completion slot holds NaN garbage.

    ``side``: "right" (prompt, completion, pad), "left" (pad, prompt, completion), "flush" (completion at column 0,
    no prompt), "ragged" (a different prompt length per row, as keep_end truncation produces).
    """
    values = torch.full((len(completions), length), float("nan"))
    mask = torch.zeros(len(completions), length, dtype=torch.bool)
    for r, completion in enumerate(completions):
        n = len(completion)
        start = {"right": prompt, "left": length - n, "flush": 0, "ragged": 1 + (r % 3)}[side]
        values[r, start : start + n] = torch.tensor(completion)
        mask[r, start : start + n] = True
    return values.requires_grad_(), mask


# A grid of valid generators, as (generator, λ, s).
GENERATOR_CASES = [
    ("lr", 0.0, 4.0),
    ("kliep", 0.0, 4.0),
    ("lsif", 0.0, 4.0),
    ("ba", -0.5, 4.0),
    ("ba", 0.0, 4.0),
    ("ba", 1.0, 4.0),
    ("ba", 1.2, 4.0),
    ("sba", -0.9, 4.0),
    ("sba", -0.5, 4.0),
    ("sba", 0.0, 4.0),
    ("sba", 0.5, 2.0),
    ("sba", 1.0, 4.0),
    ("sba", 1.2, 4.0),
]
GENERATOR_IDS = [f"{g}-{lam}-{s}" for g, lam, s in GENERATOR_CASES]


# ==================================================================================================================
# sequence_sum
# ==================================================================================================================


def test_sequence_sum_masks_garbage_and_upcasts():
    """[0.5, nan, -1.5, inf] with mask [1, 0, 1, 0] → 0.5 − 1.5 = −1.0; NaN/inf slots get zero gradient."""
    values = torch.tensor([[0.5, float("nan"), -1.5, float("inf")]], dtype=torch.bfloat16, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 0]])
    total = sequence_sum(values, mask)
    assert total.dtype == torch.float32
    assert_close(total, torch.tensor([-1.0]))
    total.sum().backward()
    assert_close(values.grad.float(), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))


def test_sequence_sum_doubles_for_doubled_response():
    """Invariant 9: the same per-token values repeated twice double S^ρ and S^κ (sums, not means).

    ρ = [0.2, −0.5, 0.1] → S = −0.2; repeated → −0.4. κ = [0.3, 0.1, 0.6] → 1.0; repeated → 2.0. The TDPO loss is
    linear in the sums inside the sigmoid, so loss(2S, β) = loss(S, 2β).
    """
    rho = torch.tensor([0.2, -0.5, 0.1])
    kappa = torch.tensor([0.3, 0.1, 0.6])
    pad = torch.tensor([9.0, float("nan")])  # padding garbage
    single_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0]])
    double_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0]])
    single_rho, double_rho = torch.cat([rho, pad, pad, pad])[None], torch.cat([rho, rho, pad, pad[:1]])[None]
    single_kl, double_kl = torch.cat([kappa, pad, pad, pad])[None], torch.cat([kappa, kappa, pad, pad[:1]])[None]
    s_rho, d_rho = sequence_sum(single_rho, single_mask), sequence_sum(double_rho, double_mask)
    s_kl, d_kl = sequence_sum(single_kl, single_mask), sequence_sum(double_kl, double_mask)
    assert_close(s_rho, torch.tensor([-0.2]))
    assert_close(d_rho, 2 * s_rho)
    assert_close(s_kl, torch.tensor([1.0]))
    assert_close(d_kl, 2 * s_kl)
    zero = torch.zeros(1)
    for variant in ("tdpo1", "tdpo2"):
        doubled = tdpo_loss(d_rho, zero, zero, d_kl, beta=0.1, variant=variant).losses
        rescaled = tdpo_loss(s_rho, zero, zero, s_kl, beta=0.2, variant=variant).losses
        assert_close(doubled, rescaled)


def test_tdpo_hand_computed():
    """β = 0.1, S^ρ_w = 2, S^ρ_l = −1, S^κ_w = 0.5, S^κ_l = 1.5.

    TDPO1: β[(2 − (−1)) − (1.5 − 0.5)] = 0.1 · (3 − 1) = 0.2 → loss = softplus(−0.2) = 0.598139.
    TDPO2 (α = 0.5): β[3 − 0.5 · 1.0] = 0.25 → loss = softplus(−0.25) = 0.575939.
    Rewards (Eq. 59): chosen β(2 + 0.5) = 0.25, rejected β(−1 + 1.5) = 0.05.
    """
    args = (torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.5]), torch.tensor([1.5]))
    out1 = tdpo_loss(*args, beta=0.1, variant="tdpo1")
    out2 = tdpo_loss(*args, beta=0.1, alpha=0.5, variant="tdpo2")
    assert isinstance(out1, TDPOLossOutput)
    assert_close(out1.losses, torch.tensor([_softplus(-0.2)]))
    assert_close(out2.losses, torch.tensor([_softplus(-0.25)]))
    assert_close(out1.losses, torch.tensor([0.598139]))
    assert_close(out2.losses, torch.tensor([0.575939]))
    for out in (out1, out2):
        assert_close(out.chosen_rewards, torch.tensor([0.25]))
        assert_close(out.rejected_rewards, torch.tensor([0.05]))


def test_tdpo_default_variant_is_tdpo2_and_alpha_ignored_by_tdpo1():
    args = (_randn(4, seed=1), _randn(4, seed=2), _randn(4, seed=3).abs(), _randn(4, seed=4).abs())
    assert_close(tdpo_loss(*args, beta=0.1).losses, tdpo_loss(*args, beta=0.1, variant="tdpo2").losses)
    assert_close(
        tdpo_loss(*args, beta=0.1, alpha=0.1, variant="tdpo1").losses,
        tdpo_loss(*args, beta=0.1, alpha=7.0, variant="tdpo1").losses,
    )


def test_tdpo1_antisymmetry():
    """Invariant 2: swapping chosen and rejected negates TDPO1's inner logit z, so σ(z) + σ(−z) = 1, i.e.
    exp(−L(w, l)) + exp(−L(l, w)) = 1. (Not tested for TDPO2: its stop-gradient is one-sided.)"""
    cw, cl, kw, kl = _randn(6, seed=1), _randn(6, seed=2), _randn(6, seed=3).abs(), _randn(6, seed=4).abs()
    forward = tdpo_loss(cw, cl, kw, kl, beta=0.5, variant="tdpo1").losses
    swapped = tdpo_loss(cl, cw, kl, kw, beta=0.5, variant="tdpo1").losses
    assert_close(torch.exp(-forward) + torch.exp(-swapped), torch.ones(6))
    # The inner logit itself: L(l, w) − L(w, l) = softplus(z) − softplus(−z) = z.
    z = 0.5 * ((cw - cl) - (kl - kw))
    assert_close(swapped - forward, z)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_tdpo_log2_at_init(variant, alpha):
    """Invariant 3: ρ ≡ 0, κ ≡ 0 (πθ = π_ref) → loss = −log σ(0) = log 2, rewards 0."""
    zeros = torch.zeros(3)
    out = tdpo_loss(zeros, zeros, zeros, zeros, beta=0.1, alpha=alpha, variant=variant)
    assert_close(out.losses, torch.full((3,), LOG2))
    assert_close(out.chosen_rewards, zeros)


def test_tdpo2_alpha_zero_is_dpo():
    """Invariant 4: TDPO2 with α = 0 equals −log σ(β(S^ρ_w − S^ρ_l)) in value and gradient; no KL gradient."""
    cw, cl, kw, kl = _randn(5, seed=1), _randn(5, seed=2), _randn(5, seed=3).abs(), _randn(5, seed=4).abs()
    losses = tdpo_loss(cw, cl, kw, kl, beta=0.1, alpha=0.0, variant="tdpo2").losses
    reference = _dpo(cw, cl, 0.1)
    assert_close(losses, reference)
    g_cw, g_cl, g_kw, g_kl = _grads(losses, cw, cl, kw, kl)
    r_cw, r_cl = _grads(reference, cw, cl)
    assert_close(g_cw, r_cw)
    assert_close(g_cl, r_cl)
    assert_close(g_kw, torch.zeros(5))
    assert_close(g_kl, torch.zeros(5))


def test_tdpo_kl_gradients():
    """Invariant 6: TDPO2 sends no gradient into S^κ_w (it equals the loss with S^κ_w detached); TDPO1 does:
    ∂L1/∂S^κ_w = −β σ(−z), with z = β[(S^ρ_w − S^ρ_l) − (S^κ_l − S^κ_w)]. S^κ_l keeps its gradient in both."""
    beta = 0.3
    cw, cl, kw, kl = _randn(5, seed=1), _randn(5, seed=2), _randn(5, seed=3).abs(), _randn(5, seed=4).abs()
    tdpo2 = tdpo_loss(cw, cl, kw, kl, beta=beta, alpha=0.5, variant="tdpo2").losses
    assert torch.autograd.grad(tdpo2.sum(), kw, allow_unused=True)[0] is None
    detached = tdpo_loss(cw, cl, kw.detach(), kl, beta=beta, alpha=0.5, variant="tdpo2").losses
    for got, want in zip(_grads(tdpo2, cw, cl, kl), _grads(detached, cw, cl, kl)):
        assert_close(got, want)
    assert (_grads(tdpo2, kl)[0] != 0).all()

    tdpo1 = tdpo_loss(cw, cl, kw, kl, beta=beta, variant="tdpo1").losses
    z = beta * ((cw - cl) - (kl - kw))
    g_kw, g_kl = _grads(tdpo1, kw, kl)
    assert_close(g_kw, (-beta * torch.sigmoid(-z)).detach())
    assert_close(g_kl, (beta * torch.sigmoid(-z)).detach())


def test_tdpo1_equals_tdpo2_alpha_one_in_value_not_gradient():
    """Invariant 7: TDPO1 = TDPO2(α = 1) in value; their S^κ_w gradients differ (TDPO2: none)."""
    cw, cl, kw, kl = _randn(5, seed=1), _randn(5, seed=2), _randn(5, seed=3).abs(), _randn(5, seed=4).abs()
    tdpo1 = tdpo_loss(cw, cl, kw, kl, beta=0.1, variant="tdpo1").losses
    tdpo2 = tdpo_loss(cw, cl, kw, kl, beta=0.1, alpha=1.0, variant="tdpo2").losses
    assert_close(tdpo1, tdpo2)
    assert (_grads(tdpo1, kw)[0] != 0).all()
    assert_close(_grads(tdpo2, kw)[0], torch.zeros(5))


def test_tdpo_gradient_at_init_equals_dpo():
    """Invariant 8 (the loss-side part): at ρ = κ = 0 the gradients w.r.t. S^ρ of TDPO1, TDPO2 and DPO coincide:
    ∂L/∂S^ρ_w = −β σ(0) = −β/2 = −0.05 and ∂L/∂S^ρ_l = +0.05."""
    zeros = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    kl = torch.zeros(2), torch.zeros(2)
    for variant in ("tdpo1", "tdpo2"):
        g_w, g_l = _grads(tdpo_loss(*zeros, *kl, beta=0.1, variant=variant).losses, *zeros)
        assert_close(g_w, torch.full((2,), -0.05))
        assert_close(g_l, torch.full((2,), 0.05))


def test_tdpo_rewards_are_detached_advantage_sums():
    """Invariant 10: rewards/chosen = β(S^ρ_w + S^κ_w), rewards/rejected = β(S^ρ_l + S^κ_l), detached."""
    cw, cl, kw, kl = _randn(4, seed=1), _randn(4, seed=2), _randn(4, seed=3).abs(), _randn(4, seed=4).abs()
    out = tdpo_loss(cw, cl, kw, kl, beta=0.2)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert_close(out.chosen_rewards, (0.2 * (cw + kw)).detach())
    assert_close(out.rejected_rewards, (0.2 * (cl + kl)).detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tdpo_low_precision_inputs(dtype):
    """fp16/bf16 inputs are upcast before any arithmetic: S^ρ_w = −6e4, S^ρ_l = 6e4 would overflow fp16 in the
    difference (1.2e5 > 65504); in float32 the loss is softplus(β(S^ρ_l − S^ρ_w)) ≈ 1.2e4 (β = 0.1), finite (bf16
    rounds 6e4 to 59904, hence the margin is taken from the rounded inputs)."""
    cw = torch.tensor([-6.0e4, 1.5], dtype=dtype, requires_grad=True)
    cl = torch.tensor([6.0e4, -0.5], dtype=dtype)
    kw = torch.tensor([0.0, 0.25], dtype=dtype)
    kl = torch.tensor([0.0, 0.75], dtype=dtype)
    out = tdpo_loss(cw, cl, kw, kl, beta=0.1, variant="tdpo1")
    assert out.losses.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    assert torch.isfinite(out.losses).all()
    reference = tdpo_loss(cw.float(), cl.float(), kw.float(), kl.float(), beta=0.1, variant="tdpo1")
    assert_close(out.losses, reference.losses)
    assert_close(out.losses[0], 0.1 * (cl[0].float() - cw[0].detach().float()))
    (g,) = _grads(out.losses, cw)
    assert torch.isfinite(g.float()).all()


def test_tdpo_extreme_values_finite():
    """|values| up to 1e4: −logsigmoid never overflows (no softmax().log(), no exp of a large logit)."""
    big = torch.tensor([1e4, -1e4, 1e4, -1e4], requires_grad=True)
    out = tdpo_loss(big, -big, big.abs(), big.abs(), beta=1.0, variant="tdpo1")
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(_grads(out.losses, big)[0]).all()


def test_tdpo_bad_arguments():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="Unknown TDPO variant 'tdpo3'.*tdpo1"):
        tdpo_loss(x, x, x, x, beta=0.1, variant="tdpo3")
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        tdpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        tdpo_loss(x, torch.zeros(3), x, x, beta=0.1)


# ==================================================================================================================
# TGDPO
# ==================================================================================================================


def test_tgdpo_hand_computed_two_tokens():
    """Invariant 13: β = 0.1, α = 0.5.

    chosen:   ρ^w = [1.0, 2.0], r̂^w = [0.4, −0.2] → f_w = 1 + 0.5 r̂ = [1.2, 0.9] → Σ f ρ = 1.2 + 1.8 = 3.0
    rejected: ρ^l = [0.5, −1.0], r̂^l = [−0.6, 0.8] → f_l = 1 − 0.5 r̂ = [1.3, 0.6] → Σ f ρ = 0.65 − 0.6 = 0.05
    loss = −log σ(0.1 · (3.0 − 0.05)) = softplus(−0.295) = log(1 + 0.744532) = 0.556486.
    """
    out = tgdpo_loss(
        torch.tensor([[1.0, 2.0]]),
        torch.tensor([[0.5, -1.0]]),
        torch.tensor([[0.4, -0.2]]),
        torch.tensor([[-0.6, 0.8]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.ones(1, 2, dtype=torch.bool),
        beta=0.1,
        alpha=0.5,
    )
    assert isinstance(out, TGDPOLossOutput)
    assert_close(out.losses, torch.tensor([_softplus(-0.295)]))
    assert_close(out.losses, torch.tensor([0.556486]))
    assert_close(out.chosen_weights, torch.tensor([[1.2, 0.9]]))
    assert_close(out.rejected_weights, torch.tensor([[1.3, 0.6]]))


def _tgdpo_inputs(seed: int = 0):
    """Chosen [3, 4] and rejected [3, 6] (different T), right-padded masks with NaN garbage in masked slots."""
    rho_w, rho_l = _randn(3, 4, seed=seed), _randn(3, 6, seed=seed + 1)
    r_w, r_l = _randn(3, 4, seed=seed + 2), _randn(3, 6, seed=seed + 3)
    m_w = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    m_l = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    return rho_w, rho_l, r_w, r_l, m_w, m_l


def test_tgdpo_reduces_to_dpo():
    """Invariant 11: α = 0 (any r̂) or r̂ ≡ 0 (any α) gives DPO on the masked sums, in value and gradient.
    Invariant 3: ρ ≡ 0 gives log 2 for any r̂."""
    rho_w, rho_l, r_w, r_l, m_w, m_l = _tgdpo_inputs()
    dpo = _dpo(sequence_sum(rho_w, m_w), sequence_sum(rho_l, m_l), 0.1)
    dpo_grads = _grads(dpo, rho_w, rho_l)
    for rewards, alpha in (((r_w, r_l), 0.0), ((torch.zeros(3, 4), torch.zeros(3, 6)), 1.7)):
        losses = tgdpo_loss(rho_w, rho_l, *rewards, m_w, m_l, beta=0.1, alpha=alpha).losses
        assert_close(losses, dpo)
        for got, want in zip(_grads(losses, rho_w, rho_l), dpo_grads):
            assert_close(got, want)
    at_init = tgdpo_loss(torch.zeros(3, 4), torch.zeros(3, 6), r_w, r_l, m_w, m_l, beta=0.1, alpha=0.5).losses
    assert_close(at_init, torch.full((3,), LOG2))


def test_tgdpo_gradient_is_dpo_scaled_by_weights():
    """Invariant 12: ∂L/∂ρ^w_t = m_t f_w,t · ∂L_DPO/∂S_w evaluated at the weighted sums (likewise rejected), and no
    gradient reaches r̂ (f is a constant)."""
    rho_w, rho_l, r_w, r_l, m_w, m_l = _tgdpo_inputs(seed=5)
    out = tgdpo_loss(rho_w, rho_l, r_w, r_l, m_w, m_l, beta=0.1, alpha=0.5)
    assert not out.chosen_weights.requires_grad and not out.rejected_weights.requires_grad
    g_rho_w, g_rho_l = _grads(out.losses, rho_w, rho_l)
    assert torch.autograd.grad(out.losses.sum(), (r_w, r_l), allow_unused=True) == (None, None)

    s_w = (out.chosen_weights * rho_w.detach().nan_to_num()).sum(-1).requires_grad_()
    s_l = (out.rejected_weights * rho_l.detach().nan_to_num()).sum(-1).requires_grad_()
    d_w, d_l = _grads(_dpo(s_w, s_l, 0.1), s_w, s_l)
    assert_close(g_rho_w, d_w[:, None] * out.chosen_weights)
    assert_close(g_rho_l, d_l[:, None] * out.rejected_weights)
    assert_close(out.chosen_weights, torch.where(m_w, 1 + 0.5 * r_w.detach(), 0.0))
    assert_close(out.rejected_weights, torch.where(m_l, 1 - 0.5 * r_l.detach(), 0.0))


def test_tgdpo_monotone_in_token_rewards():
    """Invariant 14: with ρ > 0, raising r̂ on a chosen token (larger f_w) or on a rejected token (smaller f_l,
    less penalty) decreases the loss."""
    rho_w, rho_l = torch.tensor([[0.7, 0.3]]), torch.tensor([[0.4, 0.9]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    base_w, base_l = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.3, 0.0]])
    bump = torch.tensor([[0.5, 0.0]])

    def loss(r_w, r_l):
        return tgdpo_loss(rho_w, rho_l, r_w, r_l, mask, mask, beta=0.1, alpha=0.5).losses

    assert loss(base_w + bump, base_l) < loss(base_w, base_l)
    assert loss(base_w, base_l + bump) < loss(base_w, base_l)


def test_tgdpo_masked_garbage_never_leaks():
    """NaN / inf in masked ρ and r̂ slots change neither the loss nor the gradient (where, not multiply), and the
    masked slots get exactly zero gradient."""
    rho_w, rho_l, r_w, r_l, m_w, m_l = _tgdpo_inputs(seed=9)
    clean = tgdpo_loss(rho_w, rho_l, r_w, r_l, m_w, m_l, beta=0.1, alpha=0.5).losses
    clean_grads = _grads(clean, rho_w, rho_l)

    def poison(x, m):
        return torch.where(m, x.detach(), torch.tensor(float("nan"))).requires_grad_()

    p_rho_w, p_rho_l = poison(rho_w, m_w), poison(rho_l, m_l)
    p_r_w = torch.where(m_w, r_w.detach(), float("inf"))
    p_r_l = torch.where(m_l, r_l.detach(), float("-inf"))
    out = tgdpo_loss(p_rho_w, p_rho_l, p_r_w, p_r_l, m_w.long(), m_l.float(), beta=0.1, alpha=0.5)
    assert_close(out.losses, clean)
    for got, want in zip(_grads(out.losses, p_rho_w, p_rho_l), clean_grads):
        assert torch.isfinite(got).all()
        assert_close(got, want)
    assert (out.chosen_weights[~m_w] == 0).all() and (out.rejected_weights[~m_l] == 0).all()


def test_tgdpo_weight_clamp():
    """f_w = 1 + 0.5 · [10, −10] = [6, −4] → clamped to [0, 2]: [2, 0]; f_l = 1 − 0.5 · [−10, 1] = [6, 0.5] → [2, 0.5].
    ρ^w = [1, 1], ρ^l = [1, 2]: loss = softplus(−0.1 (2 − (2 + 1))) = softplus(0.1)."""
    out = tgdpo_loss(
        torch.tensor([[1.0, 1.0]]),
        torch.tensor([[1.0, 2.0]]),
        torch.tensor([[10.0, -10.0]]),
        torch.tensor([[-10.0, 1.0]]),
        torch.ones(1, 2),
        torch.ones(1, 2),
        beta=0.1,
        alpha=0.5,
        weight_clamp=(0.0, 2.0),
    )
    assert_close(out.chosen_weights, torch.tensor([[2.0, 0.0]]))
    assert_close(out.rejected_weights, torch.tensor([[2.0, 0.5]]))
    assert_close(out.losses, torch.tensor([_softplus(0.1)]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tgdpo_low_precision_and_extreme_inputs(dtype):
    """Half-precision inputs with |values| up to 1e4 give a finite float32 loss equal to the float32 computation."""
    rho_w, rho_l, r_w, r_l, m_w, m_l = _tgdpo_inputs(seed=3)
    rho_w = (rho_w.detach() * 1e4).to(dtype).requires_grad_()
    r_l = (r_l.detach() * 1e4).to(dtype)
    rho_l, r_w = rho_l.detach().to(dtype), r_w.detach().to(dtype)
    out = tgdpo_loss(rho_w, rho_l, r_w, r_l, m_w, m_l, beta=0.1, alpha=0.5)
    assert out.losses.dtype == torch.float32 and out.chosen_weights.dtype == torch.float32
    assert torch.isfinite(out.losses).all()
    reference = tgdpo_loss(rho_w.float(), rho_l.float(), r_w.float(), r_l.float(), m_w, m_l, beta=0.1, alpha=0.5)
    assert_close(out.losses, reference.losses)
    assert torch.isfinite(_grads(out.losses, rho_w)[0].float()).all()


def test_tgdpo_bad_arguments():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="lo <= hi"):
        tgdpo_loss(x, x, x, x, m, m, beta=0.1, weight_clamp=(2.0, 1.0))
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        tgdpo_loss(x, x, x, x, m, m, beta=-0.1)
    with pytest.raises(ValueError, match="same shape"):
        tgdpo_loss(x, x, torch.zeros(2, 4), x, m, m, beta=0.1)
    with pytest.raises(ValueError, match="batch sizes differ"):
        tgdpo_loss(x, x[:1], x, x[:1], m, m[:1], beta=0.1)


# ==================================================================================================================
# Bregman generators (BPO)
# ==================================================================================================================


def _h(generator: str, lam: float, s: float):
    """h(R) of BPO Table 2 (docs/algorithms.md §4.2). For λ = 0 the BA/SBA family is its limit R log R (up to a linear
    term, which only shifts ℓ by a constant)."""

    def h(r):
        if generator == "lr":
            return 0.5 * (r * r.log() - (1 + r) * (1 + r).log())
        if generator == "kliep":
            return r * r.log() - r
        if generator == "lsif":
            return (r - 1) ** 2
        base = r * r.log() if lam == 0 else (r ** (1 + lam) - r) / lam
        return base if generator == "ba" else base / (s * (lam + 1))

    return h


def _derivative(f, x):
    if not x.requires_grad:  # a leaf for a first derivative; kept in the graph for a second one
        x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    return g


def _generic_loss(h, r):
    """ℓ_h(R) = h′(R)R − h(R) − h′(1/R) (BPO Thm 3), with h′ by autograd."""
    return _derivative(h, r) * r - h(r) - _derivative(h, 1 / r)


R_GRID = torch.exp(torch.linspace(-3.0, 3.0, 25, dtype=torch.float64))


@pytest.mark.parametrize(("generator", "lam", "s"), GENERATOR_CASES, ids=GENERATOR_IDS)
def test_bregman_closed_form_matches_generic_formula(generator, lam, s):
    """Invariant 16: the closed form equals h′(R)R − h(R) − h′(1/R) up to an additive constant on a grid of R
    (float64, so the constant offsets of the closed forms cost no precision)."""
    closed = bregman_loss(R_GRID.log(), generator, lam, s)
    assert closed.dtype == torch.float64
    difference = closed - _generic_loss(_h(generator, lam, s), R_GRID)
    assert_close(difference, difference[0].expand_as(difference).detach(), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("generator", "lam", "s"), GENERATOR_CASES, ids=GENERATOR_IDS)
def test_bregman_gradient_weight_positive(generator, lam, s):
    """Invariants 15/17: dℓ/dR = G_h(R) = h″(R)R + h″(1/R)/R² (BPO Prop. 4) and G_h > 0 on the grid, so ℓ is
    strictly increasing in log R (strictly decreasing in the DPO margin u = −log R)."""
    r = R_GRID.clone().requires_grad_()
    (dl_dr,) = torch.autograd.grad(bregman_loss(r.log(), generator, lam, s).sum(), r)
    h = _h(generator, lam, s)

    def h2(x):
        return _derivative(lambda y: _derivative(h, y), x)

    expected = h2(R_GRID) * R_GRID + h2(1 / R_GRID) / R_GRID**2
    assert_close(dl_dr, expected.detach())
    assert (dl_dr > 0).all()
    values = bregman_loss(R_GRID.log(), generator, lam, s)
    assert (values.diff() > 0).all()


def test_bregman_lr_is_dpo():
    """Invariant 15: ℓ_LR(R) = log(1 + R) = softplus(−u) = −log σ(u) with R = e^{−u}, for any u (incl. ±1e4)."""
    u = torch.tensor([-1e4, -30.0, -2.0, 0.0, 0.5, 3.0, 30.0, 1e4])
    assert_close(bregman_loss(-u, "lr"), -F.logsigmoid(u))
    assert_close(bregman_loss(torch.zeros(1), "lr"), torch.tensor([LOG2]))


def test_bregman_special_cases():
    """LSIF = BA(1) (both R² − 2/R); BA(0) = KLIEP = R + log R; SBA(0, s) = KLIEP/s; at R = 1: ℓ_LR = log 2,
    SBA(0, 4) = (1 + 0)/4 = 1/4, SBA(−½, 4) = 1/(4·½) + 1/(4·½) = 1."""
    u = torch.linspace(-4.0, 4.0, 17)
    assert_close(bregman_loss(u, "lsif"), bregman_loss(u, "ba", 1.0))
    assert_close(bregman_loss(u, "lsif"), u.exp() ** 2 - 2 / u.exp())
    assert_close(bregman_loss(u, "ba", 0.0), bregman_loss(u, "kliep"))
    assert_close(bregman_loss(u, "kliep"), u.exp() + u)
    assert_close(bregman_loss(u, "sba", 0.0, 2.5), bregman_loss(u, "kliep") / 2.5)
    zero = torch.zeros(1)
    assert_close(bregman_loss(zero, "sba", 0.0, 4.0), torch.tensor([0.25]))
    assert_close(bregman_loss(zero, "sba", -0.5, 4.0), torch.tensor([1.0]))


@pytest.mark.parametrize("lam", [-0.9, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0])
def test_sba_scale_four_matches_dpo_slope_at_one(lam):
    """Invariant 18: SBA(λ, 4) has dℓ/dR = (R^λ + R^{−λ−1})/4 = 2/4 = ½ at R = 1, DPO's 1/(1+R) there."""
    r = torch.ones(1, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(bregman_loss(r.log(), "sba", lam, 4.0).sum(), r)
    assert_close(slope, torch.tensor([0.5], dtype=torch.float64))
    r = torch.ones(1, dtype=torch.float64, requires_grad=True)
    (lr_slope,) = torch.autograd.grad(bregman_loss(r.log(), "lr").sum(), r)
    assert_close(lr_slope, slope)


def test_sba_minus_half_is_exp_minus_half_margin():
    """Invariant 19: SBA(−½, 4)(R) = R^{½}/2 + R^{½}/2 = √R = e^{−u/2} for the DPO margin u = −log R."""
    u = torch.linspace(-10.0, 10.0, 41)
    assert_close(bregman_loss(-u, "sba", -0.5, 4.0), torch.exp(-u / 2))


def test_sba_small_lambda_approaches_kliep_over_s():
    """Invariant 20: dℓ/dlog R of SBA(λ, s) = (R^{λ+1} + R^{−λ})/s → (R + 1)/s, the KLIEP/s gradient, as λ → 0
    (from either side), with an error that shrinks with |λ|."""
    u = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    target = (u.exp() + 1) / 4.0

    def slope(lam):
        x = u.clone().requires_grad_()
        return torch.autograd.grad(bregman_loss(x, "sba", lam, 4.0).sum(), x)[0]

    errors = [(slope(lam) - target).abs().max().item() for lam in (1e-2, 1e-3, 1e-4)]
    assert errors[0] > errors[1] > errors[2]
    assert_close(slope(1e-6), target, rtol=1e-5, atol=1e-5)
    assert_close(slope(-1e-6), target, rtol=1e-5, atol=1e-5)
    assert_close(slope(0.0), target)


def test_bregman_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"Unknown Bregman generator 'dpo': `generator` must be one of \['lr'"):
        bregman_loss(x, "dpo")
    for generator in ("ba", "sba"):
        for lam in (-1.0, -2.0, float("nan")):
            with pytest.raises(ValueError, match="`generator_lambda` must be > -1"):
                bregman_loss(x, generator, lam)
    for scale in (0.0, -4.0):
        with pytest.raises(ValueError, match="`sba_scale` must be a finite number > 0"):
            bregman_loss(x, "sba", 0.0, scale)
    # λ and s are ignored by the generators that do not use them.
    assert_close(bregman_loss(x, "lr", -5.0, -1.0), torch.full((3,), LOG2))
    assert tuple(BREGMAN_GENERATORS) == ("lr", "kliep", "lsif", "ba", "sba")


# ==================================================================================================================
# TBPO
# ==================================================================================================================


def test_tbpo_hand_computed():
    """β = 0.1, ρ^w = [1, −2, 5], ρ^l = [3, 1, 9], pair mask [1, 1, 0] (T = 2).

    log R = 0.1 · (ρ^l − ρ^w) = [0.2, 0.3] (third slot masked → 0).
    LR: (softplus(0.2) + softplus(0.3))/2 = (0.798139 + 0.854355)/2 = 0.826247.
    SBA(0, 4): ((e^0.2 + 0.2)/4 + (e^0.3 + 0.3)/4)/2 = (0.355351 + 0.412465)/2 = 0.383908.
    With log w = [0.5, −1, 7]: log R = 0.1 · [2.5, 2.0] = [0.25, 0.2].
    Label smoothing ε = 0.1, LR, no weights: per token 0.9 softplus(x) + 0.1 softplus(−x).
    """
    rho_w, rho_l = torch.tensor([[1.0, -2.0, 5.0]]), torch.tensor([[3.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    lr = tbpo_loss(rho_w, rho_l, mask, beta=0.1, generator="lr")
    assert isinstance(lr, TBPOLossOutput)
    assert_close(lr.log_ratio, torch.tensor([[0.2, 0.3, 0.0]]))
    assert_close(lr.per_token_losses, torch.tensor([[_softplus(0.2), _softplus(0.3), 0.0]]))
    assert_close(lr.losses, torch.tensor([0.826247]))
    sba = tbpo_loss(rho_w, rho_l, mask, beta=0.1)  # default generator SBA(0, 4)
    expected = ((math.exp(0.2) + 0.2) / 4 + (math.exp(0.3) + 0.3) / 4) / 2
    assert_close(sba.losses, torch.tensor([expected]))
    assert_close(sba.losses, torch.tensor([0.383908]))
    weighted = tbpo_loss(rho_w, rho_l, mask, beta=0.1, log_weights=torch.tensor([[0.5, -1.0, 7.0]]))
    assert_close(weighted.log_ratio, torch.tensor([[0.25, 0.2, 0.0]]))
    smoothed = tbpo_loss(rho_w, rho_l, mask, beta=0.1, generator="lr", label_smoothing=0.1)
    per_token = [0.9 * _softplus(x) + 0.1 * _softplus(-x) for x in (0.2, 0.3)]
    assert_close(smoothed.losses, torch.tensor([sum(per_token) / 2]))


def test_tbpo_a_log_ratio_antisymmetry():
    """Invariant 2: swapping chosen and rejected (ρ and κ, so log w = κ^l − κ^w flips sign) negates log R_t."""
    rho_w, rho_l, k_w, k_l = _randn(3, 5, seed=1), _randn(3, 5, seed=2), _randn(3, 5, seed=3), _randn(3, 5, seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    forward = tbpo_loss(rho_w, rho_l, mask, beta=0.2, log_weights=k_l.abs() - k_w.abs())
    swapped = tbpo_loss(rho_l, rho_w, mask, beta=0.2, log_weights=k_w.abs() - k_l.abs())
    assert_close(swapped.log_ratio, -forward.log_ratio)


@pytest.mark.parametrize(("generator", "lam", "expected"), [("lr", 0.0, LOG2), ("sba", 0.0, 0.25), ("sba", -0.5, 1.0)])
def test_tbpo_value_at_init(generator, lam, expected):
    """Invariant 3: ρ ≡ 0, κ ≡ 0 → log R ≡ 0 → per-token loss ℓ_h(1): log 2 (LR), 1/4 (SBA(0,4)), 1 (SBA(−½,4))."""
    zeros = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = tbpo_loss(zeros, zeros, mask, beta=0.1, log_weights=zeros, generator=generator, generator_lambda=lam)
    assert_close(out.per_token_losses, torch.where(mask.bool(), expected, 0.0))
    assert_close(out.losses, torch.full((2,), expected))


@pytest.mark.parametrize(("generator", "lam", "s"), GENERATOR_CASES, ids=GENERATOR_IDS)
def test_tbpo_identical_responses_have_zero_gradient(generator, lam, s):
    """Invariant 21: chosen = rejected → log R_t ≡ 0 and zero gradient, for TBPO-A (log w = κ − κ) and TBPO-Q
    (centred b − b)."""
    rho, kappa, head = _randn(2, 5, seed=1), _randn(2, 5, seed=2).abs(), _randn(2, 5, seed=3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for log_weights in (kappa - kappa, center_log_weights(head - head, mask)):
        out = tbpo_loss(rho, rho, mask, beta=0.1, log_weights=log_weights, generator=generator, generator_lambda=lam)
        assert_close(out.log_ratio, torch.zeros(2, 5))
        for grad in _grads(out.losses, rho, kappa, head):
            assert_close(grad, torch.zeros(2, 5))


def test_tbpo_appending_to_longer_response_changes_nothing():
    """Invariant 22: only the first T = min(n_w, n_l) completion positions count; appending tokens to the longer
    response (chosen in pair 0, rejected in pair 1) leaves loss and gradient on the shared tokens unchanged."""
    chosen = [[0.3, -0.2, 0.5], [0.1]]
    rejected = [[0.1, 0.4], [0.2, -0.6, 0.8]]
    values, mask = _layout(chosen + rejected, "right")
    longer_values, longer_mask = _layout(
        [chosen[0] + [7.0, -3.0], chosen[1]] + [rejected[0], rejected[1] + [5.0]], "right"
    )
    out = tbpo_loss(*aligned_by_completion_index(values, mask), beta=0.1, generator="sba", generator_lambda=0.5)
    longer = tbpo_loss(
        *aligned_by_completion_index(longer_values, longer_mask), beta=0.1, generator="sba", generator_lambda=0.5
    )
    assert_close(longer.losses, out.losses)
    (g,), (g_longer,) = _grads(out.losses, values), _grads(longer.losses, longer_values)
    assert_close(g_longer[mask], g[mask])
    assert (g_longer[longer_mask & ~mask] == 0).all()


def test_tbpo_padding_side_invariance():
    """Invariant 23 (and 1): right, left, flush (completion at column 0) and ragged (per-row prompt offset, as
    keep_end truncation gives) layouts, with NaN in every prompt/pad slot, give the same losses and the same
    gradients on the completion tokens."""
    chosen = [[0.3, -0.2, 0.5, 1.0], [0.1, 0.7], [-0.4, 0.2, 0.2]]
    rejected = [[0.1, 0.4], [0.2, -0.6, 0.8], [0.5, 0.5, -1.0]]
    results = []
    for side in ("right", "left", "flush", "ragged"):
        values, mask = _layout(chosen + rejected, side)
        kl_values, _ = _layout([[abs(v) for v in row] for row in chosen + rejected], side)
        cw, cl, pair_mask = aligned_by_completion_index(values, mask)
        kw, kl, _ = aligned_by_completion_index(kl_values, mask)
        out = tbpo_loss(cw, cl, pair_mask, beta=0.1, log_weights=kl - kw)
        (g,) = _grads(out.losses, values)
        assert torch.isfinite(out.losses).all() and torch.isfinite(g).all()
        results.append((out.losses, g[mask]))
    for losses, grads in results[1:]:
        assert_close(losses, results[0][0])
        assert_close(grads, results[0][1])


@pytest.mark.parametrize(("generator", "lam", "s"), GENERATOR_CASES, ids=GENERATOR_IDS)
def test_tbpo_macro_token_is_bpo(generator, lam, s):
    """Invariant 24: one macro-token per response (summed log-ratios, [B, 1], all-ones mask, w = 1) is BPO(h):
    ℓ_h(β(S^ρ_l − S^ρ_w)); with h = LR that is DPO. With T = 1 (w_1 = 1 since both prefixes are [x], so
    κ^w_1 = κ^l_1) TBPO-A equals BPO on the first token."""
    s_w, s_l = _randn(4, 1, seed=1), _randn(4, 1, seed=2)
    out = tbpo_loss(s_w, s_l, torch.ones(4, 1), beta=0.1, generator=generator, generator_lambda=lam, sba_scale=s)
    assert_close(out.losses, bregman_loss(0.1 * (s_l - s_w), generator, lam, s).squeeze(-1))
    if generator == "lr":
        assert_close(out.losses, _dpo(s_w, s_l, 0.1).squeeze(-1))

    rho_w, rho_l, kappa = _randn(4, 3, seed=3), _randn(4, 3, seed=4), _randn(4, 1, seed=5).abs()
    first_only = torch.tensor([[1, 0, 0]]).expand(4, 3)
    k_w, k_l = kappa.expand(4, 3), kappa.expand(4, 3)
    tbpo_a = tbpo_loss(rho_w, rho_l, first_only, 0.1, k_l - k_w, generator, lam, s)
    assert_close(tbpo_a.losses, bregman_loss(0.1 * (rho_l - rho_w)[:, 0], generator, lam, s))


def test_tbpo_a_lr_is_per_token_tdpo1():
    """Invariant 25: TBPO-A with h = LR per token is −log σ(β[(ρ^w_t − ρ^l_t) − (κ^l_t − κ^w_t)]) averaged over
    t ≤ T, in value and in gradient (including into both KLs: no stop-gradient)."""
    rho_w, rho_l = _randn(3, 5, seed=1), _randn(3, 5, seed=2)
    k_w, k_l = _randn(3, 5, seed=3, scale=0.5).abs(), _randn(3, 5, seed=4, scale=0.5).abs()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = tbpo_loss(rho_w, rho_l, mask, beta=0.3, log_weights=k_l - k_w, generator="lr")
    per_token = -F.logsigmoid(0.3 * ((rho_w - rho_l) - (k_l - k_w)))
    expected = (per_token * mask).sum(-1) / mask.sum(-1)
    assert_close(out.losses, expected)
    for got, want in zip(_grads(out.losses, rho_w, rho_l, k_w, k_l), _grads(expected, rho_w, rho_l, k_w, k_l)):
        assert_close(got, want)


def test_tbpo_pair_without_aligned_tokens_has_zero_loss():
    out = tbpo_loss(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([[0, 0, 0], [1, 0, 0]]), beta=1.0)
    assert_close(out.losses[0], torch.tensor(0.0))
    assert torch.isfinite(out.losses).all()


def test_center_log_weights():
    """Invariant 26: per-pair masked mean removed, so Σ_t m_t log ŵ_t = 0; exactly 0 where masked (NaN there does
    not leak); clamped to ±10; gradient flows to the head's outputs.

    Pair 0, mask [1,1,1,0]: [1, 2, 6, nan] − mean 3 → [−2, −1, 3, 0].
    Pair 1, mask [1,1,0,0]: [30, −30, ...] − 0 → [30, −30] → clamped [10, −10].
    """
    raw = torch.tensor([[1.0, 2.0, 6.0, float("nan")], [30.0, -30.0, float("inf"), 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    centred = center_log_weights(raw, mask)
    assert_close(centred, torch.tensor([[-2.0, -1.0, 3.0, 0.0], [10.0, -10.0, 0.0, 0.0]]))
    (g,) = _grads((centred * torch.tensor([1.0, 0.0, 0.0, 0.0])).sum(-1), raw)
    # ∂ŵ_0/∂w_s = δ_0s − 1/T on pair 0 (T = 3); pair 1's first entry is clamped, so no gradient.
    assert_close(g, torch.tensor([[2 / 3, -1 / 3, -1 / 3, 0.0], [0.0, 0.0, 0.0, 0.0]]))

    head = _randn(4, 6, seed=7, scale=3.0)
    ragged = torch.arange(6)[None] < torch.tensor([[6], [4], [1], [0]])
    centred = center_log_weights(head, ragged, clamp=math.inf)
    assert_close(sequence_sum(centred, ragged), torch.zeros(4), atol=1e-5, rtol=0)
    assert (centred[~ragged] == 0).all()
    assert centred.abs().max() <= 10
    clamped = center_log_weights(head * 100, ragged)
    assert clamped.abs().max() == 10


def test_tbpo_q_head_gets_gradient_through_centred_weights():
    """TBPO-Q wiring: log w = center(b_l − b_w) feeds log R; the head outputs receive a finite, non-zero gradient."""
    b_w, b_l = _randn(2, 4, seed=1), _randn(2, 4, seed=2)
    rho_w, rho_l = torch.randn(2, 4, generator=_gen(3)), torch.randn(2, 4, generator=_gen(4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = tbpo_loss(rho_w, rho_l, mask, beta=0.1, log_weights=center_log_weights(b_l - b_w, mask))
    g_w, g_l = _grads(out.losses, b_w, b_l)
    assert torch.isfinite(g_w).all() and g_w[mask.bool()].abs().sum() > 0
    assert_close(g_l, -g_w)


@pytest.mark.parametrize(("generator", "lam", "s"), GENERATOR_CASES, ids=GENERATOR_IDS)
def test_tbpo_log_ratio_clamp_keeps_extremes_finite(generator, lam, s):
    """Invariant 27: inputs of ±1e4 (and a mix with in-range values) give finite losses and gradients for every
    generator: log R is clamped to [−30, 30] before ℓ_h, with zero gradient outside the range."""
    big = torch.tensor([[1e4, -1e4, 1e4, 0.5], [-1e4, 1e4, -1e4, -0.5]], requires_grad=True)
    weights = torch.tensor([[1e4, 1e4, -1e4, 0.0], [-1e4, -1e4, 1e4, 0.0]], requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    for smoothing in (0.0, 0.1):
        out = tbpo_loss(
            big, -big, mask, 0.1, weights, generator, lam, s, log_ratio_clamp=30.0, label_smoothing=smoothing
        )
        assert torch.isfinite(out.losses).all() and torch.isfinite(out.per_token_losses).all()
        assert out.log_ratio.abs().max() <= 30.0
        assert_close(out.log_ratio[:, :3].abs(), torch.full((2, 3), 30.0))
        g_big, g_weights = _grads(out.losses, big, weights)
        assert torch.isfinite(g_big).all() and torch.isfinite(g_weights).all()
        assert_close(g_big[:, :3], torch.zeros(2, 3))
        assert (g_big[:, 3] != 0).all()


def test_tbpo_masked_garbage_never_leaks():
    """NaN / inf in masked ρ and log w slots leave loss and gradients equal to the clean computation; masked slots
    of log_ratio and per_token_losses are exactly 0."""
    rho_w, rho_l, lw = _randn(3, 4, seed=1), _randn(3, 4, seed=2), _randn(3, 4, seed=3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    clean = tbpo_loss(rho_w, rho_l, mask, beta=0.1, log_weights=lw, generator="sba", generator_lambda=1.0)
    clean_grads = _grads(clean.losses, rho_w, rho_l, lw)

    def poison(x, value):
        return torch.where(mask, x.detach(), value).requires_grad_()

    p_w, p_l, p_lw = poison(rho_w, float("nan")), poison(rho_l, float("inf")), poison(lw, float("-inf"))
    out = tbpo_loss(p_w, p_l, mask.float(), beta=0.1, log_weights=p_lw, generator="sba", generator_lambda=1.0)
    assert_close(out.losses, clean.losses)
    assert (out.log_ratio[~mask] == 0).all() and (out.per_token_losses[~mask] == 0).all()
    for got, want in zip(_grads(out.losses, p_w, p_l, p_lw), clean_grads):
        assert torch.isfinite(got).all()
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tbpo_low_precision_inputs(dtype):
    """fp16/bf16 inputs (|values| up to 1e4) give finite float32 outputs equal to the float32 computation."""
    rho_w = (_randn(2, 5, seed=1).detach() * 1e4).to(dtype).requires_grad_()
    rho_l = _randn(2, 5, seed=2).detach().to(dtype)
    lw = _randn(2, 5, seed=3).detach().to(dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = tbpo_loss(rho_w, rho_l, mask, beta=0.1, log_weights=lw, generator="sba", generator_lambda=-0.5)
    for tensor in out[:-1]:  # the last field is the metrics dict
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    reference = tbpo_loss(rho_w.float(), rho_l.float(), mask, 0.1, lw.float(), "sba", -0.5)
    assert_close(out.losses, reference.losses)
    assert torch.isfinite(_grads(out.losses, rho_w)[0].float()).all()
    centred = center_log_weights(lw, mask)
    assert centred.dtype == torch.float32


def test_tbpo_bad_arguments():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="`log_ratio_clamp` must be a finite number > 0"):
        tbpo_loss(x, x, m, beta=0.1, log_ratio_clamp=0.0)
    for smoothing in (-0.1, 0.6):
        with pytest.raises(ValueError, match=r"`label_smoothing` must be in \[0, 0.5\]"):
            tbpo_loss(x, x, m, beta=0.1, label_smoothing=smoothing)
    with pytest.raises(ValueError, match="Unknown Bregman generator"):
        tbpo_loss(x, x, m, beta=0.1, generator="softplus")
    with pytest.raises(ValueError, match="`generator_lambda` must be > -1"):
        tbpo_loss(x, x, m, beta=0.1, generator="sba", generator_lambda=-1.0)
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        tbpo_loss(x, x, m, beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        tbpo_loss(x, x, m, beta=0.1, log_weights=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="2 dimension"):
        tbpo_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), beta=0.1)
    with pytest.raises(ValueError, match="`clamp` must be > 0"):
        center_log_weights(x, m, clamp=0.0)
