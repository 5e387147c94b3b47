"""The patched model forward: `model(..., labels=labels, token_stats=True)` computes the per-token statistics inside
the model's own forward, so that every wrapper around the model (DDP, DeepSpeed ZeRO-3, FSDP) sees the LM head used
as in any forward."""

import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .lm_head import lm_head_of
from .stats import TokenStats, compute_token_stats


@dataclass
class TokenStatsOutput(ModelOutput):
    """Output of a model patched with [`add_token_stats_head`] and called with `token_stats=True`.

    Args:
        stats ([`TokenStats`], *optional*):
            Per-token statistics of the batch's labelled tokens, `[N]` each (absent when
            `return_hidden_states_only=True`).
        hidden_states (`torch.Tensor` of shape `(N, hidden)`, *optional*):
            The final hidden state that predicts each labelled token, when requested.
        aux_loss (`torch.Tensor`, *optional*):
            MoE load-balancing loss, when router logits were requested.
    """

    stats: TokenStats | None = None
    hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def add_token_stats_head(model: torch.nn.Module, backbone_attr: str = "base_model") -> None:
    """Patch `model.forward` so that `model(..., token_batch=batch, token_stats=True)` returns a [`TokenStatsOutput`].

    The statistics are computed *inside* the model's forward, so every wrapper around the model keeps working: DDP
    registers the LM head's gradient, DeepSpeed ZeRO-3 and FSDP gather what they shard. Without `token_stats=True` the
    forward is the previous one (so `generate` and TRL's own fused head are unchanged). Apply it before wrapping the
    model with PEFT, as TRL does for its fused head.

    Extra keyword arguments of the patched forward:
        token_stats (`bool`): compute the statistics instead of the usual forward.
        token_batch ([`~trl_tokenpref.token_batch.TokenBatch`]): the labelled tokens of the inputs (padded or packed)
            and where their predicting hidden states sit.
        ref_hidden_states (`torch.Tensor` of shape `(N, hidden_ref)`): the reference's final hidden states at the
            labelled tokens, for `ref_log_probs` and `forward_kl`.
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
        token_batch=None,
        ref_hidden_states=None,
        ref_lm_head=None,
        ref_cache=None,
        return_hidden_states=False,
        return_hidden_states_only=False,
        chunk_size=None,
        **kwargs,
    ):
        if not token_stats:
            return original_forward(*args, **kwargs)

        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up on each call: PEFT and FSDP replace modules after the patch
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        # Only the positions that predict a labelled token: prompt, padding and last positions cost nothing further
        hidden_states = token_batch.hidden_states_of(backbone_outputs.last_hidden_state)
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
        hidden_states = hidden_states.to(head.device)
        stats = compute_token_stats(
            hidden_states,
            head,
            token_batch.labels,
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
