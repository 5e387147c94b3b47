"""Input checks of the token-level trainers: free functions on the tokenizer, the LM head and the datasets.

They need no trainer, so the trainers, `scripts/compute_token_rewards.py` and the tests call the same code. Each
refuses bad input with the row index, the problem and the fix, before any training (docs/architecture.md lists them):

* [`check_special_tokens`], [`check_lm_head_not_quantized`], [`check_lm_head_supported`]: the tokenizer and the LM
  head that the chunked token-statistics pass reads directly;
* [`check_columns`], [`check_rows`] (a map-style dataset, whole, before tokenization) and [`check_streamed_row`] (an
  `IterableDataset`, as it is read): every row's fields, as DPOTrainer's tokenization needs them;
* [`drop_rows_without_completion_tokens`] (after tokenization): rows of which `max_length` truncation leaves no
  completion token are dropped, as DPOTrainer drops them, with a warning that counts and names them.
"""

import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft.utils import TrainableTokensWrapper
from transformers import ProcessorMixin
from trl import extract_prompt


logger = get_logger(__name__)

# Roles a conversational prompt may end with: the completion is the assistant's answer to this turn (a user message, or
# a tool result after an assistant's tool call; "ipython" is Llama 3's tool-result role)
_PROMPT_FINAL_ROLES = ("user", "tool", "ipython")
# Roles a conversational completion may hold: assistant turns, possibly with tool calls and their results in between
_COMPLETION_ROLES = ("assistant", "tool", "ipython")
_IMPLICIT_PROMPT = object()  # the `prompt` of a dataset without a prompt column: TRL extracts it from chosen/rejected
VALIDATION_BATCH_ROWS = 10_000
LISTED_ROWS = 10  # bad rows named in an error message, besides their count


def _is_empty_content(content) -> bool:
    if content is None:
        return True
    if isinstance(content, str):
        return not content.strip()
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, {"type": "image"}, ...]
        return all(
            isinstance(part, dict) and part.get("type") == "text" and not (part.get("text") or "").strip()
            for part in content
        )
    return False


def _messages_problem(name: str, messages: list) -> str | None:
    for k, message in enumerate(messages):
        # Arrow stores every message with every key of the column's messages, absent ones as None
        if isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message:
            continue
        found = f"keys {sorted(message)}" if isinstance(message, dict) else f"a {type(message).__name__}"
        hint = ""
        if isinstance(message, dict) and {"from", "value"} <= message.keys():
            hint = " This is the ShareGPT format: convert the rows with `trl.maybe_convert_to_chatml`."
        return f"message {k} of `{name}` is not a {{'role': ..., 'content': ...}} message (found {found}).{hint}"
    return None


def _row_problem(prompt, chosen, rejected, eos_token: str | None) -> str | None:
    """What is wrong with one preference row, with the fix, or None. `prompt` is `_IMPLICIT_PROMPT` when the dataset
    has no prompt column.

    The checks mirror what DPOTrainer's tokenization needs: strings (standard format) or lists of messages
    (conversational format), never mixed; a non-empty prompt and completions; for messages, a prompt that ends with a
    turn the completion answers and completions made of assistant turns, which is what `apply_chat_template` with
    `add_generation_prompt=True` followed by the completion renders.
    """
    implicit = prompt is _IMPLICIT_PROMPT
    fields = (
        {"chosen": chosen, "rejected": rejected}
        if implicit
        else {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    )
    for name, value in fields.items():
        if value is None:
            return f"`{name}` is missing (None)."
        if not isinstance(value, (str, list)):
            return f"`{name}` must be a string or a list of messages, got a {type(value).__name__}."
    kinds = {name: "a list of messages" if isinstance(value, list) else "a string" for name, value in fields.items()}
    if len(set(kinds.values())) > 1:
        found = ", ".join(f"`{name}` is {kind}" for name, kind in kinds.items())
        return (
            f"{found}. The fields of a row must all be strings (standard format) or all lists of "
            "{'role', 'content'} messages (conversational format)."
        )
    conversational = isinstance(chosen, list)
    if conversational:
        for name, value in fields.items():
            problem = _messages_problem(name, value)
            if problem is not None:
                return problem

    if implicit:
        for name, value in fields.items():
            if len(value) == 0:
                return f"`{name}` is empty."
        split = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = split["prompt"], split["chosen"], split["rejected"]
        if len(prompt) == 0:
            unit = "message" if conversational else "character"
            return (
                f"the dataset has no `prompt` column, so the prompt is the longest common start of `chosen` and "
                f"`rejected`, and these two differ from their first {unit}: the prompt is empty. Add a `prompt` "
                "column (and remove the prompt from `chosen` and `rejected`)."
            )

    if not conversational:
        if not prompt.strip():
            return "the prompt is empty (or only whitespace): there is nothing for the completions to answer."
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            # DPOTrainer appends the EOS token to string completions, so a completion that is only EOS is empty too
            if eos_token and completion.endswith(eos_token):
                completion = completion[: -len(eos_token)]
            if not completion.strip():
                return f"the {side} completion is empty (or only whitespace): there is nothing to compare."
        return None

    if len(prompt) == 0:
        return "`prompt` is an empty list of messages: there is nothing for the completions to answer."
    final_role = prompt[-1]["role"]
    if final_role not in _PROMPT_FINAL_ROLES:
        return (
            f"the prompt's last turn has the role {final_role!r}, but the completions answer that turn, so it must "
            f"be one of {list(_PROMPT_FINAL_ROLES)} (the chat template appends the assistant's generation prompt "
            "after it). Move a trailing assistant turn into `chosen` and `rejected`, or map your role names to 'user' "
            "and 'assistant'."
        )
    if all(_is_empty_content(message["content"]) for message in prompt):
        return "every message of the prompt is empty: there is nothing for the completions to answer."
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        if len(completion) == 0:
            return f"the {side} completion is an empty list of messages: there is nothing to compare."
        roles = [message["role"] for message in completion]
        if roles[0] != "assistant" or roles[-1] != "assistant" or not set(roles) <= set(_COMPLETION_ROLES):
            return (
                f"the {side} completion has the roles {roles}, but a completion is the assistant's answer: it must "
                "start and end with an 'assistant' turn (with only tool results in between). Put the user's turns "
                "in `prompt`, or map your role names to 'user' and 'assistant'."
            )
        if all(_is_empty_content(message["content"]) and not message.get("tool_calls") for message in completion):
            return f"the {side} completion is empty: there is nothing to compare."
    return None


def scored_completion_range(prompt_len: int, completion_len: int, max_length: int | None, truncation_mode: str):
    """Completion tokens `[start, stop)` whose values training reads, and the index of the first one in the sequence
    that `DataCollatorForPreference` builds.

    These are the completion tokens that survive its truncation of prompt+completion to `max_length`, except a token
    that would land at position 0 of the sequence: no label predicts it (only possible when the whole prompt is cut).
    """
    offset = 0  # tokens cut from the start of the sequence
    start, stop = 0, completion_len
    if max_length is not None:
        if truncation_mode == "keep_end":
            offset = max(0, prompt_len + completion_len - max_length)
            start = max(0, offset - prompt_len)
        else:
            stop = max(0, min(completion_len, max_length - prompt_len))
    if prompt_len + start - offset == 0 and start < stop:
        start += 1
    return start, stop, prompt_len + start - offset


def scored_completion_count(prompt_len: int, completion_len: int, max_length: int | None, truncation_mode: str) -> int:
    """The number of completion tokens of one row that training reads (see [`scored_completion_range`])."""
    start, stop, _ = scored_completion_range(prompt_len, completion_len, max_length, truncation_mode)
    return max(stop - start, 0)


def scored_completion_counts(
    prompt_lens: np.ndarray, completion_lens: np.ndarray, max_length: int | None, truncation_mode: str
) -> np.ndarray:
    """Vectorised `stop - start` of [`scored_completion_range`]: the completion tokens each row trains on."""
    offset = np.zeros_like(prompt_lens)
    start, stop = np.zeros_like(prompt_lens), completion_lens.copy()
    if max_length is not None:
        if truncation_mode == "keep_end":
            offset = np.maximum(0, prompt_lens + completion_lens - max_length)
            start = np.maximum(0, offset - prompt_lens)
        else:
            stop = np.clip(max_length - prompt_lens, 0, completion_lens)
    start = start + ((prompt_lens + start - offset == 0) & (start < stop))
    return np.maximum(stop - start, 0)


def check_streamed_row(example: dict, index: int, dataset_name: str, has_prompt: bool, eos_token: str | None) -> dict:
    """Check one row of an `IterableDataset` as it is read (`IterableDataset.map`)."""
    prompt = example.get("prompt") if has_prompt else _IMPLICIT_PROMPT
    problem = _row_problem(prompt, example.get("chosen"), example.get("rejected"), eos_token)
    if problem is not None:
        raise ValueError(
            f"Row {index} of the {dataset_name} dataset (an IterableDataset: rows are checked as they are read): "
            f"{problem} Fix or drop the bad rows (e.g. with `dataset.filter`)."
        )
    return example


def listed_rows(rows) -> str:
    listed = ", ".join(str(row) for row in rows[:LISTED_ROWS])
    return listed + (", ..." if len(rows) > LISTED_ROWS else "")


# Builder of `datasets.load_dataset` for each local file extension
LOCAL_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _in_hub_cache(repo_id: str, repo_type: str, cache_dir: str | None = None) -> bool:
    """Whether a Hub repository has been downloaded before (then it loads offline, and before any local folder)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    if any(os.path.isdir(os.path.join(root, folder)) for root in (constants.HF_HUB_CACHE, cache_dir) if root):
        return True
    if repo_type == "dataset":  # `datasets`' own cache of a prepared Hub dataset
        import datasets

        return os.path.isdir(os.path.join(str(datasets.config.HF_DATASETS_CACHE), repo_id.replace("/", "___")))
    return False


def _dataset_builders() -> set[str]:
    """The names `load_dataset` takes as its own builders (`json`, `parquet`, ...), not as Hub ids."""
    from ._compat import dataset_builder_names

    return dataset_builder_names()


def _offline(repo_type: str) -> bool:
    from huggingface_hub import constants

    if repo_type == "dataset":
        import datasets

        return bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)
    return bool(constants.HF_HUB_OFFLINE)


def missing_local_path(path: str, repo_type: str = "model", cache_dir: str | None = None) -> str | None:
    """Why `path` cannot be loaded as a local file or folder nor as a Hub repository, or `None`.

    `from_pretrained` and `load_dataset` take a missing local path for a Hub id and fail with a message about the Hub
    (a repo-id validation error, "couldn't connect to huggingface.co", or minutes of retries without a network). A
    path is taken as local when it is absolute, starts with `./`, `../` or `~`, ends with `/`, has more than one
    separator (a Hub id is `name` or `org/name`), uses the platform's own separator where it is not `/`, ends with a
    data file's extension (datasets), or is `org/name` where a folder `org` exists, unless `org/name` is in the Hub
    cache. Any other name is a Hub id, refused only when `HF_HUB_OFFLINE` is set and it is not in the Hub cache
    (`cache_dir`, if the model is loaded with one, included): then nothing could load it. A `datasets` builder name
    (`json`, `parquet`, ...) is neither.
    """
    if not path:
        return None
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        return None
    parts = path.split("/")
    is_file_name = repo_type == "dataset" and Path(path).suffix.lower() in LOCAL_FILE_BUILDERS
    if (
        os.path.isabs(expanded)
        or path.startswith(("~", "./", "../"))
        or path.endswith("/")
        or path in (".", "..")
        or (os.sep != "/" and os.sep in path)
        or len(parts) > 2
        or is_file_name
    ):
        return f"{path}: no such file or directory"
    if _in_hub_cache(path, repo_type, cache_dir):
        return None
    if len(parts) == 2 and os.path.isdir(parts[0]):
        download = f"hf download {path}" + (" --repo-type dataset" if repo_type == "dataset" else "")
        return (
            f"{path}: no such file or directory in the folder {parts[0]!r} (which exists here, so {path!r} is read as "
            f"a local path; to load the Hub repository {path!r} instead, download it first: `{download}`)"
        )
    if repo_type == "dataset" and path in _dataset_builders():
        return None
    if _offline(repo_type):
        return (
            f"{path}: no such file or directory, and no Hub repository of that name in the local cache "
            "(HF_HUB_OFFLINE is set, so nothing is downloaded)"
        )
    return None


def check_local_path(name: str, what: str, repo_type: str = "model") -> None:
    """Refuse at once a model path that cannot load (see [`missing_local_path`]), which `from_pretrained` would
    otherwise look up on the Hub: minutes of retries, then an unrelated error."""
    problem = missing_local_path(name, repo_type)
    if problem is not None:
        raise FileNotFoundError(
            f"The {what} cannot be loaded: {problem}. Check the path (relative paths are read from {os.getcwd()}); a "
            "Hub identifier has the form 'name' or 'org/name'."
        )


def text_tokenizer(processing_class):
    """The text tokenizer of a processing class (a processor's `tokenizer`, or the tokenizer itself)."""
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def check_lm_head_not_quantized(model) -> None:
    """Refuse a quantized LM head: the chunked pass reads its weight directly (a model path is checked once loaded)."""
    if isinstance(model, str):
        return
    output_embeddings = model.get_output_embeddings()
    weight = getattr(output_embeddings, "weight", None)
    if weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params"):
        raise ValueError(
            f"The LM head is quantized ({type(weight).__name__}), but the token-level trainers read "
            "`lm_head.weight` directly to compute per-token statistics in chunks. Keep the LM head in 16/32-bit: "
            "bitsandbytes leaves it unquantized by default, but an explicit `llm_int8_skip_modules` list replaces "
            "that default, so add the LM head's name (usually 'lm_head') to it."
        )


def check_special_tokens(processing_class, args) -> None:
    """DPOTrainer pads with the EOS token when the tokenizer has no pad token. That is safe here: every mask
    (attention, completion, labels) comes from sequence lengths, never from comparing ids with the pad id, so the
    EOS that ends a completion is still trained on. Say so once; refuse a tokenizer with neither token."""
    tokenizer = text_tokenizer(processing_class)
    if getattr(tokenizer, "pad_token", None) is not None or args.pad_token is not None:
        return
    if getattr(tokenizer, "eos_token", None) is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token. Batches are "
            "padded with the pad token (DPOTrainer falls back to the EOS token), and string completions get the "
            "EOS token appended so that the model learns where a completion ends. Set both, e.g. "
            "`tokenizer.eos_token = '<|endoftext|>'` (a token of the vocabulary that ends a text) and "
            "`tokenizer.pad_token = tokenizer.eos_token`, and pass the tokenizer as `processing_class`."
        )
    logger.warning_once(
        f"The tokenizer has no pad token, so batches are padded with its EOS token ({tokenizer.eos_token!r}), as "
        "DPOTrainer does. This is safe with the token-level trainers: the masks come from sequence lengths, never "
        "from token ids, so each completion's final EOS is still trained on. To silence this warning, set "
        "`tokenizer.pad_token` before passing the tokenizer."
    )


# ------------------------------------------------------------------------------------------------------------
# Dataset checks: every row before DPOTrainer tokenizes it, the token counts after
# ------------------------------------------------------------------------------------------------------------


def check_columns(dataset, dataset_name: str, eos_token: str | None) -> bool:
    """Refuse a dataset without rows, without `chosen`/`rejected`, or with string completions and no EOS token.
    Returns whether it has a `prompt` column (otherwise TRL extracts the prompt from `chosen` and `rejected`)."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"The {dataset_name} dataset has no rows.")
    columns = dataset.column_names
    first_row = next(iter(dataset), None)
    if first_row is None:
        raise ValueError(f"The {dataset_name} dataset has no rows.")
    if columns is None:  # an IterableDataset of unknown features
        columns = list(first_row)
    missing = [column for column in ("chosen", "rejected") if column not in columns]
    if missing:
        hint = ""
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
            hint = " DPOTrainer tokenizes the text itself and takes no pre-tokenized `*_ids` columns alone."
        raise ValueError(
            f"The {dataset_name} dataset has no {' and no '.join(f'`{column}`' for column in missing)} column "
            f"(its columns are {list(columns)}). A preference dataset needs `chosen` and `rejected` columns, and "
            "a `prompt` column unless the prompt is implicit (the common start of `chosen` and `rejected`): all "
            "strings (standard format) or all lists of {'role', 'content'} messages (conversational format). "
            f"Rename the columns with `dataset.rename_column(old_name, new_name)`.{hint}"
        )
    if isinstance(first_row["chosen"], str) and eos_token is None:
        raise ValueError(
            f"The {dataset_name} dataset holds strings, and DPOTrainer appends the EOS token to string "
            "completions so that the model learns where a completion ends, but the tokenizer has no EOS token. "
            "Set `tokenizer.eos_token` to the vocabulary's end-of-text token, or use conversational data (the "
            "chat template closes each turn)."
        )
    return "prompt" in columns


def check_rows(dataset: Dataset, dataset_name: str, has_prompt: bool, eos_token: str | None) -> None:
    """Check every row's fields (plain Python over batches of columns: ~0.1 s per 100k string rows, ~1.5 s per
    100k conversational rows, most of it Arrow-to-Python conversion)."""
    columns = ["prompt", "chosen", "rejected"] if has_prompt else ["chosen", "rejected"]
    view = dataset.select_columns(columns).with_format(None)
    bad_rows, first_problem = [], None
    for start in range(0, len(view), VALIDATION_BATCH_ROWS):
        batch = view[start : start + VALIDATION_BATCH_ROWS]
        prompts = batch["prompt"] if has_prompt else [_IMPLICIT_PROMPT] * len(batch["chosen"])
        for offset, (prompt, chosen, rejected) in enumerate(zip(prompts, batch["chosen"], batch["rejected"])):
            problem = _row_problem(prompt, chosen, rejected, eos_token)
            if problem is not None:
                bad_rows.append(start + offset)
                first_problem = first_problem or problem
    if bad_rows:
        count = ""
        if len(bad_rows) > 1:
            count = f" {len(bad_rows)} of its {len(view)} rows have a problem (rows {listed_rows(bad_rows)})."
        raise ValueError(
            f"Row {bad_rows[0]} of the {dataset_name} dataset: {first_problem}{count} Fix or drop the bad rows "
            "before training (e.g. with `dataset.filter`)."
        )


def check_lm_head_supported(model) -> None:
    """Refuse PEFT's `trainable_token_indices` on the LM head, whose wrapper exposes no bias to the chunked pass."""
    if is_peft_model(model) and isinstance(model.get_base_model().get_output_embeddings(), TrainableTokensWrapper):
        raise ValueError(
            "PEFT's `trainable_token_indices` on the LM head is not supported: the token-level trainers read the "
            "LM head's weight and bias directly to compute per-token statistics in chunks, and the wrapper that "
            "trains a few of its rows exposes no bias. Train the whole head with `modules_to_save=['lm_head']`, "
            "or leave the LM head out of `trainable_token_indices`."
        )


def _token_lengths(dataset: Dataset) -> dict[str, np.ndarray]:
    """Token counts of `prompt_ids`, `chosen_ids` and `rejected_ids` per row, from the Arrow buffers."""
    table = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
    return {
        name: pc.list_value_length(table[f"{name}_ids"]).to_numpy().astype(np.int64)
        for name in ("prompt", "chosen", "rejected")
    }


def why_no_completion_token(
    prompt_len: int, chosen_len: int, rejected_len: int, max_length: int | None, truncation_mode: str
) -> str:
    """Why a tokenized row keeps no completion token to train on, and what to do about it."""
    sizes = f"prompt {prompt_len} tokens, chosen {chosen_len}, rejected {rejected_len}"
    if max_length is not None and truncation_mode == "keep_start" and prompt_len >= max_length:
        return (
            f"its prompt alone fills `max_length={max_length}` ({sizes}), so truncation (keep_start) leaves no "
            "completion token. To train on such rows, raise `max_length` or shorten their prompts."
        )
    if prompt_len == 0:
        return (
            f"its tokenized prompt is empty ({sizes}): TRL takes as the prompt the tokens shared by the tokenized "
            "prompt and the tokenized prompt + completion, and these differ from the first token (the tokenizer "
            "merges the end of the prompt with the start of the completion, or the chat template renders the prompt "
            "alone differently); the first token of a sequence has no label, so a one-token completion keeps nothing. "
            "End the prompt on a token boundary (e.g. start the completions with a space)."
        )
    return (
        f"a completion keeps no token after truncation ({sizes}, `max_length={max_length}`, "
        f"`truncation_mode={truncation_mode!r}`)."
    )


def scored_completion_counts_of(dataset: Dataset, args) -> np.ndarray:
    """The completion tokens each tokenized row trains on, chosen and rejected together."""
    lengths = _token_lengths(dataset)
    return sum(
        scored_completion_counts(lengths["prompt"], lengths[side], args.max_length, args.truncation_mode)
        for side in ("chosen", "rejected")
    )


def rows_without_completion_tokens(dataset: Dataset, args) -> np.ndarray:
    """Indices of the tokenized rows of which a completion keeps no token to train on (vectorised over the Arrow
    buffers: ~10 ms per 100k rows)."""
    lengths = _token_lengths(dataset)
    kept = [
        scored_completion_counts(lengths["prompt"], lengths[side], args.max_length, args.truncation_mode)
        for side in ("chosen", "rejected")
    ]
    return np.flatnonzero((kept[0] == 0) | (kept[1] == 0))


def drop_rows_without_completion_tokens(dataset: Dataset, dataset_name: str, args) -> Dataset:
    """Drop the tokenized rows of which `max_length` truncation leaves a completion without any token to train on.

    DPOTrainer drops the rows whose prompt alone fills `max_length` (under `keep_start`) silently; here every row
    without a trainable completion token is dropped (the same rows, and the rare ones whose only completion token has
    no label), with a warning giving their number, the first few indices and why. A dataset left with no row is an
    error.
    """
    dropped = rows_without_completion_tokens(dataset, args)
    if not dropped.size:
        return dataset
    lengths = _token_lengths(dataset)
    first = int(dropped[0])
    why = why_no_completion_token(
        int(lengths["prompt"][first]),
        int(lengths["chosen"][first]),
        int(lengths["rejected"][first]),
        args.max_length,
        args.truncation_mode,
    )
    if dropped.size == len(dataset):
        raise ValueError(
            f"Every row of the {dataset_name} dataset ({len(dataset)}) keeps no completion token to train on after "
            f"truncation, so there is nothing to train on. Row {first}: {why}"
        )
    logger.warning(
        f"Dropped {dropped.size} of the {len(dataset)} rows of the {dataset_name} dataset (rows "
        f"{listed_rows(dropped)}): after truncation, a completion keeps no token to train on, and DPOTrainer drops "
        f"such rows too. Row {first}: {why}"
    )
    keep = np.setdiff1d(np.arange(len(dataset)), dropped, assume_unique=True)
    return dataset.select(keep)


def identical_pairs(dataset: Dataset) -> np.ndarray:
    """Indices of the tokenized rows whose chosen and rejected completions are the same tokens: pairs that express no
    preference (vectorised over the Arrow buffers except for the rows of equal lengths)."""
    table = dataset.select_columns(["chosen_ids", "rejected_ids"]).with_format("arrow")[:]
    chosen, rejected = table["chosen_ids"].combine_chunks(), table["rejected_ids"].combine_chunks()
    chosen_lens = pc.list_value_length(chosen).to_numpy()
    same_length = np.flatnonzero(chosen_lens == pc.list_value_length(rejected).to_numpy())
    if not same_length.size:
        return same_length
    chosen_values, rejected_values = chosen.flatten().to_numpy(), rejected.flatten().to_numpy()
    chosen_offsets, rejected_offsets = chosen.offsets.to_numpy(), rejected.offsets.to_numpy()
    return np.array(
        [
            row
            for row in same_length
            if np.array_equal(
                chosen_values[chosen_offsets[row] : chosen_offsets[row + 1]],
                rejected_values[rejected_offsets[row] : rejected_offsets[row + 1]],
            )
        ],
        dtype=np.int64,
    )
