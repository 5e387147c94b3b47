"""Worker of tests/test_fsdp2.py, one process per rank under `torchrun --nproc_per_node 2` on CPU (gloo).

For each trainer case it builds the trainer (float64 models), collates fixed batches, and computes the loss and the
gradients with the trainer's own `compute_loss`:

1. unsharded, on every rank: on the full batch (the expected values), and on this rank's half of it (the control:
   what a rank would hold if its gradients were not averaged with the other rank's);
2. sharded with FSDP2 as a run through accelerate's FSDP2 plugin shards: the policy by accelerate's
   `fsdp2_prepare_model` (what `Accelerator.prepare` runs in `train`), the reference and the TGDPO guidance model by
   TRL's `prepare_fsdp` (what DPOTrainer's and the guidance model's loading run), both called with the trainer's own
   accelerator. Accelerate does not enable FSDP on CPU (with `use_cpu` it runs DDP), so the accelerator is lent the
   FSDP2 plugin for these calls. `fully_shard` converts the modules in place, so `trainer.model` is the sharded
   policy: `compute_loss(trainer.model, batch)` is the call `training_step` makes. Then once with the full batch on
   both ranks, and once with each rank's half.

It writes, per rank, what the test checks to `OUTPUT_DIR/rank{rank}.json`, with, for the reference-cache case, the
cache columns the two ranks' precompute gave.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from datasets import load_from_disk
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.models import prepare_fsdp

from trl_tokenpref import TBPOConfig, TBPOTrainer, TDPOConfig, TDPOTrainer, TGDPOConfig, TGDPOTrainer
from trl_tokenpref.precompute import REF_CACHE_COLUMNS


NUM_PAIRS = 4  # the full batch; each of the 2 ranks takes half of it

CASES = {
    "tdpo2": (TDPOTrainer, TDPOConfig, {"variant": "tdpo2", "alpha": 0.5}),
    "tbpo_a": (TBPOTrainer, TBPOConfig, {"variant": "tbpo_a"}),
    "tbpo_q": (TBPOTrainer, TBPOConfig, {"variant": "tbpo_q", "baseline_hidden_size": 16}),
    "tgdpo": (TGDPOTrainer, TGDPOConfig, {"alpha": 0.5}),
    # The policy's LM head hand-wrapped as its own FSDP unit (not accelerate's layout): the fused pass reads its weight
    # without calling its forward, so FSDP never gathers it nor reduces its gradient; the pass must average it
    "tdpo2_head_unit": (TDPOTrainer, TDPOConfig, {"variant": "tdpo2", "alpha": 0.5}),
    # Padding-free: the sharded policy and reference run on one packed row, attention per sequence
    "tdpo2_packed": (TDPOTrainer, TDPOConfig, {"variant": "tdpo2", "alpha": 0.5, "padding_free": True}),
    # The reference cache: the reference ran once at init; the step runs the (sharded) policy only
    "tdpo2_cached": (
        TDPOTrainer,
        TDPOConfig,
        {"variant": "tdpo2", "alpha": 0.5, "precompute_ref_log_probs": True, "ref_top_k": 8},
    ),
}


def build_trainer(case: str, paths: argparse.Namespace):
    trainer_class, config_class, config = CASES[case]
    args = config_class(
        output_dir=str(Path(paths.output_dir) / case),
        report_to="none",
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **config,
    )
    # An explicit reference: the policy was moved away from it, so that ρ_t, the KL and its gradient are not 0
    extra = {"guidance_model": paths.guidance} if trainer_class is TGDPOTrainer else {}
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(paths.policy, dtype=torch.float64),
        ref_model=AutoModelForCausalLM.from_pretrained(paths.reference, dtype=torch.float64),
        args=args,
        train_dataset=load_from_disk(paths.dataset),
        processing_class=AutoTokenizer.from_pretrained(paths.reference),
        **extra,
    )
    if getattr(trainer, "baseline_head", None) is not None:
        # The head's output layer starts at zero (log w = 0, and no gradient for its hidden layer): move it, so that
        # the baselines weigh the tokens and every parameter of the head gets a gradient
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in trainer.baseline_head.parameters():
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)
    trainer.model.train()  # as in `train`: compute_loss logs to the "train" metrics
    return trainer


def trained_modules(trainer) -> dict[str, torch.nn.Module]:
    modules = {"policy": trainer.model}
    if getattr(trainer, "baseline_head", None) is not None:
        modules["baseline_head"] = trainer.baseline_head
    return modules


def frozen_models(trainer) -> dict[str, torch.nn.Module]:
    models = {"reference": trainer.ref_model}
    if getattr(trainer, "guidance_model", None) is not None:
        models["guidance"] = trainer.guidance_model
    return models


def loss_and_grads(trainer, batch) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """The loss of `batch`, the full gradient of every trained parameter (policy, TBPO-Q head), the logged metrics."""
    modules = trained_modules(trainer)
    for module in modules.values():
        module.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            assert param.grad is not None, f"{prefix}.{name} got no gradient"
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[f"{prefix}.{name}"] = grad.detach().clone()
        module.zero_grad(set_to_none=True)
    # `num_tokens` is a running count over the calls, not a value of this batch
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if key != "num_tokens"}
    return loss.item(), grads, metrics


def shard(trainer, case: str) -> dict[str, dict]:
    """Shard the policy, the reference and the guidance model as an FSDP2 run through accelerate does (the
    `tdpo2_head_unit` case: the policy by hand, each decoder layer, the LM head alone, then the root); return, per
    model, its FSDP units and how its parameters ended up."""
    environ = dict(os.environ)  # the plugin exports its options as FSDP_* variables: keep them to this call
    # TRL's accelerate_configs/fsdp2.yaml, without bf16 (float64 keeps the comparison's tolerance derived)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=True,
        state_dict_type="FULL_STATE_DICT",
    )
    state = trainer.accelerator.state
    previous_plugin, state.fsdp_plugin = getattr(state, "fsdp_plugin", None), plugin
    try:
        if case == "tdpo2_head_unit":
            for layer in trainer.model.model.layers:
                fully_shard(layer)
            fully_shard(trainer.model.lm_head)
            policy = fully_shard(trainer.model)
        else:
            policy = fsdp2_prepare_model(trainer.accelerator, trainer.model)
        reference = prepare_fsdp(trainer.ref_model, trainer.accelerator)
        guidance = getattr(trainer, "guidance_model", None)
        if guidance is not None:
            assert prepare_fsdp(guidance, trainer.accelerator) is guidance
    finally:
        state.fsdp_plugin = previous_plugin
        os.environ.clear()
        os.environ.update(environ)
    # Sharded in place: the trainer holds the sharded modules, nothing to replace
    assert policy is trainer.model and reference is trainer.ref_model
    report = {}
    for name, model in {"policy": trainer.model, **frozen_models(trainer)}.items():
        head = model.get_output_embeddings().weight
        report[name] = {
            "fsdp_units": [
                module_name for module_name, module in model.named_modules() if isinstance(module, FSDPModule)
            ],
            "plain_params": [param_name for param_name, p in model.named_parameters() if not isinstance(p, DTensor)],
            "lm_head_local_rows": head.to_local().shape[0] if isinstance(head, DTensor) else head.shape[0],
            "lm_head_rows": head.shape[0],
        }
    return report


def relative_gaps(grads: dict, expected: dict) -> dict[str, float]:
    """‖g − g_expected‖ / ‖g_expected‖ per parameter."""
    return {name: ((grads[name] - grad).norm() / grad.norm()).item() for name, grad in expected.items()}


def run_case(case: str, paths: argparse.Namespace) -> dict:
    trainer = build_trainer(case, paths)  # its accelerator starts the process group (gloo)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = [trainer.train_dataset[i] for i in range(NUM_PAIRS)]
    half = NUM_PAIRS // world_size
    full_batch = trainer._prepare_inputs(trainer.data_collator(rows))
    half_batch = trainer._prepare_inputs(trainer.data_collator(rows[rank * half : (rank + 1) * half]))

    loss, grads, metrics = loss_and_grads(trainer, full_batch)
    _, half_grads, _ = loss_and_grads(trainer, half_batch)
    report = {"sharding": shard(trainer, case)}
    if case == "tdpo2_cached":
        # The cache as this rank holds it after the precompute that both ranks ran together (each scored part of the
        # rows, then gathered): the test compares it with a one-process precompute
        report["reference_cache"] = {column: list(trainer.train_dataset[column]) for column in REF_CACHE_COLUMNS}
    same_loss, same_grads, same_metrics = loss_and_grads(trainer, full_batch)
    split_loss, split_grads, split_metrics = loss_and_grads(trainer, half_batch)

    # Every loss is a mean over pairs, so the mean of the two halves' losses is the full batch's
    split_loss = trainer.accelerator.reduce(torch.tensor(split_loss, dtype=torch.float64), reduction="mean").item()
    # The TBPO-Q head is outside FSDP: the trainer averages its gradients across processes before the head's own
    # optimizer step (`_baseline_optimizer_step`, with this same call)
    for name in split_grads:
        if name.startswith("baseline_head."):
            split_grads[name] = trainer.accelerator.reduce(split_grads[name], reduction="mean")
    report.update(
        loss=loss,
        loss_same_batch=same_loss,
        loss_split=split_loss,
        grad_norms={name: grad.norm().item() for name, grad in grads.items()},
        grad_gaps_same_batch=relative_gaps(same_grads, grads),
        grad_gaps_split=relative_gaps(split_grads, grads),
        grad_gaps_unreduced=relative_gaps(half_grads, grads),
        metrics=metrics,
        metrics_same_batch=same_metrics,
        metrics_split=split_metrics,
        frozen_params_with_grad=[
            f"{model_name}.{name}"
            for model_name, model in frozen_models(trainer).items()
            for name, param in model.named_parameters()
            if param.grad is not None
        ],
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("policy", "reference", "guidance", "dataset", "output_dir"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    paths = parser.parse_args()
    torch.set_num_threads(1)  # as the single-process tests (conftest.py): the two ranks share the cores
    results = {case: run_case(case, paths) for case in paths.cases}
    Path(paths.output_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
