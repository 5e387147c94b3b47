"""What the training scripts in `scripts/` share: model loading arguments, dataset loading, resuming, saving.

`scripts/run_tdpo.py`, `scripts/run_tgdpo.py` and `scripts/run_tbpo.py` have the shape of TRL's `trl/scripts/dpo.py`
(`TrlParser` over `ScriptArguments`, the method's config, `ModelConfig` and `DatasetMixtureConfig`) and differ only by
the trainer they build. The steps around the trainer live here, once:

* [`set_model_init_kwargs`]: `ModelConfig` (dtype, attention, revision) into `training_args.model_init_kwargs`, as TRL's
  script does, since the trainers load the model from its path;
* [`load_preference_dataset`]: a `datasets:` mixture, a Hub dataset name, or local files (a `.json`/`.jsonl`/
  `.parquet`/`.csv` file, a directory of such files, or a directory written by `Dataset.save_to_disk`);
* [`resolve_resume_from_checkpoint`]: `--resume_from_checkpoint PATH`, or `true`/`last` for the last checkpoint in
  `output_dir`;
* [`train_and_save`]: train, save, push to the Hub if asked, and close the trackers.
"""

import os
from pathlib import Path


# Builder of `datasets.load_dataset` for each local file extension.
LOCAL_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


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
    from accelerate.logging import get_logger
    from datasets import DatasetDict, load_dataset, load_from_disk
    from trl import get_dataset

    logger = get_logger(__name__)

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning(
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
    if path.suffix.lower() in LOCAL_FILE_BUILDERS and not path.exists():
        # Otherwise `load_dataset` would look the path up on the Hub and fail with an unrelated message
        raise FileNotFoundError(f"The dataset file {path} does not exist.")
    if path.is_file():
        builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot load the local file {path}: expected one of the extensions {sorted(LOCAL_FILE_BUILDERS)}."
            )
        # A single file is one split: the one the trainer reads.
        data_files = {script_args.dataset_train_split: str(path)}
        return load_dataset(builder, data_files=data_files, streaming=streaming)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return load_from_disk(str(path))
    if path.is_dir() and (path / "state.json").is_file():  # a single `Dataset.save_to_disk`
        return DatasetDict({script_args.dataset_train_split: load_from_disk(str(path))})
    # A Hub name, or a local directory of data files, whose builder and splits `datasets` infers from the file names
    return load_dataset(script_args.dataset_name, name=script_args.dataset_config, streaming=streaming)


def resolve_resume_from_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint` as a path, or `true`/`last` for the last checkpoint
    in `output_dir` (an error if there is none: silently restarting from scratch would waste a run)."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "last"):
        output_dir = training_args.output_dir
        checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if checkpoint is None:
            raise ValueError(
                f"`resume_from_checkpoint={value}` asks for the last checkpoint in `output_dir`, but {output_dir!r} "
                "holds no `checkpoint-*` folder. Pass a checkpoint path, or drop `resume_from_checkpoint` to start "
                "from scratch."
            )
        return checkpoint
    return str(value)


def train_and_save(trainer, script_args, training_args) -> None:
    """Trains (resuming if asked), saves the model to `output_dir`, pushes it to the Hub if `push_to_hub` is set, and
    closes the trackers, printing one progress line per step on the main process."""
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
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()
