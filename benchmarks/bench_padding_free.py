"""Padding-free training (`padding_free=True`) against padded batches, on CPU: step time and peak memory.

    python benchmarks/bench_padding_free.py                  # the default sweep, writes its block of docs/benchmarks.md
    python benchmarks/bench_padding_free.py --quick          # a smoke run (small model, 2 pairs x 256), writes nothing
    python benchmarks/bench_padding_free.py --methods tdpo2 --pairs 2 4 --max-lengths 1024 --no-write

What it measures, per method (TDPO2 with a live reference, TDPO2 with the reference cache, TGDPO with its guidance
model on the fly, TBPO-A), per number of pairs and per `max_length`:

* **the same batches three ways**: padded as `DataCollatorForPreference` lays them out (2B rows padded to the
  longest), packed (`padding_free=True`: one row of the real tokens, attention per sequence), and the **equal-length
  bound**: the same number of real tokens (and of completion tokens) split into 2B sequences of equal length, padded
  (which then holds no padding). Equal lengths are the cheapest layout of that many tokens, also for attention
  (Σ L_i² is smallest when the L_i are equal), so packing cannot beat it; the target is to come within 10% of it.
* **lengths like UltraFeedback's**: prompt lengths log-normal with median 150 tokens, completion lengths log-normal
  with median 250, σ = 0.8, chosen and rejected drawn independently; prompt + completion truncated to `max_length`
  (`keep_start`), and a pair whose prompt fills `max_length` drawn again (DPOTrainer drops such rows).
* **a Llama-shaped model**: hidden 512, 4 layers, 8 heads, intermediate 1408, vocabulary 32,000 (untied head),
  random weights, float32, sdpa attention, built offline; TGDPO's guidance model is a second one of another seed.
* **a step** is `compute_loss` and its backward (the optimizer step costs the same in every layout and would move
  the weights between the layouts' measurements); `--batches` batches per cell after `--warmup`, each run in the
  three layouts back to back, the order rotated from batch to batch (interleaved, so drifting load hits all three
  alike). The ratio of two layouts is taken per batch, and its median over the batches is reported.
* **one thread, CPU time** per step (as `bench_trainers.py`: on a shared machine the CPU time of a one-thread process
  is the work done), wall time beside it; **peak memory** is the largest resident set during the step above the
  resident set at its start (`_memory.PeakMemory`, which resets the kernel's high-water mark before each step).
* `--jobs 2` runs two methods at once, one per core (each still one thread, timed in CPU time).

Raw results go to `benchmarks/results/<timestamp>-padding-free.json`; `--from-json FILE [FILE ...]` rewrites the page
from saved runs (a cell measured again in a later file replaces the earlier one).
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from _memory import PeakMemory  # noqa: E402


MODEL = {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "intermediate_size": 1408, "pad_vocab_to": 32000}
QUICK_MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 352, "pad_vocab_to": 4096}
METHODS = {
    "tdpo2": ("TDPOTrainer", {"variant": "tdpo2"}),
    "tdpo2-cached": ("TDPOTrainer", {"variant": "tdpo2", "precompute_ref_log_probs": True}),
    "tgdpo": ("TGDPOTrainer", {}),
    "tbpo-a": ("TBPOTrainer", {"variant": "tbpo_a"}),
}
LAYOUTS = ("padded", "packed", "equal")
# UltraFeedback-like lengths (issue 22): log-normal medians and spread
PROMPT_MEDIAN, COMPLETION_MEDIAN, SIGMA = 150, 250, 0.8
BLOCK = ("<!-- bench_padding_free:begin -->", "<!-- bench_padding_free:end -->")


# ---------------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------------


def sample_pairs(rng, num_pairs: int, max_length: int, token_range: tuple[int, int]) -> list[dict]:
    """Tokenized pairs with UltraFeedback-like lengths, random token ids (the content does not change the work)."""
    import numpy as np

    pairs = []
    while len(pairs) < num_pairs:
        prompt, chosen, rejected = (
            max(1, round(float(np.exp(rng.normal(math.log(median), SIGMA)))))
            for median in (PROMPT_MEDIAN, COMPLETION_MEDIAN, COMPLETION_MEDIAN)
        )
        if prompt >= max_length - 1:  # DPOTrainer drops a row whose prompt leaves no completion token
            continue
        pairs.append({
            name: rng.integers(*token_range, size=length).tolist()
            for name, length in (("prompt_ids", prompt), ("chosen_ids", chosen), ("rejected_ids", rejected))
        })  # fmt: skip
    return pairs


def equal_length_pairs(pairs: list[dict], max_length: int, rng, token_range) -> list[dict]:
    """The same number of pairs, the same real tokens and completion tokens after truncation, in 2B sequences of
    equal length: the padding-free layout's lower bound."""
    lengths = []
    for pair in pairs:
        for side in ("chosen_ids", "rejected_ids"):
            total = min(len(pair["prompt_ids"]) + len(pair[side]), max_length)
            lengths.append((total, total - len(pair["prompt_ids"])))
    sequences = len(lengths)
    total = sum(length for length, _ in lengths)
    completion = sum(length for _, length in lengths)
    length = max(2, round(total / sequences))
    completion_length = min(length - 1, max(1, round(completion / sequences)))
    prompt_length = length - completion_length

    def tokens(size):
        return rng.integers(*token_range, size=size).tolist()

    return [
        {"prompt_ids": tokens(prompt_length), "chosen_ids": tokens(completion_length),
         "rejected_ids": tokens(completion_length)}
        for _ in pairs
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one method, every cell, in its own process (one thread)
# ---------------------------------------------------------------------------------------------------------------------


def build_trainer(method: str, model_path: str, guidance_path: str, padding_free: bool, output_dir: str):
    import trl_tokenpref
    from trl_tokenpref.data import load_default_dataset

    class_name, config = METHODS[method]
    trainer_class = getattr(trl_tokenpref, class_name)
    config_class = getattr(trl_tokenpref, class_name.replace("Trainer", "Config"))
    args = config_class(
        output_dir=output_dir,
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        padding_free=padding_free,
        max_length=None,
        **config,
    )
    extra = {"guidance_model": guidance_path} if class_name == "TGDPOTrainer" else {}
    dataset = load_default_dataset()["train"].select(range(4))  # only to build the trainer: batches are made here
    return trainer_class(model=model_path, args=args, train_dataset=dataset, **extra)


def make_batch(trainer, pairs: list[dict], max_length: int) -> dict:
    """`pairs` collated as this trainer collates (padded or packed), truncated to `max_length`; with the reference
    cache, its columns computed first (outside the timing)."""
    from datasets import Dataset

    trainer.args.max_length = max_length
    trainer.data_collator = dataclasses.replace(trainer.data_collator, max_length=max_length)
    examples = pairs
    if trainer._uses_reference_cache:
        dataset = trainer._precompute_ref_logps(Dataset.from_list(pairs), "bench", batch_size=len(pairs))
        examples = [dataset[i] for i in range(len(dataset))]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def _release_freed_memory() -> None:
    """Return the memory the allocator holds but no tensor uses to the OS (glibc keeps freed chunks below its mmap
    threshold), so that a step's peak above the resident set at its start is its own, not reused from the step
    before: without it the second of two layouts measured back to back showed a peak of 0 MB."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def timed_step(trainer, batch) -> dict:
    import torch

    trainer.model.zero_grad(set_to_none=True)
    _release_freed_memory()
    with PeakMemory() as memory:
        wall, cpu = time.perf_counter(), time.process_time()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    trainer.model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    return {"cpu_s": cpu, "wall_s": wall, "peak_delta_mb": memory.peak_delta_mb}


def worker(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainers = {
        layout: build_trainer(args.method, args.model, args.guidance, layout == "packed", f"{args.work_dir}/tmp")
        for layout in ("padded", "packed")
    }
    trainers["equal"] = trainers["padded"]
    for trainer in set(trainers.values()):
        trainer.model.train()
    token_range = (3, len(trainers["padded"].processing_class))
    records = []
    for num_pairs in args.pairs:
        for max_length in args.max_lengths:
            rng = np.random.default_rng(1000 * num_pairs + max_length)
            for index in range(args.warmup + args.batches):
                pairs = sample_pairs(rng, num_pairs, max_length, token_range)
                inputs = {
                    "padded": pairs,
                    "packed": pairs,
                    "equal": equal_length_pairs(pairs, max_length, rng, token_range),
                }
                order = LAYOUTS[index % 3 :] + LAYOUTS[: index % 3]
                for layout in order:
                    trainer = trainers[layout]
                    batch = make_batch(trainer, inputs[layout], max_length)
                    result = timed_step(trainer, batch)
                    if index < args.warmup:
                        continue
                    token_batch_size = batch["completion_mask"].sum().item()
                    records.append({
                        "method": args.method, "pairs": num_pairs, "max_length": max_length, "layout": layout,
                        "batch": index - args.warmup, "positions": batch["input_ids"].numel(),
                        "real_tokens": int(batch["attention_mask"].sum()) if "attention_mask" in batch
                        else batch["input_ids"].numel(),
                        "completion_tokens": int(token_batch_size), **result,
                    })  # fmt: skip
                    print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    Path(args.output).write_text(json.dumps(records))


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONPATH=str(REPO))
    return env


def setup(args) -> tuple[str, str]:
    from trl_tokenpref.tiny import build_tiny_model

    model = QUICK_MODEL if args.quick else MODEL
    suffix = "quick" if args.quick else "llama512"
    paths = []
    for role, seed in (("model", 0), ("guidance", 1)):
        path = Path(args.work_dir) / f"{role}-{suffix}"
        if not (path / "model.safetensors").exists():
            print(f"[setup] building {path}", file=sys.stderr, flush=True)
            build_tiny_model(path, seed=seed, **model)
        paths.append(str(path))
    return paths[0], paths[1]


def run(args) -> list[dict]:
    model, guidance = setup(args)
    results_dir = Path(args.work_dir) / "padding-free"
    results_dir.mkdir(parents=True, exist_ok=True)

    def one(method: str) -> list[dict]:
        output = results_dir / f"{method}.json"
        command = [sys.executable, __file__, "--worker", "--method", method, "--model", model, "--guidance", guidance,
                   "--output", str(output), "--work-dir", str(results_dir / method), "--warmup", str(args.warmup),
                   "--batches", str(args.batches), "--pairs", *map(str, args.pairs),
                   "--max-lengths", *map(str, args.max_lengths)]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, env=_env(), cwd=REPO)
        print(f"[{method}] {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        return json.loads(output.read_text())

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return [record for records in pool.map(one, args.methods) for record in records]


def summarise(records: list[dict]) -> list[dict]:
    """Per cell: the median per-batch ratios padded/packed and packed/equal (CPU time and peak memory), the padding
    share of the padded batches, and the median times."""
    cells = {}
    for record in records:
        key = (record["method"], record["pairs"], record["max_length"])
        cells.setdefault(key, {}).setdefault(record["batch"], {})[record["layout"]] = record
    rows = []
    for (method, pairs, max_length), batches in cells.items():
        complete = [batch for batch in batches.values() if set(batch) == set(LAYOUTS)]

        def median(function, complete=complete):
            return statistics.median(function(batch) for batch in complete)

        rows.append({
            "method": method, "pairs": pairs, "max_length": max_length, "batches": len(complete),
            "padding": median(lambda b: 1 - b["padded"]["real_tokens"] / b["padded"]["positions"]),
            "padded_s": median(lambda b: b["padded"]["cpu_s"]),
            "packed_s": median(lambda b: b["packed"]["cpu_s"]),
            "equal_s": median(lambda b: b["equal"]["cpu_s"]),
            "speedup": median(lambda b: b["padded"]["cpu_s"] / b["packed"]["cpu_s"]),
            "speedup_spread": (
                min(b["padded"]["cpu_s"] / b["packed"]["cpu_s"] for b in complete),
                max(b["padded"]["cpu_s"] / b["packed"]["cpu_s"] for b in complete),
            ),
            "over_bound": median(lambda b: b["packed"]["cpu_s"] / b["equal"]["cpu_s"]),
            # the most any layout of these tokens could gain over the padded batch
            "bound_speedup": median(lambda b: b["padded"]["cpu_s"] / b["equal"]["cpu_s"]),
            "memory": median(lambda b: b["packed"]["peak_delta_mb"] / max(b["padded"]["peak_delta_mb"], 1e-9)),
            "padded_mb": median(lambda b: b["padded"]["peak_delta_mb"]),
            "packed_mb": median(lambda b: b["packed"]["peak_delta_mb"]),
        })  # fmt: skip
    order = {method: i for i, method in enumerate(METHODS)}
    return sorted(rows, key=lambda row: (order.get(row["method"], 99), row["max_length"], row["pairs"]))


def table(rows: list[dict]) -> str:
    lines = [
        "| method | pairs | max_length | padding | padded s/step | packed s/step | equal-length s/step | "
        "speedup (range) | equal-length bound's speedup | packed / equal-length | peak Δ MB padded → packed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["speedup_spread"]
        lines.append(
            f"| {row['method']} | {row['pairs']} | {row['max_length']} | {row['padding']:.0%} | {row['padded_s']:.2f} | "
            f"{row['packed_s']:.2f} | {row['equal_s']:.2f} | **{row['speedup']:.2f}×** ({low:.2f}–{high:.2f}) | "
            f"{row['bound_speedup']:.2f}× | {row['over_bound']:.2f} | {row['padded_mb']:.0f} → {row['packed_mb']:.0f}"
            + (f" ({row['memory']:.2f}×) |" if row["padded_mb"] >= 10 else " |")
        )
    return "\n".join(lines)


def merge_saved(runs: list[dict]) -> tuple[list[dict], dict]:
    """The records and the description of one or more saved runs (`{"meta": ..., "records": [...]}`), in order: a
    record of the same method, cell, layout and batch in a later run replaces the earlier one, so an interrupted sweep
    can be completed by measuring its missing cells again."""
    merged = {}
    for run_ in runs:
        for record in run_["records"]:
            key = tuple(record[field] for field in ("method", "pairs", "max_length", "layout", "batch"))
            merged[key] = record
    metas = [run_["meta"] for run_ in runs]
    if len(metas) == 1:
        return list(merged.values()), metas[0]
    minutes = [meta.get("minutes") for meta in metas]
    meta = {
        "date": max(meta["date"] for meta in metas),
        "machine": metas[-1]["machine"],
        "command": "` + `".join(meta["command"] for meta in metas),
        "minutes": None if None in minutes else sum(minutes),
        "batches": metas[-1]["batches"],
        "warmup": metas[-1]["warmup"],
        "json": "`, `".join(meta["json"] for meta in metas),
    }
    return list(merged.values()), meta


def write_block(rows: list[dict], meta: dict, doc: Path) -> None:
    begin, end = BLOCK
    block = "\n".join([
        begin,
        f"Measured {meta['date']} on {meta['machine']}: `{meta['command']}` ("
        + (f"{meta['minutes']:.0f} min, " if meta.get("minutes") is not None else "")
        + f"{meta['batches']} batches per cell after {meta['warmup']} warm-up; medians of per-batch ratios, CPU time "
        "of one thread). Raw results: `" + meta["json"] + "`.",
        "",
        table(rows),
        end,
    ])  # fmt: skip
    text = doc.read_text()
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pairs", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--max-lengths", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="methods measured at once (one core each)")
    parser.add_argument("--quick", action="store_true", help="small model, 2 pairs x 256, 1 batch; writes nothing")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--from-json", nargs="+", metavar="FILE",
        help="rewrite the page from saved runs; with several, a cell measured again in a later file replaces the earlier",
    )  # fmt: skip
    parser.add_argument("--work-dir", default=str(REPO / "outputs" / "bench"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--method", "--model", "--guidance", "--output"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.pairs, args.max_lengths, args.batches, args.no_write = [2], [256], 1, True

    if args.from_json:
        records, meta = merge_saved([json.loads(Path(path).read_text()) for path in args.from_json])
    else:
        started = time.perf_counter()
        records = run(args)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} CPU cores (shared), torch {__import__('torch').__version__}",
            "command": "python benchmarks/bench_padding_free.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "minutes": (time.perf_counter() - started) / 60,
            "batches": args.batches,
            "warmup": args.warmup,
            "json": f"benchmarks/results/{stamp}-padding-free.json",
        }
        if not args.no_write:
            (REPO / meta["json"]).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    rows = summarise(records)
    print(table(rows))
    if not args.no_write:
        write_block(rows, meta, REPO / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
