"""The one way to read an LM head's parameters: [`gathered_lm_head`].

The fused pass reads `lm_head.weight` (and its bias) directly instead of calling the head's forward, so the parameters
may be sharded when it reads them:

* **DeepSpeed ZeRO-3** partitions every parameter to an empty tensor (`numel 0`) outside its module's forward. The head
  is gathered with `deepspeed.zero.GatheredParameters` for the duration of the read, on the parameters themselves: a
  `.detach()`ed copy of a partitioned parameter is a plain empty tensor that no gather can fill. Its sizes (the
  vocabulary, hence the tiles) are only meaningful inside the gather.
* **FSDP2** shards parameters as `DTensor`s. A head that FSDP did not gather (one wrapped as its own unit, whose
  forward never runs) is gathered with `full_tensor()`; for a trained head its backward averages each rank's gradient
  across the mesh (`Partial("avg")`), as FSDP's reduce-scatter does for every other parameter; a reference head is
  detached first (the reference is a constant, and a gradient edge into DTensor's backward would crash it).
* Unsharded: the parameters as they are, at no cost.

Every read of a policy, reference or guidance head in the package goes through [`gathered_lm_head`]: the fused
forward and backward, the reference cache's precompute, TGDPO's token rewards and the evaluation (the last two through
the patched forward). [`LMHead`] itself only *refers* to the parameters; nothing outside this module reads them.
"""

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor, Partial

from .._compat import maybe_gather_lm_head_ctx


class LMHead(NamedTuple):
    """What projects hidden states to logits: `logits = logit_scale * (hidden @ weight.T + bias)`, then
    `softcap * tanh(logits / softcap)` when `final_logit_softcapping` is set (Gemma 2).

    The tensors may be sharded parameters: read them inside [`gathered_lm_head`] only."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def device(self) -> torch.device:
        """Where the head lives (a ZeRO-3 shard keeps its device)."""
        return self.weight.device

    @property
    def vocab_size(self) -> int:
        """Rows of the head. Only meaningful on a gathered head (a ZeRO-3 shard has 0 rows)."""
        return self.weight.size(0)


def lm_head_of(model: torch.nn.Module) -> LMHead:
    """The [`LMHead`] of a causal LM, with the logit scaling its config declares. Reads no parameter value."""
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


def _full_tensor(tensor: torch.Tensor | None, trainable: bool) -> torch.Tensor | None:
    """The whole of an FSDP2-sharded tensor (a `DTensor`); any other tensor as it is."""
    if not isinstance(tensor, DTensor):
        return tensor
    if trainable:
        # Each rank's gradient is one data-parallel share: averaged across the mesh on the way back
        return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)
    return tensor.detach().full_tensor()


@contextlib.contextmanager
def gathered_lm_head(head: LMHead | None, *, trainable: bool) -> Iterator[LMHead | None]:
    """Yield `head` with its full parameters, for as long as the context lasts.

    Args:
        head ([`LMHead`] or `None`):
            The head, as [`lm_head_of`] returns it (its tensors may be sharded). `None` yields `None`.
        trainable (`bool`):
            Whether gradients flow to the head through what is computed from it (the policy's head). A reference or
            guidance head is a constant: under FSDP2 it is detached before the gather. Under ZeRO-3 the yielded tensors
            are the parameters themselves either way (gathered in place, so that a backward can gather them again);
            the caller must not give a reference head a gradient.

    Read every size of the head (vocabulary, tiles) inside the context: outside it a ZeRO-3 shard has 0 rows. A
    backward that reads the head again must enter the context again (ZeRO-3 frees the gathered values on exit); under
    FSDP2 the gathered tensors it saved stay valid, and entering again costs nothing.
    """
    if head is None:
        yield None
        return
    # ZeRO-3: all-gather the partitioned parameters in place (a no-op when they are already gathered, e.g. inside the
    # head's own forward or with tied embeddings); without ZeRO-3 a null context
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        yield head._replace(weight=_full_tensor(head.weight, trainable), bias=_full_tensor(head.bias, trainable))


__all__ = ["LMHead", "gathered_lm_head", "lm_head_of"]
