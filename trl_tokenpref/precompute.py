"""Per-token values computed once before training and stored as dataset columns: the reference cache.

DPOTrainer's `precompute_ref_log_probs=True` stores one number per completion (the summed reference log-prob). The
token-level losses weight or pair tokens, so they need one value per completion *token*: [`add_per_token_columns`]
runs a scoring function over a tokenized dataset, batch by batch, with the trainer's collator, and stores its per-token
outputs as list columns (one value per token of `chosen_ids` / `rejected_ids`). It is the one precompute of the package:

* TGDPO's trainer stores the reference's per-token log-probs (`ref_chosen_token_logps` / `ref_rejected_token_logps`)
  and, from a guidance model, the token rewards;
* `scripts/compute_token_rewards.py` stores the token rewards without building a trainer.

As in TRL 1.16's `_precompute_ref_logps`: the columns of a dataset backed by cache files are written to a cache file
whose fingerprint hashes the dataset and everything the values depend on (the models, `max_length`,
`truncation_mode`, ...), so a re-run reuses them and a change recomputes them; every process reads the file that the
main process wrote. The values are gathered across processes, so each row is computed once. An in-memory dataset has
no cache directory that every process can read (DPOTrainer's precompute fails there under several processes): each
process then builds the columns in memory from the gathered values.

Tokens that `max_length` truncation removes are never scored and hold `None` (they are never read either).
"""

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, tqdm
from datasets import Dataset, Features, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable
from torch.utils.data import DataLoader

from ._compat import DataCollatorForPreference, dataset_cache_file, dataset_fingerprint
from .checks import scored_completion_range
from .packing import PACKED_BATCH_KEY
from .token_batch import TokenBatch


# The reference's per-token log-probabilities log π_ref(y_t|s_t), stored by `precompute_ref_log_probs=True`
REF_TOKEN_LOGPS_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")
# The reference cache of the KL methods (docs/algorithms.md §9): per token, the reference's k most likely token ids and
# their log-probs (k values each, flattened: n·k values per row), and the log of the mass of every other token
REF_TOPK_IDS_COLUMNS = ("ref_chosen_topk_ids", "ref_rejected_topk_ids")
REF_TOPK_LOGPS_COLUMNS = ("ref_chosen_topk_logps", "ref_rejected_topk_logps")
REF_TAIL_COLUMNS = ("ref_chosen_tail_logmass", "ref_rejected_tail_logmass")
REF_CACHE_COLUMNS = REF_TOKEN_LOGPS_COLUMNS + REF_TOPK_IDS_COLUMNS + REF_TOPK_LOGPS_COLUMNS + REF_TAIL_COLUMNS
# Columns with k values per token: collated as `[B, L-1, k]`
VECTOR_COLUMNS = REF_TOPK_IDS_COLUMNS + REF_TOPK_LOGPS_COLUMNS


def cache_bytes_per_token(k: int) -> int:
    """Bytes the reference cache stores per completion token: the label log-prob, k int32 ids, k float32 log-probs
    and the bucket's log-mass (float32 each), plus Arrow's list offsets (4 lists of int64 offsets per row, negligible
    per token)."""
    return 4 + 4 * k + 4 * k + 4


# Part of every cache key: bump when the stored values change meaning
PRECOMPUTE_VERSION = "per-token-values-1"

# A scoring function: (model, collated batch) -> {(chosen column, rejected column): values [N] or [N, w]}, the values
# of the batch's labelled tokens in `TokenBatch` order (padded or packed batch alike); w values per token are stored
# flattened, w per token in a row
ScoreBatch = Callable[[torch.nn.Module, dict], dict[tuple[str, str], torch.Tensor]]


@dataclass
class DataCollatorForPerTokenColumns(DataCollatorForPreference):
    """
    [`~trl.trainer.dpo_trainer.DataCollatorForPreference`] for the token-level trainers: it also collates the
    per-token columns the examples carry, and with `padding_free=True` packs the sequences into one row.

    Each column of `per_token_columns` holds, per row, `w` values per token of `chosen_ids` / `rejected_ids` (w = 1,
    or k for the reference cache's top-k columns). It is returned flat, in the order of the batch's labelled tokens
    ([`~trl_tokenpref.token_batch.TokenBatch`]: row by row, each completion's tokens in reading order): a tensor of shape
    `(n,)` (or `(n, k)` for the top-k columns), n the number of completion tokens of that side that training reads.
    Values are truncated exactly as the token ids are (`max_length`, `truncation_mode`), so a truncated completion
    keeps the values of the tokens it keeps; a value may be missing (`None`) only for a token that the truncation
    removes. Token ids come back as int64, everything else as float32. Padded or packed, the columns are the same.

    Args:
        per_token_columns (`tuple[str, ...]`):
            The per-token columns to collate when the examples have them.
        padding_free (`bool`, *optional*, defaults to `False`):
            Pack the batch: `input_ids`, `completion_mask` and `position_ids` of shape `(1, T)`, the 2B sequences one
            after another with no padding (T = Σ L_i; `position_ids` restart at 0 at each sequence), and
            `cu_seq_lens` `(2B + 1,)`, the sequences' boundaries (`packing.py`). No `attention_mask`: the trainer
            gives the model the one its attention implementation expects.
    """

    per_token_columns: tuple[str, ...] = REF_CACHE_COLUMNS
    padding_free: bool = False

    def torch_call(self, examples: list[dict]) -> dict:
        output = super().torch_call(examples)
        if self.padding_free:
            output = self._pack(output)
        for column in self.per_token_columns:
            if column in examples[0]:
                output[column] = self._flat(examples, column)
        return output

    @staticmethod
    def _pack(padded: dict) -> dict:
        """The padded batch without its padding (right padding: each row's real tokens are a prefix of it)."""
        real = padded["attention_mask"].bool()
        lengths = real.sum(dim=1)
        packed = {
            key: value
            for key, value in padded.items()
            if key not in ("input_ids", "attention_mask", "completion_mask")
        }
        packed["input_ids"] = padded["input_ids"][real].unsqueeze(0)
        packed["completion_mask"] = padded["completion_mask"][real].unsqueeze(0)
        packed["position_ids"] = torch.cat([torch.arange(int(length)) for length in lengths]).unsqueeze(0)
        packed[PACKED_BATCH_KEY] = F.pad(torch.cumsum(lengths, dim=0), (1, 0)).to(torch.int32)
        return packed

    def _flat(self, examples: list[dict], column: str) -> torch.Tensor:
        side = "chosen" if "chosen" in column else "rejected"
        is_ids = column in REF_TOPK_IDS_COLUMNS
        dtype = torch.long if is_ids else torch.float32
        parts = []
        for i, example in enumerate(examples):
            values, num_tokens = example[column], len(example[f"{side}_ids"])
            width = len(values) // num_tokens if values is not None and num_tokens else 1
            if values is None or len(values) != width * num_tokens or width < 1:
                raise ValueError(
                    f"Example {i} of this batch has {'no' if values is None else len(values)} values in `{column}` "
                    f"but {num_tokens} tokens in `{side}_ids`: the column must hold the same number of values per "
                    "completion token, as the trainer tokenizes it. Recompute it with the training tokenizer, "
                    "`max_length` and `truncation_mode` (token rewards: `scripts/compute_token_rewards.py`)."
                )
            start, stop, _ = scored_completion_range(
                len(example["prompt_ids"]), num_tokens, self.max_length, self.truncation_mode
            )
            read = values[start * width : max(start, stop) * width]
            # Converted first, checked on the tensor: per-value Python checks were 80% of the collator's time
            try:
                kept = torch.tensor(read, dtype=dtype)
            except (TypeError, RuntimeError):  # a None among the values
                kept = None
            valid = kept is not None
            if valid and not is_ids:
                finite = torch.isfinite(kept)
                if column in REF_TAIL_COLUMNS:  # the bucket's log-mass is -inf where K is the whole vocabulary
                    finite |= kept == -math.inf
                valid = bool(finite.all())
            if not valid:
                raise ValueError(
                    f"Example {i} of this batch has a missing or non-finite value in `{column}` at a completion token "
                    "that training reads. Values must be finite; recompute them using the training `max_length` and "
                    "`truncation_mode`."
                )
            parts.append(kept.view(-1, width) if column in VECTOR_COLUMNS else kept)
        return torch.cat(parts)


def with_per_token_collator(collator, collator_class=DataCollatorForPerTokenColumns, padding_free: bool = False):
    """DPOTrainer's default collator (or one of ours) as `collator_class` with the same settings and `padding_free`;
    any other collator unchanged (it must collate the per-token columns itself, flat)."""
    if type(collator) is DataCollatorForPreference or (
        isinstance(collator, DataCollatorForPerTokenColumns) and issubclass(collator_class, type(collator))
    ):
        settings = {f.name: getattr(collator, f.name) for f in fields(DataCollatorForPreference)}
        return collator_class(**settings, padding_free=padding_free)
    if isinstance(collator, DataCollatorForPerTokenColumns) and collator.padding_free != padding_free:
        return dataclasses.replace(collator, padding_free=padding_free)  # a subclass of ours: the config decides
    return collator


def check_map_style(dataset) -> None:
    """Refuse a streamed dataset, with DPOTrainer's message: values are stored as columns of a map-style dataset."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style Dataset or "
            "set `precompute_ref_log_probs=False`."
        )


def add_per_token_columns(
    dataset: Dataset,
    score_batch: ScoreBatch,
    *,
    model: torch.nn.Module,
    columns: list[tuple[str, str]],
    cache_key: tuple,
    accelerator,
    collator,
    batch_size: int,
    max_length: int | None,
    truncation_mode: str,
    name: str,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Dataset:
    """Return `dataset` with one list column per name in `columns`, holding `score_batch`'s value at every completion
    token that training reads (`None` at the tokens that truncation removes).

    Args:
        dataset: tokenized (`prompt_ids`, `chosen_ids`, `rejected_ids`) map-style dataset. Existing columns of the same
            names (e.g. from an earlier precompute) are replaced.
        score_batch: `(model, batch) -> {(chosen_column, rejected_column): [N] or [N, w] tensor}` (the batch's labelled
            tokens, in `TokenBatch` order), run without gradient.
        model: passed to `score_batch` (the reference, or an engine wrapping it).
        columns: the `(chosen_column, rejected_column)` pairs `score_batch` returns.
        cache_key: everything besides the dataset that the values depend on (model hashes, truncation, β, ...).
        accelerator, collator, batch_size, num_workers, pin_memory: how batches are built and spread over processes.
        max_length, truncation_mode: the collator's truncation, to place each value at its token.
        name: the dataset's name in progress bars.
    """
    check_map_style(dataset)
    flat_columns = [column for pair in columns for column in pair]
    stale = [column for column in flat_columns if column in dataset.column_names]
    if stale:
        dataset = dataset.remove_columns(stale)

    def compute() -> pa.Table:
        return _compute_per_token_table(
            dataset,
            score_batch,
            model=model,
            columns=columns,
            accelerator=accelerator,
            collator=collator,
            batch_size=batch_size,
            max_length=max_length,
            truncation_mode=truncation_mode,
            name=name,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    if not dataset.cache_files:
        table = compute()
        return concatenate_datasets([dataset, Dataset(InMemoryTable(table))], axis=1)

    # Rank 0's key for every process: under ZeRO-3 a model hash may differ between ranks
    fingerprint = [Hasher.hash((PRECOMPUTE_VERSION, dataset_fingerprint(dataset), flat_columns, *cache_key))]
    broadcast_object_list(fingerprint, from_process=0)
    fingerprint = fingerprint[0]
    cache_file = dataset_cache_file(dataset, fingerprint)
    if not os.path.exists(cache_file):
        table = compute()
        features = Features.from_arrow_schema(table.schema)
        if accelerator.is_main_process:
            dataset.with_format("arrow").map(
                lambda _, indices: table.slice(indices[0], len(indices)),
                with_indices=True,
                batched=True,
                remove_columns=dataset.column_names,
                features=features,
                new_fingerprint=fingerprint,
                cache_file_name=cache_file,
                desc=f"Caching per-token values for {name} dataset",
            )
        accelerator.wait_for_everyone()
    columns_dataset = Dataset.from_file(cache_file)
    check_per_token_columns(concatenate_datasets([dataset, columns_dataset], axis=1), flat_columns, name)
    return concatenate_datasets([dataset, columns_dataset], axis=1)


def check_per_token_columns(dataset: Dataset, columns: list[str], name: str) -> None:
    """Refuse a dataset whose per-token columns do not match its tokenized completions (e.g. a cache file written for
    other rows): every row must hold a whole number of values per completion token, the same for every row, naming
    the first row that does not."""
    table = dataset.select_columns(["chosen_ids", "rejected_ids", *columns]).with_format("arrow")[:]
    for column in columns:
        side = "chosen" if "chosen" in column else "rejected"
        num_tokens = pc.list_value_length(table[f"{side}_ids"]).to_numpy().astype(np.int64)
        num_values = pc.list_value_length(table[column]).fill_null(-1).to_numpy().astype(np.int64)
        nonempty = num_tokens > 0
        width = num_values[nonempty][0] // num_tokens[nonempty][0] if nonempty.any() else 1
        bad = np.flatnonzero(num_values != width * num_tokens)
        if bad.size:
            row = int(bad[0])
            raise ValueError(
                f"Row {row} of the {name} dataset: `{column}` holds {num_values[row]} values, but its tokenized {side} "
                f"completion has {num_tokens[row]} tokens ({width} values per token expected). The precomputed "
                "columns do not belong to these rows: delete the dataset's cache files (`dataset.cleanup_cache_files()`) "
                "or remove the columns, and precompute again."
            )


def _compute_per_token_table(
    dataset, score_batch, *, model, columns, accelerator, collator, batch_size, max_length, truncation_mode, name,
    num_workers, pin_memory,
) -> pa.Table:  # fmt: skip
    """Run `score_batch` over `dataset`; return an Arrow table with one list per row and column."""
    dataloader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory and accelerator.device.type != "cpu",  # pinning needs an accelerator
        shuffle=False,
    )
    dataloader = accelerator.prepare(dataloader)
    kept = {column: [] for pair in columns for column in pair}  # per batch: the values of the scored tokens
    widths = {}  # values per token of each pair of columns
    kept_counts = {"chosen": [], "rejected": []}  # per batch: scored completion tokens of each row
    for batch in tqdm(
        iterable=dataloader,
        desc=f"Computing per-token values for {name} dataset",
        disable=bool(os.environ.get("TQDM_DISABLE", "")),
    ):
        with torch.no_grad(), accelerator.autocast():
            values = score_batch(model, batch)
        # Each sequence's values by completion index, `[2B, K(, w)]`, split [chosen; rejected] before gathering:
        # `gather_for_metrics` trims the last batch to the number of remaining *pairs*, so a [2B, ...] tensor would
        # lose its rejected rows. Rows of different processes have different K: padded first (the counts say which
        # values are real). The same for a padded and a packed batch.
        token_batch = TokenBatch.from_inputs(batch)
        gathered = {}
        for side, counts in zip(("chosen", "rejected"), token_batch.split(token_batch.token_counts), strict=True):
            gathered["counts", side] = accelerator.gather_for_metrics(counts).cpu()
        for pair, value in values.items():
            matrix, _ = token_batch.per_sequence(value)
            for side, half in zip(("chosen", "rejected"), token_batch.split(matrix), strict=True):
                half = accelerator.gather_for_metrics(accelerator.pad_across_processes(half, dim=1))
                gathered[pair, side] = half.cpu()
        for side_index, side in enumerate(("chosen", "rejected")):
            counts = gathered["counts", side]
            kept_counts[side].append(counts.numpy())
            for pair in columns:
                matrix = gathered[pair, side]
                mask = torch.arange(matrix.size(1)) < counts[:, None]
                values = matrix[mask]  # [n] or [n, w]
                widths[pair] = 1 if values.dim() == 1 else values.size(1)
                integral = not (values.is_floating_point() or values.is_complex())
                values = values.to(torch.int32) if integral else values.float()
                kept[pair[side_index]].append(values.reshape(-1).numpy())

    lengths = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
    prompt_lens = pc.list_value_length(lengths["prompt_ids"]).to_numpy()
    arrays = {}
    for pair in columns:
        for side, column in zip(("chosen", "rejected"), pair, strict=True):
            num_tokens = pc.list_value_length(lengths[f"{side}_ids"]).to_numpy()
            arrays[column] = _full_length_lists(
                np.concatenate(kept[column]),
                np.concatenate(kept_counts[side]),
                prompt_lens,
                num_tokens,
                max_length,
                truncation_mode,
                widths.get(pair, 1),
            )
    return pa.table(arrays)


def _full_length_lists(
    kept_values, kept_counts, prompt_lens, num_tokens, max_length, truncation_mode, width: int = 1
) -> pa.LargeListArray:
    """One list per row with `width` values per completion token: the scored tokens' values, and None for the tokens
    that truncation removed (the last ones under `keep_start`, the first ones under `keep_end`)."""
    offsets = np.concatenate([[0], np.cumsum(num_tokens * width)]).astype(np.int64)
    values = np.zeros(offsets[-1], dtype=kept_values.dtype)
    valid = np.zeros(offsets[-1], dtype=bool)
    kept_offsets = np.concatenate([[0], np.cumsum(kept_counts * width)])
    for row, count in enumerate(kept_counts):
        start, stop, _ = scored_completion_range(
            int(prompt_lens[row]), int(num_tokens[row]), max_length, truncation_mode
        )
        stop = max(start, stop)
        if stop - start != count:
            raise RuntimeError(
                f"Row {row}: {count} scored completion tokens, expected {stop - start}. The precompute batches and the "
                "dataset are misaligned; please report this issue."
            )
        first, last = offsets[row] + start * width, offsets[row] + stop * width
        values[first:last] = kept_values[kept_offsets[row] : kept_offsets[row + 1]]
        valid[first:last] = True
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, mask=~valid))
