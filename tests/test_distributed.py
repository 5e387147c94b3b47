"""Two CPU processes (gloo) against one, with the same global batch: TDPO must not notice the difference.

`accelerate launch --multi_gpu --num_processes 2` runs two processes on CPU through torch.distributed with gloo.
(`accelerate launch --cpu --num_processes 2` would silently start ONE process: FEASIBILITY.md Q3.) With 2 pairs per
process against 4 pairs in one process, the same seed and the same data order, DDP's averaged gradient equals the
single process's, so the whole loss trajectory must match. The logged `kl/*` metrics must also equal the single
process's: each process only sees half of the pairs, so a value that was not gathered over both processes would be
the mean over rank 0's pairs alone and differ.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


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


@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the `accelerate` launcher is not installed")
    run([sys.executable, "-m", "trl_tokenpref.tiny", str(tmp_path / "model")])
    run([sys.executable, "-m", "trl_tokenpref.data", str(tmp_path / "data")])

    # A high learning rate so that the trajectory moves well away from its start within a few steps; the final
    # checkpoint's trainer_state.json holds the logged values at full precision
    common = ["scripts/run_tdpo.py", "--config", "recipes/tdpo/tiny.yaml"]
    common += ["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "data")]
    common += ["--max_steps", str(MAX_STEPS), "--logging_steps", "1", "--learning_rate", "1e-2", "--seed", "0"]
    common += ["--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", str(MAX_STEPS)]

    run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", *common, "--per_device_train_batch_size", "2",
         "--output_dir", str(tmp_path / "two")])  # fmt: skip
    run([sys.executable, *common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])

    two, one = logged_steps(tmp_path / "two"), logged_steps(tmp_path / "one")
    assert [entry["step"] for entry in two] == [entry["step"] for entry in one] == list(range(1, MAX_STEPS + 1))
    assert one[-1]["loss"] < one[0]["loss"] - 0.05, "the trajectory barely moved: the comparison would prove little"
    # float32 reductions over differently padded micro-batches differ by ~1e-6 in absolute terms; `abs` covers the
    # differences (kl/margin) whose relative error that inflates
    for key in ["loss", "kl/chosen", "kl/rejected", "kl/margin", "rewards/margins", "logps/chosen"]:
        assert [entry[key] for entry in two] == pytest.approx([entry[key] for entry in one], rel=1e-4, abs=1e-5), key
