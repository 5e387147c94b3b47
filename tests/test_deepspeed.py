"""DeepSpeed ZeRO-3 and ZeRO-2 on two CPU processes (gloo), launched as a user launches a run: `accelerate launch
--config_file <trl>/accelerate_configs/zero3.yaml --num_processes 2 --mixed_precision no` (TRL's shipped configs, and
zero2.yaml), so that the trainers get the DeepSpeed plugin accelerate builds from them.

`tests/_deepspeed_worker.py` runs every case (TDPO2 and TBPO-A with a live reference and with the reference cache,
TBPO-Q, TGDPO on the fly and precomputed, LoRA TDPO2) in one launch per ZeRO stage, and the same cases unsharded in
this process (one process, no DeepSpeed), with the same global batch: 2 ranks x 2 pairs against 1 x 4.

Tolerances. The models are float64 objects (DeepSpeed keeps their dtype, see the worker), so the two runs differ only
by rounding (tests/testing_utils.py): the float32 per-token statistics, reduced in another order when the batch is
split across ranks (`EQUIVALENCE_RTOL`, 64 float32 roundoffs), and, under DeepSpeed, the float32 copies ZeRO's
optimizer keeps of the weights and their gradients (by design: its master weights and gradient partitions are
float32), one roundoff each (`safe_get_full_grad` reads the float32 gradient partitions). Measured on this machine:
gradients 5e-8 relative at most, losses within one float32 ulp, the metrics within 2e-7. A missing reduction across the
ranks, a rank that trains on other pairs, a gradient that reached a partitioned weight outside DeepSpeed, or a
gradient-accumulation step scaled twice would move them by O(1).

After several optimizer steps the weights also carry ZeRO's float32 master-weight rounding: at most one roundoff of
the weights per step (and one for the first copy), so `MASTER_WEIGHT_ROUNDING` below bounds the weights' gap and,
through the gradient's norm, the loss's.

The DeepSpeed tier is deselected by default (`-m deepspeed`, or `-m ""` for every tier as CI runs it): its two launches
of two processes take about 1 min 40 s on two cores.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import _deepspeed_worker as worker
import pytest
import torch
from testing_utils import EQUIVALENCE_RTOL, HEAD_RTOL, perturbed_copy, relative_gap


REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_deepspeed_worker.py"


pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed]

STAGES = {"zero3": 3, "zero2": 2}
TRAIN_CASES = {"zero3": worker.TRAIN_CASES, "zero2": ["tdpo2_cached"]}
ROUNDOFF = 2.0**-24
# ZeRO's optimizer holds float32 master weights: the first copy rounds each weight once, and each optimizer step rounds
# the updated weight once more (then copies it back into the float64 model), so after T steps a weight is off its
# float64 value by at most (T + 1) roundoffs of its magnitude
MASTER_WEIGHT_ROUNDING = (worker.TRAIN_STEPS + 1) * ROUNDOFF


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tiny_model_path, default_dataset, assets, tmp_path_factory) -> Namespace:
    """The policy moved away from the reference (ρ_t, the KL and their gradients non-zero), a guidance model that is
    not the reference (token rewards non-zero), 32 pairs on disk, and the recipe's assets for the user's command."""
    import importlib.util

    # The tier needs DeepSpeed: a missing one fails here, it does not skip the tier's coverage away
    assert importlib.util.find_spec("deepspeed") is not None, (
        "DeepSpeed is not installed: pip install -e '.[deepspeed]'"
    )
    root = tmp_path_factory.mktemp("deepspeed")
    default_dataset["train"].select(range(32)).save_to_disk(str(root / "data"))
    return Namespace(
        policy=perturbed_copy(tiny_model_path, root / "policy", seed=1, scale=0.05),
        reference=tiny_model_path,
        guidance=perturbed_copy(tiny_model_path, root / "guidance", seed=2, scale=0.1, lm_head_only=True),
        dataset=str(root / "data"),
        dataset_dir=assets["data"],
        root=root,
    )


def trl_accelerate_config(name: str) -> str:
    import trl

    path = Path(trl.__file__).parent / "accelerate_configs" / f"{name}.yaml"
    assert path.is_file(), f"TRL no longer ships {path.name}"
    return str(path)


@pytest.fixture(scope="module")
def sharded(inputs):
    """`sharded(stage)`: the worker's results on both ranks for `stage` ("zero3" or "zero2"), one launch per stage."""
    results, failures = {}, {}

    def run(stage: str) -> dict:
        if stage in results:
            return results[stage]
        if stage in failures:  # one launch per stage: the tests that share it fail with its message
            pytest.fail(failures[stage], pytrace=False)
        output_dir = inputs.root / stage
        output_dir.mkdir()
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
        assert accelerate is not None, "the `accelerate` launcher is not on PATH (pip install accelerate)"
        command = [accelerate, "launch", "--config_file", trl_accelerate_config(stage), "--num_processes", "2"]
        command += ["--mixed_precision", "no", "--main_process_port", str(free_port()), str(WORKER)]
        command += ["--policy", inputs.policy, "--reference", inputs.reference, "--guidance", inputs.guidance]
        command += ["--dataset", inputs.dataset, "--dataset_dir", inputs.dataset_dir, "--output_dir", str(output_dir)]
        command += ["--step_cases", *worker.CASES, "--train_cases", *TRAIN_CASES[stage]]
        runs_script = stage == "zero3"  # the user's command, once
        if runs_script:
            command.append("--script")
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            TOKENIZERS_PARALLELISM="false",
            DS_ACCELERATOR="cpu",  # DeepSpeed's CPU accelerator, whatever it would detect
        )
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            failures[stage] = f"the {stage} launch failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
            pytest.fail(failures[stage], pytrace=False)
        if runs_script:  # the user's command ran to its end on both ranks
            assert all((output_dir / f"rank{rank}_script.done").exists() for rank in range(2))
        results[stage] = {
            "dir": output_dir,
            "ranks": [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(2)],
        }
        return results[stage]

    return run


@pytest.fixture(scope="module")
def unsharded(inputs, tmp_path_factory):
    """`unsharded(kind, case)`: the worker's `one_step` or `short_train` of `case` in this process, without DeepSpeed."""
    results = {}
    output_dir = tmp_path_factory.mktemp("unsharded")

    def run(kind: str, case: str) -> tuple[dict, dict]:
        if (kind, case) not in results:
            run_case = worker.one_step if kind == "step" else worker.short_train
            results[kind, case] = run_case(case, inputs, output_dir)
        return results[kind, case]

    return run


def sharded_tensors(run: dict, rank: int, kind: str, case: str) -> dict:
    return torch.load(run["dir"] / f"rank{rank}_{kind}_{case}.pt", weights_only=True)


# ------------------------------------------------------------------------------------------------------------------
# One step: loss, gradients and metrics equal the unsharded run's
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", list(worker.CASES))
@pytest.mark.parametrize("stage", list(STAGES))
def test_models_are_wrapped_and_partitioned_as_deepspeed_does(sharded, stage, case, rank):
    """Every model of the run is a DeepSpeed engine. ZeRO-3: policy, reference and guidance model partitioned, each
    rank holding half of every LM head, in the float64 the comparison relies on. ZeRO-2: the policy's weights whole
    (its gradients and optimizer states are what is partitioned), the frozen models under DeepSpeed's stage 0 (TRL's
    `prepare_deepspeed`). LoRA has no reference model (the policy with its adapter disabled is the reference); the cached
    cases keep the reference they were given, as DPOTrainer keeps an explicit `ref_model`, but their steps read the
    cache."""
    report = sharded(stage)["ranks"][rank]["step"][case]
    sharding = report["sharding"]
    expected = {"policy"}
    if case.startswith("tgdpo"):
        expected.add("guidance")
    no_reference = case == "lora"
    if not no_reference:
        expected.add("reference")
    assert set(sharding) == expected
    assert report["ref_model_is_none"] == no_reference
    for name, model in sharding.items():
        assert model["wrapper"] == "DeepSpeedEngine", name
        assert model["dtype"] == "torch.float64", name
        zero_stage = STAGES[stage] if name == "policy" or stage == "zero3" else 0
        assert model["zero_stage"] == zero_stage, name
        partitioned = zero_stage == 3
        local = model["lm_head_local_numel"] * (2 if partitioned else 1)
        assert local == model["lm_head_numel"], name
    assert report["frozen_params_with_grad"] == []


def metric_scale(metrics: dict, key: str) -> float:
    """The magnitude a metric's rounding is relative to: a margin is the difference of its two sides."""
    if key.endswith("/margin") or key.endswith("/margins"):
        prefix = key.rsplit("/", 1)[0]
        return abs(metrics[f"{prefix}/chosen"]) + abs(metrics[f"{prefix}/rejected"])
    if key.startswith("logits/"):
        return 1.0  # a mean over tokens and vocabulary of logits of both signs: rounding scales with the logits (~1)
    return abs(metrics[key])


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", list(worker.CASES))
@pytest.mark.parametrize("stage", list(STAGES))
def test_step_equals_the_unsharded_step(sharded, unsharded, stage, case, rank):
    run = sharded(stage)
    report = run["ranks"][rank]["step"][case]
    grads = sharded_tensors(run, rank, "step", case)["grads"]
    expected_report, expected = unsharded("step", case)
    expected_grads = expected["grads"]

    assert abs(report["loss"] - expected_report["loss"]) <= EQUIVALENCE_RTOL * abs(expected_report["loss"])
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        rtol = HEAD_RTOL if name.startswith("baseline_head.") else EQUIVALENCE_RTOL  # the float32 head
        gap = relative_gap(grads[name], grad)
        assert gap <= rtol, f"{name}: the {stage} gradient differs from the unsharded one by {gap:.2e} (relative)"

    metrics, expected_metrics = report["metrics"], expected_report["metrics"]
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        if key.startswith("padding/"):
            continue  # the batch's layout, not a value of the pairs: each rank pads its own pairs to their own length
        gap = abs(metrics[key] - value)
        assert gap <= EQUIVALENCE_RTOL * metric_scale(expected_metrics, key), f"{key}: {metrics[key]} against {value}"
    if case == "lora":
        # The reference is the base model (the adapter disabled), not the adapted policy: the KL is not zero
        assert expected_metrics["kl/chosen"] > 0.1
    if case.endswith("_cached"):
        assert "kl/cache_tail_mass" in metrics  # the reference cache, not a live reference pass


# ------------------------------------------------------------------------------------------------------------------
# A short training run: optimizer steps with gradient accumulation, checkpoints, a resume, a saved model
# ------------------------------------------------------------------------------------------------------------------


TRAIN_PARAMS = [(stage, case) for stage, cases in TRAIN_CASES.items() for case in cases]


def weight_gap_bound(final: torch.Tensor, initial: torch.Tensor) -> float:
    """How far the DeepSpeed run's weights may be from the unsharded run's after `TRAIN_STEPS` steps: the float32
    master weights' rounding, plus the gradients' own rounding (EQUIVALENCE_RTOL) carried into the update; twice that,
    for the rounding of the intermediate weights' norms."""
    return 2 * (MASTER_WEIGHT_ROUNDING * final.norm().item() + EQUIVALENCE_RTOL * (final - initial).norm().item())


@pytest.mark.parametrize(("stage", "case"), TRAIN_PARAMS)
def test_train_follows_the_unsharded_trajectory(sharded, unsharded, stage, case):
    """`train` for 4 optimizer steps, each accumulating 2 micro-batches (AdamW, clipping at 1.0): the loss and the
    gradient norm of every step, and the final weights, equal the unsharded run's. A gradient-accumulation step scaled
    twice, or not averaged across ranks, would be off by a factor."""
    run = sharded(stage)
    expected_report, expected = unsharded("train", case)
    final, initial = expected["final"], expected["initial"]
    bounds = {name: weight_gap_bound(final[name], initial[name]) for name in final}
    total_bound = sum(bound**2 for bound in bounds.values()) ** 0.5
    for rank in (0, 1):
        report = run["ranks"][rank]["train"][case]
        tensors = sharded_tensors(run, rank, "train", case)
        assert len(report["losses"]) == len(expected_report["losses"]) == worker.TRAIN_STEPS
        assert expected_report["losses"][-1] < expected_report["losses"][0] - 0.01, "the run barely moved"
        for step, (loss, expected_loss, grad_norm) in enumerate(
            zip(report["losses"], expected_report["losses"], expected_report["grad_norms"]), start=1
        ):
            # The loss moves with the weights: by at most the gradient's norm times the weights' gap
            tolerance = EQUIVALENCE_RTOL * abs(expected_loss) + grad_norm * total_bound
            assert abs(loss - expected_loss) <= tolerance, f"step {step}: {loss} against {expected_loss}"
        for sharded_norm, norm in zip(report["grad_norms"], expected_report["grad_norms"]):
            assert abs(sharded_norm - norm) <= EQUIVALENCE_RTOL * norm + total_bound, (sharded_norm, norm)
        assert tensors["final"].keys() == final.keys()
        for name, weight in final.items():
            gap = (tensors["final"][name] - weight).norm().item()
            assert gap <= bounds[name], f"{name}: {gap:.2e} from the unsharded weights (bound {bounds[name]:.2e})"
        if case == "tbpo_q":
            for name, head in expected["baseline_head"].items():
                assert relative_gap(tensors["baseline_head"][name], head) <= HEAD_RTOL, name


@pytest.mark.parametrize(("stage", "case"), TRAIN_PARAMS)
def test_train_saves_a_model_that_reloads_and_resumes_exactly(sharded, stage, case):
    """The saved model (the adapter, for LoRA) reloads with `from_pretrained` holding the trained weights, bit for bit;
    each checkpoint holds DeepSpeed's own state; a new trainer resumed from the first checkpoint ends bit for bit where
    the uninterrupted run ended (DeepSpeed restores the float32 master weights and the optimizer states), the TBPO-Q
    head included."""
    run = sharded(stage)
    for rank in (0, 1):
        report = run["ranks"][rank]["train"][case]
        assert report["reload_mismatches"] == []
        expected_file = "adapter_model.safetensors" if case == "lora" else "model.safetensors"
        assert expected_file in report["saved_files"]
        if case == "tbpo_q":
            assert "baseline_head.safetensors" in report["saved_files"]
            assert report["resume_head_equal"] is True
        assert report["resumed_losses"] == report["losses"]
        gaps = {name: gap for name, gap in report["resume_gaps"].items() if gap != 0.0}
        assert gaps == {}, f"the resumed run ends elsewhere (relative gaps): {gaps}"
    for step in (2, 4):
        checkpoint = run["dir"] / case / "train" / f"checkpoint-{step}"
        assert (checkpoint / f"global_step{step}").is_dir(), sorted(p.name for p in checkpoint.iterdir())


def test_users_command_trains_with_the_reference_cache_under_zero3(sharded, assets):
    """`scripts/run_tdpo.py --config recipes/tdpo/tiny.yaml --precompute_ref_log_probs true` under TRL's zero3.yaml,
    as a user types it: float32 weights partitioned as they load (`zero3_init_flag`), the reference cache precomputed
    on the partitioned reference, 4 steps with checkpoints, and a saved model that reloads with the trained weights."""
    from transformers import AutoModelForCausalLM

    output_dir = sharded("zero3")["dir"] / "script"
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 4 and len(losses) == 4
    assert any("kl/cache_tail_mass" in entry for entry in state["log_history"])
    trained = AutoModelForCausalLM.from_pretrained(str(output_dir))
    initial = AutoModelForCausalLM.from_pretrained(assets["model"])
    assert trained.state_dict().keys() == initial.state_dict().keys()
    assert any(not torch.equal(param, initial.state_dict()[name]) for name, param in trained.state_dict().items())


# ------------------------------------------------------------------------------------------------------------------
# bf16: DeepSpeed's precision and the training arguments' must agree (checked at init, not when `train` starts)
# ------------------------------------------------------------------------------------------------------------------


def test_deepspeed_bf16_against_float32_arguments_is_refused_at_init(make_trainer, monkeypatch, tmp_path):
    """What `accelerate launch --config_file zero3.yaml` (its `mixed_precision: bf16`) exports, with a recipe that
    trains in float32 (`bf16: false`, the tiny recipes): refused before the models load, naming both fixes; without the
    check, transformers stops at `train`, after the loading and the reference cache's precompute."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from trl_tokenpref import TDPOConfig, TDPOTrainer, launch_checks

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    try:
        with pytest.raises(ValueError) as error:
            make_trainer(TDPOTrainer, tmp_path)
        message = str(error.value)
        assert "DeepSpeed's config has `bf16.enabled=True`" in message
        assert "the training arguments have `bf16=False`" in message
        assert "--mixed_precision no" in message and "`bf16: true`" in message
        # Agreeing values pass: bf16 in both, or float32 in both (`--mixed_precision no`)
        launch_checks.check_deepspeed_precision(TDPOConfig(str(tmp_path), bf16=True, use_cpu=True, report_to="none"))
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        launch_checks.check_deepspeed_precision(TDPOConfig(str(tmp_path), bf16=False, use_cpu=True, report_to="none"))
    finally:
        # TrainingArguments registered its DeepSpeed config globally (ZeRO-3 loading reads it): drop it
        unset_hf_deepspeed_config()
