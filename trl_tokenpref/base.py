"""What every token-level trainer shares: the config fields and checks, the forward passes, and the metrics.

A token-level trainer is a [`~trl.DPOTrainer`] whose `compute_loss` needs per-token statistics instead of per-sequence
sums. Everything else (model loading, PEFT, quantisation, the reference model, dataset preparation, the collator,
logging, checkpoints) is DPOTrainer's own code, inherited unchanged. This module adds:

* [`TokenLevelDPOConfig`]: the fields and checks common to TDPO, TGDPO and TBPO;
* [`TokenLevelDPOTrainer`]: runs the input checks of `checks.py` at init, patches the policy (and reference) with the
  fused token-statistics head (`token_stats.add_token_stats_head`), runs the reference and policy forwards, and logs
  every metric DPOTrainer logs, with DPOTrainer's meaning, plus each loss's own metrics (`losses.Metric`).

Each method's trainer (`tdpo/`, `tgdpo/`, `tbpo/`) then only writes its `compute_loss`: statistics → loss → metrics.
"""

import copy
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from peft.utils import AuxiliaryTrainingWrapper
from transformers import AutoProcessor, TrainerCallback
from trl import DPOConfig, DPOTrainer

from . import checks, launch_checks, precompute
from ._compat import disable_gradient_checkpointing, precompute_model_hash, precompute_reference_model, use_adapter
from ._logging import get_logger
from .checkpoints import TrainingGuardMixin
from .losses import Metric
from .packing import PACKED_BATCH_KEY, packed_model_kwargs, prepare_model_for_packing
from .precompute import (
    REF_CACHE_COLUMNS,
    REF_TAIL_COLUMNS,
    REF_TOKEN_LOGPS_COLUMNS,
    REF_TOPK_IDS_COLUMNS,
    REF_TOPK_LOGPS_COLUMNS,
    DataCollatorForPerTokenColumns,
    cache_bytes_per_token,
    with_per_token_collator,
)
from .token_batch import TokenBatch
from .token_stats import ReferenceCache, TokenStatsOutput, add_token_stats_head, lm_head_of, reference_top_k


logger = get_logger(__name__)


# The reference cache's k when `ref_top_k` is not set, chosen from the error measured against the exact KL
# (docs/benchmarks.md, "Reference cache"): the smallest k of {1, 4, 16, 64, 256} whose 90th-percentile relative error
# of the sequential KL is below 1% and whose TDPO2 gradient has cosine > 0.999 with the exact one, on a DPO-trained
# policy against its SFT reference (64: 0.15% and 1 - 9e-8; 32 gives 9.3%)
DEFAULT_REF_TOP_K = 64


def check_finite_number(name: str, value, *, minimum: float, hint: str) -> None:
    """Refuse a config value that is not a finite number >= `minimum`: None (e.g. `alpha: null` in a recipe), a
    string, NaN (which fails every comparison) or infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        found = "null (None)" if value is None else f"{value!r} ({type(value).__name__})"
        raise ValueError(f"`{name}` must be a number >= {minimum:g}, got {found}. {hint}")
    if not (value >= minimum and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number >= {minimum:g}, got {value}. {hint}")


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

        > Parameters that control padding-free training

        padding_free (`bool`, *optional*, defaults to `False`):
            DPOConfig's field, honoured here (TRL 1.16's `DPOTrainer` switches it off): each batch's 2B sequences are
            packed into one row with no padding, `position_ids` restarting at each sequence, and the policy, the
            reference and the guidance model run on the real tokens only. Attention runs sequence by sequence:
            `attn_implementation="sdpa"` (CPU or GPU) or `"flash_attention_2"`/`"flash_attention_3"` (GPU); other
            implementations are refused before training. The loss, gradients and metrics are those of the padded
            batch; `padding/fraction` logs the share of the padded layout's positions that were padding (what packing
            does not compute).

        > Parameters that control the reference cache

        ref_top_k (`int`, *optional*, defaults to `DEFAULT_REF_TOP_K`):
            With `precompute_ref_log_probs=True`, for the methods whose loss has a per-token KL (TDPO, TBPO-A): the
            number k of the reference's most likely tokens stored per completion token; the mass m of all the others
            is stored as one bucket. The KL is then `KL_K = Σ_{v∈K} p(v)[log p(v) − log q(v)] + m[log m − log Q]`,
            a lower bound of the exact KL that equals it when the policy equals the reference (so TDPO still equals
            DPO at initialisation) and when `ref_top_k` ≥ the vocabulary size (docs/algorithms.md §9). The cache takes
            `8 + 8·k` bytes per completion token. `kl/cache_tail_mass` logs the mean m.
    """

    token_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Number of completion tokens projected through the LM head at once when computing per-token "
            "log-probs and KL. Peak memory grows with token_chunk_size x vocab_size; None picks a size per device."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Pack each batch's sequences into one row with no padding (position_ids restart per sequence): "
            "the policy, reference and guidance models run on the real tokens only, with attention per sequence "
            "(attn_implementation 'sdpa' on CPU/GPU, 'flash_attention_2'/'flash_attention_3' on GPU). Same loss, "
            "gradients and metrics as padded batches; padding/fraction logs the padding avoided."
        },
    )
    ref_top_k: int = field(
        default=DEFAULT_REF_TOP_K,
        metadata={
            "help": "With precompute_ref_log_probs=True, for the methods with a per-token KL (TDPO, TBPO-A): how many "
            "of the reference's most likely tokens are stored per completion token (the rest are merged into one "
            "bucket). A value >= the vocabulary size stores it whole, and the KL is then exact."
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
        if isinstance(self.ref_top_k, bool) or not isinstance(self.ref_top_k, int) or self.ref_top_k < 1:
            raise ValueError(
                f"`ref_top_k` must be a positive integer, got {self.ref_top_k!r}: the number of the reference's most "
                f"likely tokens stored per completion token with `precompute_ref_log_probs=True` (default "
                f"{DEFAULT_REF_TOP_K}; a value >= the vocabulary size stores the whole distribution)."
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
        super().__post_init__()


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


class _StreamedRowFilter:
    """Drops, as they are read, the rows of a tokenized `IterableDataset` that keep no completion token to train on
    (the rows a map-style dataset loses in [`checks.drop_rows_without_completion_tokens`]), and counts them."""

    def __init__(self, dataset_name: str, args):
        self.dataset_name = dataset_name
        self.max_length, self.truncation_mode = args.max_length, args.truncation_mode
        self.kept = self.dropped = 0

    def __call__(self, example: dict, index: int) -> bool:
        prompt_len, chosen_len, rejected_len = (
            len(example[f"{name}_ids"]) for name in ("prompt", "chosen", "rejected")
        )
        trainable = all(
            checks.scored_completion_count(prompt_len, length, self.max_length, self.truncation_mode) > 0
            for length in (chosen_len, rejected_len)
        )
        if trainable:
            self.kept += 1
            return True
        if self.dropped == 0:
            why = checks.why_no_completion_token(
                prompt_len, chosen_len, rejected_len, self.max_length, self.truncation_mode
            )
            logger.warning(
                f"Row {index} of the {self.dataset_name} dataset (an IterableDataset: rows are checked as they are "
                f"read) is dropped, as DPOTrainer drops such rows: {why} Further dropped rows are counted at the end "
                "of each epoch."
            )
        self.dropped += 1
        return False


class _StreamedDropsCallback(TrainerCallback):
    """At the end of each epoch over a streamed train dataset: warn with the number of dropped rows, and refuse an
    epoch in which no row was trainable (it would train nothing and end as if it had succeeded)."""

    def __init__(self, trainer: "TokenLevelDPOTrainer", row_filter: _StreamedRowFilter):
        self.trainer, self.row_filter = trainer, row_filter

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.row_filter.kept = self.row_filter.dropped = 0

    def on_epoch_end(self, args, state, control, **kwargs):
        # Summed over the processes (with the default `dispatch_batches`, only the main process reads the stream)
        accelerator = self.trainer.accelerator
        counts = torch.tensor([self.row_filter.kept, self.row_filter.dropped], device=accelerator.device)
        kept, dropped = accelerator.reduce(counts, reduction="sum").tolist()
        if dropped == 0:
            return
        if kept == 0:
            raise ValueError(
                f"No row of the {self.row_filter.dataset_name} dataset read in this epoch keeps a completion token to "
                f"train on after truncation: all {dropped} were dropped (`max_length={args.max_length}`, "
                f"`truncation_mode={args.truncation_mode!r}`), so the run would train nothing. Raise `max_length` "
                "or shorten the prompts."
            )
        logger.warning(
            f"{dropped} of the {kept + dropped} rows of the {self.row_filter.dataset_name} dataset read in this epoch "
            "were dropped: a completion kept no token to train on after truncation."
        )


class TokenLevelDPOTrainer(TrainingGuardMixin, DPOTrainer):
    """A [`~trl.DPOTrainer`] whose `compute_loss` works on per-token statistics computed in chunks.

    The constructor is DPOTrainer's. Subclasses set `_config_class` and write `compute_loss` with the helpers here.
    [`~trl_tokenpref.checkpoints.TrainingGuardMixin`] adds to `Trainer`: checked resumes (`train(resume_from_checkpoint=
    ...)`), a manifest in every checkpoint, a stop at the first non-finite step, and one run per `output_dir`.
    """

    _config_class = TokenLevelDPOConfig
    # The collator that collates the per-token columns flat and packs batches with `padding_free=True`
    _collator_class = DataCollatorForPerTokenColumns
    # Per-token dataset columns the loss reads (kept by `remove_unused_columns`, padded by the collator)
    _per_token_columns = REF_CACHE_COLUMNS
    # Batch entries that the loss reads and the model's forward does not take (subclasses add their columns)
    _non_model_columns = (
        "completion_mask",
        "ref_chosen_logps",
        "ref_rejected_logps",
        PACKED_BATCH_KEY,
    ) + REF_CACHE_COLUMNS

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
            model_name = model if isinstance(model, str) else model.config.name_or_path
            args = self._config_class(f"{str(model_name).split('/')[-1]}-{self._name}")
        elif not isinstance(args, self._config_class):
            raise TypeError(
                f"`args` must be a `{self._config_class.__name__}`, got `{type(args).__name__}`. Build it with "
                f"`{self._config_class.__name__}(...)`: it accepts every `DPOConfig` argument."
            )
        # Before anything is loaded or precomputed: the processes and the precision the launcher asked for
        launch_checks.check_launch(args)
        checks.check_lm_head_not_quantized(model)
        # A local folder by its absolute path: the saved adapter's `base_model_name_or_path` and the model card name it,
        # and a relative one would not load from another directory
        model = checks.absolute_if_local(model)
        if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
            # Before DPOTrainer, which reads a first row before preparing the dataset (a bare `StopIteration`)
            raise ValueError("The train dataset has no rows.")
        if processing_class is None:
            # Loaded here as DPOTrainer would load it, so that its special tokens are checked before anything else
            model_id = model if isinstance(model, str) else model.config.name_or_path
            revision = (args.model_init_kwargs or {}).get("revision") if isinstance(model, str) else None
            processing_class = AutoProcessor.from_pretrained(
                model_id, revision=revision, trust_remote_code=args.trust_remote_code
            )
        checks.check_special_tokens(processing_class, args)
        self._streamed_row_filter = None
        # `padding_free=True` is honoured here (`packing.py`): DPOTrainer 1.16 would switch it off with a warning, so
        # it sees False during its init, and the user's value is restored after
        self._padding_free = bool(args.padding_free)
        args.padding_free = False
        try:
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
        finally:
            args.padding_free = self._padding_free
        self.padding_free = self._padding_free
        launch_checks.check_accelerator(self.accelerator, self.args)
        checks.check_lm_head_not_quantized(self.model)
        checks.check_lm_head_supported(self.model)
        eval_datasets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        self._check_models_and_token_ids({"train": self.train_dataset, **eval_datasets})
        self._prepare_packing()
        self._use_token_level_collator()
        self.add_callback(_ResumeTokenCountCallback(self))
        if self._streamed_row_filter is not None:
            self.add_callback(_StreamedDropsCallback(self, self._streamed_row_filter))
        self._add_token_stats_heads()

    def _use_token_level_collator(self) -> None:
        """DPOTrainer's default collator swapped for this trainer's (`_collator_class`, with `padding_free`), which
        collates the per-token columns flat and packs the batch. A custom collator is kept; with `padding_free=True`
        it is refused, since only the trainer's collator packs."""
        self.data_collator = with_per_token_collator(self.data_collator, self._collator_class, self._padding_free)
        if self._padding_free and not isinstance(self.data_collator, DataCollatorForPerTokenColumns):
            raise ValueError(
                f"`padding_free=True` packs each batch's sequences into one row, which the trainer's collator does, but "
                f"a custom data collator was given ({type(self.data_collator).__name__}). Subclass "
                f"`{self._collator_class.__name__}` (it takes `padding_free`), drop `data_collator`, or train with "
                "`padding_free=False`."
            )

    def _prepare_packing(self) -> None:
        """With `padding_free=True`: check, before anything runs on a packed batch, that the policy's and the
        reference's attention can run each packed sequence on its own, and switch an sdpa model to the per-sequence
        sdpa (`packing.prepare_model_for_packing`). Idempotent: the precompute, inside DPOTrainer's init, runs first."""
        if not self._padding_free:
            return
        prepare_model_for_packing(self.accelerator.unwrap_model(self.model), "policy")
        if self.ref_model is not None:
            prepare_model_for_packing(self.accelerator.unwrap_model(self.ref_model), "reference")

    def _check_models_and_token_ids(self, datasets: dict) -> None:
        """Before anything reads them (the precompute inside DPOTrainer's init, or training): the reference has the
        policy's vocabulary, and the token ids of the tokenized datasets and the pad id fit the policy's embedding."""
        policy = self.accelerator.unwrap_model(self.model)
        if self.ref_model is not None:
            checks.check_same_vocabulary(
                policy,
                self.accelerator.unwrap_model(self.ref_model),
                "reference model",
                checks.REFERENCE_VOCABULARY_REASON,
                checks.REFERENCE_VOCABULARY_FIX,
            )
        pad_token_id = getattr(self.data_collator, "pad_token_id", None)
        checks.check_token_ids_fit(policy, self.processing_class, datasets, pad_token_id=pad_token_id)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """DPOTrainer's model card, naming a base model loaded from a local folder (TRL's card names only a Hub model,
        and writes "a fine-tuned version of [None](https://huggingface.co/None)" otherwise)."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        card = os.path.join(self.args.output_dir, "README.md")
        unnamed = "[None](https://huggingface.co/None)"
        if not self.is_world_process_zero() or not os.path.isfile(card):
            return
        with open(card, encoding="utf-8") as f:
            text = f.read()
        if unnamed in text:
            base_model = self.model.config.name_or_path
            named = f"the local model `{base_model}`" if base_model else "a model built from its config (no base path)"
            with open(card, "w", encoding="utf-8") as f:
                f.write(text.replace(unnamed, named))

    def _add_token_stats_heads(self) -> None:
        """Patch the policy (and the reference) so that `model(..., token_stats=True)` computes per-token statistics.

        DPOTrainer patched its fused LM head; ours wraps it. The statistics are computed inside the model's forward,
        so DDP, DeepSpeed ZeRO-3 and FSDP see the LM head used as in any forward. Idempotent: the precompute, which
        runs inside DPOTrainer's init, patches first."""
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_token_stats_head(policy)
        if self.ref_model is not None:
            add_token_stats_head(self.accelerator.unwrap_model(self.ref_model))

    # ------------------------------------------------------------------------------------------------------------
    # Dataset preparation, with every row checked on the way (checks.py)
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """DPOTrainer's preparation (prompt extraction, EOS, tokenization), with every row checked on the way.

        A map-style `Dataset` is checked whole, before tokenization (its fields: the first bad row raises a
        `ValueError` naming its index, its problem and the fix, with the number of bad rows) and after (its token
        counts: the rows of which truncation leaves no completion token are dropped, as DPOTrainer drops them, with a
        warning that counts and names them). An `IterableDataset` cannot be checked before training: its rows are
        checked as they are read (the first one at init), and the rows without a completion token are dropped and
        counted at the end of each epoch.
        """
        tokenizer = checks.text_tokenizer(processing_class)
        has_prompt = checks.check_columns(dataset, dataset_name, tokenizer.eos_token)
        checks.check_chat_template(dataset, dataset_name, processing_class)
        # DPOTrainer's only use of `max_length` here is to drop the rows whose prompt fills it (keep_start): tokenize
        # without that filter, and drop the rows without a completion token here, where they are counted and named
        # (the collator still truncates with `max_length`)
        tokenize_args = args
        if args.max_length is not None and args.truncation_mode == "keep_start":
            tokenize_args = copy.copy(args)
            tokenize_args.max_length = None

        if not isinstance(dataset, Dataset):
            dataset = dataset.map(
                checks.check_streamed_row,
                with_indices=True,
                features=dataset.features,
                fn_kwargs={"dataset_name": dataset_name, "has_prompt": has_prompt, "eos_token": tokenizer.eos_token},
            )
            dataset = super()._prepare_dataset(dataset, processing_class, tokenize_args, dataset_name)
            row_filter = _StreamedRowFilter(dataset_name, args)
            if dataset_name == "train":
                self._streamed_row_filter = row_filter
            return dataset.filter(row_filter, with_indices=True)

        checks.check_rows(dataset, dataset_name, has_prompt, tokenizer.eos_token)
        dataset = super()._prepare_dataset(dataset, processing_class, tokenize_args, dataset_name)
        # Row indices are still the user's here (nothing was dropped yet): the place for checks that name rows
        self._check_tokenized_dataset(dataset, dataset_name, args)
        identical = checks.identical_pairs(dataset)
        checks.check_not_only_identical_pairs(identical.size, len(dataset), dataset_name)
        if identical.size:
            dataset = self._identical_pairs(dataset, dataset_name, identical)
        return checks.drop_rows_without_completion_tokens(dataset, dataset_name, args)

    def _identical_pairs(self, dataset: Dataset, dataset_name: str, rows) -> Dataset:
        """Pairs whose chosen and rejected completions are the same tokens express no preference. DPOTrainer keeps
        them, and so do TDPO and TBPO, with a warning: they cost a step's compute and, through the KL terms, still move
        the policy. TGDPO drops them (see its override)."""
        logger.warning(
            f"{len(rows)} of the {len(dataset)} pairs of the {dataset_name} dataset have identical chosen and rejected "
            f"completions (rows {checks.listed_rows(rows)}): they express no preference, cost compute, and the "
            f"per-token terms of {self._name} still train on them. Drop them before training, e.g. with "
            "`dataset.filter(lambda row: row['chosen'] != row['rejected'])`."
        )
        return dataset

    def _set_signature_columns_if_needed(self):
        # Keep the per-token columns when `remove_unused_columns=True` drops what the model's forward does not take
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in self._per_token_columns if c not in self._signature_columns]

    def _check_tokenized_dataset(self, dataset: Dataset, dataset_name: str, args) -> None:
        """Checks of a subclass on the tokenized map-style dataset, before any row is dropped (so that row indices are
        the user's). Nothing by default."""

    # ------------------------------------------------------------------------------------------------------------
    # The reference cache: `precompute_ref_log_probs=True` for a loss with a per-token KL (precompute.py)
    # ------------------------------------------------------------------------------------------------------------

    @property
    def _uses_reference_cache(self) -> bool:
        return bool(self.args.precompute_ref_log_probs and self.args._needs_reference_distribution)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """DPOTrainer's precompute of the reference, for a per-token KL: instead of each completion's summed log-prob,
        the reference cache of every completion token (its label log-prob, its `ref_top_k` most likely tokens with
        their log-probs, and the log-mass of the rest), cached on disk like DPOTrainer's values. A method without a
        per-token KL keeps DPOTrainer's precompute."""
        self._check_models_and_token_ids({name: dataset})
        if not self._uses_reference_cache:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        precompute.check_map_style(dataset)
        self._add_token_stats_heads()
        self._prepare_packing()
        self._use_token_level_collator()
        k = self.args.ref_top_k
        vocab_size = self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size
        stored_k = min(k, vocab_size)
        num_tokens = int(sum(checks.scored_completion_counts_of(dataset, self.args)))
        size = num_tokens * cache_bytes_per_token(stored_k)
        self.accelerator.print(
            f"Reference cache for the {name} dataset: {num_tokens:,} completion tokens x "
            f"{cache_bytes_per_token(stored_k)} bytes (ref_top_k={stored_k}"
            f"{', the whole vocabulary: exact KL' if stored_k == vocab_size else ''}) = {size / 2**20:,.1f} MiB."
        )
        tokenizer = checks.text_tokenizer(self.processing_class)
        cache_key = (
            precompute_model_hash(self),
            self.args.max_length,
            self.args.truncation_mode,
            stored_k,
            sorted(tokenizer.get_vocab().items()),
        )

        def score_batch(model, batch):
            cache = self._reference_top_k(model, batch, stored_k)
            return {
                REF_TOKEN_LOGPS_COLUMNS: cache.label_log_probs,
                REF_TOPK_IDS_COLUMNS: cache.topk_ids,
                REF_TOPK_LOGPS_COLUMNS: cache.topk_log_probs,
                REF_TAIL_COLUMNS: cache.tail_log_mass,
            }

        columns = [REF_TOKEN_LOGPS_COLUMNS, REF_TOPK_IDS_COLUMNS, REF_TOPK_LOGPS_COLUMNS, REF_TAIL_COLUMNS]
        dataset = self._add_per_token_columns(dataset, name, batch_size, score_batch, columns, cache_key)
        checks.warn_if_reference_cache_misses_mass(dataset, name, stored_k, vocab_size)
        return dataset

    def _add_per_token_columns(self, dataset, name, batch_size, score_batch, columns, cache_key):
        """`precompute.add_per_token_columns` with this trainer's reference model (DeepSpeed's inference engine before
        `train`), accelerator, collator and truncation."""
        return precompute.add_per_token_columns(
            dataset,
            score_batch,
            model=precompute_reference_model(self),
            columns=columns,
            cache_key=cache_key,
            accelerator=self.accelerator,
            collator=self.data_collator,
            batch_size=batch_size,
            max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode,
            name=name,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            vocab_size=self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size,
        )

    def _reference_top_k(self, model, inputs: dict, k: int) -> ReferenceCache:
        """The reference cache of a batch's labelled tokens, `[N(, k)]` in `TokenBatch` order: one reference forward
        to the final hidden states, then the top-k of each completion token's next-token distribution
        (`token_stats.reference_top_k`)."""
        token_batch = TokenBatch.from_inputs(inputs)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_adapter(),
        ):
            outputs = model(
                **self._model_kwargs(inputs), token_stats=True, token_batch=token_batch, return_hidden_states_only=True
            )
        unwrapped = self.accelerator.unwrap_model(model)
        head = self._reference_lm_head() or lm_head_of(
            unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        )
        return reference_top_k(
            outputs.hidden_states, head, token_batch.labels, k, chunk_size=self.args.token_chunk_size
        )

    def _reference_cache(self, inputs: dict) -> ReferenceCache:
        """The reference cache of a collated batch's labelled tokens, `[N(, k)]` in `TokenBatch` order, from its
        precomputed columns (collated flat: the chosen completions' tokens, then the rejected ones')."""
        missing = [column for column in REF_CACHE_COLUMNS if column not in inputs]
        if missing:
            raise ValueError(
                f"`precompute_ref_log_probs=True` but the batch has no {missing}: the data collator must pad the "
                "per-token columns of the reference cache. Use `precompute.DataCollatorForPerTokenColumns` (the "
                "default) or a subclass of it."
            )

        def both(columns):
            return torch.cat([inputs[column] for column in columns], dim=0)

        return ReferenceCache(
            label_log_probs=both(REF_TOKEN_LOGPS_COLUMNS),
            topk_ids=both(REF_TOPK_IDS_COLUMNS),
            topk_log_probs=both(REF_TOPK_LOGPS_COLUMNS),
            tail_log_mass=both(REF_TAIL_COLUMNS),
        )

    def _token_stats_with_reference(
        self, model, inputs: dict, token_batch: TokenBatch, return_hidden_states: bool = False
    ):
        """The policy's per-token statistics with the reference's log-probs and the per-token KL: from the reference
        cache when it was precomputed (the policy pass only), otherwise from a live reference forward and one chunked
        pass over both LM heads. Returns the outputs and the metrics of the reference cache."""
        if self._uses_reference_cache:
            cache = self._reference_cache(inputs)
            outputs = self._policy_forward(
                model, inputs, ref_cache=cache, return_hidden_states=return_hidden_states, token_batch=token_batch
            )
            # How much of the reference's mass the bucket holds: the KL's approximation lives there
            tail_mass = cache.tail_log_mass.exp()
            return outputs, {"kl/cache_tail_mass": Metric(tail_mass, torch.ones_like(tail_mass, dtype=torch.bool))}
        ref_hidden_states = self._reference_hidden_states(inputs, token_batch)
        outputs = self._policy_forward(
            model,
            inputs,
            ref_hidden_states=ref_hidden_states,
            return_hidden_states=return_hidden_states,
            token_batch=token_batch,
        )
        return outputs, {}

    # ------------------------------------------------------------------------------------------------------------
    # Forward passes
    # ------------------------------------------------------------------------------------------------------------

    def _model_kwargs(self, inputs: dict) -> dict:
        """The model inputs of a collated preference batch: the batch minus what only the loss reads; for a packed
        batch (`padding_free=True`), with the sequence boundaries as the attention implementation takes them
        (`packing.packed_model_kwargs`)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in self._non_model_columns}
        model_kwargs["use_cache"] = False
        if PACKED_BATCH_KEY in inputs:
            model_kwargs.update(packed_model_kwargs(inputs, self.accelerator.unwrap_model(self.model).config))
        return model_kwargs

    def _reference_adapter(self):
        """The context in which the policy model *is* the reference, as in DPOTrainer: with PEFT and no explicit
        `ref_model`, the adapter disabled (or the frozen "ref" adapter active). Without PEFT, nothing to do."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is not None or not is_peft_model(unwrapped):
            return nullcontext()
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _reference_hidden_states(self, inputs: dict, token_batch: TokenBatch | None = None) -> torch.Tensor:
        """Final hidden states of the reference model at the batch's labelled tokens, `[N, H]`, without gradient.

        The reference is, as in DPOTrainer: the explicit or reloaded `ref_model`; or, with PEFT, the same model with
        its adapter disabled (or its frozen "ref" adapter active).
        """
        model = self.model if self.ref_model is None else self.ref_model
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_adapter(),
        ):
            outputs = model(
                **self._model_kwargs(inputs),
                token_stats=True,
                token_batch=token_batch if token_batch is not None else TokenBatch.from_inputs(inputs),
                return_hidden_states_only=True,
            )
        return outputs.hidden_states

    def _reference_token_log_probs(self, model, inputs: dict) -> torch.Tensor:
        """log π_ref(y_t|s_t) of the batch's labelled tokens, `[N]` in `TokenBatch` order, without gradient: what the
        precompute stores. `model` is the reference (or the policy, under `_reference_adapter`), possibly wrapped in
        DeepSpeed's inference engine before training (`_compat.precompute_reference_model`)."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_adapter(),
        ):
            outputs = model(
                **self._model_kwargs(inputs),
                token_stats=True,
                token_batch=TokenBatch.from_inputs(inputs),
                chunk_size=self.args.token_chunk_size,
            )
        return outputs.stats.log_probs.float()

    def _reference_lm_head(self):
        """The reference's LM head, or None when it is the policy's own (PEFT: the head carries no adapter)."""
        if self.ref_model is not None:
            return lm_head_of(self.accelerator.unwrap_model(self.ref_model))
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(unwrapped):
            return None
        # PEFT's `modules_to_save=["lm_head"]` trains a copy of the head, and `lm_head.weight` is the trained copy
        # while an adapter is active. The reference must use the head of the adapter-free (or "ref" adapter) model;
        # without this, the reference would drift with the policy, and the per-token KL of the head would be 0
        # whatever the policy learns.
        if not isinstance(unwrapped.get_base_model().get_output_embeddings(), AuxiliaryTrainingWrapper):
            return None
        with self._reference_adapter():
            return lm_head_of(unwrapped.get_base_model())

    def _policy_forward(
        self,
        model,
        inputs: dict,
        ref_hidden_states: torch.Tensor | None = None,
        return_hidden_states: bool = False,
        ref_cache: ReferenceCache | None = None,
        token_batch: TokenBatch | None = None,
    ) -> TokenStatsOutput:
        """Policy forward returning per-token statistics `[N]` of the batch's labelled tokens; with
        `ref_hidden_states`, also the reference log-probs and the per-token forward KL, all from one chunked pass over
        both LM heads; with `ref_cache`, the same from the stored reference distribution, in the policy's pass alone."""
        model_kwargs = self._model_kwargs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        return model(
            **model_kwargs,
            token_stats=True,
            token_batch=token_batch if token_batch is not None else TokenBatch.from_inputs(inputs),
            ref_hidden_states=ref_hidden_states,
            ref_lm_head=self._reference_lm_head() if ref_hidden_states is not None else None,
            ref_cache=ref_cache,
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

    def _log_metrics(self, mode: str, metrics: dict[str, Metric]) -> None:
        """Log a loss's metrics: a per-pair value as its mean over the pairs of every process, a per-token value
        (with a mask) as its mean over the masked tokens of every process (global sum / global count)."""
        for key, metric in metrics.items():
            values = metric.values.detach().float()
            if metric.mask is None:
                self._metrics[mode][key].append(self.accelerator.gather(values).mean().item())
                continue
            total = self.accelerator.gather_for_metrics(torch.where(metric.mask, values, 0.0).sum()).sum()
            count = self.accelerator.gather_for_metrics(metric.mask.sum()).sum()
            self._metrics[mode][key].append((total / count).item() if count > 0 else 0.0)

    def _log_dpo_metrics(
        self,
        mode: str,
        token_batch: TokenBatch,
        outputs: TokenStatsOutput,
        chosen_logratios: torch.Tensor,
        rejected_logratios: torch.Tensor,
    ) -> None:
        """Every metric DPOTrainer logs, with DPOTrainer's meaning, and `padding/fraction`.

        `rewards/*` are DPO's implicit rewards β·Σ_t ρ_t (not a method's own reward), `logps/*` the summed policy
        log-probs, `logits/*` the mean logit, `entropy` the mean policy entropy and `mean_token_accuracy` the
        fraction of chosen tokens that are the policy's argmax. `padding/fraction` is the share of the padded
        `[2B, L_max]` layout's positions that hold padding: what `padding_free=True` does not compute.
        """
        stats = outputs.stats
        is_chosen = token_batch.is_chosen.to(stats.log_probs.device)
        counts = torch.stack([token_batch.input_tokens, token_batch.padded_positions]).to(self.accelerator.device)
        input_tokens, padded_positions = self.accelerator.gather_for_metrics(counts.view(1, 2)).sum(dim=0).tolist()
        if mode == "train":
            self._total_train_tokens += input_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        self._metrics[mode]["padding/fraction"].append(1.0 - input_tokens / max(padded_positions, 1))

        chosen_rewards, rejected_rewards = self.beta * chosen_logratios, self.beta * rejected_logratios
        chosen_logps, rejected_logps = token_batch.split(token_batch.sequence_sums(stats.log_probs))
        self._log_metrics(
            mode,
            {
                "entropy": Metric(stats.entropy, torch.ones_like(is_chosen)),
                "logits/chosen": Metric(stats.mean_logits, is_chosen),
                "logits/rejected": Metric(stats.mean_logits, ~is_chosen),
                "mean_token_accuracy": Metric(stats.is_top1, is_chosen),
                "rewards/chosen": Metric(chosen_rewards),
                "rewards/rejected": Metric(rejected_rewards),
                "rewards/accuracies": Metric((chosen_rewards > rejected_rewards).float()),
                "rewards/margins": Metric(chosen_rewards - rejected_rewards),
                "logps/chosen": Metric(chosen_logps),
                "logps/rejected": Metric(rejected_logps),
            },
        )
