"""Padding-free training (`padding_free=True`): the model runs on a batch's real tokens only, packed into one row.

A packed batch (`precompute.DataCollatorForPerTokenColumns(padding_free=True)`) holds the 2B sequences of B pairs one
after another, `input_ids [1, T]` with T = Σ L_i, `position_ids` restarting at 0 at each sequence, and `cu_seq_lens
[2B + 1]`, the sequences' boundaries (the key [`PACKED_BATCH_KEY`] marks a batch as packed). Every layer but attention
is per token, so it computes on T positions instead of 2B · L_max. Attention must not cross a boundary, and must not
pay for one either: a dense T × T block-diagonal mask (what transformers builds for sdpa from restarting
`position_ids`) still costs (Σ L_i)² per layer, which measured only 2-8% faster than padding. So attention runs per
sequence, at a cost of Σ L_i²:

* **FlashAttention** (`flash_attention_2`, `flash_attention_3`, and the `kernels` hub's flash kernels), GPU: its
  variable-length kernel, from `cu_seq_lens_q/k` and `max_length_q/k`, the keyword arguments transformers' own
  padding-free path (`DataCollatorWithFlattening`) passes;
* **sdpa** (CPU or GPU): [`packed_sdpa_attention_forward`], registered with transformers' attention interface as
  [`PACKED_SDPA`], which runs `scaled_dot_product_attention` on each sequence's slice (causal), and is exactly
  transformers' sdpa for any other call (`generate`, evaluation forwards). [`prepare_model_for_packing`] switches an
  sdpa model to it. Its mask function is sdpa's: a packed batch comes with an all-ones `attention_mask`, for which
  sdpa's mask creation builds no mask at all.

Other implementations are refused before training, with the fix: `eager` and `flex_attention` (no per-sequence path
here), and sdpa on a model with a sliding window (the per-sequence call is plain causal attention).
"""

import torch

from ._compat import (
    AttentionInterface,
    AttentionMaskInterface,
    attn_implementation,
    sdpa_attention_forward,
    sdpa_mask,
    set_attn_implementation,
)


# A collated batch is packed when it carries this key: the sequences' boundaries, `[2B + 1]` int32
PACKED_BATCH_KEY = "cu_seq_lens"
# The name under which the per-sequence sdpa is registered with transformers' attention interface
PACKED_SDPA = "trl_tokenpref_sdpa"


def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, run on each packed sequence on its own when `cu_seq_lens_q` is given.

    `query [1, heads, T, d]` (and key, value) hold the packed sequences; `cu_seq_lens_q` their boundaries. Each
    sequence attends causally to itself only, through sdpa's own kernel (`is_causal=True`, no mask): the cost is
    Σ L_i², and no T × T mask exists. Without `cu_seq_lens_q` (an unpacked call: `generate`, a padded forward) this is
    `sdpa_attention_forward` unchanged. Returns `[1, T, heads, d]`, as sdpa does.
    """
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if query.size(0) != 1 or attention_mask is not None:
        raise ValueError(
            "A packed batch (`cu_seq_lens_q` given) must be one row with no attention mask, got a batch of "
            f"{query.size(0)} rows{' and a mask' if attention_mask is not None else ''}."
        )
    boundaries = cu_seq_lens_q.tolist()
    outputs = []
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        output, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,
            dropout,
            scaling,
            True,
            **kwargs,
        )
        outputs.append(output)
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def _is_flash_attention(implementation: str) -> bool:
    """transformers' FlashAttention implementations, and the hub kernels' (`kernels-community/flash-attn...`)."""
    return implementation.startswith("flash_attention") or "flash-attn" in implementation


def _sliding_window(config) -> int | None:
    """The sliding window of a model whose attention uses one (Mistral, Qwen2 with `use_sliding_window`, Gemma 2/3's
    sliding layers), or None."""
    text_config = config.get_text_config()
    window = getattr(text_config, "sliding_window", None)
    if window is None or getattr(text_config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def check_packable(model: torch.nn.Module, role: str) -> None:
    """Refuse, before training, a model whose attention cannot run a packed batch sequence by sequence."""
    implementation = attn_implementation(model.config)
    if implementation in ("sdpa", PACKED_SDPA):
        window = _sliding_window(model.config)
        if window is not None:
            raise ValueError(
                f"`padding_free=True` runs the {role} model's sdpa attention on each packed sequence with plain causal "
                f"attention, but this model uses a sliding window of {window} tokens, which that call would ignore. "
                "Load it with `attn_implementation='flash_attention_2'` (GPU; the varlen kernel applies the window), "
                "or train with `padding_free=False`."
            )
        return
    if _is_flash_attention(implementation):
        return
    raise ValueError(
        f"`padding_free=True` needs an attention implementation that runs each packed sequence on its own, but the "
        f"{role} model uses {implementation!r}. Supported: 'sdpa' (CPU or GPU: sequence by sequence, cost Σ L_i²) and "
        "'flash_attention_2' / 'flash_attention_3' (GPU: the variable-length kernels). Load the model with "
        "`attn_implementation='sdpa'` (`model_init_kwargs={'attn_implementation': 'sdpa'}`; the scripts: "
        "`--attn_implementation sdpa`), or train with `padding_free=False`."
    )


def prepare_model_for_packing(model: torch.nn.Module, role: str) -> None:
    """Check that `model` (a loaded causal LM, not yet wrapped) can run packed batches, and switch an sdpa model to
    [`PACKED_SDPA`] (the same attention for every unpacked call). Idempotent."""
    check_packable(model, role)
    if attn_implementation(model.config) == "sdpa":
        set_attn_implementation(model, PACKED_SDPA)


def packed_model_kwargs(inputs: dict, config) -> dict:
    """The keyword arguments that tell the model where a packed batch's sequences start: `cu_seq_lens_q/k` and
    `max_length_q/k` for the per-sequence attention, and the attention mask its implementation expects (all ones for
    sdpa, whose mask creation then builds none; none for FlashAttention, which would otherwise take the whole row as
    one sequence)."""
    boundaries = inputs[PACKED_BATCH_KEY].to(device=inputs["input_ids"].device, dtype=torch.int32)
    max_length = int((boundaries[1:] - boundaries[:-1]).max())
    kwargs = {
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": max_length,
        "max_length_k": max_length,
        "position_ids": inputs["position_ids"],
    }
    if _is_flash_attention(attn_implementation(config)):
        kwargs["attention_mask"] = None
    else:
        kwargs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return kwargs


__all__ = [
    "PACKED_BATCH_KEY",
    "PACKED_SDPA",
    "check_packable",
    "packed_model_kwargs",
    "packed_sdpa_attention_forward",
    "prepare_model_for_packing",
]
