"""One token batch: the labelled tokens of a preference batch, flat, whatever layout the model ran on.

A preference batch of B pairs is 2B sequences: sequence i < B is the chosen completion of pair i, sequence B + i its
rejected completion (DPOTrainer's `[chosen; rejected]` order). The model runs on them either

* **padded**, as `DataCollatorForPreference` lays them out: `input_ids [2B, L_max]`, one sequence per row; or
* **packed** (`padding_free=True`): `input_ids [1, T]`, the 2B sequences one after another (T = Σ L_i, no padding),
  with `position_ids` restarting at 0 at each sequence's first token and `cu_seq_lens` the sequences' boundaries.

Either way, what the losses need is the same: the tokens that carry a label (the completion tokens, each predicted by
the hidden state one position before it), with which sequence each belongs to. [`TokenBatch`] holds exactly that, in
one order (sequence by sequence, each in reading order), and knows where each token's predicting hidden state sits in
the model's output. Every per-token value (log-probs, KL, token rewards, the reference cache, TBPO's baselines) is a
flat `[N]` tensor in that order, and the losses read it through the batch's methods:

* [`TokenBatch.sequence_sums`]: per-sequence sums `S(y) = Σ_t v_t` (a segment sum), `[2B]`;
* [`TokenBatch.split`]: `[2B] → ([B] chosen, [B] rejected)`;
* [`TokenBatch.per_sequence`]: the values of each sequence by completion index, `[2B, K]` with its mask (TGDPO);
* [`TokenBatch.aligned_pairs`]: token t of each chosen completion against token t of its rejected one, for
  t < min(n_w, n_l) (TBPO: "align by completion index, not by column", docs/algorithms.md §0, §3.5).

So padded and packed batches go through the same loss code, and no per-token value is ever scattered back to a padded
shape. The per-token dataset columns (reference cache, TGDPO's columns) are collated in the same flat order
(`precompute.DataCollatorForPerTokenColumns`), so they line up with the statistics without any placement.
"""

from typing import NamedTuple

import torch
from torch import Tensor


class TokenBatch(NamedTuple):
    """The labelled tokens of a batch of `num_pairs` preference pairs, flat (N tokens), in sequence order.

    A `NamedTuple` of tensors, so that it travels through `model(...)` under DDP, DeepSpeed and FSDP (which rebuild
    tuples of tensors when they move or cast inputs).
    """

    labels: Tensor  # [N] long: y_t, the token each labelled position predicts
    sequence_index: Tensor  # [N] long in [0, 2B): the sequence of each token (chosen i: i; rejected i: B + i)
    completion_index: Tensor  # [N] long: t, the token's index among its sequence's labelled tokens (0, 1, ...)
    hidden_index: Tensor  # [N] long: where the hidden state predicting it sits in the flattened model output
    token_counts: Tensor  # [2B] long: labelled tokens per sequence
    input_tokens: Tensor  # () long: real (non-padding) tokens the batch holds, prompts included
    padded_positions: Tensor  # () long: positions of the padded [2B, L_max] layout of the same sequences

    # -------------------------------------------------------------------------------------------------- builders

    @classmethod
    def from_padded(cls, input_ids: Tensor, completion_mask: Tensor, attention_mask: Tensor | None = None):
        """From a padded batch `[2B, L]` (`DataCollatorForPreference`'s layout). The hidden state at `[r, c − 1]`
        predicts the token at `[r, c]`, so a completion token in column 0 (an empty prompt) carries no label."""
        rows, length = input_ids.shape
        labelled = completion_mask.bool().clone()
        labelled[:, 0] = False
        row, column = labelled.nonzero(as_tuple=True)  # row-major: sequence by sequence, in reading order
        input_tokens = attention_mask.sum() if attention_mask is not None else input_ids.new_tensor(rows * length)
        return cls._build(
            labels=input_ids[row, column],
            sequence_index=row,
            hidden_index=row * length + column - 1,
            num_sequences=rows,
            input_tokens=input_tokens,
            padded_positions=input_ids.new_tensor(rows * length),
        )

    @classmethod
    def from_packed(cls, input_ids: Tensor, completion_mask: Tensor, position_ids: Tensor, cu_seq_lens: Tensor):
        """From a packed batch `[1, T]` (`padding_free=True`): `cu_seq_lens [2B + 1]` are the sequences' boundaries
        (sequence s holds positions `cu_seq_lens[s]` to `cu_seq_lens[s + 1] − 1`). The hidden state at position
        p − 1 predicts the token at p, except across a boundary: a sequence's first token (position id 0) has no
        label."""
        input_ids, completion_mask, position_ids = input_ids.view(-1), completion_mask.view(-1), position_ids.view(-1)
        boundaries = cu_seq_lens.to(device=input_ids.device, dtype=torch.long)
        labelled = completion_mask.bool() & (position_ids > 0)
        position = labelled.nonzero().squeeze(1)
        sequence_lengths = boundaries[1:] - boundaries[:-1]
        return cls._build(
            labels=input_ids[position],
            sequence_index=torch.searchsorted(boundaries[1:], position, right=True),
            hidden_index=position - 1,
            num_sequences=sequence_lengths.numel(),
            input_tokens=input_ids.new_tensor(input_ids.numel()),
            padded_positions=sequence_lengths.numel() * sequence_lengths.max(),
        )

    @classmethod
    def from_inputs(cls, inputs: dict):
        """From a collated batch, padded or packed (a packed one carries `cu_seq_lens`)."""
        if "cu_seq_lens" in inputs:
            return cls.from_packed(
                inputs["input_ids"], inputs["completion_mask"], inputs["position_ids"], inputs["cu_seq_lens"]
            )
        return cls.from_padded(inputs["input_ids"], inputs["completion_mask"], inputs.get("attention_mask"))

    @classmethod
    def _build(cls, *, labels, sequence_index, hidden_index, num_sequences, input_tokens, padded_positions):
        if num_sequences % 2:
            raise ValueError(
                f"A preference batch holds 2B sequences ([chosen; rejected]), got {num_sequences}: the collator must "
                "return every pair's chosen and rejected completions."
            )
        token_counts = torch.bincount(sequence_index, minlength=num_sequences)
        first_token = torch.cumsum(token_counts, 0) - token_counts  # each sequence's first index in the flat order
        completion_index = torch.arange(labels.numel(), device=labels.device) - first_token[sequence_index]
        return cls(
            labels, sequence_index, completion_index, hidden_index, token_counts, input_tokens, padded_positions
        )

    # ---------------------------------------------------------------------------------------------------- shapes

    @property
    def num_pairs(self) -> int:
        return self.token_counts.numel() // 2

    @property
    def num_tokens(self) -> int:
        return self.labels.numel()

    @property
    def is_chosen(self) -> Tensor:
        """`[N]` bool: whether each token belongs to a chosen completion."""
        return self.sequence_index < self.num_pairs

    # ---------------------------------------------------------------------------------------- reading the model

    def hidden_states_of(self, last_hidden_state: Tensor) -> Tensor:
        """`[N, H]`: the hidden state that predicts each labelled token, from the model's `[rows, seq, H]` output."""
        return last_hidden_state.flatten(0, 1)[self.hidden_index.to(last_hidden_state.device)]

    # ----------------------------------------------------------------------------------------- reading the values

    def sequence_sums(self, values: Tensor) -> Tensor:
        """`[2B]`: `S(y) = Σ_t v_t` over each sequence's labelled tokens, in at least float32 (a segment sum; a
        sequence without a labelled token sums to 0). Differentiable."""
        dtype = torch.promote_types(values.dtype, torch.float32)
        sums = values.new_zeros(self.token_counts.numel(), dtype=dtype)
        return sums.index_add(0, self.sequence_index.to(values.device), values.to(dtype))

    @staticmethod
    def split(values: Tensor) -> tuple[Tensor, Tensor]:
        """`([B] chosen, [B] rejected)` of per-sequence values `[2B, ...]`."""
        return values.chunk(2, dim=0)

    def per_sequence(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """The values of each sequence by completion index: `([2B, K, ...] values, [2B, K] mask)`, with `K` the
        largest token count (at least 1); unused slots hold 0 and `False`. Gradients flow back to the flat values."""
        width = max(int(self.token_counts.max()) if self.token_counts.numel() else 0, 1)
        index = (self.sequence_index.to(values.device), self.completion_index.to(values.device))
        matrix = values.new_zeros((self.token_counts.numel(), width, *values.shape[1:]))
        matrix = matrix.index_put(index, values)
        mask = torch.arange(width, device=values.device) < self.token_counts.to(values.device)[:, None]
        return matrix, mask

    def aligned_pairs(self, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Chosen and rejected values aligned by completion index, `([B, K] chosen, [B, K] rejected, [B, K] mask)`:
        column t holds completion token t of either response, and the mask is `t < min(n_w, n_l)` (docs/algorithms.md
        §0, §3.5)."""
        matrix, _ = self.per_sequence(values)
        chosen, rejected = self.split(matrix)
        chosen_counts, rejected_counts = self.split(self.token_counts.to(values.device))
        pair_mask = (
            torch.arange(matrix.size(1), device=values.device) < torch.minimum(chosen_counts, rejected_counts)[:, None]
        )
        return chosen, rejected, pair_mask


__all__ = ["TokenBatch"]
