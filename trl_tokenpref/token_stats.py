"""Per-token statistics of a policy (and its reference) from hidden states and the LM head, in chunks.

Every token-level method needs, per completion token t with label y_t:

* the policy log-probability `log πθ(y_t|s_t)` (and, for DPO's metrics, the entropy, the mean logit and whether the
  label is the argmax),
* the reference log-probability `log π_ref(y_t|s_t)`,
* for TDPO and TBPO-A, the exact forward KL over the whole vocabulary,
  `κ_t = KL(π_ref(·|s_t) ‖ πθ(·|s_t)) = Σ_v p_ref(v) [log p_ref(v) − log pθ(v)]` (TDPO paper Def. 4.3).

A naive implementation materialises `[tokens, vocab]` logits for both models (the official TDPO code does, in fp32).
`_FusedTokenStats` instead projects one tile (a chunk of tokens x a slice of the vocabulary; on GPU the whole
vocabulary) at a time through both LM heads, folds it into per-token running statistics (online softmax), and keeps
nothing of size `vocab` between tiles: every statistic comes from that one projection of each tile. Only the two
logsumexps are saved; the backward projects each tile again and applies the closed-form gradient

    ∂ log pθ(y)/∂z = onehot(y) − pθ        ∂ κ/∂z = pθ − p_ref          (z: the policy logits)

so the `[tokens, vocab]` logits never exist in forward or backward. Only the tokens that carry a label (the completion
tokens) are projected: prompt and padding positions cost nothing.

Log-probabilities are logits minus their logsumexp, never `softmax().log()`: the official TDPO code returns NaN when
a reference probability underflows to 0 (`0 * log 0`); here such a term is `0 * finite = 0`.

Cost (docs/benchmarks.md): the LM-head work of a TDPO step (2 projections forward, 2 recomputed and 2 gradient GEMMs
backward) measured within a few percent of DPOTrainer's (1 + 1 forward, 1 + 2 backward, but about three times as many
elementwise passes per tile in TRL's CPU fallback), and every tile buffer is reused across tiles.
"""

import functools
import math
import types
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial
from transformers.utils import ModelOutput

from ._compat import maybe_gather_lm_head_ctx


# Tile sizes. On CPU a tile is `[tokens, CPU_VOCAB_TILE]` with `CPU_TILE_ELEMENTS` elements (512 x 4096): the tile
# buffers (about 4 of them, 8 MB each in float32) stay in the L3 cache across the elementwise passes, and the LM-head
# weight is read once per 512 tokens. Token-only chunks over the whole vocabulary were 2.3x slower at V = 128k (a
# 32-token chunk re-reads the whole weight); 256-1024 tokens x 1024-8192 columns all measured within noise of this
# one (docs/benchmarks.md). On an accelerator a tile spans the whole vocabulary and holds about `GPU_TILE_ELEMENTS`
# elements, which keeps the matmuls large and the kernel launches few.
CPU_TILE_ELEMENTS = 2**21
CPU_VOCAB_TILE = 4096
GPU_TILE_ELEMENTS = 2**26


def _vocab_tile_size(vocab_size: int, device: torch.device | str) -> int:
    """Vocabulary rows projected at once: `CPU_VOCAB_TILE` on CPU, the whole vocabulary elsewhere."""
    if torch.device(device).type == "cpu":
        return max(1, min(vocab_size, CPU_VOCAB_TILE))
    return max(1, vocab_size)


def _gather_averaging_gradient(param: DTensor) -> torch.Tensor:
    """The full tensor of a sharded parameter; its gradient is averaged across the mesh on the way back (each rank's
    gradient counts as one data-parallel share, `Partial("avg")`), instead of each rank keeping its own for its shard."""
    return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)


def default_token_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Number of tokens projected at once, so that one `[chunk, vocab tile]` tile holds a fixed number of elements."""
    budget = CPU_TILE_ELEMENTS if torch.device(device).type == "cpu" else GPU_TILE_ELEMENTS
    return max(1, budget // _vocab_tile_size(vocab_size, device))


class TokenStats(NamedTuple):
    """Per-token statistics, each of shape `[rows, seq_len - 1]` (aligned with the shifted labels) and zero where the
    label is `-100`. Fields that were not requested are `None`."""

    log_probs: torch.Tensor  # log πθ(y_t|s_t), differentiable
    entropy: torch.Tensor  # H(πθ(·|s_t)), no gradient
    mean_logits: torch.Tensor  # mean over the vocabulary of the policy logits, no gradient
    is_top1: torch.Tensor  # bool: y_t is the policy's argmax
    ref_log_probs: torch.Tensor | None = None  # log π_ref(y_t|s_t), no gradient
    forward_kl: torch.Tensor | None = None  # κ_t = KL(π_ref ‖ πθ), differentiable w.r.t. the policy only


class ReferenceCache(NamedTuple):
    """The reference's next-token distribution at each labelled position, as `precompute_ref_log_probs=True` stores it
    (docs/algorithms.md §9): its k most likely tokens K and their log-probabilities, and the log of the mass m of every
    other token, merged into one bucket. Shapes `(rows, seq)` or `(rows, seq, k)`, aligned with the shifted labels
    (values outside the labelled positions are ignored).

    The per-token KL computed from it is `KL_K = Σ_{v∈K} p(v)[log p(v) − log q(v)] + m[log m − log Q]`, with
    `Q = Σ_{v∉K} q(v)` the policy's mass outside K: a lower bound of the exact KL (log-sum inequality), equal to it when
    πθ = π_ref or when K is the whole vocabulary.
    """

    label_log_probs: torch.Tensor  # log π_ref(y_t|s_t), exact
    topk_ids: torch.Tensor  # (rows, seq, k) int: K, the reference's k most likely tokens
    topk_log_probs: torch.Tensor  # (rows, seq, k) float: log π_ref(v|s_t) for v in K
    tail_log_mass: torch.Tensor  # (rows, seq) float: log m = log Σ_{v∉K} π_ref(v|s_t); -inf when K is everything


class LMHead(NamedTuple):
    """What projects hidden states to logits: `logits = logit_scale * (hidden @ weight.T + bias)`, then
    `softcap * tanh(logits / softcap)` when `final_logit_softcapping` is set (Gemma 2)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None


def lm_head_of(model: torch.nn.Module) -> LMHead:
    """The [`LMHead`] of a causal LM, with the logit scaling its config declares."""
    text_config = model.config.get_text_config()
    for unsupported in ("logits_scaling", "lm_head_multiplier", "output_multiplier"):
        if getattr(text_config, unsupported, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} scales its logits with `{unsupported}`, which the token-level trainers do "
                "not support yet. Please open an issue with the model name."
            )
    output_embeddings = model.get_output_embeddings()
    logit_scale = getattr(text_config, "logit_scale", None)
    return LMHead(
        weight=output_embeddings.weight,
        bias=output_embeddings.bias,
        logit_scale=1.0 if logit_scale is None else float(logit_scale),
        softcap=getattr(text_config, "final_logit_softcapping", None),
    )


def _logits(hidden: torch.Tensor, head: LMHead) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits of a chunk, and `tanh(·)` of the softcap (needed by the backward), or None."""
    logits = F.linear(hidden, head.weight, head.bias).float()
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap is None:
        return logits, None
    tanh = torch.tanh(logits / head.softcap)
    return tanh * head.softcap, tanh


def _tile_logits(
    hidden: torch.Tensor, head: LMHead, start: int, end: int, buffers: "_TileBuffers", name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits of the vocabulary rows `[start, end)` for a chunk of hidden states, written into the buffer
    `name` (the caller may overwrite them), and `tanh(·)` of the softcap for the backward, or None."""
    weight = head.weight[start:end]
    shape = (hidden.size(0), end - start)
    out = buffers.get(name, shape, hidden.dtype)
    if head.bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(head.bias[start:end], hidden, weight.t(), out=out)
    if out.dtype != torch.float32:  # bf16/fp16 projection: the statistics are computed in float32
        out = buffers.get(name + "_f32", shape, torch.float32).copy_(out)
    if head.logit_scale != 1.0:
        out.mul_(head.logit_scale)
    if head.softcap is None:
        return out, None
    tanh = out.div_(head.softcap).tanh_()
    return torch.mul(tanh, head.softcap, out=buffers.get(name + "_capped", shape, torch.float32)), tanh


class _TileBuffers:
    """Reusable tile-sized buffers, one per name. A fresh multi-megabyte tensor per tile costs page faults on CPU (an
    `exp` into a new tensor measured 2-3x slower than into a reused one); a flat buffer viewed as `[rows, width]` keeps
    the ragged last tiles contiguous."""

    def __init__(self, max_elements: int, device: torch.device):
        self.max_elements, self.device, self.flat = max_elements, device, {}

    def get(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        key, numel = (name, dtype), shape[0] * shape[1]
        if key not in self.flat or self.flat[key].numel() < numel:  # e.g. a tile with a spare column
            self.flat[key] = torch.empty(max(self.max_elements, numel), dtype=dtype, device=self.device)
        return self.flat[key][:numel].view(shape)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the chunk projections: the autocast dtype when autocast is on (as for the model's own forward),
    the weight's dtype otherwise."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _merge_tile(running, tile, shifted: bool):
    """Folds the statistics of one vocabulary tile into the running ones of the tiles before it (online softmax).

    A state is `(m, s, d)` per token: the max logit m, `s = Σ_v e^{z_v − m}` and a weighted sum `d = Σ_v e^{z_v − m}
    x_v`. Moving to a larger max m' rescales both sums by `e^{m − m'}`. With `shifted=True`, x_v = z_v − m depends on
    the max too, and gains `(m − m')·s`.
    """
    if running is None:
        return tile
    (m, s, d), (tile_m, tile_s, tile_d) = running, tile
    new_m = torch.maximum(m, tile_m)
    scale, tile_scale = (m - new_m).exp(), (tile_m - new_m).exp()
    if shifted:
        d = d + (m - new_m) * s
        tile_d = tile_d + (tile_m - new_m) * tile_s
    return new_m, scale * s + tile_scale * tile_s, scale * d + tile_scale * tile_d


# `torch.addmm(..., out_dtype=torch.float32)` from bf16/fp16 operands: CUDA only, torch >= 2.8
_MM_OUT_DTYPE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 8)


def _addmm_fp32_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`accumulator += a @ b` for a float32 accumulator. For bf16/fp16 operands, on CUDA (torch >= 2.8) the GEMM
    accumulates into float32 directly; elsewhere (CPU has no mixed-dtype GEMM) the product of one tile is taken in the
    operands' dtype and added in float32."""
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
    elif accumulator.device.type == "cuda" and _MM_OUT_DTYPE:
        torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator.add_(a @ b)


def _in_tile_columns(ids: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For token ids `[n, k]`, whether each lies in the vocabulary tile `[start, start + width)`, and its column there
    (`width`, a spare column past the tile, for the ids outside it: writes to it never collide with a real column)."""
    local = ids - start
    in_tile = (local >= 0) & (local < width)
    return in_tile, torch.where(in_tile, local, width)


def _forward_chunk(hidden, labels, ref_hidden, policy_head, ref_head, vocab_tile, buffers, sum_logits, cache=None):
    """The statistics of one chunk of tokens, folding the vocabulary in tiles of `vocab_tile` rows (online softmax).

    Per token it keeps, over the tiles seen so far: for the policy, the max m, `s = Σ e^{z−m}` and `Σ e^{z−m}(z−m)`; for
    the reference, m_r, `s_r = Σ e^{z_r−m_r}` and `Σ e^{z_r−m_r}(z_r − z)`; both label logits; and the largest policy
    logit at an index below the label (for the top-1 flag: `argmax` returns the first maximum). Returns the per-token
    statistics of the chunk as a dict; `logit_sum` (for the mean logit) only when `sum_logits`.

    With a reference `cache` `(topk_ids [n, k], topk_log_probs [n, k], tail_log_mass [n])` instead of `ref_hidden`,
    it keeps the policy logits at the cached tokens K and a logsumexp over the logits *outside* K (masked in each tile,
    never `log(1 − Σ_K …)`, which cancels), for the cached KL.
    """
    vocab_size = policy_head.weight.size(0)
    has_ref = ref_hidden is not None
    policy = ref = None  # running (max, sum of exponentials, weighted sum)
    label_logit = ref_label_logit = None
    before_label = torch.full(labels.shape, -math.inf, dtype=torch.float32, device=labels.device)
    logit_sum = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device) if sum_logits else None
    if cache is not None:
        topk_ids = cache[0]
        topk_logits = torch.zeros(topk_ids.shape, dtype=torch.float32, device=labels.device)
        outside = None  # running (max, sum of exponentials) over the logits outside K
    for vocab_start in range(0, vocab_size, vocab_tile):
        vocab_end = min(vocab_start + vocab_tile, vocab_size)
        width = vocab_end - vocab_start
        local_labels = labels - vocab_start
        in_tile = (local_labels >= 0) & (local_labels < width)
        label_index = local_labels.clamp(0, width - 1).unsqueeze(1)

        logits, _ = _tile_logits(hidden, policy_head, vocab_start, vocab_end, buffers, "policy")
        tile_max = logits.amax(dim=-1)  # `max(dim)` with indices is ~100x slower than `amax` on CPU
        label_logit = _where_in_tile(in_tile, logits.gather(1, label_index).squeeze(1), label_logit)
        # Largest logit left of the label: whole tiles before the label's, and the label's own tile up to it (each
        # token's label lies in one tile, so this costs one tile row per token in all)
        before_label = torch.where(local_labels >= width, torch.maximum(before_label, tile_max), before_label)
        label_rows = in_tile.nonzero().squeeze(1)
        if label_rows.numel() > 0:
            left = logits.index_select(0, label_rows)
            left_mask = torch.arange(width, device=left.device) >= local_labels[label_rows].unsqueeze(1)
            before_label[label_rows] = torch.maximum(
                before_label[label_rows], left.masked_fill_(left_mask, -math.inf).amax(-1)
            )
        if sum_logits:
            logit_sum += logits.sum(dim=-1)

        exp = buffers.get("exp", logits.shape, torch.float32)
        if has_ref:
            ref_logits, _ = _tile_logits(ref_hidden, ref_head, vocab_start, vocab_end, buffers, "ref")
            ref_max = ref_logits.amax(dim=-1)
            ref_label_logit = _where_in_tile(in_tile, ref_logits.gather(1, label_index).squeeze(1), ref_label_logit)
            torch.sub(ref_logits, ref_max.unsqueeze(1), out=exp).exp_()
            ref_logits.sub_(logits)  # z_r − z
            ref = _merge_tile(ref, (ref_max, exp.sum(dim=-1), torch.linalg.vecdot(exp, ref_logits)), shifted=False)
        if cache is not None:
            in_k, k_columns = _in_tile_columns(topk_ids, vocab_start, width)
            topk_logits = torch.where(in_k, logits.gather(1, k_columns.clamp(max=width - 1)), topk_logits)
        shifted = logits.sub_(tile_max.unsqueeze(1))  # z − m
        torch.exp(shifted, out=exp)
        policy = _merge_tile(policy, (tile_max, exp.sum(dim=-1), torch.linalg.vecdot(exp, shifted)), shifted=True)
        if cache is not None:
            # The tile without K: a mask with a spare column for the ids of other tiles, then its own max, so that
            # mass far below the tile's max (in K) does not underflow
            k_mask = buffers.get("k_mask", (logits.size(0), width + 1), torch.bool).zero_()
            k_mask.scatter_(1, k_columns, True)
            shifted.masked_fill_(k_mask[:, :width], -math.inf)
            out_max = shifted.amax(dim=-1)  # -inf for a token whose tile lies entirely in K
            finite_max = torch.where(torch.isfinite(out_max), out_max, 0.0)
            out_sum = torch.sub(shifted, finite_max.unsqueeze(1), out=exp).exp_().sum(dim=-1)
            outside = _merge_lse(outside, (tile_max + out_max, out_sum))
    policy_max, policy_sum, policy_shifted_dot = policy
    log_sum = policy_sum.log()
    lse = policy_max + log_sum
    out = {
        "lse": lse,
        "log_probs": label_logit - lse,
        "entropy": log_sum - policy_shifted_dot / policy_sum,  # log s − E_pθ[z − m]
        "is_top1": (label_logit >= policy_max) & (label_logit > before_label),
        "logit_sum": logit_sum,
    }
    if has_ref:
        ref_max, ref_sum, ref_dot = ref
        ref_log_sum = ref_sum.log()
        out["ref_lse"] = ref_max + ref_log_sum
        out["ref_log_probs"] = ref_label_logit - out["ref_lse"]
        # κ = E_p_ref[z_r − z] − lse_ref + lse, grouped so that equal distributions give exactly 0
        out["forward_kl"] = ref_dot / ref_sum + (policy_max - ref_max) + (log_sum - ref_log_sum)
    if cache is not None:
        _, topk_log_probs, tail_log_mass = cache
        out_lse = outside[0] + outside[1].log()  # log Σ_{v∉K} e^{z_v}; -inf when K is the whole vocabulary
        out["out_lse"] = out_lse
        out["forward_kl"] = _cached_kl(topk_log_probs, topk_logits - lse.unsqueeze(1), tail_log_mass, out_lse - lse)
    return out


def _cached_kl(topk_log_probs, policy_topk_log_probs, tail_log_mass, policy_tail_log_mass):
    """`KL_K = Σ_{v∈K} p(v)[log p(v) − log q(v)] + m[log m − log Q]` per token; the bucket term is 0 when m = 0."""
    in_k = (topk_log_probs.exp() * (topk_log_probs - policy_topk_log_probs)).sum(dim=-1)
    has_tail = tail_log_mass > -math.inf
    tail = torch.where(has_tail, tail_log_mass.exp() * (tail_log_mass - policy_tail_log_mass), 0.0)
    return in_k + torch.where(has_tail, tail, 0.0)


def _merge_lse(running, tile):
    """Folds `(max, Σ e^{z − max})` of one tile into the running pair, where a max may be -inf (nothing in the tile):
    the running max never comes from an empty tile, so that a later tile's mass far below it does not underflow."""
    if running is None:
        return tile
    (m, s), (tile_m, tile_s) = running, tile
    new_m = torch.maximum(m, tile_m)
    reference = torch.where(torch.isfinite(new_m), new_m, 0.0)
    return new_m, (m - reference).exp() * s + (tile_m - reference).exp() * tile_s


def _where_in_tile(in_tile, tile_values, previous):
    return tile_values if previous is None else torch.where(in_tile, tile_values, previous)


def _backward_chunk(
    hidden,
    labels,
    lse,
    grad_lp,
    ref_hidden,
    ref_lse,
    grad_kl,
    policy_head,
    ref_head,
    vocab_tile,
    buffers,
    grads,
    cache=None,
):
    """Adds one chunk's contribution to the gradients `grads = (grad_hidden_chunk, grad_weight, grad_bias)` (float32,
    any of them None when not needed), one vocabulary tile at a time. `grad_lp` / `grad_kl`: `[n, 1]` or None.

    With a reference `cache` `(topk_ids, topk_log_probs, tail_log_mass, out_lse)`, the KL is the cached one, whose
    gradient is `P·q(u) − p(u)` for u ∈ K and `P·q(u) − m·q(u)/Q` outside K (P = Σ_K p + m, 1 up to rounding), with
    `q(u)/Q = exp(z_u − out_lse) ≤ 1` computed outside K only: no ratio m/Q that could overflow."""
    grad_hidden, grad_weight, grad_bias = grads
    vocab_size, compute_dtype = policy_head.weight.size(0), hidden.dtype
    use_cache = cache is not None and grad_kl is not None
    # ∂/∂z of g_lp·log pθ(y) + g_kl·κ  =  g_lp·onehot(y) + (g_kl − g_lp)·pθ − g_kl·p_ref
    policy_coef = torch.zeros_like(lse) if grad_lp is None else -grad_lp
    if use_cache:
        topk_ids, topk_log_probs, tail_log_mass, out_lse = cache
        tail_mass = tail_log_mass.exp()  # [n, 1]
        total_mass = topk_log_probs.exp().sum(dim=-1, keepdim=True) + tail_mass
        policy_coef = policy_coef + grad_kl * total_mass
        # Rows without a bucket (m = 0): exp(z − inf) = 0 instead of 0·exp(z + inf)
        out_lse = torch.where(tail_mass > 0, out_lse, math.inf)
        tail_coef = grad_kl * tail_mass
    elif grad_kl is not None:
        policy_coef = policy_coef + grad_kl
    for vocab_start in range(0, vocab_size, vocab_tile):
        vocab_end = min(vocab_start + vocab_tile, vocab_size)
        width = vocab_end - vocab_start
        logits, tanh = _tile_logits(hidden, policy_head, vocab_start, vocab_end, buffers, "policy")
        if use_cache:
            # q(u)/Q = exp(z_u − out_lse) outside K (at most 1: no overflow, whatever the mass in K), 0 at K
            in_k, k_columns = _in_tile_columns(topk_ids, vocab_start, width)
            k_mask = buffers.get("k_mask", (logits.size(0), width + 1), torch.bool).zero_()
            k_mask.scatter_(1, k_columns, True)
            scaled = torch.sub(logits, out_lse, out=buffers.get("outside", logits.shape, torch.float32))
            scaled.masked_fill_(k_mask[:, :width], -math.inf).exp_()
            # The point terms at K: − g·p(u)
            k_columns, k_terms = k_columns.clamp(max=width - 1), -grad_kl * topk_log_probs.exp() * in_k
        # pθ = exp(z − lse) from the saved logsumexp: no max or sum pass
        grad_logits = logits.sub_(lse).exp_().mul_(policy_coef)
        if use_cache:
            grad_logits.addcmul_(scaled, tail_coef, value=-1.0)
            grad_logits.scatter_add_(1, k_columns, k_terms)
        elif grad_kl is not None:
            ref_logits, _ = _tile_logits(ref_hidden, ref_head, vocab_start, vocab_end, buffers, "ref")
            grad_logits.addcmul_(ref_logits.sub_(ref_lse).exp_(), grad_kl, value=-1.0)
        if grad_lp is not None:
            local_labels = labels - vocab_start
            in_tile = (local_labels >= 0) & (local_labels < width)
            grad_logits.scatter_add_(1, local_labels.clamp(0, width - 1).unsqueeze(1), grad_lp * in_tile.unsqueeze(1))
        # Chain rule through the softcap (d/dx c·tanh(x/c) = 1 − tanh²) and the logit scale
        if tanh is not None:
            grad_logits.addcmul_(grad_logits, tanh.square_(), value=-1.0)
        if policy_head.logit_scale != 1.0:
            grad_logits.mul_(policy_head.logit_scale)
        if compute_dtype != torch.float32:
            grad_logits = buffers.get("grad", grad_logits.shape, compute_dtype).copy_(grad_logits)
        if grad_hidden is not None:
            _addmm_fp32_(grad_hidden, grad_logits, policy_head.weight[vocab_start:vocab_end])
        if grad_weight is not None:
            _addmm_fp32_(grad_weight[vocab_start:vocab_end], grad_logits.t(), hidden)
        if grad_bias is not None:
            grad_bias[vocab_start:vocab_end] += grad_logits.sum(dim=0, dtype=torch.float32)


class _FusedTokenStats(torch.autograd.Function):
    """Chunked per-token statistics of a policy LM head, and of a reference LM head when one is given.

    Inputs are already restricted to the labelled tokens: `hidden [N, H]`, `labels [N]`, `ref_hidden [N, H_ref]`.
    Outputs, all `[N]`: log_probs, entropy, mean_logits, is_top1, ref_log_probs, forward_kl (the last two are empty
    tensors without a reference). Gradients flow to the policy's hidden states, weight and bias, through `log_probs`
    and `forward_kl` only; the reference is a constant.

    Forward: tokens are taken `chunk_size` at a time and the vocabulary `vocab_tile` rows at a time. Each tile of the
    policy logits z (and of the reference logits z_r) is projected once and folded into per-token running statistics
    (`_forward_chunk`). At the end, with `lse = m + log Σ e^{z−m}`:

        log pθ(y) = z_y − lse            H = lse − E_pθ[z]
        κ = Σ_v p_ref (log p_ref − log pθ) = E_p_ref[z_r − z] − lse_ref + lse

    The mean logit is linear in the hidden state, `scale·(h·mean_v W_v + mean_v b_v)`, so it needs no pass over the
    tiles (except with a softcap). Only the two logsumexps (`[N]` each) are saved for the backward.

    Backward (`_backward_chunk`): each tile is projected again and the closed-form gradient w.r.t. the policy logits
    is applied,

        ∂ log pθ(y)/∂z = onehot(y) − pθ        ∂ κ/∂z = pθ − p_ref

    with pθ = exp(z − lse) and p_ref = exp(z_r − lse_ref) from the saved logsumexps. The reference is projected again
    only when the KL receives a gradient. The `[N, V]` logits never exist, in forward or backward.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        ref_hidden,
        ref_weight,
        ref_bias,
        cache_ids,
        cache_log_probs,
        cache_tail,
        heads,
        chunk_size,
        vocab_tile,
    ):
        # An unused output (the KL, for a method that only needs the reference log-probs) gets no gradient tensor, so
        # that the backward can skip the reference projection
        ctx.set_materialize_grads(False)
        policy_head, ref_head = heads
        has_ref = ref_hidden is not None
        has_cache = cache_ids is not None
        dtype = _compute_dtype(weight)
        num_tokens, vocab_size = hidden.size(0), weight.size(0)
        f32 = {"dtype": torch.float32, "device": hidden.device}
        log_probs, entropy, lse = (torch.empty(num_tokens, **f32) for _ in range(3))
        is_top1 = torch.empty(num_tokens, dtype=torch.bool, device=hidden.device)
        ref_log_probs, ref_lse = (torch.empty(num_tokens if has_ref else 0, **f32) for _ in range(2))
        forward_kl = torch.empty(num_tokens if has_ref or has_cache else 0, **f32)
        out_lse = torch.empty(num_tokens if has_cache else 0, **f32)
        buffers = _TileBuffers(min(chunk_size, num_tokens) * min(vocab_tile, vocab_size), hidden.device)

        policy_head = policy_head._replace(weight=weight.to(dtype), bias=None if bias is None else bias.to(dtype))
        if has_ref:
            ref_head = ref_head._replace(
                weight=ref_weight.to(dtype), bias=None if ref_bias is None else ref_bias.to(dtype)
            )
        # The mean logit is linear in h without a softcap: one [N, H] x [H] product instead of a pass over the tiles
        linear_mean = policy_head.softcap is None
        if linear_mean:
            mean_bias = 0.0 if bias is None else bias.float().mean()
            mean_logits = (
                hidden.float() @ weight.mean(dim=0, dtype=torch.float32) + mean_bias
            ) * policy_head.logit_scale
        else:
            mean_logits = torch.empty(num_tokens, **f32)

        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, num_tokens, chunk_size):
                rows = slice(start, start + chunk_size)
                out = _forward_chunk(
                    hidden[rows].to(dtype),
                    labels[rows],
                    ref_hidden[rows].to(dtype) if has_ref else None,
                    policy_head,
                    ref_head,
                    vocab_tile,
                    buffers,
                    sum_logits=not linear_mean,
                    cache=(cache_ids[rows], cache_log_probs[rows].float(), cache_tail[rows].float())
                    if has_cache
                    else None,
                )
                lse[rows], log_probs[rows], entropy[rows], is_top1[rows] = (
                    out["lse"],
                    out["log_probs"],
                    out["entropy"],
                    out["is_top1"],
                )
                if not linear_mean:
                    mean_logits[rows] = out["logit_sum"] / vocab_size
                if has_ref:
                    ref_lse[rows], ref_log_probs[rows], forward_kl[rows] = (
                        out["ref_lse"],
                        out["ref_log_probs"],
                        out["forward_kl"],
                    )
                if has_cache:
                    out_lse[rows], forward_kl[rows] = out["out_lse"], out["forward_kl"]

        ctx.save_for_backward(
            hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, lse, ref_lse, cache_ids, cache_log_probs,
            cache_tail, out_lse,
        )  # fmt: skip
        ctx.heads = heads
        ctx.chunk_size, ctx.vocab_tile, ctx.dtype = chunk_size, vocab_tile, dtype
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1, ref_log_probs)
        return log_probs, entropy, mean_logits, is_top1, ref_log_probs, forward_kl

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy, _grad_mean, _grad_top1, _grad_ref_log_probs, grad_kl):
        (
            hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, lse, ref_lse, cache_ids, cache_log_probs,
            cache_tail, out_lse,
        ) = ctx.saved_tensors  # fmt: skip
        policy_head, ref_head = ctx.heads
        dtype, chunk_size, vocab_tile = ctx.dtype, ctx.chunk_size, ctx.vocab_tile
        use_cache = cache_ids is not None and grad_kl is not None
        use_kl = ref_hidden is not None and grad_kl is not None
        if grad_log_probs is None and not use_kl and not use_cache:
            return (None,) * 13
        num_tokens, vocab_size = hidden.size(0), weight.size(0)
        buffers = _TileBuffers(min(chunk_size, num_tokens) * min(vocab_tile, vocab_size), hidden.device)

        policy_head = policy_head._replace(weight=weight.to(dtype), bias=None if bias is None else bias.to(dtype))
        if use_kl:
            ref_head = ref_head._replace(
                weight=ref_weight.to(dtype), bias=None if ref_bias is None else ref_bias.to(dtype)
            )
        f32 = {"dtype": torch.float32, "device": hidden.device}
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # Accumulated in float32 across chunks and tiles, whatever the parameter dtype
        grad_weight = torch.zeros(weight.shape, **f32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(vocab_size, **f32) if (bias is not None and ctx.needs_input_grad[2]) else None

        with (
            torch.autocast(hidden.device.type, enabled=False),
            maybe_gather_lm_head_ctx(weight, bias, ref_weight, ref_bias),
        ):
            for start in range(0, num_tokens, chunk_size):
                rows = slice(start, start + chunk_size)
                chunk_grad_hidden = (
                    torch.zeros(hidden[rows].size(0), hidden.size(1), **f32) if grad_hidden is not None else None
                )
                _backward_chunk(
                    hidden[rows].to(dtype),
                    labels[rows],
                    lse[rows].unsqueeze(1),
                    None if grad_log_probs is None else grad_log_probs[rows].float().unsqueeze(1),
                    ref_hidden[rows].to(dtype) if use_kl else None,
                    ref_lse[rows].unsqueeze(1) if use_kl else None,
                    grad_kl[rows].float().unsqueeze(1) if use_kl or use_cache else None,
                    policy_head,
                    ref_head,
                    vocab_tile,
                    buffers,
                    (chunk_grad_hidden, grad_weight, grad_bias),
                    cache=(
                        cache_ids[rows],
                        cache_log_probs[rows].float(),
                        cache_tail[rows].float().unsqueeze(1),
                        out_lse[rows].unsqueeze(1),
                    )
                    if use_cache
                    else None,
                )
                if grad_hidden is not None:
                    grad_hidden[rows] = chunk_grad_hidden.to(hidden.dtype)

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return (grad_hidden, grad_weight, grad_bias) + (None,) * 10


def compute_token_stats(
    hidden_states: torch.Tensor,
    lm_head: LMHead,
    labels: torch.Tensor,
    ref_hidden_states: torch.Tensor | None = None,
    ref_lm_head: LMHead | None = None,
    chunk_size: int | None = None,
    ref_cache: ReferenceCache | None = None,
) -> TokenStats:
    """Per-token statistics of the labelled positions, without materialising `[tokens, vocab]` logits.

    Args:
        hidden_states (`torch.Tensor` of shape `(rows, seq, hidden)`):
            Final hidden states of the policy, already aligned with `labels` (position t predicts `labels[:, t]`).
        lm_head ([`LMHead`]):
            The policy's output projection.
        labels (`torch.Tensor` of shape `(rows, seq)`):
            Next-token labels, `-100` where no statistic is wanted (prompt, padding).
        ref_hidden_states (`torch.Tensor` of shape `(rows, seq, hidden_ref)`, *optional*):
            Final hidden states of the reference model. When given, `ref_log_probs` and `forward_kl` are computed.
        ref_lm_head ([`LMHead`], *optional*):
            The reference's output projection. Defaults to `lm_head` (PEFT: the reference is the same model with its
            adapter disabled, and the LM head carries no adapter).
        chunk_size (`int`, *optional*):
            Tokens projected at once. Defaults to [`default_token_chunk_size`].
        ref_cache ([`ReferenceCache`], *optional*):
            The reference's stored top-k distribution, instead of `ref_hidden_states`: `ref_log_probs` are its exact
            label log-probs, `forward_kl` the cached KL `KL_K` (docs/algorithms.md §9). No reference projection runs.

    Returns:
        [`TokenStats`], every field of shape `(rows, seq)` and zero where `labels == -100`.
    """
    mask = labels != -100
    if ref_cache is not None and ref_hidden_states is not None:
        raise ValueError("Give the reference as `ref_hidden_states` (live) or as `ref_cache` (precomputed), not both.")
    if ref_hidden_states is not None and ref_lm_head is None:
        # The same parameters, not a detached copy (a detached ZeRO-3 shard would be empty): the autograd function
        # never returns a gradient for its reference inputs.
        ref_lm_head = lm_head
    weight = lm_head.weight
    # FSDP2 shards parameters as DTensors, while the backbone returns plain tensors: gather the head once. It is still
    # sharded here only when FSDP did not gather it, i.e. when the head is an FSDP unit of its own (accelerate's layout
    # puts it with the final norm, whose forward runs and gathers both): the pass reads the weight without calling the
    # head's forward, so FSDP never reduces its gradient either. `Partial("avg")` makes the gather's backward average
    # each rank's gradient across the mesh, as FSDP's reduce-scatter does for every other parameter.
    if isinstance(weight, DTensor):
        lm_head = lm_head._replace(
            weight=_gather_averaging_gradient(weight),
            bias=None if lm_head.bias is None else _gather_averaging_gradient(lm_head.bias),
        )
    if ref_lm_head is not None and isinstance(ref_lm_head.weight, DTensor):
        # Detached: the reference is a constant, and DPOTrainer leaves its parameters with `requires_grad=True`, so a
        # gathered copy with a gradient edge would hand DTensor's backward a plain zero gradient (a crash in the
        # first backward under FSDP2)
        ref_lm_head = ref_lm_head._replace(
            weight=ref_lm_head.weight.detach().full_tensor(),
            bias=None if ref_lm_head.bias is None else ref_lm_head.bias.detach().full_tensor(),
        )
    if chunk_size is None:
        chunk_size = default_token_chunk_size(lm_head.weight.size(0), hidden_states.device)
    vocab_tile = _vocab_tile_size(lm_head.weight.size(0), hidden_states.device)

    ref_params = (None, None) if ref_lm_head is None else (ref_lm_head.weight, ref_lm_head.bias)
    cache = (None,) * 3
    if ref_cache is not None:
        device = hidden_states.device
        cache = (
            ref_cache.topk_ids.to(device)[mask].long(),
            ref_cache.topk_log_probs.to(device)[mask],
            ref_cache.tail_log_mass.to(device)[mask],
        )
    with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias, *ref_params):
        log_probs, entropy, mean_logits, is_top1, ref_log_probs, forward_kl = _FusedTokenStats.apply(
            hidden_states[mask],
            lm_head.weight,
            lm_head.bias,
            labels[mask],
            None if ref_hidden_states is None else ref_hidden_states[mask].detach(),
            ref_params[0],
            ref_params[1],
            *cache,
            (lm_head, ref_lm_head),
            chunk_size,
            vocab_tile,
        )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        # `masked_scatter` keeps an all-masked micro-batch connected to the graph (a differentiable zero)
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    has_ref = ref_hidden_states is not None
    if ref_cache is not None:
        ref_log_probs = ref_cache.label_log_probs.to(hidden_states.device)[mask].float()
    has_kl = has_ref or ref_cache is not None
    return TokenStats(
        log_probs=scatter(log_probs),
        entropy=scatter(entropy),
        mean_logits=scatter(mean_logits),
        is_top1=scatter(is_top1),
        ref_log_probs=scatter(ref_log_probs) if has_kl else None,
        forward_kl=scatter(forward_kl) if has_kl else None,
    )


def reference_top_k(
    hidden_states: torch.Tensor, lm_head: LMHead, labels: torch.Tensor, k: int, chunk_size: int | None = None
) -> ReferenceCache:
    """The reference cache of the labelled positions: the reference's label log-prob, its `k` most likely tokens and
    their log-probs, and the log of the mass outside them (a logsumexp over the logits outside the top k, never
    `log(1 − Σ top-k)`). Without gradient; float32. `k` larger than the vocabulary keeps the whole vocabulary (the
    bucket is then empty: `tail_log_mass = -inf`).

    The logits of `chunk_size` tokens over the whole vocabulary exist at once (it runs once, before training).
    """
    mask = labels != -100
    vocab_size = lm_head.weight.size(0)
    k = min(k, vocab_size)
    if chunk_size is None:
        chunk_size = max(
            1, (4 * GPU_TILE_ELEMENTS if hidden_states.device.type != "cpu" else 2 * CPU_TILE_ELEMENTS) // vocab_size
        )
    hidden, token_labels = hidden_states[mask], labels[mask]
    num_tokens, device = hidden.size(0), hidden_states.device
    label_log_probs = torch.empty(num_tokens, dtype=torch.float32, device=device)
    topk_ids = torch.empty(num_tokens, k, dtype=torch.long, device=device)
    topk_log_probs = torch.empty(num_tokens, k, dtype=torch.float32, device=device)
    tail_log_mass = torch.empty(num_tokens, dtype=torch.float32, device=device)
    head = lm_head._replace(
        weight=lm_head.weight.detach(), bias=None if lm_head.bias is None else lm_head.bias.detach()
    )
    with torch.no_grad(), maybe_gather_lm_head_ctx(head.weight, head.bias):
        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            logits, _ = _logits(hidden[rows].to(_compute_dtype(head.weight)), head)
            log_probs = logits.log_softmax(dim=-1)
            label_log_probs[rows] = log_probs.gather(1, token_labels[rows].unsqueeze(1)).squeeze(1)
            top = log_probs.topk(k, dim=-1)
            topk_ids[rows], topk_log_probs[rows] = top.indices, top.values
            tail_log_mass[rows] = log_probs.scatter_(1, top.indices, -math.inf).logsumexp(dim=-1)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        shape = mask.shape + values.shape[1:]
        out = values.new_zeros(shape)
        out[mask] = values
        return out

    return ReferenceCache(scatter(label_log_probs), scatter(topk_ids), scatter(topk_log_probs), scatter(tail_log_mass))


class FullVocabularyStats(NamedTuple):
    """Per-position statistics from full `[..., vocab]` log-probabilities (naive, for tests, benchmarks, evaluation)."""

    entropy: torch.Tensor  # H(πθ)
    forward_kl: torch.Tensor  # KL(π_ref ‖ πθ), TDPO's κ
    reverse_kl: torch.Tensor  # KL(πθ ‖ π_ref), the RLHF KL


def full_vocabulary_stats(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> FullVocabularyStats:
    """Entropy and both KLs over the last dimension from full log-probabilities (`log_softmax`, so an underflowed
    probability contributes an exact 0, never `0 · log 0 = nan`)."""
    probs, ref_probs = log_probs.exp(), ref_log_probs.exp()
    return FullVocabularyStats(
        entropy=-(probs * log_probs).sum(-1),
        forward_kl=(ref_probs * (ref_log_probs - log_probs)).sum(-1),
        reverse_kl=(probs * (log_probs - ref_log_probs)).sum(-1),
    )


def naive_token_stats(
    hidden_states: torch.Tensor,
    lm_head: LMHead,
    labels: torch.Tensor,
    ref_hidden_states: torch.Tensor | None = None,
    ref_lm_head: LMHead | None = None,
) -> TokenStats:
    """The same statistics from full `[rows, seq, vocab]` float32 logits, as the official TDPO code computes them
    (but with `log_softmax`). Used as the reference in tests and as the naive baseline in benchmarks."""
    mask = labels != -100
    safe_labels = labels.clamp(min=0).unsqueeze(-1)

    def full_log_probs(hidden, head):
        logits, _ = _logits(hidden, head)
        return logits.log_softmax(dim=-1), logits

    log_probs, logits = full_log_probs(hidden_states, lm_head)
    zero = torch.zeros((), device=hidden_states.device)
    stats = {
        "log_probs": torch.where(mask, log_probs.gather(-1, safe_labels).squeeze(-1), zero),
        "entropy": torch.where(mask, full_vocabulary_stats(log_probs, log_probs).entropy, zero).detach(),
        "mean_logits": torch.where(mask, logits.mean(-1), zero).detach(),
        "is_top1": (logits.argmax(-1) == labels) & mask,
    }
    if ref_hidden_states is not None:
        ref_lm_head = ref_lm_head or lm_head._replace(weight=lm_head.weight.detach())
        with torch.no_grad():
            ref_log_probs, _ = full_log_probs(ref_hidden_states, ref_lm_head)
        stats["ref_log_probs"] = torch.where(mask, ref_log_probs.gather(-1, safe_labels).squeeze(-1), zero)
        stats["forward_kl"] = torch.where(mask, full_vocabulary_stats(log_probs, ref_log_probs).forward_kl, zero)
    return TokenStats(**stats)


@dataclass
class TokenStatsOutput(ModelOutput):
    """Output of a model patched with [`add_token_stats_head`] and called with `token_stats=True`.

    Args:
        stats ([`TokenStats`], *optional*):
            Per-token statistics for the labels (absent when `return_hidden_states_only=True`).
        hidden_states (`torch.Tensor` of shape `(rows, seq - 1, hidden)`, *optional*):
            The final hidden states aligned with the shifted labels, when requested.
        aux_loss (`torch.Tensor`, *optional*):
            MoE load-balancing loss, when router logits were requested.
    """

    stats: TokenStats | None = None
    hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def add_token_stats_head(model: torch.nn.Module, backbone_attr: str = "base_model") -> None:
    """Patch `model.forward` so that `model(..., labels=labels, token_stats=True)` returns a [`TokenStatsOutput`].

    The statistics are computed *inside* the model's forward, so every wrapper around the model keeps working: DDP
    registers the LM head's gradient, DeepSpeed ZeRO-3 and FSDP gather what they shard. Without `token_stats=True` the
    forward is the previous one (so `generate` and TRL's own fused head are unchanged). Apply it before wrapping the
    model with PEFT, as TRL does for its fused head.

    Extra keyword arguments of the patched forward:
        token_stats (`bool`): compute the statistics instead of the usual forward.
        labels (`torch.Tensor` of shape `(rows, seq)`): unshifted labels, `-100` on positions without a statistic.
        ref_hidden_states (`torch.Tensor` of shape `(rows, seq - 1, hidden_ref)`): the reference's final hidden states,
            for `ref_log_probs` and `forward_kl`.
        ref_lm_head ([`LMHead`]): the reference's output projection (defaults to this model's, detached).
        ref_cache ([`ReferenceCache`]): the reference's stored top-k distribution, instead of `ref_hidden_states`.
        return_hidden_states (`bool`): also return this model's final hidden states (detached).
        return_hidden_states_only (`bool`): run only the backbone and return its final hidden states (for a
            reference or guidance model whose statistics are computed together with the policy's).
        chunk_size (`int`): tokens per projected tile.
    """
    if getattr(model.forward, "computes_token_stats", False):
        return  # already patched (the precompute patches before DPOTrainer's init ends, the init after)
    original_forward = model.forward
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def _token_stats_forward(
        self,
        *args,
        token_stats=False,
        labels=None,
        ref_hidden_states=None,
        ref_lm_head=None,
        ref_cache=None,
        return_hidden_states=False,
        return_hidden_states_only=False,
        chunk_size=None,
        **kwargs,
    ):
        if not token_stats:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)

        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up on each call: PEFT and FSDP replace modules after the patch
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        hidden_states = backbone_outputs.last_hidden_state[:, :-1]
        aux_loss = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux_loss = load_balancing_loss_func(
                backbone_outputs.router_logits,
                text_config.num_experts,
                text_config.num_experts_per_tok,
                kwargs.get("attention_mask"),
            )
        if return_hidden_states_only:
            return TokenStatsOutput(hidden_states=hidden_states, aux_loss=aux_loss)

        head = lm_head_of(self)
        shifted_labels = labels[:, 1:].to(head.weight.device)
        hidden_states = hidden_states.to(head.weight.device)
        stats = compute_token_stats(
            hidden_states,
            head,
            shifted_labels,
            ref_hidden_states=ref_hidden_states,
            ref_lm_head=ref_lm_head,
            chunk_size=chunk_size,
            ref_cache=ref_cache,
        )
        return TokenStatsOutput(
            stats=stats,
            hidden_states=hidden_states.detach() if return_hidden_states else None,
            aux_loss=aux_loss,
        )

    _token_stats_forward.computes_token_stats = True
    model.forward = types.MethodType(_token_stats_forward, model)


__all__ = [
    "LMHead",
    "ReferenceCache",
    "TokenStats",
    "TokenStatsOutput",
    "add_token_stats_head",
    "FullVocabularyStats",
    "compute_token_stats",
    "default_token_chunk_size",
    "lm_head_of",
    "full_vocabulary_stats",
    "naive_token_stats",
    "reference_top_k",
]
