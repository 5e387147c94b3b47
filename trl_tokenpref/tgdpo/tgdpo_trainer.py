"""TGDPO: DPO with a per-token weight β·(1 ± α·r̂_t) from a frozen guidance model (ALGORITHMS.md §2).

Where the token rewards r̂_t = β·(log π_guide(y_t|s_t) − log π_ref(y_t|s_t)) come from, per dataset:

* **precomputed columns** `chosen_token_rewards` / `rejected_token_rewards` (one float per completion token, written by
  `scripts/compute_token_rewards.py`): read from the batch, no guidance model in memory;
* otherwise a **guidance model** (`guidance_model=` or `args.guidance_model_name_or_path`): one more forward pass per
  step, without gradient; or, with `precompute_ref_log_probs=True`, once before training, together with the reference.

With `precompute_ref_log_probs=True` the reference's per-token log-probabilities (the loss weights each token's
log-ratio, so DPOTrainer's summed log-probs are not enough) are stored as the columns `ref_chosen_token_logps` /
`ref_rejected_token_logps`; a training step is then a DPO step: one policy forward and backward.
"""

import gc
import math
import os
import textwrap
from contextlib import nullcontext
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from .._compat import (
    DataCollatorForPreference,
    create_model_from_path,
    disable_dropout_in_model,
    disable_gradient_checkpointing,
    hash_module,
    prepare_deepspeed,
    prepare_fsdp,
    use_adapter,
)
from ..base import TokenLevelDPOTrainer, _scored_completion_range
from ..losses import sequence_sum, tgdpo_loss
from ..token_stats import add_token_stats_head
from .tgdpo_config import TGDPOConfig


logger = get_logger(__name__)

# Per-token dataset columns: one value per completion token of the tokenized `chosen_ids` / `rejected_ids`
TOKEN_REWARD_COLUMNS = ("chosen_token_rewards", "rejected_token_rewards")  # r̂_t = β·(log π_guide − log π_ref)
REF_TOKEN_LOGPS_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")  # log π_ref, precompute only
PER_TOKEN_COLUMNS = TOKEN_REWARD_COLUMNS + REF_TOKEN_LOGPS_COLUMNS

_ROW_COLUMN = "__tgdpo_row__"  # the user's row index, carried through dataset preparation for error messages
_VALIDATION_BATCH_ROWS = 4096
_PRECOMPUTE_VERSION = "tgdpo-token-values-1"  # part of the cache key: bump when the stored values change meaning


def _side(column: str) -> str:
    return "chosen" if "chosen" in column else "rejected"


@dataclass
class DataCollatorForTGDPO(DataCollatorForPreference):
    """
    [`~trl.trainer.dpo_trainer.DataCollatorForPreference`] that also pads the per-token columns of TGDPO.

    Each of `chosen_token_rewards`, `rejected_token_rewards`, `ref_chosen_token_logps` and `ref_rejected_token_logps`
    that the examples carry holds one float per token of `chosen_ids` / `rejected_ids`. It is returned as a float32
    tensor of shape `(batch_size, seq_len - 1)` aligned with the shifted labels, like the per-token statistics: the
    value of the completion token at position `p` of the padded sequence sits at column `p - 1`, and every other
    column (prompt, padding) is 0. Values are truncated exactly as the token ids are (`max_length`,
    `truncation_mode`), so a truncated completion keeps the values of the tokens it keeps. A value may be missing
    (`None`) only for a token that the truncation removes.
    """

    def torch_call(self, examples: list[dict]) -> dict:
        output = super().torch_call(examples)
        num_columns = output["input_ids"].size(1) - 1
        for column in PER_TOKEN_COLUMNS:
            if column in examples[0]:
                output[column] = self._align(examples, column, num_columns)
        return output

    def _align(self, examples: list[dict], column: str, num_columns: int) -> torch.Tensor:
        side = _side(column)
        aligned = torch.zeros(len(examples), num_columns, dtype=torch.float32)
        for i, example in enumerate(examples):
            values, num_tokens = example[column], len(example[f"{side}_ids"])
            if values is None or len(values) != num_tokens:
                raise ValueError(
                    f"Example {i} of this batch has {'no' if values is None else len(values)} values in `{column}` "
                    f"but {num_tokens} tokens in `{side}_ids`: the column must hold one float per completion token, "
                    "as the trainer tokenizes it. Recompute it with `scripts/compute_token_rewards.py` using the "
                    "training tokenizer."
                )
            start, stop, position = _scored_completion_range(
                len(example["prompt_ids"]), num_tokens, self.max_length, self.truncation_mode
            )
            kept = torch.tensor([math.nan if v is None else float(v) for v in values[start:stop]], dtype=torch.float32)
            if not torch.isfinite(kept).all():
                raise ValueError(
                    f"Example {i} of this batch has a missing or non-finite value in `{column}` at a completion token "
                    "that training reads. Values must be finite; recompute them with `scripts/compute_token_rewards.py` "
                    "using the training `max_length` and `truncation_mode`."
                )
            # The label of the token at sequence position p sits at column p - 1 of the shifted tensors
            aligned[i, position - 1 : position - 1 + kept.numel()] = kept
        return aligned


def _validate_token_rewards(dataset: Dataset, dataset_name: str, args: TGDPOConfig, row_column: str) -> None:
    """Check, once before training, that every precomputed value the trainer will read exists and is finite.

    Raises a `ValueError` naming the first bad row (its index in the dataset the user passed), what is wrong and how to
    fix it. Runs on Arrow buffers: about 0.02 s per million tokens on one CPU core.
    """
    table_view = dataset.select_columns(
        ["prompt_ids", "chosen_ids", "rejected_ids", row_column, *TOKEN_REWARD_COLUMNS]
    ).with_format("arrow")
    fix = (
        "Recompute the column with `scripts/compute_token_rewards.py` (it tokenizes with the trainer's own code), "
        "using the training tokenizer, `max_length` and `truncation_mode`, or drop the row."
    )
    for batch_start in range(0, len(dataset), _VALIDATION_BATCH_ROWS):
        table = table_view[batch_start : batch_start + _VALIDATION_BATCH_ROWS]
        user_rows = table[row_column].to_numpy()
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
                start, stop, _ = _scored_completion_range(
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


class TGDPOTrainer(TokenLevelDPOTrainer):
    """
    Trainer for Token-level reward Guided Direct Preference Optimization (TGDPO), Zhu et al., ICML 2025
    ([paper](https://huggingface.co/papers/2506.14574)).

    A drop-in replacement for [`~trl.DPOTrainer`]: same constructor (plus `guidance_model`), same dataset formats, same
    metrics, plus `token_rewards/*`. The loss weights each token's log-ratio ρ_t = log πθ(y_t|s_t) − log π_ref(y_t|s_t)
    by its own factor (ALGORITHMS.md §2.2, the official code's `dpo_loss`):

        L = −log σ(β Σ_t (1 + α r̂^w_t) ρ^w_t − β Σ_t (1 − α r̂^l_t) ρ^l_t),   r̂_t = β (log π_guide(y_t|s_t) − log π_ref(y_t|s_t))

    where π_guide is a frozen guidance model (usually a DPO model trained from the same reference) and r̂ is a
    constant: no gradient reaches the guidance or the reference model. With `alpha=0`, or a guidance model equal to
    the reference (r̂ ≡ 0), the loss is exactly DPO's.

    The token rewards come, for each dataset, either from precomputed columns `chosen_token_rewards` /
    `rejected_token_rewards` (one float per completion token, written by `scripts/compute_token_rewards.py`, holding r̂
    at the β given to that script), or from the guidance model, in one more forward pass per step without gradient.
    With `precompute_ref_log_probs=True`, the reference's per-token log-probabilities, and the guidance rewards when a
    guidance model is given, are computed once before training; a step then costs what a DPO step costs.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            Model to train, as in [`~trl.DPOTrainer`] (a path/identifier is loaded with `args.model_init_kwargs`).
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            Reference model. If `None`: with PEFT, the model with its adapter disabled; otherwise a fresh copy of the
            initial model, loaded from its path. r̂ uses this same reference, as in the official code.
        args ([`TGDPOConfig`], *optional*):
            Configuration. Defaults to `TGDPOConfig(f"{model_name}-TGDPO")`.
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks, optimizers,
        quantization_config, peft_config:
            As in [`~trl.DPOTrainer`]. The default collator is [`DataCollatorForTGDPO`]; a custom collator must pad
            the per-token columns the same way.
        guidance_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The frozen guidance model π_guide, or its path/identifier (loaded with `args.guidance_model_init_kwargs`,
            in the policy's dtype). It must share the policy's tokenizer. Alternatively set
            `args.guidance_model_name_or_path`, or give datasets with precomputed token-reward columns. Keyword only
            in practice: it comes last so that positional DPOTrainer calls keep working.

    Example:

    ```python
    from datasets import load_dataset
    from trl_tokenpref import TGDPOConfig, TGDPOTrainer

    dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")
    trainer = TGDPOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        guidance_model="my-org/Qwen2.5-0.5B-Instruct-DPO",  # a DPO model trained from the same reference
        args=TGDPOConfig(output_dir="Qwen2.5-0.5B-TGDPO"),
        train_dataset=dataset,
    )
    trainer.train()
    ```
    """

    _config_class = TGDPOConfig
    _tag_names = ["trl", "tgdpo", "trl_tokenpref"]
    _name = "TGDPO"
    _paper = {
        "title": "TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization",
        "id": "2506.14574",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{zhu2025tgdpo,
                title        = {{TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization}},
                author       = {Mingkang Zhu and Xi Chen and Zhongdao Wang and Bei Yu and Hengshuang Zhao and Jiaya Jia},
                year         = 2025,
                booktitle    = {Forty-second International Conference on Machine Learning, {ICML} 2025},
            }"""),
    }

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
        guidance_model=None,
    ):
        guidance_path = getattr(args, "guidance_model_name_or_path", None)
        if guidance_model is not None and guidance_path is not None:
            raise ValueError(
                "You passed `guidance_model` to the trainer and set `args.guidance_model_name_or_path`. Give the "
                "guidance model in one place only."
            )
        if guidance_model is not None and not isinstance(guidance_model, (str, torch.nn.Module)):
            raise TypeError(
                f"`guidance_model` must be a path/identifier (`str`) or a causal LM, got {type(guidance_model).__name__}."
            )
        if isinstance(guidance_model, torch.nn.Module) and guidance_model is model:
            raise ValueError(
                "`guidance_model` is the model being trained. The guidance model must be a frozen, separate model "
                "(usually a DPO model trained from the same reference): pass a separately loaded copy or its path."
            )
        # Set before DPOTrainer.__init__, which prepares the datasets and may precompute through our overrides
        self._guidance_source = guidance_model if guidance_model is not None else guidance_path
        self.guidance_model = None  # loaded and prepared on first use
        self._guidance_hash = None
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
        self._use_tgdpo_collator()
        if not isinstance(self.data_collator, DataCollatorForTGDPO):
            logger.warning(
                f"TGDPOTrainer got a custom data collator ({type(self.data_collator).__name__}). It must pad the "
                f"per-token columns {list(PER_TOKEN_COLUMNS)} that the datasets carry into tensors aligned with the "
                "shifted labels, as `DataCollatorForTGDPO` does; subclassing it is the simplest way."
            )
        if self._guidance_source is not None:
            if not self.precompute_ref_logps:
                self._get_guidance_model()  # load now: a bad path or tokenizer fails at init, not at the first step
            elif isinstance(self._guidance_source, str):
                # Its rewards are stored in the datasets now: free it (it is reloaded if `evaluate` gets a new dataset)
                self._release_guidance_model()

    # ------------------------------------------------------------------------------------------------------------
    # Data: per-token columns, their validation and their collation
    # ------------------------------------------------------------------------------------------------------------

    def _use_tgdpo_collator(self) -> None:
        """Swap DPOTrainer's default collator for one that also pads the per-token columns (same settings)."""
        collator = self.data_collator
        if type(collator) is DataCollatorForPreference:
            self.data_collator = DataCollatorForTGDPO(**{f.name: getattr(collator, f.name) for f in fields(collator)})

    def _set_signature_columns_if_needed(self):
        # Keep the per-token columns when `remove_unused_columns=True` drops what the model's forward does not take
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in PER_TOKEN_COLUMNS if c not in self._signature_columns]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = dataset.column_names if dataset.column_names is not None else list(next(iter(dataset)).keys())
        present = [column for column in TOKEN_REWARD_COLUMNS if column in columns]
        if len(present) == 1:
            raise ValueError(
                f"The {dataset_name} dataset has the column `{present[0]}` but not its counterpart: precomputed token "
                f"rewards need both {list(TOKEN_REWARD_COLUMNS)} (see `scripts/compute_token_rewards.py`)."
            )
        has_rewards = len(present) == 2
        if has_rewards and self._guidance_source is not None:
            raise ValueError(
                f"The {dataset_name} dataset has precomputed token-reward columns {list(TOKEN_REWARD_COLUMNS)} and a "
                "guidance model was given too (`guidance_model` or `args.guidance_model_name_or_path`), so it is "
                "ambiguous which to use. Remove the columns (`dataset.remove_columns(...)`) to compute the rewards "
                "with the guidance model, or drop the guidance model to use the columns."
            )
        if not has_rewards and self._guidance_source is None:
            raise ValueError(
                f"TGDPO needs token rewards for the {dataset_name} dataset, but there is no source for them. Pass "
                "`guidance_model=` to the trainer (a model or a path), or set `guidance_model_name_or_path` in "
                f"`TGDPOConfig`, or add the precomputed columns {list(TOKEN_REWARD_COLUMNS)} with "
                "`scripts/compute_token_rewards.py --guidance_model ... --ref_model ...`."
            )
        if not (has_rewards and isinstance(dataset, Dataset)):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        # Validate once, after tokenization (the values must match `chosen_ids` / `rejected_ids`), and report the row
        # index of the dataset the user passed, carried in a column so that it would survive a dropped row (the base
        # class refuses the rows DPOTrainer drops). An IterableDataset is checked batch by batch by the collator.
        dataset = dataset.add_column(_ROW_COLUMN, np.arange(len(dataset)))
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        _validate_token_rewards(dataset, dataset_name, args, _ROW_COLUMN)
        return dataset.remove_columns(_ROW_COLUMN)

    # ------------------------------------------------------------------------------------------------------------
    # The guidance model
    # ------------------------------------------------------------------------------------------------------------

    def _release_guidance_model(self) -> None:
        """Drop the guidance model and every reference to it, so its memory is freed: `accelerator.prepare_model`
        also keeps the prepared model in the accelerator's list of models."""
        if self.guidance_model is not None:
            self.accelerator._models = [m for m in self.accelerator._models if m is not self.guidance_model]
        self.guidance_model = None
        gc.collect()

    def _get_guidance_model(self):
        """The prepared guidance model, loaded on first use."""
        if self.guidance_model is None:
            if self._guidance_source is None:
                raise ValueError(
                    "This batch has no precomputed token rewards and the trainer has no guidance model. Pass "
                    "`guidance_model=` or add the columns with `scripts/compute_token_rewards.py`."
                )
            self.guidance_model = self._load_guidance_model(self._guidance_source)
        return self.guidance_model

    def _load_guidance_model(self, source):
        """Load (from a path, as DPOTrainer loads the reference), check, freeze, patch and prepare the guidance model."""
        if isinstance(source, str):
            init_kwargs = self.args.guidance_model_init_kwargs
            if init_kwargs is None:
                # The policy's loading options (dtype, attention, device map), but not its revision: another repo's
                init_kwargs = {k: v for k, v in (self.args.model_init_kwargs or {}).items() if k != "revision"}
            else:
                init_kwargs = dict(init_kwargs)
            # Distributed training requires device_map=None ("auto" fails)
            if self.args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            init_kwargs.setdefault("dtype", self.model.dtype)
            init_kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
            guidance = create_model_from_path(source, **init_kwargs)
            self._check_guidance_vocab(guidance)
            self._check_guidance_tokenizer(source)
        else:
            guidance = source
            self._check_guidance_vocab(guidance)
        self._check_lm_head_not_quantized(guidance)
        # r̂ is a constant (ALGORITHMS.md §2.3: the official code runs the guidance model under no_grad): freeze it and
        # make its forward deterministic
        guidance.eval()
        guidance.requires_grad_(False)
        disable_dropout_in_model(guidance)
        if self.precompute_ref_logps:
            self._guidance_hash = hash_module(guidance)  # before sharding: DTensor parameters can't be hashed
        add_token_stats_head(guidance)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(guidance, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(guidance, self.accelerator)
        return self.accelerator.prepare_model(guidance, evaluation_mode=True)

    def _check_guidance_vocab(self, guidance) -> None:
        # From the configs: under ZeRO-3 the weights may already be partitioned to empty shards
        policy_vocab = self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size
        guidance_vocab = guidance.config.get_text_config().vocab_size
        if guidance_vocab != policy_vocab:
            raise ValueError(
                f"The guidance model's vocabulary has {guidance_vocab} entries but the policy's has {policy_vocab}. "
                "The token reward r̂_t = β·(log π_guide(y_t) − log π_ref(y_t)) compares the log-probabilities of the "
                "same token ids, so the guidance model must use the policy's tokenizer: usually a DPO model trained "
                "from the same reference model."
            )

    def _check_guidance_tokenizer(self, path: str) -> None:
        """Compare the tokenizer saved with the guidance model, if any, with the training tokenizer."""
        try:
            guidance_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.args.trust_remote_code)
        except (OSError, ValueError):
            return  # no tokenizer saved with the guidance model: the vocabulary-size check is all we can do
        if guidance_tokenizer.get_vocab() != self._tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer saved with the guidance model ({path}) differs from the training tokenizer, so the "
                "same token id may be a different token for the two models and r̂ would be meaningless. Use a "
                "guidance model trained with the policy's tokenizer. If you are sure the token ids agree, load the "
                "model yourself and pass it as `guidance_model=`, which skips this check."
            )

    def _guidance_log_probs(self, inputs: dict) -> torch.Tensor:
        """log π_guide(y_t|s_t) of every label, `[2B, L-1]` (0 outside the completion), without gradient."""
        guidance = self._get_guidance_model()
        with torch.no_grad():
            outputs = guidance(
                **self._model_kwargs(inputs),
                labels=self._labels(inputs),
                token_stats=True,
                chunk_size=self.args.token_chunk_size,
            )
        return outputs.stats.log_probs

    # ------------------------------------------------------------------------------------------------------------
    # Precompute: per-token reference log-probs (and guidance rewards) instead of DPOTrainer's sums
    # ------------------------------------------------------------------------------------------------------------

    def _reference_token_log_probs(self, model, inputs: dict) -> torch.Tensor:
        """Per-token reference log-probs `[2B, L-1]`, computed as DPOTrainer's `compute_ref_log_probs` computes them
        (same model, adapter handling and fused head) but not summed."""
        adapter_context = nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
        ):
            log_probs = model(**self._model_kwargs(inputs), labels=self._labels(inputs), fused_lm_head=True).log_probs
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        return log_probs[:, -(inputs["completion_mask"].size(1) - 1) :].float()

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Mirror of DPOTrainer's `_precompute_ref_logps` (cache, broadcast, DeepSpeed engine, gather) that stores
        per-token columns: `ref_{chosen,rejected}_token_logps` and, when the dataset has no token rewards yet, the
        guidance rewards `{chosen,rejected}_token_rewards` = β·(log π_guide − log π_ref).

        Each row gets one value per token of `chosen_ids` / `rejected_ids`; the tokens that `max_length` truncates
        away are never scored and hold `None` (they are never read either).
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        self._use_tgdpo_collator()
        compute_rewards = not all(column in dataset.column_names for column in TOKEN_REWARD_COLUMNS)
        new_columns = REF_TOKEN_LOGPS_COLUMNS + (TOKEN_REWARD_COLUMNS if compute_rewards else ())
        stale = [column for column in new_columns if column in dataset.column_names]
        if stale:  # e.g. a dataset that went through this precompute before
            dataset = dataset.remove_columns(stale)
        guidance = self._get_guidance_model() if compute_rewards else None

        features = Features({column: List(Value("float32")) for column in new_columns})
        if not dataset.cache_files:
            # An in-memory dataset has no cache directory that every process can read (DPOTrainer's precompute fails
            # there under several processes: each one has its own temporary directory). Every process holds all the
            # gathered values anyway, so each builds the columns in memory.
            table = self._compute_token_values(dataset, name, batch_size, guidance, new_columns)
            columns = Dataset(InMemoryTable(table.cast(features.arrow_schema)))
            return concatenate_datasets([dataset, columns], axis=1)

        # The values depend on the truncation and, for the rewards, on the guidance model and β: all in the cache key
        key = (dataset._fingerprint, self._precompute_model_hash, self.args.max_length, self.args.truncation_mode)
        if compute_rewards:
            key += (self._guidance_hash, self.beta)
        fingerprint = [Hasher.hash((_PRECOMPUTE_VERSION, *key))]
        broadcast_object_list(fingerprint, from_process=0)
        fingerprint = fingerprint[0]
        cache_file = dataset._get_cache_file_path(fingerprint)
        if not os.path.exists(cache_file):
            table = self._compute_token_values(dataset, name, batch_size, guidance, new_columns)
            if self.accelerator.is_main_process:
                dataset.with_format("arrow").map(
                    lambda _, indices: table.slice(indices[0], len(indices)),
                    with_indices=True,
                    batched=True,
                    remove_columns=dataset.column_names,
                    features=features,
                    new_fingerprint=fingerprint,
                    cache_file_name=cache_file,
                    desc=f"Caching per-token reference log probs for {name} dataset",
                )
            self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    def _compute_token_values(self, dataset, name, batch_size, guidance, columns) -> pa.Table:
        """Run the reference (and guidance) over `dataset`; return an Arrow table with one list per row and column."""
        dataloader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            shuffle=False,
        )
        dataloader = self.accelerator.prepare(dataloader)
        # As in DPOTrainer: before `train`, DeepSpeed parameters are on CPU or sharded; wrap them in an inference engine
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model

        kept = {column: [] for column in columns}  # per batch: the flattened values of the kept completion tokens
        kept_counts = {"chosen": [], "rejected": []}  # per batch: kept completion tokens of each row
        for batch in tqdm(
            iterable=dataloader,
            desc=f"Computing per-token reference log probs for {name} dataset",
            disable=bool(os.environ.get("TQDM_DISABLE", "")),
        ):
            with self.accelerator.autocast():
                ref_log_probs = self._reference_token_log_probs(model, batch)
                rewards = None
                if guidance is not None:
                    rewards = self.beta * (self._guidance_log_probs(batch).float() - ref_log_probs)
            # Split [chosen; rejected] before gathering: `gather_for_metrics` trims the last batch to the number of
            # remaining *pairs*, so a [2B, ...] tensor would lose its rejected rows. Rows of different processes have
            # different lengths: pad them first (the mask says which values are real).
            halves = {"mask": batch["completion_mask"][:, 1:], "ref": ref_log_probs, "rewards": rewards}
            gathered = {}
            for key, value in halves.items():
                if value is None:
                    continue
                for side, half in zip(("chosen", "rejected"), value.chunk(2, dim=0), strict=True):
                    half = self.accelerator.gather_for_metrics(self.accelerator.pad_across_processes(half, dim=1))
                    gathered[key, side] = half.cpu()
            for side in ("chosen", "rejected"):
                mask = gathered["mask", side].bool()
                kept_counts[side].append(mask.sum(dim=1).numpy())
                kept[f"ref_{side}_token_logps"].append(gathered["ref", side].float()[mask].numpy())
                if rewards is not None:
                    kept[f"{side}_token_rewards"].append(gathered["rewards", side].float()[mask].numpy())

        lengths = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
        prompt_lens = pc.list_value_length(lengths["prompt_ids"]).to_numpy()
        arrays = {}
        for column in columns:
            side = _side(column)
            num_tokens = pc.list_value_length(lengths[f"{side}_ids"]).to_numpy()
            arrays[column] = self._full_length_lists(
                np.concatenate(kept[column]), np.concatenate(kept_counts[side]), prompt_lens, num_tokens
            )
        return pa.table(arrays)

    def _full_length_lists(self, kept_values, kept_counts, prompt_lens, num_tokens) -> pa.LargeListArray:
        """One list per row with one value per completion token: the scored tokens' values, and None for the tokens
        that truncation removed (the last ones under `keep_start`, the first ones under `keep_end`)."""
        offsets = np.concatenate([[0], np.cumsum(num_tokens)]).astype(np.int64)
        values = np.zeros(offsets[-1], dtype=np.float32)
        valid = np.zeros(offsets[-1], dtype=bool)
        kept_offsets = np.concatenate([[0], np.cumsum(kept_counts)])
        for row, count in enumerate(kept_counts):
            start, stop, _ = _scored_completion_range(
                int(prompt_lens[row]), int(num_tokens[row]), self.args.max_length, self.args.truncation_mode
            )
            if stop - start != count:
                raise RuntimeError(
                    f"Row {row}: {count} scored completion tokens, expected {stop - start}. The precompute batches and "
                    "the dataset are misaligned; please report this issue."
                )
            values[offsets[row] + start : offsets[row] + stop] = kept_values[kept_offsets[row] : kept_offsets[row + 1]]
            valid[offsets[row] + start : offsets[row] + stop] = True
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, mask=~valid))

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"][:, 1:].bool()  # aligned with the shifted labels

        # The guidance pass first (no gradient), so that its activations are freed before the policy's are stored
        precomputed_rewards = all(column in inputs for column in TOKEN_REWARD_COLUMNS)
        guidance_log_probs = None if precomputed_rewards else self._guidance_log_probs(inputs)

        if self.precompute_ref_logps:
            missing = [column for column in REF_TOKEN_LOGPS_COLUMNS if column not in inputs]
            if missing:
                raise ValueError(
                    f"`precompute_ref_log_probs=True` but the batch has no {missing}: the data collator must pad the "
                    "per-token columns. Use `DataCollatorForTGDPO` (the default) or a subclass of it."
                )
            outputs = self._policy_forward(model, inputs)
            ref_log_probs = torch.cat([inputs[column] for column in REF_TOKEN_LOGPS_COLUMNS], dim=0)
        else:
            # One chunked pass over both LM heads gives log πθ(y_t) and log π_ref(y_t) (the KL it also returns is unused)
            ref_hidden_states = self._reference_hidden_states(inputs)
            outputs = self._policy_forward(model, inputs, ref_hidden_states=ref_hidden_states)
            ref_log_probs = outputs.stats.ref_log_probs
        stats = outputs.stats

        # r̂_t = β·(log π_guide − log π_ref) against the same reference as ρ (ALGORITHMS.md §2.3), a constant
        if precomputed_rewards:
            token_rewards = torch.cat([inputs[column] for column in TOKEN_REWARD_COLUMNS], dim=0)
        else:
            token_rewards = self.beta * (guidance_log_probs.float() - ref_log_probs.float())
        token_logratios = stats.log_probs - ref_log_probs  # ρ_t, differentiable through the policy only

        chosen_mask, rejected_mask = mask.chunk(2, dim=0)  # the batch is [chosen; rejected]
        chosen_token_logratios, rejected_token_logratios = token_logratios.chunk(2, dim=0)
        chosen_token_rewards, rejected_token_rewards = token_rewards.chunk(2, dim=0)
        losses, chosen_weights, rejected_weights = tgdpo_loss(
            chosen_token_logratios,
            rejected_token_logratios,
            chosen_token_rewards,
            rejected_token_rewards,
            chosen_mask,
            rejected_mask,
            beta=self.beta,
            alpha=self.args.alpha,
            weight_clamp=self.args.token_weight_clamp,
        )
        loss = self._add_aux_loss(losses.mean(), outputs, mode)

        # DPO's metrics keep DPO's meaning: rewards/* are β·Σ_t ρ_t, unweighted (as the official TGDPO code logs them)
        logratios = sequence_sum(token_logratios, mask)
        chosen_logratios, rejected_logratios = logratios.chunk(2, dim=0)
        self._log_dpo_metrics(mode, inputs, outputs, mask, chosen_logratios, rejected_logratios)
        # Mean token reward r̂ per side, and how often a weight 1 ± α r̂ is negative (the token's update is reversed,
        # ALGORITHMS.md §2.5 a; `min_token_weight=0` prevents it)
        self._log_token_mean(mode, "token_rewards/chosen", chosen_token_rewards, chosen_mask)
        self._log_token_mean(mode, "token_rewards/rejected", rejected_token_rewards, rejected_mask)
        weights = torch.cat([chosen_weights, rejected_weights], dim=0)
        self._log_token_mean(mode, "token_rewards/negative_weights", (weights < 0).float(), mask)
        return self._maybe_return_outputs(model, inputs, loss, return_outputs)
