"""Nothing silently wrong on disk (`trl_tokenpref/checkpoints.py`, `trl_tokenpref/files.py`), each on the fault a user
met:

* **resume** checks what it reads: weights garbled into NaN, truncated or garbled optimizer / scheduler / RNG / trainer
  state files are refused naming the file (with and without the manifest that every checkpoint now holds);
  `trainer.train(resume_from_checkpoint=True)` and the scripts' `last` resume from the newest checkpoint that passes;
  a resume with other data settings (`max_length`) is warned about;
* **a non-finite loss or gradient norm** stops the run at its step, before it is logged or saved, naming the last
  checkpoint (TRL's logs showed the NaN loss as 0.0, and every later checkpoint held NaN weights);
* **one run per `output_dir`**: a second run is refused at once, naming the first; a run that died does not block;
  the processes of one distributed run share one lock;
* **a failed save** (a write that the filesystem refuses) names the folder, the file and the free space;
* **token rewards** carry their β in every row (checked through `load_dataset("json")` + the Python API), are written
  whole or not at all, and a folder whose data and info file disagree is refused naming the file;
* **the reference cache** is range-checked when read; a cache file that is out of range or truncated is named and
  computed again; the temporary files of a killed precompute are removed.
"""

import functools
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from datasets import Dataset, load_dataset, load_from_disk
from safetensors.torch import load_file
from testing_utils import asset_args, fast_args, logged_steps
from transformers import AutoModelForCausalLM, TrainerCallback

from trl_tokenpref import TDPOConfig, TDPOTrainer, TGDPOConfig, TGDPOTrainer
from trl_tokenpref.checkpoints import (
    LOCK_NAME,
    MANIFEST_NAME,
    OutputDirInUseError,
    TrainingGuardMixin,
    acquire_output_dir,
    failed_save_error,
    release_output_dir,
    resolve_checkpoint,
    verify_checkpoint,
)
from trl_tokenpref.files import file_fingerprint, temporary_path
from trl_tokenpref.precompute import REF_CACHE_COLUMNS, reference_cache_problem


REPO_ROOT = Path(__file__).resolve().parent.parent
SAVE_STEPS, MAX_STEPS = 2, 4


def load_script(method: str):
    spec = importlib.util.spec_from_file_location(f"run_{method}", REPO_ROOT / "scripts" / f"run_{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tdpo_trainer(model, tokenizer, dataset, output_dir, **config):
    settings = dict(per_device_train_batch_size=4, max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS)
    args = fast_args(output_dir, TDPOConfig, **{**settings, **config})
    return TDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.fixture(scope="module")
def saved_run(tiny_model_path, tiny_tokenizer, train_subset, tmp_path_factory) -> Path:
    """A TDPO run of 4 steps with checkpoints at steps 2 and 4; tests copy it before damaging it."""
    output_dir = tmp_path_factory.mktemp("saved-run")
    tdpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, output_dir).train()
    return output_dir


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def garble_tensor(path: Path, values: int = 3) -> str:
    """Write NaN over `values` float32 values of the first tensor of a `.safetensors` file, in place (the file keeps
    its size: what a bad copy or a disk error leaves). Returns the tensor's name."""
    raw = bytearray(path.read_bytes())
    header_size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_size])
    name = next(key for key in sorted(header) if key != "__metadata__" and header[key]["dtype"] == "F32")
    start = 8 + header_size + header[name]["data_offsets"][0]
    for k in range(values):
        raw[start + 4 * k * 7 : start + 4 * k * 7 + 4] = struct.pack("<f", math.nan)
    path.write_bytes(bytes(raw))
    return name


# ------------------------------------------------------------------------------------------------------------------
# 1. Resume checks what it reads
# ------------------------------------------------------------------------------------------------------------------


def test_every_checkpoint_holds_a_manifest_of_what_was_saved(saved_run, train_subset):
    for step in (SAVE_STEPS, MAX_STEPS):
        checkpoint = saved_run / f"checkpoint-{step}"
        manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
        on_disk = sorted(path.name for path in checkpoint.iterdir() if path.name != MANIFEST_NAME)
        assert sorted(manifest["files"]) == on_disk  # written last: trainer_state.json is in it
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(manifest["files"])
        for name, entry in manifest["files"].items():
            assert entry == file_fingerprint(checkpoint / name), name
        assert manifest["run"]["max_length"] == 1024 and manifest["run"]["train_rows"] == len(train_subset)
        assert verify_checkpoint(str(checkpoint)).complete


def test_weights_garbled_into_nan_are_refused_and_true_resumes_from_the_newest_good_checkpoint(
    run_copy, tiny_model_path, tiny_tokenizer, train_subset, caplog
):
    """Before: `resume_from_checkpoint=True` picked checkpoint-4, every weight was NaN after one step, the loss was
    logged as 0.0 and the final model was saved with NaN weights, with exit code 0."""
    weights = run_copy / f"checkpoint-{MAX_STEPS}" / "model.safetensors"
    tensor = garble_tensor(weights)

    trainer = tdpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, run_copy, max_steps=6)
    with pytest.raises(ValueError, match="Cannot resume from the checkpoint") as refused:
        trainer.train(resume_from_checkpoint=str(weights.parent))
    assert f"{weights} does not hold the bytes that were written" in str(refused.value)
    assert f"{weights} holds non-finite weights: NaN or inf in {tensor} (3)" in str(refused.value)

    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    skipped = [record.getMessage() for record in caplog.records if "Skipping the checkpoint" in record.getMessage()]
    assert len(skipped) == 1 and str(weights) in skipped[0] and "non-finite weights" in skipped[0]
    assert f"Resuming from {run_copy / f'checkpoint-{SAVE_STEPS}'}" in skipped[0]
    assert [log["step"] for log in logged_steps(trainer)] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(log["loss"]) and log["loss"] != 0.0 for log in logged_steps(trainer))
    assert all(torch.isfinite(parameter).all() for parameter in trainer.model.parameters())

    # A checkpoint saved by another trainer (no manifest): its non-finite weights are still refused
    (run_copy / "checkpoint-6" / MANIFEST_NAME).unlink()
    garble_tensor(run_copy / "checkpoint-6" / "model.safetensors")
    assert verify_checkpoint(str(run_copy / "checkpoint-6")).problems == [
        f"{run_copy / 'checkpoint-6' / 'model.safetensors'} holds non-finite weights: NaN or inf in {tensor} (3)"
    ]


def rewrite(path: Path, content: bytes) -> None:
    """Replace the file's content (a new file renamed over it: a process that memory-maps the old one is unaffected)."""
    path.with_name(path.name + ".new").write_bytes(content)
    os.replace(path.with_name(path.name + ".new"), path)


def truncate(path: Path) -> None:
    rewrite(path, path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    """Garble 16 bytes in the middle of the file, keeping its size."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(255 - byte for byte in raw[middle : middle + 16])
    rewrite(path, bytes(raw))


def garble_step(path: Path) -> None:
    path.write_text(path.read_text().replace(f'"global_step": {MAX_STEPS}', f'"global_step": "{MAX_STEPS}x"'))


def garble_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(raw))


# (file, damage, what verification says with the manifest, without it: a checkpoint of another trainer)
DAMAGE = {
    "optimizer-truncated": ("optimizer.pt", truncate, "bytes where", "is not a complete torch archive"),
    "optimizer-garbled": ("optimizer.pt", flip_bytes, "does not hold the bytes", "does not match its CRC-32"),
    "scheduler-truncated": ("scheduler.pt", truncate, "bytes where", "is not a complete torch archive"),
    "rng-garbled": ("rng_state.pth", flip_bytes, "does not hold the bytes", "does not match its CRC-32"),
    "trainer-state-garbled": ("trainer_state.json", garble_step, "bytes where", "`global_step` is '4x'"),
    "weights-header-garbled": ("model.safetensors", garble_header, "does not hold the bytes", "is unreadable"),
}


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_named_and_last_falls_back(damage, with_manifest, run_copy, caplog):
    """Before: "invalid header length", a bare `EOFError`, a `TypeError`, torch advising `weights_only=False` for the
    RNG file, or (garbled optimizer values) nothing at all: `torch.load` reads garbled bytes as wrong values."""
    name, damage_file, with_manifest_says, without_manifest_says = DAMAGE[damage]
    checkpoint = run_copy / f"checkpoint-{MAX_STEPS}"
    if not with_manifest:
        for folder in run_copy.glob("checkpoint-*"):
            (folder / MANIFEST_NAME).unlink()
    damage_file(checkpoint / name)
    problems = " ".join(verify_checkpoint(str(checkpoint)).problems)
    assert str(checkpoint / name) in problems
    assert (with_manifest_says if with_manifest else without_manifest_says) in problems
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(True, str(run_copy)) == str(run_copy / f"checkpoint-{SAVE_STEPS}")
    assert str(checkpoint / name) in caplog.text


def test_a_load_that_fails_names_the_checkpoint(run_copy, tiny_model_path, tiny_tokenizer, train_subset):
    """An intact file that this trainer cannot load (here: another model's optimizer state) passes the checks; the
    error of the load then names the checkpoint and the files (torch's names neither)."""
    checkpoint = run_copy / f"checkpoint-{MAX_STEPS}"
    (checkpoint / MANIFEST_NAME).unlink()
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    torch.save(other.state_dict(), checkpoint / "optimizer.pt")
    trainer = tdpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, run_copy, max_steps=6)
    with pytest.raises(RuntimeError, match=rf"Resuming from {checkpoint} failed while loading the optimizer and "):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_resuming_with_other_data_settings_is_warned(run_copy, tiny_model_path, tiny_tokenizer, train_subset, caplog):
    """Before: a resume with another `max_length` continued without a word while rows were now dropped."""
    trainer = tdpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, run_copy, max_steps=5, max_length=16)
    kept = len(trainer.train_dataset)
    assert kept < len(train_subset)  # the rows whose prompt fills 16 tokens are dropped
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint="last")  # as TRL's dpo.py passes `--resume_from_checkpoint last`
    assert f"which a run with other data settings saved: max_length 1024 → 16, train_rows 32 → {kept}." in caplog.text
    assert "does not continue the saved run exactly" in caplog.text

    caplog.clear()
    same = tdpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, run_copy, max_steps=6)
    with caplog.at_level(logging.WARNING):
        same.train(resume_from_checkpoint=str(run_copy / f"checkpoint-{MAX_STEPS}"))
    assert "other data settings" not in caplog.text


# ------------------------------------------------------------------------------------------------------------------
# 2. A non-finite step stops the run
# ------------------------------------------------------------------------------------------------------------------


class NaNWeightAtStep(TrainerCallback):
    """Writes NaN into one weight at the beginning of step `step` (as a diverging update would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            with torch.no_grad():
                model.get_output_embeddings().weight[0, 0] = math.nan


def test_a_non_finite_loss_stops_the_run_before_it_is_logged_or_saved(
    tiny_model_path, tiny_tokenizer, train_subset, tmp_path
):
    """Before: the run went on to the end with exit code 0, `loss` logged as 0.0 (TRL's logging filter), and every
    later checkpoint and the final model held NaN weights."""
    trainer = tdpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, tmp_path, max_steps=6, save_steps=1)
    trainer.add_callback(NaNWeightAtStep(3))
    with pytest.raises(RuntimeError) as stopped:
        trainer.train()
    message = str(stopped.value)
    assert message.startswith("Training stopped at step 3 (epoch ")
    assert "the loss is nan" in message and "Likely causes: a learning rate too high" in message
    assert f"The last checkpoint saved before it is {tmp_path / 'checkpoint-2'}" in message
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    losses = [log["loss"] for log in logged_steps(trainer)]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss != 0.0 for loss in losses)
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())


def test_a_non_finite_gradient_norm_stops_the_run(tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.get_input_embeddings().weight.register_hook(lambda grad: grad * math.inf)
    trainer = tdpo_trainer(model, tiny_tokenizer, train_subset, tmp_path, max_steps=3)
    with pytest.raises(RuntimeError, match=r"Training stopped at step 1 .*: the gradient norm is (nan|inf) \(the loss "
                       r"is finite\), and the update made [\d,]+ weights non-finite.* No checkpoint was saved "
                       r"before it\."):  # fmt: skip
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))


class NaNWeightAfterStep(TrainerCallback):
    """Writes NaN into one weight at the end of step `step`, after its update and before it is saved: an update that
    overflowed although the step's loss and gradient norm were finite."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_output_embeddings().weight[0, 0] = math.nan


@pytest.mark.parametrize(
    ("max_steps", "save_steps", "max_grad_norm", "saved"),
    [(4, 2, 1.0, "a checkpoint"), (2, 10, 1.0, "the final model"), (4, 2, 0.0, "a checkpoint, without a norm")],
)
def test_weights_an_update_made_non_finite_are_never_saved(
    tiny_model_path, tiny_tokenizer, train_subset, tmp_path, max_steps, save_steps, max_grad_norm, saved
):
    """Before: step 2's loss and gradient norm were finite, so its checkpoint (or, at the last step, the final model)
    was saved with the NaN weight; the next step's NaN loss then named that checkpoint as the one to resume from."""
    trainer = tdpo_trainer(
        tiny_model_path, tiny_tokenizer, train_subset, tmp_path, max_steps=max_steps, save_steps=save_steps,
        max_grad_norm=max_grad_norm,
    )  # fmt: skip
    trainer.add_callback(NaNWeightAfterStep(2))
    with pytest.raises(RuntimeError, match=r"Training stopped at step 2 .*: the update made 1 weights non-finite "
                       r"\(the loss (and the gradient norm were|was) finite\)\..* No checkpoint was saved before it\."):  # fmt: skip
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))


def test_non_finite_weights_are_counted_in_blocks_without_a_float32_copy_of_a_tensor():
    """Off CUDA a float32 sum casts its whole input first: over a bf16 LM head of Llama-3-8B's size that was a 2 GB
    transient at every check (measured, docs/memory_and_scaling.md). Blocks of 2**21 elements, and the exact count."""
    from trl_tokenpref import checkpoints

    weight = torch.zeros(5 * 2**20, dtype=torch.bfloat16)
    weight[[3, 2**21 + 1, 2**21 + 2]] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.bfloat16)
    summed = []
    original_sum = torch.Tensor.sum

    def recording_sum(tensor, *args, **kwargs):
        summed.append(tensor.numel())
        return original_sum(tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "sum", recording_sum)
        count = checkpoints._count_non_finite(weight.view(5, 2**20))
    assert count == 3
    # a float32 sum per block (the last one partial), then an exact count in the two blocks that hold NaN/inf
    assert summed == [2**21, 2**21, 2**21, 2**21, 2**20]
    # large finite float16 values: summed in float16 they would overflow to inf and be counted
    assert checkpoints._count_non_finite(torch.full((7,), 6e4, dtype=torch.float16)) == 0


def test_an_overflow_that_the_fp16_scaler_skipped_is_not_an_error(caplog):
    """fp16 mixed precision: an overflowing gradient is how the loss scaler (torch's or DeepSpeed's) learns to lower
    its scale; the step is skipped, the weights are untouched. A non-finite loss is still an error (a forward overflow
    does not go away with a lower scale)."""
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), reduce=lambda tensor, reduction: tensor, optimizer_step_was_skipped=True
    )
    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(
        accelerator=accelerator,
        state=SimpleNamespace(global_step=7, epoch=0.5, max_steps=100),
        control=SimpleNamespace(should_save=False, should_training_stop=False),
        _last_good_checkpoint=None,
        model=model,
    )
    for method in ("_count_non_finite_weights", "_is_last_step"):
        setattr(trainer, method, functools.partial(getattr(TrainingGuardMixin, method), trainer))
    trainer._step_losses = [torch.tensor([0.69])]
    TrainingGuardMixin._check_step_is_finite(trainer, math.inf)  # skipped by the scaler: no error
    accelerator.optimizer_step_was_skipped = False
    # Not skipped, but the weights are finite after the update: a norm that overflowed in a 16-bit dtype while every
    # gradient was finite (clipping by max_norm / inf zeroes the step). DPOTrainer trains on (TRL's own
    # `test_train_model_dtype`, float16 weights at lr 0.1, hits it), so do we
    trainer._step_losses = [torch.tensor([0.69])]
    with caplog.at_level(logging.WARNING):
        TrainingGuardMixin._check_step_is_finite(trainer, math.inf)
    assert "Step 7: the gradient norm is inf, but the loss and every weight are finite after the update" in caplog.text
    assert "Training goes on; if it recurs, lower the learning rate or train in bfloat16/float32." in caplog.text
    with torch.no_grad():
        model.weight[0, 1] = math.nan
    trainer._step_losses = [torch.tensor([0.69])]
    with pytest.raises(RuntimeError, match="step 7 .*the gradient norm is inf .*made 1 weights non-finite"):
        TrainingGuardMixin._check_step_is_finite(trainer, math.inf)
    accelerator.optimizer_step_was_skipped = True
    trainer._step_losses = [torch.tensor([math.nan])]
    with pytest.raises(RuntimeError, match="the loss is nan"):
        TrainingGuardMixin._check_step_is_finite(trainer, math.inf)


# ------------------------------------------------------------------------------------------------------------------
# 3. One run per output_dir
# ------------------------------------------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from trl_tokenpref.checkpoints import acquire_output_dir
    acquire_output_dir(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def other_run(tmp_path):
    """`start(output_dir)`: another process that holds `output_dir` (as another run does), killed at the end."""
    processes = []

    def start(output_dir: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(output_dir)], stdout=subprocess.PIPE, text=True, env=env
        )
        processes.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_run_into_the_same_output_dir_is_refused_at_once(
    other_run, assets, tiny_model_path, tiny_tokenizer, train_subset, tmp_path
):
    """Before: two runs started into one `output_dir` both ended with "Model saved", and what was left on disk was one
    run's, the other's work gone without a word."""
    from trl_tokenpref.cli import check_before_loading, parse_args_and_config

    output_dir = tmp_path / "run"
    holder = other_run(output_dir)
    with pytest.raises(OutputDirInUseError) as refused:
        acquire_output_dir(str(output_dir))
    message = str(refused.value)
    assert (
        f"{output_dir} is in use by another run: host {socket.gethostname()}, process {holder.pid}, started "
        in message
    )
    assert "Wait for that run to end or stop it, or pass another `--output_dir`" in message

    # The scripts: refused before anything is loaded
    parsed = parse_args_and_config(
        load_script("tdpo").make_parser(),
        ["--config", str(REPO_ROOT / "recipes" / "tdpo" / "tiny.yaml"), *asset_args("tdpo", assets),
         "--output_dir", str(output_dir)],
    )  # fmt: skip
    with pytest.raises(OutputDirInUseError, match=f"process {holder.pid}"):
        check_before_loading(*parsed)
    # A user's own script: `train` is refused, the folder is left as it is
    trainer = tdpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, output_dir)
    with pytest.raises(OutputDirInUseError, match=f"process {holder.pid}"):
        trainer.train()
    assert sorted(path.name for path in output_dir.iterdir()) == [LOCK_NAME]

    # The run dies without a word (kill -9): its lock goes with it, the next run takes the folder at once
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert acquire_output_dir(str(output_dir))
    assert json.loads((output_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert acquire_output_dir(str(output_dir))  # re-entrant within a process (the scripts, then `train`)
    release_output_dir(str(output_dir))
    assert (output_dir / LOCK_NAME).exists()
    release_output_dir(str(output_dir))
    assert not (output_dir / LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_processes_of_one_run_share_one_lock(other_run, assets, tmp_path):
    """Two processes of one run (`accelerate launch --multi_gpu --num_processes 2`, gloo on CPU): the main process
    holds the lock for both, the manifest lists both processes' RNG states. Into a folder another run holds, both
    processes stop at once with the same error (none waits forever for the other)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate is not None, "the `accelerate` launcher is not on PATH (pip install accelerate)"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def launch(output_dir: Path) -> subprocess.CompletedProcess:
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/run_tdpo.py", "--config",
                   "recipes/tdpo/tiny.yaml", *asset_args("tdpo", assets), "--output_dir", str(output_dir),
                   "--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_strategy", "no",
                   "--save_steps", "2"]  # fmt: skip
        return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)

    result = launch(tmp_path / "run")
    assert result.returncode == 0, result.stderr[-6000:]
    manifest = json.loads((tmp_path / "run" / "checkpoint-2" / MANIFEST_NAME).read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"]) and manifest["run"]["world_size"] == 2
    assert not (tmp_path / "run" / LOCK_NAME).exists()

    holder = other_run(tmp_path / "held")
    result = launch(tmp_path / "held")
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: trl_tokenpref.checkpoints.OutputDirInUseError" in result.stderr, result.stderr[-6000:]
    assert f"process {holder.pid}" in result.stderr
    assert sorted(path.name for path in (tmp_path / "held").iterdir()) == [LOCK_NAME]


# ------------------------------------------------------------------------------------------------------------------
# 4. A failed save says why
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="a file-size limit needs POSIX (resource, SIGXFSZ)")
def test_a_failed_write_names_the_checkpoint_the_file_and_the_free_space(
    tiny_model_path, tiny_tokenizer, train_subset, tmp_path
):
    """Before: torch's "basic_ios::clear: iostream error … unexpected pos", naming neither the disk nor the folder.
    Writes beyond 1 MB fail here (EFBIG, under a file-size limit), as writes to a full disk fail (ENOSPC): the weights
    (0.8 MB) fit, the optimizer state (1.6 MB) does not."""
    import resource

    trainer = tdpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, tmp_path, max_steps=1, save_steps=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        with pytest.raises(OSError) as failed:
            trainer.train()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    message = str(failed.value)
    checkpoint = tmp_path / "checkpoint-1"
    assert f"Saving the checkpoint {checkpoint} failed while writing optimizer.pt: RuntimeError: " in message
    assert "unexpected pos" in message and "GiB free (a quota or a file-size limit?)" in message
    assert "the incomplete folder is skipped by `--resume_from_checkpoint last`" in message
    assert verify_checkpoint(str(checkpoint)).incomplete


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint-8"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"x")
    (checkpoint / "optimizer.pt").write_bytes(b"x")
    os.utime(checkpoint / "model.safetensors", ns=(0, 0))  # the older file: optimizer.pt was being written
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    error = failed_save_error(str(checkpoint), RuntimeError("basic_ios::clear: iostream error"))
    assert isinstance(error, OSError)
    assert f"Saving the checkpoint {checkpoint} failed while writing optimizer.pt: RuntimeError: basic_ios" in str(
        error
    )
    assert "has 1.0 MiB free: the disk is full" in str(error)


# ------------------------------------------------------------------------------------------------------------------
# 5. Token rewards: β in every row, written whole, checked against their info file
# ------------------------------------------------------------------------------------------------------------------


def compute_rewards(script, model, guidance, data: Path, output: Path, beta: float, output_format="jsonl"):
    script.main(["--guidance_model", guidance, "--ref_model", model, "--dataset_path", str(data), "--output_dir",
                 str(output), "--beta", str(beta), "--max_length", "0", "--output_format", output_format])  # fmt: skip


@pytest.fixture(scope="module")
def rewards(token_rewards_script, default_dataset, tiny_model_path, guidance_path, tmp_path_factory) -> dict:
    """Token rewards of 8 pairs at β = 0.1 and 0.5, as JSON Lines and with `save_to_disk`."""
    root = tmp_path_factory.mktemp("rewards")
    default_dataset["train"].select(range(8)).save_to_disk(str(root / "input"))
    outputs = {}
    for beta in (0.1, 0.5):
        for output_format in ("jsonl", "disk"):
            output = root / f"{output_format}-{beta}"
            compute_rewards(token_rewards_script, tiny_model_path, guidance_path, root / "input", output, beta,
                            output_format)  # fmt: skip
            outputs[output_format, beta] = output
    return outputs


def tgdpo(tiny_model_path, tiny_tokenizer, dataset, output_dir, beta, **config):
    return TGDPOTrainer(
        model=tiny_model_path,
        args=fast_args(output_dir, TGDPOConfig, beta=beta, **config),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )


def test_beta_travels_with_the_rows(rewards, tiny_model_path, tiny_tokenizer, tmp_path):
    """Before: JSON Lines loaded with `load_dataset("json", ...)` and trained with `TGDPOConfig(beta=0.3)` trained
    silently on rewards computed at β = 0.1 (the trainer only found the info file of `load_from_disk` datasets)."""
    dataset = load_dataset("json", data_files=str(rewards["jsonl", 0.1] / "train.jsonl"), split="train")
    assert set(dataset["token_rewards_beta"]) == {0.1}
    with pytest.raises(ValueError, match=r"computed at beta=0.1 \(the `token_rewards_beta` column\), but training uses "
                       r"beta=0.3.*--beta 0.3"):  # fmt: skip
        tgdpo(tiny_model_path, tiny_tokenizer, dataset, tmp_path / "a", 0.3)
    # The same β trains, the column kept or not by `remove_unused_columns`
    for remove_unused_columns in (True, False):
        trainer = tgdpo(tiny_model_path, tiny_tokenizer, dataset, tmp_path / f"b{remove_unused_columns}", 0.1,
                        max_steps=1, remove_unused_columns=remove_unused_columns)  # fmt: skip
        trainer.train()
        assert math.isfinite(logged_steps(trainer)[0]["loss"])


def test_data_and_info_that_disagree_are_refused_naming_the_file(rewards, tiny_model_path, tiny_tokenizer, tmp_path):
    """Before: a run of `compute_token_rewards.py` killed while it rewrote `train.jsonl` left new rows next to the old
    info file, and `run_tgdpo.py` trained on them without a word."""
    from trl_tokenpref.tgdpo.token_rewards import check_token_rewards_beta

    folder = tmp_path / "jsonl"
    shutil.copytree(rewards["jsonl", 0.1], folder)
    check_token_rewards_beta(str(folder), 0.1, "train")  # as written: accepted
    # The data of another run (β = 0.5) beside this info file (β = 0.1): what a stop between the two leaves
    shutil.copy(rewards["jsonl", 0.5] / "train.jsonl", folder / "train.jsonl")
    with pytest.raises(ValueError, match="do not match their info file") as refused:
        check_token_rewards_beta(str(folder), 0.1, "train")
    assert re.search(rf"{folder / 'train.jsonl'} (does not hold the bytes|has \S+ bytes where)", str(refused.value))
    assert "Run `scripts/compute_token_rewards.py` again" in str(refused.value)
    truncate(folder / "train.jsonl")
    with pytest.raises(ValueError, match=rf"{folder / 'train.jsonl'} has [\d,]+ bytes where [\d,]+ were written"):
        check_token_rewards_beta(str(folder / "train.jsonl"), 0.1, "train")

    # `load_from_disk`: the split's Arrow file of another run, read through the trainer
    folder = tmp_path / "disk"
    shutil.copytree(rewards["disk", 0.1], folder)
    for arrow in (rewards["disk", 0.5] / "train").glob("*.arrow"):
        shutil.copy(arrow, folder / "train" / arrow.name)
    with pytest.raises(ValueError, match=r"do not match their info file .* the rows were computed at beta=\[0.5\]"):
        tgdpo(tiny_model_path, tiny_tokenizer, load_from_disk(str(folder))["train"], tmp_path / "run", 0.1)


def test_a_stopped_run_leaves_the_previous_files_whole(
    rewards, token_rewards_script, tiny_model_path, guidance_path, tmp_path, monkeypatch, capsys
):
    """Before: the script rewrote `train.jsonl` in place, so a stop left part of the new rows (or, before the first
    batch, an empty file and a bare `StopIteration` from the JSON loader)."""
    folder = tmp_path / "rewards"
    shutil.copytree(rewards["jsonl", 0.1], folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    original_to_json = Dataset.to_json

    def stopped_while_writing(self, path_or_buf, **kwargs):
        path_or_buf.write(b'{"prompt": "half a row')
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "to_json", stopped_while_writing)
    data = rewards["jsonl", 0.1].parent / "input"
    with pytest.raises(KeyboardInterrupt):
        compute_rewards(token_rewards_script, tiny_model_path, guidance_path, data, folder, 0.5)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # no temporary file left either

    # A `kill -9` leaves its temporary file: the next run removes it
    monkeypatch.setattr(Dataset, "to_json", original_to_json)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = temporary_path(folder / "train.jsonl")
    orphan = orphan.with_name(orphan.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    orphan.write_text('{"prompt": "half a row')
    staged = orphan.with_name(orphan.name.replace(".train.jsonl.", ".dataset."))  # a `save_to_disk` folder
    (staged / "train").mkdir(parents=True)
    live = temporary_path(folder / "test.jsonl")  # this process's: still being written, left alone
    live.write_text("")
    capsys.readouterr()
    compute_rewards(token_rewards_script, tiny_model_path, guidance_path, data, folder, 0.5)
    assert not orphan.exists() and not staged.exists() and live.exists()
    assert f"Removed {orphan}, left by a run that was stopped while it wrote it." in capsys.readouterr().out


def test_an_unreadable_info_file_is_named(rewards, tmp_path):
    """Before: `JSONDecodeError` or "could not convert string to float", the file not named."""
    from trl_tokenpref.tgdpo.token_rewards import check_token_rewards_beta

    folder = tmp_path / "rewards"
    shutil.copytree(rewards["jsonl", 0.1], folder)
    info = folder / "token_rewards_info.json"
    content = info.read_text()
    info.write_text(content[: len(content) // 2])
    with pytest.raises(
        ValueError, match=rf"info file {info} cannot be read \(JSONDecodeError: .*run the script again"
    ):
        check_token_rewards_beta(str(folder), 0.1, "train")
    info.write_text(json.dumps({**json.loads(content), "beta": "0.1"}))
    with pytest.raises(ValueError, match=rf"info file {info} gives beta as '0.1' \(str\), not a number"):
        check_token_rewards_beta(str(folder), 0.1, "train")


def test_the_script_prints_rounded_statistics(token_rewards_script, rewards, tiny_model_path, guidance_path, tmp_path,
                                              capsys):  # fmt: skip
    compute_rewards(token_rewards_script, tiny_model_path, guidance_path, rewards["jsonl", 0.1].parent / "input",
                    tmp_path / "out", 0.1)  # fmt: skip
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train: "))
    statistics = summary.split("mean r̂ chosen ")[1].split(" -> ")[0]
    numbers = statistics.replace("/ rejected", "").replace(", max |r̂|", "").split()
    digits = [re.sub(r"e[+-]\d+$", "", number).lstrip("-").replace(".", "").lstrip("0") for number in numbers]
    assert len(numbers) == 3 and all(len(significant) <= 4 for significant in digits), summary


# ------------------------------------------------------------------------------------------------------------------
# 6. The reference cache: range-checked when read, recomputed when it cannot be used
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cached(tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
    """`build()`: a TDPO trainer with the reference cache of a dataset read from disk (so the cache is a file);
    returns the trainer and the cache file."""
    train_subset.select(range(8)).save_to_disk(str(tmp_path / "data"))
    dataset = load_from_disk(str(tmp_path / "data"))

    def build():
        trainer = TDPOTrainer(
            model=tiny_model_path,
            args=fast_args(tmp_path / "run", TDPOConfig, precompute_ref_log_probs=True, ref_top_k=4),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        files = [Path(cache["filename"]) for cache in trainer.train_dataset.cache_files]
        cache_file = next(path for path in files if "ref_chosen_topk_ids" in Dataset.from_file(str(path)).column_names)
        return trainer, cache_file

    return build


def rewrite_cache(cache_file: Path, column: str, change) -> None:
    """Rewrite one column of the cache file, each stored value changed by `change` (a function of a pyarrow array)."""
    with pa.OSFile(str(cache_file), "rb") as file:
        table = pa.ipc.open_stream(file).read_all()
    values = table[column].combine_chunks()
    changed = pa.LargeListArray.from_arrays(values.offsets, change(values.values).cast(values.type.value_type))
    table = table.set_column(table.schema.get_field_index(column), column, changed)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    rewrite(cache_file, sink.getvalue().to_pybytes())


def columns_of(trainer) -> dict:
    return {column: trainer.train_dataset[column] for column in REF_CACHE_COLUMNS}


CACHE_DAMAGE = {
    "ids-beyond-the-vocabulary": ("ref_chosen_topk_ids", lambda v: pc.add(v, 600), "in [0, 512)"),
    "negative-ids": ("ref_rejected_topk_ids", lambda v: pc.subtract(v, 600), "in [0, 512)"),
    "log-probs-shifted-up": ("ref_chosen_topk_logps", lambda v: pc.add(v, 50.0), "<= 0"),
    "label-log-probs-positive": ("ref_chosen_token_logps", lambda v: pc.add(v, 50.0), "<= 0"),
    "tail-positive": ("ref_rejected_tail_logmass", lambda v: pc.add(v, 50.0), "log-masses <= 0"),
    "tail-shifted-down": ("ref_chosen_tail_logmass", lambda v: pc.subtract(v, 50.0), "instead of 1"),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_a_cache_file_out_of_range_is_named_and_computed_again(damage, cached, caplog):
    """Before: top-k ids beyond the vocabulary trained with `kl/chosen` < 0; log-probs shifted by +50 gave a loss of
    56 (or 0 with a zero gradient), without a word."""
    column, change, expected = CACHE_DAMAGE[damage]
    trainer, cache_file = cached()
    original = columns_of(trainer)
    rewrite_cache(cache_file, column, change)
    with caplog.at_level(logging.WARNING):
        again, same_file = cached()
    assert same_file == cache_file
    assert f"The cache file {cache_file} of the train dataset's per-token values cannot be used (" in caplog.text
    assert expected in caplog.text and "it is deleted and computed again" in caplog.text
    assert columns_of(again) == original


def test_a_truncated_cache_file_is_named_and_computed_again(cached, caplog):
    """Before: pyarrow's `ArrowInvalid` (or "Number of rows must match") at every rerun, naming no file, until someone
    found and deleted it by hand."""
    trainer, cache_file = cached()
    original = columns_of(trainer)
    truncate(cache_file)
    with caplog.at_level(logging.WARNING):
        again, _ = cached()
    assert f"The cache file {cache_file} of the train dataset's per-token values cannot be used (" in caplog.text
    assert columns_of(again) == original


def test_a_killed_precompute_leaves_no_cache_file_and_its_temporary_file_is_removed(cached, monkeypatch):
    """Before: `tmp*` files of killed precomputes stayed in the dataset's cache folder (108 MB in one case)."""
    import trl_tokenpref.files as files

    _, cache_file = cached()
    cache_file.unlink()

    def killed(temporary, path):  # the process dies after writing its temporary file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "replace_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        cached()
    assert not cache_file.exists()  # nothing half-written under the name a later run reads
    monkeypatch.undo()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = temporary_path(cache_file)
    orphan = orphan.with_name(orphan.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    orphan.write_bytes(b"\0" * 1000)
    cached()
    assert cache_file.exists() and not orphan.exists()
    assert not [path for path in cache_file.parent.iterdir() if ".tmp-" in path.name]


def test_the_range_check_names_the_row():
    table = pa.table(
        {
            "ref_chosen_topk_ids": pa.array([[1, 2, None, None], [3, 700]], pa.large_list(pa.int32())),
            "ref_chosen_token_logps": pa.array([[-0.5, None], [-1.0]], pa.large_list(pa.float32())),
        }
    )
    assert reference_cache_problem(table, vocab_size=1000) is None
    assert reference_cache_problem(table, vocab_size=512) == (
        "`ref_chosen_topk_ids` holds 700 at row 1 (value 1 of the row): expected token ids in [0, 512)"
    )
