"""`TokenBatch`, the one representation of a batch's labelled tokens, checked by hand on small batches: the padded and
the packed layout of the same sequences give the same tokens in the same order, and its segment sums, per-sequence
matrices and aligned pairs are what they must be (values and gradients)."""

import pytest
import torch
from torch.testing import assert_close

from trl_tokenpref.precompute import DataCollatorForPerTokenColumns
from trl_tokenpref.token_batch import TokenBatch


# Two pairs: TRL's collator docstring example. Sequences (prompt | completion):
#   chosen 0: 1 2 3 | 4 5     chosen 1: 7 8 | 9
#   rejected 0: 1 2 3 | 6     rejected 1: 7 8 | 10 11
EXAMPLES = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
]
LABELS = [4, 5, 9, 6, 10, 11]  # chosen 0, chosen 1, rejected 0, rejected 1, each in reading order
SEQUENCE_INDEX = [0, 0, 1, 2, 3, 3]
COMPLETION_INDEX = [0, 1, 0, 0, 0, 1]


def collate(padding_free: bool) -> dict:
    return DataCollatorForPerTokenColumns(pad_token_id=0, padding_free=padding_free)(EXAMPLES)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_labelled_tokens_of_both_layouts(padding_free):
    batch = collate(padding_free)
    token_batch = TokenBatch.from_inputs(batch)
    assert token_batch.labels.tolist() == LABELS
    assert token_batch.sequence_index.tolist() == SEQUENCE_INDEX
    assert token_batch.completion_index.tolist() == COMPLETION_INDEX
    assert token_batch.token_counts.tolist() == [2, 1, 1, 2]
    assert token_batch.num_pairs == 2 and token_batch.num_tokens == 6
    assert token_batch.is_chosen.tolist() == [True, True, True, False, False, False]
    # 16 real tokens; the padded layout is 4 rows of 5
    assert token_batch.input_tokens.item() == 16 and token_batch.padded_positions.item() == 20
    # The hidden state one position before each label, in the flattened model output
    flat_ids = batch["input_ids"].flatten()
    assert flat_ids[token_batch.hidden_index + 1].tolist() == LABELS
    if padding_free:
        assert batch["input_ids"].shape == (1, 16)
        assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]]
        assert batch["cu_seq_lens"].tolist() == [0, 5, 8, 12, 16]
        assert "attention_mask" not in batch
        assert token_batch.hidden_index.tolist() == [2, 3, 6, 10, 13, 14]
    else:
        assert token_batch.hidden_index.tolist() == [2, 3, 6, 12, 16, 17]


def test_hidden_states_of_picks_the_predicting_position():
    """Each labelled token's hidden state is the model output one position before it, whatever the layout."""
    for padding_free in (False, True):
        batch = collate(padding_free)
        token_batch = TokenBatch.from_inputs(batch)
        # A fake model output whose hidden state at each position is the token id *after* it
        next_ids = torch.roll(batch["input_ids"], shifts=-1, dims=1).float().unsqueeze(-1)
        assert token_batch.hidden_states_of(next_ids).squeeze(-1).tolist() == LABELS


def test_sums_splits_and_gradients():
    token_batch = TokenBatch.from_inputs(collate(padding_free=True))
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
    sums = token_batch.sequence_sums(values)
    assert sums.tolist() == [3.0, 3.0, 4.0, 11.0]
    chosen, rejected = token_batch.split(sums)
    assert chosen.tolist() == [3.0, 3.0] and rejected.tolist() == [4.0, 11.0]
    (sums * torch.tensor([1.0, 10.0, 100.0, 1000.0])).sum().backward()
    assert values.grad.tolist() == [1.0, 1.0, 10.0, 100.0, 1000.0, 1000.0]
    # Float64 stays float64; lower precisions are summed in float32
    assert token_batch.sequence_sums(values.detach().double()).dtype == torch.float64
    assert token_batch.sequence_sums(values.detach().bfloat16()).dtype == torch.float32


def test_per_sequence_and_aligned_pairs_by_hand():
    token_batch = TokenBatch.from_inputs(collate(padding_free=False))
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
    matrix, mask = token_batch.per_sequence(values)
    assert matrix.tolist() == [[1.0, 2.0], [3.0, 0.0], [4.0, 0.0], [5.0, 6.0]]
    assert mask.tolist() == [[True, True], [True, False], [True, False], [True, True]]
    chosen, rejected, pair_mask = token_batch.aligned_pairs(values)
    # Pair 0: chosen (1, 2) against rejected (4,): one aligned token; pair 1: (3,) against (5, 6): one
    assert chosen.tolist() == [[1.0, 2.0], [3.0, 0.0]]
    assert rejected.tolist() == [[4.0, 0.0], [5.0, 6.0]]
    assert pair_mask.tolist() == [[True, False], [True, False]]
    # The gradient flows back to the flat values, and only through the slots that are read
    (chosen * pair_mask).sum().backward()
    assert values.grad.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # k values per token (the reference cache's top-k columns) keep their trailing dimension
    wide, _ = token_batch.per_sequence(torch.arange(12.0).view(6, 2))
    assert wide.shape == (4, 2, 2) and wide[3, 1].tolist() == [10.0, 11.0]


def test_sequences_without_labelled_tokens():
    """A completion cut to nothing, or a completion at position 0 (no prompt: its first token has no label), leaves
    a sequence with no labelled token: it sums to 0 and its aligned slots are masked."""
    input_ids = torch.tensor([[5, 6, 0], [7, 8, 9]])
    completion_mask = torch.tensor([[1, 0, 0], [0, 0, 1]])  # chosen: completion at position 0 only
    token_batch = TokenBatch.from_padded(input_ids, completion_mask)
    assert token_batch.token_counts.tolist() == [0, 1]
    values = torch.tensor([2.5])
    assert token_batch.sequence_sums(values).tolist() == [0.0, 2.5]
    chosen, rejected, pair_mask = token_batch.aligned_pairs(values)
    assert chosen.tolist() == [[0.0]] and rejected.tolist() == [[2.5]] and not pair_mask.any()
    empty = TokenBatch.from_padded(input_ids, torch.zeros_like(completion_mask))
    matrix, mask = empty.per_sequence(torch.zeros(0))
    assert matrix.shape == (2, 1) and not mask.any()


def test_an_odd_number_of_sequences_is_refused():
    with pytest.raises(ValueError, match=r"2B sequences \(\[chosen; rejected\]\), got 3"):
        TokenBatch.from_padded(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4))


def test_per_token_columns_collate_flat_in_token_order():
    """The per-token columns come flat, chosen then rejected, each row's kept tokens in order: the order of the
    token batch, so they line up with the statistics without any placement; the same padded or packed."""
    examples = [dict(example) for example in EXAMPLES]
    for example in examples:
        for side in ("chosen", "rejected"):
            ids = example[f"{side}_ids"]
            example[f"{side}_token_rewards"] = [float(i) / 10 for i in ids]
    columns = ("chosen_token_rewards", "rejected_token_rewards")
    for padding_free in (False, True):
        batch = DataCollatorForPerTokenColumns(pad_token_id=0, per_token_columns=columns, padding_free=padding_free)(
            examples
        )
        token_batch = TokenBatch.from_inputs(batch)
        flat = torch.cat([batch[column] for column in columns])
        assert_close(flat, token_batch.labels.float() / 10)
