"""What every token-level trainer shares: the config fields and checks, the forward passes, and DPO's metrics.

A token-level trainer is a [`~trl.DPOTrainer`] whose `compute_loss` needs per-token statistics instead of per-sequence
sums. Everything else (model loading, PEFT, quantisation, the reference model, dataset preparation, the collator,
logging, checkpoints) is DPOTrainer's own code, inherited unchanged. This module adds:

* [`TokenLevelDPOConfig`]: the fields and checks common to TDPO, TGDPO and TBPO;
* [`TokenLevelDPOTrainer`]: patches the policy (and reference) with the fused token-statistics head
  (`token_stats.add_token_stats_head`), runs the reference and policy forwards, and logs every metric DPOTrainer logs,
  with DPOTrainer's meaning, so dashboards stay comparable.

Each method's trainer (`tdpo/`, `tgdpo/`, `tbpo/`) then only writes its `compute_loss`: statistics → loss → metrics.
"""

from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer

from ._compat import disable_gradient_checkpointing, use_adapter
from .token_stats import TokenStatsOutput, add_token_stats_head, lm_head_of


@dataclass
class TokenLevelDPOConfig(DPOConfig):
    r"""
    Parameters shared by the token-level trainers. See [`~trl.DPOConfig`] for every other parameter.

    Parameters:
        > Parameters that control the token statistics

        token_chunk_size (`int` or `None`, *optional*):
            Number of completion tokens projected through the LM head at once when computing per-token log-probs and
            KL. Peak memory grows with `token_chunk_size × vocab_size`; `None` picks a size per device (a tile of
            about 4M elements on CPU and 64M on GPU).
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
        if self.beta <= 0:
            raise ValueError(f"`beta` must be positive, got {self.beta}. The paper default is 0.1.")
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
                "The LM head is quantized, but the token-level trainers read `lm_head.weight` directly to compute "
                "per-token statistics in chunks. Keep the LM head in 16/32-bit: bitsandbytes leaves `lm_head` "
                "unquantized by default, so remove it from `llm_int8_skip_modules` overrides or from quantized modules."
            )

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
        if self.ref_model is None:
            return None
        return lm_head_of(self.accelerator.unwrap_model(self.ref_model))

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
