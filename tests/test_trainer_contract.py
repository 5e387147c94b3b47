"""The contract every token-level trainer keeps, tested once over the cases of `testing_utils.TRAINER_CASES` (TDPO1,
TDPO2, TGDPO, TBPO-A, TBPO-Q, sequence-level BPO): the settings that reduce a method to DPO give DPOTrainer's loss
and gradient, trailing padding changes nothing, the logged metrics, training runs (full, explicit reference, LoRA,
conversational data, the config's defaults) with save/reload, and the configuration errors every config raises.
What only one method does is tested in its own file (`test_tdpo_trainer.py`, `test_tgdpo_trainer.py`,
`test_tbpo_trainer.py`); the values of the DPO metrics are in `test_dpo_metrics.py`. Invariant numbers refer to
docs/algorithms.md §6.

Tolerances: equivalence tests run in float64, so that results computed two ways differ by the float32 roundings of
the per-token statistics only (`testing_utils.EQUIVALENCE_RTOL`, where its derivation is)."""

import math

import pytest
import torch
from peft import LoraConfig
from testing_utils import (
    DPO_REDUCTIONS,
    FLOAT64_MODEL,
    KL_METRICS,
    METHODS,
    STATS_ROUNDOFF,
    TRAINER_CASES,
    assert_same_loss_and_grads,
    assert_saved_adapter_reloads,
    assert_saved_baseline_head,
    assert_saved_model_reloads,
    assert_trailing_padding_changes_nothing,
    changed_parameters,
    collated_batch,
    last_metrics,
    logged_losses,
    loss_and_grads,
    model_parameters,
    other_cases_metrics,
    perturb,
    perturb_head,
    snapshot,
)
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from trl_tokenpref import TGDPOTrainer


def cases(default: set[str]) -> list:
    """Every case of `TRAINER_CASES`; those outside `default` are marked slow. For the tests that train: a run costs
    seconds on CPU, so the default run trains the listed cases and `-m slow` the others."""
    assert default <= TRAINER_CASES.keys()
    return [case if case in default else pytest.param(case, marks=pytest.mark.slow) for case in TRAINER_CASES]


def methods(default: set[str]) -> list:
    """Every trainer of `METHODS`; those outside `default` are marked slow (see [`cases`])."""
    assert default <= METHODS.keys()
    return [method if method in default else pytest.param(method, marks=pytest.mark.slow) for method in METHODS]


def guidance_kwargs(trainer_class, guidance_path) -> dict:
    """The trainer's required arguments beyond DPOTrainer's: TGDPO's guidance model."""
    return {"guidance_model": guidance_path} if trainer_class is TGDPOTrainer else {}


def mean_of_last(losses: list[float], count: int) -> float:
    return sum(losses[-count:]) / count


# ------------------------------------------------------------------------------------------------ DPO equivalence

# Each reduction at initialisation, and away from it where it holds there (`DPOReduction.away_from_init`)
REDUCTION_CELLS = [
    pytest.param(name, moved, id=f"{name}-{'away_from_init' if moved else 'at_init'}")
    for name, reduction in DPO_REDUCTIONS.items()
    for moved in (False, True)
    if reduction.away_from_init or not moved
]


@pytest.mark.parametrize("reduction, moved", REDUCTION_CELLS)
def test_loss_and_gradient_equal_trl_dpo(reduction, moved, make_trainer, make_case_trainer, tiny_model_path, tmp_path):
    """In float64 (see `testing_utils.EQUIVALENCE_RTOL`): DPOTrainer and a token-level trainer set to reduce to DPO
    compute the same maths with different kernels, so their loss and gradients differ by float32 roundings of the
    per-token statistics only; at initialisation and, where the reduction holds there too, with the policy moved away
    from the reference."""
    case, config, _, guidance_is_reference = DPO_REDUCTIONS[reduction]
    common = dict(model_init_kwargs=FLOAT64_MODEL)
    dpo = make_trainer(DPOTrainer, tmp_path / "dpo", **common)
    trainer = make_case_trainer(
        case,
        tmp_path / reduction,
        trainer_kwargs={"guidance_model": tiny_model_path} if guidance_is_reference else None,
        **common,
        **config,
    )
    models = (dpo.model, trainer.model, trainer.ref_model, getattr(trainer, "guidance_model", None))
    assert all(model.dtype == torch.float64 for model in models if model is not None)
    if moved:
        perturb(dpo.model)
        perturb(trainer.model)
    batch = collated_batch(dpo)
    expected = loss_and_grads(dpo, batch)
    result = loss_and_grads(trainer, batch)

    if moved:
        assert abs(expected[0] - math.log(2)) > 5e-3  # ρ ≠ 0: not the log 2 of initialisation
    else:
        # Invariant 3: ρ = 0 exactly (policy and reference are the same weights through the same pass), so the loss
        # is log 2 up to the rounding of −log σ(0) to float32
        assert result[0].item() == pytest.approx(math.log(2), rel=STATS_ROUNDOFF, abs=0)
    assert_same_loss_and_grads(result, expected)


# ---------------------------------------------------------------------------------------------- one batch, one step


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trailing_padding_changes_nothing(case, tiny_tokenizer, make_case_trainer, tmp_path):
    """Invariant 1 (and 23 for TBPO, whose alignment is by completion index): extra padding columns (pad id,
    attention 0, completion 0, and 0 in any other per-token column) leave the loss unchanged, away from
    initialisation, in float64 (`testing_utils.EQUIVALENCE_RTOL`)."""
    trainer = make_case_trainer(case, tmp_path, model_init_kwargs=FLOAT64_MODEL)
    perturb(trainer.model)
    perturb_head(trainer)
    assert_trailing_padding_changes_nothing(trainer, tiny_tokenizer.pad_token_id)


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_logged_metrics(case, dpo_metric_keys, make_case_trainer, tmp_path):
    """Every metric DPOTrainer logs (their values: test_dpo_metrics.py), the method's own and no other method's; each
    `*/margin(s)` is its `*/chosen` − `*/rejected`, and a KL is positive once the policy moved. The values of each
    method's own metrics are tested in its file."""
    trainer = make_case_trainer(case, tmp_path, beta=0.3)
    perturb(trainer.model)
    perturb_head(trainer)
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, collated_batch(trainer))
    metrics = last_metrics(trainer)
    own = TRAINER_CASES[case].own_metrics
    assert dpo_metric_keys["train"] | own <= metrics.keys()
    assert not other_cases_metrics(case) & metrics.keys()
    margins = [key for key in metrics if key.endswith(("/margin", "/margins"))]
    assert "rewards/margins" in margins and ("kl/margin" in margins) == ("kl/margin" in own)
    for key in margins:
        prefix = key.rsplit("/", 1)[0]
        expected = metrics[f"{prefix}/chosen"] - metrics[f"{prefix}/rejected"]
        assert metrics[key] == pytest.approx(expected, abs=1e-6), key
    for key in (KL_METRICS - {"kl/margin"}) & own:
        assert metrics[key] > 0, key


# -------------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("case", cases({"tdpo2", "tgdpo", "tbpo_a", "tbpo_q", "bpo"}))
def test_full_fine_tuning(case, make_case_trainer, default_dataset, tmp_path):
    """Full fine-tuning with the reference reloaded from the policy's path: the loss starts at its initialisation
    value and falls, every parameter moves (the TBPO-Q head's included), the reference and the guidance model do not,
    the method's own metrics are logged in training and evaluation, and the saved model (and head) reload."""
    spec = TRAINER_CASES[case]
    trainer = make_case_trainer(
        case,
        tmp_path / "run",
        dataset=default_dataset["train"],
        trainer_kwargs={"eval_dataset": default_dataset["test"].select(range(16))},
        max_steps=15,
    )
    assert (getattr(trainer, "baseline_head", None) is not None) == spec.baseline_head
    before = snapshot(model_parameters(trainer))
    guidance = getattr(trainer, "guidance_model", None)
    assert (guidance is not None) == spec.needs_guidance
    guidance_before = snapshot(dict(guidance.named_parameters())) if guidance is not None else {}
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[0] == pytest.approx(spec.loss_at_init, abs=1e-4)
    assert mean_of_last(losses, 5) < spec.trained_loss_below
    assert changed_parameters(before, model_parameters(trainer)) == set(before)  # every trainable parameter moved
    for name, param in trainer.ref_model.named_parameters():  # the reference is untouched
        torch.testing.assert_close(param, before[name])
    if guidance is not None:
        assert not changed_parameters(guidance_before, dict(guidance.named_parameters()))
    last_logged = trainer.state.log_history[-2]  # the last step's (the last entry is the run's summary)
    assert spec.own_metrics <= last_logged.keys() and not other_cases_metrics(case) & last_logged.keys()
    assert any(abs(log.get(spec.live_metric, 0)) > 0 for log in trainer.state.log_history)

    metrics = trainer.evaluate()
    expected_keys = {"eval_loss", "eval_rewards/accuracies"} | {f"eval_{key}" for key in spec.own_metrics}
    assert expected_keys <= metrics.keys()

    assert_saved_model_reloads(trainer, tmp_path / "saved")
    assert_saved_baseline_head(trainer, tmp_path / "saved")


@pytest.mark.parametrize("case", cases({"tdpo1"}))
def test_explicit_reference_model(case, make_case_trainer, tiny_model_path, default_dataset, tmp_path):
    """A reference model passed as `ref_model` is the one used, and stays untouched while the policy trains."""
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = make_case_trainer(
        case, tmp_path / "run", dataset=default_dataset["train"], trainer_kwargs={"ref_model": ref_model}
    )
    assert trainer.ref_model is ref_model
    reference_before = snapshot(dict(ref_model.named_parameters()))
    trainer.train()
    losses = logged_losses(trainer)
    assert mean_of_last(losses, 4) < losses[0]
    assert not changed_parameters(reference_before, dict(ref_model.named_parameters()))


@pytest.mark.parametrize("case", cases({"tdpo2", "tbpo_a", "tbpo_q"}))
def test_lora(case, make_case_trainer, tiny_model_path, default_dataset, tmp_path):
    """With LoRA the reference is the model with its adapter disabled (no reference copy), only the adapter (and the
    TBPO-Q head) moves, the method's own term is live, and the saved adapter (and head) reload."""
    spec = TRAINER_CASES[case]
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_case_trainer(
        case,
        tmp_path / "run",
        dataset=default_dataset["train"],
        trainer_kwargs={"peft_config": peft_config},
        learning_rate=2e-2,
        max_steps=15,
    )
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled
    before = snapshot(model_parameters(trainer))  # the frozen base model's parameters included
    trainer.train()
    losses = logged_losses(trainer)
    assert mean_of_last(losses, 5) < losses[0]
    changed = changed_parameters(before, model_parameters(trainer))
    assert changed == set(model_parameters(trainer, trainable_only=True))
    assert all("lora_" in name or name.startswith("baseline_head.") for name in changed)
    assert any(name.startswith("baseline_head.") for name in changed) == spec.baseline_head
    assert any(abs(log.get(spec.live_metric, 0)) > 0 for log in trainer.state.log_history)

    assert_saved_adapter_reloads(trainer, tiny_model_path, tmp_path / "adapter")
    assert_saved_baseline_head(trainer, tmp_path / "adapter")


@pytest.mark.parametrize("case", cases({"tdpo2"}))
def test_conversational_dataset(case, make_case_trainer, conversational_dataset, tmp_path):
    trainer = make_case_trainer(case, tmp_path / "run", dataset=conversational_dataset["train"], max_steps=8)
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", methods({"tdpo"}))
def test_config_defaults_plus_output_dir(
    method, tiny_model_path, tiny_tokenizer, train_subset, guidance_path, tmp_path
):
    """The config's defaults (TRL's: bf16 autocast, gradient checkpointing, lr 1e-6, 3 epochs) train as is.
    `use_cpu=True` is what DPOConfig itself needs on a machine without a GPU, since bf16 defaults to True."""
    trainer_class, config_class = METHODS[method]
    trainer = trainer_class(
        model=tiny_model_path,
        args=config_class(output_dir=str(tmp_path / "defaults"), use_cpu=True),
        train_dataset=train_subset.select(range(16)),
        processing_class=tiny_tokenizer,
        **guidance_kwargs(trainer_class, guidance_path),
    )
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0


@pytest.mark.parametrize("method", list(METHODS))
def test_model_instance_and_default_args(
    method, tiny_model_path, tiny_tokenizer, train_subset, guidance_path, tmp_path, monkeypatch
):
    """`args=None` builds `<Method>Config("<model>-<METHOD>")`, as DPOTrainer does."""
    trainer_class, config_class = METHODS[method]
    monkeypatch.chdir(tmp_path)
    # TRL's default bf16=True is refused by transformers on a machine without a bf16 GPU (DPOTrainer alike)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = trainer_class(
        model=model,
        train_dataset=train_subset,
        processing_class=tiny_tokenizer,
        **guidance_kwargs(trainer_class, guidance_path),
    )
    assert isinstance(trainer.args, config_class)
    assert trainer.args.output_dir.endswith(f"model-{method.upper()}")


# ---------------------------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("method", list(METHODS))
def test_dpo_config_is_refused_with_a_fix(
    method, tiny_model_path, tiny_tokenizer, train_subset, guidance_path, tmp_path
):
    trainer_class, config_class = METHODS[method]
    with pytest.raises(TypeError, match=f"must be a `{config_class.__name__}`.*Build it with"):
        trainer_class(
            model=tiny_model_path,
            args=DPOConfig(output_dir=str(tmp_path), use_cpu=True),
            train_dataset=train_subset,
            processing_class=tiny_tokenizer,
            **guidance_kwargs(trainer_class, guidance_path),
        )


# Values every config refuses (each method's own fields: its file); `{method}` is the method's name in the message
INVALID_VALUES = {
    "beta": (dict(beta=0.0), "`beta` must be positive"),
    "loss_type": (dict(loss_type=["ipo"]), "{method} defines its own loss"),
    "f_divergence_type": (dict(f_divergence_type="forward_kl"), "DPO loss option that {method} does not implement"),
    "token_chunk_size": (dict(token_chunk_size=0), "`token_chunk_size` must be a positive integer"),
}


@pytest.mark.parametrize("value", list(INVALID_VALUES))
@pytest.mark.parametrize("method", list(METHODS))
def test_invalid_values(method, value, tmp_path):
    kwargs, message = INVALID_VALUES[value]
    with pytest.raises(ValueError, match=message.format(method=method.upper())):
        METHODS[method][1](output_dir=str(tmp_path), use_cpu=True, **kwargs)
