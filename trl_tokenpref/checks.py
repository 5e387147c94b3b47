"""Input checks of the token-level trainers: free functions on the tokenizer, the LM head and the datasets.

They need no trainer, so the trainers, `scripts/compute_token_rewards.py` and the tests call the same code. Each
refuses bad input with the row index, the problem and the fix, before any training (docs/architecture.md lists them):

* [`check_special_tokens`], [`check_lm_head_not_quantized`], [`check_lm_head_supported`]: the tokenizer and the LM
  head that the chunked token-statistics pass reads directly;
* [`check_columns`], [`check_rows`] (a map-style dataset, whole, before tokenization) and [`check_streamed_row`] (an
  `IterableDataset`, as it is read): every row's fields, as DPOTrainer's tokenization needs them;
* [`drop_rows_without_completion_tokens`] (after tokenization): rows of which `max_length` truncation leaves no
  completion token are dropped, as DPOTrainer drops them, with a warning that counts and names them;
* [`check_chat_template`]: conversational rows need a processing class with a chat template;
* [`check_same_vocabulary`] (the one vocabulary check of the package: references, guidance models, the evaluation)
  and [`check_token_ids_fit`] (token ids and the pad id against the policy's embedding), read from the modules'
  sizes and configs, never from a weight's shape;
* [`check_not_only_identical_pairs`]: a dataset of identical pairs only;
* [`warn_if_reference_cache_misses_mass`] (after the reference-cache precompute): the reference's mass outside the
  cached top-k, with the `ref_top_k` to use.
"""

import math
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import ProcessorMixin
from trl import extract_prompt

from ._logging import get_logger


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
        if isinstance(message, dict) and "role" in message and "content" in message:
            role = message["role"]
            found = "None" if role is None else f"{role!r} (a {type(role).__name__})"
            hint = (
                " A dataset stores every message with every key that any message of its column has, so a message "
                "written without a `role` reads back with `role: None`."
                if role is None
                else ""
            )
            return (
                f"message {k} of `{name}` has the role {found}, but a message's role must be a string such as "
                f"'system', 'user', 'assistant' or 'tool' (the chat template renders each turn by its role).{hint} "
                "Give every message its role."
            )
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


def absolute_if_local(model):
    """A model named by a local folder, by the folder's absolute path: what it is saved as (an adapter's
    `base_model_name_or_path`, the model card's base) then loads from any directory. A path is returned absolute; a
    loaded model whose `name_or_path` is a relative local folder gets it absolute in its config (the same folder).
    Anything else (a Hub id, a model built from a config) is unchanged."""
    if isinstance(model, (str, os.PathLike)):
        return os.path.abspath(os.path.expanduser(model)) if os.path.isdir(os.path.expanduser(model)) else model
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None)
    if isinstance(name, str) and name and not os.path.isabs(name) and os.path.isdir(name):
        config.name_or_path = os.path.abspath(name)
        if isinstance(getattr(model, "name_or_path", None), str):  # the copy PEFT reads for the adapter's base
            model.name_or_path = config.name_or_path
    return model


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


def _int_attribute(modules, name: str) -> int | None:
    """`name` of the first module that has it as an int, looking through PEFT's wrappers (`base_layer`,
    `original_module`)."""
    for module in modules:
        for candidate in (module, getattr(module, "base_layer", None), getattr(module, "original_module", None)):
            value = getattr(candidate, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _config_vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(text_config, "vocab_size", None)
    return vocab_size if isinstance(vocab_size, int) else None


def output_vocab_size(model) -> int | None:
    """Width of the model's output logits: its LM head's `out_features`, else `config.vocab_size`.

    Never the weight's shape: a quantised head's weight is packed, and under DeepSpeed ZeRO-3 a partitioned weight has
    the shape `[0]`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _int_attribute([head], "out_features") or _config_vocab_size(model)


def embedding_rows(model) -> int | None:
    """Rows of the model's input embedding, the ids it can embed: `num_embeddings`, else `config.vocab_size` (not the
    weight's shape, for the reasons of [`output_vocab_size`])."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return _int_attribute([embeddings, getattr(embeddings, "token_adapter", None)], "num_embeddings") or (
        _config_vocab_size(model)
    )


def check_same_vocabulary(model, other, other_name: str, reason: str, fix: str, model_name: str = "policy") -> None:
    """Refuse a model read next to `model` (a reference, a guidance model) whose vocabulary has another size: the
    trainers and the evaluation compare the two models' log-probabilities of the same token ids (and, for a KL, their
    whole next-token distributions). Pass unwrapped models (no DDP / DeepSpeed engine)."""
    if other is None:
        return
    size, other_size = output_vocab_size(model), output_vocab_size(other)
    if size is None or other_size is None or size == other_size:
        return
    raise ValueError(
        f"The {other_name}'s vocabulary has {other_size} entries but the {model_name}'s has {size} (the widths of "
        f"their output logits): {reason} {fix}"
    )


# Why a reference must share the policy's vocabulary, and what to do, in the trainers' message
REFERENCE_VOCABULARY_REASON = (
    "the token-level losses compare the two models' log-probabilities of the same token ids (TDPO's and TBPO-A's KL "
    "their whole next-token distributions), so they must use one tokenizer."
)
REFERENCE_VOCABULARY_FIX = (
    "Pass as `ref_model` the model the policy starts from (usually its SFT model), or leave `ref_model` unset to use "
    "a copy of the policy."
)


def _largest_token_ids(dataset: Dataset) -> tuple[int, int, str] | None:
    """The largest token id of a tokenized map-style dataset, the first row holding it and its column, or None
    (Arrow compute over the id columns: milliseconds per million tokens)."""
    columns = [column for column in ("prompt_ids", "chosen_ids", "rejected_ids") if column in dataset.column_names]
    if not columns or len(dataset) == 0:
        return None
    table = dataset.select_columns(columns).with_format("arrow")[:]
    largest = None
    for column in columns:
        ids = table[column].combine_chunks()
        values = pc.list_flatten(ids)
        if len(values) == 0:
            continue
        value = pc.max(values).as_py()
        if largest is None or value > largest[0]:
            row = pc.list_parent_indices(ids)[pc.index(values, value).as_py()].as_py()
            largest = (value, row, column)
    return largest


def check_token_ids_fit(model, processing_class, datasets: dict, pad_token_id: int | None = None) -> None:
    """Refuse token ids that the model cannot embed, before any step reads them (torch would fail mid-training with a
    bare `IndexError: index out of range in self`): the largest id of each tokenized map-style dataset, and the pad
    id the collator pads with, against the model's embedding rows (and output logits).

    A tokenizer with fewer tokens than the embedding has rows is common (padded embeddings) and fine. A tokenizer with
    more (tokens added without resizing the model) is warned about when no row holds such an id: DPOTrainer trains on
    it, but text that tokenizes to one of them fails. Rows of an `IterableDataset` are not read ahead.
    """
    tokenizer = text_tokenizer(processing_class)
    limits = [size for size in (embedding_rows(model), output_vocab_size(model)) if size is not None]
    if not limits:
        return
    rows = min(limits)
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    tokenizer_size = len(tokenizer) if hasattr(tokenizer, "__len__") else len(vocabulary)
    largest_tokenizer_id = max(vocabulary.values(), default=tokenizer_size - 1)
    tokenizer_text = f"the tokenizer ({tokenizer_size} tokens, largest id {largest_tokenizer_id})"
    model_text = f"the model's embedding has {rows} rows (ids 0 to {rows - 1})"
    fix = (
        "Use the tokenizer the model was trained with; if you added tokens to it, resize the model's embeddings to "
        "match before training (`model.resize_token_embeddings(len(tokenizer))`, then pass that model, or save it and "
        "pass its path)."
    )
    for name, dataset in datasets.items():
        if not isinstance(dataset, Dataset):
            continue
        found = _largest_token_ids(dataset)
        if found is not None and found[0] >= rows:
            largest, row, column = found
            raise ValueError(
                f"The {name} dataset holds token id {largest} (row {row}, `{column}`), but {model_text}: "
                f"{tokenizer_text} is not the model's, or tokens were added to it without resizing the model. {fix}"
            )
    if pad_token_id is not None and pad_token_id >= rows:
        raise ValueError(
            f"Batches are padded with the token id {pad_token_id} (the pad token), but {model_text}: padding would "
            f"fail at the first batch. {tokenizer_text[0].upper() + tokenizer_text[1:]} is not the model's, or the pad "
            f"token was added to it without resizing the model. {fix} To pad without a new token, set "
            "`tokenizer.pad_token = tokenizer.eos_token`."
        )
    if largest_tokenizer_id >= rows:
        logger.warning_once(
            f"{tokenizer_text[0].upper() + tokenizer_text[1:]} has ids that the model cannot embed: {model_text}. No "
            "row of the (map-style) datasets holds such an id, so training runs, but text that tokenizes to one of "
            "them fails with `IndexError: index out of range` (rows of a streamed dataset are only read during "
            f"training). {fix}"
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


def check_chat_template(dataset, dataset_name: str, processing_class) -> None:
    """Refuse conversational rows when the processing class has no chat template to render them: transformers would
    fail inside DPOTrainer's tokenization with a message that names neither the dataset nor the fix."""
    first_row = next(iter(dataset), None)
    if first_row is None or not isinstance(first_row.get("chosen"), list):
        return
    if getattr(processing_class, "chat_template", None) is not None:
        return
    source = getattr(processing_class, "name_or_path", None)
    loaded_from = f", loaded from {source!r}" if source else ""
    raise ValueError(
        f"The {dataset_name} dataset is conversational (its rows are lists of {{'role', 'content'}} messages), but "
        f"the processing class ({type(processing_class).__name__}{loaded_from}) has no chat template to render the "
        "messages into text. Pass as `processing_class` a tokenizer whose `chat_template` is set (e.g. the tokenizer "
        "of the model's chat or instruct version, or set `tokenizer.chat_template` to a Jinja template), or save a "
        "template beside the model (`tokenizer.save_pretrained(model_path)` after setting it writes "
        "`chat_template.jinja`; the scripts load the tokenizer from `--model_name_or_path`), or convert the rows to "
        "the standard format (strings)."
    )


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
    if not is_peft_model(model):
        return
    from peft.utils import TrainableTokensWrapper  # here: importing peft imports bitsandbytes, which may print notices

    if isinstance(model.get_base_model().get_output_embeddings(), TrainableTokensWrapper):
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


def check_not_only_identical_pairs(num_identical: int, num_rows: int, dataset_name: str) -> None:
    """Refuse a dataset in which every pair has the same chosen and rejected tokens: there is no preference to learn
    (DPO's loss stays at ln 2 with a zero gradient, while the optimiser's momentum and weight decay, and the per-token
    terms of TDPO and TBPO, still move the weights), so such a run only wastes its compute."""
    if num_rows == 0 or num_identical < num_rows:
        return
    raise ValueError(
        f"Every pair of the {dataset_name} dataset ({num_rows} rows) has identical chosen and rejected completions "
        "(the same tokens), so the dataset expresses no preference and training would learn nothing from it. Check "
        "how the `rejected` column was built (e.g. a mapping that copied `chosen` into it, or the same column loaded "
        "twice), and drop pairs without a preference (`dataset.filter(lambda row: row['chosen'] != "
        "row['rejected'])`)."
    )


# Above this mean reference mass outside the cached top-k, the cached KL's p90 relative error reaches about 1%
# (docs/benchmarks.md, "Reference cache": the aggregate error was 1.5-4.4x the mean bucket mass, the p90 2-3x that)
CACHE_TAIL_MASS_THRESHOLD = 1e-3
# A whole-vocabulary (exact) cache is suggested outright when it takes at most this much for the dataset
CHEAP_EXACT_CACHE_BYTES = 2**30
_CACHE_ROWS_PER_BATCH = 1024


def _cache_tail_masses(dataset: Dataset, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cached completion token: the reference's mass outside its top-k (the bucket) and the probability of the
    k-th (least likely) cached token, read from the reference cache's columns in batches of rows."""
    from .precompute import REF_TAIL_COLUMNS, REF_TOPK_LOGPS_COLUMNS

    tails, smallest = [], []
    view = dataset.select_columns([*REF_TAIL_COLUMNS, *REF_TOPK_LOGPS_COLUMNS]).with_format("arrow")
    for start in range(0, len(dataset), _CACHE_ROWS_PER_BATCH):
        table = view[start : start + _CACHE_ROWS_PER_BATCH]
        for tail_column, topk_column in zip(REF_TAIL_COLUMNS, REF_TOPK_LOGPS_COLUMNS, strict=True):
            # Tokens that truncation removed hold nulls in both columns: dropped in both, the rest stay aligned
            tail = pc.list_flatten(table[tail_column]).drop_null().to_numpy(zero_copy_only=False)
            topk = pc.list_flatten(table[topk_column]).drop_null().to_numpy(zero_copy_only=False)
            tails.append(np.exp(tail.astype(np.float64)))
            smallest.append(np.exp(topk.reshape(-1, k).min(axis=1).astype(np.float64)))
    return np.concatenate(tails), np.concatenate(smallest)


def smallest_sufficient_top_k(masses: np.ndarray, kth_probs: np.ndarray, k: int, vocab_size: int, threshold: float):
    """A lower bound on the `ref_top_k` whose mean bucket mass is at most `threshold`, from a cache at k.

    No uncached token is more likely than the k-th cached one, so caching j more tokens removes at most
    `j·p_k` from a token's bucket mass m: its bucket keeps at least `max(0, m − j·p_k)`. The smallest j for which the
    mean of that bound falls to `threshold` (found by bisection) gives the bound `k + j`; it is reached only if the
    tail is flat, so the k needed may be larger (never smaller).
    """
    low, high = 0, vocab_size - k  # at j = V - k the bound is 0: every token is cached

    def bound(j):
        return np.maximum(masses - j * kth_probs, 0.0).mean()

    while low < high:
        middle = (low + high) // 2
        if bound(middle) <= threshold:
            high = middle
        else:
            low = middle + 1
    return k + low


def warn_if_reference_cache_misses_mass(dataset: Dataset, name: str, k: int, vocab_size: int) -> None:
    """After the reference-cache precompute: warn when the reference's mean mass outside the cached top-k (what
    `kl/cache_tail_mass` logs during training) is above [`CACHE_TAIL_MASS_THRESHOLD`], with the `ref_top_k` to use.

    The mean is over every cached completion token. The `ref_top_k` suggested is the whole vocabulary (the exact KL)
    when its cache is cheap (at most [`CHEAP_EXACT_CACHE_BYTES`] for this dataset) or not much larger than the
    smallest k that could suffice ([`smallest_sufficient_top_k`]); otherwise that lower bound, which the cached
    values can give but not the k that suffices (that needs the probabilities the cache does not hold).
    """
    if k >= vocab_size or len(dataset) == 0:
        return
    from .precompute import cache_bytes_per_token

    masses, kth_probs = _cache_tail_masses(dataset, k)
    if masses.size == 0:
        return
    mean_mass = float(masses.mean())
    if mean_mass <= CACHE_TAIL_MASS_THRESHOLD:
        return
    needed = smallest_sufficient_top_k(masses, kth_probs, k, vocab_size, CACHE_TAIL_MASS_THRESHOLD)
    exact_bytes = masses.size * cache_bytes_per_token(vocab_size)
    exact_size = f"{exact_bytes / 2**20:,.1f} MiB" if exact_bytes < 2**30 else f"{exact_bytes / 2**30:,.1f} GiB"
    exact = f"`ref_top_k={vocab_size}`, the whole vocabulary (the KL is then exact; {exact_size} for this dataset)"
    bound = (
        f"a lower bound from the cached probabilities: no uncached token is more likely than the {k}-th cached one, "
        "so fewer cannot suffice"
    )
    if exact_bytes <= CHEAP_EXACT_CACHE_BYTES:
        advice = f"Set {exact}."
    elif 2 * needed >= vocab_size:
        advice = (
            f"At least {needed} of the {vocab_size} tokens would have to be cached ({bound}): set {exact}, or train "
            "against the live reference (`precompute_ref_log_probs=False`)."
        )
    else:
        advice = (
            f"Raise `ref_top_k` to at least {needed} ({bound}; the k that suffices may be larger), e.g. "
            f"`ref_top_k={2 ** math.ceil(math.log2(needed))}`, and check `kl/cache_tail_mass` in the logs; or set "
            f"{exact}; or train against the live reference (`precompute_ref_log_probs=False`)."
        )
    logger.warning(
        f"The reference cache of the {name} dataset leaves on average {mean_mass:.3g} of the reference's probability "
        f"outside its top {k} tokens (`kl/cache_tail_mass`, over {masses.size:,} completion tokens). The cached KL is "
        f"a lower bound of the exact KL whose error grows with that mass: above {CACHE_TAIL_MASS_THRESHOLD:g} it "
        'exceeds about 1% (docs/benchmarks.md, "Reference cache"). ' + advice
    )
