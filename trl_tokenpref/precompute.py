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

import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.utils import broadcast_object_list, tqdm
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable
from torch.utils.data import DataLoader

from ._compat import dataset_cache_file, dataset_fingerprint
from .checks import scored_completion_range


# The reference's per-token log-probabilities log π_ref(y_t|s_t), stored by `precompute_ref_log_probs=True`
REF_TOKEN_LOGPS_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")

# Part of every cache key: bump when the stored values change meaning
PRECOMPUTE_VERSION = "per-token-values-1"

# A scoring function: (model, collated batch) -> {(chosen column, rejected column): values [2B, L-1]}, the values of
# every label position of the batch [chosen; rejected] (read only at completion tokens)
ScoreBatch = Callable[[torch.nn.Module, dict], dict[tuple[str, str], torch.Tensor]]


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
        score_batch: `(model, batch) -> {(chosen_column, rejected_column): [2B, L-1] tensor}`, run without gradient.
        model: passed to `score_batch` (the reference, or an engine wrapping it).
        columns: the `(chosen_column, rejected_column)` pairs `score_batch` returns.
        cache_key: everything besides the dataset that the values depend on (model hashes, truncation, β, ...).
        accelerator, collator, batch_size, num_workers, pin_memory: how batches are built and spread over processes.
        max_length, truncation_mode: the collator's truncation, to place each value at its token.
        name: the dataset's name in progress bars.
    """
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style Dataset or "
            "set `precompute_ref_log_probs=False`."
        )
    flat_columns = [column for pair in columns for column in pair]
    stale = [column for column in flat_columns if column in dataset.column_names]
    if stale:
        dataset = dataset.remove_columns(stale)
    features = Features({column: List(Value("float32")) for column in flat_columns})

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
        return concatenate_datasets([dataset, Dataset(InMemoryTable(table.cast(features.arrow_schema)))], axis=1)

    # Rank 0's key for every process: under ZeRO-3 a model hash may differ between ranks
    fingerprint = [Hasher.hash((PRECOMPUTE_VERSION, dataset_fingerprint(dataset), flat_columns, *cache_key))]
    broadcast_object_list(fingerprint, from_process=0)
    fingerprint = fingerprint[0]
    cache_file = dataset_cache_file(dataset, fingerprint)
    if not os.path.exists(cache_file):
        table = compute()
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
    return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)


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
    kept_counts = {"chosen": [], "rejected": []}  # per batch: scored completion tokens of each row
    for batch in tqdm(
        iterable=dataloader,
        desc=f"Computing per-token values for {name} dataset",
        disable=bool(os.environ.get("TQDM_DISABLE", "")),
    ):
        with torch.no_grad(), accelerator.autocast():
            values = score_batch(model, batch)
        # Split [chosen; rejected] before gathering: `gather_for_metrics` trims the last batch to the number of
        # remaining *pairs*, so a [2B, ...] tensor would lose its rejected rows. Rows of different processes have
        # different lengths: pad them first (the mask says which values are real).
        gathered = {}
        for key, value in {"mask": batch["completion_mask"][:, 1:], **values}.items():
            for side, half in zip(("chosen", "rejected"), value.chunk(2, dim=0), strict=True):
                half = accelerator.gather_for_metrics(accelerator.pad_across_processes(half, dim=1))
                gathered[key, side] = half.cpu()
        for side_index, side in enumerate(("chosen", "rejected")):
            mask = gathered["mask", side].bool()
            kept_counts[side].append(mask.sum(dim=1).numpy())
            for pair in columns:
                kept[pair[side_index]].append(gathered[pair, side].float()[mask].numpy())

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
            )
    return pa.table(arrays)


def _full_length_lists(
    kept_values, kept_counts, prompt_lens, num_tokens, max_length, truncation_mode
) -> pa.LargeListArray:
    """One list per row with one value per completion token: the scored tokens' values, and None for the tokens
    that truncation removed (the last ones under `keep_start`, the first ones under `keep_end`)."""
    offsets = np.concatenate([[0], np.cumsum(num_tokens)]).astype(np.int64)
    values = np.zeros(offsets[-1], dtype=np.float32)
    valid = np.zeros(offsets[-1], dtype=bool)
    kept_offsets = np.concatenate([[0], np.cumsum(kept_counts)])
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
        values[offsets[row] + start : offsets[row] + stop] = kept_values[kept_offsets[row] : kept_offsets[row + 1]]
        valid[offsets[row] + start : offsets[row] + stop] = True
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, mask=~valid))
