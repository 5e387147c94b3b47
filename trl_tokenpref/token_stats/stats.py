"""The entry points of the per-token statistics: [`compute_token_stats`] (the fused pass, with a live reference or
the reference cache) and [`reference_top_k`] (the reference cache's precompute), and what they return."""

import math
from typing import NamedTuple

import torch

from .fused import (
    CPU_TILE_ELEMENTS,
    GPU_TILE_ELEMENTS,
    _compute_dtype,
    _FusedTokenStats,
    _logits,
    _vocab_tile_size,
    default_token_chunk_size,
)
from .lm_head import LMHead, gathered_lm_head


class TokenStats(NamedTuple):
    """Per-token statistics of the labelled tokens, each of shape `[N]` (one value per token of a
    [`~trl_tokenpref.token_batch.TokenBatch`], in its order). Fields that were not requested are `None`."""

    log_probs: torch.Tensor  # log πθ(y_t|s_t), differentiable
    entropy: torch.Tensor  # H(πθ(·|s_t)), no gradient
    mean_logits: torch.Tensor  # mean over the vocabulary of the policy logits, no gradient
    is_top1: torch.Tensor  # bool: y_t is the policy's argmax
    ref_log_probs: torch.Tensor | None = None  # log π_ref(y_t|s_t), no gradient
    forward_kl: torch.Tensor | None = None  # κ_t = KL(π_ref ‖ πθ), differentiable w.r.t. the policy only


class ReferenceCache(NamedTuple):
    """The reference's next-token distribution at each labelled token, as `precompute_ref_log_probs=True` stores it
    (docs/algorithms.md §9): its k most likely tokens K and their log-probabilities, and the log of the mass m of every
    other token, merged into one bucket. Shapes `[N]` or `[N, k]`, one row per labelled token.

    The per-token KL computed from it is `KL_K = Σ_{v∈K} p(v)[log p(v) − log q(v)] + m[log m − log Q]`, with
    `Q = Σ_{v∉K} q(v)` the policy's mass outside K: a lower bound of the exact KL (log-sum inequality), equal to it when
    πθ = π_ref or when K is the whole vocabulary.
    """

    label_log_probs: torch.Tensor  # [N] log π_ref(y_t|s_t), exact
    topk_ids: torch.Tensor  # [N, k] int: K, the reference's k most likely tokens
    topk_log_probs: torch.Tensor  # [N, k] float: log π_ref(v|s_t) for v in K
    tail_log_mass: torch.Tensor  # [N] float: log m = log Σ_{v∉K} π_ref(v|s_t); -inf when K is everything


def compute_token_stats(
    hidden_states: torch.Tensor,
    lm_head: LMHead,
    labels: torch.Tensor,
    ref_hidden_states: torch.Tensor | None = None,
    ref_lm_head: LMHead | None = None,
    chunk_size: int | None = None,
    ref_cache: ReferenceCache | None = None,
) -> TokenStats:
    """Per-token statistics of labelled tokens, without materialising `[tokens, vocab]` logits.

    Args:
        hidden_states (`torch.Tensor` of shape `(N, hidden)`):
            The policy's final hidden state that predicts each token (`TokenBatch.hidden_states_of`).
        lm_head ([`LMHead`]):
            The policy's output projection (read through `gathered_lm_head`: it may be sharded).
        labels (`torch.Tensor` of shape `(N,)`):
            The token each hidden state predicts.
        ref_hidden_states (`torch.Tensor` of shape `(N, hidden_ref)`, *optional*):
            The reference model's final hidden states at the same positions. When given, `ref_log_probs` and
            `forward_kl` are computed.
        ref_lm_head ([`LMHead`], *optional*):
            The reference's output projection. Defaults to `lm_head` (PEFT: the reference is the same model with its
            adapter disabled, and the LM head carries no adapter).
        chunk_size (`int`, *optional*):
            Tokens projected at once. Defaults to [`default_token_chunk_size`].
        ref_cache ([`ReferenceCache`], *optional*):
            The reference's stored top-k distribution at the same tokens, instead of `ref_hidden_states`:
            `ref_log_probs` are its exact label log-probs, `forward_kl` the cached KL `KL_K` (docs/algorithms.md §9).
            No reference projection runs.

    Returns:
        [`TokenStats`], every field of shape `(N,)`.
    """
    if ref_cache is not None and ref_hidden_states is not None:
        raise ValueError("Give the reference as `ref_hidden_states` (live) or as `ref_cache` (precomputed), not both.")
    if ref_hidden_states is None:
        ref_lm_head = None
    elif ref_lm_head is None:
        ref_lm_head = lm_head  # the same parameters (PEFT: the head carries no adapter), gathered as a constant
    device = hidden_states.device
    cache = (None,) * 3
    if ref_cache is not None:
        cache = (
            ref_cache.topk_ids.to(device).long(),
            ref_cache.topk_log_probs.to(device),
            ref_cache.tail_log_mass.to(device),
        )
    # Both heads gathered while the pass reads them (ZeRO-3, FSDP2; free without sharding), and every size read inside.
    # Under FSDP2 the policy head is still sharded here only when it is an FSDP unit of its own (accelerate's layout
    # puts it with the final norm, whose forward gathers both): the gather's backward then averages each rank's
    # gradient, as FSDP's reduce-scatter does for every other parameter (lm_head.py).
    with (
        gathered_lm_head(lm_head, trainable=True) as policy_head,
        gathered_lm_head(ref_lm_head, trainable=False) as ref_head,
    ):
        vocab_size = policy_head.vocab_size
        if chunk_size is None:
            chunk_size = default_token_chunk_size(vocab_size, device)
        ref_params = (None, None) if ref_head is None else (ref_head.weight, ref_head.bias)
        log_probs, entropy, mean_logits, is_top1, ref_log_probs, forward_kl = _FusedTokenStats.apply(
            hidden_states,
            policy_head.weight,
            policy_head.bias,
            labels.to(device),
            None if ref_hidden_states is None else ref_hidden_states.to(device).detach(),
            *ref_params,
            *cache,
            (policy_head, ref_head),
            chunk_size,
            _vocab_tile_size(vocab_size, device),
        )
    if ref_cache is not None:
        ref_log_probs = ref_cache.label_log_probs.to(device).float()
    has_kl = ref_hidden_states is not None or ref_cache is not None
    return TokenStats(
        log_probs=log_probs,
        entropy=entropy,
        mean_logits=mean_logits,
        is_top1=is_top1,
        ref_log_probs=ref_log_probs if has_kl else None,
        forward_kl=forward_kl if has_kl else None,
    )


def reference_top_k(
    hidden_states: torch.Tensor, lm_head: LMHead, labels: torch.Tensor, k: int, chunk_size: int | None = None
) -> ReferenceCache:
    """The reference cache of labelled tokens (`hidden_states [N, H]`, `labels [N]`): the reference's label log-prob,
    its `k` most likely tokens and their log-probs, and the log of the mass outside them (a logsumexp over the logits
    outside the top k, never `log(1 − Σ top-k)`). Without gradient; float32. `k` larger than the vocabulary keeps the
    whole vocabulary (the bucket is then empty: `tail_log_mass = -inf`).

    The logits of `chunk_size` tokens over the whole vocabulary exist at once (it runs once, before training).
    """
    num_tokens, device = hidden_states.size(0), hidden_states.device
    labels = labels.to(device)
    with torch.no_grad(), gathered_lm_head(lm_head, trainable=False) as head:
        vocab_size = head.vocab_size  # inside the gather: a ZeRO-3 shard has 0 rows
        k = min(k, vocab_size)
        if chunk_size is None:
            budget = 4 * GPU_TILE_ELEMENTS if device.type != "cpu" else 2 * CPU_TILE_ELEMENTS
            chunk_size = max(1, budget // vocab_size)
        label_log_probs = torch.empty(num_tokens, dtype=torch.float32, device=device)
        topk_ids = torch.empty(num_tokens, k, dtype=torch.long, device=device)
        topk_log_probs = torch.empty(num_tokens, k, dtype=torch.float32, device=device)
        tail_log_mass = torch.empty(num_tokens, dtype=torch.float32, device=device)
        head = head._replace(weight=head.weight.detach(), bias=None if head.bias is None else head.bias.detach())
        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            logits, _ = _logits(hidden_states[rows].to(_compute_dtype(head.weight)), head)
            log_probs = logits.log_softmax(dim=-1)
            label_log_probs[rows] = log_probs.gather(1, labels[rows].unsqueeze(1)).squeeze(1)
            top = log_probs.topk(k, dim=-1)
            topk_ids[rows], topk_log_probs[rows] = top.indices, top.values
            tail_log_mass[rows] = log_probs.scatter_(1, top.indices, -math.inf).logsumexp(dim=-1)
    return ReferenceCache(label_log_probs, topk_ids, topk_log_probs, tail_log_mass)
