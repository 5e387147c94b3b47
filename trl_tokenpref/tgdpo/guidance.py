"""TGDPO's guidance model π_guide: loaded on first use, checked against the policy, frozen, prepared like DPOTrainer's
reference model, and released once its token rewards are stored.

The token reward r̂_t = β·(log π_guide(y_t|s_t) − log π_ref(y_t|s_t)) compares the log-probabilities that two models
give to the same token ids, so the guidance model must share the policy's vocabulary (usually it is a DPO model
trained from the same reference). It is a constant of the loss (docs/algorithms.md §2.3: the official code runs it
under `no_grad`): no gradient reaches it.
"""

import gc
import json
import os

import torch
from accelerate.utils import is_peft_model
from transformers import AutoTokenizer

from .._compat import (
    attn_implementation,
    create_model_from_path,
    disable_dropout_in_model,
    forget_prepared_model,
    hash_module,
    prepare_deepspeed,
    prepare_fsdp,
)
from .._logging import get_logger
from ..checks import check_lm_head_not_quantized, check_local_path, check_same_vocabulary
from ..packing import prepare_model_for_packing
from ..token_batch import TokenBatch
from ..token_stats import add_token_stats_head


logger = get_logger(__name__)

# Why the guidance model must share the other models' vocabulary, and what to use instead
GUIDANCE_VOCABULARY_REASON = (
    "the token reward r̂_t = β·(log π_guide(y_t) − log π_ref(y_t)) compares the log-probabilities of the same token "
    "ids, so the two models must use one tokenizer."
)
GUIDANCE_VOCABULARY_FIX = (
    "Use a guidance model trained with that tokenizer: usually a DPO model trained from the same reference model."
)


class GuidanceModel:
    """The guidance model of a [`TGDPOTrainer`], given as a loaded model or a path/identifier.

    Args:
        trainer ([`TGDPOTrainer`]): whose policy, accelerator and arguments the guidance model follows.
        source (`str` or [`~transformers.PreTrainedModel`]): the model, or its path / Hub identifier. A folder of a
            PEFT adapter (what `--use_peft` writes) is loaded on its base model and merged.
    """

    def __init__(self, trainer, source):
        self.trainer = trainer
        self.source = source
        self.model = None  # loaded and prepared on first use
        self.hash = None  # the cache key of stored token rewards, set when loaded for a precompute

    def get(self):
        """The prepared guidance model, loaded on first use."""
        if self.model is None:
            self.model = self._load(self.source)
        return self.model

    def release(self) -> None:
        """Drop the model and every reference to it, so its memory is freed (it is reloaded if needed again)."""
        if self.model is not None:
            forget_prepared_model(self.trainer.accelerator, self.model)
        self.model = None
        gc.collect()

    def token_log_probs(self, inputs: dict, token_batch: TokenBatch | None = None) -> torch.Tensor:
        """log π_guide(y_t|s_t) of the batch's labelled tokens, `[N]` in `TokenBatch` order, without gradient."""
        trainer = self.trainer
        with torch.no_grad():
            outputs = self.get()(
                **trainer._model_kwargs(inputs),
                token_stats=True,
                token_batch=token_batch if token_batch is not None else TokenBatch.from_inputs(inputs),
                chunk_size=trainer.args.token_chunk_size,
            )
        return outputs.stats.log_probs

    def _load(self, source):
        """Load (from a path, as DPOTrainer loads the reference), check, freeze, patch and prepare the model."""
        trainer = self.trainer
        if isinstance(source, str):
            guidance = load_guidance_model(source, self._init_kwargs())
            self._check_vocab(guidance)
            self._check_tokenizer(source)
        else:
            guidance = source
            self._check_vocab(guidance)
        check_lm_head_not_quantized(guidance)
        if self._equals_reference(guidance):
            logger.warning(
                "The guidance model has the same weights as the reference model, so every token reward "
                "r̂ = β·(log π_guide − log π_ref) is 0 and TGDPO reduces to DPO. The guidance model should be another "
                "model, usually a DPO model trained from the reference."
            )
        guidance.eval()
        guidance.requires_grad_(False)
        disable_dropout_in_model(guidance)  # a deterministic forward: r̂ is a constant
        if trainer.precompute_ref_logps:
            self.hash = hash_module(guidance)  # before sharding: DTensor parameters can't be hashed
        if trainer._padding_free:
            prepare_model_for_packing(guidance, "guidance")
        add_token_stats_head(guidance)
        if trainer.is_deepspeed_enabled:
            return prepare_deepspeed(guidance, trainer.accelerator)
        if trainer.is_fsdp_enabled:
            return prepare_fsdp(guidance, trainer.accelerator)
        return trainer.accelerator.prepare_model(guidance, evaluation_mode=True)

    def _equals_reference(self, guidance) -> bool:
        """Whether the guidance model's weights are the reference's (before training, the reference is the explicit
        `ref_model` or the policy's initial weights: under PEFT the base weights; sharded models are not compared)."""
        trainer = self.trainer
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or trainer.state.global_step > 0:
            return False
        reference = trainer.accelerator.unwrap_model(
            trainer.ref_model if trainer.ref_model is not None else trainer.model
        )
        if is_peft_model(reference):
            reference = reference.get_base_model()
        # PEFT wraps a targeted layer's weight as `<layer>.base_layer.weight` and adds its adapter's own parameters
        reference_params = {
            name.replace(".base_layer", ""): param
            for name, param in reference.named_parameters()
            if "lora_" not in name and "modules_to_save" not in name
        }
        guidance_params = dict(guidance.named_parameters())
        if reference_params.keys() != guidance_params.keys():
            return False
        return all(
            param.shape == reference_params[name].shape
            and torch.equal(param.detach().cpu(), reference_params[name].detach().cpu())
            for name, param in guidance_params.items()
        )

    def _init_kwargs(self) -> dict:
        """`guidance_model_init_kwargs`, or the policy's loading options (dtype, attention, device map) without its
        revision (another repository's); the policy's dtype and attention by default, as for the reference."""
        trainer = self.trainer
        args = trainer.args
        if args.guidance_model_init_kwargs is None:
            init_kwargs = {k: v for k, v in (args.model_init_kwargs or {}).items() if k != "revision"}
        else:
            init_kwargs = dict(args.guidance_model_init_kwargs)
        # Distributed training requires device_map=None ("auto" fails)
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            init_kwargs["device_map"] = None
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        init_kwargs.setdefault("dtype", trainer.model.dtype)
        init_kwargs.setdefault("attn_implementation", attn_implementation(trainer.model.config))
        return init_kwargs

    def _check_vocab(self, guidance) -> None:
        policy = self.trainer.accelerator.unwrap_model(self.trainer.model)
        check_same_vocabulary(policy, guidance, "guidance model", GUIDANCE_VOCABULARY_REASON, GUIDANCE_VOCABULARY_FIX)

    def _check_tokenizer(self, path: str) -> None:
        """Compare the tokenizer saved with the guidance model, if any, with the training tokenizer."""
        try:
            guidance_tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=self.trainer.args.trust_remote_code
            )
        except (OSError, ValueError):
            return  # no tokenizer saved with the guidance model: the vocabulary-size check is all we can do
        tokenizer = getattr(self.trainer.processing_class, "tokenizer", self.trainer.processing_class)
        if guidance_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer saved with the guidance model ({path}) differs from the training tokenizer, so the "
                "same token id may be a different token for the two models and r̂ would be meaningless. Use a "
                "guidance model trained with the policy's tokenizer. If you are sure the token ids agree, load the "
                "model yourself and pass it as `guidance_model=`, which skips this check."
            )


def is_adapter_folder(path: str) -> bool:
    """Whether `path` is a local folder holding a PEFT adapter (`adapter_config.json`) and no full model."""
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    )


def load_guidance_model(path: str, init_kwargs: dict):
    """A causal LM from a path or Hub identifier, as DPOTrainer loads its reference. A local PEFT adapter folder (what
    `--use_peft` writes) is loaded on the base model its `adapter_config.json` names and merged into it: the guidance
    model is frozen, so the merged model gives the same log-probabilities as base + adapter."""
    check_local_path(path, "guidance model")
    if not is_adapter_folder(path):
        return create_model_from_path(path, **init_kwargs)
    from peft import PeftModel

    with open(os.path.join(path, "adapter_config.json")) as f:
        base_path = json.load(f).get("base_model_name_or_path")
    if not base_path:
        raise ValueError(
            f"The guidance model {path} is a PEFT adapter whose `adapter_config.json` names no base model "
            "(`base_model_name_or_path`). Merge it into its base model first (`PeftModel.merge_and_unload()` then "
            "`save_pretrained`), and pass the merged folder."
        )
    try:
        check_local_path(base_path, "base model of the guidance adapter")
        base = create_model_from_path(base_path, **init_kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The guidance model {path} is a PEFT adapter, and its base model {base_path!r} (from "
            f"`adapter_config.json`) could not be loaded: {error} Merge the adapter into its base model first "
            "(`PeftModel.merge_and_unload()` then `save_pretrained`), and pass the merged folder."
        ) from error
    return PeftModel.from_pretrained(base, path).merge_and_unload()
