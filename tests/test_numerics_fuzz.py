"""Fuzz every loss of `trl_tokenpref.losses` and the fused token statistics with extreme per-token inputs.

A NaN at step 40,000 of a two-day run costs the run. These tests draw seeded random inputs (no `hypothesis`: a fixed
`torch.Generator` per case, so a failure names its case and replays exactly) whose magnitudes span many decades up to
the extremes a real run can produce (per-token log-ratios and token rewards up to 1e4, logits up to |1e4|, reference
probabilities that underflow to 0, fully masked rows, float16 and bfloat16 inputs), through the same compositions the
trainers use (masked sums, completion-index alignment, centring of the TBPO-Q weights), and assert that no loss value
and no gradient is NaN or inf.

One caveat is not a defect: autograd stores the gradient of a float16 tensor in float16, whose largest value is 65504,
so a gradient whose exact value exceeds that overflows to inf however the loss is written. Each case therefore also
computes the exact gradient in float64 (float32 for the token statistics, whose reference is the naive full-logits
computation) and requires a finite gradient wherever the exact one is representable in the input dtype. bfloat16 has
float32's range, so there every gradient must be finite. In the trainers the losses get float32 statistics anyway.
"""

import math

import pytest
import torch
from testing_utils import aligned_by_completion_index, padded_token_stats

import trl_tokenpref.token_stats.fused as fused_kernel
from trl_tokenpref.losses import (
    _MAX_SAFE_EXPONENT,
    _exponent_coefficient,
    center_log_weights,
    sequence_sum,
    tbpo_loss,
    tdpo_loss,
)
from trl_tokenpref.losses import tgdpo_loss as tgdpo_loss_fn
from trl_tokenpref.token_stats import LMHead, naive_token_stats


CASES = 60
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (generator, λ): every generator, and BA/SBA across λ > −1, including values next to −1 and 0 (where the closed forms
# divide by λ + 1 or λ)
GENERATORS = [
    ("lr", 0.0),
    ("kliep", 0.0),
    ("lsif", 0.0),
    *[("ba", lam) for lam in (-0.99, -0.5, -1e-6, 0.0, 1e-6, 1.0, 2.0)],
    *[("sba", lam) for lam in (-0.99, -0.5, -1e-6, 0.0, 1e-6, 0.5, 1.0, 2.0)],
]


def extreme(generator: torch.Generator, shape, max_abs: float, non_negative: bool = False) -> torch.Tensor:
    """float64 values whose magnitudes are log-uniform over [1e-6, max_abs], with a few exact zeros and exact ±max_abs."""
    exponent = torch.rand(shape, generator=generator, dtype=torch.float64) * (math.log10(max_abs) + 6) - 6
    values = 10.0**exponent
    values[torch.rand(shape, generator=generator) < 0.05] = 0.0
    values[torch.rand(shape, generator=generator) < 0.05] = max_abs
    if not non_negative:
        values = values * torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).double()
    return values


def random_mask(generator: torch.Generator, rows: int, length: int) -> torch.Tensor:
    """Completion masks of random lengths (a prompt, a completion, padding), some rows empty."""
    starts = torch.randint(0, length, (rows, 1), generator=generator)
    lengths = torch.randint(0, length + 1, (rows, 1), generator=generator)
    positions = torch.arange(length)
    return (positions >= starts) & (positions < starts + lengths)


def max_abs_for(dtype: torch.dtype, wanted: float) -> float:
    return min(wanted, torch.finfo(dtype).max / 4)


def run_case(build_loss, inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Evaluate `build_loss` on the inputs rounded to `dtype` (leaves with gradients) and on the same values in
    float64, then check that the loss and every gradient are finite wherever the float64 ones are representable."""
    rounded = {name: value.to(dtype) for name, value in inputs.items()}
    leaves = {name: value.clone().requires_grad_() for name, value in rounded.items()}
    exact = {name: value.double().requires_grad_() for name, value in rounded.items()}

    loss = build_loss(leaves)
    loss.backward()
    exact_loss = build_loss(exact)
    exact_loss.backward()

    assert torch.isfinite(exact_loss), "the float64 reference itself is not finite: the case is out of range"
    assert torch.isfinite(loss), f"loss {loss.item()} from {dtype} inputs"
    largest = torch.finfo(dtype).max
    for name, leaf in leaves.items():
        if exact[name].grad is None:  # a constant of the loss (TGDPO's token rewards)
            assert leaf.grad is None, name
            continue
        assert torch.isfinite(exact[name].grad).all(), name
        grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        representable = exact[name].grad.abs() < largest / 2
        assert torch.isfinite(grad[representable]).all(), f"non-finite gradient of {name} ({dtype})"


@pytest.mark.parametrize("case", range(CASES))
def test_tdpo_loss(case):
    generator = torch.Generator().manual_seed(case)
    dtype = DTYPES[case % len(DTYPES)]
    rows, length = (
        int(torch.randint(1, 6, (1,), generator=generator)),
        int(torch.randint(1, 40, (1,), generator=generator)),
    )
    max_abs = max_abs_for(dtype, 1e4)
    inputs = {
        "rho": extreme(generator, (2 * rows, length), max_abs),
        "kl": extreme(generator, (2 * rows, length), max_abs, non_negative=True),  # κ ≥ 0
    }
    mask = random_mask(generator, 2 * rows, length)
    beta = float(10 ** (torch.rand(1, generator=generator).item() * 3 - 2))  # 0.01 … 10
    alpha = float(torch.rand(1, generator=generator).item() * 5)
    variant = ("tdpo1", "tdpo2")[case % 2]

    def build(x):
        # The trainer's composition: masked sums over the completion, then the loss on [chosen; rejected] halves
        logratios, kl = sequence_sum(x["rho"], mask), sequence_sum(x["kl"], mask)
        chosen, rejected = logratios.chunk(2)
        chosen_kl, rejected_kl = kl.chunk(2)
        output = tdpo_loss(chosen, rejected, chosen_kl, rejected_kl, beta=beta, alpha=alpha, variant=variant)
        return output.losses.mean() + 1e-3 * (output.chosen_rewards - output.rejected_rewards).mean()

    run_case(build, inputs, dtype)


@pytest.mark.parametrize("case", range(CASES))
def test_tgdpo_loss(case):
    generator = torch.Generator().manual_seed(1000 + case)
    dtype = DTYPES[case % len(DTYPES)]
    rows = int(torch.randint(1, 6, (1,), generator=generator))
    chosen_len, rejected_len = (int(n) for n in torch.randint(1, 40, (2,), generator=generator))
    max_abs = max_abs_for(dtype, 1e4)
    inputs = {
        "chosen_rho": extreme(generator, (rows, chosen_len), max_abs),
        "rejected_rho": extreme(generator, (rows, rejected_len), max_abs),
        "chosen_rewards": extreme(generator, (rows, chosen_len), max_abs),
        "rejected_rewards": extreme(generator, (rows, rejected_len), max_abs),
    }
    chosen_mask = random_mask(generator, rows, chosen_len)
    rejected_mask = random_mask(generator, rows, rejected_len)
    beta = float(10 ** (torch.rand(1, generator=generator).item() * 3 - 2))
    alpha = float(torch.rand(1, generator=generator).item() * 5)
    clamp = [None, (0.0, math.inf), (-2.0, 3.0)][case % 3]

    def build(x):
        output = tgdpo_loss_fn(
            x["chosen_rho"],
            x["rejected_rho"],
            x["chosen_rewards"],
            x["rejected_rewards"],
            chosen_mask,
            rejected_mask,
            beta=beta,
            alpha=alpha,
            weight_clamp=clamp,
        )
        return output.losses.mean()

    run_case(build, inputs, dtype)


@pytest.mark.parametrize("case", range(2 * CASES))
def test_tbpo_loss(case):
    """Every generator (BA/SBA over a λ grid), with no state weight, TBPO-A's KL difference or TBPO-Q's centred
    weights, with and without label smoothing, through the trainer's completion-index alignment."""
    generator = torch.Generator().manual_seed(2000 + case)
    dtype = DTYPES[case % len(DTYPES)]
    name, lam = GENERATORS[case % len(GENERATORS)]
    weights = ("none", "tbpo_a", "tbpo_q")[case % 3]
    rows, length = (
        int(torch.randint(1, 5, (1,), generator=generator)),
        int(torch.randint(1, 40, (1,), generator=generator)),
    )
    max_abs = max_abs_for(dtype, 1e4)
    inputs = {"rho": extreme(generator, (2 * rows, length), max_abs)}
    if weights == "tbpo_a":
        inputs["kl"] = extreme(generator, (2 * rows, length), max_abs, non_negative=True)
    elif weights == "tbpo_q":
        inputs["baselines"] = extreme(generator, (2 * rows, length), max_abs)
    mask = random_mask(generator, 2 * rows, length)
    beta = float(10 ** (torch.rand(1, generator=generator).item() * 3 - 2))
    # The largest clamp TBPOConfig accepts for this generator (it refuses one that overflows float32), or less
    safe_clamp = min(30.0, _MAX_SAFE_EXPONENT / max(_exponent_coefficient(name, lam), 1e-12))
    log_ratio_clamp = safe_clamp * float(0.2 + 0.8 * torch.rand(1, generator=generator).item())
    label_smoothing = (0.0, 0.1, 0.5)[case % 3 if case % 2 else 0]
    sba_scale = float(0.5 + 8 * torch.rand(1, generator=generator).item())
    baseline_clamp = (10.0, math.inf)[case % 2]

    def aligned(values):
        return aligned_by_completion_index(values, mask)

    def build(x):
        chosen_rho, rejected_rho, pair_mask = aligned(x["rho"])
        log_weights = None
        if weights == "tbpo_a":
            chosen_kl, rejected_kl, _ = aligned(x["kl"])
            log_weights = rejected_kl - chosen_kl
        elif weights == "tbpo_q":
            chosen_b, rejected_b, _ = aligned(x["baselines"])
            log_weights = center_log_weights(rejected_b - chosen_b, pair_mask, clamp=baseline_clamp)
        output = tbpo_loss(
            chosen_rho,
            rejected_rho,
            pair_mask,
            beta=beta,
            log_weights=log_weights,
            generator=name,
            generator_lambda=lam,
            sba_scale=sba_scale,
            log_ratio_clamp=log_ratio_clamp,
            label_smoothing=label_smoothing,
        )
        return output.losses.mean()

    run_case(build, inputs, dtype)


# ----------------------------------------------------------------------------------------------- token statistics


@pytest.fixture(params=["small_vocab_tiles", "one_vocab_tile"])
def vocab_tile(request, monkeypatch):
    """Fold the vocabulary in several small tiles (the online-softmax merge is where infinities meet) or one.
    `monkeypatch.setattr` fails if the fused kernel renames its tile constant: this coverage must not vanish silently."""
    tile = 7 if request.param == "small_vocab_tiles" else 10**6
    monkeypatch.setattr(fused_kernel, "CPU_VOCAB_TILE", tile)
    return tile


def scaled_head(generator, vocab: int, hidden_states: torch.Tensor, max_logit: float, bias: bool) -> LMHead:
    """An LM head whose largest |logit| on `hidden_states` is exactly `max_logit` (in float32, before rounding)."""
    weight = torch.randn(vocab, hidden_states.size(-1), generator=generator)
    head_bias = torch.randn(vocab, generator=generator) if bias else None
    logits = torch.nn.functional.linear(hidden_states, weight, head_bias)
    scale = max_logit / logits.abs().max()
    return LMHead(weight * scale, None if head_bias is None else head_bias * scale)


@pytest.mark.parametrize("case", range(CASES))
def test_token_stats(case, vocab_tile):
    """`compute_token_stats` with |logits| up to 1e4 for the policy and the reference (whose probabilities then
    underflow to exact zeros), float32/bfloat16/float16 inputs, biases, logit scales and softcaps, chunk sizes that
    do not divide the tokens, fully masked rows: every statistic and every gradient of a loss on the log-probs and
    the KL is finite."""
    generator = torch.Generator().manual_seed(3000 + case)
    dtype = DTYPES[case % len(DTYPES)]
    rows, seq = (
        int(torch.randint(1, 4, (1,), generator=generator)),
        int(torch.randint(2, 12, (1,), generator=generator)),
    )
    hidden_size, vocab = (8, 16)[case % 2], (37, 64, 101)[case % 3]
    max_logit = (1.0, 1e2, 1e3, 1e4)[(case // 3) % 4]
    ref_max_logit = (1e4, 1e3, 10.0)[case % 3]  # 1e4: the reference's probabilities underflow to exact zeros
    bias = bool(case % 2)
    softcap = 30.0 if case % 7 == 0 else None
    logit_scale = 0.5 if case % 5 == 0 else 1.0
    chunk_size = (None, 1, 3, 7)[case % 4]

    hidden = torch.randn(rows, seq, hidden_size, generator=generator)
    ref_hidden = hidden + torch.randn(rows, seq, hidden_size, generator=generator)
    head = scaled_head(generator, vocab, hidden, max_logit, bias)._replace(logit_scale=logit_scale, softcap=softcap)
    ref_head = scaled_head(generator, vocab, ref_hidden, ref_max_logit, bias)._replace(
        logit_scale=logit_scale, softcap=softcap
    )
    labels = torch.randint(0, vocab, (rows, seq), generator=generator)
    labels[torch.rand(rows, seq, generator=generator) < 0.3] = -100
    labels[0, :] = -100 if case % 4 == 0 else labels[0, :]  # sometimes a fully masked row
    weight_lp, weight_kl = torch.randn(rows, seq, generator=generator), torch.randn(rows, seq, generator=generator)

    def leaves(cast_dtype):
        tensors = {"hidden": hidden, "weight": head.weight}
        if bias:
            tensors["bias"] = head.bias
        return {name: value.to(cast_dtype).clone().requires_grad_() for name, value in tensors.items()}

    def run(stats_fn, cast_dtype, **kwargs):
        x = leaves(cast_dtype)
        policy_head = head._replace(weight=x["weight"], bias=x.get("bias"))
        reference = ref_head._replace(
            weight=ref_head.weight.to(cast_dtype), bias=None if ref_head.bias is None else ref_head.bias.to(cast_dtype)
        )
        stats = stats_fn(x["hidden"], policy_head, labels, ref_hidden.to(cast_dtype), reference, **kwargs)
        loss = (stats.log_probs.float() * weight_lp).sum() + (stats.forward_kl.float() * weight_kl).sum()
        loss.backward()
        return stats, loss, x

    stats, loss, x = run(padded_token_stats, dtype, chunk_size=chunk_size)
    # The exact gradients' magnitudes, from the naive full-logits computation on the same (rounded) values in float32
    _, exact_loss, exact = run(lambda *a: naive_token_stats(*a), torch.float32)
    assert torch.isfinite(exact_loss)

    for field in ("log_probs", "entropy", "mean_logits", "ref_log_probs", "forward_kl"):
        assert torch.isfinite(getattr(stats, field)).all(), field
    assert torch.isfinite(loss)
    largest = torch.finfo(dtype).max
    for name, leaf in x.items():
        grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
        exact_grad = exact[name].grad
        assert torch.isfinite(exact_grad).all(), name
        representable = exact_grad.abs() < largest / 2
        assert torch.isfinite(grad[representable]).all(), f"non-finite gradient of {name} ({dtype})"
