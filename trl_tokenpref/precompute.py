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

Unlike DPOTrainer's, the cache file is written under a temporary name and renamed once complete (a killed precompute
leaves no cache file, and its temporary file is removed by the next precompute on that host), and it is checked when
it is read: readable, one row per row, one value per token, values in range ([`reference_cache_problem`]). A file
that fails is named in a warning, deleted and computed again.

Tokens that `max_length` truncation removes are never scored and hold `None` (they are never read either).
"""

import contextlib
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
from ._logging import get_logger
from .checks import scored_completion_range
from .files import atomic_write, remove_orphan_temporaries
from .packing import PACKED_BATCH_KEY
from .token_batch import TokenBatch


logger = get_logger(__name__)


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
    vocab_size: int | None = None,
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
        vocab_size: the reference's vocabulary size, for the range check of stored top-k ids.

    A dataset backed by cache files gets its columns from a cache file, reused by a later run with the same key: the
    file is checked when it is read (readable, one value per token, values in range: [`reference_cache_problem`]),
    and one that fails is deleted, named in a warning, and computed again. It is written atomically.
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

    def computed_and_checked() -> pa.Table:
        table = compute()
        problem = reference_cache_problem(table, vocab_size)
        if problem is not None:  # the values come from `log_softmax` and `topk`: out of range only through a bug
            raise RuntimeError(
                f"The per-token values computed for the {name} dataset are wrong: {problem}. Please report this issue."
            )
        return table

    if not dataset.cache_files:
        return concatenate_datasets([dataset, Dataset(InMemoryTable(computed_and_checked()))], axis=1)

    # Rank 0's key for every process: under ZeRO-3 a model hash may differ between ranks
    fingerprint = [Hasher.hash((PRECOMPUTE_VERSION, dataset_fingerprint(dataset), flat_columns, *cache_key))]
    broadcast_object_list(fingerprint, from_process=0)
    fingerprint = fingerprint[0]
    cache_file = dataset_cache_file(dataset, fingerprint)
    # The main process decides, for every process, whether the cache file can be used: it reads the whole file
    reuse = [False]
    if accelerator.is_main_process:
        remove_orphan_temporaries(os.path.dirname(cache_file))  # of a precompute killed while it wrote its file
        reuse[0] = _cache_file_is_usable(cache_file, dataset, flat_columns, name, vocab_size)
    broadcast_object_list(reuse, from_process=0)
    if not reuse[0]:
        table = computed_and_checked()
        if accelerator.is_main_process:
            _write_cache_file(table, cache_file)
        accelerator.wait_for_everyone()
    return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)


def _cache_file_is_usable(cache_file: str, dataset: Dataset, columns: list[str], name: str, vocab_size) -> bool:
    """Whether the cache file exists and holds what the precompute would write: readable, one row per row of
    `dataset`, the columns, one value per token, in range ([`reference_cache_problem`]). A file that does not (a
    truncated file, values out of range) is deleted, with a warning naming it, and computed again."""
    if not os.path.exists(cache_file):
        return False
    try:
        cached = Dataset.from_file(cache_file)
        absent = [column for column in columns if column not in cached.column_names]
        if absent:
            problem = f"it has no column {absent}"
        elif cached.num_rows != len(dataset):
            problem = f"it holds {cached.num_rows} rows for a dataset of {len(dataset)}"
        else:
            check_per_token_columns(concatenate_datasets([dataset, cached], axis=1), columns, name)
            problem = reference_cache_problem(cached.data.table, vocab_size)
    except (OSError, pa.ArrowException, ValueError) as error:  # a truncated or garbled file
        problem = f"{type(error).__name__}: {error}"
    if problem is None:
        return True
    logger.warning(
        f"The cache file {cache_file} of the {name} dataset's per-token values cannot be used ({problem}): it is "
        "deleted and computed again."
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cache_file)
    return False


def _write_cache_file(table: pa.Table, cache_file: str) -> None:
    """Write the columns as the Arrow stream file `Dataset.from_file` reads, under a temporary name renamed over
    `cache_file` once complete (`files.atomic_write`): a precompute killed while it writes leaves no cache file that
    the next run would read, only a temporary one that the next precompute removes."""
    features = Features.from_arrow_schema(table.schema)
    table = table.replace_schema_metadata(features.arrow_schema.metadata)
    with atomic_write(cache_file, "wb") as file, pa.ipc.new_stream(file, table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)


# Log-probabilities are <= 0; the stored ones are rounded float32 (or bf16/fp16 when the model computes in it)
_LOG_PROB_SLACK = 1e-3
# The top-k tokens and the bucket hold the whole next-token distribution: |log(mass)| at most this
_MASS_SLACK = 0.05
_CHECK_BATCH_ROWS = 10_000


def reference_cache_problem(table: pa.Table, vocab_size: int | None = None) -> str | None:
    """The first value of the reference cache in `table` that cannot be what the reference computed, as a message
    naming the column, the row and the value (None when there is none). Checks the columns of `REF_CACHE_COLUMNS` that
    `table` holds, at every stored (non-null) token:

    * top-k ids are in `[0, vocab_size)` (when `vocab_size` is given) and not negative;
    * log-probabilities (the label's, the top k's) are finite and <= 0, the bucket's log-mass is <= 0 (or -inf, an
      empty bucket);
    * the top k and the bucket hold the whole distribution: log(Σ_top-k p + bucket mass) is 0 (within 5%).

    Vectorised over Arrow buffers, `_CHECK_BATCH_ROWS` rows at a time.
    """
    for start in range(0, table.num_rows, _CHECK_BATCH_ROWS):
        batch = table.slice(start, _CHECK_BATCH_ROWS)
        for column in batch.column_names:
            if column not in REF_CACHE_COLUMNS:
                continue
            values = batch[column].combine_chunks()
            flat = pc.list_flatten(values)
            stored = pc.drop_null(flat).to_numpy(zero_copy_only=False)
            if column in REF_TOPK_IDS_COLUMNS:
                bad = (stored < 0) | ((stored >= vocab_size) if vocab_size is not None else False)
                expected = f"token ids in [0, {vocab_size})" if vocab_size is not None else "token ids >= 0"
            elif column in REF_TAIL_COLUMNS:
                bad = np.isnan(stored) | (stored > _LOG_PROB_SLACK)
                expected = "log-masses <= 0"
            else:
                bad = ~np.isfinite(stored) | (stored > _LOG_PROB_SLACK)
                expected = "finite log-probabilities <= 0"
            if bad.any():
                return _value_problem(values, flat, np.flatnonzero(bad)[0], start, column, expected)
        for topk_column, tail_column in zip(REF_TOPK_LOGPS_COLUMNS, REF_TAIL_COLUMNS, strict=True):
            if topk_column in batch.column_names and tail_column in batch.column_names:
                problem = _mass_problem(batch, topk_column, tail_column, start)
                if problem is not None:
                    return problem
    return None


def _value_problem(values, flat, stored_index: int, start: int, column: str, expected: str) -> str:
    """'row r, token t: v' for the `stored_index`-th non-null value of a list column."""
    kept = np.flatnonzero(~flat.is_null().to_numpy(zero_copy_only=False))[stored_index]
    parents = pc.list_parent_indices(values).to_numpy()
    row = int(parents[kept])
    first_of_row = int(np.searchsorted(parents, row))
    value = flat[int(kept)].as_py()
    return (
        f"`{column}` holds {value} at row {start + row} (value {kept - first_of_row} of the row): expected {expected}"
    )


def _mass_problem(batch: pa.Table, topk_column: str, tail_column: str, start: int) -> str | None:
    tail_values = batch[tail_column].combine_chunks()
    tail = pc.list_flatten(tail_values).to_numpy(zero_copy_only=False).astype(np.float64)  # null -> nan
    topk = pc.list_flatten(batch[topk_column].combine_chunks()).to_numpy(zero_copy_only=False).astype(np.float64)
    if tail.size == 0 or topk.size % tail.size:
        return None  # the row widths are checked by `check_per_token_columns`
    topk = topk.reshape(tail.size, -1)
    stored = ~np.isnan(tail)
    with np.errstate(divide="ignore"):
        mass = np.exp(topk[stored]).sum(axis=1) + np.exp(tail[stored])
        log_mass = np.log(mass)
    bad = np.flatnonzero(~(np.abs(log_mass) <= _MASS_SLACK))
    if not bad.size:
        return None
    token = int(np.flatnonzero(stored)[bad[0]])
    row = int(pc.list_parent_indices(tail_values).to_numpy()[token])
    return (
        f"the reference's top-k probabilities and bucket of row {start + row} sum to {mass[bad[0]]:.4g} instead of 1 "
        f"(`{topk_column}`, `{tail_column}`): they are not a next-token distribution"
    )


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
