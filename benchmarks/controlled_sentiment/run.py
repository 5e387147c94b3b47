"""
The TDPO paper's controlled-sentiment experiment (§5.1, Fig. 3), offline and at CPU scale, end to end.

    python -m benchmarks.controlled_sentiment.run --output-dir outputs/controlled_sentiment

Stages (each timed): a BPE tokenizer and a small Llama built from scratch; SFT on synthetic reviews of mixed
sentiment; preference pairs sampled from the SFT model and labelled by the programmatic sentiment reward; DPO, TDPO1,
TDPO2 (α ∈ {0.5, 1, 2}), TGDPO (guided by the DPO model), TBPO-A and TBPO-Q, each at several β, evaluated every few
steps on held-out prompts; then the report: `docs/reproduction.md` with the reward-KL frontier, the chosen/rejected
sequential-KL curves and the results table. Everything intermediate (models, data, `results.json`) goes to
`--output-dir`.

`--quick` runs the same pipeline with tiny sizes and a handful of steps (the smoke test), and writes its report into
the output directory instead of `docs/`.
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DOC = REPO_ROOT / "docs" / "reproduction.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.controlled_sentiment.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output-dir", default="outputs/controlled_sentiment", help="Where models, data and results go."
    )
    parser.add_argument(
        "--doc",
        default=None,
        help="Report path (default: docs/reproduction.md; with --quick, OUTPUT_DIR/reproduction.md).",
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and a handful of steps: a smoke test.")
    parser.add_argument("--seed", type=int, default=None, help="Run the whole pipeline for this one seed only.")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="Seeds of the whole pipeline (SFT, pairs, every run), each in OUTPUT_DIR/seed<N> (default: 0 1 2).",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="Subset of methods (default: all).")
    parser.add_argument("--betas", nargs="+", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--stabiliser-betas", nargs="+", type=float, default=None, help="β of the stabilised TBPO runs."
    )
    parser.add_argument("--tbpo-floor", type=float, default=None, help="log_ratio_floor of the *_floor TBPO runs.")
    for variant in ("a", "q"):
        parser.add_argument(
            f"--tbpo-{variant}-floor-contrast",
            type=float,
            default=None,
            metavar="NATS",
            help=f"Instead of --tbpo-floor, the tbpo_{variant}_floor runs use log_ratio_floor = -NATS x beta (a bound of "
            "NATS on each token's log-ratio contrast).",
        )
    parser.add_argument(
        "--tbpo-stable-lambda", type=float, default=None, help="SBA generator λ of the *_lam TBPO runs."
    )
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="Preference runs in parallel (processes).")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="torch threads of each run.")
    parser.add_argument(
        "--main-threads",
        type=int,
        default=None,
        help="torch threads for SFT and pair sampling (default: workers x threads-per-worker). 1 is faster on a "
        "machine that other jobs load.",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="Reuse the SFT model and pairs in OUTPUT_DIR when their settings match."
    )
    parser.add_argument(
        "--replicates",
        nargs="+",
        default=None,
        help="Output directories of runs with other seeds, whose claim verdicts the report adds.",
    )
    parser.add_argument(
        "--scale-note",
        default=None,
        help="A sentence the report prints next to the wall time (e.g. why this run is smaller than the default).",
    )
    parser.add_argument(
        "--note",
        action="append",
        default=None,
        help="A paragraph the report prints under its summary table (repeatable), e.g. a pointer to a follow-up run. "
        "With --report-only it is added to results.json, so later reports keep it.",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Rewrite the report from OUTPUT_DIR/results.json without running anything (the recorded command is kept).",
    )
    return parser.parse_args(argv)


def _config_from_args(args: argparse.Namespace):
    from .pipeline import ExperimentConfig, quick_config

    config = quick_config() if args.quick else ExperimentConfig()
    overrides = {
        "seeds": (args.seed,) if args.seed is not None else (tuple(args.seeds) if args.seeds else None),
        "stabiliser_betas": tuple(args.stabiliser_betas) if args.stabiliser_betas else None,
        "tbpo_floor": args.tbpo_floor,
        "tbpo_a_floor_contrast": args.tbpo_a_floor_contrast,
        "tbpo_q_floor_contrast": args.tbpo_q_floor_contrast,
        "tbpo_stable_lambda": args.tbpo_stable_lambda,
        "methods": tuple(args.methods) if args.methods else None,
        "betas": tuple(args.betas) if args.betas else None,
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "eval_every": args.eval_every,
        "sft_steps": args.sft_steps,
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
        "main_threads": args.main_threads,
    }
    config = replace(config, **{key: value for key, value in overrides.items() if value is not None})
    config = replace(config, seed=config.seeds[0])
    if args.scale_note:
        config = replace(config, extra={**config.extra, "scale_note": args.scale_note})
    if config.guidance_beta not in config.betas:
        config = replace(config, guidance_beta=config.betas[len(config.betas) // 2])
    if config.curves_beta not in config.betas:
        config = replace(config, curves_beta=config.betas[len(config.betas) // 2])
    return config


# Settings that determine the SFT model and the pairs: `--reuse` only reuses them when these match
_DATA_KEYS = (
    "seed",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "sft_reviews",
    "sft_steps",
    "sft_batch_size",
    "sft_learning_rate",
    "pair_prompt_draws",
    "samples_per_prompt",
    "max_new_tokens",
    "num_held_out_prompts",
    "num_eval_pairs",
    "main_threads",
)


def _run_safely(spec) -> dict:
    """`train_method`, with a failure recorded instead of raised: one broken method must not lose the others."""
    from .pipeline import train_method

    start = time.perf_counter()
    try:
        return train_method(spec)
    except Exception as error:  # noqa: BLE001 - reported in the results and the doc
        return {
            "method": spec.method,
            "beta": spec.beta,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
            "wall_time_s": time.perf_counter() - start,
        }


def _quiet() -> None:
    """No progress bars nor deprecation warnings from the libraries: the run prints its own progress."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _worker_init(threads: int) -> None:
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    _quiet()


def prepare_data(config, output_dir: Path, reuse: bool, timings: dict) -> dict:
    """Stages 1-3: tokenizer and model, SFT, preference pairs. Returns the paths and data statistics."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .pipeline import (
        build_model,
        build_tokenizer,
        held_out_prompts,
        sample_preference_pairs,
        sft_corpus,
        train_sft,
    )

    sft_dir, data_dir = output_dir / "sft", output_dir / "data"
    manifest_path = output_dir / "data_manifest.json"
    data_settings = {key: getattr(config, key) for key in _DATA_KEYS}
    if reuse and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == data_settings and sft_dir.exists() and data_dir.exists():
            print(f"Reusing the SFT model and pairs of {output_dir}")
            timings.update(manifest["timings"])
            timings["reused_sft_and_data"] = True
            return manifest

    train_prompts, held_out = held_out_prompts(config)
    start = time.perf_counter()
    tokenizer = build_tokenizer(config.vocab_size)
    model = build_model(config, tokenizer)
    timings["build_tokenizer_and_model_s"] = time.perf_counter() - start
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"[1/5] tokenizer ({len(tokenizer)} tokens) and Llama ({num_parameters:,} parameters) built")

    start = time.perf_counter()
    sft_history = train_sft(model, tokenizer, sft_corpus(config, train_prompts), config)
    model.save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    timings["sft_s"] = time.perf_counter() - start
    print(f"[2/5] SFT: {config.sft_steps} steps, final loss {sft_history[-1]['loss']:.3f} ({timings['sft_s']:.0f} s)")

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    train_rows, pair_stats = sample_preference_pairs(
        model,
        tokenizer,
        train_prompts,
        config.pair_prompt_draws,
        config.samples_per_prompt,
        config.max_new_tokens,
        seed=config.seed + 2,
    )
    # Held-out pairs for the chosen/rejected sequential-KL curves: held-out prompts, never trained on
    eval_rows, _ = sample_preference_pairs(
        model,
        tokenizer,
        held_out,
        2 * config.num_eval_pairs,  # twice as many draws as pairs needed: some are ties and are dropped
        2,
        config.max_new_tokens,
        seed=config.seed + 3,
    )
    eval_rows = eval_rows[: config.num_eval_pairs]
    if not train_rows or not eval_rows:
        raise RuntimeError(
            f"The SFT model gave {len(train_rows)} train and {len(eval_rows)} held-out pairs: its completions carry no "
            "sentiment (every reward ties). Train it longer (--sft-steps)."
        )
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(train_rows),
            "eval_pairs": datasets.Dataset.from_list(eval_rows),
            "held_out_prompts": datasets.Dataset.from_dict({"prompt": held_out}),
        }
    )
    data.save_to_disk(str(data_dir))
    timings["preference_pairs_s"] = time.perf_counter() - start
    print(
        f"[3/5] {len(train_rows)} train pairs (chosen reward {pair_stats['chosen_reward_mean']:.3f}, rejected "
        f"{pair_stats['rejected_reward_mean']:.3f}), {len(eval_rows)} held-out pairs ({timings['preference_pairs_s']:.0f} s)"
    )
    manifest = {
        "settings": data_settings,
        "sft_path": str(sft_dir),
        "data_dir": str(data_dir),
        "num_parameters": num_parameters,
        "vocab_size": len(tokenizer),
        "sft_history": sft_history,
        "pair_stats": pair_stats,
        "num_eval_pairs": len(eval_rows),
        "examples": train_rows[:3],
        "timings": dict(timings),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def _seed_config(config, seed: int):
    return replace(config, seed=seed)


def _seed_dir(output_dir: Path, config) -> Path:
    """One seed keeps the single-run layout (OUTPUT_DIR itself); several get OUTPUT_DIR/seed<N> each."""
    return output_dir if len(config.seeds) == 1 else output_dir / f"seed{config.seed}"


def prepare_seed(config, seed_dir: Path, reuse: bool) -> tuple[dict, dict, dict]:
    """Stages 1-3 and the step-0 evaluation of one seed: `(manifest, sft_eval, timings)`. Runs in a worker when the
    seeds are prepared in parallel."""
    from .pipeline import evaluate_sft

    seed_dir.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    manifest = prepare_data(config, seed_dir, reuse, timings)
    start = time.perf_counter()
    sft_eval = evaluate_sft(manifest["sft_path"], manifest["data_dir"], config)
    timings["sft_eval_s"] = time.perf_counter() - start
    print(
        f"[4/5] seed {config.seed}: SFT model on held-out prompts: reward {sft_eval['reward']:.3f}, entropy "
        f"{sft_eval['entropy']:.3f}"
    )
    return manifest, sft_eval, timings


def _worker_prepare(config, seed_dir: Path, reuse: bool):
    import torch

    torch.set_num_threads(config.threads_per_worker)
    return prepare_seed(config, seed_dir, reuse)


def _seed_specs(config, seed: int, manifest: dict, output_dir: Path) -> tuple[list, list[dict]]:
    """The preference runs of one seed, every (method, β) in the config, and the methods skipped (not importable, or
    TGDPO without a DPO guide)."""
    from .pipeline import RunSpec, method_available, method_betas

    seed_config = _seed_config(config, seed)
    seed_dir = _seed_dir(output_dir, seed_config)
    config_dict = asdict(seed_config)
    guidance_dir = seed_dir / "runs" / f"dpo_beta{config.guidance_beta}"
    specs, skipped = [], []
    for method in config.methods:
        available, reason = method_available(method)
        if not available:
            skipped.append({"method": method, "error": f"not importable: {reason}", "skipped": True})
            print(f"      skipping {method}: {reason}")
            continue
        for beta in method_betas(method, config):
            specs.append(
                RunSpec(
                    method=method,
                    beta=beta,
                    sft_path=manifest["sft_path"],
                    data_dir=manifest["data_dir"],
                    output_dir=str(seed_dir / "runs" / f"{method}_beta{beta}"),
                    config=config_dict,
                    guidance_path=str(guidance_dir) if method == "tgdpo" else None,
                    save_model=method == "dpo" and beta == config.guidance_beta,
                )
            )
    if any(spec.method == "tgdpo" for spec in specs) and not any(spec.save_model for spec in specs):
        skipped += [
            {"method": "tgdpo", "beta": s.beta, "error": "no DPO guide (dpo not run)"}
            for s in specs
            if s.method == "tgdpo"
        ]
        specs = [spec for spec in specs if spec.method != "tgdpo"]
    # The guide first: its seed's TGDPO runs wait for it
    specs.sort(key=lambda spec: (not spec.save_model, spec.method == "tgdpo"))
    return specs, skipped


def _report_run(spec, result: dict, results: dict[int, list[dict]]) -> None:
    status = (
        result.get("error")
        or f"final reward {result['evals'][-1]['reward']:.3f}, seq KL {result['evals'][-1]['seq_kl']:.2f}"
    )
    seed = spec.config["seed"]
    print(f"      seed {seed} {result['method']:<13} β={result['beta']:<5} {result['wall_time_s']:6.1f} s  {status}")
    results[seed].append(result)


def run_pipeline(config, output_dir: Path, reuse: bool) -> tuple[dict[int, tuple[dict, dict, dict]], dict, dict]:
    """Stages 1-4 of every seed: `(prepared, runs, timings)`, `prepared[seed] = (manifest, sft_eval, timings)` and
    `runs[seed]` its preference runs (and skipped methods).

    With several seeds and workers, everything shares one pool of `config.workers` processes of
    `threads_per_worker` threads: the seeds' SFT and pairs first, and a seed's preference runs as soon as its own SFT
    model and pairs are ready, so no core waits while the last seed is still in SFT (3 seeds on 2 workers). A seed's
    TGDPO runs start once its DPO guide is saved. With one seed or one worker, the seeds are prepared first, in this
    process (one seed's SFT then uses every thread)."""
    seed_configs = [_seed_config(config, seed) for seed in config.seeds]
    overlapped = len(seed_configs) > 1 and config.workers > 1
    start = time.perf_counter()
    prepared = {} if overlapped else {c.seed: prepare_seed(c, _seed_dir(output_dir, c), reuse) for c in seed_configs}
    timings = {"overlapped": overlapped, "data_stages_s": time.perf_counter() - start}
    results: dict[int, list[dict]] = {c.seed: [] for c in seed_configs}
    skipped: dict[int, list[dict]] = {}
    if config.workers > 1:
        _run_in_pool(
            config, seed_configs if overlapped else [], output_dir, reuse, prepared, results, skipped, timings
        )
    else:
        start = time.perf_counter()
        _worker_init(config.threads_per_worker)
        for seed, (manifest, _, _) in prepared.items():
            specs, skipped[seed] = _seed_specs(config, seed, manifest, output_dir)
            for spec in specs:  # the guide first, TGDPO last (`_seed_specs`)
                _report_run(spec, _run_safely(spec), results)
        timings["preference_training_s"] = time.perf_counter() - start
    prepared = {c.seed: prepared[c.seed] for c in seed_configs}  # in seed order, whichever finished first
    return prepared, {seed: results[seed] + skipped[seed] for seed in results}, timings


def _run_in_pool(config, to_prepare, output_dir, reuse, prepared, results, skipped, timings) -> None:
    """The scheduler of `run_pipeline`, in `config.workers` processes: prepares the seeds of `to_prepare` and runs
    every seed's preference runs, those of `prepared` at once, those of a seed being prepared once it is. Fills
    `prepared`, `results`, `skipped` and the stage times."""
    pool_start = time.perf_counter()
    queue, waiting = [], []  # runs ready to start; TGDPO runs waiting for their seed's guide
    guide_done: dict[int, bool] = {}
    first_run_start = None

    def enqueue(seed: int, manifest: dict) -> None:
        nonlocal queue
        specs, skipped[seed] = _seed_specs(config, seed, manifest, output_dir)
        # The guide goes to the front: its TGDPO runs are the last to become ready
        queue = (
            [s for s in specs if s.save_model] + queue + [s for s in specs if not s.save_model and s.method != "tgdpo"]
        )
        waiting.extend(spec for spec in specs if spec.method == "tgdpo")

    for seed, (manifest, _, _) in prepared.items():
        enqueue(seed, manifest)
    with ProcessPoolExecutor(
        config.workers,
        mp_context=get_context("spawn"),
        initializer=_worker_init,
        initargs=(config.threads_per_worker,),
    ) as pool:
        running = {}
        # Every seed's preparation is submitted first: the pool runs them before any preference run
        for seed_config in to_prepare:
            future = pool.submit(_worker_prepare, seed_config, _seed_dir(output_dir, seed_config), reuse)
            running[future] = ("prepare", seed_config)
        while queue or waiting or running:
            ready = [spec for spec in waiting if guide_done.get(spec.config["seed"])]
            if ready:
                queue += ready
                waiting = [spec for spec in waiting if spec not in ready]
            # A run is only submitted to a free worker: a seed prepared meanwhile can still put its guide first
            while queue and len(running) < config.workers:
                spec = queue.pop(0)
                first_run_start = first_run_start or time.perf_counter()
                running[pool.submit(_run_safely, spec)] = ("run", spec)
            if not running:  # only TGDPO left, and its guide failed
                for spec in waiting:
                    failed = {"method": spec.method, "beta": spec.beta, "error": "the DPO guide run failed"}
                    _report_run(spec, {**failed, "wall_time_s": 0.0}, results)
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                kind, item = running.pop(future)
                if kind == "prepare":
                    prepared[item.seed] = future.result()
                    if len(prepared) == len(to_prepare):
                        timings["data_stages_s"] = time.perf_counter() - pool_start
                    enqueue(item.seed, prepared[item.seed][0])
                    continue
                result = future.result()
                _report_run(item, result, results)
                if item.save_model:
                    # On failure TGDPO stays waiting, and is reported as failed once nothing else runs
                    guide_done[item.config["seed"]] = "error" not in result
    if first_run_start is not None:
        timings["preference_training_s"] = time.perf_counter() - first_run_start
        timings["first_run_start_s"] = first_run_start - pool_start


def _replicates(args: argparse.Namespace) -> list[dict]:
    return [json.loads((Path(path) / "results.json").read_text()) for path in args.replicates or []]


def _cpu_time_of_all_processes() -> float | None:
    """CPU seconds (user + system) of this process and of its finished children (the run workers): what the
    experiment costs, whatever else shares the cores."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    usages = [resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def _write_reports(results: dict, doc_path: Path, replicates: list[dict]) -> Path:
    from .report import write_multiseed_report, write_report

    if "seeds" in results:
        return write_multiseed_report(results, doc_path)
    return write_report(results, doc_path, replicates)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, even in a log file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    import trl

    _quiet()
    config = _config_from_args(args)
    torch.set_num_threads(config.main_threads or max(1, config.workers * config.threads_per_worker))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    doc_path = Path(args.doc) if args.doc else (output_dir / "reproduction.md" if config.quick else DEFAULT_DOC)
    command = "python -m benchmarks.controlled_sentiment.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        results = json.loads((output_dir / "results.json").read_text())
        if args.note:
            results["notes"] = [*results.get("notes", []), *args.note]
            (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
        if args.doc is None and results["config"]["quick"]:
            doc_path = output_dir / "reproduction.md"
        print(f"Report rewritten to {_write_reports(results, doc_path, _replicates(args))}")
        return results

    total_start = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    prepared, runs, stage_timings = run_pipeline(config, output_dir, args.reuse)

    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    per_seed = []
    for seed, (manifest, sft_eval, timings) in prepared.items():
        seed_config = _seed_config(config, seed)
        timings = {**timings, **stage_timings}
        timings["per_run_s"] = {f"{r['method']}@{r.get('beta')}": r.get("wall_time_s") for r in runs[seed]}
        per_seed.append(
            {
                "command": command,
                "config": asdict(seed_config),
                "manifest": manifest,
                "sft_eval": sft_eval,
                "runs": runs[seed],
                "timings": timings,
                "environment": environment,
            }
        )
    if len(per_seed) == 1:
        results = per_seed[0]
    else:
        for seed_results in per_seed:
            seed_dir = _seed_dir(output_dir, _seed_config(config, seed_results["config"]["seed"]))
            (seed_dir / "results.json").write_text(json.dumps(seed_results, indent=2, default=float))
        results = {
            "command": command,
            "config": asdict(config),
            "seeds": per_seed,
            "timings": dict(stage_timings),
            "environment": environment,
        }

    if args.note:
        results["notes"] = list(args.note)
    start = time.perf_counter()
    results["timings"]["total_s"] = time.perf_counter() - total_start
    results["timings"]["cpu_total_s"] = _cpu_time_of_all_processes()
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    _write_reports(results, doc_path, _replicates(args))
    results["timings"]["report_s"] = time.perf_counter() - start
    results["timings"]["total_s"] = time.perf_counter() - total_start
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    _write_reports(results, doc_path, _replicates(args))  # again, with the final timings
    print(f"[5/5] report written to {doc_path} (total {results['timings']['total_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
