"""The fused chunked kernel: per-token statistics of a policy LM head (and a reference's) from hidden states, one tile
of `[tokens, vocabulary]` logits at a time, in forward and backward.

`_FusedTokenStats` projects one tile (a chunk of tokens x a slice of the vocabulary; on GPU the whole vocabulary) at a
time through both LM heads, folds it into per-token running statistics (online softmax), and keeps nothing of size
`vocab` between tiles: every statistic comes from that one projection of each tile. Only the two logsumexps are saved;
the backward projects each tile again and applies the closed-form gradient

    ∂ log pθ(y)/∂z = onehot(y) − pθ        ∂ κ/∂z = pθ − p_ref          (z: the policy logits)

so the `[tokens, vocab]` logits never exist in forward or backward. Its inputs are the labelled tokens only, flat
(`[N, H]`): prompt and padding positions cost nothing.

The heads are read through `lm_head.gathered_lm_head` only: the caller gathers them for the forward (and reads the
vocabulary size there), and the backward gathers them again (ZeRO-3 frees a gathered parameter when its context ends).
"""

import math

import torch
import torch.nn.functional as F

from .lm_head import LMHead, gathered_lm_head


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


def default_token_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Number of tokens projected at once, so that one `[chunk, vocab tile]` tile holds a fixed number of elements."""
    budget = CPU_TILE_ELEMENTS if torch.device(device).type == "cpu" else GPU_TILE_ELEMENTS
    return max(1, budget // _vocab_tile_size(vocab_size, device))


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
    vocab_size = policy_head.vocab_size
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
    vocab_size, compute_dtype = policy_head.vocab_size, hidden.dtype
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


def _mean_row(weight: torch.Tensor) -> torch.Tensor:
    """The mean of the head's rows, in float32, summed one block of rows at a time. `weight.mean(dim=0,
    dtype=float32)` casts the whole head to float32 first on CPU (only CUDA reduces in place): for a bf16 head of
    128k x 4096 that copy was 2 GB, the peak of a TDPO step (measured in docs/memory_and_scaling.md). A block holds
    at most a CPU tile's elements (8 MiB in float32, as the tile buffers); CUDA sums the whole head at once."""
    if weight.device.type == "cuda":
        rows_per_block = weight.size(0)
    else:
        rows_per_block = max(1, CPU_TILE_ELEMENTS // weight.size(1))
    total = torch.zeros(weight.size(1), dtype=torch.float32, device=weight.device)
    for start in range(0, weight.size(0), rows_per_block):
        total += weight[start : start + rows_per_block].sum(dim=0, dtype=torch.float32)
    return total / weight.size(0)


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
            mean_logits = (hidden.float() @ _mean_row(weight) + mean_bias) * policy_head.logit_scale
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
        # Only the heads' scalars: their tensors are saved above (a gathered ZeRO-3 parameter is gathered again)
        ctx.heads = tuple(None if head is None else head._replace(weight=None, bias=None) for head in heads)
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
        num_tokens = hidden.size(0)
        f32 = {"dtype": torch.float32, "device": hidden.device}
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None

        # The heads again, gathered (ZeRO-3 freed them when the forward's gather ended); their shapes are read inside
        with (
            gathered_lm_head(policy_head._replace(weight=weight, bias=bias), trainable=True) as policy_head,
            gathered_lm_head(
                ref_head._replace(weight=ref_weight, bias=ref_bias) if use_kl else None, trainable=False
            ) as ref_head,
            torch.autocast(hidden.device.type, enabled=False),
        ):
            weight, bias = policy_head.weight, policy_head.bias
            vocab_size = policy_head.vocab_size
            buffers = _TileBuffers(min(chunk_size, num_tokens) * min(vocab_tile, vocab_size), hidden.device)
            # Accumulated in float32 across chunks and tiles, whatever the parameter dtype
            grad_weight = torch.zeros(weight.shape, **f32) if ctx.needs_input_grad[1] else None
            grad_bias = torch.zeros(vocab_size, **f32) if (bias is not None and ctx.needs_input_grad[2]) else None
            policy_head = policy_head._replace(weight=weight.to(dtype), bias=None if bias is None else bias.to(dtype))
            if use_kl:
                ref_head = ref_head._replace(
                    weight=ref_head.weight.detach().to(dtype),
                    bias=None if ref_head.bias is None else ref_head.bias.detach().to(dtype),
                )
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
