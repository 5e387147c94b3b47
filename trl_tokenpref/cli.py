"""What the training scripts in `scripts/` share: argument parsing, checks before loading, dataset loading, resuming,
saving.

`scripts/run_tdpo.py`, `scripts/run_tgdpo.py` and `scripts/run_tbpo.py` have the shape of TRL's `trl/scripts/dpo.py`
(`TrlParser` over `ScriptArguments`, the method's config, `ModelConfig` and `DatasetMixtureConfig`) and differ only by
the trainer they build. The steps around the trainer live here, once:

* [`parse_args_and_config`]: `TrlParser.parse_args_and_config`, naming every key of the `--config` file that no
  dataclass reads (TRL ignores them silently) and refusing unknown command-line arguments;
* [`check_before_loading`]: before anything is loaded, the local paths (model, guidance model, dataset) exist, the
  checkpoint to resume from is complete, and a fresh run is told that `output_dir` holds an earlier run's
  checkpoints;
* [`set_model_init_kwargs`]: `ModelConfig` (dtype, attention, revision) into `training_args.model_init_kwargs`, as
  TRL's script does, since the trainers load the model from its path;
* [`load_preference_dataset`]: a `datasets:` mixture, a Hub dataset name, or local files (a `.json`/`.jsonl`/
  `.parquet`/`.csv` file, a directory of such files, or a directory written by `Dataset.save_to_disk`);
* [`select_splits`]: the train and (when the run evaluates) test splits, naming the splits that exist when one is
  missing;
* [`resolve_resume_from_checkpoint`], [`check_checkpoint`]: `--resume_from_checkpoint PATH`, or `true`/`last` for
  the newest complete checkpoint in `output_dir` (see [`missing_checkpoint_files`]);
* [`train_and_save`]: train, save, push to the Hub if asked, and close the trackers.
"""

import contextlib
import difflib
import functools
import json
import os
import warnings
from pathlib import Path

from . import checkpoints
from .checkpoints import inspect_checkpoint, on_main_process
from .checks import LOCAL_FILE_BUILDERS, missing_local_path


@functools.cache
def _logger():
    """The package's logger (`_logging.py`: only the main process logs, `[RANK i]` only under several processes; one
    adapter, so that `warning_once` works)."""
    from ._logging import get_logger

    return get_logger(__name__)


def _close_match(name: str, candidates) -> str:
    """` (did you mean `x`?)` for the closest of `candidates`, or an empty string."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


# ------------------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------------------


def parse_args_and_config(parser, args: list[str] | None = None) -> tuple:
    """Parses the command line and its `--config` file into the parser's dataclasses, as
    `TrlParser.parse_args_and_config(fail_with_unknown_args=False)` does in TRL's scripts, plus:

    * a key of the config file that no dataclass has (a typo such as `alpah`, an option a TRL release removed) is
      still ignored, as TRL ignores it (a config shared with `trl <command>`'s launcher may hold `accelerate launch`
      options), but named in a warning, with the closest field name;
    * an unknown command-line argument is an error, with the closest field name.

    Returns:
        The dataclass instances, in the parser's order.
    """
    args = list(args) if args is not None else None
    *dataclasses, config_remaining, cli_remaining = parser.parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True
    )
    fields = sorted({action.dest for action in parser._actions if action.dest != "help"})
    if cli_remaining:
        unknown = [item for item in cli_remaining if item.startswith("--")]
        hints = "".join(f"\n  {item}{_close_match(item[2:], fields)}" for item in unknown)
        raise ValueError(
            f"Some specified arguments are not used by the HfArgumentParser: {cli_remaining}.{hints}\nRun the script "
            "with --help for the list of arguments."
        )
    if config_remaining:
        import sys

        from accelerate.commands.launch import launch_command_parser

        argv = args if args is not None else sys.argv[1:]
        config_path = argv[argv.index("--config") + 1] if "--config" in argv else "the config file"
        launcher_options = {action.dest for action in launch_command_parser()._actions} | {"accelerate_config"}
        descriptions = []
        for key in config_remaining[0::2]:  # `--key value` pairs
            key = key[2:]
            if key in launcher_options:
                descriptions.append(
                    f"`{key}` (an `accelerate launch` option: a launcher such as `trl <command>` reads it, this "
                    "script does not)"
                )
            else:
                descriptions.append(f"`{key}`{_close_match(key, fields)}")
        names = ", ".join(type(instance).__name__ for instance in dataclasses)
        _logger().warning(
            f"Ignored {len(descriptions)} key(s) of {config_path} that no field of {names} has: "
            f"{', '.join(descriptions)}. They have no effect on this run: fix or remove them."
        )
    return tuple(dataclasses)


# ------------------------------------------------------------------------------------------------------------------
# Local paths
# ------------------------------------------------------------------------------------------------------------------


def check_local_paths_exist(script_args, training_args, model_args, dataset_args) -> None:
    """Raises `FileNotFoundError` naming every path among the model, the guidance model (TGDPO) and the dataset (or
    the `datasets:` mixture's paths) that does not exist, all at once (see [`missing_local_path`])."""

    def cache_dir_of(init_kwargs) -> str | None:
        return init_kwargs.get("cache_dir") if isinstance(init_kwargs, dict) else None

    model_cache_dir = cache_dir_of(training_args.model_init_kwargs)
    paths = [("--model_name_or_path", model_args.model_name_or_path, "model", model_cache_dir)]
    guidance = getattr(training_args, "guidance_model_name_or_path", None)
    if guidance:
        guidance_cache_dir = (
            cache_dir_of(getattr(training_args, "guidance_model_init_kwargs", None)) or model_cache_dir
        )
        paths.append(("--guidance_model_name_or_path", guidance, "model", guidance_cache_dir))
    if dataset_args is not None and getattr(dataset_args, "datasets", None):
        paths += [
            (f"datasets[{i}].path:", entry.path, "dataset", None) for i, entry in enumerate(dataset_args.datasets)
        ]
    elif script_args.dataset_name:
        paths.append(("--dataset_name", script_args.dataset_name, "dataset", None))
    problems = []
    for name, path, repo_type, cache_dir in paths:
        problem = missing_local_path(path, repo_type, cache_dir) if isinstance(path, str) else None
        if problem is not None:
            problems.append(f"  {name} {problem}")
    if problems:
        hint = ""
        if any("tiny" in line for line in problems):
            hint = (
                " The tiny recipes' assets are built with `python -m trl_tokenpref.tiny outputs/tiny-model && "
                "python -m trl_tokenpref.data outputs/tiny-data` (see the recipe's header)."
            )
        raise FileNotFoundError(
            f"These paths do not exist (relative paths are read from {os.getcwd()}):\n"
            + "\n".join(problems)
            + f"\nFix the paths, or create what they name first.{hint}"
        )


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------


def missing_checkpoint_files(checkpoint: str) -> list[str]:
    """What the folder `checkpoint` lacks to be resumed from, or `[]` when it is complete (see
    [`~checkpoints.inspect_checkpoint`])."""
    return inspect_checkpoint(checkpoint)[0]


def check_checkpoint(checkpoint: str) -> None:
    """[`~checkpoints.check_checkpoint`], run by the main process only (it reads the whole checkpoint) and raised on
    every process: refuses a checkpoint that is incomplete or not what was saved, naming the files; warns about one
    that lacks only what `Trainer` would skip silently (optimizer, scheduler, RNG state)."""
    on_main_process(checkpoints.check_checkpoint, checkpoint)


def resolve_resume_from_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint` as a path (checked by [`check_checkpoint`]), or
    `true`/`last` for the newest checkpoint in `output_dir` that is complete and passes
    [`~checkpoints.verify_checkpoint`] (files as the manifest says, finite weights, readable trainer state).

    With `last`, newer checkpoints that fail are skipped with a warning that names them and what is wrong; they are
    left in place. It is an error if `output_dir` holds no checkpoint, or none that passes: silently restarting from
    scratch would waste a run.
    """
    return on_main_process(
        checkpoints.resolve_checkpoint, training_args.resume_from_checkpoint, training_args.output_dir
    )


def warn_if_output_dir_holds_checkpoints(training_args) -> None:
    """A run that does not resume, into an `output_dir` with `checkpoint-*` folders, restarts from step 0 and writes
    over (and, with `save_total_limit`, rotates away) the earlier run's checkpoints: warn before it does."""
    value = training_args.resume_from_checkpoint
    if value is not None and str(value).lower() not in ("", "false", "none"):
        return
    folders = checkpoints.checkpoint_folders(training_args.output_dir)
    if not folders:
        return
    names = ", ".join(os.path.basename(path) for path in reversed(folders))
    saving = str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) != "no"
    consequence = ""
    if saving:
        consequence = " Its checkpoints write over those with the same step numbers"
        if training_args.save_total_limit:
            consequence += (
                f", and `save_total_limit={training_args.save_total_limit}` deletes the oldest (the earlier run's "
                "first) as it saves"
            )
        consequence += "."
    _logger().warning(
        f"{training_args.output_dir!r} already holds checkpoints of an earlier run ({names}), and this run starts "
        f"from step 0.{consequence} To continue the earlier run, pass `--resume_from_checkpoint last`; to keep its "
        "checkpoints, pass another `--output_dir`."
    )


def check_before_loading(script_args, training_args, model_args, dataset_args) -> None:
    """What the scripts check before loading anything (seconds, instead of failing after the model is loaded or
    hours into a run):

    * the local paths of the model, the guidance model and the dataset exist ([`check_local_paths_exist`]);
    * no other run writes into `output_dir` ([`hold_output_dir`]: this run holds it until [`train_and_save`] ends);
    * `resume_from_checkpoint` resolves to a complete checkpoint that is what was saved
      ([`resolve_resume_from_checkpoint`], [`check_checkpoint`]); the resolved path replaces `true`/`last` in
      `training_args.resume_from_checkpoint`, so the skipped checkpoints are reported once;
    * a run that does not resume is warned when `output_dir` holds checkpoints
      ([`warn_if_output_dir_holds_checkpoints`]).
    """
    check_local_paths_exist(script_args, training_args, model_args, dataset_args)
    hold_output_dir(training_args)
    try:
        checkpoint = resolve_resume_from_checkpoint(training_args)
        if checkpoint is not None:
            check_checkpoint(checkpoint)
        training_args.resume_from_checkpoint = checkpoint
        warn_if_output_dir_holds_checkpoints(training_args)
    except BaseException:
        release_output_dir(training_args)
        raise


def hold_output_dir(training_args) -> None:
    """Take the run's lock on `output_dir` ([`~checkpoints.acquire_output_dir`], by the main process; every process
    raises if another run holds it), before anything is loaded: a second run into the same folder (a job submitted
    twice) stops at once, naming the first. Held until [`train_and_save`] has saved the model."""
    on_main_process(checkpoints.acquire_output_dir, training_args.output_dir)


def release_output_dir(training_args) -> None:
    """Release the hold of [`hold_output_dir`] (the process's exit releases it too, however it ends)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        checkpoints.release_output_dir(training_args.output_dir)


@contextlib.contextmanager
def hide_deprecated_checkpointing_alias_warning():
    """Hides transformers' FutureWarning "`is_gradient_checkpointing` is deprecated", which peft's `get_peft_model`
    raises (transformers 5.24) whatever the user sets: the user cannot act on it (the trainers' own reference passes use
    the new names, `_compat.disable_gradient_checkpointing`). Every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


# ------------------------------------------------------------------------------------------------------------------
# Model and data
# ------------------------------------------------------------------------------------------------------------------


def set_model_init_kwargs(training_args, model_args) -> None:
    """Writes the model-loading fields of `ModelConfig` into `training_args.model_init_kwargs`.

    The trainers load the model (and, without PEFT, the reference) from `model_args.model_name_or_path` with these
    keyword arguments. Values the user already put in `model_init_kwargs` win, as in TRL's scripts.
    """
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs


# Largest text data file read to tell whether it holds only whitespace (an empty JSON array included)
_SMALL_FILE_BYTES = 1 << 16


def _holds_no_row(content: bytes) -> bool:
    """Whether a small text data file holds nothing but whitespace or an empty JSON array."""
    if not content.strip():
        return True
    try:
        return json.loads(content) == []
    except ValueError:
        return False


def empty_data_files(path: Path) -> list[str]:
    """The data files (`.json`, `.jsonl`, `.csv`, `.parquet`) that `load_dataset` would read from the local file or
    folder `path` and that hold no row: 0 bytes, only whitespace or an empty JSON array, or a Parquet file of 0
    rows. `datasets` fails on any of them with a bare `StopIteration` or "Instruction 'train' corresponds to no
    data", naming no file."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file()
            and file.suffix.lower() in LOCAL_FILE_BUILDERS
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
    empty = []
    for file in files:
        size = file.stat().st_size
        if file.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            try:
                is_empty = size == 0 or pq.ParquetFile(file).metadata.num_rows == 0
            except Exception:  # not a readable Parquet file: `datasets` says so itself
                is_empty = False
        else:
            is_empty = size <= _SMALL_FILE_BYTES and _holds_no_row(file.read_bytes())
        if is_empty:
            empty.append(f"{file} ({size} bytes)")
    return empty


def check_data_files_hold_rows(path: Path, dataset_name: str) -> None:
    """Refuse a local dataset with a data file that holds no row (see [`empty_data_files`]), naming the files."""
    empty = empty_data_files(path)
    if empty:
        raise ValueError(
            f"The dataset {dataset_name} has data files without any row: {', '.join(empty)}. Write the rows into them "
            "(a write that was interrupted leaves an empty file: run what wrote it again; `python -m "
            "trl_tokenpref.data DIR` writes the default dataset), or remove them (the test split is only read when the "
            "run evaluates)."
        )


def load_preference_dataset(script_args, dataset_args):
    """Loads the preference dataset the script arguments name.

    Args:
        script_args ([`~trl.ScriptArguments`]):
            `dataset_name` is a Hub dataset name, a local `.json`/`.jsonl`/`.parquet`/`.csv` file (loaded as the
            `dataset_train_split` split), a local directory of such files (split names taken from the file names, e.g.
            `train.jsonl` and `test.jsonl`), or a directory written by `Dataset(Dict).save_to_disk`.
            `dataset_config` and `dataset_streaming` are passed to [`~datasets.load_dataset`].
        dataset_args ([`~trl.DatasetMixtureConfig`]):
            If its `datasets` list is not empty, the mixture is loaded with [`~trl.get_dataset`] and `dataset_name` is
            ignored (with a warning), as in TRL's scripts.

    Returns:
        [`~datasets.DatasetDict`] (or [`~datasets.IterableDatasetDict`] when streaming): the splits by name.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            _logger().warning(
                "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
                "dataset and `dataset_name` will be ignored."
            )
        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise ValueError(
            "No dataset given: set `dataset_name` (a Hub dataset, a local .json/.jsonl/.parquet/.csv file or a "
            "directory of such files) or a `datasets:` list in the recipe."
        )

    path = Path(script_args.dataset_name)
    streaming = script_args.dataset_streaming
    problem = missing_local_path(script_args.dataset_name, repo_type="dataset")
    if problem is not None:
        # Otherwise `load_dataset` would look the path up on the Hub and fail with an unrelated message
        raise FileNotFoundError(f"The dataset path does not exist: {problem}.")
    if path.is_file():
        builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot load the local file {path}: expected one of the extensions {sorted(LOCAL_FILE_BUILDERS)}."
            )
        check_data_files_hold_rows(path, script_args.dataset_name)
        # A single file is one split: the one the trainer reads.
        data_files = {script_args.dataset_train_split: str(path)}
        return load_dataset(builder, data_files=data_files, streaming=streaming)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return load_from_disk(str(path))
    if path.is_dir() and (path / "state.json").is_file():  # a single `Dataset.save_to_disk`
        return DatasetDict({script_args.dataset_train_split: load_from_disk(str(path))})
    if path.is_dir():
        check_data_files_hold_rows(path, script_args.dataset_name)
    # A Hub name, or a local directory of data files, whose builder and splits `datasets` infers from the file names
    return load_dataset(script_args.dataset_name, name=script_args.dataset_config, streaming=streaming)


def select_splits(dataset, script_args, training_args) -> tuple:
    """The train split and, when the run evaluates (`eval_strategy != "no"`), the test split of `dataset`, or `None`.

    A missing split is an error that names the splits the dataset has and what to pass, instead of a bare `KeyError`
    (e.g. a single `train.jsonl`, which is one split, with a recipe that evaluates).
    """
    splits = list(dataset.keys())
    name = script_args.dataset_name or "the `datasets:` mixture"
    train_split = script_args.dataset_train_split
    if train_split not in dataset:
        raise ValueError(
            f"The dataset {name} has no {train_split!r} split to train on (its splits: {splits}). Pass "
            "`--dataset_train_split NAME` with one of them."
        )
    eval_strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    if eval_strategy == "no":
        return dataset[train_split], None
    test_split = script_args.dataset_test_split
    if test_split not in dataset:
        others = [split for split in splits if split != train_split]
        choice = f" (e.g. `--dataset_test_split {others[0]}`)" if others else ""
        raise ValueError(
            f"The run evaluates (`eval_strategy={eval_strategy!r}`) on the {test_split!r} split, but the dataset "
            f"{name} has no such split (its splits: {splits}). Pass `--dataset_test_split NAME` with one of its "
            f"splits{choice}, "
            "`--eval_strategy no` to train without evaluating, or a dataset with a test split (a folder holding "
            "train.jsonl and test.jsonl; for a `datasets:` mixture, `test_split_size`)."
        )
    return dataset[train_split], dataset[test_split]


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------


def train_and_save(trainer, script_args, training_args) -> None:
    """Trains (resuming if asked), saves the model to `output_dir`, pushes it to the Hub if `push_to_hub` is set, and
    closes the trackers.

    The trainer's progress bar (one line, advanced every step) and its logs every `logging_steps` show on the main
    process, unless `disable_tqdm=True` (then the logs are printed as dicts instead).
    """
    import transformers
    from packaging.version import Version

    if script_args.ignore_bias_buffers:
        import torch

        # DDP workaround for boolean buffers (e.g. attention masks), as in TRL's scripts
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]

    checkpoint = resolve_resume_from_checkpoint(training_args)
    if checkpoint is not None:
        trainer.accelerator.print(f"🔁 Resuming from {checkpoint}.")
    with hide_deprecated_checkpointing_alias_warning():
        trainer.train(resume_from_checkpoint=checkpoint)
    trainer.accelerator.print("✅ Training completed.")

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Finish the trackers and destroy the process group. Every rank first waits for the others: a rank that tears
    # down its gloo group while another still saves or logs can abort the launch at exit (seen in CI as SIGABRT)
    trainer.accelerator.wait_for_everyone()
    release_output_dir(training_args)
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
