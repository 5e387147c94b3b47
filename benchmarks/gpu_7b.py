"""The trainer comparison of `bench_trainers.py` on a CUDA GPU: a 7B-class model with LoRA (and QLoRA when
bitsandbytes is installed) at sequence length 1024, reporting tokens/s and peak GPU memory.

    # a model from the Hub or a local folder
    python benchmarks/gpu_7b.py --model meta-llama/Llama-2-7b-hf
    # no Hub access (e.g. an air-gapped GPU machine): a randomly initialised model of Llama-3-8B's shapes,
    # built once into --work-dir (bf16, ~16 GB on disk); the speed and memory of a step do not depend on the weights
    python benchmarks/gpu_7b.py --model random:llama3-8b
    # check the plan, the arguments, the tokenizer and the data without a GPU and without loading the model
    python benchmarks/gpu_7b.py --model PATH_OR_ID --dry-run
    # without a GPU: Llama-3-8B's shapes cut to 2 layers (vocabulary 128,256, hidden 4,096; 3 GB in bf16), on CPU
    python benchmarks/gpu_7b.py --model random:llama3-8b-2l --allow-cpu --dtype bfloat16 --modes lora \
        --configs dpo tdpo2 tdpo2-cached --seq 64 --pairs 1 --warmup 1 --steps 1 --no-write

Every configuration runs in its own process (LoRA and QLoRA, then each trainer), one after the other, on the same
data: `--pairs` preference pairs per step whose chosen and rejected completions fill exactly `--seq` tokens (prompt
`seq/16`), bf16, gradient checkpointing (the TRL default), LoRA r=16 on every linear layer but the LM head, the
reference being the model with its adapter disabled. After `--warmup` steps, the median of `--steps` steps gives
tokens/s (2 × pairs × seq tokens per step) and `torch.cuda.max_memory_allocated` (reset after the trainer is built)
the peak memory. Ratios are against `DPOTrainer` (sigmoid) in the same mode. The LM-head pass of every step (its
forward, its backward and, for our trainers, their tile loops) is also measured on its own (`phases` in the JSON,
`_memory.PhasePeakMemory`): the peak above the memory once the trainer is built, and the largest rise within the phase.

Configurations: `dpo` (TRL's `DPOTrainer`, its fused LM head at TRL's GPU tiles), `tdpo1`, `tdpo2`, `tdpo2-cached`
(TDPO2 with the reference cache, `precompute_ref_log_probs=True`, precomputed at init), `tdpo2-naive`
(full `[rows, L, V]` logits for both models, as the official TDPO code: expect it to need far more memory, or to run
out of it), `tgdpo-fly` (a guidance model, `--guidance-model`, defaults to a second copy of `--model`), `tgdpo-pre`
(token rewards precomputed first with `scripts/compute_token_rewards.py`), `tbpo-a`, `tbpo-q`.

The results are printed, saved to `benchmarks/results/gpu-<timestamp>.json`, and written into `docs/benchmarks.md`
between the `gpu_7b` markers (with the GPU's name, the CUDA and library versions).

`--allow-cpu` runs the same code path on CPU, where memory is the process's resident set (its rise over the resident set
once the trainer is built is `delta_gb`). The model is loaded in float32 there unless `--dtype bfloat16` (bf16 weights
and bf16 autocast, as on GPU). On CPU the weights are first copied out of the checkpoint's memory map (transformers
otherwise hands out views of the file, which enter the resident set only when the first step reads them), and, in
bf16 on a CPU without AVX-512, the products that PyTorch runs 30-80x slower in bf16 (both operands row-major: a
linear layer's input gradient, the fused pass's hidden-state gradient) are taken in the fast layout instead
(`_cpu_bf16_gemm.py`; `--no-cpu-gemm-patch` to keep them).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

CONFIGS = ("dpo", "tdpo1", "tdpo2", "tdpo2-cached", "tdpo2-naive", "tgdpo-fly", "tgdpo-pre", "tbpo-a", "tbpo-q")
MODES = ("lora", "qlora")
BEGIN, END = "<!-- gpu_7b:begin -->", "<!-- gpu_7b:end -->"
# Shapes of randomly initialised 7B-class models (`--model random:NAME`): no download needed
RANDOM_MODELS = {
    "llama3-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
    },
    # Llama-3-8B cut to 2 decoder layers: every per-layer, embedding and LM-head shape of the real model (the LM head
    # alone is 128,256 x 4,096), 1.49 B parameters, 3.0 GB in bf16: fits a CPU machine (`--allow-cpu`, docs/
    # memory_and_scaling.md, "The 7B path at its real sizes, on CPU")
    "llama3-8b-2l": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
    },
    "llama2-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
}


def _is_random(model: str) -> bool:
    return model.startswith("random:")


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_model(args) -> str:
    """A path or Hub id `from_pretrained` can load. `random:NAME` builds (once) a randomly initialised model of those
    shapes, in bf16, with the offline tiny tokenizer (its vocabulary padded to the model's)."""
    if not _is_random(args.model):
        return args.model
    name = args.model.split(":", 1)[1]
    if name not in RANDOM_MODELS:
        raise SystemExit(f"unknown random model {name!r}; choose one of {sorted(RANDOM_MODELS)}")
    path = Path(args.work_dir) / f"random-{name}"
    if (path / "config.json").exists():
        return str(path)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trl_tokenpref.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        **RANDOM_MODELS[name],
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    print(f"[setup] building a random {name} into {path}", file=sys.stderr, flush=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def plan(args) -> list[tuple[str, str]]:
    modes = [m for m in args.modes if m != "qlora" or bitsandbytes_available()]
    return [(mode, config) for mode in modes for config in args.configs]


def setup(args, model_path: str) -> dict:
    """The dataset (and, for `tgdpo-pre`, its precomputed token rewards), cached under --work-dir."""
    from bench_trainers import make_dataset
    from transformers import AutoTokenizer

    work = Path(args.work_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    num_rows = args.pairs * (args.warmup + args.steps)
    tag = Path(model_path).name if Path(model_path).exists() else model_path.replace("/", "--")
    data = work / f"data-{tag}-L{args.seq}-rows{num_rows}.jsonl"
    if not data.exists():
        make_dataset(data, tokenizer, args.seq, num_rows)
    paths = {"model": model_path, "data": str(data), "guidance": args.guidance_model or model_path}
    if "tgdpo-pre" in args.configs and not args.dry_run:
        out = work / f"rewards-{tag}-L{args.seq}-rows{num_rows}"
        if not (out / "train.jsonl").exists():
            command = [
                sys.executable,
                str(REPO / "scripts" / "compute_token_rewards.py"),
                "--guidance_model",
                paths["guidance"],
                "--ref_model",
                model_path,
                "--dataset_path",
                str(data),
                "--output_dir",
                str(out),
                "--output_format",
                "jsonl",
                "--max_length",
                str(args.seq),
                "--batch_size",
                "1",
                "--dtype",
                "bfloat16",
            ]
            print("[setup] " + " ".join(command), file=sys.stderr, flush=True)
            subprocess.run(command, check=True)
        paths["rewards"] = str(out / "train.jsonl")
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------------------------------


def model_dtype(name: str, on_gpu: bool):
    """The dtype the model is loaded in: `auto` is bf16 on GPU and float32 on CPU (where bf16 matrix products are slow:
    `_cpu_bf16_gemm.py`)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_weights_into_memory(model) -> None:
    """On CPU, copy every parameter out of the checkpoint's memory map into the process's own memory.

    transformers maps a safetensors checkpoint and, when the dtype matches, hands out views of the file: the weights
    then enter the resident set only when a step first reads them (the backbone in the first forward, the LM head in
    its first pass: 2 GB for llama3-8b-2l), and the kernel may drop those pages again under memory pressure. Copied,
    they are resident before the measurement starts, as a GPU run's weights are on the device before its first step.
    Tied parameters stay tied."""
    import torch

    copies = {}
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if param.device.type != "cpu":
                    continue
                key = (param.data_ptr(), param.dtype, tuple(param.shape))
                if key not in copies:
                    copies[key] = param.data.clone()
                param.data = copies[key]


def _status_mb(field: str) -> float | None:
    """A field of /proc/self/status in MB (None where unavailable)."""
    from _memory import _status_kb

    kb = _status_kb(field)
    return None if kb is None else kb / 1024


def instrument_lm_head(memory, config: str) -> None:
    """Measure the LM-head pass of every step as phases of `memory` (`_memory.PhasePeakMemory`): its forward (the
    policy's, with the reference's in the same pass for our trainers; DPO's reference forward is a second call) and its
    backward. DPO: TRL's `ChunkedLogProbFunction`; the token-level trainers: `compute_token_stats` (whatever
    `add_token_stats_head`'s forward calls, e.g. the naive statistics of tdpo2-naive) and `_FusedTokenStats.backward`.
    Both are looked up at call time, so they are replaced here, in this worker process only. For our pass, its tile
    loops (`_forward_chunk`, `_backward_chunk`) are phases of their own too."""
    if config == "dpo":
        import trl.trainer.utils as trl_utils

        function = trl_utils._ChunkedLogProbFunction
        trl_utils._ChunkedLogProbFunction = _PhasedFunction(function, memory)
    else:
        from trl_tokenpref.token_stats import fused, model_forward

        forward = model_forward.compute_token_stats

        def compute_token_stats(*args, **kwargs):
            with memory.phase("lm_head_forward"):
                return forward(*args, **kwargs)

        model_forward.compute_token_stats = compute_token_stats
        # The tile loops alone (phases nested in the pass): what the pass allocates for its tiles, apart from what it
        # allocates before them (e.g. the mean logit's reduction over the head)
        for name, phase in (
            ("_forward_chunk", "lm_head_tiles_forward"),
            ("_backward_chunk", "lm_head_tiles_backward"),
        ):
            setattr(fused, name, _phased(getattr(fused, name), memory, phase))
        function = fused._FusedTokenStats
    backward = function.backward

    def phased_backward(ctx, *grads):
        with memory.phase("lm_head_backward"):
            return backward(ctx, *grads)

    # autograd looks `backward` up on the Function class when the graph runs
    function.backward = staticmethod(phased_backward)


def _phased(function, memory, phase: str):
    def phased(*args, **kwargs):
        with memory.phase(phase):
            return function(*args, **kwargs)

    return phased


class _PhasedFunction:
    """An autograd Function whose `apply` is measured as the phase "lm_head_forward"."""

    def __init__(self, function, memory):
        self.function, self.memory = function, memory

    def apply(self, *args, **kwargs):
        with self.memory.phase("lm_head_forward"):
            return self.function.apply(*args, **kwargs)


def build_trainer(mode: str, config: str, args, paths: dict, output_dir: str):
    import torch
    from bench_trainers import _patch_naive_stats
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    data_file = paths["rewards"] if config == "tgdpo-pre" else paths["data"]
    dataset = load_dataset(
        "json", data_files=data_file, split="train", cache_dir=str(Path(args.work_dir) / "hf-cache")
    )
    on_gpu = torch.cuda.is_available()
    dtype = model_dtype(args.dtype, on_gpu)
    model_init_kwargs = {"dtype": dtype}
    if mode == "qlora":
        from transformers import BitsAndBytesConfig

        model_init_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if on_gpu:
        model_init_kwargs["device_map"] = {"": torch.cuda.current_device()}
    common = {
        "output_dir": output_dir,
        "max_steps": args.warmup + args.steps,
        "per_device_train_batch_size": args.pairs,
        "learning_rate": 1e-6,
        "max_length": args.seq,
        # bf16 autocast with bf16 weights, as on GPU (on CPU too when `--dtype bfloat16`)
        "bf16": dtype == torch.bfloat16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "use_cpu": not on_gpu,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1000,
        "disable_tqdm": True,
        "model_init_kwargs": model_init_kwargs,
        "seed": 0,
    }
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    kwargs = {"model": paths["model"], "train_dataset": dataset, "processing_class": tokenizer}
    kwargs["peft_config"] = peft_config
    if config == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(args=DPOConfig(**common), **kwargs)
    if config.startswith("tdpo"):
        from trl_tokenpref import TDPOConfig, TDPOTrainer

        if config == "tdpo2-naive":
            _patch_naive_stats()
        # tdpo2-cached: the reference cache (its top-k distribution per completion token, precomputed at init)
        cached = config == "tdpo2-cached"
        return TDPOTrainer(args=TDPOConfig(variant=config[:5], precompute_ref_log_probs=cached, **common), **kwargs)
    if config.startswith("tgdpo"):
        from trl_tokenpref.tgdpo import TGDPOConfig, TGDPOTrainer

        if config == "tgdpo-fly":
            # Loaded with the policy's `model_init_kwargs` (so in 4 bits under QLoRA), frozen
            kwargs["guidance_model"] = paths["guidance"]
        return TGDPOTrainer(args=TGDPOConfig(**common), **kwargs)
    if config.startswith("tbpo"):
        from trl_tokenpref.tbpo import TBPOConfig, TBPOTrainer

        return TBPOTrainer(args=TBPOConfig(variant=config.replace("-", "_"), **common), **kwargs)
    raise ValueError(config)


def worker(args) -> dict:
    import tempfile

    import torch
    from _memory import PhasePeakMemory
    from transformers import TrainerCallback

    mode, config = args.worker.split("/")
    paths = json.loads(args.paths)
    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cpu_gemm_patch = not on_gpu and model_dtype(args.dtype, on_gpu) == torch.bfloat16 and args.cpu_gemm_patch
    if cpu_gemm_patch:
        import _cpu_bf16_gemm

        _cpu_bf16_gemm.patch()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(mode, config, args, paths, output_dir)
        if not on_gpu:
            load_weights_into_memory(trainer.model)
        rss_after_build = {field: _status_mb(field) for field in ("VmRSS", "RssAnon", "RssFile")}
        memory = PhasePeakMemory("cuda" if on_gpu else "rss")
        instrument_lm_head(memory, config)

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.times = []

            def on_step_begin(self, *_, **__):
                sync()
                self.start = time.perf_counter()

            def on_step_end(self, *_, **__):
                sync()
                self.times.append(time.perf_counter() - self.start)

        timer = StepTimer()
        trainer.add_callback(timer)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with memory:
            trainer.train()
    times = timer.times[args.warmup :]
    step_s = statistics.median(times)
    result = {
        "mode": mode,
        "config": config,
        "dtype": args.dtype,
        "cpu_gemm_patch": cpu_gemm_patch,
        "step_s": step_s,
        "tokens_per_s": 2 * args.pairs * args.seq / step_s,
        "times": times,
        # GPU: allocated memory (torch.cuda.max_memory_allocated); CPU: the process's resident set. `base`: when the
        # trainer is built (model, adapter, data), `peak`: the highest over all steps, `delta`: peak - base
        "peak_gb": memory.peak_rss_mb / 1024,
        "base_gb": memory.start_rss_mb / 1024,
        "delta_gb": memory.peak_delta_mb / 1024,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
        "rss_after_build_mb": rss_after_build,
        # per phase (_memory.PhasePeakMemory; a nested phase's time counts for it only): peak above `base`, and the
        # largest rise within one segment of the phase over the memory at the segment's start (MB)
        "phases": {
            name: {
                "peak_above_base_mb": record["peak_mb"] - memory.start_rss_mb,
                "rise_mb": record["rise_mb"],
                "segments": record["segments"],
            }
            for name, record in memory.phases.items()
        },
    }
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Runner and report
# ---------------------------------------------------------------------------------------------------------------------


def hardware() -> dict:
    import torch
    import transformers
    import trl

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30
        if torch.cuda.is_available()
        else None,
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        info["bitsandbytes"] = None
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        info["driver"] = None
    return info


def render(meta: dict, results: list[dict]) -> str:
    hw = meta["hardware"]
    lines = [
        BEGIN,
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"- Hardware: {hw['gpu'] or 'CPU (no CUDA GPU: a code-path test, not a measurement)'}"
        + (f" ({hw['gpu_memory_gb']:.0f} GiB), driver {hw['driver']}, CUDA {hw['cuda']}" if hw["gpu"] else "")
        + ".",
        f"- Software: torch {hw['torch']}, transformers {hw['transformers']}, trl {hw['trl']}, "
        f"bitsandbytes {hw['bitsandbytes']}.",
        f"- Model: `{meta['model']}`; LoRA r={meta['lora_r']} on all linear layers (LM head excluded); "
        f"{meta['pairs']} pair(s) × {meta['seq']} tokens per step; {meta['dtype']}; gradient checkpointing "
        f"{'on' if meta['gradient_checkpointing'] else 'off'}; median of {meta['steps']} steps after {meta['warmup']}.",
        "",
        "peak: the highest memory of a step (GPU: allocated; CPU: resident set of the process), Δ: its rise over the "
        "memory once the trainer is built (model, adapter, data).",
        "",
        "| mode | config | s/step | tokens/s | × DPO time | peak GiB | Δ GiB | × DPO memory |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["mode"]: r for r in results if r.get("config") == "dpo" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['config']} | failed: {r['error'][:100]} ||||||")
            continue
        b = base.get(r["mode"])
        time_ratio = f"{r['step_s'] / b['step_s']:.2f}" if b else "–"
        mem_ratio = f"{r['peak_gb'] / b['peak_gb']:.2f}" if b else "–"
        lines.append(
            f"| {r['mode']} | {r['config']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {time_ratio} | "
            f"{r['peak_gb']:.1f} | {r['delta_gb']:.2f} | {mem_ratio} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def write_page(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## GPU: 7B-class model, LoRA / QLoRA\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="path, Hub id, or random:llama3-8b / random:llama2-7b")
    parser.add_argument("--guidance-model", default=None, help="guidance model of tgdpo-* (default: --model)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", help="(TRL default: on)"
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    parser.add_argument("--work-dir", default=str(REPO / "outputs" / "bench-gpu"))
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--no-write", action="store_true", help="print the table only (the JSON is still saved)")
    parser.add_argument("--results-dir", default=str(BENCH_DIR / "results"), help="where the raw JSON goes")
    parser.add_argument("--dry-run", action="store_true", help="check arguments, tokenizer and data; run nothing")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU (memory is then the resident set)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="model dtype (bf16 also turns on bf16 autocast); auto: bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument(
        "--no-cpu-gemm-patch",
        dest="cpu_gemm_patch",
        action="store_false",
        help="on CPU in bf16, keep PyTorch's slow row-major bf16 products (_cpu_bf16_gemm.py)",
    )
    for hidden in ("--worker", "--paths"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import torch

    runs = plan(args)
    skipped_qlora = "qlora" in args.modes and not bitsandbytes_available()
    print(f"model: {args.model}; seq {args.seq}, {args.pairs} pair(s)/step, {args.warmup}+{args.steps} steps")
    print(f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    if skipped_qlora:
        print("QLoRA: skipped (bitsandbytes is not installed)")
    for mode, config in runs:
        print(f"  would run: {mode}/{config}" if args.dry_run else f"  {mode}/{config}")
    if not torch.cuda.is_available() and not (args.dry_run or args.allow_cpu):
        raise SystemExit("No CUDA GPU here. Use --dry-run to check the set-up, or --allow-cpu with a tiny model.")

    if args.dry_run:
        if _is_random(args.model):
            name = args.model.split(":", 1)[1]
            if name not in RANDOM_MODELS:
                raise SystemExit(f"unknown random model {name!r}; choose one of {sorted(RANDOM_MODELS)}")
            print(f"random model {name}: {RANDOM_MODELS[name]} (built on the first real run)")
            return
        paths = setup(args, args.model)  # loads the tokenizer and writes the data: catches a bad path or tokenizer
        print(f"data: {paths['data']}")
        print("dry run: nothing trained")
        return

    model_path = resolve_model(args)
    paths = setup(args, model_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(BENCH_DIR), os.environ.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    results = []
    for mode, config in runs:
        command = [sys.executable, __file__, f"--worker={mode}/{config}", f"--paths={json.dumps(paths)}"]
        command += [f"--seq={args.seq}", f"--pairs={args.pairs}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
        command += [f"--lora-r={args.lora_r}", f"--work-dir={args.work_dir}", f"--model={args.model}"]
        command += [f"--dtype={args.dtype}"]
        if not args.gradient_checkpointing:
            command.append("--no-gradient-checkpointing")
        if not args.cpu_gemm_patch:
            command.append("--no-cpu-gemm-patch")
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode == 0 and lines:
                result = json.loads(lines[-1][len("RESULT ") :])
            else:
                stderr = (proc.stderr or "no output").strip().splitlines()
                out_of_memory = any("OutOfMemoryError" in line or "out of memory" in line for line in stderr)
                error = "out of GPU memory" if out_of_memory else stderr[-1]
                result = {"mode": mode, "config": config, "error": error, "stderr_tail": stderr[-30:]}
        except subprocess.TimeoutExpired:
            result = {"mode": mode, "config": config, "error": f"timeout after {args.timeout} s"}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("times", "stderr_tail")}), flush=True)

    meta = {
        "command": "python benchmarks/gpu_7b.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "hardware": hardware(),
        "model": args.model,
        "lora_r": args.lora_r,
        "dtype": str(model_dtype(args.dtype, torch.cuda.is_available())).removeprefix("torch."),
        "pairs": args.pairs,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "gradient_checkpointing": args.gradient_checkpointing,
        # glibc: with a fixed threshold, freed blocks above it go back to the OS at once (CPU memory = live tensors)
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (results_dir / f"gpu-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    block = render(meta, results)
    print(block)
    if not args.no_write and torch.cuda.is_available():
        write_page(Path(args.out), block)


if __name__ == "__main__":
    main()
