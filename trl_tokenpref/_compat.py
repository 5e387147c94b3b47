"""Every import of a TRL symbol that `trl` does not export at its top level, in one place.

TRL keeps these helpers out of its public API, so they may move or change between minor releases. We pin
`trl>=1.16,<1.17` in `pyproject.toml` and `tests/test_compat.py` checks each symbol's contract, so an upgrade fails
loudly there instead of deep inside a training run.
"""

from importlib.metadata import version

from packaging.version import Version


TRL_VERSION = Version(version("trl"))
if not (Version("1.16.0") <= TRL_VERSION < Version("1.17.0")):
    raise ImportError(
        f"trl_tokenpref supports trl>=1.16,<1.17, but trl {TRL_VERSION} is installed. Install a supported version with "
        "`pip install 'trl>=1.16,<1.17'`."
    )

# TRL's own chunked kernels: baselines in tests and benchmarks only. Our trainers use the fused pass in
# `token_stats.py`, which computes log-probs, forward KL and entropy from one projection of each tile.
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402

# TGDPO's guidance model is wrapped as DPOTrainer wraps its reference (frozen, evaluation mode) under DeepSpeed / FSDP.
from trl.models import prepare_deepspeed, prepare_fsdp  # noqa: E402

# Reference pass without gradient checkpointing (avoids a PyTorch warning under reentrant checkpointing).
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

# The collator DPOTrainer uses (a public class in a non-top-level module).
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

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


__all__ = [
    "TRL_VERSION",
    "ChunkedDivergenceFunction",
    "ChunkedLogProbFunction",
    "DataCollatorForPreference",
    "create_model_from_path",
    "disable_dropout_in_model",
    "disable_gradient_checkpointing",
    "hash_module",
    "maybe_gather_lm_head_ctx",
    "prepare_deepspeed",
    "prepare_fsdp",
    "use_adapter",
]
