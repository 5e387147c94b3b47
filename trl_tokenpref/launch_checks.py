"""Does the run have the processes and the sharding its launcher asked for?

accelerate (1.16) falls back without a word in three cases that the trainers detect at init (docs/memory_and_scaling.md,
"Several processes on CPU" and "FSDP2 through accelerate"):

* **Several processes that are not one run.** torchrun, or `accelerate launch` with several processes, exports
  `WORLD_SIZE` to each process. accelerate joins them into one distributed run only on an accelerator it detects, or
  with `use_cpu=True` (gloo); otherwise (`--use_cpu false` on a machine without GPU, or a GPU that torch cannot see)
  `PartialState` ignores the launcher's variables and each process is a run of its own: each trains the whole model on
  the whole dataset and writes the same `output_dir`. [`check_launch`] refuses such a run.
* **One process where several were asked for.** `accelerate launch --cpu --num_processes 2` (or `--num_processes 2`
  without `--multi_gpu` on a machine without GPU) goes to accelerate's single-process launcher, which starts ONE
  process and ignores the count; it only exports `MASTER_ADDR`/`MASTER_PORT`, which it does only when asked for several
  processes. [`check_launch`] warns.
* **FSDP or DeepSpeed asked for, not enabled.** The launcher exports `ACCELERATE_USE_FSDP=true` (or
  `ACCELERATE_USE_DEEPSPEED=true`) from the accelerate config, but accelerate enables FSDP only on an accelerator: with
  `use_cpu=True` (TRL's `fsdp2.yaml` with our tiny recipes) the run is plain data parallelism, every process holding
  the whole model. [`check_accelerator`] warns, naming what the run is.

And one mismatch that transformers refuses only when `train` starts, after the models are loaded and the reference
cache is precomputed: DeepSpeed's `bf16.enabled` (set by the accelerate config's `mixed_precision: bf16`, as in TRL's
zero3.yaml) against the training arguments' `bf16` (false in our CPU recipes). [`check_launch`] refuses it at init,
with the two ways to make them agree.
"""

import os

from accelerate.utils import DistributedType

from ._logging import get_logger


logger = get_logger(__name__)

_SEVERAL_CPU_PROCESSES = (
    "`accelerate launch --multi_gpu --num_processes N ...` (it runs on CPU too, with gloo) or `torchrun "
    "--nproc_per_node N ...`, with `use_cpu: true`"
)


def _launched_world_size(environ) -> int:
    try:
        return int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_launch(args, environ=None) -> None:
    """Before the trainer loads or precomputes anything: refuse processes that a launcher started together but that did
    not join one distributed run, warn when `accelerate launch` was asked for several processes but started one, and
    refuse a DeepSpeed precision that disagrees with the training arguments ([`check_deepspeed_precision`]).

    Args:
        args ([`~transformers.TrainingArguments`]): the run's arguments; `args.world_size` is the number of processes
            accelerate sees.
        environ (`Mapping`, *optional*): the environment (`os.environ` by default).

    Raises:
        ValueError: the launcher started `WORLD_SIZE` > 1 processes, and accelerate sees one process in each; or
            DeepSpeed's bf16/fp16 setting disagrees with the training arguments'.
    """
    environ = os.environ if environ is None else environ
    launched, joined = _launched_world_size(environ), args.world_size
    if launched > 1 and joined < launched:
        raise ValueError(
            f"{launched} processes were started together (WORLD_SIZE={launched}, set by torchrun or `accelerate "
            f"launch`), but accelerate sees {joined} process(es) in this one: they are not one distributed run. Each "
            f"would train the whole model on the whole dataset by itself and write to the same output_dir "
            f"({args.output_dir}). accelerate joins processes only on an accelerator it detects (CUDA, XPU, ...) or, "
            f"without one, with `use_cpu=True` (`use_cpu={args.use_cpu}` here). On a machine without GPU set "
            f"`use_cpu: true` (or drop `--use_cpu false`); on a GPU machine check that torch sees the GPUs "
            f"(`python -c 'import torch; print(torch.cuda.device_count())'`, CUDA_VISIBLE_DEVICES)."
        )
    # The single-process launcher of `accelerate launch` sets ACCELERATE_USE_CPU, and MASTER_ADDR only when it was asked
    # for several processes (or machines); torchrun and accelerate's multi-process launchers set WORLD_SIZE instead
    simple_launcher = "ACCELERATE_USE_CPU" in environ and "WORLD_SIZE" not in environ
    if simple_launcher and "MASTER_ADDR" in environ and joined == 1:
        logger.warning(
            "This run has ONE process, although `accelerate launch` was asked for several: with `--cpu`, or without "
            "`--multi_gpu` on a machine without GPU, its single-process launcher ignores `--num_processes` (it only "
            "exported MASTER_ADDR/MASTER_PORT, as it does for several processes). For several processes on CPU use "
            f"{_SEVERAL_CPU_PROCESSES}. If one process is what you want, drop `--num_processes`."
        )
    check_deepspeed_precision(args)


def check_deepspeed_precision(args) -> None:
    """Refuse, before anything is loaded or precomputed, the DeepSpeed precision that transformers refuses only when
    `train` starts: DeepSpeed's `bf16.enabled` / `fp16.enabled` against `bf16` / `fp16` of the training arguments.

    `TrainingArguments` builds `args.deepspeed_plugin` from the launcher's environment, with the precision of the
    accelerate config's `mixed_precision` unless `bf16`/`fp16` is set; transformers'
    `HfTrainerDeepSpeedConfig.trainer_config_process` then compares the same values as here (an "auto" value is filled
    from the arguments and always agrees).
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None:
        return
    for name, wanted in (("bf16", args.bf16 or args.bf16_full_eval), ("fp16", args.fp16 or args.fp16_full_eval)):
        enabled = plugin.deepspeed_config.get(name, {}).get("enabled", False)
        if isinstance(enabled, bool) and enabled != bool(wanted):
            raise ValueError(
                f"DeepSpeed's config has `{name}.enabled={enabled}` (from the accelerate config's `mixed_precision`, "
                f"or `--mixed_precision`), but the training arguments have `{name}={bool(wanted)}`: transformers would "
                f"stop when training starts (`ds {name}.enabled={enabled} vs hf {name}|{name}_full_eval="
                f"{bool(wanted)}`). Make them agree: to train in float32 (as the CPU `tiny` recipes do), launch with "
                f"`accelerate launch ... --mixed_precision no`; to train in {name}, set `{name}: true` "
                f"(`--{name} true`) and keep the config's `mixed_precision: {name}`."
            )


def check_accelerator(accelerator, args, environ=None) -> None:
    """Warn when the launcher asked for FSDP or DeepSpeed (`ACCELERATE_USE_FSDP` / `ACCELERATE_USE_DEEPSPEED`, exported
    by `accelerate launch` from the config's `distributed_type`) and the trainer's accelerator did not enable it.

    Args:
        accelerator ([`~accelerate.Accelerator`]): the trainer's accelerator.
        args ([`~transformers.TrainingArguments`]): the run's arguments.
        environ (`Mapping`, *optional*): the environment (`os.environ` by default).
    """
    environ = os.environ if environ is None else environ
    distributed_type = accelerator.distributed_type
    processes = accelerator.num_processes
    kind = f"plain data parallelism over {processes} processes" if processes > 1 else "a single process"
    what_it_is = (
        f"{kind} (accelerate's {distributed_type.value}), each process holding the whole model, its gradients and "
        "its optimizer states"
    )
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and distributed_type != DistributedType.FSDP:
        if args.use_cpu:
            cause = (
                "accelerate enables FSDP only on an accelerator (CUDA, XPU, ...); with `use_cpu=True` it runs plain "
                "data parallelism. On GPUs, drop `use_cpu: true`. On CPU, accelerate cannot run FSDP at all: the run "
                "is correct, only without FSDP's memory savings"
            )
        else:
            cause = (
                "accelerate enables FSDP only on an accelerator it detects (CUDA, XPU, ...): check that torch sees "
                "the GPUs (`torch.cuda.device_count()`, CUDA_VISIBLE_DEVICES)"
            )
        logger.warning(
            f"The accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true), but this run is {what_it_is}: {cause}."
        )
    if (
        environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        and distributed_type != DistributedType.DEEPSPEED
    ):
        logger.warning(
            f"The accelerate config asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), but this run is {what_it_is}: "
            "accelerate did not enable DeepSpeed (an Accelerator or AcceleratorState built with `cpu=True` before the "
            "trainer does that). Let the trainer build its own accelerator under `accelerate launch`."
        )
