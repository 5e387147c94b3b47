"""Every private member of an upstream library that the package relies on, in one place.

TRL, transformers, accelerate and datasets keep these out of their public API, so they may move or change between
minor releases. Each one is reached here, and only here, and `tests/test_compat.py` checks the contract we rely on, so
that an upgrade fails loudly there instead of deep inside a training run. We pin `trl>=1.16,<1.17` in
`pyproject.toml`: widen it only after the contract tests pass.

Three kinds of reach-in:

* **imports** of helpers that TRL does not export at its top level;
* **accessors** for private attributes of upstream objects (a dataset's fingerprint, the accelerator's list of
  prepared models, DPOTrainer's precompute state);
* **override points**: private methods of `Trainer` / `DPOTrainer` that the trainers override, and private attributes
  they read. A method cannot be renamed for us, so they are listed in [`OVERRIDDEN_METHODS`] and
  [`DPO_TRAINER_ATTRIBUTES`], whose names and signatures the contract tests check.
"""

import contextlib
from importlib.metadata import version

from packaging.version import Version


TRL_VERSION = Version(version("trl"))
if not (Version("1.16.0") <= TRL_VERSION < Version("1.17.0")):
    raise ImportError(
        f"trl_tokenpref supports trl>=1.16,<1.17, but trl {TRL_VERSION} is installed. Install a supported version with "
        "`pip install 'trl>=1.16,<1.17'`."
    )

# TRL's own chunked kernels: baselines in tests and benchmarks only. Our trainers use the fused pass in
# `token_stats/fused.py`, which computes log-probs, forward KL and entropy from one projection of each tile.
import trl.kernels.chunked_divergence as _trl_chunked_divergence  # noqa: E402
import trl.kernels.chunked_logprob as _trl_chunked_logprob  # noqa: E402
import trl.trainer.utils as _trl_trainer_utils  # noqa: E402

# Padding-free training (packing.py): the per-sequence sdpa is registered with transformers' attention interfaces, and
# delegates to transformers' own sdpa function and mask (module-level functions outside transformers' top level)
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402

# TGDPO's guidance model is wrapped as DPOTrainer wraps its reference (frozen, evaluation mode) under DeepSpeed / FSDP.
from trl.models import prepare_deepspeed, prepare_fsdp  # noqa: E402

# The collator DPOTrainer uses (a public class in a non-top-level module), and the trainer whose tokenization
# `tokenize_preference_dataset` reuses.
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402

# `maybe_gather_lm_head_ctx`: ZeRO-3 all-gather of the LM head while its weight is read directly.
# `use_adapter`: reference pass under PEFT, with the adapter disabled (or the frozen "ref" adapter active).
# `create_model_from_path`, `disable_dropout_in_model`, `hash_module` (TGDPO): the guidance model is loaded, frozen and
# hashed (the cache key of precomputed per-token columns) exactly as DPOTrainer does for its reference model.
from trl.trainer.utils import (  # noqa: E402
    create_model_from_path,
    disable_dropout_in_model,
    hash_module,
    maybe_gather_lm_head_ctx,
    use_adapter,
)


# ---------------------------------------------------------------------------------------------------------------------
# Override points: private methods of transformers' `Trainer` and TRL's `DPOTrainer` that the trainers override, with
# the parameters they are called with. `tests/test_compat.py` checks each name and signature, and that upstream calls
# them where we rely on it (e.g. `_precompute_ref_logps` during `__init__`).
# ---------------------------------------------------------------------------------------------------------------------

OVERRIDDEN_METHODS = {
    # DPOTrainer: dataset preparation (row checks), the per-token precompute, the columns kept for the collator
    "DPOTrainer._prepare_dataset": ("self", "dataset", "processing_class", "args", "dataset_name"),
    "DPOTrainer._precompute_ref_logps": ("self", "dataset", "name", "batch_size"),
    "DPOTrainer._set_signature_columns_if_needed": ("self",),
    # Trainer: TBPO-Q saves and restores its baseline head and its optimizer beside the model's; the loads name the
    # checkpoint in their errors (checkpoints.TrainingGuardMixin)
    "Trainer._save_optimizer_and_scheduler": ("self", "output_dir"),
    "Trainer._load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "Trainer._load_optimizer_and_scheduler": ("self", "checkpoint"),
    "Trainer._load_rng_state": ("self", "checkpoint"),
    "Trainer._load_best_model": ("self",),
    # Trainer (checkpoints.TrainingGuardMixin): a checkpoint's manifest is written once `_save_checkpoint` has written
    # every file; each optimizer step is checked for a non-finite loss or gradient norm before
    # `_maybe_log_save_evaluate` logs or saves it (it gets the step's gradient norm, and is called once per step)
    "Trainer._save_checkpoint": ("self", "model", "trial"),
    "Trainer._maybe_log_save_evaluate": ("self", "tr_loss", "grad_norm", "model", "trial", "epoch"),
}

# Private attributes of a DPOTrainer that the trainers read or write, and what they hold. The metrics are logged into
# `_metrics` exactly as DPOTrainer logs its own, so that `log` averages and prints ours with its.
DPO_TRAINER_ATTRIBUTES = {
    "_metrics": "dict mode -> dict key -> list of floats, averaged and cleared by `log`",
    "_total_train_tokens": "int, the running `num_tokens` count",
    "_tp_size": "int, tensor-parallel degree dividing the token count",
    "_signature_columns": "list of column names kept when `remove_unused_columns=True`",
    "aux_loss_enabled": "bool, MoE router loss requested",
    "router_aux_loss_coef": "float, its weight",
}


# ---------------------------------------------------------------------------------------------------------------------
# Accessors
# ---------------------------------------------------------------------------------------------------------------------


def precompute_model_hash(trainer) -> str:
    """The hash DPOTrainer computed of its reference model at init (rank 0's, before sharding): the part of the cache
    key of precomputed reference values that says which model computed them."""
    return trainer._precompute_model_hash


def precompute_reference_model(trainer):
    """The model that computes reference values before training, chosen as DPOTrainer's `_precompute_ref_logps` does.

    Before `train`, DeepSpeed parameters are still on CPU (ZeRO-1/2) or sharded (ZeRO-3): without an explicit
    reference, the policy is wrapped in an inference engine, built once and kept on the trainer for later passes.
    """
    if trainer.ref_model is None and trainer.is_deepspeed_enabled:
        if trainer._precompute_engine is None:
            trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
        return trainer._precompute_engine
    return trainer.ref_model or trainer.model


def forget_prepared_model(accelerator, model) -> None:
    """Drop `model` from the accelerator's list of prepared models, so that its memory can be freed:
    `accelerator.prepare_model` keeps every prepared model alive in that list."""
    accelerator._models = [prepared for prepared in accelerator._models if prepared is not model]


def dataset_fingerprint(dataset) -> str:
    """The fingerprint `datasets` keeps of a map-style dataset's content and transforms (its cache key)."""
    return dataset._fingerprint


def dataset_cache_file(dataset, fingerprint: str) -> str:
    """The path of the cache file that `datasets` would use for a transform of `dataset` with this fingerprint (in the
    dataset's own cache directory, so every process of a run finds it)."""
    return dataset._get_cache_file_path(fingerprint)


def dataset_builder_names() -> set[str]:
    """The names `datasets.load_dataset` takes as its own builders (`json`, `parquet`, ...), not as Hub ids."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # fall back to the builders a preference dataset is stored with
        return {"arrow", "csv", "json", "pandas", "parquet", "text"}
    return set(_PACKAGED_DATASETS_MODULES)


@contextlib.contextmanager
def disable_gradient_checkpointing(model, gradient_checkpointing_kwargs: dict | None = None):
    """Gradient (activation) checkpointing off for a reference pass, restored afterwards: TRL's helper of the same
    name, through transformers' non-deprecated `activation_checkpointing` names where they exist (5.24 renamed them
    and warns on the old ones at every call)."""
    was_enabled = getattr(model, "is_activation_checkpointing", None)
    if was_enabled is None:
        was_enabled = model.is_gradient_checkpointing
    if was_enabled:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    try:
        yield
    finally:
        if was_enabled:
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable(gradient_checkpointing_kwargs)


def attn_implementation(config) -> str | None:
    """The attention implementation a loaded model uses (`config._attn_implementation`), to load a second model of the
    run the same way."""
    return config._attn_implementation


def set_attn_implementation(model, implementation: str) -> None:
    """Switch a loaded model (its base model, under PEFT) to another registered attention implementation. transformers
    does not save it with the config (`_attn_implementation_internal` is left out of `config.json`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(implementation)


def tokenize_preference_dataset(dataset, processing_class, args, dataset_name: str):
    """DPOTrainer's dataset preparation (prompt extraction, EOS, tokenization, its `max_length` filter) without a
    trainer, so that a script tokenizes exactly as training will. It reads only the trainer's text tokenizer."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    holder = _TokenizerHolder(tokenizer)
    return DPOTrainer._prepare_dataset(holder, dataset, processing_class, args, dataset_name)


class _TokenizerHolder:
    """What `DPOTrainer._prepare_dataset` reads of its trainer."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer


def set_trl_lm_head_tiles(token_tile: int, vocab_tile: int) -> tuple[int, int]:
    """Set the tiles of TRL's chunked log-prob kernel (the fused LM head of `DPOTrainer`) and of its chunked divergence
    kernel; returns the previous `(token_tile, vocab_tile)`. For benchmarks only: TRL's defaults (4096 tokens x 32768
    columns) are sized for GPUs and run 1.5-1.8x slower on CPU than a CPU-sized tile (docs/benchmarks.md)."""
    previous = (_trl_chunked_logprob.TOKEN_CHUNK_SIZE, _trl_trainer_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    _trl_chunked_logprob.TOKEN_CHUNK_SIZE = _trl_chunked_divergence.TOKEN_CHUNK_SIZE = token_tile
    _trl_trainer_utils._CHUNKED_LOGPROB_CHUNK_SIZE = _trl_chunked_divergence.VOCAB_CHUNK_SIZE = vocab_tile
    return previous


__all__ = [
    "AttentionInterface",
    "AttentionMaskInterface",
    "DPO_TRAINER_ATTRIBUTES",
    "OVERRIDDEN_METHODS",
    "TRL_VERSION",
    "ChunkedDivergenceFunction",
    "ChunkedLogProbFunction",
    "DataCollatorForPreference",
    "attn_implementation",
    "create_model_from_path",
    "dataset_builder_names",
    "dataset_cache_file",
    "dataset_fingerprint",
    "disable_dropout_in_model",
    "disable_gradient_checkpointing",
    "forget_prepared_model",
    "hash_module",
    "maybe_gather_lm_head_ctx",
    "precompute_model_hash",
    "precompute_reference_model",
    "prepare_deepspeed",
    "prepare_fsdp",
    "tokenize_preference_dataset",
    "sdpa_attention_forward",
    "sdpa_mask",
    "set_attn_implementation",
    "set_trl_lm_head_tiles",
    "use_adapter",
]
