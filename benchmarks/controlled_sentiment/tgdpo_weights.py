"""
TGDPO's token weights in the controlled-sentiment reproduction: how far the DPO guide is from the reference, per
token, on the training pairs, and the weights 1 ± α·β·Δ that gives (docs/tgdpo_trainer.md, "What the reproduction
found").

    python -m benchmarks.controlled_sentiment.tgdpo_weights --output-dir outputs/controlled_sentiment --seeds 0 1

Reads the SFT model (the reference), the DPO guide saved at `guidance_beta` and the train pairs of each seed's
directory, as `run.py` wrote them. Δ_t = log π_guide(y_t) − log π_ref(y_t) on every completion token (and EOS).
"""

import argparse
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def completion_log_ratios(guide, reference, tokenizer, prompt: str, completion: str) -> torch.Tensor:
    """Δ_t of every completion token of one response (prompt and completion tokenized apart, as DPOTrainer does)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    targets = ids[0, 1:, None]
    with torch.no_grad():
        guide_logps = torch.log_softmax(guide(ids).logits[0, :-1], -1).gather(1, targets)[:, 0]
        reference_logps = torch.log_softmax(reference(ids).logits[0, :-1], -1).gather(1, targets)[:, 0]
    return (guide_logps - reference_logps)[len(prompt_ids) - 1 :]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/controlled_sentiment")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--pairs", type=int, default=400, help="Train pairs per seed.")
    parser.add_argument("--beta", type=float, default=0.1, help="TGDPO's β (the weights are 1 ± α·β·Δ).")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--guidance-beta", type=float, default=0.1, help="β of the saved DPO guide.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for seed in args.seeds:
        seed_dir = Path(args.output_dir) / f"seed{seed}"
        tokenizer = AutoTokenizer.from_pretrained(seed_dir / "sft")
        reference = AutoModelForCausalLM.from_pretrained(seed_dir / "sft").eval()
        guide = AutoModelForCausalLM.from_pretrained(seed_dir / "runs" / f"dpo_beta{args.guidance_beta}").eval()
        pairs = datasets.load_from_disk(str(seed_dir / "data"))["train"]
        pairs = pairs.select(range(min(args.pairs, len(pairs))))
        for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
            deltas = torch.cat(
                [completion_log_ratios(guide, reference, tokenizer, r["prompt"], r[side]) for r in pairs]
            )
            weights = 1 + sign * args.alpha * args.beta * deltas  # f_w = 1 + α r̂, f_l = 1 − α r̂, r̂ = β Δ
            magnitude = deltas.abs()
            print(
                f"seed {seed} {side:<8} {len(deltas)} tokens: mean Δ {deltas.mean():+.2f}, |Δ| p99 "
                f"{magnitude.quantile(0.99):.2f} max {magnitude.max():.1f}; weights mean {weights.mean():.3f}, "
                f"p1 {weights.quantile(0.01):.2f}, p99 {weights.quantile(0.99):.2f}, negative {(weights < 0).sum()}"
            )


if __name__ == "__main__":
    main()
