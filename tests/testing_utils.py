"""Helpers shared by the test modules (TRL's convention: `tests/testing_utils.py`); fixtures are in `conftest.py`.

Package internals that the tests call directly are imported here and nowhere else, so that moving one of them means
changing one import.
"""

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

import trl_tokenpref.base
import trl_tokenpref.checks
from trl_tokenpref import TBPOConfig, TBPOTrainer, TDPOConfig, TDPOTrainer, TGDPOConfig, TGDPOTrainer

# Package internals used by the tests (dataset checks and the truncation rule they share with the collators; the
# TBPO-Q head's file name)
from trl_tokenpref.checks import (  # noqa: F401 (re-exported for the test modules)
    drop_rows_without_completion_tokens,
    rows_without_completion_tokens,
    scored_completion_counts,
    scored_completion_range,
    why_no_completion_token,
)
from trl_tokenpref.tbpo import load_baseline_head
from trl_tokenpref.tbpo.baseline_head import BASELINE_HEAD_NAME
from trl_tokenpref.token_batch import TokenBatch
from trl_tokenpref.token_stats import compute_token_stats, reference_top_k


# The modules whose own checks raise the errors that `test_input_validation.py` expects
CHECK_MODULES = frozenset(
    {
        Path(trl_tokenpref.base.__file__).resolve(),
        Path(trl_tokenpref.checks.__file__).resolve(),
        Path(inspect.getsourcefile(scored_completion_range)).resolve(),
    }
)

METHODS = {"tdpo": (TDPOTrainer, TDPOConfig), "tgdpo": (TGDPOTrainer, TGDPOConfig), "tbpo": (TBPOTrainer, TBPOConfig)}
CONFIG_CLASSES = {DPOTrainer: DPOConfig, **dict(METHODS.values())}


# ------------------------------------------------------------------------------------------------ trainer cases
# The shared contract of the token-level trainers (`tests/test_trainer_contract.py`, `tests/test_dpo_metrics.py`)
# runs over these cases: one trainer with the settings that select one method or variant.


@dataclass(frozen=True)
class TrainerCase:
    trainer_class: type
    # Config kwargs that select the method or variant (a test may add its own on top)
    config: dict
    # The metrics the method logs next to DPOTrainer's. A case logs none of the other cases' (`other_cases_metrics`)
    own_metrics: frozenset[str]
    # One of `own_metrics` that is non-zero once the policy moved: the method's own term is live
    live_metric: str
    # The loss at πθ = π_ref, where ρ = κ = 0 (and TBPO-Q's zero-initialised head gives b ≡ 0)
    loss_at_init: float
    # Bound on the mean of the last 5 logged losses of the contract's 15-step full fine-tuning: a clear fall from
    # `loss_at_init` (0.5 from log 2; 0.9 × 0.25 for ℓ_SBA). Measured: 0.13-0.16 for TDPO and TGDPO, 0.16 for
    # TBPO-A/Q, -0.53 for BPO (ℓ_SBA goes below 0 as R falls below 1).
    trained_loss_below: float
    # Whether the trainer builds a TBPO-Q baseline head, which trains and is saved next to the model
    baseline_head: bool = False

    @property
    def needs_guidance(self) -> bool:
        """TGDPO needs a guidance model (the `guidance_path` fixture), unless its dataset has token-reward columns."""
        return self.trainer_class is TGDPOTrainer


KL_METRICS = frozenset({"kl/chosen", "kl/rejected", "kl/margin"})
TDPO_METRICS = KL_METRICS | {"tdpo_rewards/chosen", "tdpo_rewards/rejected", "tdpo_rewards/margins"}
BPO_METRICS = frozenset({"log_R/mean", "log_R/frac_below_zero"})
TBPO_METRICS = BPO_METRICS | {"min_length"}
SIGMOID_LOSS_AT_INIT = math.log(2)  # −log σ(0)
SBA_LOSS_AT_INIT = 0.25  # ℓ_SBA(λ=0, s=4)(R = 1), TBPO's default generator
TRAINER_CASES = {
    "tdpo1": TrainerCase(TDPOTrainer, dict(variant="tdpo1"), TDPO_METRICS, "kl/rejected", SIGMOID_LOSS_AT_INIT, 0.5),
    "tdpo2": TrainerCase(
        TDPOTrainer, dict(variant="tdpo2", alpha=0.5), TDPO_METRICS, "kl/rejected", SIGMOID_LOSS_AT_INIT, 0.5
    ),
    # α = 5: large enough that a misplaced or mis-scaled token reward changes the loss visibly (~20% of the token
    # weights 1 ± α r̂ are negative with the `guidance_path` model), and it still trains
    "tgdpo": TrainerCase(
        TGDPOTrainer,
        dict(alpha=5.0),
        frozenset({"token_rewards/chosen", "token_rewards/rejected", "token_rewards/negative_weights"}),
        "token_rewards/chosen",
        SIGMOID_LOSS_AT_INIT,
        0.5,
    ),
    "tbpo_a": TrainerCase(
        TBPOTrainer,
        dict(variant="tbpo_a"),
        TBPO_METRICS | KL_METRICS,
        "kl/rejected",
        SBA_LOSS_AT_INIT,
        0.9 * SBA_LOSS_AT_INIT,
    ),
    "tbpo_q": TrainerCase(
        TBPOTrainer,
        dict(variant="tbpo_q"),
        TBPO_METRICS | {"baseline/log_w_abs_mean", "baseline/frac_clamped"},
        "baseline/log_w_abs_mean",
        SBA_LOSS_AT_INIT,
        0.9 * SBA_LOSS_AT_INIT,
        baseline_head=True,
    ),
    # Sequence-level BPO: one macro-token per response
    "bpo": TrainerCase(
        TBPOTrainer, dict(token_level=False), BPO_METRICS, "log_R/mean", SBA_LOSS_AT_INIT, 0.9 * SBA_LOSS_AT_INIT
    ),
}


def other_cases_metrics(case: str) -> frozenset[str]:
    """The metrics that other cases log and `case` must not (a metric two methods share counts as its own)."""
    others = frozenset().union(*(spec.own_metrics for name, spec in TRAINER_CASES.items() if name != case))
    return others - TRAINER_CASES[case].own_metrics


class DPOReduction(NamedTuple):
    """Settings under which a case computes DPO's loss and gradient (docs/algorithms.md §6)."""

    case: str
    config: dict
    # Whether the reduction also holds once the policy moved away from the reference, or only at initialisation
    away_from_init: bool
    # TGDPO: the guidance model is the reference itself (r̂ ≡ 0), instead of the `guidance_path` model
    guidance_is_reference: bool = False


# Token-level TBPO (TBPO-A, TBPO-Q) has no entry: its loss is a mean of a per-token ℓ_h over aligned tokens, not a
# function of the summed log-ratios, so no setting makes it DPO except pairs of single tokens, where it equals BPO
# (`test_tbpo_trainer.py::test_single_token_pairs_a_equals_q_equals_bpo`).
DPO_REDUCTIONS = {
    "tdpo2_alpha0": DPOReduction("tdpo2", dict(alpha=0.0), away_from_init=True),  # invariant 4: α = 0 is DPO
    # Invariant 8: at initialisation κ = 0 and ∇κ = 0, so every TDPO variant is DPO. Away from it the KL term is live
    # and TDPO is not DPO (`test_tdpo_trainer.py::test_tdpo1_differs_from_dpo_away_from_init`)
    "tdpo2": DPOReduction("tdpo2", {}, away_from_init=False),
    "tdpo1": DPOReduction("tdpo1", {}, away_from_init=False),
    # Invariant 11: α = 0 (with a real guidance model), or a guidance model equal to the reference (r̂ ≡ 0, any α)
    "tgdpo_alpha0": DPOReduction("tgdpo", dict(alpha=0.0), away_from_init=True),
    "tgdpo_guidance_is_reference": DPOReduction("tgdpo", {}, away_from_init=True, guidance_is_reference=True),
    # Invariants 15 and 24: one macro-token per response with h = LR is DPO's sigmoid loss
    "bpo_lr": DPOReduction("bpo", dict(generator="lr"), away_from_init=True),
}

# ---------------------------------------------------------------------------------------------------- precision
# Equivalence tests run the models in float64 (`model_init_kwargs=FLOAT64_MODEL`), so that their tolerances follow
# from rounding instead of being guessed. One stage stays float32: both fused LM-head passes, ours
# (`trl_tokenpref/token_stats/fused.py`) and TRL's (`ChunkedLogProbFunction`, inside DPOTrainer), compute the per-token
# statistics (log-probs, KL, entropy, mean logit) in float32 even for a float64 model, and accumulate the LM head's
# weight gradient in float32 (so do, by design, the TBPO-Q head and TGDPO's collated token rewards). The rest rounds at
# 2^-53, so two float64 computations of the same value differ by a few float32 roundings of those statistics:
# tolerances are multiples of float32's unit roundoff.
FLOAT64_MODEL = {"dtype": torch.float64}
STATS_ROUNDOFF = 2.0**-24
# Two float64 computations of one loss, gradient or parameter update that order their float32 work differently
# (another kernel, another split of the batch) differ by the roundings of the statistics of each token (projection,
# logsumexp, log-prob: < 4 roundoffs) and by the float32 reductions over them (TRL's backward sums over the 512-word
# vocabulary and over the batch's tokens in float32 GEMMs: < log2(512) = 9 levels of blocked summation, one roundoff
# each): about 13 roundoffs of the summed magnitudes (14 for the TBPO-Q head's sums over its 1024 hidden units). 64
# leaves a factor 4-5 for gradients whose terms cancel. Measured on this machine: at most 16 (the TBPO-Q head's
# gradients against a naive computation), 10 (TDPO's and BPO's gradients against DPOTrainer's), 1 (the fused statistics
# against float64 full logits; gradient accumulation); a float32 model instead differs by 100-2500 roundoffs, depending
# on the machine's summation order.
EQUIVALENCE_RTOL = 64 * STATS_ROUNDOFF
# The TBPO-Q baseline head trains in float32 whatever the model's dtype (`TBPOTrainer` keeps it so, by design), with
# its own AdamW. Its updates follow from no rounding bound: its gradient is a centred (cancelling) sum over the batch's
# tokens, and AdamW divides each element by that element's own running RMS, so an element whose gradient nearly
# cancels takes a step set by its rounding. So the head keeps the bound these tests had in float32, 1e-4 (relative per
# tensor). Measured: 60 roundoffs (3.6e-6; gradient accumulation, float64 policy), 480 (2.9e-5; two processes); a
# head whose gradients are not all-reduced across processes drifts by ~3e-3.
HEAD_RTOL = 1e-4


def relative_gap(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`‖actual − expected‖ / ‖expected‖`: a per-tensor gap, immune to the cancellation that makes single elements
    of a gradient (a sum of many terms of both signs) arbitrarily small."""
    expected = expected.detach().double()
    scale = expected.norm()
    assert scale > 0, "the expected tensor is zero: a relative comparison would prove nothing"
    return ((actual.detach().double() - expected).norm() / scale).item()


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    gap = relative_gap(actual, expected)
    assert gap <= rtol, f"{name}: relative gap {gap:.2e} exceeds {rtol:.2e}"


def assert_same_loss_and_grads(result, expected, rtol: float = EQUIVALENCE_RTOL) -> None:
    """`(loss, grads)` pairs from [`loss_and_grads`] agree: the loss and each gradient tensor within `rtol`."""
    assert_relatively_close(result[0], expected[0], rtol, "loss")
    assert result[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        assert_relatively_close(result[1][name], grad, rtol, name)


# ----------------------------------------------------------------------------------------- padded token statistics
# The package computes every per-token statistic on a flat `[N]` vector of labelled tokens (`TokenBatch`). Many tests
# state their cases on a padded grid `[rows, seq]` with `-100` labels (as the naive full-logits reference does); these
# helpers run the flat functions on the grid's labelled positions and put the results back on it, with 0 elsewhere.


def padded_token_stats(
    hidden_states, lm_head, labels, ref_hidden_states=None, ref_lm_head=None, chunk_size=None, ref_cache=None
):
    """`compute_token_stats` on the labelled positions of a padded grid, scattered back onto it (0 elsewhere)."""
    mask = labels != -100
    if ref_cache is not None:
        ref_cache = type(ref_cache)(*(field[mask] for field in ref_cache))
    stats = compute_token_stats(
        hidden_states[mask],
        lm_head,
        labels[mask],
        None if ref_hidden_states is None else ref_hidden_states[mask],
        ref_lm_head,
        chunk_size=chunk_size,
        ref_cache=ref_cache,
    )

    def scatter(values):
        # `masked_scatter` keeps an all-masked grid connected to the graph (a differentiable zero)
        return None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values)

    return type(stats)(*(scatter(field) for field in stats))


def padded_reference_top_k(hidden, lm_head, labels, k, chunk_size=None):
    """`reference_top_k` on the labelled positions of a padded grid, scattered back onto it (0 elsewhere)."""
    mask = labels != -100
    cache = reference_top_k(hidden[mask], lm_head, labels[mask], k, chunk_size=chunk_size)

    def scatter(values):
        out = values.new_zeros(mask.shape + values.shape[1:])
        out[mask] = values
        return out

    return type(cache)(*(scatter(field) for field in cache))


def aligned_by_completion_index(values, mask):
    """Per-token values on a padded grid `[2B, L]` (chosen rows first) → chosen `[B, K]`, rejected `[B, K]`, pair mask
    `[B, K]`, through the trainers' own alignment (`TokenBatch.aligned_pairs`). A leading column is added so that a
    completion token at column 0 still has a predicting position."""
    token_batch = TokenBatch.from_padded(torch.zeros(mask.shape[0], mask.shape[1] + 1), F.pad(mask, (1, 0)))
    return token_batch.aligned_pairs(values[mask.bool()])


# ------------------------------------------------------------------------------------------------------ trainers


def fast_args(output_dir, config_class=TDPOConfig, **overrides):
    """Settings for tiny CPU runs: fp32 (no bf16 autocast), no gradient checkpointing, a high constant learning rate
    (the gradients of a tiny model are small and TRL's default 1e-6 would not move it), a log every step."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=12,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def build_trainer(trainer_class, model, tokenizer, dataset, output_dir, trainer_kwargs=None, **config):
    """A trainer (ours or `trl.DPOTrainer`) with [`fast_args`] plus `config`, training on `dataset`."""
    args = fast_args(output_dir, CONFIG_CLASSES[trainer_class], **config)
    return trainer_class(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **(trainer_kwargs or {})
    )


def collated_batch(trainer, num_pairs: int = 6) -> dict:
    """The first `num_pairs` rows of the trainer's train dataset, collated and on its device."""
    examples = [trainer.train_dataset[i] for i in range(num_pairs)]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def with_trailing_padding(batch: dict, columns: int, pad_token_id: int) -> dict:
    """`batch` with `columns` more padding columns at the end: the pad id, attention 0, completion 0. The per-token
    columns are flat (one value per labelled token), so they do not change."""
    grid = batch["input_ids"].shape
    padded = {
        key: F.pad(value, (0, columns), value=0) if value.shape[:2] == grid else value for key, value in batch.items()
    }
    padded["input_ids"][:, -columns:] = pad_token_id
    return padded


def assert_trailing_padding_changes_nothing(trainer, pad_token_id: int, columns: int = 5) -> None:
    """Invariant 1: extra padding columns (pad id, attention 0, completion 0) leave the loss unchanged."""
    batch = collated_batch(trainer)
    padded = with_trailing_padding(batch, columns, pad_token_id)
    with torch.no_grad():
        loss, padded_loss = trainer.compute_loss(trainer.model, batch), trainer.compute_loss(trainer.model, padded)
    assert_relatively_close(padded_loss, loss, EQUIVALENCE_RTOL, "loss")


def model_parameters(trainer, trainable_only: bool = False) -> dict[str, torch.nn.Parameter]:
    """The policy's parameters and, for TBPO-Q, the baseline head's (under `baseline_head.*`)."""
    params = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad or not trainable_only}
    if getattr(trainer, "baseline_head", None) is not None:
        params.update({f"baseline_head.{name}": p for name, p in trainer.baseline_head.named_parameters()})
    return params


def snapshot(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in parameters.items()}


def changed_parameters(before: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, param in parameters.items() if not torch.equal(before[name], param.detach())}


def loss_and_grads(trainer, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of the policy (and of the TBPO-Q head, under `baseline_head.*`) on one batch."""
    params = model_parameters(trainer, trainable_only=True)
    for param in params.values():
        param.grad = None
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for param in params.values():
        param.grad = None
    return loss.detach(), grads


def logged_steps(trainer) -> list[dict]:
    """The training log entries (one per logged step)."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in logged_steps(trainer)]


def last_metrics(trainer, mode: str = "train") -> dict[str, float]:
    """The value each metric got at the last `compute_loss` call, before `log` averages and clears them."""
    return {key: values[-1] for key, values in trainer._metrics[mode].items()}


def assert_saved_model_reloads(trainer, output_dir: Path) -> None:
    """`save_model` writes a plain causal LM that reloads with the trained weights, bit for bit."""
    trainer.save_model(str(output_dir))
    reloaded = AutoModelForCausalLM.from_pretrained(str(output_dir))
    assert reloaded.state_dict().keys() == trainer.model.state_dict().keys()
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, trainer.model.get_parameter(name).detach()), name


def assert_saved_baseline_head(trainer, output_dir: Path) -> None:
    """`save_model` writes the TBPO-Q baseline head next to the model (it reloads bit for bit), and no head file for a
    trainer without one."""
    head = getattr(trainer, "baseline_head", None)
    assert (Path(output_dir) / BASELINE_HEAD_NAME).is_file() == (head is not None)
    if head is not None:
        reloaded = load_baseline_head(str(output_dir))
        for name, tensor in head.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), name


def assert_saved_adapter_reloads(trainer, base_model_path: str, output_dir: Path) -> None:
    """`save_model` of a PEFT run writes the adapter, which reloads onto the base model with the trained weights."""
    trainer.save_model(str(output_dir))
    assert not (output_dir / "model.safetensors").exists()  # the adapter only
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_path), str(output_dir))
    adapter = {name: param for name, param in reloaded.named_parameters() if "lora_" in name}
    assert adapter
    for name, param in adapter.items():
        assert torch.equal(param, trainer.model.get_parameter(name).detach()), name


# -------------------------------------------------------------------------------------------------------- models


def perturb(module: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Add seeded Gaussian noise to every parameter: moves a policy away from its reference (so that ρ, κ and their
    gradients are not zero), or gives the zero-initialised output layer of the TBPO-Q head values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            # Drawn in float32 whatever the parameter's dtype: float32 and float64 copies get the same noise
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


def perturb_head(trainer) -> None:
    """Give the zero-initialised output layer of the TBPO-Q head values, so that log w is not identically 0 (nothing
    for a trainer without a head)."""
    if getattr(trainer, "baseline_head", None) is not None:
        perturb(trainer.baseline_head, seed=2)


def perturbed_copy(source: str, target: Path, seed: int, scale: float, lm_head_only: bool = False) -> str:
    """Save `source` with seeded Gaussian noise added to its weights (all of them, or only the LM head)."""
    model = AutoModelForCausalLM.from_pretrained(source)
    perturb(model.get_output_embeddings() if lm_head_only else model, seed, scale)
    model.save_pretrained(target)
    return str(target)


def saved_in_float64(source: str, target: Path) -> str:
    """`source` saved in float64 (with its tokenizer, if it has one), for what loads a model in its saved dtype
    (`--dtype auto`: the scripts)."""
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float64).save_pretrained(target)
    if (Path(source) / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


def asset_args(method: str, assets: dict[str, str]) -> list[str]:
    """Point a `tiny` recipe at the test's assets (the `assets` fixture) instead of `outputs/`."""
    args = ["--model_name_or_path", assets["model"], "--dataset_name", assets["data"]]
    if method == "tgdpo":
        args += ["--guidance_model_name_or_path", assets["guidance"]]
    return args


def text_length_reward(texts):
    """A deterministic stand-in for a reward model: the length of each text, in hundreds of characters."""
    return [len(text) / 100 for text in texts]
