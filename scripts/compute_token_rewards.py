# /// script
# dependencies = [
#     "trl-tokenpref",
#     "trl>=1.16,<1.17",
# ]
# ///

"""
Precompute TGDPO's token rewards, so that training needs no guidance model in memory.

For every completion token y_t of every pair, it writes the token reward of TGDPO (https://huggingface.co/papers/2506.14574)

    r̂_t = β · (log π_guide(y_t | s_t) − log π_ref(y_t | s_t))

into two new columns, `chosen_token_rewards` and `rejected_token_rewards`: one float32 per token of the completion as
the trainer tokenizes it (the same tokenizer, chat template and EOS handling: the script runs the trainer's own
tokenization and the same per-token precompute, `trl_tokenpref.tgdpo.token_rewards.compute_token_rewards`). Every
other column is kept.

* **β is baked in.** The values are r̂ at `--beta`; train with the same `beta` (a file computed at β_s and trained at
  β acts as `alpha · β_s / β`; `scripts/run_tgdpo.py` and the trainer read β from the info file beside the data and
  refuse a mismatch). The β-free log-ratio is `r̂ / β`.
* **Truncation.** Values are computed on the sequences the trainer builds with `--max_length` and
  `--truncation_mode`; a token that truncation removes has no value (`null`). The trainer checks, before training,
  that every value it reads is present and finite, so a file computed with a shorter `max_length` than training is
  refused with the row named. With `truncation_mode="keep_start"` (the default), `--max_length 0` computes every token
  and the file then suits any training `max_length`. A row whose prompt alone fills `max_length` (no completion token
  left) gets no value; training drops such rows, as DPOTrainer does.
* **The reference** must be the one training regularises toward (the policy's initial weights, as in the official
  code), and the guidance model must share its tokenizer (usually a DPO model trained from that reference).

A summary (β, models, truncation, the number of rows and tokens, statistics of r̂, each data file's size and checksum)
is written to `token_rewards_info.json` next to the data. Every row also holds β (`token_rewards_beta`), so that the
trainer refuses to train at another β however the data is loaded (`load_from_disk`, `load_dataset("json", ...)`,
`run_tgdpo.py`).

**Stopping it is safe.** Each file is written under a temporary name and renamed into place once complete, the info
file last; a run stopped at any point leaves the previous files whole (and its temporary files, removed by the next
run), and the trainer refuses data that does not match the info file beside it, naming the file.

# Local files or a Hub dataset, all splits, saved with `save_to_disk`
```bash
python scripts/compute_token_rewards.py \
    --guidance_model my-org/Qwen2.5-0.5B-Instruct-DPO \
    --ref_model Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --output_dir data/ultrafeedback-token-rewards \
    --beta 0.1 --max_length 1024 --dtype bfloat16
```

# Then train with it (no guidance model in memory; with precomputed reference log-probs a step costs a DPO step)
```python
from datasets import load_from_disk
from trl_tokenpref import TGDPOConfig, TGDPOTrainer

dataset = load_from_disk("data/ultrafeedback-token-rewards")
args = TGDPOConfig(output_dir="Qwen2.5-0.5B-TGDPO", beta=0.1, max_length=1024, precompute_ref_log_probs=True)
trainer = TGDPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset["train"])
trainer.train()
```

# On CPU, offline, with the embedded tiny model and dataset
A tiny model of another seed stands in for the guidance model (a real one is a DPO model trained from the reference;
a guidance model equal to the reference gives r̂ ≡ 0, i.e. plain DPO, and the script warns about it):
```bash
python -m trl_tokenpref.tiny outputs/tiny-model && python -m trl_tokenpref.tiny outputs/tiny-guidance --seed 1
python -m trl_tokenpref.data outputs/tiny-data
python scripts/compute_token_rewards.py --guidance_model outputs/tiny-guidance --ref_model outputs/tiny-model \
    --dataset_name outputs/tiny-data --output_dir outputs/tiny-data-token-rewards --output_format jsonl
```
"""

import argparse
import os
from pathlib import Path
from types import SimpleNamespace


OUTPUT_FORMATS = ("disk", "jsonl", "parquet")
INFO_FILE = "token_rewards_info.json"
_ROW = "__compute_token_rewards_row__"


def _rounded(value: float | None) -> str:
    """Four significant digits, as a statistic is worth reading."""
    return "n/a" if value is None else f"{value:.4g}"


def _max_length(value: str) -> int | None:
    if value.lower() in ("0", "none"):
        return None
    length = int(value)
    if length < 0:
        raise argparse.ArgumentTypeError(f"--max_length must be a positive integer, 0 or 'none', got {value}.")
    return length


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default in its help."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compute_token_rewards.py",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    models = parser.add_argument_group("models")
    models.add_argument("--guidance_model", required=True, help="Path or Hub id of the guidance model π_guide.")
    models.add_argument("--ref_model", required=True, help="Path or Hub id of the reference model π_ref.")
    models.add_argument("--tokenizer", default=None, help="Tokenizer path or id (defaults to --ref_model).")
    models.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="dtype to load both models in (no autocast is applied on top).",
    )
    models.add_argument("--trust_remote_code", action="store_true")

    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_name", help="Hub dataset name, or a local file/directory (as --dataset_path).")
    source.add_argument(
        "--dataset_path",
        help="Local .json/.jsonl/.parquet/.csv file, a directory of such files, or a `save_to_disk` directory.",
    )
    data.add_argument("--dataset_config", default=None, help="Hub dataset configuration name.")
    data.add_argument(
        "--dataset_splits", nargs="+", default=None, help="Splits to process (default: all; a single file is 'train')."
    )
    data.add_argument("--dataset_num_proc", type=int, default=None, help="Processes for tokenization.")

    compute = parser.add_argument_group("computation (use the training values)")
    compute.add_argument("--beta", type=float, default=0.1, help="TGDPO's β: the values stored are r̂ = β·Δ.")
    compute.add_argument(
        "--max_length",
        type=_max_length,
        default=1024,
        help="Truncation length of prompt+completion, as in training; 0 or 'none' disables truncation.",
    )
    compute.add_argument(
        "--truncation_mode",
        default="keep_start",
        choices=["keep_start", "keep_end"],
        help="Which end of prompt+completion truncation keeps, as in training.",
    )
    compute.add_argument("--batch_size", type=int, default=8, help="Pairs per forward pass.")
    compute.add_argument(
        "--token_chunk_size", type=int, default=None, help="Tokens per LM-head tile (see TGDPOConfig)."
    )

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", required=True, help="Directory to write the dataset and its info file into.")
    output.add_argument(
        "--output_format",
        default="disk",
        choices=OUTPUT_FORMATS,
        help="'disk': `DatasetDict.save_to_disk` (load with `load_from_disk`); 'jsonl'/'parquet': one file per split.",
    )
    return parser.parse_args(argv)


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse, before anything is computed, an output folder that is (or holds) the input data: writing there would
    overwrite the data being read (`save_to_disk` refuses it, after the whole computation)."""
    source = Path(args.dataset_name or args.dataset_path).expanduser()
    if not source.exists():
        return  # a Hub dataset
    output, source = Path(args.output_dir).expanduser().resolve(), source.resolve()
    if output == source or output in source.parents:
        raise ValueError(
            f"--output_dir {args.output_dir} is the input dataset's folder (or holds it): the output would overwrite "
            "the data it is computed from. Choose another --output_dir."
        )


def compute_token_rewards(args: argparse.Namespace):
    """Compute the columns for every requested split; returns the `DatasetDict` with the new columns and the info."""
    from accelerate import Accelerator
    from datasets import DatasetDict
    from transformers import AutoTokenizer

    from trl_tokenpref._compat import create_model_from_path
    from trl_tokenpref.checks import check_local_path
    from trl_tokenpref.cli import load_preference_dataset
    from trl_tokenpref.tgdpo.guidance import load_guidance_model
    from trl_tokenpref.tgdpo.token_rewards import compute_token_rewards as compute
    from trl_tokenpref.tgdpo.token_rewards import token_reward_stats

    check_local_path(args.ref_model, "reference model")
    check_local_path(args.guidance_model, "guidance model")
    dataset_name = args.dataset_name or args.dataset_path
    script_args = SimpleNamespace(
        dataset_name=dataset_name,
        dataset_config=args.dataset_config,
        dataset_streaming=False,
        dataset_train_split="train",
    )
    dataset = load_preference_dataset(script_args, SimpleNamespace(datasets=[]))
    splits = args.dataset_splits or list(dataset.keys())
    missing = [split for split in splits if split not in dataset]
    if missing:
        raise ValueError(f"Split(s) {missing} not found in {dataset_name}; available: {list(dataset.keys())}.")

    accelerator = Accelerator()
    tokenizer = AutoTokenizer.from_pretrained(
        args.tokenizer or args.ref_model, trust_remote_code=args.trust_remote_code
    )
    init_kwargs = {"dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    ref_model = create_model_from_path(args.ref_model, **init_kwargs)
    guidance_model = load_guidance_model(args.guidance_model, init_kwargs)  # its vocabulary is checked by `compute`

    outputs, info_splits = {}, {}
    for split in splits:
        output = compute(
            dataset[split],
            ref_model=ref_model,
            guidance_model=guidance_model,
            tokenizer=tokenizer,
            beta=args.beta,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            batch_size=args.batch_size,
            token_chunk_size=args.token_chunk_size,
            accelerator=accelerator,
            name=split,
        )
        outputs[split] = output
        stats = token_reward_stats(output)
        info_splits[split] = {
            "rows": len(output),
            # Rows that truncation leaves without a completion token: training drops them (as DPOTrainer does)
            "rows_without_values": sum(
                1
                for chosen, rejected in zip(output["chosen_token_rewards"], output["rejected_token_rewards"])
                if all(value is None for value in chosen) or all(value is None for value in rejected)
            ),
            **stats,
        }
        if all((side["max_abs"] or 0.0) == 0.0 for side in stats.values()):
            print(
                f"Warning: every token reward of the {split} split is 0: the guidance model gives the same "
                "log-probabilities as the reference (is it the same model?), so TGDPO on this data is exactly DPO. "
                "The guidance model should be a different model, usually a DPO model trained from the reference."
            )

    info = {
        "columns": {
            "chosen_token_rewards": "r̂_t = beta * (log π_guide(y_t|s_t) - log π_ref(y_t|s_t)), one per chosen token",
            "rejected_token_rewards": "r̂_t for each rejected token",
            "null": "a token removed by max_length truncation (never read by training at these settings)",
        },
        "beta": args.beta,
        "guidance_model": args.guidance_model,
        "ref_model": args.ref_model,
        "tokenizer": args.tokenizer or args.ref_model,
        "dtype": args.dtype,
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "dataset": dataset_name,
        "splits": info_splits,
    }
    return DatasetDict(outputs), info


def write_outputs(dataset, info: dict, output_dir: str, output_format: str) -> dict[str, str]:
    """Write every split and the info file, so that a run stopped at any moment never leaves data and an info file
    that disagree unnoticed; returns the written paths by split.

    Each file is written under a temporary name (hidden, so `load_dataset(folder)` skips it) and renamed into place
    once complete (`trl_tokenpref.files`): a stop while writing leaves the previous files whole. The info file, last,
    records each data file's size and checksum (`data_files`), and the trainer refuses data that does not match its
    info file, naming the file (a stop between the data and the info). Temporary files of an earlier stopped run are
    removed first.
    """
    import shutil

    from trl_tokenpref.files import (
        atomic_write,
        file_fingerprint,
        remove_orphan_temporaries,
        replace_atomically,
        temporary_path,
        write_json_atomically,
    )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in remove_orphan_temporaries(output_dir):
        print(f"Removed {path}, left by a run that was stopped while it wrote it.")
    data_files = {}
    if output_format == "disk":
        staging = temporary_path(output_dir / "dataset")
        try:
            dataset.save_to_disk(str(staging))
            for split in dataset:
                names = sorted(entry.name for entry in (staging / split).iterdir())
                data_files[split] = {
                    "rows": len(dataset[split]),
                    "files": {f"{split}/{name}": file_fingerprint(staging / split / name) for name in names},
                }
            # Each split folder replaces the previous one (moved aside first, removed after), then the split list
            for split in dataset:
                previous = output_dir / split
                aside = temporary_path(previous) if previous.exists() else None
                if aside is not None:
                    os.replace(previous, aside)
                os.replace(staging / split, previous)
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
            replace_atomically(staging / "dataset_dict.json", output_dir / "dataset_dict.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        paths = {split: str(output_dir / split) for split in dataset}
    else:
        paths = {}
        for split, split_dataset in dataset.items():
            name = f"{split}.{output_format}"
            with atomic_write(output_dir / name, "wb") as file:
                if output_format == "jsonl":
                    split_dataset.to_json(file, lines=True, force_ascii=False)
                else:
                    split_dataset.to_parquet(file)
            data_files[split] = {"rows": len(split_dataset), "files": {name: file_fingerprint(output_dir / name)}}
            paths[split] = str(output_dir / name)
    write_json_atomically(
        output_dir / INFO_FILE,
        {**info, "format": output_format, "files": paths, "data_files": data_files},
        indent=2,
        ensure_ascii=False,
    )
    return paths


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    if not args.beta > 0:
        raise ValueError(f"--beta must be positive, got {args.beta}.")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_output_dir(args)
    dataset, info = compute_token_rewards(args)
    paths = write_outputs(dataset, info, args.output_dir, args.output_format)
    for split, split_info in info["splits"].items():
        chosen, rejected = split_info["chosen_token_rewards"], split_info["rejected_token_rewards"]
        print(
            f"{split}: {split_info['rows']} rows ({split_info['rows_without_values']} without values), "
            f"{chosen['tokens']} + {rejected['tokens']} tokens, mean r̂ chosen {_rounded(chosen['mean'])} / rejected "
            f"{_rounded(rejected['mean'])}, max |r̂| {_rounded(max(chosen['max_abs'] or 0.0, rejected['max_abs'] or 0.0))} "
            f"-> {paths[split]}"
        )
    print(f"Info: {Path(args.output_dir) / INFO_FILE}")
    return paths


if __name__ == "__main__":
    main()
