"""What a run leaves in `output_dir` and reads back: checked checkpoints, finite steps, one run per folder.

A checkpoint must be what was saved, a run must never save a non-finite model, and two runs must never share an
`output_dir` without a word. [`TrainingGuardMixin`] gives the token-level trainers these guarantees (the scripts add
theirs through `cli.py`), for `trainer.train(resume_from_checkpoint=...)` in a user's own script as for the scripts:

* **A manifest** (`checkpoint_manifest.json`) is written as the last step of every checkpoint save
  ([`write_checkpoint_manifest`]): each file's size and XXH3-128 checksum, and the settings that shape the data of a
  step ([`run_description`]). It is written atomically, after every process has written its files.
* **Resuming checks the checkpoint before reading it** ([`verify_checkpoint`]): the files a resume needs are there
  ([`inspect_checkpoint`]); every file the manifest lists has its size and checksum (a checkpoint without a
  manifest, saved by another trainer or an earlier version, gets structural checks instead: every torch archive's
  CRC-32s, the safetensors headers); `trainer_state.json` holds values of the types `Trainer` reads; the weights
  (every `*.safetensors` file) are finite. `resume_from_checkpoint=True` (`last` in the scripts) resumes from the
  newest checkpoint that passes, with a warning naming what is wrong with each newer one ([`resolve_checkpoint`]); an
  explicit path that fails is an error naming the files. A checkpoint is verified once per process (the scripts
  check before loading, the trainer again at `train`: the second check is free).
* **A non-finite step stops the run** at the step it appears, before that step is logged or saved, with the step,
  the likely causes and the last checkpoint saved ([`non_finite_step_error`]): a non-finite loss; a non-finite
  gradient norm whose update made weights non-finite; weights made non-finite by an update whose loss and gradient
  norm were finite (checked before every save and at the last step, so no checkpoint or final model holds them). A
  gradient norm that overflowed in a 16-bit dtype while the loss and every weight stay finite after the update
  (gradient clipping then scales the step to 0) is a warning, and training goes on, as in `DPOTrainer`. Without the
  stop, `Trainer`'s `logging_nan_inf_filter` would log a NaN loss as the average of the others (0.0 when every step of the
  logging window is NaN), and every later checkpoint and the final model would hold NaN weights. Under fp16 mixed
  precision, an overflowing gradient whose step the loss scaler skipped (`accelerator.optimizer_step_was_skipped`:
  torch's `GradScaler` or DeepSpeed's) is the scaler's normal work, not an error: the weights did not change.
* **One run per `output_dir`** ([`hold_output_dir`]): the main process of a run holds an exclusive `flock` on
  `output_dir/_trl_tokenpref.lock`, which names the run (host, process id, start time, command). A second run (a
  double-submitted job, or the second of two independent processes that a misconfigured launcher started) is refused at
  once, naming the first. The operating system releases the lock when the process that holds it ends, however it ends
  (`kill -9` included), so a run that died never blocks the next one. Only the main process of a distributed run
  takes the lock; it tells the others whether it got it, so every process of a refused run stops with the same error.
* **A failed save says why**: an exception while a checkpoint is written (a full disk makes torch raise "basic_ios::
  clear: iostream error") is re-raised naming the folder, the file being written and the free space left.
"""

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import socket
import sys
import types
import typing
import zipfile
from pathlib import Path

import torch

from ._logging import get_logger
from .files import file_fingerprint, fingerprint_mismatch, write_json_atomically


logger = get_logger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = 1
LOCK_NAME = "_trl_tokenpref.lock"  # `_*`: `Trainer.push_to_hub` leaves it out of the upload
CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
_RNG_STATE_FILE = re.compile(r"^rng_state(_\d+)?\.pth$")
# The files `Trainer` resumes without (silently; we warn): optimizer, scheduler, scaler and RNG states
_RESUMABLE_WITHOUT = re.compile(
    r"^(optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|baseline_optimizer\.pt)$"
)
# Files a torch archive (zip) holds: `torch.save` writes a CRC-32 of each record, which `zipfile` checks
_TORCH_ARCHIVE_SUFFIXES = (".pt", ".pth", ".bin")


# ------------------------------------------------------------------------------------------------------------------
# Completeness: which files a resume needs
# ------------------------------------------------------------------------------------------------------------------


def inspect_checkpoint(checkpoint: str) -> tuple[list[str], bool]:
    """What the folder `checkpoint` lacks to be resumed from (`[]` when it is complete), and whether `Trainer.train`
    fails on it (it lacks the trainer state or the weights) rather than resuming without the rest, silently.

    `Trainer._save_checkpoint` writes, in this order: the weights (or the adapter; TBPO-Q first writes its
    `baseline_head.safetensors`), unless `save_only_model=True` the optimizer (`optimizer.pt`, or DeepSpeed's
    `global_step*` folder, or FSDP's `optimizer*` folder; TBPO-Q adds `baseline_optimizer.pt`), the scheduler
    (`scheduler.pt`) and the RNG state (`rng_state.pth`, `rng_state_<rank>.pth` with several processes), and last
    `trainer_state.json` (the token-level trainers then add the manifest). A save that was interrupted (a `kill -9`, a
    lost node) leaves a folder without `trainer_state.json` (or with a truncated one), from which `Trainer.train`
    fails. A checkpoint is complete when it has a readable `trainer_state.json`, weights (every shard an index lists),
    and, when any optimizer, scheduler or RNG file is there (the checkpoint was not saved with `save_only_model=True`),
    all of them.
    """
    from transformers.trainer import (
        FSDP_MODEL_NAME,
        OPTIMIZER_NAME,
        OPTIMIZER_NAME_BIN,
        SCALER_NAME,
        SCHEDULER_NAME,
        TRAINER_STATE_NAME,
    )
    from transformers.utils import (
        ADAPTER_SAFE_WEIGHTS_NAME,
        ADAPTER_WEIGHTS_NAME,
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )

    from .tbpo.baseline_head import BASELINE_HEAD_NAME, BASELINE_OPTIMIZER_NAME

    files = {entry.name for entry in os.scandir(checkpoint) if entry.is_file()}
    folders = {entry.name for entry in os.scandir(checkpoint) if entry.is_dir()}
    missing = []  # what `Trainer.train` cannot resume without
    if TRAINER_STATE_NAME not in files:
        missing.append(TRAINER_STATE_NAME)
    else:
        try:
            json.loads(Path(checkpoint, TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(f"a readable {TRAINER_STATE_NAME} (it is truncated or corrupt)")

    deepspeed = any(name.startswith("global_step") for name in folders)
    adapter_folders = any(
        Path(checkpoint, name, ADAPTER_SAFE_WEIGHTS_NAME).is_file()
        or Path(checkpoint, name, ADAPTER_WEIGHTS_NAME).is_file()
        for name in folders
    )
    weight_files = {SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME}
    weight_files |= {ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, f"{FSDP_MODEL_NAME}.bin"}
    fsdp_folders = any(FSDP_MODEL_NAME in name for name in folders)
    if not (files & weight_files or fsdp_folders or adapter_folders or deepspeed):
        missing.append(f"the model weights ({SAFE_WEIGHTS_NAME}, {ADAPTER_SAFE_WEIGHTS_NAME}, ...)")
    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if index_name in files:
            try:
                index = json.loads(Path(checkpoint, index_name).read_text(encoding="utf-8"))
                shards = set(index["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                missing.append(f"a readable {index_name}")
                continue
            missing += [f"{shard} (listed in {index_name})" for shard in sorted(shards - files)]
    fatal = bool(missing)

    # Without `save_only_model`, the optimizer, scheduler and RNG state are all saved: one of them present means
    # they all should be (TBPO-Q's head optimizer with them)
    optimizer = bool(files & {OPTIMIZER_NAME, OPTIMIZER_NAME_BIN}) or any("optimizer" in name for name in folders)
    scheduler = SCHEDULER_NAME in files
    rng_state = any(_RNG_STATE_FILE.match(name) for name in files)
    full_save = (
        optimizer or scheduler or rng_state or deepspeed or bool(files & {SCALER_NAME, BASELINE_OPTIMIZER_NAME})
    )
    if full_save:
        if not (optimizer or deepspeed):
            missing.append(OPTIMIZER_NAME)
        if not (scheduler or deepspeed):  # DeepSpeed keeps its own scheduler's state in `global_step*`
            missing.append(SCHEDULER_NAME)
        if not rng_state:
            missing.append("rng_state.pth")
    if BASELINE_OPTIMIZER_NAME in files and BASELINE_HEAD_NAME not in files:
        missing.append(BASELINE_HEAD_NAME)
    if BASELINE_HEAD_NAME in files and full_save and BASELINE_OPTIMIZER_NAME not in files:
        missing.append(BASELINE_OPTIMIZER_NAME)
    return missing, fatal


def checkpoint_folders(output_dir: str) -> list[str]:
    """The `checkpoint-<step>` folders of `output_dir`, newest (highest step) first."""
    if not os.path.isdir(output_dir):
        return []
    steps = [
        (int(match.group(1)), entry.path)
        for entry in os.scandir(output_dir)
        if entry.is_dir() and (match := CHECKPOINT_FOLDER.match(entry.name))
    ]
    return [path for _, path in sorted(steps, reverse=True)]


# ------------------------------------------------------------------------------------------------------------------
# The manifest: what a save wrote
# ------------------------------------------------------------------------------------------------------------------


def _checkpoint_files(checkpoint: str) -> list[str]:
    """Every regular file under `checkpoint` (relative, `/`-separated), except the manifest and temporary files."""
    names = []
    for root, folders, files in os.walk(checkpoint):
        folders.sort()
        for name in sorted(files):
            if name == MANIFEST_NAME or name.startswith("."):
                continue
            names.append(Path(root, name).relative_to(checkpoint).as_posix())
    return names


def run_description(trainer) -> dict:
    """The settings that decide which pairs and tokens make up each step: a resume with other values does not
    continue the saved run exactly (see [`data_shaping_changes`])."""
    args = trainer.args
    dataset = getattr(trainer, "train_dataset", None)
    try:
        train_rows = len(dataset) if dataset is not None else None
    except TypeError:  # an IterableDataset
        train_rows = None
    return {
        "max_length": getattr(args, "max_length", None),
        "truncation_mode": getattr(args, "truncation_mode", None),
        "train_rows": train_rows,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "seed": args.seed,
        "data_seed": args.data_seed,
    }


def write_checkpoint_manifest(checkpoint: str, run: dict | None = None) -> dict:
    """Write `checkpoint/checkpoint_manifest.json`: the size and checksum of every file of the checkpoint, and `run`
    ([`run_description`]). Called once every process has written its files; written atomically. Returns it."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "written_by": "trl_tokenpref",
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": {name: file_fingerprint(os.path.join(checkpoint, name)) for name in _checkpoint_files(checkpoint)},
        "run": run or {},
    }
    write_json_atomically(os.path.join(checkpoint, MANIFEST_NAME), manifest, indent=1)
    return manifest


def read_manifest(checkpoint: str) -> tuple[dict | None, str | None]:
    """The checkpoint's manifest (None when it has none), and why it cannot be used (None when it can)."""
    path = os.path.join(checkpoint, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None, None
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
            raise ValueError("`files` is not a mapping of file names to sizes and checksums")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{path} is unreadable ({error}): the checkpoint cannot be checked against what was saved"
    return manifest, None


def data_shaping_changes(saved: dict, current: dict) -> list[str]:
    """`name saved → current` for each setting of [`run_description`] that differs (a setting the manifest does not
    record is not compared)."""
    return [
        f"{name} {saved[name]!r} → {current[name]!r}"
        for name in current
        if name in saved and saved[name] is not None and current[name] is not None and saved[name] != current[name]
    ]


# ------------------------------------------------------------------------------------------------------------------
# Verification: is this checkpoint what was saved?
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CheckpointReport:
    """What [`verify_checkpoint`] found in a checkpoint folder."""

    path: str
    # Files it lacks: what `Trainer` cannot resume without when `incomplete`, otherwise what it would skip silently
    # (optimizer, scheduler, RNG state)
    missing: list[str]
    incomplete: bool
    # Why it is not what was saved (each names its file): a size or checksum that differs from the manifest, an
    # unreadable file, a trainer state of the wrong types, non-finite weights
    problems: list[str]
    manifest: dict | None

    @property
    def resumable(self) -> bool:
        return not (self.incomplete or self.problems)

    @property
    def complete(self) -> bool:
        return self.resumable and not self.missing

    def describe(self) -> str:
        parts = []
        if self.missing and (self.incomplete or not self.problems):
            interrupted = " (its save was interrupted, e.g. by a kill)" if self.incomplete else ""
            parts.append(f"it lacks {', '.join(self.missing)}{interrupted}")
        return "; ".join(parts + self.problems)


def _annotation_allows(value, annotation) -> bool:
    """Whether a JSON value fits a `TrainerState` field's annotation (int, float, str, bool, list, dict, `X | None`)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_annotation_allows(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation in (int, float):  # `Trainer` writes some int fields as floats (`logging_steps: 1.0`)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    container = origin or annotation
    if container in (list, dict):
        return isinstance(value, container)
    return True  # an annotation this check does not know: accept


def trainer_state_problems(path: str) -> list[str]:
    """Why `Trainer` would fail on (or misread) this `trainer_state.json`: keys that `TrainerState` does not have, and
    values of another type than its fields (e.g. a garbled `"global_step": "4x"`, which `Trainer` would only trip on
    with a bare `TypeError`)."""
    from transformers import TrainerState

    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return [f"{path} is unreadable ({error})"]
    if not isinstance(state, dict):
        return [f"{path} does not hold a JSON object"]
    fields = {field.name: field.type for field in dataclasses.fields(TrainerState)}
    fields["stateful_callbacks"] = dict | list | None  # saved as a dict of callback states
    problems = [
        f"{path} has the key `{key}`, which `TrainerState` does not have" for key in state if key not in fields
    ]
    for key, value in state.items():
        if key in fields and not _annotation_allows(value, fields[key]):
            problems.append(f"{path}: `{key}` is {value!r}, not of the type `TrainerState` reads ({fields[key]})")
    step = state.get("global_step")
    if isinstance(step, (int, float)) and not isinstance(step, bool) and not (step >= 0 and float(step).is_integer()):
        problems.append(f"{path}: `global_step` is {step}, not a step number")
    if isinstance(state.get("log_history"), list) and not all(isinstance(log, dict) for log in state["log_history"]):
        problems.append(f"{path}: `log_history` holds entries that are not JSON objects")
    return problems


# Elements summed at once off CUDA: a reduction there casts its whole input to the accumulation dtype first, so a
# float32 sum of a bf16 Llama-3-8B LM head would copy it (2 GB) at every check; blocks of 8 MiB in float32 instead
_COUNT_BLOCK_ELEMENTS = 2**21


def _count_non_finite(tensor: torch.Tensor) -> int:
    """The number of NaN/inf values of a floating-point tensor. Float32 sums first, one block at a time (memory-bound,
    and NaN or inf as soon as one value is): `torch.isfinite` over a whole tensor is 10-60x slower on CPU."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    flat = tensor.reshape(-1)
    block = flat.numel() if flat.device.type == "cuda" else _COUNT_BLOCK_ELEMENTS
    count = 0
    for part in flat.split(block):
        if not math.isfinite(part.sum(dtype=torch.float32).item()):
            count += int((~torch.isfinite(part)).sum())  # non-finite, or finite values whose sum overflowed
    return count


def _non_finite_parameters(model: torch.nn.Module) -> int:
    """The number of NaN/inf values among the parameters this process holds (its shard under ZeRO-3 or FSDP2)."""
    from torch.distributed.tensor import DTensor

    count = 0
    for param in model.parameters():
        local = getattr(param, "ds_tensor", None)  # DeepSpeed ZeRO-3: this rank's partition
        if local is None:
            local = param.to_local() if isinstance(param, DTensor) else param
        count += _count_non_finite(local.detach())
    return count


def safetensors_problems(path: str) -> list[str]:
    """Why the weights in this `.safetensors` file cannot be resumed from: an unreadable file (a garbled header, a
    truncated file) or non-finite values (each tensor named, with its count)."""
    from safetensors import safe_open

    non_finite = []
    try:
        with safe_open(path, framework="pt") as file:
            for name in file.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                count = _count_non_finite(file.get_tensor(name))
                if count:
                    non_finite.append(f"{name} ({count:,})")
    except Exception as error:  # safetensors raises its own error types, and OSError
        return [f"{path} is unreadable ({type(error).__name__}: {error})"]
    if non_finite:
        listed = ", ".join(non_finite[:5]) + (
            f" and {len(non_finite) - 5} more tensors" if len(non_finite) > 5 else ""
        )
        return [f"{path} holds non-finite weights: NaN or inf in {listed}"]
    return []


def torch_archive_problems(path: str) -> list[str]:
    """Why this torch file (`torch.save`'s zip archive) is not what was written: a truncated archive, or a record
    whose CRC-32 differs (garbled bytes, which `torch.load` would read as wrong values without a word)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except zipfile.BadZipFile:
        return [f"{path} is not a complete torch archive (truncated, or not written by `torch.save`)"]
    except OSError as error:
        return [f"{path} is unreadable ({error})"]
    if bad_record is not None:
        return [f"{path} is corrupt: its record {bad_record} does not match its CRC-32 (garbled bytes)"]
    return []


_verified: dict[tuple, CheckpointReport] = {}


def _folder_signature(checkpoint: str) -> tuple:
    entries = []
    for name in _checkpoint_files(checkpoint) + (
        [MANIFEST_NAME] if os.path.isfile(Path(checkpoint, MANIFEST_NAME)) else []
    ):
        stat = os.stat(os.path.join(checkpoint, name))
        entries.append((name, stat.st_size, stat.st_mtime_ns))
    return os.path.realpath(checkpoint), tuple(entries)


def verify_checkpoint(checkpoint: str) -> CheckpointReport:
    """Check a checkpoint folder before a resume reads it (see the module's docstring). Every problem names its file.

    The result is kept for the process: a folder whose files (names, sizes, modification times) have not changed is
    not read twice.
    """
    from transformers.trainer import TRAINER_STATE_NAME

    key = _folder_signature(checkpoint)
    if key in _verified:
        return _verified[key]
    missing, incomplete = inspect_checkpoint(checkpoint)
    manifest, manifest_problem = read_manifest(checkpoint)
    problems = [manifest_problem] if manifest_problem else []
    mismatched = set()
    for name, expected in (manifest or {}).get("files", {}).items():
        path = os.path.join(checkpoint, name)
        if _RESUMABLE_WITHOUT.match(name) and not os.path.exists(path):
            continue  # in `missing`: a resume without it is warned about, as for a checkpoint without a manifest
        mismatch = fingerprint_mismatch(path, expected)
        if mismatch:
            mismatched.add(name)
            problems.append(mismatch)
    if not incomplete and TRAINER_STATE_NAME not in mismatched:
        problems += trainer_state_problems(os.path.join(checkpoint, TRAINER_STATE_NAME))
    for name in _checkpoint_files(checkpoint):
        path = os.path.join(checkpoint, name)
        if name.endswith(".safetensors"):
            problems += safetensors_problems(path)  # finite, whether or not a manifest vouches for the bytes
        elif manifest is None and name.endswith(_TORCH_ARCHIVE_SUFFIXES):
            problems += torch_archive_problems(path)
    report = CheckpointReport(checkpoint, missing, incomplete, problems, manifest)
    _verified[key] = report
    return report


def check_checkpoint(checkpoint: str) -> CheckpointReport:
    """Refuse a checkpoint folder that does not exist, that a resume would fail on (an interrupted save), or that is
    not what was saved (a file's size or checksum differs from its manifest, a corrupt archive, non-finite weights),
    naming every file at fault. Warn about one that lacks only the optimizer, scheduler or RNG state, which `Trainer`
    would skip silently (the run then does not continue exactly as the original one)."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"`resume_from_checkpoint={checkpoint}`: no such checkpoint folder.")
    report = verify_checkpoint(checkpoint)
    earlier = (
        "Resume from an earlier checkpoint: `--resume_from_checkpoint last` (`trainer.train(resume_from_checkpoint="
        "True)`) picks the newest one in `output_dir` that is complete and passes these checks."
    )
    if report.incomplete:
        raise ValueError(f"The checkpoint {checkpoint} is incomplete: {report.describe()}. {earlier}")
    if report.problems:
        raise ValueError(f"Cannot resume from the checkpoint {checkpoint}: {report.describe()}. {earlier}")
    if report.missing:
        logger.warning(
            f"The checkpoint {checkpoint} lacks {', '.join(report.missing)}: training resumes from its weights and "
            "trainer state, but not from what is missing, so it does not continue exactly as the original run."
        )
    return report


def resolve_checkpoint(value, output_dir: str) -> str | None:
    """The checkpoint `resume_from_checkpoint=value` resumes from: None (no resume) for None/False/"false"/"none"/"",
    the newest complete checkpoint of `output_dir` that passes [`verify_checkpoint`] for True/"true"/"last" (each newer
    one skipped with a warning that names what is wrong with it; none is deleted), and the value itself for a path
    (checked by [`check_checkpoint`] when it is used).

    No checkpoint in `output_dir`, or none that passes, is an error: silently restarting from scratch would waste a
    run.
    """
    if value is None or value is False or str(value).lower() in ("", "false", "none"):
        return None
    if not (value is True or str(value).lower() in ("true", "last")):
        return str(value)
    checkpoints = checkpoint_folders(output_dir)
    if not checkpoints:
        raise ValueError(
            f"`resume_from_checkpoint={value}` asks for the last checkpoint in `output_dir`, but {output_dir!r} "
            "holds no `checkpoint-*` folder. Pass a checkpoint path, or drop `resume_from_checkpoint` to start "
            "from scratch."
        )
    skipped = []
    for checkpoint in checkpoints:
        report = verify_checkpoint(checkpoint)
        if report.complete:
            for bad in skipped:
                kind = "incomplete " if bad.incomplete or not bad.problems else ""
                logger.warning(
                    f"Skipping the {kind}checkpoint {bad.path}: {bad.describe()}. Resuming from {checkpoint}, the "
                    f"newest complete one that passes the checks. The folder {bad.path} is left as it is; this run "
                    "writes over it if it saves that step again."
                )
            return checkpoint
        skipped.append(report)
    details = "; ".join(f"{report.path}: {report.describe()}" for report in skipped)
    raise ValueError(
        f"`resume_from_checkpoint={value}` asks for the last complete checkpoint in {output_dir!r}, but none of its "
        f"checkpoints can be resumed from: {details}. Pass `--resume_from_checkpoint` with a checkpoint's path, or "
        "drop it to start from scratch (with another `--output_dir` to keep these folders)."
    )


@contextlib.contextmanager
def naming_checkpoint_files(checkpoint: str, what: str):
    """Re-raise an error of `Trainer`'s loading of `what` from `checkpoint` naming the checkpoint and the files (torch
    and safetensors name neither: "invalid header length", a bare `EOFError`)."""
    try:
        yield
    except Exception as error:
        if checkpoint in str(error):
            raise
        raise RuntimeError(
            f"Resuming from {checkpoint} failed while loading {what}: {type(error).__name__}: {error}. The checkpoint "
            "is not one this trainer can read (another model or optimizer, or a damaged file): resume from another "
            "checkpoint, or drop `resume_from_checkpoint`."
        ) from error


# ------------------------------------------------------------------------------------------------------------------
# Several processes: one of them reads, every one learns the result
# ------------------------------------------------------------------------------------------------------------------


def on_main_process(function, *args, **kwargs):
    """`function(*args, **kwargs)` computed by the main process only and sent to every process, an exception included
    (raised on every process, so that none is left waiting in a collective for one that failed). Checking a checkpoint
    reads gigabytes: one process does it."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    if state.num_processes == 1:
        return function(*args, **kwargs)
    outcome = [None, None]
    if state.is_main_process:
        try:
            outcome = [function(*args, **kwargs), None]
        except Exception as error:  # sent to the other processes, raised on all
            outcome = [None, error]
    broadcast_object_list(outcome, from_process=0)
    result, error = outcome
    if error is not None:
        raise error
    return result


# ------------------------------------------------------------------------------------------------------------------
# One run per output_dir
# ------------------------------------------------------------------------------------------------------------------


class OutputDirInUseError(RuntimeError):
    """Another run holds the lock of this `output_dir`."""


# Locks this process holds: real path of the lock file -> [file descriptor, number of holders in this process]
_held_locks: dict[str, list] = {}


def _lock_path(output_dir: str) -> str:
    return os.path.join(os.path.realpath(output_dir), LOCK_NAME)


def _describe_holder(path: str) -> str:
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
        return (
            f"host {holder.get('host')}, process {holder.get('pid')}, started {holder.get('started')} "
            f"(`{holder.get('command')}`)"
        )
    except (OSError, ValueError, AttributeError):
        return "a run whose description could not be read"


def acquire_output_dir(output_dir: str) -> bool:
    """Take this process's hold on `output_dir` (re-entrant: the scripts hold it from before loading to the end, the
    trainer again during `train`). Raises [`OutputDirInUseError`] naming the run that holds it. Returns False (and
    warns) where the filesystem cannot lock files: the run then goes on unprotected."""
    try:
        import fcntl
    except ImportError:  # Windows
        logger.warning_once(f"Cannot lock {output_dir} on this platform: two runs into it would not be noticed.")
        return False
    path = _lock_path(output_dir)
    if path in _held_locks:
        _held_locks[path][1] += 1
        return True
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # a read-only folder: this run cannot write there either, it will say so itself
            logger.warning_once(f"Cannot lock {output_dir} ({error}): two runs into it would not be noticed.")
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirInUseError(
                f"{output_dir} is in use by another run: {_describe_holder(path)}. Two runs writing one `output_dir` "
                "overwrite each other's checkpoints and model. Wait for that run to end or stop it, or pass another "
                f"`--output_dir`. (The lock, {path}, is released by the operating system when that process ends, "
                "however it ends: if it is still refused, that process is still running.)"
            ) from None
        except OSError as error:  # a filesystem without locks
            os.close(fd)
            logger.warning_once(
                f"Cannot lock {output_dir} ({error}): two runs into it would not be noticed. Use a folder on a "
                "filesystem that supports file locks (local disks and NFS do) to be protected."
            )
            return False
        # The file may have been removed by the run that held it between our `open` and `flock`: lock the one there
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500] if sys.argv else "python",
    }
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    _held_locks[path] = [fd, 1]
    return True


def release_output_dir(output_dir: str) -> None:
    """Drop one hold of this process on `output_dir`; the last one removes the lock file and releases the lock."""
    path = _lock_path(output_dir)
    if path not in _held_locks:
        return
    _held_locks[path][1] -= 1
    if _held_locks[path][1] > 0:
        return
    fd, _ = _held_locks.pop(path)
    with contextlib.suppress(OSError):
        os.unlink(path)  # before unlocking: a run waiting on this file then sees it is gone and takes a new one
    os.close(fd)


@contextlib.contextmanager
def hold_output_dir(output_dir: str):
    """Hold `output_dir` for a run of one or several processes: the main process takes the lock and every process
    learns whether it got it ([`on_main_process`]), so a refused run stops on every process with the same error."""
    from accelerate import PartialState

    held = on_main_process(acquire_output_dir, output_dir)
    try:
        yield
    finally:
        if held and PartialState().is_main_process:
            release_output_dir(output_dir)


# ------------------------------------------------------------------------------------------------------------------
# Failures while training and saving
# ------------------------------------------------------------------------------------------------------------------


def non_finite_step_error(step: int, epoch: float | None, what: str, last_checkpoint: str | None) -> RuntimeError:
    """The error that stops a run at its first non-finite loss or gradient norm."""
    if last_checkpoint is not None:
        resume = (
            f"The last checkpoint saved before it is {last_checkpoint}: resume from it (`--resume_from_checkpoint "
            f"{last_checkpoint}`) after the fix."
        )
    else:
        resume = "No checkpoint was saved before it."
    at = f"step {step}" + (f" (epoch {epoch:.2f})" if epoch is not None else "")
    return RuntimeError(
        f"Training stopped at {at}: {what}. Going on would train every later step on NaN weights and save them in every "
        "later checkpoint and the final model; nothing of this step was logged or saved. Likely causes: a learning rate "
        "too high for this model (lower `learning_rate`, add warmup, keep `max_grad_norm` > 0); float16 overflow "
        "(train in bfloat16 or float32); non-finite values in a custom collator's or dataset's inputs; or weights "
        f"that were already non-finite (the model or a checkpoint it was resumed from). {resume}"
    )


# What torch and safetensors raise when a write fails (a full disk: "basic_ios::clear: iostream error", "unexpected
# pos"; a short write: "PytorchStreamWriter failed writing file")
_WRITE_ERRORS = ("iostream error", "unexpected pos", "PytorchStreamWriter failed", "file write failed", "No space")


def is_write_error(error: BaseException) -> bool:
    """Whether an exception raised while saving is a failed write (rather than, e.g., a failed collective)."""
    return isinstance(error, OSError) or any(text in str(error) for text in _WRITE_ERRORS)


def failed_save_error(checkpoint: str, error: BaseException) -> OSError:
    """The error that replaces an exception raised while a checkpoint was written: the folder, the file being
    written (the newest in the folder), the free space left, and what a resume does with the incomplete folder."""
    written = []
    with contextlib.suppress(OSError):
        written = sorted(Path(checkpoint).rglob("*"), key=lambda path: path.stat().st_mtime_ns)
    files = [path for path in written if path.is_file()]
    writing = f" while writing {files[-1].relative_to(checkpoint)}" if files else ""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free
    if free is None:
        space = ""
    elif free < 256 * 2**20:
        space = f" The filesystem holding it has {free / 2**20:,.1f} MiB free: the disk is full."
    else:
        space = f" The filesystem holding it has {free / 2**30:,.1f} GiB free (a quota or a file-size limit?)."
    return OSError(
        f"Saving the checkpoint {checkpoint} failed{writing}: {type(error).__name__}: {error}.{space} Free space (or "
        "keep fewer checkpoints with `save_total_limit`) and resume: the incomplete folder is skipped by "
        "`--resume_from_checkpoint last` (`trainer.train(resume_from_checkpoint=True)`), which resumes from the newest "
        "checkpoint that passes its checks."
    )


# ------------------------------------------------------------------------------------------------------------------
# The trainers' overrides
# ------------------------------------------------------------------------------------------------------------------


class TrainingGuardMixin:
    """Overrides of `transformers.Trainer` (placed before `DPOTrainer` in a trainer's bases) that check what a run
    resumes from and saves, stop a run at its first non-finite step, and hold `output_dir` for one run at a time (see
    the module's docstring). The private methods it overrides are listed in `_compat.OVERRIDDEN_METHODS`."""

    _last_good_checkpoint: str | None = None

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        with hold_output_dir(self.args.output_dir):
            checkpoint = on_main_process(self._checked_resume_checkpoint, resume_from_checkpoint)
            self._last_good_checkpoint = checkpoint
            self._step_losses = []
            return super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )

    def _checked_resume_checkpoint(self, resume_from_checkpoint) -> str | None:
        """`resolve_checkpoint` + `check_checkpoint`, and a warning when the data-shaping settings changed."""
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is None:
            return None
        report = check_checkpoint(checkpoint)
        if report.manifest is not None:
            changes = data_shaping_changes(report.manifest.get("run", {}), run_description(self))
            if changes:
                logger.warning(
                    f"Resuming from {checkpoint}, which a run with other data settings saved: {', '.join(changes)}. "
                    "The resumed run skips the batches that the checkpoint's step counts, in this run's data and "
                    "batches, so it does not continue the saved run exactly (other pairs, or other tokens of them, "
                    "make up its remaining steps). Resume with the saved settings to continue it exactly."
                )
        return checkpoint

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        # Kept on the device: checked once per optimizer step, in `_maybe_log_save_evaluate`
        if not hasattr(self, "_step_losses"):
            self._step_losses = []
        self._step_losses.append(loss.detach().float().reshape(-1)[:1])
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        self._check_step_is_finite(grad_norm)  # before the step is logged, evaluated or saved
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _check_step_is_finite(self, grad_norm) -> None:
        losses, self._step_losses = getattr(self, "_step_losses", []), []
        accelerator = self.accelerator
        losses = torch.cat(losses) if losses else torch.zeros(1, device=accelerator.device)
        # Every process stops, or none: a loss is per process, so the count of non-finite ones is summed over them
        non_finite_losses = accelerator.reduce((~torch.isfinite(losses)).sum().float(), reduction="sum").item()
        grad_norm_value = None if grad_norm is None else float(grad_norm)  # the same on every process
        what = None
        if non_finite_losses:
            local = [value for value in losses.tolist() if not math.isfinite(value)]
            value = local[0] if local else "non-finite on another process"
            what = f"the loss is {value}"
        elif grad_norm_value is not None and not math.isfinite(grad_norm_value):
            if accelerator.optimizer_step_was_skipped:
                return  # fp16: the gradient scaler (or DeepSpeed's loss scaler) skipped the step and lowers its scale
            # The step is applied by now. A norm that overflowed in a 16-bit dtype while every gradient was finite is
            # harmless (clipping scales the gradients by max_norm / inf = 0, and DPOTrainer trains on): only weights
            # that the update made non-finite stop the run
            non_finite_weights = self._count_non_finite_weights()
            if non_finite_weights == 0:
                logger.warning(
                    f"Step {self.state.global_step}: the gradient norm is {grad_norm_value}, but the loss and every "
                    "weight are finite after the update (a norm that overflowed in float16/bfloat16; gradient "
                    "clipping scaled this step's gradients to 0). Training goes on; if it recurs, lower the learning "
                    "rate or train in bfloat16/float32."
                )
                return
            what = (
                f"the gradient norm is {grad_norm_value} (the loss is finite), and the update made "
                f"{non_finite_weights:,} weights non-finite"
            )
        elif self.control.should_save or self.control.should_training_stop or self._is_last_step():
            # A finite loss and gradient norm can still come with an update that made weights non-finite (a learning
            # rate far too high, or `max_grad_norm=0`, which computes no norm): checked before a checkpoint or the
            # final model is saved, one pass over the weights per save
            non_finite_weights = self._count_non_finite_weights()
            if non_finite_weights:
                what = f"the update made {non_finite_weights:,} weights non-finite (the loss" + (
                    " and the gradient norm were finite)" if grad_norm_value is not None else " was finite)"
                )
        if what is not None:
            raise non_finite_step_error(self.state.global_step, self.state.epoch, what, self._last_good_checkpoint)

    def _count_non_finite_weights(self) -> int:
        """NaN/inf weights over every process (each counts the shard it holds)."""
        count = torch.tensor(float(_non_finite_parameters(self.model)), device=self.accelerator.device)
        return int(self.accelerator.reduce(count, reduction="sum").item())

    def _is_last_step(self) -> bool:
        return self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        checkpoint = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as error:
            if not is_write_error(error):
                raise
            raise failed_save_error(checkpoint, error) from error
        # The manifest comes last, once every process has written its files (RNG states, DeepSpeed shards)
        self.accelerator.wait_for_everyone()
        if trial is None and self.args.should_save and os.path.isdir(checkpoint):
            write_checkpoint_manifest(checkpoint, run_description(self))
        self._last_good_checkpoint = checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with naming_checkpoint_files(resume_from_checkpoint, "the model weights (model.safetensors or the adapter)"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with naming_checkpoint_files(checkpoint, "the optimizer and scheduler states (optimizer.pt, scheduler.pt)"):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        with naming_checkpoint_files(checkpoint, "the random number generators' state (rng_state*.pth)"):
            return super()._load_rng_state(checkpoint)
