"""TGDPO: DPO with a per-token weight β·(1 ± α·r̂_t) from a frozen guidance model (docs/algorithms.md §2).

Where the token rewards r̂_t = β·(log π_guide(y_t|s_t) − log π_ref(y_t|s_t)) come from, per dataset:

* **precomputed columns** `chosen_token_rewards` / `rejected_token_rewards` (one float per completion token, written by
  `scripts/compute_token_rewards.py`): read from the batch, no guidance model in memory;
* otherwise a **guidance model** (`guidance_model=` or `args.guidance_model_name_or_path`): one more forward pass per
  step, without gradient; or, with `precompute_ref_log_probs=True`, once before training, together with the reference.

With `precompute_ref_log_probs=True` the reference's per-token log-probabilities (the loss weights each token's
log-ratio, so DPOTrainer's summed log-probs are not enough) are stored as the columns `ref_chosen_token_logps` /
`ref_rejected_token_logps`; a training step is then a DPO step: one policy forward and backward.
"""

import textwrap

import numpy as np
import torch
from datasets import Dataset

from .._compat import precompute_model_hash
from .._logging import get_logger
from ..base import TokenLevelDPOTrainer
from ..checks import check_local_path, listed_rows
from ..losses import tgdpo_loss
from ..precompute import REF_TOKEN_LOGPS_COLUMNS
from ..token_batch import TokenBatch
from .guidance import GuidanceModel
from .tgdpo_config import TGDPOConfig
from .token_rewards import (
    PER_TOKEN_COLUMNS,
    TOKEN_REWARD_COLUMNS,
    DataCollatorForTGDPO,
    check_token_rewards_beta,
    validate_token_rewards,
)


logger = get_logger(__name__)


class TGDPOTrainer(TokenLevelDPOTrainer):
    """
    Trainer for Token-level reward Guided Direct Preference Optimization (TGDPO), Zhu et al., ICML 2025
    ([paper](https://huggingface.co/papers/2506.14574)).

    A drop-in replacement for [`~trl.DPOTrainer`]: same constructor (plus `guidance_model`), same dataset formats, same
    metrics, plus `token_rewards/*`. The loss weights each token's log-ratio ρ_t = log πθ(y_t|s_t) − log π_ref(y_t|s_t)
    by its own factor (docs/algorithms.md §2.2, the official code's `dpo_loss`):

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
    _tag_names = ["trl", "dpo", "tgdpo", "trl_tokenpref"]  # DPOTrainer's tags, then ours
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

    _per_token_columns = PER_TOKEN_COLUMNS
    _collator_class = DataCollatorForTGDPO
    _non_model_columns = TokenLevelDPOTrainer._non_model_columns + PER_TOKEN_COLUMNS

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
        source = guidance_model if guidance_model is not None else guidance_path
        if isinstance(source, str):
            check_local_path(source, "guidance model")  # before the policy is loaded and the data tokenized
        # Set before DPOTrainer.__init__, which prepares the datasets and may precompute through our overrides
        self.guidance = GuidanceModel(self, source) if source is not None else None
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
        if not isinstance(self.data_collator, DataCollatorForTGDPO):
            logger.warning(
                f"TGDPOTrainer got a custom data collator ({type(self.data_collator).__name__}). It must collate the "
                f"per-token columns {list(PER_TOKEN_COLUMNS)} that the datasets carry flat, in the order of the "
                "batch's labelled tokens, as `DataCollatorForTGDPO` does; subclassing it is the simplest way."
            )
        if self.guidance is not None:
            if not self.precompute_ref_logps:
                self.guidance.get()  # load now: a bad path or tokenizer fails at init, not at the first step
            elif isinstance(self.guidance.source, str):
                # Its rewards are stored in the datasets now: free it (it is reloaded if `evaluate` gets a new dataset)
                self.guidance.release()

    @property
    def guidance_model(self):
        """The prepared guidance model, or None when it is not loaded (precomputed rewards, or freed after the
        precompute)."""
        return None if self.guidance is None else self.guidance.model

    # ------------------------------------------------------------------------------------------------------------
    # Data: the per-token columns (token_rewards.py) and where their values come from
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = dataset.column_names if dataset.column_names is not None else list(next(iter(dataset)).keys())
        present = [column for column in TOKEN_REWARD_COLUMNS if column in columns]
        if len(present) == 1:
            raise ValueError(
                f"The {dataset_name} dataset has the column `{present[0]}` but not its counterpart: precomputed token "
                f"rewards need both {list(TOKEN_REWARD_COLUMNS)} (see `scripts/compute_token_rewards.py`)."
            )
        has_rewards = len(present) == 2
        if has_rewards and self.guidance is not None:
            raise ValueError(
                f"The {dataset_name} dataset has precomputed token-reward columns {list(TOKEN_REWARD_COLUMNS)} and a "
                "guidance model was given too (`guidance_model` or `args.guidance_model_name_or_path`), so it is "
                "ambiguous which to use. Remove the columns (`dataset.remove_columns(...)`) to compute the rewards "
                "with the guidance model, or drop the guidance model to use the columns (from the command line or a "
                "recipe: `--guidance_model_name_or_path none`, or `guidance_model_name_or_path: null`)."
            )
        if not has_rewards and self.guidance is None:
            raise ValueError(
                f"TGDPO needs token rewards for the {dataset_name} dataset, but there is no source for them. Pass "
                "`guidance_model=` to the trainer (a model or a path), or set `guidance_model_name_or_path` in "
                f"`TGDPOConfig`, or add the precomputed columns {list(TOKEN_REWARD_COLUMNS)} with "
                "`scripts/compute_token_rewards.py --guidance_model ... --ref_model ...`."
            )
        if has_rewards:
            check_token_rewards_beta(dataset, args.beta, dataset_name)  # β from the rows and the info file
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _check_tokenized_dataset(self, dataset: Dataset, dataset_name: str, args) -> None:
        # Precomputed values must match the tokenized completions: checked once, naming the user's row. An
        # IterableDataset is checked batch by batch by the collator.
        if all(column in dataset.column_names for column in TOKEN_REWARD_COLUMNS):
            validate_token_rewards(dataset, dataset_name, args)

    def _identical_pairs(self, dataset: Dataset, dataset_name: str, rows) -> Dataset:
        # The weights 1 ± α·r̂ differ between the two sides of a pair even when the texts are the same, so TGDPO would
        # learn from a pair that expresses no preference: drop it
        logger.warning(
            f"Dropped {len(rows)} of the {len(dataset)} pairs of the {dataset_name} dataset (rows "
            f"{listed_rows(rows)}): their chosen and rejected completions are identical, so they express no "
            "preference, but TGDPO's token weights 1 ± alpha·r̂ differ between the two sides and would train on them."
        )
        return dataset.select(np.setdiff1d(np.arange(len(dataset)), rows, assume_unique=True))

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """DPOTrainer's precompute of the reference, per token instead of summed (`precompute.py`): the columns
        `ref_{chosen,rejected}_token_logps` and, when the dataset has no token rewards yet, the guidance rewards
        `{chosen,rejected}_token_rewards` = β·(log π_guide − log π_ref). A training step then runs the policy only."""
        self._check_models_and_token_ids({name: dataset})
        self._use_token_level_collator()
        self._add_token_stats_heads()
        self._prepare_packing()
        compute_rewards = not all(column in dataset.column_names for column in TOKEN_REWARD_COLUMNS)
        columns = [REF_TOKEN_LOGPS_COLUMNS] + ([TOKEN_REWARD_COLUMNS] if compute_rewards else [])
        # The values depend on the truncation and, for the rewards, on the guidance model and β: all in the cache key
        cache_key = (precompute_model_hash(self), self.args.max_length, self.args.truncation_mode)
        if compute_rewards:
            self.guidance.get()
            cache_key += (self.guidance.hash, self.beta)

        def score_batch(model, batch):
            ref_log_probs = self._reference_token_log_probs(model, batch)
            values = {REF_TOKEN_LOGPS_COLUMNS: ref_log_probs}
            if compute_rewards:
                values[TOKEN_REWARD_COLUMNS] = self.beta * (
                    self.guidance.token_log_probs(batch).float() - ref_log_probs
                )
            return values

        return self._add_per_token_columns(dataset, name, batch_size, score_batch, columns, cache_key)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # The batch's labelled tokens, flat (padded or packed alike): every per-token value below is [N] in its order,
        # and the precomputed columns are collated in that order too
        token_batch = TokenBatch.from_inputs(inputs)

        # The guidance pass first (no gradient), so that its activations are freed before the policy's are stored
        precomputed_rewards = all(column in inputs for column in TOKEN_REWARD_COLUMNS)
        guidance_log_probs = None if precomputed_rewards else self.guidance.token_log_probs(inputs, token_batch)

        if self.precompute_ref_logps:
            missing = [column for column in REF_TOKEN_LOGPS_COLUMNS if column not in inputs]
            if missing:
                raise ValueError(
                    f"`precompute_ref_log_probs=True` but the batch has no {missing}: the data collator must collate "
                    "the per-token columns. Use `DataCollatorForTGDPO` (the default) or a subclass of it."
                )
            outputs = self._policy_forward(model, inputs, token_batch=token_batch)
            ref_log_probs = torch.cat([inputs[column] for column in REF_TOKEN_LOGPS_COLUMNS], dim=0)
        else:
            # One chunked pass over both LM heads gives log πθ(y_t) and log π_ref(y_t) (the KL it also returns is
            # unused); the patched `model.forward` does this work (`token_stats.add_token_stats_head`)
            ref_hidden_states = self._reference_hidden_states(inputs, token_batch)
            outputs = self._policy_forward(model, inputs, ref_hidden_states=ref_hidden_states, token_batch=token_batch)
            ref_log_probs = outputs.stats.ref_log_probs
        stats = outputs.stats
        ref_log_probs = ref_log_probs.to(stats.log_probs.device)

        # r̂_t = β·(log π_guide − log π_ref) against the same reference as ρ (docs/algorithms.md §2.3), a constant
        if precomputed_rewards:
            token_rewards = torch.cat([inputs[column] for column in TOKEN_REWARD_COLUMNS], dim=0)
        else:
            token_rewards = self.beta * (guidance_log_probs.float() - ref_log_probs.float())
        token_logratios = stats.log_probs - ref_log_probs  # ρ_t, differentiable through the policy only

        # Each completion's tokens by completion index, [B, T] per side with its mask (the loss sums over them)
        token_logratios_by_sequence, mask = token_batch.per_sequence(token_logratios)
        token_rewards_by_sequence, _ = token_batch.per_sequence(token_rewards.to(token_logratios.device))
        chosen_mask, rejected_mask = token_batch.split(mask)
        chosen_token_logratios, rejected_token_logratios = token_batch.split(token_logratios_by_sequence)
        chosen_token_rewards, rejected_token_rewards = token_batch.split(token_rewards_by_sequence)
        tgdpo = tgdpo_loss(
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
        loss = self._add_aux_loss(tgdpo.losses.mean(), outputs, mode)

        # DPO's metrics keep DPO's meaning: rewards/* are β·Σ_t ρ_t, unweighted (as the official TGDPO code logs them)
        chosen_logratios, rejected_logratios = token_batch.split(token_batch.sequence_sums(token_logratios))
        self._log_dpo_metrics(mode, token_batch, outputs, chosen_logratios, rejected_logratios)
        self._log_metrics(mode, tgdpo.metrics)  # token_rewards/*
        return self._maybe_return_outputs(model, inputs, loss, return_outputs)
