"""TDPO on the embedded default: a tiny offline model and preference dataset, on CPU, in about a minute.

    python -m trl_tokenpref.demo [--variant tdpo2|tdpo1] [--alpha 0.5] [--steps 60] [--format standard|conversational]

It builds a tiny tokenizer and causal LM into `--output-dir` (nothing is downloaded), trains `TDPOTrainer` on the
shipped preference pairs, prints the loss and the sequential-KL metrics as training goes, and evaluates on the held-out
pairs. The same script is what the README's first command runs.
"""

import argparse
import os
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tdpo2", choices=["tdpo1", "tdpo2"])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--format", default="standard", choices=["standard", "conversational"])
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
    import datasets
    import transformers
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from trl_tokenpref import TDPOConfig, TDPOTrainer
    from trl_tokenpref.cli import hide_deprecated_checkpointing_alias_warning
    from trl_tokenpref.data import load_default_dataset
    from trl_tokenpref.tiny import build_tiny_model

    # The table below is the demo's output: no progress bars for the tiny model's loading and saving either
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    model_path = build_tiny_model(output_dir / "tiny-model", seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = load_default_dataset(format=args.format, seed=args.seed)
    print(f"Built the tiny model in {model_path}; {len(dataset['train'])} train / {len(dataset['test'])} test pairs")

    columns = ["loss", "kl/chosen", "kl/rejected", "kl/margin", "rewards/accuracies", "rewards/margins"]

    class PrintMetrics(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(
                    f"{state.global_step:>5} " + " ".join(f"{logs.get(key, float('nan')):>18.4f}" for key in columns)
                )

    config = TDPOConfig(
        output_dir=str(output_dir / "run"),
        variant=args.variant,
        alpha=args.alpha,
        beta=args.beta,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        # fp32 and no activation checkpointing: the tiny model gains nothing from TRL's GPU-oriented defaults on CPU.
        # `activation_checkpointing`, not its deprecated alias `gradient_checkpointing` (which warns when set)
        bf16=False,
        activation_checkpointing=False,
        logging_steps=max(1, args.steps // 12),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = TDPOTrainer(
        model=model_path,
        args=config,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        processing_class=tokenizer,
        callbacks=[PrintMetrics()],
    )
    trainer.remove_callback(PrinterCallback)  # our table replaces the raw log dicts
    print(f"Training {args.variant.upper()} (alpha={args.alpha}, beta={args.beta}) for {args.steps} steps")
    print(" step " + " ".join(f"{key:>18}" for key in columns))
    with hide_deprecated_checkpointing_alias_warning():
        trainer.train()
        metrics = trainer.evaluate()
    print("Held-out evaluation:")
    for key in ["eval_loss", "eval_rewards/accuracies", "eval_kl/chosen", "eval_kl/rejected", "eval_kl/margin"]:
        print(f"  {key:<26} {metrics[key]:.4f}")
    print(f"Done in {time.perf_counter() - start:.1f} s")
    return metrics


if __name__ == "__main__":
    main()
