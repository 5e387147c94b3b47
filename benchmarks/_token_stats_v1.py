# Frozen copy of trl_tokenpref/token_stats.py BEFORE the performance work of issue 6 (token-only chunks of
# CPU_TILE_ELEMENTS = 2**22 elements across the whole vocabulary; softmax recomputed in the backward). For benchmarks
# only (`bench_lm_head.py --impls tdpo-fused-v1`, `bench_trainers.py --configs tdpo2-v1`); the package never imports it.
"""Per-token statistics of a policy (and its reference) from hidden states and the LM head, in chunks.

Every token-level method needs, per completion token t with label y_t:

* the policy log-probability `log πθ(y_t|s_t)` (and, for DPO's metrics, the entropy, the mean logit and whether the
  label is the argmax),
* the reference log-probability `log π_ref(y_t|s_t)`,
* for TDPO and TBPO-A, the exact forward KL over the whole vocabulary,
  `κ_t = KL(π_ref(·|s_t) ‖ πθ(·|s_t)) = Σ_v p_ref(v) [log p_ref(v) − log pθ(v)]` (TDPO paper Def. 4.3).

A naive implementation materialises `[tokens, vocab]` logits for both models (the official TDPO code does, in fp32).
`_FusedTokenStats` instead projects one chunk of tokens at a time through both LM heads, computes all the statistics
from that one projection, and keeps nothing of size `vocab` between chunks. Its backward recomputes each chunk's
logits and applies the closed-form gradient

    ∂ log pθ(y)/∂z = onehot(y) − pθ        ∂ κ/∂z = pθ − p_ref          (z: the policy logits)

so the `[tokens, vocab]` logits never exist in forward or backward. Only the tokens that carry a label (the completion
tokens) are projected: prompt and padding positions cost nothing.

Log-probabilities come from `log_softmax` (logits minus their logsumexp), never `softmax().log()`: the official TDPO
code returns NaN when a reference probability underflows to 0 (`0 * log 0`); here such a term is `0 * finite = 0`.
"""

import functools
import types
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers.utils import ModelOutput

from trl_tokenpref._compat import maybe_gather_lm_head_ctx


# Elements of one `[chunk, vocab]` float32 tile. On CPU, small tiles stay in cache and keep the temporaries small
# (FEASIBILITY.md Q5: TRL's GPU-sized tiles are 2-4x slower and 2-3x larger than naive on CPU); on GPU a larger tile
# keeps the matmuls efficient. About 8 such tiles are alive at the peak of the backward.
CPU_TILE_ELEMENTS = 2**22
GPU_TILE_ELEMENTS = 2**26


def default_token_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Number of tokens projected at once, so that one `[chunk, vocab]` tile holds a fixed number of elements."""
    device_type = torch.device(device).type
    budget = CPU_TILE_ELEMENTS if device_type == "cpu" else GPU_TILE_ELEMENTS
    return max(1, budget // max(vocab_size, 1))


class TokenStats(NamedTuple):
    """Per-token statistics, each of shape `[rows, seq_len - 1]` (aligned with the shifted labels) and zero where the
    label is `-100`. Fields that were not requested are `None`."""

    log_probs: torch.Tensor  # log πθ(y_t|s_t), differentiable
    entropy: torch.Tensor  # H(πθ(·|s_t)), no gradient
    mean_logits: torch.Tensor  # mean over the vocabulary of the policy logits, no gradient
    is_top1: torch.Tensor  # bool: y_t is the policy's argmax
    ref_log_probs: torch.Tensor | None = None  # log π_ref(y_t|s_t), no gradient
    forward_kl: torch.Tensor | None = None  # κ_t = KL(π_ref ‖ πθ), differentiable w.r.t. the policy only


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


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the chunk projections: the autocast dtype when autocast is on (as for the model's own forward),
    the weight's dtype otherwise."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _FusedTokenStats(torch.autograd.Function):
    """Chunked per-token statistics of a policy LM head, and of a reference LM head when one is given.

    Inputs are already restricted to the labelled tokens: `hidden [N, H]`, `labels [N]`, `ref_hidden [N, H_ref]`.
    Outputs, all `[N]`: log_probs, entropy, mean_logits, is_top1, ref_log_probs, forward_kl (the last two are empty
    tensors without a reference). Gradients flow to the policy's hidden states, weight and bias, through `log_probs`
    and `forward_kl` only; the reference is a constant.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, heads, chunk_size):
        policy_head, ref_head = heads
        has_ref = ref_hidden is not None
        dtype = _compute_dtype(weight)
        num_tokens = hidden.size(0)
        outputs = {
            name: hidden.new_zeros(num_tokens, dtype=torch.float32) for name in ("lp", "ent", "mean", "rlp", "kl")
        }
        is_top1 = torch.zeros(num_tokens, dtype=torch.bool, device=hidden.device)
        policy_head = policy_head._replace(weight=weight.to(dtype), bias=None if bias is None else bias.to(dtype))
        if has_ref:
            ref_head = ref_head._replace(
                weight=ref_weight.to(dtype), bias=None if ref_bias is None else ref_bias.to(dtype)
            )
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, num_tokens, chunk_size):
                chunk = slice(start, start + chunk_size)
                chunk_labels = labels[chunk].unsqueeze(1)
                logits, _ = _logits(hidden[chunk].to(dtype), policy_head)
                outputs["mean"][chunk] = logits.mean(dim=-1)
                is_top1[chunk] = logits.argmax(dim=-1) == labels[chunk]
                log_probs = logits.sub_(logits.logsumexp(dim=-1, keepdim=True))  # in place: logits are not reused
                probs = log_probs.exp()
                outputs["ent"][chunk] = -(probs * log_probs).sum(dim=-1)
                outputs["lp"][chunk] = log_probs.gather(1, chunk_labels).squeeze(1)
                del probs
                if has_ref:
                    ref_log_probs, _ = _logits(ref_hidden[chunk].to(dtype), ref_head)
                    ref_log_probs = ref_log_probs.sub_(ref_log_probs.logsumexp(dim=-1, keepdim=True))
                    outputs["rlp"][chunk] = ref_log_probs.gather(1, chunk_labels).squeeze(1)
                    # Σ_v p_ref (log p_ref − log pθ): an underflowed p_ref is an exact 0 times a finite number
                    outputs["kl"][chunk] = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(dim=-1)

        ctx.save_for_backward(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias)
        ctx.heads = heads
        ctx.chunk_size = chunk_size
        ctx.dtype = dtype
        if not has_ref:
            outputs["rlp"], outputs["kl"] = (
                hidden.new_zeros(0, dtype=torch.float32),
                hidden.new_zeros(0, dtype=torch.float32),
            )
        ctx.mark_non_differentiable(outputs["ent"], outputs["mean"], is_top1, outputs["rlp"])
        return outputs["lp"], outputs["ent"], outputs["mean"], is_top1, outputs["rlp"], outputs["kl"]

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy, _grad_mean, _grad_top1, _grad_ref_log_probs, grad_kl):
        hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias = ctx.saved_tensors
        policy_head, ref_head = ctx.heads
        dtype, chunk_size = ctx.dtype, ctx.chunk_size
        has_ref = ref_hidden is not None
        use_kl = has_ref and grad_kl is not None and grad_kl.numel() > 0
        num_tokens = hidden.size(0)
        if grad_log_probs is None:
            grad_log_probs = hidden.new_zeros(num_tokens, dtype=torch.float32)

        compute_weight = weight.to(dtype)
        policy_head = policy_head._replace(weight=compute_weight, bias=None if bias is None else bias.to(dtype))
        if use_kl:
            ref_head = ref_head._replace(
                weight=ref_weight.to(dtype), bias=None if ref_bias is None else ref_bias.to(dtype)
            )
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # Accumulate the weight gradient in float32 across chunks, whatever the parameter dtype
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        grad_bias = (
            torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device)
            if (bias is not None and ctx.needs_input_grad[2])
            else None
        )

        with (
            torch.autocast(hidden.device.type, enabled=False),
            maybe_gather_lm_head_ctx(weight, bias, ref_weight, ref_bias),
        ):
            for start in range(0, num_tokens, chunk_size):
                chunk = slice(start, start + chunk_size)
                chunk_hidden = hidden[chunk].to(dtype)
                logits, tanh = _logits(chunk_hidden, policy_head)
                probs = torch.softmax(logits, dim=-1)
                del logits
                # ∂/∂z of g_lp·log pθ(y) + g_kl·κ  =  g_lp·(onehot(y) − pθ) + g_kl·(pθ − p_ref)
                grad_lp = grad_log_probs[chunk].float().unsqueeze(1)
                if use_kl:
                    grad_kl_chunk = grad_kl[chunk].float().unsqueeze(1)
                    ref_logits, _ = _logits(ref_hidden[chunk].to(dtype), ref_head)
                    ref_probs = torch.softmax(ref_logits, dim=-1)
                    del ref_logits
                    grad_logits = probs.mul_(grad_kl_chunk - grad_lp).sub_(ref_probs.mul_(grad_kl_chunk))
                    del ref_probs
                else:
                    grad_logits = probs.mul_(-grad_lp)
                grad_logits.scatter_add_(1, labels[chunk].unsqueeze(1), grad_lp)
                # Chain rule through the softcap and the logit scale
                if tanh is not None:
                    grad_logits.mul_(1 - tanh.square_())
                if policy_head.logit_scale != 1.0:
                    grad_logits.mul_(policy_head.logit_scale)
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[chunk] = (grad_logits @ compute_weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.add_(grad_logits.t() @ chunk_hidden)
                if grad_bias is not None:
                    grad_bias.add_(grad_logits.float().sum(dim=0))

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def compute_token_stats(
    hidden_states: torch.Tensor,
    lm_head: LMHead,
    labels: torch.Tensor,
    ref_hidden_states: torch.Tensor | None = None,
    ref_lm_head: LMHead | None = None,
    chunk_size: int | None = None,
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

    Returns:
        [`TokenStats`], every field of shape `(rows, seq)` and zero where `labels == -100`.
    """
    mask = labels != -100
    if ref_hidden_states is not None and ref_lm_head is None:
        # The same parameters, not a detached copy (a detached ZeRO-3 shard would be empty): the autograd function
        # never returns a gradient for its reference inputs.
        ref_lm_head = lm_head
    weight = lm_head.weight
    # FSDP2 shards parameters as DTensors, while the backbone returns plain tensors: gather the head once
    if isinstance(weight, DTensor):
        lm_head = lm_head._replace(
            weight=weight.full_tensor(), bias=None if lm_head.bias is None else lm_head.bias.full_tensor()
        )
    if ref_lm_head is not None and isinstance(ref_lm_head.weight, DTensor):
        ref_lm_head = ref_lm_head._replace(
            weight=ref_lm_head.weight.full_tensor(),
            bias=None if ref_lm_head.bias is None else ref_lm_head.bias.full_tensor(),
        )
    if chunk_size is None:
        chunk_size = default_token_chunk_size(lm_head.weight.size(0), hidden_states.device)

    ref_params = (None, None) if ref_lm_head is None else (ref_lm_head.weight, ref_lm_head.bias)
    with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias, *ref_params):
        log_probs, entropy, mean_logits, is_top1, ref_log_probs, forward_kl = _FusedTokenStats.apply(
            hidden_states[mask],
            lm_head.weight,
            lm_head.bias,
            labels[mask],
            None if ref_hidden_states is None else ref_hidden_states[mask].detach(),
            ref_params[0],
            ref_params[1],
            (lm_head, ref_lm_head),
            chunk_size,
        )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        # `masked_scatter` keeps an all-masked micro-batch connected to the graph (a differentiable zero)
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    has_ref = ref_hidden_states is not None
    return TokenStats(
        log_probs=scatter(log_probs),
        entropy=scatter(entropy),
        mean_logits=scatter(mean_logits),
        is_top1=scatter(is_top1),
        ref_log_probs=scatter(ref_log_probs) if has_ref else None,
        forward_kl=scatter(forward_kl) if has_ref else None,
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
        "entropy": torch.where(mask, -(log_probs.exp() * log_probs).sum(-1), zero).detach(),
        "mean_logits": torch.where(mask, logits.mean(-1), zero).detach(),
        "is_top1": (logits.argmax(-1) == labels) & mask,
    }
    if ref_hidden_states is not None:
        ref_lm_head = ref_lm_head or lm_head._replace(weight=lm_head.weight.detach())
        with torch.no_grad():
            ref_log_probs, _ = full_log_probs(ref_hidden_states, ref_lm_head)
        stats["ref_log_probs"] = torch.where(mask, ref_log_probs.gather(-1, safe_labels).squeeze(-1), zero)
        per_token_kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)
        stats["forward_kl"] = torch.where(mask, per_token_kl, zero)
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
        return_hidden_states (`bool`): also return this model's final hidden states (detached).
        return_hidden_states_only (`bool`): run only the backbone and return its final hidden states (for a
            reference or guidance model whose statistics are computed together with the policy's).
        chunk_size (`int`): tokens per projected tile.
    """
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
        )
        return TokenStatsOutput(
            stats=stats,
            hidden_states=hidden_states.detach() if return_hidden_states else None,
            aux_loss=aux_loss,
        )

    model.forward = types.MethodType(_token_stats_forward, model)


__all__ = [
    "LMHead",
    "TokenStats",
    "TokenStatsOutput",
    "add_token_stats_head",
    "compute_token_stats",
    "default_token_chunk_size",
    "lm_head_of",
    "naive_token_stats",
]
