"""The fused chunked pass (`compute_token_stats`) against the naive full-logits computation, in value and gradient.

Every field of `TokenStats` is compared, with and without a reference model, for float32 and bfloat16 inputs (bf16
parameters and fp32 parameters under bf16 autocast), with chunk sizes that do not divide the number of tokens, with a
logit scale and a softcap, with extreme logits, and with reference probabilities that underflow. The same inputs are
also run through TRL's own chunked kernels (`ChunkedDivergenceFunction` with `beta=0`, which is the forward
KL(teacher ‖ student), and `ChunkedLogProbFunction`). Ground truth, where the fp32 computations themselves are in
question, is a float64 `log_softmax` computation written out here.

No timing assertions: speed and memory are measured by `benchmarks/`, not tested.
"""

import pytest
import torch
from testing_utils import padded_token_stats
from torch.testing import assert_close

import trl_tokenpref.token_stats.fused as fused_kernel
from trl_tokenpref._compat import ChunkedDivergenceFunction, ChunkedLogProbFunction
from trl_tokenpref.token_stats import (
    CPU_TILE_ELEMENTS,
    CPU_VOCAB_TILE,
    GPU_TILE_ELEMENTS,
    LMHead,
    TokenStats,
    default_token_chunk_size,
    naive_token_stats,
)


ROWS, SEQ, HIDDEN, VOCAB = 4, 13, 16, 53  # VOCAB is prime: no tile divides it
FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "ref_log_probs", "forward_kl")
# On CPU the vocabulary is folded in tiles of `CPU_VOCAB_TILE` rows (online softmax). These tests shrink the tile so
# that the 53-row vocabulary spans several tiles with a ragged last one ("tiled"), or keep it whole ("whole").
VOCAB_TILES = {"tiled": 10, "whole": VOCAB}


@pytest.fixture(params=list(VOCAB_TILES))
def vocab_tile(request, monkeypatch):
    monkeypatch.setattr(fused_kernel, "CPU_VOCAB_TILE", VOCAB_TILES[request.param])
    return VOCAB_TILES[request.param]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make_inputs(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    weight_scale: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    masked_fraction: float = 0.3,
):
    """Random policy hidden states and head (leaves with gradients), a reference (constants) with its own head, and
    labels with `-100` at random positions (the first position of every row is always masked, as a prompt would be)."""
    g = _gen(seed)
    hidden = torch.randn(ROWS, SEQ, HIDDEN, generator=g).to(dtype).requires_grad_()
    weight = (weight_scale * torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype).requires_grad_()
    head_bias = (0.1 * torch.randn(VOCAB, generator=g)).to(dtype).requires_grad_() if bias else None
    head = LMHead(weight, head_bias, logit_scale=logit_scale, softcap=softcap)
    ref_hidden = (hidden.detach().float() + 0.5 * torch.randn(ROWS, SEQ, HIDDEN, generator=g)).to(dtype)
    ref_weight = (
        weight.detach().float() + 0.3 * weight_scale * torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5
    ).to(dtype)
    ref_bias = (0.1 * torch.randn(VOCAB, generator=g)).to(dtype) if bias else None
    ref_head = LMHead(ref_weight, ref_bias, logit_scale=logit_scale, softcap=softcap)
    labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    labels[torch.rand(ROWS, SEQ, generator=g) < masked_fraction] = -100
    labels[:, 0] = -100
    return hidden, head, labels, ref_hidden, ref_head


def _loss_weights(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-token weights for the log-probs and the KL, so every token's gradient matters (a plain `.sum()`
    would let per-token errors cancel)."""
    g = _gen(seed)
    return torch.rand(ROWS, SEQ, generator=g), torch.rand(ROWS, SEQ, generator=g) - 0.3


def _run(fn, hidden, head, labels, ref_hidden=None, ref_head=None, use_lp=True, use_kl=True, **kwargs):
    """Stats and gradients of `Σ g_lp·log_probs + Σ g_kl·forward_kl` w.r.t. the policy's hidden, weight and bias."""
    stats = fn(hidden, head, labels, ref_hidden_states=ref_hidden, ref_lm_head=ref_head, **kwargs)
    g_lp, g_kl = _loss_weights()
    loss = hidden.new_zeros((), dtype=torch.float32)
    if use_lp:
        loss = loss + (stats.log_probs.float() * g_lp).sum()
    if use_kl and stats.forward_kl is not None:
        loss = loss + (stats.forward_kl.float() * g_kl).sum()
    leaves = [x for x in (hidden, head.weight, head.bias) if x is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]
    return stats, grads


def _assert_stats_close(actual: TokenStats, expected: TokenStats, labels, atol=1e-5, rtol=1e-5, top1=True):
    mask = labels != -100
    for name in FIELDS:
        a, e = getattr(actual, name), getattr(expected, name)
        if e is None:
            assert a is None, name
            continue
        assert a.shape == labels.shape, name
        if name == "is_top1":
            assert a.dtype == torch.bool
            assert not a[~mask].any()
            if top1:
                assert torch.equal(a, e)
            continue
        assert torch.isfinite(a).all(), name
        assert (a[~mask] == 0).all(), f"{name} is not zero on masked positions"
        assert_close(a.float(), e.float(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def _exact_stats(hidden, head: LMHead, labels, ref_hidden=None, ref_head=None) -> dict[str, torch.Tensor]:
    """Float64 ground truth (log_softmax, never softmax().log()), on the masked tokens only."""
    mask = labels != -100

    def log_probs_of(h, hd):
        z = torch.nn.functional.linear(h.double(), hd.weight.double(), None if hd.bias is None else hd.bias.double())
        z = z * hd.logit_scale
        if hd.softcap is not None:
            z = hd.softcap * torch.tanh(z / hd.softcap)
        return z, z.log_softmax(-1)

    z, lp = log_probs_of(hidden.detach()[mask], head)
    y = labels[mask].unsqueeze(-1)
    out = {
        "log_probs": lp.gather(-1, y).squeeze(-1),
        "entropy": -(lp.exp() * lp).sum(-1),
        "mean_logits": z.mean(-1),
    }
    if ref_hidden is not None:
        _, rlp = log_probs_of(ref_hidden[mask], ref_head)
        out["ref_log_probs"] = rlp.gather(-1, y).squeeze(-1)
        out["forward_kl"] = (rlp.exp() * (rlp - lp)).sum(-1)
    return out


def _num_tokens(labels) -> int:
    return int((labels != -100).sum())


# ---------------------------------------------------------------------------------------------------------------------
# float32: every field, every gradient, chunk sizes that do not divide the token count
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", ["1", "7", "n-1", "n+5", "default"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "no-ref"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fused_matches_naive_fp32(chunk, with_ref, bias, vocab_tile):
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(bias=bias)
    n = _num_tokens(labels)
    assert n % 7 != 0 and n > 8  # the chunk sizes below leave a ragged last chunk
    chunk_size = {"1": 1, "7": 7, "n-1": n - 1, "n+5": n + 5, "default": None}[chunk]
    refs = (ref_hidden, ref_head) if with_ref else (None, None)

    fused, fused_grads = _run(padded_token_stats, hidden, head, labels, *refs, chunk_size=chunk_size)
    naive, naive_grads = _run(naive_token_stats, hidden, head, labels, *refs)

    _assert_stats_close(fused, naive, labels)
    for got, want in zip(fused_grads, naive_grads):
        assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert fused.log_probs.requires_grad and not fused.entropy.requires_grad and not fused.mean_logits.requires_grad
    if with_ref:
        assert fused.forward_kl.requires_grad and not fused.ref_log_probs.requires_grad


def test_fused_gradient_through_each_output_alone(vocab_tile):
    """Only the log-probs, or only the KL, in the loss: the other incoming gradient is absent (or zero) and must not
    contribute."""
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=3)
    for use_lp, use_kl in ((True, False), (False, True)):
        fused, fused_grads = _run(
            padded_token_stats, hidden, head, labels, ref_hidden, ref_head, use_lp=use_lp, use_kl=use_kl, chunk_size=5
        )
        _, naive_grads = _run(
            naive_token_stats, hidden, head, labels, ref_hidden, ref_head, use_lp=use_lp, use_kl=use_kl
        )
        for got, want in zip(fused_grads, naive_grads):
            assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fused_matches_float64_ground_truth(vocab_tile):
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=4)
    fused = padded_token_stats(hidden, head, labels, ref_hidden, ref_head, chunk_size=6)
    mask = labels != -100
    for name, value in _exact_stats(hidden, head, labels, ref_hidden, ref_head).items():
        assert_close(getattr(fused, name)[mask].double(), value, atol=1e-5, rtol=1e-5, msg=name)


def test_reference_defaults_to_the_policy_head(vocab_tile):
    """PEFT: the reference is the same model with its adapter disabled, so `ref_lm_head=None` means the policy's head;
    the reference receives no gradient through it (the policy head's gradient is the naive one)."""
    hidden, head, labels, ref_hidden, _ = _make_inputs(seed=5)
    fused, fused_grads = _run(padded_token_stats, hidden, head, labels, ref_hidden, None, chunk_size=9)
    naive, naive_grads = _run(naive_token_stats, hidden, head, labels, ref_hidden, None)
    _assert_stats_close(fused, naive, labels)
    for got, want in zip(fused_grads, naive_grads):
        assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "logit_scale, softcap", [(0.5, None), (1.0, 3.0), (2.0, 5.0)], ids=["scale", "softcap", "scale+softcap"]
)
def test_logit_scale_and_softcap(logit_scale, softcap, vocab_tile):
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(
        seed=6, weight_scale=4.0, logit_scale=logit_scale, softcap=softcap
    )
    fused, fused_grads = _run(padded_token_stats, hidden, head, labels, ref_hidden, ref_head, chunk_size=10)
    naive, naive_grads = _run(naive_token_stats, hidden, head, labels, ref_hidden, ref_head)
    _assert_stats_close(fused, naive, labels)
    for got, want in zip(fused_grads, naive_grads):
        assert_close(got, want, atol=1e-6, rtol=1e-5)
    if softcap is not None:  # the cap is active: some logits are near it
        mask = labels != -100
        assert (fused.mean_logits[mask].abs() < softcap).all()


# ---------------------------------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------------------------------


def _upcast(hidden, head, ref_hidden, ref_head):
    """The same (bf16-rounded) values in float32, as fresh leaves."""
    f32 = hidden.detach().float().requires_grad_()
    f32_head = head._replace(
        weight=head.weight.detach().float().requires_grad_(),
        bias=None if head.bias is None else head.bias.detach().float().requires_grad_(),
    )
    f32_ref_head = ref_head._replace(
        weight=ref_head.weight.float(), bias=None if ref_head.bias is None else ref_head.bias.float()
    )
    return f32, f32_head, ref_hidden.float(), f32_ref_head


def _max_error(stats: TokenStats, exact: dict, labels) -> dict[str, float]:
    mask = labels != -100
    return {name: (getattr(stats, name)[mask].double() - value).abs().max().item() for name, value in exact.items()}


@pytest.mark.parametrize("chunk_size", [7, None])
def test_bf16_parameters(chunk_size, vocab_tile):
    """bf16 hidden states and LM heads (a model loaded in bf16): values and gradients close to the float32 naive
    computation on the same rounded values, and no further from float64 than the naive computation run in bf16."""
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=7, dtype=torch.bfloat16)
    fused, fused_grads = _run(padded_token_stats, hidden, head, labels, ref_hidden, ref_head, chunk_size=chunk_size)
    assert fused.log_probs.dtype == torch.float32
    assert [g.dtype for g in fused_grads] == [torch.bfloat16] * 3

    f32_inputs = _upcast(hidden, head, ref_hidden, ref_head)
    naive32, naive32_grads = _run(naive_token_stats, f32_inputs[0], f32_inputs[1], labels, *f32_inputs[2:])
    # bf16 matmul outputs carry a relative error of about 2^-8: logits of size ~3 are off by ~1e-2
    _assert_stats_close(fused, naive32, labels, atol=6e-2, rtol=2e-2, top1=False)
    for got, want in zip(fused_grads, naive32_grads):
        assert_close(got.float(), want, atol=3e-2, rtol=5e-2)

    exact = _exact_stats(*f32_inputs[:2], labels, *f32_inputs[2:])
    naive_bf16 = naive_token_stats(hidden, head, labels, ref_hidden, ref_head)
    fused_err, naive_err = _max_error(fused, exact, labels), _max_error(naive_bf16, exact, labels)
    for name in exact:
        assert fused_err[name] <= 2 * naive_err[name] + 1e-3, (name, fused_err[name], naive_err[name])


def test_bf16_autocast(vocab_tile):
    """float32 parameters under bf16 autocast (TRL's default `bf16=True` on CPU): the projections run in bf16 like
    the model's own forward, the gradients come back in float32."""
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_grads = _run(padded_token_stats, hidden, head, labels, ref_hidden, ref_head, chunk_size=11)
        naive_bf16 = naive_token_stats(hidden, head, labels, ref_hidden, ref_head)
    assert [g.dtype for g in fused_grads] == [torch.float32] * 3
    naive32, naive32_grads = _run(naive_token_stats, hidden, head, labels, ref_hidden, ref_head)
    _assert_stats_close(fused, naive32, labels, atol=6e-2, rtol=2e-2, top1=False)
    for got, want in zip(fused_grads, naive32_grads):
        assert_close(got, want, atol=3e-2, rtol=5e-2)
    exact = _exact_stats(hidden, head, labels, ref_hidden, ref_head)
    fused_err, naive_err = _max_error(fused, exact, labels), _max_error(naive_bf16, exact, labels)
    for name in exact:
        assert fused_err[name] <= 2 * naive_err[name] + 1e-3, (name, fused_err[name], naive_err[name])


# ---------------------------------------------------------------------------------------------------------------------
# Numerically hard inputs
# ---------------------------------------------------------------------------------------------------------------------


def _official_tdpo_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The official TDPO code's per-token KL: `(p_ref * (p_ref.log() - log_softmax(policy))).sum(-1)`."""
    ref_probs = ref_logits.softmax(-1)
    return (ref_probs * (ref_probs.log() - logits.log_softmax(-1))).sum(-1)


def test_extreme_logits_stay_finite_and_exact(vocab_tile):
    """Logits of order 1e4 (weights scaled up): no NaN or inf in any value or gradient, and the values match a
    float64 computation to fp32 precision at that scale."""
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=9, weight_scale=3e3)
    z = torch.nn.functional.linear(hidden.detach(), head.weight.detach(), head.bias.detach())
    assert z.abs().max() > 1e4
    fused, grads = _run(padded_token_stats, hidden, head, labels, ref_hidden, ref_head, chunk_size=7)
    for name in FIELDS:
        assert torch.isfinite(getattr(fused, name).float()).all(), name
    for grad in grads:
        assert torch.isfinite(grad).all()
    mask = labels != -100
    for name, value in _exact_stats(hidden, head, labels, ref_hidden, ref_head).items():
        # fp32 carries ~7 digits: at |logit| ~ 1e4, 1e-2 absolute is a few ulps
        assert_close(getattr(fused, name)[mask].double(), value, atol=5e-2, rtol=1e-5, msg=name)
    naive, naive_grads = _run(naive_token_stats, hidden, head, labels, ref_hidden, ref_head)
    _assert_stats_close(fused, naive, labels, atol=5e-2, rtol=1e-5, top1=False)
    for got, want in zip(grads, naive_grads):
        assert_close(got, want, atol=1e-2, rtol=1e-4)


def test_underflowing_reference_probabilities(vocab_tile):
    """A reference distribution so peaked that some probabilities are exactly 0 in fp32: the official code's
    `softmax().log()` gives `0 * -inf = NaN`; ours is finite and equal to the float64 log_softmax value."""
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=10)
    ref_head = ref_head._replace(weight=ref_head.weight * 60.0)  # reference logits spread over hundreds of nats
    mask = labels != -100
    ref_logits = torch.nn.functional.linear(ref_hidden, ref_head.weight, ref_head.bias)[mask]
    assert (ref_logits.softmax(-1) == 0).any()
    policy_logits = torch.nn.functional.linear(hidden.detach(), head.weight.detach(), head.bias.detach())[mask]
    assert torch.isnan(_official_tdpo_kl(ref_logits, policy_logits)).any()

    fused, grads = _run(padded_token_stats, hidden, head, labels, ref_hidden, ref_head, chunk_size=4)
    assert torch.isfinite(fused.forward_kl).all() and torch.isfinite(fused.ref_log_probs).all()
    assert all(torch.isfinite(grad).all() for grad in grads)
    exact = _exact_stats(hidden, head, labels, ref_hidden, ref_head)
    assert_close(fused.forward_kl[mask].double(), exact["forward_kl"], atol=1e-4, rtol=1e-5)
    assert_close(fused.ref_log_probs[mask].double(), exact["ref_log_probs"], atol=1e-3, rtol=1e-5)
    naive, naive_grads = _run(naive_token_stats, hidden, head, labels, ref_hidden, ref_head)
    _assert_stats_close(fused, naive, labels, atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, naive_grads):
        assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_all_masked_batch_backprops_a_zero(vocab_tile):
    """A micro-batch without any completion token: every statistic is zero, and the loss still backpropagates
    (a zero gradient, not an error)."""
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=11)
    labels = torch.full_like(labels, -100)
    fused = padded_token_stats(hidden, head, labels, ref_hidden, ref_head)
    for name in FIELDS:
        value = getattr(fused, name)
        assert value.shape == labels.shape and not value.any(), name
    (fused.log_probs.sum() + fused.forward_kl.sum()).backward()
    assert hidden.grad is not None and not hidden.grad.any()
    assert head.weight.grad is not None and not head.weight.grad.any()
    assert head.bias.grad is not None and not head.bias.grad.any()


def test_kl_is_non_negative_and_zero_only_for_equal_distributions(vocab_tile):
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=12)
    mask = labels != -100
    different = padded_token_stats(hidden, head, labels, ref_hidden, ref_head, chunk_size=8).forward_kl
    assert (different[mask] >= -1e-6).all()
    assert (different[mask] > 1e-4).all()  # the reference differs at every token

    # Same hidden states and same head: the same distribution, KL = 0 (up to rounding)
    same = padded_token_stats(hidden, head, labels, hidden.detach(), head, chunk_size=8).forward_kl
    assert same[mask].abs().max() < 1e-6

    # Equal only at some tokens: zero exactly there
    mixed_ref = torch.where(torch.arange(SEQ).unsqueeze(-1) % 2 == 0, hidden.detach(), ref_hidden)
    mixed = padded_token_stats(hidden, head, labels, mixed_ref, head, chunk_size=8).forward_kl
    even = (torch.arange(SEQ) % 2 == 0).expand(ROWS, SEQ)
    assert mixed[mask & even].abs().max() < 1e-6
    assert (mixed[mask & ~even] > 1e-4).all()


# ---------------------------------------------------------------------------------------------------------------------
# Against TRL's own chunked kernels on the same inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_matches_trl_chunked_kernels(vocab_tile):
    hidden, head, labels, ref_hidden, ref_head = _make_inputs(seed=13)
    mask = labels != -100
    g_lp, g_kl = (w[mask] for w in _loss_weights())
    fused, fused_grads = _run(padded_token_stats, hidden, head, labels, ref_hidden, ref_head, chunk_size=7)

    # TRL's kernels take the labelled rows directly
    h = hidden.detach()[mask].requires_grad_()
    w = head.weight.detach().requires_grad_()
    b = head.bias.detach().requires_grad_()
    log_probs, entropy, _, mean_logits, is_top1 = ChunkedLogProbFunction.apply(
        h, w, b, labels[mask], 1.0, 16, None, 1.0, ("entropy", "mean_logits", "is_top1")
    )
    # beta=0.0: forward KL(teacher ‖ student) = KL(π_ref ‖ πθ), gradient to the student only
    forward_kl, _ = ChunkedDivergenceFunction.apply(h, w, b, ref_hidden[mask], ref_head.weight, ref_head.bias, 0.0)
    grads = torch.autograd.grad((log_probs * g_lp).sum() + (forward_kl * g_kl).sum(), (h, w, b))

    assert_close(fused.log_probs[mask], log_probs, atol=1e-5, rtol=1e-5)
    assert_close(fused.entropy[mask], entropy, atol=1e-5, rtol=1e-5)
    assert_close(fused.mean_logits[mask], mean_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused.is_top1[mask], is_top1)
    assert_close(fused.forward_kl[mask], forward_kl, atol=1e-5, rtol=1e-5)
    full_grad_hidden = torch.zeros_like(hidden).masked_scatter(mask.unsqueeze(-1), grads[0])
    assert_close(fused_grads[0], full_grad_hidden, atol=1e-6, rtol=1e-5)
    assert_close(fused_grads[1], grads[1], atol=1e-6, rtol=1e-5)
    assert_close(fused_grads[2], grads[2], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Chunk size
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_size", [4096, 3000])
def test_mean_row_sums_blocks_of_a_tile_without_a_float32_copy_of_the_head(hidden_size):
    """The mean logit's row mean (docs/memory_and_scaling.md, "The 7B path"): blocks of at most one CPU tile's
    elements (512 rows at H = 4096, a last partial block here), float32 accumulation, the float64 mean's value."""
    weight = torch.randn(1300, hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) + 0.5
    blocks = []
    original_sum = torch.Tensor.sum

    def recording_sum(tensor, *args, **kwargs):
        blocks.append(tensor.size(0))
        return original_sum(tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "sum", recording_sum)
        mean = fused_kernel._mean_row(weight)
    rows = fused_kernel.CPU_TILE_ELEMENTS // hidden_size
    assert blocks == [rows] * (1300 // rows) + [1300 % rows]
    assert mean.dtype == torch.float32
    # float32 sums of 1300 bf16 values: a few float32 roundings of the running sum
    assert_close(mean.double(), weight.double().mean(dim=0), rtol=1e-6, atol=1e-6)


def test_default_token_chunk_size():
    # CPU: a tile of about CPU_TILE_ELEMENTS elements, CPU_VOCAB_TILE columns wide (or the whole, smaller, vocabulary)
    assert default_token_chunk_size(32000, "cpu") == CPU_TILE_ELEMENTS // CPU_VOCAB_TILE
    assert default_token_chunk_size(128256, torch.device("cpu")) == CPU_TILE_ELEMENTS // CPU_VOCAB_TILE
    assert default_token_chunk_size(1000, "cpu") == CPU_TILE_ELEMENTS // 1000
    # Accelerators: a tile spans the whole vocabulary
    assert default_token_chunk_size(32000, "meta") == GPU_TILE_ELEMENTS // 32000
    assert default_token_chunk_size(10 * GPU_TILE_ELEMENTS, "meta") == 1  # never 0
    assert default_token_chunk_size(0, "cpu") >= 1


def test_top1_ties_follow_argmax(vocab_tile):
    """`is_top1` means `argmax(logits) == label`, and `argmax` returns the first maximum: with two vocabulary rows that
    give identical logits (in different tiles when tiled), only the earlier one counts as the top-1."""
    hidden, head, _, _, _ = _make_inputs(seed=14, bias=False)
    weight = head.weight.detach().clone()
    first, second = 3, 47  # tiles 0 and 4 when tiled
    weight[first] = weight[second] = 10 * weight[first]  # the largest logit for most tokens, tied
    head = LMHead(weight.requires_grad_())
    logits = hidden.detach() @ weight.t()
    tied_max = logits.argmax(-1) == first
    assert tied_max.float().mean() > 0.3 and (logits[..., first] == logits[..., second]).all()
    for label in (first, second):
        labels = torch.full((ROWS, SEQ), label)
        fused = padded_token_stats(hidden, head, labels, chunk_size=5)
        expected = logits.argmax(-1) == labels
        assert torch.equal(fused.is_top1, expected)
        assert fused.is_top1.any() == (label == first)
