"""Step time and peak memory of the token-level trainers against TRL's `DPOTrainer`, on CPU-sized models.

One command measures, in one run, every trainer over a sweep of vocabulary sizes and sequence lengths, and writes the
results into `docs/benchmarks.md` (a Markdown table between generated markers, the rest of the page is kept) and a
plot into `docs/benchmarks.png`:

    python benchmarks/bench_trainers.py                      # the default sweep (V 32k/128k x L 256/1024)
    python benchmarks/bench_trainers.py --quick              # a 3-5 minute smoke run (V 8k, L 128, 1 round)
    python benchmarks/bench_trainers.py --vocab 32000 --seq 256 --configs dpo-tuned tdpo2 --no-write
    python benchmarks/bench_trainers.py --configs dpo-tuned dpo-pre tdpo2 tdpo2-cached --block cache --no-plot
                                                             # the reference cache, in its own block of the page

How it measures:

* **Same model, batch and precision** for every trainer in a cell: a Llama with hidden 256, 4 layers, 4 heads,
  intermediate 1024 and an untied LM head, its vocabulary padded to V (the tokenizer stays the tiny 512-token one);
  `--pairs` preference pairs per step, prompt + completion filling exactly `L` tokens (the prompt is 1/16 of it);
  float32 (`--dtype bf16` for bf16 autocast); no gradient checkpointing; AdamW; the reference is a second copy of the
  initial weights (TRL's default without PEFT).
* **One fresh process per measurement**, so the peak memory is its own: the high-water mark of the resident set is
  reset after the trainer is built (`/proc/self/clear_refs`) and read after the last step. "peak MB" is the largest
  RSS during training (weights, optimizer states, activations, temporaries); "Δ MB" is its increase over the RSS after
  the trainer was built.
* **Interleaved**: `--repeats` rounds, each running every configuration of every cell once, so that drifting load on a
  shared machine hits all configurations alike. Within a process, `--warmup` steps are dropped (allocations, the
  optimizer's state); the step time is the median of the remaining steps pooled over the rounds. Ratios are taken
  against `DPOTrainer` in the same cell; the spread of the per-round ratios is reported as the noise.
* **One thread, CPU time.** `--threads` defaults to 1 and the step time is the process CPU time per step. On a
  shared 2-core machine a 2-thread process stalls whenever one of its threads is descheduled (OpenMP waits for both
  at every parallel region): the same step varied 3x within one process (2.8 vs 9.3 s). A 1-thread process only loses
  time slices, which the CPU time does not count, so CPU time is the work done, i.e. the wall time on an idle machine.
  Wall-clock times are reported too. One process at a time.

Configurations (`--configs`, default all available):

* `dpo-default`: `trl.DPOTrainer` (sigmoid), TRL's fused LM head at its default tiles (4096 tokens x 32768 vocab);
* `dpo-tuned`: the same with CPU-sized tiles (256 x 4096); **the ratios use this one** (the
  faster DPO on CPU, so the fair comparison);
* `tdpo1`, `tdpo2`: `TDPOTrainer`;
* `tdpo2-naive`: `TDPOTrainer` whose statistics come from full `[rows, L, V]` float32 logits of both models
  (`naive_token_stats`, as the official TDPO code): the baseline the fused pass beats;
* `tdpo2-v1` (rows of docs/benchmarks.md only): the fused pass before the performance work, kept in the git history
  (run this script's `--configs tdpo2` at commit 4ab13ad, in a worktree);
* `tgdpo-fly`: `TGDPOTrainer` with a guidance model (a second tiny model) run on the fly at every step;
* `tgdpo-pre`: `TGDPOTrainer` on token rewards precomputed by `scripts/compute_token_rewards.py`;
* `tbpo-a`, `tbpo-q`: `TBPOTrainer` (variants `tbpo_a`, `tbpo_q`);
* `dpo-pre`: `dpo-tuned` with `precompute_ref_log_probs=True` (no reference model kept; not in the default sweep);
* `tdpo2-cached`: `tdpo2` with `precompute_ref_log_probs=True`, the reference cache at the default `ref_top_k` (no
  reference model kept, a step runs the policy only; not in the default sweep).

Besides the ratios against `dpo-tuned`, `PAIRS` are compared with their own baseline in the same cell (`tdpo2-cached`
against `dpo-pre` and against `tdpo2`; `dpo-pre` against `dpo-tuned`); a pair's baseline is added to the run when
missing. The precompute happens in `__init__`, outside the step times: its wall and CPU time are reported apart (each
precompute configuration gets a fresh datasets cache, so every process computes it, as a user's first run does). So
is the data loading per batch (fetch and collate, which Trainer does before `on_step_begin` for every configuration;
with the reference cache the collator builds the k columns per token), timed on a pass over the training dataloader
after the last step.

Raw results go to `benchmarks/results/<timestamp>.json`; `--from-json FILE` rewrites the page from one (with the same
`--block`).
"""

import argparse
import datetime
import json
import math
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

from _memory import PeakMemory, current_rss_mb  # noqa: E402


DEFAULT_CONFIGS = (
    "dpo-default",
    "dpo-tuned",
    "tdpo1",
    "tdpo2",
    "tdpo2-naive",
    "tgdpo-fly",
    "tgdpo-pre",
    "tbpo-a",
    "tbpo-q",
)
# The reference cache (`precompute_ref_log_probs=True`): its own sweep, `--configs` of CACHE_CONFIGS `--block cache`
PRECOMPUTE_CONFIGS = ("dpo-pre", "tdpo2-cached")
CACHE_CONFIGS = ("dpo-tuned", "dpo-pre", "tdpo2", "tdpo2-cached")
ALL_CONFIGS = DEFAULT_CONFIGS + PRECOMPUTE_CONFIGS
BASELINE = "dpo-tuned"
# The issue's targets, as ratios against DPOTrainer in the same cell (time, memory); None: no target
TARGETS = {
    "tdpo1": (1.10, 1.10),
    "tdpo2": (1.10, 1.10),
    "tgdpo-pre": (1.05, 1.05),
    "tbpo-a": (1.10, 1.10),
    "tbpo-q": (1.15, 1.15),
}
# Ratios of a configuration against another baseline than BASELINE, with their targets (time, memory; None: none).
# The cached TDPO2 is compared with the DPO that also precomputes its reference (both keep no reference model) and
# with the live TDPO2 (which runs the reference forward every step); a target of 1.00 on time reads "faster".
PAIRS = {
    ("tdpo2-cached", "dpo-pre"): (1.10, 1.10),
    ("tdpo2-cached", "tdpo2"): (1.00, None),
    ("dpo-pre", "dpo-tuned"): (None, None),
}
MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}


def block_markers(block: str) -> tuple[str, str]:
    """The markers of a generated block of docs/benchmarks.md: the main sweep's (`block=""`) or a named one."""
    name = f"bench_trainers-{block}" if block else "bench_trainers"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def _trainer_module(config: str) -> str:
    return {"tgdpo": "trl_tokenpref.tgdpo", "tbpo": "trl_tokenpref.tbpo"}.get(config.split("-")[0], "")


def available_configs(configs) -> tuple[list[str], dict[str, str]]:
    """The configurations whose trainer can be imported (TGDPO and TBPO may not exist yet), and why the others not."""
    import importlib

    ok, skipped = [], {}
    for config in configs:
        module = _trainer_module(config)
        try:
            if module:
                importlib.import_module(module)
            ok.append(config)
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            skipped[config] = f"{type(error).__name__}: {error}"
    return ok, skipped


# ---------------------------------------------------------------------------------------------------------------------
# Setup: models, datasets, precomputed token rewards (cached under --work-dir)
# ---------------------------------------------------------------------------------------------------------------------


def _filler(tokenizer, num_tokens: int, seed: int, kind: str) -> str:
    """Text of at least `num_tokens` tokens, built from the default dataset's sentences (the tiny tokenizer knows
    them well, so a sentence is a handful of tokens)."""
    from trl_tokenpref.data import make_preference_dataset

    rows = make_preference_dataset(num_pairs=400, seed=seed)
    column = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}[kind]
    text, index = "", 0
    while len(tokenizer(text)["input_ids"]) < num_tokens:
        piece = rows[index % len(rows)][column].strip()
        text = f"{text} {piece}" if text else piece
        index += 1
    return text


def make_dataset(path: Path, tokenizer, seq_len: int, num_rows: int) -> None:
    """JSON Lines preference data whose prompt is about seq_len/16 tokens and whose completions are longer than the
    rest, so that every sequence is truncated to exactly `seq_len` tokens: no padding, the same work for every pair."""
    prompt_tokens = max(8, seq_len // 16)
    rows = []
    for i in range(num_rows):
        prompt = _filler(tokenizer, prompt_tokens, seed=i, kind="prompt")
        # cut the prompt to about prompt_tokens, at a word boundary
        words = prompt.split(" ")
        while len(words) > 1 and len(tokenizer(" ".join(words))["input_ids"]) > prompt_tokens:
            words.pop()
        prompt = " ".join(words)
        chosen = " " + _filler(tokenizer, seq_len + 8, seed=1000 + i, kind="chosen")
        rejected = " " + _filler(tokenizer, seq_len + 8, seed=2000 + i, kind="rejected")
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


def setup(args, vocabs, seqs, configs) -> dict:
    """Builds (or reuses) the models, datasets and precomputed rewards; returns their paths."""
    from transformers import AutoTokenizer

    from trl_tokenpref.tiny import build_tiny_model

    work = Path(args.work_dir)
    paths = {"models": {}, "guidance": {}, "data": {}, "rewards": {}}
    for vocab in vocabs:
        for role, seed in (("models", 0), ("guidance", 1)):
            if role == "guidance" and not any(c.startswith("tgdpo") for c in configs):
                continue
            path = work / f"{'model' if role == 'models' else 'guidance'}-V{vocab}"
            if not (path / "model.safetensors").exists():
                print(f"[setup] building {path}", file=sys.stderr, flush=True)
                build_tiny_model(path, pad_vocab_to=vocab, seed=seed, **MODEL)
            paths[role][vocab] = str(path)
    tokenizer = AutoTokenizer.from_pretrained(paths["models"][vocabs[0]])
    num_rows = args.pairs * (args.warmup + args.steps)
    for seq in seqs:
        path = work / f"data-L{seq}-rows{num_rows}.jsonl"
        if not path.exists():
            print(f"[setup] writing {path}", file=sys.stderr, flush=True)
            make_dataset(path, tokenizer, seq, num_rows)
        paths["data"][seq] = str(path)
    if "tgdpo-pre" in configs:
        for vocab in vocabs:
            for seq in seqs:
                out = work / f"rewards-V{vocab}-L{seq}-rows{num_rows}"
                if not (out / "train.jsonl").exists():
                    print(f"[setup] precomputing token rewards into {out}", file=sys.stderr, flush=True)
                    command = [
                        sys.executable,
                        str(REPO / "scripts" / "compute_token_rewards.py"),
                        "--guidance_model",
                        paths["guidance"][vocab],
                        "--ref_model",
                        paths["models"][vocab],
                        "--dataset_path",
                        paths["data"][seq],
                        "--output_dir",
                        str(out),
                        "--output_format",
                        "jsonl",
                        "--max_length",
                        str(seq),
                        "--batch_size",
                        "2",
                    ]
                    subprocess.run(command, check=True, env=_env(args), capture_output=True, text=True)
                paths["rewards"][f"{vocab}-{seq}"] = str(out / "train.jsonl")
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one configuration, one cell, in its own process
# ---------------------------------------------------------------------------------------------------------------------


def _patch_naive_stats() -> None:
    """Full-logits statistics for every trainer of the package: `add_token_stats_head`'s forward calls
    `model_forward.compute_token_stats`, looked up at call time."""
    from trl_tokenpref.token_stats import model_forward, naive_token_stats

    def naive(hidden_states, lm_head, labels, ref_hidden_states=None, ref_lm_head=None, chunk_size=None):
        return naive_token_stats(hidden_states, lm_head, labels, ref_hidden_states, ref_lm_head)

    model_forward.compute_token_stats = naive


def _time_precompute(trainer_class, calls: list) -> None:
    """Records the wall and CPU time of every `_precompute_ref_logps` call of `trainer_class` (made in `__init__`)."""
    original = trainer_class._precompute_ref_logps

    def timed(self, dataset, name, batch_size):
        wall, cpu = time.perf_counter(), time.process_time()
        result = original(self, dataset, name, batch_size)
        calls.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
        return result

    trainer_class._precompute_ref_logps = timed


def build_trainer(config: str, args, paths: dict, output_dir: str, precompute_calls: list | None = None):
    from datasets import load_dataset
    from transformers import AutoTokenizer

    model_path = paths["models"][str(args.vocab)]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data_file = paths["data"][str(args.seq)]
    if config == "tgdpo-pre":
        data_file = paths["rewards"][f"{args.vocab}-{args.seq}"]
    # The precompute is cached on disk next to the dataset's cache files (DPOTrainer's and ours): a fresh cache per
    # process makes every process compute it, as a user's first run does, so that its time is measured every round
    # and the memory it leaves behind is in every peak alike
    cache_dir = Path(output_dir) / "hf-cache" if config in PRECOMPUTE_CONFIGS else Path(args.work_dir) / "hf-cache"
    dataset = load_dataset("json", data_files=data_file, split="train", cache_dir=str(cache_dir))
    common = {
        "output_dir": output_dir,
        "max_steps": args.warmup + args.steps,
        "per_device_train_batch_size": args.pairs,
        "learning_rate": 1e-6,
        "max_length": args.seq,
        "bf16": args.dtype == "bf16",
        "gradient_checkpointing": False,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1000,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    kwargs = {"model": model_path, "train_dataset": dataset, "processing_class": tokenizer}
    if config.startswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        if config in ("dpo-tuned", "dpo-pre"):
            from trl_tokenpref._compat import set_trl_lm_head_tiles

            set_trl_lm_head_tiles(256, 4096)
        if config == "dpo-pre":
            _time_precompute(DPOTrainer, precompute_calls)
        return DPOTrainer(args=DPOConfig(**common, precompute_ref_log_probs=config == "dpo-pre"), **kwargs)
    if config.startswith("tdpo"):
        from trl_tokenpref import TDPOConfig, TDPOTrainer

        if config == "tdpo2-naive":
            _patch_naive_stats()
        if config == "tdpo2-cached":
            _time_precompute(TDPOTrainer, precompute_calls)
        variant = "tdpo1" if config == "tdpo1" else "tdpo2"
        # ref_top_k: the default
        config_args = TDPOConfig(variant=variant, precompute_ref_log_probs=config == "tdpo2-cached", **common)
        return TDPOTrainer(args=config_args, **kwargs)
    if config.startswith("tgdpo"):
        from trl_tokenpref.tgdpo import TGDPOConfig, TGDPOTrainer

        if config == "tgdpo-fly":
            kwargs["guidance_model"] = paths["guidance"][str(args.vocab)]
        return TGDPOTrainer(args=TGDPOConfig(**common), **kwargs)
    if config.startswith("tbpo"):
        from trl_tokenpref.tbpo import TBPOConfig, TBPOTrainer

        variant = {"tbpo-a": "tbpo_a", "tbpo-q": "tbpo_q"}[config]
        return TBPOTrainer(args=TBPOConfig(variant=variant, **common), **kwargs)
    raise ValueError(f"unknown config {config}")


def time_data_loading(trainer) -> dict:
    """CPU time per batch of the training data loading (dataset rows to a collated batch), measured after training
    on a fresh pass over the same dataloader: Trainer fetches and collates a batch before `on_step_begin`, so the step
    times leave it out, for every configuration alike. With the reference cache the collator turns k values per
    completion token into tensors (`DataCollatorForPerTokenColumns`), and the rows carry them as Python lists: that is
    the cost a step's time does not show. `collate` is the collator alone, `total` with the dataset's fetch."""
    collate_cpu = []
    collator = trainer.data_collator

    def timed_collator(examples):
        cpu = time.process_time()
        batch = collator(examples)
        collate_cpu.append(time.process_time() - cpu)
        return batch

    trainer.data_collator = timed_collator
    try:
        dataloader = trainer.get_train_dataloader()
        cpu, wall = time.process_time(), time.perf_counter()
        num_batches = sum(1 for _ in dataloader)
        total_cpu, total_wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        trainer.data_collator = collator
    return {
        "batches": num_batches,
        "total_cpu_s_per_batch": total_cpu / max(num_batches, 1),
        "total_wall_s_per_batch": total_wall / max(num_batches, 1),
        "collate_cpu_s_per_batch": sum(collate_cpu) / max(len(collate_cpu), 1),
    }


def worker(args) -> dict:
    import tempfile

    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    paths = json.loads(args.paths)
    start = time.perf_counter()
    precompute_calls = []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(args.worker, args, paths, output_dir, precompute_calls)
        init_s = time.perf_counter() - start

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.wall, self.cpu, self.loss = [], [], []

            def on_step_begin(self, *_, **__):
                self._wall, self._cpu = time.perf_counter(), time.process_time()

            def on_step_end(self, *_, **__):
                self.wall.append(time.perf_counter() - self._wall)
                self.cpu.append(time.process_time() - self._cpu)

        timer = StepTimer()
        trainer.add_callback(timer)
        rss_after_init = current_rss_mb()
        with PeakMemory() as memory:
            trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        data_loading = time_data_loading(trainer)
        # What the process holds besides the policy: the reference model (None with a precompute, or with PEFT)
        ref_params = sum(p.numel() for p in trainer.ref_model.parameters()) if trainer.ref_model is not None else 0
    return {
        "ref_model_params": ref_params,
        "precompute": precompute_calls,
        "data_loading": data_loading,
        "config": args.worker,
        "vocab": args.vocab,
        "seq": args.seq,
        "wall": timer.wall[args.warmup :],
        "cpu": timer.cpu[args.warmup :],
        "warmup_wall": timer.wall[: args.warmup],
        "init_s": init_s,
        "rss_after_init_mb": rss_after_init,
        "peak_rss_mb": memory.peak_rss_mb,
        "peak_delta_mb": memory.peak_delta_mb,
        "peak_exact": memory.exact,
        "train_loss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
        "logged_losses": losses,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------------


def _env(args) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(BENCH_DIR), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }


def run_one(args, config, vocab, seq, paths) -> dict:
    command = [
        sys.executable,
        __file__,
        f"--worker={config}",
        f"--vocab={vocab}",
        f"--seq={seq}",
        f"--pairs={args.pairs}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        f"--dtype={args.dtype}",
        f"--work-dir={args.work_dir}",
        f"--paths={json.dumps(paths)}",
    ]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=_env(args), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "vocab": vocab, "seq": seq, "error": f"timeout after {args.timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        stderr = (proc.stderr or "").strip().splitlines()
        return {
            "config": config,
            "vocab": vocab,
            "seq": seq,
            "error": f"exit {proc.returncode}: {stderr[-1] if stderr else 'no output'}",
            "stderr_tail": stderr[-30:],
        }
    result = json.loads(lines[-1][len("RESULT ") :])
    result["load_before"] = load
    result["process_s"] = time.perf_counter() - started
    return result


def _runs_by_cell(results: list[dict]) -> dict:
    """{(vocab, seq): {config: [successful runs]}}."""
    cells = {}
    for r in results:
        runs = cells.setdefault((r["vocab"], r["seq"]), {}).setdefault(r["config"], [])
        if "error" not in r:
            runs.append(r)
    return cells


def _round_ratios(runs: list[dict], base_runs: list[dict], key: str) -> list[float]:
    """Per round, the median step time of `runs` over the baseline's in the same round: the spread shows the noise."""
    base_by_round = {r["round"]: r for r in base_runs}
    return [
        statistics.median(r[key]) / statistics.median(base_by_round[r["round"]][key])
        for r in runs
        if r["round"] in base_by_round
    ]


def _pooled_ratios(row: dict, base: dict, suffix: str = "") -> dict:
    """Ratios of the pooled medians (time, CPU time, peak, Δ) of two rows of the table."""
    if "step_s" not in row or "step_s" not in base:
        return {}
    return {
        "time_ratio" + suffix: row["step_s"] / base["step_s"],
        "cpu_ratio" + suffix: row["cpu_s"] / base["cpu_s"],
        "peak_ratio" + suffix: row["peak_mb"] / base["peak_mb"],
        "delta_ratio" + suffix: row["delta_mb"] / base["delta_mb"] if base["delta_mb"] > 0 else None,
    }


def aggregate(results: list[dict]) -> dict:
    """Per (config, vocab, seq): pooled median step time, per-round ratios to the baseline, median peak memory."""
    cells = _runs_by_cell(results)
    table = {}
    for (vocab, seq), by_config in cells.items():
        for config, good in by_config.items():
            runs = [r for r in results if (r["config"], r["vocab"], r["seq"]) == (config, vocab, seq)]
            row = {"runs": len(runs), "errors": [r["error"] for r in runs if "error" in r]}
            if good:
                wall = [t for r in good for t in r["wall"]]
                cpu = [t for r in good for t in r["cpu"]]
                row.update(
                    step_s=statistics.median(wall),
                    step_min_s=min(wall),
                    step_max_s=max(wall),
                    cpu_s=statistics.median(cpu),
                    peak_mb=statistics.median(r["peak_rss_mb"] for r in good),
                    delta_mb=statistics.median(r["peak_delta_mb"] for r in good),
                    init_mb=statistics.median(r["rss_after_init_mb"] for r in good),
                    load=statistics.median(r.get("load_before", 0) for r in good),
                )
                for key in ("cpu", "wall"):
                    row[f"round_{key}_ratios"] = _round_ratios(good, by_config.get(BASELINE, []), key)
                # Results of runs before these were measured have none of the following
                if all("ref_model_params" in r for r in good):
                    row["ref_model_params"] = max(r["ref_model_params"] for r in good)
                    loading = [r["data_loading"] for r in good]
                    row["data_cpu_s"] = statistics.median(d["total_cpu_s_per_batch"] for d in loading)
                    row["collate_cpu_s"] = statistics.median(d["collate_cpu_s_per_batch"] for d in loading)
                    if all(r["precompute"] for r in good):
                        row["precompute_wall_s"] = statistics.median(
                            sum(c["wall_s"] for c in r["precompute"]) for r in good
                        )
                        row["precompute_cpu_s"] = statistics.median(
                            sum(c["cpu_s"] for c in r["precompute"]) for r in good
                        )
            table[(config, vocab, seq)] = row
    for (_config, vocab, seq), row in table.items():
        row.update(_pooled_ratios(row, table.get((BASELINE, vocab, seq), {})))
        row.update(_pooled_ratios(row, table.get(("dpo-default", vocab, seq), {}), "_vs_default"))
    return table


def pair_table(results: list[dict], table: dict) -> dict:
    """Per (config, baseline, vocab, seq) of PAIRS: the ratios of `config` against `baseline` in the same cell (pooled,
    and per round for the time), both peaks and their difference."""
    pairs = {}
    for (vocab, seq), by_config in _runs_by_cell(results).items():
        for config, baseline in PAIRS:
            row, base = table.get((config, vocab, seq), {}), table.get((baseline, vocab, seq), {})
            ratios = _pooled_ratios(row, base)
            if not ratios:
                continue
            for key in ("cpu", "wall"):
                ratios[f"round_{key}_ratios"] = _round_ratios(by_config[config], by_config[baseline], key)
            ratios.update(
                peak_mb=row["peak_mb"],
                base_peak_mb=base["peak_mb"],
                peak_saved_mb=base["peak_mb"] - row["peak_mb"],
                ref_kept=(row.get("ref_model_params", 0) > 0, base.get("ref_model_params", 0) > 0),
            )
            pairs[(config, baseline, vocab, seq)] = ratios
    return pairs


def _fmt(value, spec=".2f", suffix=""):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _spread(ratios) -> str:
    return f" ({min(ratios):.2f}–{max(ratios):.2f})" if ratios and len(ratios) > 1 else ""


def _verdict(row, target) -> str:
    """Judged on the CPU-time ratio (the work; see the module docstring) and the peak-RSS ratio; a target of None is
    not judged."""
    if "cpu_ratio" not in row:
        return "not measured"
    checks = [("time", row["cpu_ratio"], target[0]), ("memory", row["peak_ratio"], target[1])]
    missed = [
        f"{name} {value:.2f} > {limit:.2f}" for name, value, limit in checks if limit is not None and value > limit
    ]
    measured = " / ".join(f"{value:.2f}" for _, value, limit in checks if limit is not None)
    return f"**not met** ({', '.join(missed)})" if missed else f"**met** ({measured})"


def _target_text(target) -> str:
    return " / ".join(f"≤ {limit:.2f}×" if limit is not None else "–" for limit in target)


def render_markdown(
    meta: dict, table: dict, configs: list[str], skipped: dict, block: str = "", pairs: dict | None = None,
    with_plot: bool = True,
) -> str:  # fmt: skip
    vocabs, seqs = meta["vocabs"], meta["seqs"]
    begin, end = block_markers(block)
    lines = [
        begin,
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['runtime_min']:.0f} min).",
        "",
        f"- Hardware: {meta['cpu']}, {meta['cores']} cores, {meta['mem_gb']:.0f} GB RAM; load average "
        f"{meta['load_start']:.1f} at the start, {meta['load_end']:.1f} at the end (other jobs share the machine).",
        f"- Software: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"trl {meta['trl']}.",
        f"- Model: Llama, hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers, {MODEL['num_heads']} heads, "
        f"intermediate {MODEL['intermediate_size']}, untied LM head, vocabulary padded to V "
        f"({', '.join(f'{v:,}' for v in vocabs)}: {', '.join(f'{p / 1e6:.1f}M' for p in meta['params'])} parameters).",
        f"- Batch: {meta['pairs']} pair(s) per step, chosen and rejected both exactly L tokens (prompt L/16); "
        f"{meta['dtype']}; no gradient checkpointing; {meta['threads']} torch threads; {meta['warmup']} warm-up + "
        f"{meta['steps']} measured steps per process, {meta['repeats']} interleaved round(s).",
        "- Columns: CPU s/step = median process CPU time per step (one thread: the work done, which time-slicing "
        "by other jobs does not inflate), pooled over rounds, and its ratio to `dpo-tuned` in the same cell (in "
        "brackets: the lowest and highest per-round ratio, the noise); the same for wall-clock time; the CPU ratio "
        "to `dpo-default`; peak RSS during training and its ratio; Δ = peak RSS minus the RSS after the trainer "
        "was built, and its ratio.",
        "",
        "| config | V | L | CPU s/step | × DPO (rounds) | wall s/step | wall × DPO (rounds) | × DPO-default | "
        "peak MB | × DPO | Δ MB | Δ × DPO |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for vocab in vocabs:
        for seq in seqs:
            for config in configs:
                row = table.get((config, vocab, seq))
                if row is None:
                    continue
                if "step_s" not in row:
                    error = row["errors"][0].replace("|", "/")[:100]
                    lines.append(f"| {config} | {vocab:,} | {seq} | failed: {error} |||||||||")
                    continue
                spread = {key: _spread(row.get(f"round_{key}_ratios")) for key in ("cpu", "wall")}
                lines.append(
                    f"| {config} | {vocab:,} | {seq} | {row['cpu_s']:.2f} | {_fmt(row.get('cpu_ratio'))}{spread['cpu']} | "
                    f"{row['step_s']:.2f} | {_fmt(row.get('time_ratio'))}{spread['wall']} | "
                    f"{_fmt(row.get('cpu_ratio_vs_default'))} | {row['peak_mb']:.0f} | {_fmt(row.get('peak_ratio'))} | "
                    f"{row['delta_mb']:.0f} | {_fmt(row.get('delta_ratio'))} |"
                )
    lines += ["", "Targets (CPU-time ratio / peak-RSS ratio against `dpo-tuned`, in every cell):", ""]
    lines += ["| config | target | " + " | ".join(f"V {v:,}, L {s}" for v in vocabs for s in seqs) + " |"]
    lines += ["|---|---|" + "---|" * (len(vocabs) * len(seqs))]
    for config, target in TARGETS.items():
        if config not in configs:
            continue
        cells = [_verdict(table.get((config, v, s), {}), target) for v in vocabs for s in seqs]
        lines.append(f"| {config} | {_target_text(target)} | " + " | ".join(cells) + " |")
    if pairs:
        lines += _render_pairs(meta, table, pairs, configs)
    # Flatness in V: Δ contains the gradients and AdamW states of the [V, H] embedding and LM head (12 bytes per
    # parameter, allocated in the first step), which grow with V for every trainer alike. What is left is the memory
    # of activations and temporaries, where a term in tokens x V would show.
    lines += [
        "",
        "Memory beyond the parameter states, Δ − 12 B × parameters (gradients + AdamW m and v in float32), in MB: "
        "activations and temporaries. A term in tokens × V would make it grow with V.",
        "",
        "| config | " + " | ".join(f"V {v // 1000}k, L {s}" for s in seqs for v in vocabs) + " |",
        "|---|" + "---:|" * (len(vocabs) * len(seqs)),
    ]
    param_mb = {v: 12 * p / 2**20 for v, p in zip(vocabs, meta["params"])}
    for config in configs:
        cells = []
        for seq in seqs:
            for vocab in vocabs:
                row = table.get((config, vocab, seq), {})
                cells.append(f"{row['delta_mb'] - param_mb[vocab]:.0f}" if "delta_mb" in row else "–")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"`{c}` ({why[:120]})" for c, why in skipped.items()) + "."]
    if with_plot:
        lines += ["", "![step time and peak memory against vocabulary size](benchmarks.png)"]
    lines += ["", end]
    return "\n".join(lines)


def _render_pairs(meta: dict, table: dict, pairs: dict, configs: list[str]) -> list[str]:
    """The ratios of PAIRS (the reference cache against DPO's precompute and against the live reference), the
    memory with and without a reference model, the precompute's time and the data loading per batch."""
    vocabs, seqs = meta["vocabs"], meta["seqs"]
    weights_mb = {v: 4 * p / 2**20 for v, p in zip(vocabs, meta["params"])}
    lines = [
        "",
        "Pairs (the first configuration against the second, in the same cell; per-round ratios in brackets). Peak "
        "MB: both peaks and the second minus the first; ref: whether each process kept a reference model (one fp32 "
        "copy of the weights is " + ", ".join(f"{weights_mb[v]:.0f} MB at V = {v:,}" for v in vocabs) + "):",
        "",
        "| config | against | V | L | CPU × (rounds) | wall × (rounds) | peak MB | against | saved MB | peak × | "
        "Δ × | ref kept | target (time / memory) | verdict |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for (config, baseline), target in PAIRS.items():
        for vocab in vocabs:
            for seq in seqs:
                pair = pairs.get((config, baseline, vocab, seq))
                if pair is None:
                    continue
                kept = " / ".join("yes" if k else "no" for k in pair["ref_kept"])
                judged = any(limit is not None for limit in target)
                lines.append(
                    f"| {config} | {baseline} | {vocab:,} | {seq} | {pair['cpu_ratio']:.2f}"
                    f"{_spread(pair['round_cpu_ratios'])} | {pair['time_ratio']:.2f}{_spread(pair['round_wall_ratios'])} "
                    f"| {pair['peak_mb']:.0f} | {pair['base_peak_mb']:.0f} | {pair['peak_saved_mb']:.0f} | "
                    f"{pair['peak_ratio']:.2f} | {_fmt(pair['delta_ratio'])} | {kept} | "
                    f"{_target_text(target) if judged else '–'} | {_verdict(pair, target) if judged else '–'} |"
                )
    rows = [(c, v, s) for c in configs for v in vocabs for s in seqs if "data_cpu_s" in table.get((c, v, s), {})]
    if rows:
        lines += [
            "",
            "Outside the step time: the precompute (in `__init__`, wall and CPU seconds for the whole training set, "
            "median over rounds), and the data loading per batch (dataset rows to a collated batch; Trainer does it "
            "before `on_step_begin`, so no step time above contains it), CPU ms, with the collator's part and its "
            "share of the CPU step time:",
            "",
            "| config | V | L | precompute wall s | precompute CPU s | data loading ms/batch | collator ms/batch | "
            "loading / step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for config, vocab, seq in rows:
            row = table[(config, vocab, seq)]
            lines.append(
                f"| {config} | {vocab:,} | {seq} | {_fmt(row.get('precompute_wall_s'), '.1f')} | "
                f"{_fmt(row.get('precompute_cpu_s'), '.1f')} | {1e3 * row['data_cpu_s']:.1f} | "
                f"{1e3 * row['collate_cpu_s']:.1f} | {100 * row['data_cpu_s'] / row['cpu_s']:.1f}% |"
            )
    return lines


def write_page(path: Path, block: str, name: str = "") -> None:
    """Replaces the generated block `name` of the page (or adds it at the end, or creates the page around it)."""
    begin, end = block_markers(name)
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Benchmarks\n\n## CPU: token-level trainers against DPOTrainer\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def plot(path: Path, meta: dict, table: dict, configs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, NullLocator

    vocabs, seqs = meta["vocabs"], meta["seqs"]
    param_mb = {v: 12 * p / 2**20 for v, p in zip(vocabs, meta["params"])}
    for (_config, vocab, _seq), row in table.items():
        if "delta_mb" in row:
            row["beyond_mb"] = row["delta_mb"] - param_mb[vocab]
    panels = (
        ("cpu_s", "CPU s / step"),
        ("peak_mb", "peak RSS (MB)"),
        ("beyond_mb", "peak Δ − parameter states (MB)\n(activations, temporaries)"),
    )
    fig, axes = plt.subplots(len(panels), len(seqs), figsize=(5.5 * len(seqs), 11.5), squeeze=False)
    styles = {
        "dpo-default": ("tab:gray", ":", "o"),
        "dpo-tuned": ("black", "-", "o"),
        "tdpo1": ("tab:blue", "--", "s"),
        "tdpo2": ("tab:blue", "-", "s"),
        "tdpo2-naive": ("tab:red", "-", "x"),
        "tdpo2-v1": ("tab:pink", "--", "x"),
        "tgdpo-fly": ("tab:green", "--", "^"),
        "tgdpo-pre": ("tab:green", "-", "^"),
        "tbpo-a": ("tab:purple", "-", "D"),
        "tbpo-q": ("tab:purple", "--", "D"),
        "dpo-pre": ("tab:gray", "-", "o"),
        "tdpo2-cached": ("tab:cyan", "-", "s"),
    }
    for column, seq in enumerate(seqs):
        for row_index, (key, label) in enumerate(panels):
            ax = axes[row_index][column]
            for config in configs:
                points = [(v, table.get((config, v, seq), {}).get(key)) for v in vocabs]
                points = [(v, y) for v, y in points if y is not None]
                if not points:
                    continue
                color, linestyle, marker = styles.get(config, (None, "-", "o"))
                ax.plot(*zip(*points), label=config, color=color, linestyle=linestyle, marker=marker)
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(vocabs)
            ax.set_xticklabels([f"{v // 1000}k" for v in vocabs])
            ax.set_xlabel("vocabulary size")
            ax.set_ylabel(label)
            ax.set_title(f"L = {seq}, {meta['pairs']} pair(s)/step, {meta['dtype']}")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Token-level trainers vs DPOTrainer on CPU: median CPU time per step, peak memory during training")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _meta(args, command_line, vocabs, seqs, started, load_start) -> dict:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    h, layers, inter = MODEL["hidden_size"], MODEL["num_layers"], MODEL["intermediate_size"]
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    params = [2 * v * h + layers * per_layer + h for v in vocabs]
    return {
        "command": command_line,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "runtime_min": (time.perf_counter() - started) / 60,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gb": mem_gb,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "vocabs": vocabs,
        "seqs": seqs,
        "params": params,
        "pairs": args.pairs,
        "dtype": args.dtype,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
    }


def report(meta, results, configs, skipped, args) -> dict:
    table = aggregate(results)
    pairs = pair_table(results, table)
    with_plot = not args.no_plot
    block = render_markdown(meta, table, configs, skipped, args.block, pairs, with_plot)
    print("\n".join(line for line in block.splitlines() if line not in block_markers(args.block)))
    if not args.no_write:
        write_page(Path(args.out), block, args.block)
        written = [args.out]
        if with_plot:
            plot(Path(args.plot), meta, table, configs)
            written.append(args.plot)
        print(f"wrote {' and '.join(written)}", file=sys.stderr)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--pairs", type=int, default=1, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each process")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (see the docstring)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=ALL_CONFIGS)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per process before it counts as failed")
    parser.add_argument("--quick", action="store_true", help="smoke run: V 8000, L 128, 1 round, 1+2 steps")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "benchmarks.png"))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--no-plot", action="store_true", help="write the table but not the plot")
    parser.add_argument(
        "--block",
        default="",
        help="the generated block of --out to replace: '' the main sweep's, NAME the block between "
        "<!-- bench_trainers-NAME:begin/end --> (e.g. 'cache' for the reference-cache sweep)",
    )
    parser.add_argument("--work-dir", default=str(REPO / "outputs" / "bench"), help="models, data (cached)")
    parser.add_argument("--from-json", help="re-render the page from a results file instead of measuring")
    for hidden in ("--worker", "--paths"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.vocab, args.seq = args.vocab[0], args.seq[0]
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report(saved["meta"], saved["results"], saved["configs"], saved["skipped"], args)
        return
    if args.quick:
        args.vocab, args.seq, args.repeats, args.warmup, args.steps = [8000], [128], 1, 1, 2
        if args.out == parser.get_default("out"):
            args.no_write = True  # a smoke run does not overwrite the page unless --out is given

    command_line = "python benchmarks/bench_trainers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    configs, skipped = available_configs(args.configs)
    if BASELINE not in configs:
        configs.insert(0, BASELINE)
    # A pair needs its baseline in the same run
    for config, baseline in PAIRS:
        if config in configs and baseline not in configs:
            configs.insert(configs.index(config), baseline)
    paths = setup(args, args.vocab, args.seq, configs)
    paths = {k: {str(kk): vv for kk, vv in v.items()} for k, v in paths.items()}
    results = []
    results_dir = BENCH_DIR / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    partial = results_dir / f"{stamp}.partial.json"
    cells = [(v, s) for v in args.vocab for s in args.seq]
    total = args.repeats * len(cells) * len(configs)
    for round_index in range(args.repeats):
        for vocab, seq in cells:
            # Alternate the order between rounds, so no configuration always runs right after the same one
            order = configs if round_index % 2 == 0 else list(reversed(configs))
            for config in order:
                result = run_one(args, config, vocab, seq, paths)
                result["round"] = round_index
                results.append(result)
                status = result.get("error") or (
                    f"{statistics.median(result['wall']):.2f} s/step, peak {result['peak_rss_mb']:.0f} MB "
                    f"(+{result['peak_delta_mb']:.0f}), load {result['load_before']:.1f}"
                )
                partial.write_text(json.dumps({"results": results, "configs": configs, "skipped": skipped}))
                print(
                    f"[{len(results)}/{total}] round {round_index} V={vocab} L={seq} {config}: {status}",
                    file=sys.stderr,
                    flush=True,
                )

    meta = _meta(args, command_line, args.vocab, args.seq, started, load_start)
    partial.unlink(missing_ok=True)
    (results_dir / f"{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": results, "configs": configs, "skipped": skipped}, indent=1)
    )
    report(meta, results, configs, skipped, args)


if __name__ == "__main__":
    main()
