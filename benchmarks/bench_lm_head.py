"""Micro-benchmark of the LM-head work of one preference step, without the backbone: the part of a step where DPO and
the token-level methods differ.

Each implementation does, for N labelled tokens with hidden size H and vocabulary V, what its trainer does after the
backbones:

* `dpo-default` / `dpo-tuned`: TRL's `ChunkedLogProbFunction` on the policy (forward + backward, with the entropy,
  mean-logit and top-1 outputs DPOTrainer requests) and on the reference (forward only, no grad), at TRL's default
  tiles (4096 x 32768) or at CPU-sized tiles (256 x 4096, measured 1.5-1.8x faster on CPU);
* `tdpo-fused`: `compute_token_stats` with a reference (one chunked pass over both heads; forward + backward of
  `Σ g·log_probs + Σ g'·forward_kl`);
* `tdpo-trl-kernels`: the same statistics composed from TRL's kernels at tuned tiles: logprob(policy) +
  logprob(reference, no grad) + divergence(reference ‖ policy): three passes over the LM heads instead of one;
* `tdpo-naive`: `naive_token_stats` (full `[N, V]` float32 logits for both models, as the official TDPO code).

The fused pass before the performance work (`tdpo-fused-v1` in docs/benchmarks.md) is in the git history: check out
commit 4ab13ad in a worktree and run its `benchmarks/bench_lm_head.py --impls tdpo-fused` beside this one.

Times are process CPU time per step (one thread by default: on a shared machine that is the work done; see
`bench_trainers.py`), the median over the rounds, with the wall-clock median next to it.

Every measurement runs in its own subprocess (so the peak resident memory is its own), and the implementations are
interleaved round by round, so drifting machine load hits them all alike.

    python benchmarks/bench_lm_head.py --tokens 2048 --hidden 256 --vocab 32000 --rounds 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


IMPLS = ("dpo-default", "dpo-tuned", "tdpo-fused", "tdpo-trl-kernels", "tdpo-naive")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakMemory  # noqa: E402


def _worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from trl_tokenpref._compat import ChunkedDivergenceFunction, ChunkedLogProbFunction, set_trl_lm_head_tiles
    from trl_tokenpref.token_stats import LMHead, compute_token_stats, naive_token_stats

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = (torch.randn(n, h, generator=g)).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(n, h, generator=g)).to(dtype)
    ref_weight = (weight.detach().float() + 0.01 * torch.randn(v, h, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    g_lp, g_kl = torch.rand(n, generator=g), torch.rand(n, generator=g)

    impl = args.worker
    if impl == "dpo-default":
        token_tile, vocab_tile = 4096, 32768
    else:
        token_tile, vocab_tile = 256, 4096
    set_trl_lm_head_tiles(token_tile, vocab_tile)

    def step():
        if impl.startswith("dpo"):
            lp = ChunkedLogProbFunction.apply(
                hidden, weight, None, labels, 1.0, vocab_tile, None, 1.0, ("entropy", "mean_logits", "is_top1")
            )[0]
            with torch.no_grad():
                ref_lp = ChunkedLogProbFunction.apply(
                    ref_hidden, ref_weight, None, labels, 1.0, vocab_tile, None, 1.0, ()
                )[0]
            loss = ((lp - ref_lp) * g_lp).sum()
        elif impl == "tdpo-trl-kernels":
            lp = ChunkedLogProbFunction.apply(
                hidden, weight, None, labels, 1.0, vocab_tile, None, 1.0, ("entropy", "mean_logits", "is_top1")
            )[0]
            with torch.no_grad():
                ref_lp = ChunkedLogProbFunction.apply(
                    ref_hidden, ref_weight, None, labels, 1.0, vocab_tile, None, 1.0, ()
                )[0]
            kl, _ = ChunkedDivergenceFunction.apply(hidden, weight, None, ref_hidden, ref_weight, None, 0.0)
            loss = ((lp - ref_lp) * g_lp).sum() + (kl * g_kl).sum()
        else:
            fn = compute_token_stats if impl == "tdpo-fused" else naive_token_stats
            kwargs = {"chunk_size": args.chunk_size} if (impl == "tdpo-fused" and args.chunk_size) else {}
            stats = fn(
                hidden.unsqueeze(0),
                LMHead(weight),
                labels.unsqueeze(0),
                ref_hidden.unsqueeze(0),
                LMHead(ref_weight),
                **kwargs,
            )
            loss = ((stats.log_probs[0] - stats.ref_log_probs[0]) * g_lp).sum() + (stats.forward_kl[0] * g_kl).sum()
        loss.backward()
        hidden.grad = weight.grad = None

    step()  # warm-up (allocator, first-call overheads)
    times, wall = [], []
    with PeakMemory() as memory:
        for _ in range(args.repeats):
            start, start_wall = time.process_time(), time.perf_counter()
            step()
            times.append(time.process_time() - start)
            wall.append(time.perf_counter() - start_wall)
    return {
        "impl": impl,
        "times": times,
        "wall": wall,
        "peak_delta_mb": memory.peak_delta_mb,
        "peak_rss_mb": memory.peak_rss_mb,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one subprocess per impl and round)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per subprocess, after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="token chunk of tdpo-fused (default: ours)")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(_worker(args)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    results = {impl: {"times": [], "wall": [], "peak_delta_mb": [], "peak_rss_mb": []} for impl in args.impls}
    passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("tokens", "hidden", "vocab", "dtype")]
    passthrough += [f"--repeats={args.repeats}", f"--threads={args.threads}"]
    if args.chunk_size:
        passthrough.append(f"--chunk-size={args.chunk_size}")
    for round_index in range(args.rounds):
        for impl in args.impls:
            proc = subprocess.run(
                [sys.executable, __file__, f"--worker={impl}", *passthrough],
                capture_output=True,
                text=True,
                env=env,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"[round {round_index}] {impl} FAILED:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(lines[-1][len("RESULT ") :])
            for key in ("peak_delta_mb", "peak_rss_mb"):
                results[impl][key].append(result[key])
            results[impl]["times"] += result["times"]
            results[impl]["wall"] += result["wall"]
            print(
                f"[round {round_index}] {impl}: {[round(t, 3) for t in result['times']]} s, "
                f"peak +{result['peak_delta_mb']:.0f} MB",
                file=sys.stderr,
            )

    base = statistics.median(results["dpo-tuned"]["times"]) if results.get("dpo-tuned", {}).get("times") else None
    print(
        f"\nN={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.repeats} steps"
    )
    print(f"{'impl':18s} {'CPU s':>7s} {'min':>7s} {'max':>7s} {'x dpo-tuned':>11s} {'wall s':>7s} {'peak +MB':>9s}")
    for impl, r in results.items():
        if not r["times"]:
            print(f"{impl:18s} failed")
            continue
        med = statistics.median(r["times"])
        ratio = f"{med / base:.2f}" if base else "-"
        print(
            f"{impl:18s} {med:7.3f} {min(r['times']):7.3f} {max(r['times']):7.3f} {ratio:>11s} "
            f"{statistics.median(r['wall']):7.3f} {statistics.median(r['peak_delta_mb']):9.0f}"
        )


if __name__ == "__main__":
    main()
