"""Does the run have the processes and the sharding its launcher asked for?

accelerate (1.16) falls back without a word in three cases that the trainers detect at init (docs/memory_and_scaling.md,
"Several processes on CPU" and "FSDP2 through accelerate"):

* **Several processes that are not one run.** torchrun, or `accelerate launch` with several processes, exports
  `WORLD_SIZE` to each process. accelerate joins them into one distributed run only on an accelerator it detects, or
  with `use_cpu=True` (gloo); otherwise (`--use_cpu false` on a machine without GPU, or a GPU that torch cannot see)
  `PartialState` ignores the launcher's variables and each process is a run of its own: each trains the whole model on
  the whole dataset and writes the same `output_dir`. [`check_processes`] refuses such a run.
* **One process where several were asked for.** `accelerate launch --cpu --num_processes 2` (or `--num_processes 2`
  without `--multi_gpu` on a machine without GPU) goes to accelerate's single-process launcher, which starts ONE
  process and ignores the count; it only exports `MASTER_ADDR`/`MASTER_PORT`, which it does only when asked for several
  processes. [`check_processes`] warns.
* **FSDP or DeepSpeed asked for, not enabled.** The launcher exports `ACCELERATE_USE_FSDP=true` (or
  `ACCELERATE_USE_DEEPSPEED=true`) from the accelerate config, but accelerate enables FSDP only on an accelerator: with
  `use_cpu=True` (TRL's `fsdp2.yaml` with our tiny recipes) the run is plain data parallelism, every process holding
  the whole model. [`check_sharding`] warns, naming what the run is.
"""

import os

from accelerate.logging import get_logger
from accelerate.utils import DistributedType


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


def check_processes(args, environ=None) -> None:
    """Refuse processes that a launcher started together but that did not join one distributed run, and warn when
    `accelerate launch` was asked for several processes but started one.

    Args:
        args ([`~transformers.TrainingArguments`]): the run's arguments; `args.world_size` is the number of processes
            accelerate sees.
        environ (`Mapping`, *optional*): the environment (`os.environ` by default).

    Raises:
        ValueError: the launcher started `WORLD_SIZE` > 1 processes, and accelerate sees one process in each.
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


def check_sharding(accelerator, args, environ=None) -> None:
    """Warn when the launcher asked for FSDP or DeepSpeed (`ACCELERATE_USE_FSDP` / `ACCELERATE_USE_DEEPSPEED`, exported
    by `accelerate launch` from the config's `distributed_type`) and the trainer's accelerator did not enable it.

    Args:
        accelerator ([`~accelerate.Accelerator`]): the trainer's accelerator.
        args ([`~transformers.TrainingArguments`]): the run's arguments.
        environ (`Mapping`, *optional*): the environment (`os.environ` by default).
    """
    environ = os.environ if environ is None else environ
    distributed_type = accelerator.distributed_type
    what_it_is = (
        f"{distributed_type.value} with {accelerator.num_processes} process(es), each holding the whole model, its "
        "gradients and its optimizer states (no sharding)"
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
