"""TGDPO's per-token dataset columns: the precomputed token rewards, their validation and their collation.

`chosen_token_rewards` / `rejected_token_rewards` hold, per completion token of the tokenized `chosen_ids` /
`rejected_ids`, the token reward r̂_t = β·(log π_guide(y_t|s_t) − log π_ref(y_t|s_t)) (docs/algorithms.md §2), written
by `scripts/compute_token_rewards.py` or by the trainer's precompute. With `precompute_ref_log_probs=True`, the
reference's per-token log-probabilities (`precompute.REF_TOKEN_LOGPS_COLUMNS`) sit beside them. A token that `max_length`
truncation removes may hold `None`: it is never read.
"""

import json
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, List, Value

from .._compat import DataCollatorForPreference, hash_module, tokenize_preference_dataset
from ..checks import (
    VALIDATION_BATCH_ROWS,
    check_chat_template,
    check_columns,
    check_lm_head_not_quantized,
    check_rows,
    check_same_vocabulary,
    check_token_ids_fit,
    scored_completion_range,
)
from ..files import fingerprint_mismatch
from ..precompute import (
    REF_TOKEN_LOGPS_COLUMNS,
    DataCollatorForPerTokenColumns,
    add_per_token_columns,
)
from ..token_batch import TokenBatch
from ..token_stats import add_token_stats_head


TOKEN_REWARD_COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")  # r̂_t = β·(log π_guide − log π_ref)
PER_TOKEN_COLUMNS = TOKEN_REWARD_COLUMNS + REF_TOKEN_LOGPS_COLUMNS
# Written by `scripts/compute_token_rewards.py` beside the data it writes: β, models, truncation, statistics of r̂,
# and each data file's size and checksum
TOKEN_REWARDS_INFO_FILE = "token_rewards_info.json"
# The β the rewards were computed at, in every row: it travels with the data through any format and loader
TOKEN_REWARDS_BETA_COLUMN = "token_rewards_beta"


def _side(column: str) -> str:
    return "chosen" if "chosen" in column else "rejected"


@dataclass
class DataCollatorForTGDPO(DataCollatorForPerTokenColumns):
    """
    [`~trl_tokenpref.precompute.DataCollatorForPerTokenColumns`] for TGDPO's per-token columns: `chosen_token_rewards`,
    `rejected_token_rewards` and, with `precompute_ref_log_probs=True`, `ref_chosen_token_logps` /
    `ref_rejected_token_logps`, one float per token of `chosen_ids` / `rejected_ids`, each returned as a float32 tensor
    of shape `(batch_size, seq_len - 1)` aligned with the shifted labels.
    """

    per_token_columns: tuple[str, ...] = PER_TOKEN_COLUMNS


def validate_token_rewards(dataset: Dataset, dataset_name: str, args) -> None:
    """Check, once before training, that every precomputed value the trainer will read exists and is finite.

    `dataset` is tokenized (`prompt_ids`, `chosen_ids`, `rejected_ids`) and has not lost a row yet, so its row
    indices are the user's. Raises a `ValueError` naming the first bad row, what is wrong and how to fix it. Runs on
    Arrow buffers: about 0.02 s per million tokens on one CPU core.
    """
    table_view = dataset.select_columns(
        ["prompt_ids", "chosen_ids", "rejected_ids", *TOKEN_REWARD_COLUMNS]
    ).with_format("arrow")
    fix = (
        "Recompute the column with `scripts/compute_token_rewards.py` (it tokenizes with the trainer's own code), "
        "using the training tokenizer, `max_length` and `truncation_mode`, or drop the row."
    )
    for batch_start in range(0, len(dataset), VALIDATION_BATCH_ROWS):
        table = table_view[batch_start : batch_start + VALIDATION_BATCH_ROWS]
        user_rows = np.arange(batch_start, batch_start + table.num_rows)
        prompt_lens = pc.list_value_length(table["prompt_ids"]).to_numpy()
        for column in TOKEN_REWARD_COLUMNS:
            side = _side(column)
            values = table[column].combine_chunks()
            if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)) or not (
                pa.types.is_floating(values.type.value_type) or pa.types.is_integer(values.type.value_type)
            ):
                raise ValueError(
                    f"Column `{column}` of the {dataset_name} dataset must hold a list of floats per row (one per "
                    f"completion token), got the Arrow type {values.type}."
                )
            num_values = pc.list_value_length(values).fill_null(-1).to_numpy()
            num_tokens = pc.list_value_length(table[f"{side}_ids"]).to_numpy()
            mismatched = np.flatnonzero(num_values != num_tokens)
            if mismatched.size:
                i = mismatched[0]
                found = "no value (null)" if num_values[i] < 0 else f"{num_values[i]} values"
                raise ValueError(
                    f"Row {user_rows[i]} of the {dataset_name} dataset: `{column}` has {found}, but its tokenized "
                    f"{side} completion has {num_tokens[i]} tokens. The column must hold one float per completion "
                    f"token, as the trainer tokenizes it (same tokenizer, chat template and EOS handling). {fix}"
                )
            flat = pc.cast(pc.list_flatten(values), pa.float64())
            if flat.null_count == 0 and pc.all(pc.is_finite(flat)).as_py() is not False:
                continue
            parents = pc.list_parent_indices(values).to_numpy()
            row_starts = np.concatenate([[0], np.cumsum(num_values)[:-1]])
            is_null = flat.is_null().to_numpy(zero_copy_only=False)
            flat_values = flat.fill_null(0.0).to_numpy()
            non_finite = np.flatnonzero(~np.isfinite(flat_values) & ~is_null)
            if non_finite.size:
                k = non_finite[0]
                i = parents[k]
                raise ValueError(
                    f"Row {user_rows[i]} of the {dataset_name} dataset: `{column}` holds {flat_values[k]} at completion "
                    f"token {k - row_starts[i]}; token rewards must be finite. {fix}"
                )
            # A null marks a token that was truncated away when the values were computed: fine unless training reads it
            for k in np.flatnonzero(is_null):
                i = parents[k]
                position = k - row_starts[i]
                start, stop, _ = scored_completion_range(
                    int(prompt_lens[i]), int(num_tokens[i]), args.max_length, args.truncation_mode
                )
                if start <= position < stop:
                    raise ValueError(
                        f"Row {user_rows[i]} of the {dataset_name} dataset: `{column}` has no value (null) at "
                        f"completion token {position}, which training reads (max_length={args.max_length}, "
                        f"truncation_mode={args.truncation_mode!r}). Nulls mark tokens that were truncated away when "
                        f"the values were computed, so they were computed with a shorter `max_length` or another "
                        f"`truncation_mode`. {fix}"
                    )


def tokenize_for_token_rewards(dataset: Dataset, tokenizer, *, max_length, truncation_mode, dataset_num_proc=None):
    """Check and tokenize a preference dataset exactly as the trainers do, keeping every row (the trainers drop the
    rows that truncation leaves without a completion token; their values are then all `None`)."""
    has_prompt = check_columns(dataset, "input", tokenizer.eos_token)
    check_chat_template(dataset, "input", tokenizer)
    check_rows(dataset, "input", has_prompt, tokenizer.eos_token)
    tokenize_args = SimpleNamespace(
        dataset_num_proc=dataset_num_proc, max_length=None, truncation_mode=truncation_mode
    )
    return tokenize_preference_dataset(dataset, tokenizer, tokenize_args, "input")


def compute_token_rewards(
    dataset: Dataset,
    *,
    ref_model,
    guidance_model,
    tokenizer,
    beta: float,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
    token_chunk_size: int | None = None,
    accelerator=None,
    name: str = "train",
) -> Dataset:
    """`dataset` with the columns `chosen_token_rewards` / `rejected_token_rewards`: r̂_t = β·(log π_guide(y_t|s_t)
    − log π_ref(y_t|s_t)) at every completion token that training with these `max_length` / `truncation_mode` reads
    (`None` elsewhere), through the same precompute as the trainers (`precompute.add_per_token_columns`), and the
    column `token_rewards_beta` (β, in every row: the trainer refuses to train at another β).

    `ref_model` and `guidance_model` are loaded causal LMs with the tokenizer's vocabulary, frozen and in evaluation
    mode; they are patched with the token-statistics head. The values are computed in the models' dtype.
    """
    from accelerate import Accelerator

    from .guidance import GUIDANCE_VOCABULARY_FIX, GUIDANCE_VOCABULARY_REASON

    accelerator = accelerator or Accelerator()
    check_same_vocabulary(
        ref_model,
        guidance_model,
        "guidance model",
        GUIDANCE_VOCABULARY_REASON,
        GUIDANCE_VOCABULARY_FIX,
        model_name="reference",
    )
    tokenized = tokenize_for_token_rewards(dataset, tokenizer, max_length=max_length, truncation_mode=truncation_mode)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    check_token_ids_fit(ref_model, tokenizer, {name: tokenized}, pad_token_id=pad_token_id)
    models = {}
    for role, model in (("reference", ref_model), ("guidance", guidance_model)):
        check_lm_head_not_quantized(model)
        model.eval().requires_grad_(False)
        add_token_stats_head(model)
        models[role] = accelerator.prepare_model(model, evaluation_mode=True)
    collator = DataCollatorForPreference(
        pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )

    def label_log_probs(model, batch):
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        token_batch = TokenBatch.from_inputs(batch)
        outputs = model(**kwargs, token_stats=True, token_batch=token_batch, chunk_size=token_chunk_size)
        return outputs.stats.log_probs.float()

    def score_batch(_, batch):
        rewards = beta * (label_log_probs(models["guidance"], batch) - label_log_probs(models["reference"], batch))
        return {TOKEN_REWARD_COLUMNS: rewards}

    with_values = add_per_token_columns(
        tokenized,
        score_batch,
        model=None,
        columns=[TOKEN_REWARD_COLUMNS],
        cache_key=(hash_module(ref_model), hash_module(guidance_model), beta, max_length, truncation_mode),
        accelerator=accelerator,
        collator=collator,
        batch_size=batch_size,
        max_length=max_length,
        truncation_mode=truncation_mode,
        name=name,
    )
    stale = [*PER_TOKEN_COLUMNS, TOKEN_REWARDS_BETA_COLUMN]
    output = dataset.remove_columns([column for column in stale if column in dataset.column_names])
    for column in TOKEN_REWARD_COLUMNS:
        values = with_values.select_columns([column]).with_format("arrow")[:][column].combine_chunks()
        values = values.cast(pa.list_(pa.float32()))
        output = output.add_column(column, values, feature=List(Value("float32")))
    return output.add_column(TOKEN_REWARDS_BETA_COLUMN, [float(beta)] * len(output), feature=Value("float64"))


def token_reward_stats(dataset: Dataset) -> dict:
    """Number of scored tokens and statistics of r̂ per side: to pick `alpha` and, if needed, a weight clamp."""
    table = dataset.select_columns(list(TOKEN_REWARD_COLUMNS)).with_format("arrow")[:]
    stats = {}
    for column in TOKEN_REWARD_COLUMNS:
        values = pc.list_flatten(table[column]).drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
        stats[column] = {
            "tokens": int(values.size),
            "mean": float(values.mean()) if values.size else None,
            "std": float(values.std()) if values.size else None,
            "max_abs": float(np.abs(values).max()) if values.size else None,
        }
    return stats


def _info_error(info_path: str, problem: str) -> ValueError:
    return ValueError(
        f"The token rewards' info file {info_path} {problem}. It is written by `scripts/compute_token_rewards.py` "
        "with the data: run the script again to write both (or remove the info file, and with it the check of β "
        "against the data)."
    )


def find_token_rewards_info(dataset_or_path) -> tuple[str, dict] | None:
    """The info file that `scripts/compute_token_rewards.py` wrote beside the data, and its content, or None.

    Looked for next to a path (the data file or folder, and the folder above it), or next to the files backing a
    dataset read with `load_from_disk` (`<output_dir>/<split>/data-*.arrow`, so two folders up). An info file that
    cannot be read (truncated, a β that is not a number) is an error naming it.
    """
    if isinstance(dataset_or_path, (str, os.PathLike)):
        path = os.path.abspath(os.path.expanduser(dataset_or_path))
        candidates = [path, os.path.dirname(path)]
    else:
        files = [cache["filename"] for cache in getattr(dataset_or_path, "cache_files", None) or []]
        candidates = [
            folder for file in files[:1] for folder in (os.path.dirname(file), os.path.dirname(os.path.dirname(file)))
        ]
    for folder in candidates:
        info_path = os.path.join(folder, TOKEN_REWARDS_INFO_FILE)
        if os.path.isfile(info_path):
            try:
                with open(info_path, encoding="utf-8") as f:
                    info = json.load(f)
            except (OSError, ValueError) as error:
                raise _info_error(info_path, f"cannot be read ({type(error).__name__}: {error})") from error
            if not isinstance(info, dict):
                raise _info_error(info_path, "does not hold a JSON object")
            beta = info.get("beta")
            if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float))):
                raise _info_error(info_path, f"gives beta as {beta!r} ({type(beta).__name__}), not a number")
            return info_path, info
    return None


def token_rewards_info_problems(info_path: str, info: dict, dataset_or_path) -> list[str]:
    """Where the data that `info` describes differs from it: a file whose size or checksum is not the one written
    with the info (e.g. a run of `compute_token_rewards.py` killed between its data and its info, or a file changed
    since), a dataset with another number of rows, rows computed at another β. Each problem names its file. An info
    file without `data_files` (written before they were recorded) is not compared."""
    splits = info.get("data_files")
    if not isinstance(splits, dict):
        return []
    folder = os.path.dirname(info_path)
    if isinstance(dataset_or_path, (str, os.PathLike)):
        path = os.path.abspath(os.path.expanduser(dataset_or_path))
        read = None if os.path.isdir(path) else os.path.relpath(path, folder)
        dataset = None
    else:
        dataset = dataset_or_path
        first = dataset.cache_files[0]["filename"]
        read = os.path.relpath(first, folder)
    problems = []
    for split, entry in splits.items():
        files = entry.get("files", {})
        if read is not None and read.replace(os.sep, "/") not in files:
            continue  # another split than the one read
        for name, expected in files.items():
            mismatch = fingerprint_mismatch(os.path.join(folder, name), expected)
            if mismatch is not None:
                problems.append(mismatch)
        if dataset is not None and entry.get("rows") is not None and dataset.data.num_rows != entry["rows"]:
            problems.append(
                f"the {split} split holds {dataset.data.num_rows} rows where {info_path} says {entry['rows']}"
            )
    if dataset is not None and info.get("beta") is not None:
        betas = data_betas(dataset)
        if betas and not all(math.isclose(value, float(info["beta"]), rel_tol=1e-6) for value in betas):
            problems.append(f"the rows were computed at beta={sorted(betas)} where {info_path} says {info['beta']}")
    return problems


def data_betas(dataset) -> set[float]:
    """The distinct values of the `token_rewards_beta` column (the β the rows' rewards were computed at), or an empty
    set when the dataset has no such column. A streamed dataset is read from its first row only."""
    columns = dataset.column_names or []
    if TOKEN_REWARDS_BETA_COLUMN not in columns:
        return set()
    if not isinstance(dataset, Dataset):
        first = next(iter(dataset))[TOKEN_REWARDS_BETA_COLUMN]
        return set() if first is None else {float(first)}
    values = dataset.data.column(TOKEN_REWARDS_BETA_COLUMN)
    return {float(value) for value in pc.unique(values).to_pylist() if value is not None}


def check_token_rewards_beta(dataset_or_path, beta: float, dataset_name: str) -> None:
    """Refuse token rewards computed at another β than training's: r̂ = β_s·Δ stored at β_s and trained at β act as
    `alpha · β_s / β`, a silently different guidance strength. β is read from the rows (`token_rewards_beta`, which
    `compute_token_rewards.py` writes into every row, so that it travels with the data in any format and through any
    loader) and from the info file beside the data; the info file must also describe the data beside it
    ([`token_rewards_info_problems`]). Silent when neither is found (rewards computed by other code)."""
    found = find_token_rewards_info(dataset_or_path)
    if found is not None:
        info_path, info = found
        problems = token_rewards_info_problems(info_path, info, dataset_or_path)
        if problems:
            raise ValueError(
                f"The token rewards of the {dataset_name} dataset do not match their info file {info_path}: "
                f"{'; '.join(problems)}. The data and the info were not written together (e.g. "
                "`compute_token_rewards.py` was stopped while it wrote them, or a file was changed or copied since). "
                "Run `scripts/compute_token_rewards.py` again to write both."
            )
        sources = [(info.get("beta"), info_path)]
    else:
        sources = []
    if not isinstance(dataset_or_path, (str, os.PathLike)):
        sources += [
            (value, f"the `{TOKEN_REWARDS_BETA_COLUMN}` column") for value in sorted(data_betas(dataset_or_path))
        ]
    for stored, where in sources:
        if stored is None or math.isclose(float(stored), float(beta), rel_tol=1e-6):
            continue
        raise ValueError(
            f"The token rewards of the {dataset_name} dataset were computed at beta={stored} ({where}), but "
            f"training uses beta={beta}. The stored values are r̂ = beta·(log π_guide − log π_ref) at the script's "
            f"beta, so training at another beta would act as alpha·{stored}/{beta}. Train with `beta={stored}`, or "
            f"recompute the rewards with `scripts/compute_token_rewards.py --beta {beta}`."
        )
