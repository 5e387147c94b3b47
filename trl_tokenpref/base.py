"""What every token-level trainer shares: the config fields and checks, the forward passes, and DPO's metrics.

A token-level trainer is a [`~trl.DPOTrainer`] whose `compute_loss` needs per-token statistics instead of per-sequence
sums. Everything else (model loading, PEFT, quantisation, the reference model, dataset preparation, the collator,
logging, checkpoints) is DPOTrainer's own code, inherited unchanged. This module adds:

* [`TokenLevelDPOConfig`]: the fields and checks common to TDPO, TGDPO and TBPO;
* [`TokenLevelDPOTrainer`]: patches the policy (and reference) with the fused token-statistics head
  (`token_stats.add_token_stats_head`), runs the reference and policy forwards, and logs every metric DPOTrainer logs,
  with DPOTrainer's meaning, so dashboards stay comparable;
* the input checks every trainer runs at init, before any training: the tokenizer's special tokens, the LM head (not
  quantized, not a PEFT adapter), and every dataset row (its fields before DPOTrainer tokenizes it, its token counts
  after), each refused with its row index, the problem and the fix. Where DPOTrainer silently drops a row whose
  prompt fills `max_length`, the token-level trainers refuse it by name.

Each method's trainer (`tdpo/`, `tgdpo/`, `tbpo/`) then only writes its `compute_loss`: statistics → loss → metrics.
"""

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft.utils import AuxiliaryTrainingWrapper, TrainableTokensWrapper
from transformers import AutoProcessor, ProcessorMixin, TrainerCallback
from trl import DPOConfig, DPOTrainer, extract_prompt

from ._compat import disable_gradient_checkpointing, use_adapter
from .token_stats import TokenStatsOutput, add_token_stats_head, lm_head_of


logger = get_logger(__name__)


@dataclass
class TokenLevelDPOConfig(DPOConfig):
    r"""
    Parameters shared by the token-level trainers. See [`~trl.DPOConfig`] for every other parameter.

    Parameters:
        > Parameters that control the token statistics

        token_chunk_size (`int` or `None`, *optional*):
            Number of completion tokens projected through the LM head at once when computing per-token log-probs and
            KL. Peak memory grows with `token_chunk_size × vocab_size`; `None` picks a size per device (a tile of
            about 2M elements (512 tokens x 4096 vocabulary columns) on CPU and 64M on GPU).
    """

    token_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Number of completion tokens projected through the LM head at once when computing per-token "
            "log-probs and KL. Peak memory grows with token_chunk_size x vocab_size; None picks a size per device."
        },
    )

    # Set by each method's config: whether the loss needs the reference's whole next-token distribution (a KL term)
    _needs_reference_distribution = False
    _method_name = "token-level DPO"
    # DPO loss options (name: default) that change DPO's loss and have no token-level counterpart here
    _unsupported_dpo_options = {
        "f_divergence_type": "reverse_kl",
        "ld_alpha": None,
        "use_weighting": False,
        "label_smoothing": 0.0,
    }

    def __post_init__(self):
        # Our checks come before TrainingArguments' own, so that a wrong value of ours is the error the user sees
        # `not (x > 0)` rather than `x <= 0`: NaN fails every comparison and would otherwise pass
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"`beta` must be positive and finite, got {self.beta}. The paper default is 0.1.")
        if self.max_length is not None and not self.max_length >= 2:
            raise ValueError(
                f"`max_length` must be at least 2, or None for no truncation, got {self.max_length}: the first token "
                "of a sequence has no label, so a completion token can only be trained on from position 1 onwards."
            )
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(
                f"`truncation_mode` must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}. DPOTrainer "
                "would only notice at the first batch, after loading the models and tokenizing the dataset."
            )
        if self.token_chunk_size is not None and self.token_chunk_size < 1:
            raise ValueError(f"`token_chunk_size` must be a positive integer or None, got {self.token_chunk_size}.")
        loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_type != ["sigmoid"]:
            raise ValueError(
                f"{self._method_name} defines its own loss, so `loss_type` must be left at its default ['sigmoid'], "
                f"got {self.loss_type}. To train with another DPO loss type, use `trl.DPOTrainer`."
            )
        if self.loss_weights not in (None, [1.0]):
            raise ValueError(f"`loss_weights` is not supported by {self._method_name}; leave it unset.")
        for name, default in self._unsupported_dpo_options.items():
            value = getattr(self, name)
            if value != default:
                raise ValueError(
                    f"`{name}={value!r}` is a DPO loss option that {self._method_name} does not implement. Leave it "
                    f"at its default ({default!r}), or use `trl.DPOTrainer` for this loss."
                )
        if self.precompute_ref_log_probs and self._needs_reference_distribution:
            raise ValueError(
                f"{self._method_name} cannot use `precompute_ref_log_probs=True`: its loss needs the reference "
                "model's whole next-token distribution at every completion token (for the per-token KL), which "
                "depends on the policy at each step and is far too large to store, whereas precomputing only keeps "
                "the summed log-probability of each completion. Set `precompute_ref_log_probs=False`. To save "
                "memory, use a PEFT adapter instead: the reference is then the same model with the adapter disabled."
            )
        super().__post_init__()


# ---------------------------------------------------------------------------------------------------------------------
# Dataset checks: every row is checked before DPOTrainer tokenizes it, and every tokenized row before training, so that
# a malformed row fails at init with its index instead of deep inside a template, a tokenizer or a training step
# ---------------------------------------------------------------------------------------------------------------------

# Roles a conversational prompt may end with: the completion is the assistant's answer to this turn (a user message, or
# a tool result after an assistant's tool call; "ipython" is Llama 3's tool-result role)
_PROMPT_FINAL_ROLES = ("user", "tool", "ipython")
# Roles a conversational completion may hold: assistant turns, possibly with tool calls and their results in between
_COMPLETION_ROLES = ("assistant", "tool", "ipython")
_IMPLICIT_PROMPT = object()  # the `prompt` of a dataset without a prompt column: TRL extracts it from chosen/rejected
_VALIDATION_BATCH_ROWS = 10_000
_LISTED_ROWS = 10  # bad rows named in an error message, besides their count


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


def _scored_completion_range(prompt_len: int, completion_len: int, max_length: int | None, truncation_mode: str):
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


def _scored_completion_counts(
    prompt_lens: np.ndarray, completion_lens: np.ndarray, max_length: int | None, truncation_mode: str
) -> np.ndarray:
    """Vectorised `stop - start` of [`_scored_completion_range`]: the completion tokens each row trains on."""
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


def _check_streamed_row(example: dict, index: int, dataset_name: str, has_prompt: bool, eos_token: str | None) -> dict:
    """Check one row of an `IterableDataset` as it is read (`IterableDataset.map`)."""
    prompt = example.get("prompt") if has_prompt else _IMPLICIT_PROMPT
    problem = _row_problem(prompt, example.get("chosen"), example.get("rejected"), eos_token)
    if problem is not None:
        raise ValueError(
            f"Row {index} of the {dataset_name} dataset (an IterableDataset: rows are checked as they are read): "
            f"{problem} Fix or drop the bad rows (e.g. with `dataset.filter`)."
        )
    return example


def _listed_rows(rows) -> str:
    listed = ", ".join(str(row) for row in rows[:_LISTED_ROWS])
    return listed + (", ..." if len(rows) > _LISTED_ROWS else "")


class _ResumeTokenCountCallback(TrainerCallback):
    """Carries DPOTrainer's `num_tokens` count over a resume. DPOTrainer keeps it in an attribute that no checkpoint
    saves, so a resumed run would count from 0 again; the count logged at the checkpoint's step (exact when
    `logging_steps` divides `save_steps`) is restored instead, when `train` restores the checkpoint's state."""

    def __init__(self, trainer: "TokenLevelDPOTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        counts = [log["num_tokens"] for log in state.log_history if "num_tokens" in log and "loss" in log]
        if counts:
            self.trainer._total_train_tokens = int(counts[-1])


class TokenLevelDPOTrainer(DPOTrainer):
    """A [`~trl.DPOTrainer`] whose `compute_loss` works on per-token statistics computed in chunks.

    The constructor is DPOTrainer's. Subclasses set `_config_class` and write `compute_loss` with the helpers here.
    """

    _config_class = TokenLevelDPOConfig

    def __init__(
        self,
        model,
        ref_model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = self._config_class(f"{str(model_name).split('/')[-1]}-{self._name}")
        elif not isinstance(args, self._config_class):
            raise TypeError(
                f"`args` must be a `{self._config_class.__name__}`, got `{type(args).__name__}`. Build it with "
                f"`{self._config_class.__name__}(...)`: it accepts every `DPOConfig` argument."
            )
        self._check_lm_head_not_quantized(model)
        if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
            # Before DPOTrainer, which reads a first row before preparing the dataset (a bare `StopIteration`)
            raise ValueError("The train dataset has no rows.")
        if processing_class is None:
            # Loaded here as DPOTrainer would load it, so that its special tokens are checked before anything else
            model_id = model if isinstance(model, str) else model.config._name_or_path
            revision = (args.model_init_kwargs or {}).get("revision") if isinstance(model, str) else None
            processing_class = AutoProcessor.from_pretrained(
                model_id, revision=revision, trust_remote_code=args.trust_remote_code
            )
        self._check_special_tokens(processing_class, args)
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._check_lm_head_not_quantized(self.model)
        if is_peft_model(self.model) and isinstance(
            self.model.get_base_model().get_output_embeddings(), TrainableTokensWrapper
        ):
            raise ValueError(
                "PEFT's `trainable_token_indices` on the LM head is not supported: the token-level trainers read the "
                "LM head's weight and bias directly to compute per-token statistics in chunks, and the wrapper that "
                "trains a few of its rows exposes no bias. Train the whole head with `modules_to_save=['lm_head']`, "
                "or leave the LM head out of `trainable_token_indices`."
            )
        self.add_callback(_ResumeTokenCountCallback(self))
        # DPOTrainer patched its fused LM head; ours wraps it. The statistics are computed inside the model's forward,
        # so DDP, DeepSpeed ZeRO-3 and FSDP see the LM head used as in any forward.
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_token_stats_head(policy)
        if self.ref_model is not None:
            add_token_stats_head(self.accelerator.unwrap_model(self.ref_model))

    @staticmethod
    def _check_lm_head_not_quantized(model) -> None:
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

    @staticmethod
    def _check_special_tokens(processing_class, args) -> None:
        """DPOTrainer pads with the EOS token when the tokenizer has no pad token. That is safe here: every mask
        (attention, completion, labels) comes from sequence lengths, never from comparing ids with the pad id, so the
        EOS that ends a completion is still trained on. Say so once; refuse a tokenizer with neither token."""
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
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
    # Dataset checks (the helpers are at the top of this module)
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """DPOTrainer's preparation (prompt extraction, EOS, tokenization), with every row checked on the way.

        A map-style `Dataset` is checked whole, before tokenization (its fields) and after (its token counts): the
        first bad row raises a `ValueError` naming its index, its problem and the fix, with the number of bad rows.
        Where DPOTrainer silently drops a row whose prompt alone fills `max_length`, this raises too, so that a run
        trains on the data it was given. An `IterableDataset` cannot be checked before training: its rows are checked
        as they are read (the first one at init), and rows whose prompt fills `max_length` are dropped, as DPOTrainer
        drops them.
        """
        has_prompt = self._check_columns(dataset, dataset_name)
        eos_token = self._tokenizer.eos_token
        if not isinstance(dataset, Dataset):
            dataset = dataset.map(
                _check_streamed_row,
                with_indices=True,
                features=dataset.features,
                fn_kwargs={"dataset_name": dataset_name, "has_prompt": has_prompt, "eos_token": eos_token},
            )
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        self._check_rows(dataset, dataset_name, has_prompt, eos_token)
        # DPOTrainer's only use of `max_length` here is to drop the rows whose prompt fills it (keep_start): tokenize
        # without that filter, then refuse those rows by name below (the collator still truncates with `max_length`)
        tokenize_args = args
        if args.max_length is not None and args.truncation_mode == "keep_start":
            tokenize_args = copy.copy(args)
            tokenize_args.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, tokenize_args, dataset_name)
        self._check_token_counts(dataset, dataset_name, args)
        return dataset

    def _check_columns(self, dataset, dataset_name: str) -> bool:
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
        if isinstance(first_row["chosen"], str) and self._tokenizer.eos_token is None:
            raise ValueError(
                f"The {dataset_name} dataset holds strings, and DPOTrainer appends the EOS token to string "
                "completions so that the model learns where a completion ends, but the tokenizer has no EOS token. "
                "Set `tokenizer.eos_token` to the vocabulary's end-of-text token, or use conversational data (the "
                "chat template closes each turn)."
            )
        return "prompt" in columns

    @staticmethod
    def _check_rows(dataset: Dataset, dataset_name: str, has_prompt: bool, eos_token: str | None) -> None:
        """Check every row's fields (plain Python over batches of columns: ~0.1 s per 100k string rows, ~1.5 s per
        100k conversational rows, most of it Arrow-to-Python conversion)."""
        columns = ["prompt", "chosen", "rejected"] if has_prompt else ["chosen", "rejected"]
        view = dataset.select_columns(columns).with_format(None)
        bad_rows, first_problem = [], None
        for start in range(0, len(view), _VALIDATION_BATCH_ROWS):
            batch = view[start : start + _VALIDATION_BATCH_ROWS]
            prompts = batch["prompt"] if has_prompt else [_IMPLICIT_PROMPT] * len(batch["chosen"])
            for offset, (prompt, chosen, rejected) in enumerate(zip(prompts, batch["chosen"], batch["rejected"])):
                problem = _row_problem(prompt, chosen, rejected, eos_token)
                if problem is not None:
                    bad_rows.append(start + offset)
                    first_problem = first_problem or problem
        if bad_rows:
            count = ""
            if len(bad_rows) > 1:
                count = f" {len(bad_rows)} of its {len(view)} rows have a problem (rows {_listed_rows(bad_rows)})."
            raise ValueError(
                f"Row {bad_rows[0]} of the {dataset_name} dataset: {first_problem}{count} Fix or drop the bad rows "
                "before training (e.g. with `dataset.filter`)."
            )

    @staticmethod
    def _check_token_counts(dataset: Dataset, dataset_name: str, args) -> None:
        """Refuse a tokenized row of which a completion keeps no token to train on after `max_length` truncation
        (vectorised over Arrow buffers: ~10 ms per 100k rows)."""
        table = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
        lengths = {
            name: pc.list_value_length(table[f"{name}_ids"]).to_numpy().astype(np.int64)
            for name in ("prompt", "chosen", "rejected")
        }
        max_length, mode = args.max_length, args.truncation_mode
        kept = {
            side: _scored_completion_counts(lengths["prompt"], lengths[side], max_length, mode)
            for side in ("chosen", "rejected")
        }
        bad_rows = np.flatnonzero((kept["chosen"] == 0) | (kept["rejected"] == 0))
        if not bad_rows.size:
            return
        row = int(bad_rows[0])
        prompt_len = int(lengths["prompt"][row])
        side = "chosen" if kept["chosen"][row] == 0 else "rejected"
        completion_len = int(lengths[side][row])
        sizes = f"(prompt {prompt_len} tokens, chosen {lengths['chosen'][row]}, rejected {lengths['rejected'][row]})"
        if max_length is not None and mode == "keep_start" and prompt_len >= max_length:
            problem = (
                f"its prompt alone fills `max_length={max_length}` {sizes}, so truncation (keep_start) leaves no "
                "completion token to train on. DPOTrainer drops such rows silently; the token-level trainers refuse "
                "them, so that a run trains on the data it was given."
            )
            fix = (
                f"Raise `max_length` above the longest prompt ({lengths['prompt'].max()} tokens), or shorten or drop "
                "the long prompts before training (e.g. with `dataset.filter`)."
            )
        elif prompt_len == 0:
            problem = (
                f"its tokenized prompt is empty {sizes}: TRL takes as the prompt the tokens shared by the tokenized "
                "prompt and the tokenized prompt + completion, and these differ from the first token (the tokenizer "
                "merges the end of the prompt with the start of the completion, or the chat template renders the "
                f"prompt alone differently). The first token of a sequence has no label, so the {side} completion "
                "keeps no token to train on."
            )
            fix = (
                "End the prompt on a token boundary (e.g. start the completions with a space), or use a chat template "
                "that renders the prompt alone as a prefix of prompt + completion."
            )
        else:
            problem = (
                f"its {side} completion keeps {kept[side][row]} of its {completion_len} tokens to train on {sizes} "
                f"with `max_length={max_length}` and `truncation_mode={mode!r}`."
            )
            fix = "Check what the completion tokenizes to (and the chat template), or drop the row before training."
        count = ""
        if bad_rows.size > 1:
            listed = _listed_rows(bad_rows)
            count = f" {bad_rows.size} of its {len(dataset)} rows keep no completion token (rows {listed})."
        raise ValueError(f"Row {row} of the {dataset_name} dataset: {problem}{count} {fix}")

    # ------------------------------------------------------------------------------------------------------------
    # Forward passes
    # ------------------------------------------------------------------------------------------------------------

    def _model_kwargs(self, inputs: dict) -> dict:
        """The model inputs of a collated preference batch (DataCollatorForPreference's keys minus the masks/columns
        the loss reads)."""
        non_model_keys = {
            "completion_mask",
            "ref_chosen_logps",
            "ref_rejected_logps",
            "chosen_token_rewards",
            "rejected_token_rewards",
            "ref_chosen_token_logps",
            "ref_rejected_token_logps",
        }
        model_kwargs = {k: v for k, v in inputs.items() if k not in non_model_keys}
        model_kwargs["use_cache"] = False
        return model_kwargs

    @staticmethod
    def _labels(inputs: dict) -> torch.Tensor:
        return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)

    def _reference_hidden_states(self, inputs: dict) -> torch.Tensor:
        """Final hidden states of the reference model, `[2B, L-1, H]`, without gradient.

        The reference is, as in DPOTrainer: the explicit or reloaded `ref_model`; or, with PEFT, the same model with
        its adapter disabled (or its frozen "ref" adapter active).
        """
        model_kwargs = self._model_kwargs(inputs)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter_name = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=adapter_name):
                    outputs = self.model(**model_kwargs, token_stats=True, return_hidden_states_only=True)
            else:
                outputs = self.ref_model(**model_kwargs, token_stats=True, return_hidden_states_only=True)
        return outputs.hidden_states

    def _reference_lm_head(self):
        """The reference's LM head, or None when it is the policy's own (PEFT: the head carries no adapter)."""
        if self.ref_model is not None:
            return lm_head_of(self.accelerator.unwrap_model(self.ref_model))
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(unwrapped):
            return None
        # PEFT's `modules_to_save=["lm_head"]` trains a copy of the head, and `lm_head.weight` is the trained copy
        # while an adapter is active. The reference must use the head of
        # the adapter-free (or "ref" adapter) model; without this, the reference would drift with the policy, and the
        # per-token KL of the head would be 0 whatever the policy learns.
        if not isinstance(unwrapped.get_base_model().get_output_embeddings(), AuxiliaryTrainingWrapper):
            return None
        adapter_name = "ref" if "ref" in unwrapped.peft_config else None
        with use_adapter(unwrapped, adapter_name=adapter_name):
            return lm_head_of(unwrapped.get_base_model())

    def _policy_forward(
        self,
        model,
        inputs: dict,
        ref_hidden_states: torch.Tensor | None = None,
        return_hidden_states: bool = False,
    ) -> TokenStatsOutput:
        """Policy forward returning per-token statistics `[2B, L-1]`; with `ref_hidden_states`, also the reference
        log-probs and the per-token forward KL, all from one chunked pass over both LM heads."""
        model_kwargs = self._model_kwargs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        return model(
            **model_kwargs,
            labels=self._labels(inputs),
            token_stats=True,
            ref_hidden_states=ref_hidden_states,
            ref_lm_head=self._reference_lm_head() if ref_hidden_states is not None else None,
            return_hidden_states=return_hidden_states,
            chunk_size=self.args.token_chunk_size,
        )

    def _add_aux_loss(self, loss: torch.Tensor, outputs: TokenStatsOutput, mode: str) -> torch.Tensor:
        """MoE load-balancing loss, weighted and logged as DPOTrainer does."""
        if not self.aux_loss_enabled or outputs.aux_loss is None:
            return loss
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        return loss + self.router_aux_loss_coef * outputs.aux_loss

    def _maybe_return_outputs(self, model, inputs, loss, return_outputs):
        """`return_outputs=True` (used by `compute_metrics`) needs logits, which the chunked pass never builds: run a
        plain forward for them, as DPOTrainer does."""
        if not return_outputs:
            return loss
        with torch.no_grad():
            outputs = model(**self._model_kwargs(inputs))
        return loss, outputs

    # ------------------------------------------------------------------------------------------------------------
    # Metrics, reduced across processes as DPOTrainer reduces them
    # ------------------------------------------------------------------------------------------------------------

    def _log_token_mean(self, mode: str, key: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Mean of a per-token value over the masked tokens of every process: global sum / global count."""
        total = self.accelerator.gather_for_metrics(torch.where(mask, values.detach().float(), 0.0).sum()).sum()
        count = self.accelerator.gather_for_metrics(mask.sum()).sum()
        self._metrics[mode][key].append((total / count).item() if count > 0 else 0.0)

    def _log_pair_mean(self, mode: str, key: str, values: torch.Tensor) -> None:
        """Mean over the pairs of every process of a per-pair value."""
        self._metrics[mode][key].append(self.accelerator.gather(values.detach().float()).mean().item())

    def _log_dpo_metrics(
        self,
        mode: str,
        inputs: dict,
        outputs: TokenStatsOutput,
        mask: torch.Tensor,
        chosen_logratios: torch.Tensor,
        rejected_logratios: torch.Tensor,
    ) -> None:
        """Every metric DPOTrainer logs, with DPOTrainer's meaning.

        `rewards/*` are DPO's implicit rewards β·Σ_t ρ_t (not a method's own reward), `logps/*` the summed policy
        log-probs, `logits/*` the mean logit, `entropy` the mean policy entropy and `mean_token_accuracy` the
        fraction of chosen tokens that are the policy's argmax.
        """
        stats = outputs.stats
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)
        self._log_token_mean(mode, "entropy", stats.entropy, mask)

        if mode == "train":
            num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens_in_batch // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        chosen_mean_logits, rejected_mean_logits = stats.mean_logits.chunk(2, dim=0)
        self._log_token_mean(mode, "logits/chosen", chosen_mean_logits, chosen_mask)
        self._log_token_mean(mode, "logits/rejected", rejected_mean_logits, rejected_mask)
        chosen_is_top1, _ = stats.is_top1.chunk(2, dim=0)
        self._log_token_mean(mode, "mean_token_accuracy", chosen_is_top1, chosen_mask)

        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        self._log_pair_mean(mode, "rewards/chosen", chosen_rewards)
        self._log_pair_mean(mode, "rewards/rejected", rejected_rewards)
        self._log_pair_mean(mode, "rewards/accuracies", (chosen_rewards > rejected_rewards).float())
        self._log_pair_mean(mode, "rewards/margins", chosen_rewards - rejected_rewards)

        logps = torch.where(mask, stats.log_probs.detach(), 0.0).sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        self._log_pair_mean(mode, "logps/chosen", chosen_logps)
        self._log_pair_mean(mode, "logps/rejected", rejected_logps)
