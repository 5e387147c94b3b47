"""Two CPU processes (gloo) against one, with the same global batch: the trainers must not notice the difference.

`accelerate launch --multi_gpu --num_processes 2` runs two processes on CPU through torch.distributed with gloo.
(`accelerate launch --cpu --num_processes 2` would silently start ONE process: FEASIBILITY.md Q3.) With 2 pairs per
process against 4 pairs in one process, the same seed and the same data order, DDP's averaged gradient equals the
single process's, so the whole loss trajectory and the final parameters must match. The logged `kl/*` metrics must
also equal the single process's: each process only sees half of the pairs, so a value that was not gathered over both
processes would be the mean over rank 0's pairs alone and differ. TDPO runs in the default suite; TBPO-Q, whose
baseline head lives outside DDP and has its gradients averaged by the trainer, is `slow`.

The model is float64 (a float64 copy of the tiny model, loaded with `--dtype auto`), so that the tolerances follow from
rounding (`testing_utils.EQUIVALENCE_RTOL`): the two runs differ by the order of their float32 per-token statistics'
reductions only. A missing all-reduce or a rank that trains on other pairs moves the results by O(1).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import EQUIVALENCE_RTOL, HEAD_RTOL, relative_gap, saved_in_float64


REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 6


def run(command: list[str]) -> None:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"


def logged_steps(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def one_and_two_processes(
    method: str, tmp_path: Path, extra_args: list[str], two_process_args: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """Train `method` from its tiny recipe for MAX_STEPS steps with 2 processes × 2 pairs and 1 process × 4 pairs
    (`two_process_args` for the two processes only); return the two output directories (each with its final
    checkpoint)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    # accelerate is a dependency of the package: a missing launcher is a broken install, not a reason to skip
    assert accelerate is not None, "the `accelerate` launcher is not on PATH (pip install accelerate)"
    run([sys.executable, "-m", "trl_tokenpref.tiny", str(tmp_path / "tiny-model")])
    run([sys.executable, "-m", "trl_tokenpref.data", str(tmp_path / "data")])
    saved_in_float64(str(tmp_path / "tiny-model"), tmp_path / "model")

    # A high learning rate so that the trajectory moves well away from its start within a few steps; the final
    # checkpoint's trainer_state.json holds the logged values at full precision
    common = [f"scripts/run_{method}.py", "--config", f"recipes/{method}/tiny.yaml"]
    common += [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--dtype",
        "auto",
        "--dataset_name",
        str(tmp_path / "data"),
    ]
    common += ["--max_steps", str(MAX_STEPS), "--logging_steps", "1", "--learning_rate", "1e-2", "--seed", "0"]
    common += ["--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", str(MAX_STEPS), *extra_args]

    run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", *common, *two_process_args, "--per_device_train_batch_size", "2",
         "--output_dir", str(tmp_path / "two")])  # fmt: skip
    run([sys.executable, *common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    return tmp_path / "one", tmp_path / "two"


def assert_same_trajectory(one: Path, two: Path, keys: dict[str, float]) -> None:
    """The logged values of both runs agree at every step, each within its relative tolerance in `keys`; a
    difference such as `kl/margin` is compared relative to the magnitudes it is the difference of."""
    one_steps, two_steps = logged_steps(one), logged_steps(two)
    assert [e["step"] for e in two_steps] == [e["step"] for e in one_steps] == list(range(1, MAX_STEPS + 1))
    assert one_steps[-1]["loss"] < one_steps[0]["loss"] - 0.05, "the trajectory barely moved: it would prove little"
    for key, rtol in keys.items():
        for one_step, two_step in zip(one_steps, two_steps):
            scale = abs(one_step[key])
            if key == "kl/margin":
                scale = one_step["kl/chosen"] + one_step["kl/rejected"]
            gap = abs(two_step[key] - one_step[key])
            assert gap <= rtol * scale, f"{key} at step {one_step['step']}: {two_step[key]} against {one_step[key]}"


def assert_same_weights(one: Path, two: Path, file_name: str, rtol: float, initial: Path | None = None) -> None:
    """The final weights of both runs agree, relative to how far training moved them from `initial` (or, without
    it, relative to the weights themselves)."""
    one_weights = load_file(str(one / f"checkpoint-{MAX_STEPS}" / file_name))
    two_weights = load_file(str(two / f"checkpoint-{MAX_STEPS}" / file_name))
    initial_weights = load_file(str(initial)) if initial is not None else None
    assert one_weights.keys() == two_weights.keys()
    for name, weight in one_weights.items():
        reference = torch.zeros_like(weight) if initial_weights is None else initial_weights[name]
        # Both updates against each other: `relative_gap` refuses an update of zero (it would prove nothing)
        gap = relative_gap(two_weights[name] - reference, weight - reference)
        assert gap <= rtol, f"{name}: the two-process weights differ by {gap:.2e} (relative)"


@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one, two = one_and_two_processes("tdpo", tmp_path, [])
    keys = ["loss", "kl/chosen", "kl/rejected", "kl/margin", "rewards/margins", "logps/chosen"]
    assert_same_trajectory(one, two, dict.fromkeys(keys, EQUIVALENCE_RTOL))
    initial = tmp_path / "model" / "model.safetensors"
    assert_same_weights(one, two, "model.safetensors", EQUIVALENCE_RTOL, initial=initial)


@pytest.mark.distributed
def test_two_packed_processes_match_one_padded_process(tmp_path):
    """`padding_free=True` under DDP: two processes × 2 packed pairs follow one process × 4 padded pairs."""
    one, two = one_and_two_processes("tdpo", tmp_path, [], ("--padding_free",))
    keys = ["loss", "kl/chosen", "kl/rejected", "kl/margin", "rewards/margins", "logps/chosen"]
    assert_same_trajectory(one, two, dict.fromkeys(keys, EQUIVALENCE_RTOL))
    initial = tmp_path / "model" / "model.safetensors"
    assert_same_weights(one, two, "model.safetensors", EQUIVALENCE_RTOL, initial=initial)
    # The padding each process's packed batches did not compute (of its own padded layout: not comparable with the
    # one process's, whose rows are padded to the longest of 8 sequences)
    assert all(0 < step["padding/fraction"] < 1 for step in logged_steps(two))


@pytest.mark.slow
@pytest.mark.distributed
def test_tbpo_q_two_processes_match_one_process(tmp_path):
    """TBPO-Q: the policy (under DDP) and the baseline head (outside DDP, its gradients all-reduced by the trainer
    before its own AdamW step) both end where the single process ends."""
    one, two = one_and_two_processes("tbpo", tmp_path, ["--variant", "tbpo_q"])
    keys = {"loss": EQUIVALENCE_RTOL, "log_R/mean": EQUIVALENCE_RTOL}
    keys.update({"baseline/log_w_abs_mean": HEAD_RTOL, "baseline/grad_norm": HEAD_RTOL})  # the float32 head
    assert_same_trajectory(one, two, keys)
    initial = tmp_path / "model" / "model.safetensors"
    assert_same_weights(one, two, "model.safetensors", EQUIVALENCE_RTOL, initial=initial)
    assert_same_weights(one, two, "baseline_head.safetensors", HEAD_RTOL)
