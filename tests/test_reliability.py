"""What a long run relies on: gradient accumulation, resuming and seeding do not change the objective.

* **Gradient accumulation.** DPOTrainer's loss is a mean over the pairs of a micro-batch (TBPO's: a mean over pairs of
  per-pair token means) and `Trainer` divides each micro-batch's loss by the number of accumulation steps
  (`loss_is_scaled_for_ga = False`), so micro-batches of equal size accumulate to the gradient of the whole batch: 4
  pairs × 1 step and 2 pairs × 2 steps must give the same parameters, for every trainer. (Micro-batches of unequal
  size would weigh their pairs unequally, as in DPOTrainer.) The policy is trained with plain SGD and no gradient
  clipping, so that a wrongly scaled gradient shows in the parameters (Adam's update is nearly invariant to a
  constant scale, and clipping would hide one); the TBPO-Q head keeps its own AdamW, so its logged gradient norm
  is compared too. The models are float64, so that the tolerance follows from rounding (in float32 the summation
  order of another batch split alone moves the updates by up to 1.5e-4 on some machines).
* **Resume.** Six uninterrupted steps against three steps, a checkpoint, and three resumed steps: the same loss
  trajectory and the same final parameters, the TBPO-Q head and its optimizer's moments included. The model has
  attention dropout (kept on with `disable_dropout=False`) and the sampler shuffles, with an epoch boundary inside
  the resumed steps, so the RNG state and the data order must be restored too: a resume without `rng_state.pth`
  diverges (checked, so that this test would notice a missing restore). Bitwise: no tolerance to choose.
* **Determinism.** The same seed twice gives bitwise identical losses and parameters.
"""

import math
import shutil
from pathlib import Path

import pytest
import torch
from testing_utils import (
    EQUIVALENCE_RTOL,
    FLOAT64_MODEL,
    HEAD_RTOL,
    assert_relatively_close,
    fast_args,
    logged_steps,
    model_parameters,
    snapshot,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_tokenpref import TBPOConfig, TBPOTrainer, TDPOConfig, TDPOTrainer, TGDPOConfig, TGDPOTrainer


def args_for(config_class, output_dir, **overrides):
    """Four pairs per step, three steps, a large constant learning rate: the parameters move far enough for a wrong
    gradient scale to show."""
    settings = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=0.1)
    return fast_args(output_dir, config_class, **{**settings, **overrides})


@pytest.fixture(scope="module")
def train_pairs(default_dataset):
    return default_dataset["train"].select(range(16))


@pytest.fixture(scope="module")
def dropout_model_path(tiny_model_path, tmp_path_factory) -> str:
    """The tiny model with attention dropout 0.1, so that every training step draws from the RNG."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attention_dropout=0.1)
    path = tmp_path_factory.mktemp("dropout-model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------------- gradient accumulation

GA_CASES = {
    "tdpo2": (TDPOTrainer, TDPOConfig, dict(variant="tdpo2"), False),
    "tdpo1": (TDPOTrainer, TDPOConfig, dict(variant="tdpo1"), False),
    "tgdpo_guidance_model": (TGDPOTrainer, TGDPOConfig, dict(alpha=5.0), True),
    "tgdpo_precomputed": (TGDPOTrainer, TGDPOConfig, dict(alpha=5.0, precompute_ref_log_probs=True), True),
    "tbpo_a": (TBPOTrainer, TBPOConfig, dict(variant="tbpo_a"), False),
    "tbpo_q": (TBPOTrainer, TBPOConfig, dict(variant="tbpo_q", baseline_hidden_size=32), False),
    "bpo_sequence_level": (TBPOTrainer, TBPOConfig, dict(token_level=False), False),
}


@pytest.mark.parametrize("case", list(GA_CASES))
def test_gradient_accumulation_matches_the_full_batch(
    case, tiny_model_path, tiny_tokenizer, train_pairs, guidance_path, tmp_path
):
    """In float64 (the tolerance follows from rounding, `testing_utils.EQUIVALENCE_RTOL`): in float32 the 2 x 2 and
    4 x 1 updates after three SGD steps at lr 0.1 differ by up to 1.5e-4 (relative) on some machines, from the order
    of summation alone."""
    trainer_class, config_class, config, uses_guidance = GA_CASES[case]
    runs = {}
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = args_for(
            config_class,
            tmp_path / f"{batch_size}x{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            max_grad_norm=0.0,  # no clipping: it would rescale a wrongly scaled gradient back to the same update
            model_init_kwargs=FLOAT64_MODEL,
            **config,
        )
        extra = {"guidance_model": guidance_path} if uses_guidance else {}
        trainer = trainer_class(
            model=tiny_model_path, args=args, train_dataset=train_pairs, processing_class=tiny_tokenizer, **extra
        )
        assert trainer.model.dtype == torch.float64
        before = snapshot(model_parameters(trainer, trainable_only=True))
        trainer.train()
        after = snapshot(model_parameters(trainer, trainable_only=True))
        runs[batch_size, accumulation] = trainer, {name: after[name] - before[name] for name in before}

    (full, full_updates), (accumulated, accumulated_updates) = runs[4, 1], runs[2, 2]
    assert full_updates.keys() == accumulated_updates.keys()
    for name, update in full_updates.items():
        assert update.norm() > 0, f"{name} did not move: the comparison would prove nothing"
        rtol = HEAD_RTOL if name.startswith("baseline_head.") else EQUIVALENCE_RTOL
        assert_relatively_close(accumulated_updates[name], update, rtol, f"{name}: the 2 x 2 against the 4 x 1 update")

    # Same trajectory, step by step: the logged loss is the mean over the accumulated micro-batches
    full_logs, accumulated_logs = logged_steps(full), logged_steps(accumulated)
    assert len(full_logs) == len(accumulated_logs) == 3
    keys = {"loss": EQUIVALENCE_RTOL, "rewards/margins": EQUIVALENCE_RTOL, "logps/chosen": EQUIVALENCE_RTOL}
    if case == "tbpo_q":
        keys["baseline/grad_norm"] = HEAD_RTOL  # the head's AdamW would hide a constant scale in its parameters
    for key, rtol in keys.items():
        values, expected = [log[key] for log in accumulated_logs], [log[key] for log in full_logs]
        assert values == pytest.approx(expected, rel=rtol, abs=0), key


# ----------------------------------------------------------------------------------------- resume and determinism

RESUME_CASES = {
    "tdpo": (TDPOTrainer, TDPOConfig, dict()),
    "tbpo_q": (TBPOTrainer, TBPOConfig, dict(variant="tbpo_q", baseline_hidden_size=32)),
}
TOTAL_STEPS, CHECKPOINT_STEP = 6, 3  # 16 pairs, 4 per step: the resumed steps 4-6 cross into the second epoch


def build_resume_trainer(case, model_path, tokenizer, dataset, output_dir):
    trainer_class, config_class, config = RESUME_CASES[case]
    args = args_for(
        config_class,
        output_dir,
        max_steps=TOTAL_STEPS,
        learning_rate=5e-3,
        lr_scheduler_type="linear",  # the scheduler's position must be restored too
        warmup_steps=2,
        save_strategy="steps",
        save_steps=CHECKPOINT_STEP,
        disable_dropout=False,  # keep the attention dropout: each step then depends on the RNG state
        **config,
    )
    return trainer_class(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.fixture(scope="module")
def uninterrupted(dropout_model_path, tiny_tokenizer, train_pairs, tmp_path_factory):
    """Six uninterrupted steps per case (checkpoints at steps 3 and 6), run once for the module."""
    runs = {}
    for case in RESUME_CASES:
        output_dir = tmp_path_factory.mktemp(f"uninterrupted-{case}")
        trainer = build_resume_trainer(case, dropout_model_path, tiny_tokenizer, train_pairs, output_dir)
        trainer.train()
        runs[case] = trainer
    return runs


def assert_same_run(trainer, expected) -> None:
    """Bitwise the same run: every logged value at every step, and the final parameters (the same operations on the
    same values, on one machine, give the same bits)."""
    steps, expected_steps = logged_steps(trainer), logged_steps(expected)
    assert [log["step"] for log in steps] == [log["step"] for log in expected_steps] == list(range(1, TOTAL_STEPS + 1))
    keys = [key for key in expected_steps[-1] if isinstance(expected_steps[-1][key], float) and key != "epoch"]
    for key in keys:
        assert [log[key] for log in steps] == [log[key] for log in expected_steps], key
    state = snapshot(model_parameters(trainer, trainable_only=True))
    for name, value in snapshot(model_parameters(expected, trainable_only=True)).items():
        assert torch.equal(state[name], value), name


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_the_same_run(case, uninterrupted, dropout_model_path, tiny_tokenizer, train_pairs, tmp_path):
    full = uninterrupted[case]
    checkpoint = Path(full.args.output_dir) / f"checkpoint-{CHECKPOINT_STEP}"
    assert (checkpoint / "rng_state.pth").is_file() and (checkpoint / "optimizer.pt").is_file()

    # A run stopped after its checkpoint at step 3: a fresh trainer, resumed from it
    shutil.copytree(checkpoint, tmp_path / "resumed" / checkpoint.name)
    resumed = build_resume_trainer(case, dropout_model_path, tiny_tokenizer, train_pairs, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(resumed, full)
    if case == "tbpo_q":  # the head's AdamW moments, not only the head's parameters
        state, expected = resumed.baseline_optimizer.state_dict(), full.baseline_optimizer.state_dict()
        for index, values in expected["state"].items():
            for key, value in values.items():
                assert torch.equal(state["state"][index][key], value), (index, key)

    # The same resume without the RNG state draws other dropout masks from step 4 on: the comparison above is
    # sensitive to a missing RNG restore
    shutil.copytree(checkpoint, tmp_path / "no-rng" / checkpoint.name)
    (tmp_path / "no-rng" / checkpoint.name / "rng_state.pth").unlink()
    no_rng = build_resume_trainer(case, dropout_model_path, tiny_tokenizer, train_pairs, tmp_path / "no-rng")
    no_rng.args.max_steps = CHECKPOINT_STEP + 1
    # An explicit path: `True` resumes only from a complete checkpoint (checkpoints.resolve_checkpoint); this one is
    # resumed from with a warning that it lacks the RNG state
    no_rng.train(resume_from_checkpoint=str(tmp_path / "no-rng" / checkpoint.name))
    step_4 = logged_steps(no_rng)[CHECKPOINT_STEP]
    assert step_4["step"] == CHECKPOINT_STEP + 1
    assert not math.isclose(step_4["loss"], logged_steps(full)[CHECKPOINT_STEP]["loss"], rel_tol=1e-7)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_same_seed_same_run(case, uninterrupted, dropout_model_path, tiny_tokenizer, train_pairs, tmp_path):
    again = build_resume_trainer(case, dropout_model_path, tiny_tokenizer, train_pairs, tmp_path / "again")
    again.train()
    assert_same_run(again, uninterrupted[case])
