"""
Figures, tables and the claim-by-claim verdicts of the controlled-sentiment experiment, written as Markdown.

[`write_report`] turns the `results.json` of `run.py` into `docs/reproduction.md` (or any path) plus three PNGs next to
it: `<stem>_frontier.png` (reward against sequential KL, one curve per method: the paper's Fig. 3a, and the forward-KL
version of its Fig. 6a), `<stem>_seqkl.png` (chosen and rejected sequential KL during training, one panel per method:
Fig. 3b–c) and `<stem>_seqkl_margin.png` (chosen, rejected and |margin| with one line per method: Fig. 3b–d).

The verdicts on the papers' claims are computed from the numbers with explicit rules (stated in the report), so the
text cannot drift from the results when the experiment is re-run.
"""

import math
import re
from pathlib import Path

from . import language
from .pipeline import METHOD_LABELS, config_from_dict, method_label, tbpo_floor_at


COLORS = {
    "dpo": "#1f77b4",
    "tdpo1": "#ff7f0e",
    "tdpo2_a0.5": "#2ca02c",
    "tdpo2_a1": "#98df8a",
    "tdpo2_a2": "#556b2f",
    "tgdpo": "#9467bd",
    "tbpo_a": "#d62728",
    "tbpo_q": "#e377c2",
    "tbpo_a_floor": "#ff9896",
    "tbpo_q_floor": "#f7b6d2",
    "tbpo_a_lam": "#8c564b",
    "tbpo_q_lam": "#c49c94",
}


# ------------------------------------------------------------------------------------------------------------------
# Helpers on the results
# ------------------------------------------------------------------------------------------------------------------


def _ok_runs(results: dict) -> list[dict]:
    return [run for run in results["runs"] if "error" not in run and run.get("evals")]


def _methods(results: dict) -> list[str]:
    done = {run["method"] for run in _ok_runs(results)}
    return [method for method in results["config"]["methods"] if method in done]


def _evals(results: dict, run: dict) -> list[dict]:
    """The run's evaluations with the shared step-0 point (the SFT model) in front."""
    return [results["sft_eval"], *run["evals"]]


def _points(results: dict, method: str, kl_key: str, betas=None) -> list[tuple[float, float]]:
    """Every (KL, reward) evaluation of `method`, all β (or those in `betas`) and steps, plus the SFT point."""
    points = [(0.0, results["sft_eval"]["reward"])]
    for run in _ok_runs(results):
        if run["method"] == method and (betas is None or run["beta"] in betas):
            points += [(e[kl_key], e["reward"]) for e in run["evals"]]
    return points


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The reward-KL frontier of a set of evaluations: the upper concave hull of the points, from the SFT point (KL 0)
    up to the point of highest reward.

    Concave, not a step function, because any point on a chord is achievable: a policy that samples from policy A
    with probability p and from B otherwise gets the interpolated reward, and, KL being convex, at most the
    interpolated KL. Beyond the highest-reward point the frontier is flat.
    """
    ordered = sorted(set(points))
    hull: list[tuple[float, float]] = []
    for point in ordered:  # Andrew's monotone chain, upper half
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (point[1] - y1) - (y2 - y1) * (point[0] - x1) >= 0:  # hull[-1] is not above the chord
                hull.pop()
            else:
                break
        hull.append(point)
    best = max(range(len(hull)), key=lambda i: hull[i][1])
    return hull[: best + 1]


def _frontier_at(frontier: list[tuple[float, float]], budget: float) -> float:
    """Reward of the frontier at KL = `budget` (linear between hull vertices, flat after the last one)."""
    if budget <= frontier[0][0]:
        return frontier[0][1]
    for (x1, y1), (x2, y2) in zip(frontier, frontier[1:]):
        if budget <= x2:
            return y1 + (y2 - y1) * (budget - x1) / (x2 - x1)
    return frontier[-1][1]


def _max_kl(results: dict, method: str, kl_key: str = "seq_kl", betas=None) -> float:
    return max(kl for kl, _ in _points(results, method, kl_key, betas))


def _floor_text(config: dict, variant: str, beta: float | None = None) -> str:
    """The `log_ratio_floor` of `{variant}_floor` runs, in words: `-cβ` when it scales with β (with its value at
    `beta`, if given), else the one absolute floor."""
    contrast = config.get(f"{variant}_floor_contrast")
    if beta is None:
        return f"{config.get('tbpo_floor'):g}" if contrast is None else f"−{contrast:g}β"
    value = f"{tbpo_floor_at(config_from_dict(config), variant, beta):g}"
    return value if contrast is None else f"{value} (−{contrast:g}β)"


def _floor_settings(config: dict) -> str:
    """The `log_ratio_floor` of each `*_floor` method in the config, in words."""
    return ", ".join(
        f"{METHOD_LABELS[variant]} {_floor_text(config, variant)}"
        for variant in ("tbpo_a", "tbpo_q")
        if f"{variant}_floor" in config["methods"]
    )


def _log_kl(kl: float) -> float:
    """ln of a sequential KL, floored at `KL_RATIO_FLOOR` (the stabiliser's ratios and their table)."""
    return math.log(max(kl, KL_RATIO_FLOOR))


def _reach_at_step(results: dict, method: str, step: int) -> float:
    """The largest MC sequential KL `method` reached, over β, at evaluations up to `step`: how its reach grows."""
    values = [
        e["seq_kl"] for run in _ok_runs(results) if run["method"] == method for e in run["evals"] if e["step"] <= step
    ]
    return max([0.0, *values])


def _reward_se(evaluation: dict) -> float:
    """Standard error of a mean reward (the samples of one evaluation are independent)."""
    num_samples = evaluation.get("num_samples") or 1
    return evaluation["reward_std"] / math.sqrt(num_samples)


def _run(results: dict, method: str, beta: float) -> dict | None:
    for run in _ok_runs(results):
        if run["method"] == method and run["beta"] == beta:
            return run
    return None


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------------------


def plot_frontier(results: dict, path: Path) -> None:
    """Reward against sequential reverse KL (MC, Fig. 3a) and against forward KL (Fig. 6a) on the generations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = [
        (
            "seq_kl",
            "sequential KL(πθ ‖ π_ref) on generations (nats, MC; symlog)",
            "(a) reward vs sequential KL (Fig. 3a)",
        ),
        (
            "forward_kl",
            "sequential KL(π_ref ‖ πθ) on generations (nats; symlog)",
            "(b) reward vs forward KL (Fig. 6a)",
        ),
    ]
    for ax, (key, xlabel, title) in zip(axes, panels):
        for method in _methods(results):
            color = COLORS.get(method)
            points = _points(results, method, key)
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=9, alpha=0.35, color=color)
            frontier = _frontier(points)
            # The chords are linear in KL: sample them densely so that they are drawn right on the symlog axis
            xs, ys = [frontier[0][0]], [frontier[0][1]]
            for (x1, y1), (x2, y2) in zip(frontier, frontier[1:]):
                for i in range(1, 21):
                    xs.append(x1 + (x2 - x1) * i / 20)
                    ys.append(y1 + (y2 - y1) * i / 20)
            ax.plot(xs, ys, color=color, lw=1.8, label=method_label(method))
        ax.axhline(results["sft_eval"]["reward"], color="grey", lw=0.8, ls=":", label="SFT (π_ref)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean reward on held-out prompts")
        ax.set_title(title)
        # Linear up to 1 nat, logarithmic beyond: the runs span 0.1 to tens of nats
        ax.set_xscale("symlog", linthresh=1.0)
        lowest = min(kl for method in _methods(results) for kl, _ in _points(results, method, key))
        ax.set_xlim(left=min(0.0, lowest))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Offline controlled sentiment: every evaluation of every β (dots) and each method's frontier (line)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_seqkl(results: dict, path: Path, beta: float) -> None:
    """Chosen and rejected sequential KL on the held-out pairs during training, one panel per method (Fig. 3b–c)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in _methods(results) if _run(results, m, beta)]
    if not methods:
        return
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), sharex=True, sharey=False, squeeze=False)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        evals = _evals(results, _run(results, method, beta))
        steps = [e["step"] for e in evals]
        ax.plot(steps, [e["kl_chosen"] for e in evals], color="#2ca02c", lw=1.8, label="chosen (forward)")
        ax.plot(steps, [e["kl_rejected"] for e in evals], color="#d62728", lw=1.8, label="rejected (forward)")
        ax.plot(
            steps, [e["reverse_kl_chosen"] for e in evals], color="#2ca02c", lw=0.9, ls="--", label="chosen (reverse)"
        )
        ax.plot(
            steps,
            [e["reverse_kl_rejected"] for e in evals],
            color="#d62728",
            lw=0.9,
            ls="--",
            label="rejected (reverse)",
        )
        ax.set_title(method_label(method), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("sequential KL (nats)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"Sequential KL on held-out chosen / rejected responses during training (β = {beta}); solid: Σ_t KL(π_ref‖πθ) "
        "(TDPO's kl/*), dashed: Σ_t KL(πθ‖π_ref)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_seqkl_margin(results: dict, path: Path, beta: float) -> None:
    """The paper's layout of Fig. 3b–d: chosen, rejected and |rejected − chosen|, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("(b) chosen", lambda e: e["kl_chosen"]),
        ("(c) rejected", lambda e: e["kl_rejected"]),
        ("(d) |margin| = |rejected − chosen|", lambda e: abs(e["kl_rejected"] - e["kl_chosen"])),
    ]
    for ax, (title, value) in zip(axes, panels):
        for method in _methods(results):
            run = _run(results, method, beta)
            if run is None:
                continue
            evals = _evals(results, run)
            ax.plot(
                [e["step"] for e in evals],
                [value(e) for e in evals],
                color=COLORS.get(method),
                lw=1.6,
                label=method_label(method),
            )
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel("sequential forward KL (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Sequential KL(π_ref ‖ πθ) on held-out pairs, β = {beta}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------------
# Claims
# ------------------------------------------------------------------------------------------------------------------


FRONTIER_BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def frontier_summary(results: dict) -> dict[str, dict]:
    """Each method's frontier (see [`_frontier`]) at fixed KL budgets, and how far the method went.

    A budget beyond the largest KL a method reached is flagged (`capped`): its value there is just the method's best
    reward, not a measurement at that KL.
    """
    summary = {}
    for method in _methods(results):
        frontier = _frontier(_points(results, method, "seq_kl"))
        reach = _max_kl(results, method)
        summary[method] = {
            "at_budgets": [_frontier_at(frontier, b) for b in FRONTIER_BUDGETS],
            "capped": [b > reach for b in FRONTIER_BUDGETS],
            "max_kl": reach,
            "best_reward": frontier[-1][1],
            "kl_of_best": frontier[-1][0],
        }
    return summary


def compare_frontiers(results: dict, first: str, second: str, reach: float | None = None, betas=None) -> dict:
    """Mean difference of two frontiers (of the runs at `betas`, all by default) over 50 equally spaced KL budgets in
    (0, reach]; by default `reach` is the KL range both methods explored, the smaller of their largest KL."""
    if reach is None:
        reach = min(_max_kl(results, first, betas=betas), _max_kl(results, second, betas=betas))
    grid = [reach * (i + 1) / 50 for i in range(50)]
    fa = _frontier(_points(results, first, "seq_kl", betas))
    fb = _frontier(_points(results, second, "seq_kl", betas))
    mean_a = sum(_frontier_at(fa, x) for x in grid) / len(grid)
    mean_b = sum(_frontier_at(fb, x) for x in grid) / len(grid)
    at = [(x, _frontier_at(fa, x), _frontier_at(fb, x)) for x in (reach / 4, reach / 2, reach)]
    return {"reach": reach, "mean_first": mean_a, "mean_second": mean_b, "difference": mean_a - mean_b, "at": at}


def _slope(evals: list[dict], key: str) -> float:
    """Least-squares slope of `key` against the step, per 100 steps."""
    xs = [e["step"] for e in evals]
    ys = [e[key] for e in evals]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return 100 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else math.nan


def assess_claims(results: dict) -> list[dict]:
    """The TDPO paper's Fig. 3 claims, each with the numbers that bear on it and a verdict by a stated rule."""
    claims = []
    # Noise scale of a frontier value: about one reward standard error of a single evaluation
    se = _reward_se(results["sft_eval"])
    done = _methods(results)

    def frontier_claim(name: str, better: str, worse: str) -> None:
        if better not in done or worse not in done:
            claims.append({"claim": name, "verdict": "not tested", "evidence": f"{better} or {worse} did not run."})
            return
        c = compare_frontiers(results, better, worse)
        if abs(c["difference"]) < 2 * se:
            verdict = "inconclusive (within noise)"
        else:
            verdict = "supported" if c["difference"] > 0 else "not supported (reversed)"
        at = ", ".join(f"{a:.3f} vs {b:.3f} at KL {x:.2f}" for x, a, b in c["at"])
        claims.append(
            {
                "claim": name,
                "verdict": verdict,
                "evidence": f"over the KL range both reached, (0, {c['reach']:.2f}] nats: mean frontier reward "
                f"{c['mean_first']:.3f} vs {c['mean_second']:.3f} (difference {c['difference']:+.3f}; one "
                f"evaluation's reward SE ≈ {se:.3f}, rule: |difference| ≥ 2 SE); {at}. Largest reward reached: "
                f"{_frontier(_points(results, better, 'seq_kl'))[-1][1]:.3f} vs "
                f"{_frontier(_points(results, worse, 'seq_kl'))[-1][1]:.3f}.",
            }
        )

    frontier_claim("TDPO2 (α=0.5)'s reward–KL frontier lies above DPO's", "tdpo2_a0.5", "dpo")
    frontier_claim("TDPO1's frontier lies above DPO's", "tdpo1", "dpo")
    frontier_claim("TDPO2 (α=0.5)'s frontier lies above TDPO1's", "tdpo2_a0.5", "tdpo1")

    betas = results["config"]["betas"]

    def final(method: str, b: float) -> dict | None:
        run = _run(results, method, b)
        return run["evals"][-1] if run else None

    def relative_margin(e: dict) -> float:
        """|rejected − chosen| / (rejected + chosen): the imbalance, whatever the size of the KL."""
        return abs(e["kl_rejected"] - e["kl_chosen"]) / max(1e-9, e["kl_rejected"] + e["kl_chosen"])

    def verdict_by_count(count: int, total: int) -> str:
        if not total or not count:
            return "not supported"
        return "supported" if 2 * count > total else "partly supported"

    # DPO: rejected-side KL growing faster than chosen-side, at every β
    lines, much_faster, faster = [], 0, 0
    for b in betas:
        run = _run(results, "dpo", b)
        if run is None:
            continue
        evals = _evals(results, run)
        slope_c, slope_r = _slope(evals, "kl_chosen"), _slope(evals, "kl_rejected")
        ratio = slope_r / slope_c if slope_c > 0 else math.inf
        much_faster += ratio > 1.5
        faster += ratio > 1.1
        lines.append(
            f"β = {b}: slope {slope_r:.2f} vs {slope_c:.2f} nats/100 steps (ratio {ratio:.2f}), final "
            f"{evals[-1]['kl_rejected']:.2f} vs {evals[-1]['kl_chosen']:.2f}"
        )
    if lines:
        verdict = verdict_by_count(much_faster, len(lines))
        if verdict == "not supported" and faster:
            verdict = "partly supported (faster at some β, never much faster)"
        claims.append(
            {
                "claim": "DPO's sequential KL grows much faster on rejected than on chosen responses",
                "verdict": verdict,
                "evidence": "rejected vs chosen: " + "; ".join(lines) + f" (rule: slope ratio > 1.5; holds at "
                f"{much_faster} of {len(lines)} β, > 1.1 at {faster}).",
            }
        )
    # TDPO2 keeps them balanced: |margin| smaller than DPO's, in nats and relative to the KL
    lines, smaller_abs, smaller_rel = [], 0, 0
    for b in betas:
        d, t = final("dpo", b), final("tdpo2_a0.5", b)
        if d is None or t is None:
            continue
        margin_d, margin_t = abs(d["kl_rejected"] - d["kl_chosen"]), abs(t["kl_rejected"] - t["kl_chosen"])
        smaller_abs += margin_t < 0.75 * margin_d
        smaller_rel += relative_margin(t) < 0.75 * relative_margin(d)
        lines.append(
            f"β = {b}: {margin_t:.2f} vs {margin_d:.2f} nats (relative {relative_margin(t):.2f} vs "
            f"{relative_margin(d):.2f})"
        )
    if lines:
        if 2 * min(smaller_abs, smaller_rel) > len(lines):
            verdict = "supported"
        elif 2 * smaller_abs > len(lines):
            verdict = "supported in absolute terms only (TDPO2's KL is smaller overall)"
        elif smaller_abs or smaller_rel:
            verdict = f"not supported (smaller at {max(smaller_abs, smaller_rel)} of {len(lines)} β only)"
        else:
            verdict = "not supported"
        claims.append(
            {
                "claim": "TDPO2 keeps the chosen and rejected sequential KL balanced (smaller |margin| than DPO)",
                "verdict": verdict,
                "evidence": "final |margin| TDPO2 (α=0.5) vs DPO: " + "; ".join(lines) + f" (rule: TDPO2 < 0.75 × "
                f"DPO; in nats at {smaller_abs} of {len(lines)} β, relative to the KL sum at {smaller_rel}).",
            }
        )
    # TDPO1 raises the chosen-side KL more than TDPO2 (its +Σκ_w term has a gradient; TDPO2's is stopped)
    lines, count = [], 0
    for b in betas:
        one, two = final("tdpo1", b), final("tdpo2_a0.5", b)
        if one is None or two is None:
            continue
        share1 = one["kl_chosen"] / max(1e-9, one["kl_rejected"])
        share2 = two["kl_chosen"] / max(1e-9, two["kl_rejected"])
        count += one["kl_chosen"] > two["kl_chosen"] and share1 > share2
        lines.append(
            f"β = {b}: chosen KL {one['kl_chosen']:.2f} vs {two['kl_chosen']:.2f}, chosen/rejected {share1:.2f} vs "
            f"{share2:.2f}"
        )
    if lines:
        claims.append(
            {
                "claim": "TDPO1 raises the chosen-side sequential KL more than TDPO2 (paper §4.4, §5.1)",
                "verdict": verdict_by_count(count, len(lines)),
                "evidence": "final, TDPO1 vs TDPO2 (α=0.5): " + "; ".join(lines) + f" (rule: both the chosen KL and "
                f"the chosen/rejected ratio higher for TDPO1; holds at {count} of {len(lines)} β).",
            }
        )
    # Larger α makes reward harder to optimise: final reward per β, α = 0.5, 1, 2
    alphas = [m for m in ("tdpo2_a0.5", "tdpo2_a1", "tdpo2_a2") if m in _methods(results)]
    if len(alphas) >= 2:
        lines, orderly = [], 0
        for b in results["config"]["betas"]:
            finals = [_run(results, m, b) for m in alphas]
            if any(f is None for f in finals):
                continue
            rewards = [f["evals"][-1]["reward"] for f in finals]
            gains = [r - results["sft_eval"]["reward"] for r in rewards]
            orderly += rewards[0] > rewards[-1]
            lines.append(
                f"β = {b}: " + ", ".join(f"{m.removeprefix('tdpo2_a')}→{g:+.3f}" for m, g in zip(alphas, gains))
            )
        verdict = (
            "supported" if orderly == len(lines) and lines else ("partly supported" if orderly else "not supported")
        )
        claims.append(
            {
                "claim": "A larger α in TDPO2 makes the reward harder to optimise",
                "verdict": verdict,
                "evidence": "final reward gain over SFT by α: " + "; ".join(lines) + f" (largest α below α=0.5 at "
                f"{orderly} of {len(lines)} β).",
            }
        )
    # Claims of the other two papers that this experiment can speak to (their results, docs/algorithms.md §5)
    frontier_claim("TGDPO (guided by the DPO model) does at least as well as DPO (TGDPO paper)", "tgdpo", "dpo")
    for method in ("tbpo_a", "tbpo_q"):
        if method not in _methods(results) or "dpo" not in _methods(results):
            continue
        lines, higher = [], 0
        for b in results["config"]["betas"]:
            ours, dpo_run = _run(results, method, b), _run(results, "dpo", b)
            if ours is None or dpo_run is None:
                continue
            e, d = ours["evals"][-1], dpo_run["evals"][-1]
            higher += e["entropy"] > d["entropy"] and e["distinct_1"] > d["distinct_1"]
            lines.append(
                f"β = {b}: entropy {e['entropy']:.3f} vs {d['entropy']:.3f}, distinct-1 {e['distinct_1']:.3f} vs "
                f"{d['distinct_1']:.3f}"
            )
        if lines:
            verdict = "supported" if higher == len(lines) else ("partly supported" if higher else "not supported")
            claims.append(
                {
                    "claim": f"{METHOD_LABELS[method]} keeps more output diversity than DPO (higher entropy and "
                    "distinct-1; TBPO paper)",
                    "verdict": verdict,
                    "evidence": "final step, " + "; ".join(lines) + f" (both higher at {higher} of {len(lines)} β).",
                }
            )
    return claims


def observe(results: dict) -> list[str]:
    """Facts about the runs that no claim covers but a reader should know: unstable runs and length drift."""
    lines = []
    sft = results["sft_eval"]
    unstable = []
    for run in _ok_runs(results):
        evals = run["evals"]
        final, peak = evals[-1], max(evals, key=lambda e: e["reward"])
        reasons = []
        if final["seq_kl"] > 20:
            reasons.append(f"sequential KL {final['seq_kl']:.0f} nats")
        if peak["reward"] - final["reward"] > 0.05:
            reasons.append(f"reward fell from {peak['reward']:.3f} (step {peak['step']}) to {final['reward']:.3f}")
        if final["eos_rate"] < 0.8:
            reasons.append(f"only {final['eos_rate']:.0%} of samples end with EOS")
        if reasons:
            unstable.append(f"{method_label(run['method'])} β = {run['beta']} ({', '.join(reasons)})")
    if unstable:
        lines.append(
            "Runs that drift far from π_ref or degrade by the last step (KL > 20 nats, reward 0.05 below its peak, or "
            "fewer than 80% of samples ending with EOS): " + "; ".join(unstable) + "."
        )
    longer = []
    for method in _methods(results):
        finals = [
            _run(results, method, b)["evals"][-1] for b in results["config"]["betas"] if _run(results, method, b)
        ]
        mean_length = sum(e["length"] for e in finals) / len(finals)
        longer.append(f"{method_label(method)} {mean_length:.1f}")
    lines.append(
        f"Mean completion length at the last step, averaged over β (SFT: {sft['length']:.1f} tokens; the reward "
        f"grows with the number of positive words, so longer is one way to raise it): " + ", ".join(longer) + "."
    )
    return lines


# ------------------------------------------------------------------------------------------------------------------
# The Markdown report
# ------------------------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    # A literal "|" (as in |margin|) would end the cell
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    results: dict, doc_path: str | Path, replicates: list[dict] | None = None, preamble: list[str] | None = None
) -> Path:
    """Writes the Markdown report and its figures; returns the report's path.

    `replicates` are the results of the same pipeline with other seeds (usually on a subset of methods): their claim
    verdicts get a section of their own, so that a verdict that flips with the seed is visible. `preamble` (the
    several-seed sections of [`write_multiseed_report`]) replaces this run's own summary table and command section,
    and what follows is then the detail of this one seed.
    """
    doc_path = Path(doc_path)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    config = results["config"]
    manifest = results["manifest"]
    beta_curves = config["curves_beta"]
    stem = doc_path.stem
    figures = {
        "frontier": doc_path.with_name(f"{stem}_frontier.png"),
        "seqkl": doc_path.with_name(f"{stem}_seqkl.png"),
        "margin": doc_path.with_name(f"{stem}_seqkl_margin.png"),
    }
    if _ok_runs(results):
        plot_frontier(results, figures["frontier"])
        plot_seqkl(results, figures["seqkl"], beta_curves)
        plot_seqkl_margin(results, figures["margin"], beta_curves)

    sft = results["sft_eval"]
    num_samples = config["num_held_out_prompts"] * config["eval_samples_per_prompt"]
    out = []
    out.append("# Reproduction: TDPO's controlled-sentiment experiment, offline at CPU scale")
    out.append(
        "The TDPO paper (Zeng et al., ICML 2024, §5.1, Fig. 3) aligns GPT-2 Large, fine-tuned on IMDb, to write positive "
        "reviews, scored by a RoBERTa sentiment classifier, and compares DPO, TDPO1 and TDPO2 by the reward they reach "
        "for a given sequential KL from the reference, and by how the sequential KL of chosen and rejected responses "
        "evolves in training. Neither IMDb, GPT-2 nor the classifier can be downloaded here, so this experiment rebuilds "
        "the same protocol from scratch on CPU: a synthetic review language with a programmatic sentiment reward, a "
        f"small Llama ({manifest['num_parameters']:,} parameters) trained from scratch as the SFT model, preference "
        "pairs sampled from it and labelled by the reward, then every method of this package at several β."
    )
    out.append(
        "**This is a small-scale analogue, not a replication of the paper's numbers**: the model is ~1000× smaller "
        "than GPT-2 Large, the language is synthetic, and each run is a few hundred steps. What it can show is "
        "whether the *qualitative* behaviour the paper reports appears under the same protocol."
    )
    claims = assess_claims(results)
    if preamble:
        out += preamble
        out.append(f"## Seed {config['seed']} in detail")
        out.append(
            "Everything below is the first seed alone (its figures, every run's final evaluation, and the single-seed "
            "verdicts, whose noise rule is one evaluation's standard error); the other seeds' numbers are in "
            "`seed<N>/results.json` of the output directory."
        )
    elif claims:
        seeds = [results, *(replicates or [])]
        verdicts = [
            {c["claim"]: c["verdict"] for c in assess_claims(r) if c["verdict"] != "not tested"} for r in seeds
        ]
        header = ["claim", *(f"seed {r['config']['seed']}" for r in seeds)]
        rows = [
            [claim["claim"], *(f"**{v[claim['claim']]}**" if claim["claim"] in v else "not run" for v in verdicts)]
            for claim in claims
        ]
        out.append(
            '**Summary of the verdicts** (numbers and rules in "What the numbers support, and what they do not"'
            + (", the second seed in its replicate section" if replicates else "")
            + "):"
        )
        out.append(_table(header, rows))
    if not preamble:
        _command_section(results, out)
    _setup_section(results, out, figures, num_samples, beta_curves)
    _results_sections(results, out, figures, num_samples, beta_curves, claims, replicates, sft, preamble)
    doc_path.write_text("\n\n".join(out) + "\n")
    return doc_path


def _command_section(results: dict, out: list[str]) -> None:
    config, timings, env = results["config"], results["timings"], results["environment"]
    out.append("## Command")
    out.append(f"```bash\n{results['command']}\n```")
    quick = (
        " (the `--quick` smoke configuration: tiny sizes, a handful of steps; numbers are meaningless)"
        if config["quick"]
        else ""
    )
    out.append(
        f"Total wall time **{timings.get('total_s', float('nan')) / 60:.1f} min**{quick}. Everything intermediate (the "
        "SFT model, the pairs, every run's evaluations in `results.json`) is in the output directory; `--reuse` "
        "re-runs the preference stage on the same SFT model and pairs."
    )
    run_cpu = [run["cpu_time_s"] for run in _ok_runs(results) if run.get("cpu_time_s")]
    if run_cpu and not config["quick"]:
        load = env.get("load_average_at_start") or [math.nan]
        load_end = env.get("load_average_at_end") or [math.nan]
        out.append(
            f"The {env['cpu_count']} cores were shared with other jobs during this run (load average {load[0]:.1f} at "
            f"the start, {load_end[0]:.1f} at the end), which stretches the wall times. The {len(run_cpu)} preference "
            f"runs used {sum(run_cpu) / 60:.1f} CPU-minutes in all ({sum(run_cpu) / len(run_cpu):.0f} s each on "
            f"average, evaluations included), i.e. {sum(run_cpu) / 60 / config['workers']:.1f} min on "
            f"{config['workers']} free cores; per-stage times are under Reproducibility. On a loaded machine, "
            "`--main-threads 1` keeps the SFT stage from slowing down with oversubscribed threads."
        )


def _setup_section(results: dict, out: list[str], figures: dict, num_samples: int, beta_curves: float) -> None:
    config, manifest = results["config"], results["manifest"]
    out.append("## Setup")
    pair_stats = manifest["pair_stats"]
    out.append(
        "\n".join(
            [
                "- **Language and reward** (`benchmarks/controlled_sentiment/language.py`): reviews are an opening "
                "(`[lead-in] the SUBJECT was/is/felt/seemed`, the prompt) and one to four clauses built from a lexicon "
                f"of {len(language.POSITIVE_ADJECTIVES) + len(language.NEGATIVE_ADJECTIVES)} graded sentiment "
                f"adjectives and {len(language.POSITIVE_VERBS) + len(language.NEGATIVE_VERBS)} verbs, "
                f"{len(language.NEUTRAL_ADJECTIVES)} neutral adjectives, {len(language.INTENSIFIERS)} intensifiers, "
                f"{len(language.NEGATIONS)} negations and neutral fillers. The reward is "
                f"`sigmoid(score / {language.REWARD_TEMPERATURE:g})`, `score` the sum of the sentiment weights with "
                "intensifiers multiplying and negations flipping and halving the next sentiment word of the clause "
                '("not bad" > 0 > "not great"). It plays the classifier\'s P(positive): 0.5 without sentiment.',
                f"- **Prompts**: {config['num_held_out_prompts']} held-out openings (never "
                "used for SFT or pairs) for every evaluation; the other openings for SFT and pairs.",
                f"- **Model**: Llama, hidden {config['hidden_size']}, {config['num_layers']} layers, "
                f"{config['num_heads']} heads, MLP {config['intermediate_size']}, byte-level BPE of "
                f"{manifest['vocab_size']} tokens, all built from scratch.",
                f"- **SFT**: {config['sft_steps']} AdamW steps of {config['sft_batch_size']} reviews (lr "
                f"{config['sft_learning_rate']}, warm-up then cosine) on {config['sft_reviews']:,} synthetic reviews "
                f"of mixed sentiment; final loss {manifest['sft_history'][-1]['loss']:.3f} nats/token. The SFT model "
                "is the reference π_ref of every method.",
                f"- **Pairs**: {config['samples_per_prompt']} completions per prompt sampled from the SFT model "
                f"(temperature 1, no top-k/top-p, ≤ {config['max_new_tokens']} tokens) for "
                f"{config['pair_prompt_draws']} prompt draws; sorted by reward and paired best-with-worst: "
                f"**{pair_stats['pairs']} train pairs** (chosen reward {pair_stats['chosen_reward_mean']:.3f}, "
                f"rejected {pair_stats['rejected_reward_mean']:.3f}; {pair_stats['dropped_ties']} ties dropped), and "
                f"{manifest['num_eval_pairs']} held-out pairs from held-out prompts for the sequential-KL curves.",
                f"- **Preference training**: every method from the SFT model with TRL's trainer machinery "
                f"(`trl.DPOTrainer` for DPO, this package's trainers for the rest), {config['max_steps']} steps of "
                f"{config['batch_size']} pairs, AdamW at a constant lr {config['learning_rate']}, fp32, same data order "
                f"for all; β ∈ {{{', '.join(str(b) for b in config['betas'])}}}. Methods: "
                f"{', '.join(method_label(m) for m in config['methods'])}"
                + (
                    f"; TGDPO (α = {config['tgdpo_alpha']}) guided by the DPO model trained at β = "
                    f"{config['guidance_beta']}"
                    if "tgdpo" in config["methods"]
                    else ""
                )
                + "; TBPO with its defaults (SBA generator, λ = 0, s = 4; TBPO-Q's baseline head of width 1024 at lr "
                "1e-3)"
                + (
                    f", and with the stabiliser `log_ratio_floor` (the `+ log R floor` runs: {_floor_settings(config)}) "
                    f"at β ∈ {{{', '.join(str(b) for b in config.get('stabiliser_betas', []))}}}, where the plain TBPO "
                    "runs too"
                    if any(m.endswith("_floor") for m in config["methods"])
                    else ""
                )
                + ".",
                f"- **Evaluation** (`trl_tokenpref.evaluation.GenerationEvalCallback`, every {config['eval_every']} "
                f"steps): {num_samples} completions ({config['eval_samples_per_prompt']} per held-out prompt, "
                "temperature 1, fixed seed) scored by the reward; the sequential KL(πθ‖π_ref) on them, as the "
                "Monte-Carlo sum Σ_t log πθ(y_t)/π_ref(y_t) the DPO and TDPO papers plot (also its exact per-step "
                "version and the forward KL); per-token entropy; distinct-1/2; and on the fixed held-out pairs the "
                "sequential forward KL Σ_t KL(π_ref‖πθ) of the chosen and of the rejected response (TDPO's `kl/*`) "
                "for every method alike (DPO's trainer logs none).",
            ]
        )
    )


def _results_sections(
    results: dict,
    out: list[str],
    figures: dict,
    num_samples: int,
    beta_curves: float,
    claims: list[dict],
    replicates: list[dict] | None,
    sft: dict,
    preamble: list[str] | None = None,
) -> None:
    config, manifest, timings, env = results["config"], results["manifest"], results["timings"], results["environment"]
    out.append("## Results")
    out.append("### Reward–KL frontier (Fig. 3a)")
    out.append(f"![frontier]({figures['frontier'].name})")
    summary = frontier_summary(results)
    if summary:
        header = ["method", *(f"KL = {b:g}" for b in FRONTIER_BUDGETS), "largest KL reached", "best reward (at KL)"]
        rows = [
            [method_label(m)]
            + [f"{v:.3f}" + ("†" if capped else "") for v, capped in zip(s["at_budgets"], s["capped"])]
            + [f"{s['max_kl']:.2f}", f"{s['best_reward']:.3f} ({s['kl_of_best']:.2f})"]
            for m, s in summary.items()
        ]
        out.append(
            "Each method's frontier is the upper concave hull of all its evaluations (every β and every evaluation step, "
            "plus the SFT point at KL 0) in the (MC sequential KL, mean reward) plane, up to its highest reward: any "
            "point of a chord is achievable by mixing two policies, and KL is convex. The table reads the frontier at "
            "fixed KL budgets (nats); † marks a budget beyond the largest KL the method reached in "
            f"{config['max_steps']} steps, where the value is only its best reward, not a measurement at that KL."
        )
        out.append(_table(header, rows))
    out.append(f"### Sequential KL on chosen and rejected responses during training (Fig. 3b–d), β = {beta_curves}")
    out.append(f"![seqkl]({figures['seqkl'].name})")
    out.append(f"![seqkl margin]({figures['margin'].name})")

    out.append("### Final evaluation of every run")
    out.append(
        f"At the last step ({config['max_steps']}), on the {num_samples} held-out samples. Reward ± its standard error; "
        "`seq KL` the MC estimate Σ log πθ/π_ref (what the frontier plots), `stepwise` its exact per-step version "
        "Σ_t KL(πθ‖π_ref)(s_t) (same expectation, lower variance), `fwd KL` Σ_t KL(π_ref‖πθ) on the same samples; "
        "`entropy` nats per token; `KL c / r` the forward sequential KL on the held-out chosen / rejected responses."
    )
    header = [
        "method",
        "β",
        "reward",
        "seq KL",
        "stepwise",
        "fwd KL",
        "entropy",
        "distinct-1",
        "distinct-2",
        "length",
        "KL c / r",
        "wall / CPU (s)",
    ]
    rows = [
        [
            "SFT (π_ref)",
            "–",
            f"{sft['reward']:.3f} ± {sft['reward_std'] / math.sqrt(num_samples):.3f}",
            "0",
            "0",
            "0",
            _fmt(sft["entropy"]),
            _fmt(sft["distinct_1"]),
            _fmt(sft["distinct_2"]),
            _fmt(sft["length"], 1),
            "0 / 0",
            "–",
        ]
    ]
    for method in _methods(results):
        for beta in sorted({run["beta"] for run in _ok_runs(results) if run["method"] == method}):
            run = _run(results, method, beta)
            if run is None:
                continue
            e = run["evals"][-1]
            rows.append(
                [
                    method_label(method),
                    f"{beta}",
                    f"{e['reward']:.3f} ± {e['reward_std'] / math.sqrt(num_samples):.3f}",
                    _fmt(e["seq_kl"], 2),
                    _fmt(e["seq_kl_stepwise"], 2),
                    _fmt(e["forward_kl"], 2),
                    _fmt(e["entropy"]),
                    _fmt(e["distinct_1"]),
                    _fmt(e["distinct_2"]),
                    _fmt(e["length"], 1),
                    f"{e['kl_chosen']:.2f} / {e['kl_rejected']:.2f}",
                    f"{run['wall_time_s']:.0f} / {run.get('cpu_time_s', float('nan')):.0f}",
                ]
            )
    out.append(_table(header, rows))
    failed = [run for run in results["runs"] if "error" in run]
    if failed:
        out.append("**Runs that did not complete:**")
        out.append("\n".join(f"- {r['method']} (β = {r.get('beta', '–')}): `{r['error'][:300]}`" for r in failed))

    out.append("## What the numbers support, and what they do not")
    out.append(
        "Each of the TDPO paper's Fig. 3 claims (and two of the TGDPO and TBPO papers' claims that this setting can "
        "test), with the numbers from this run and the rule that decides the verdict. "
        "Frontier comparisons call a difference smaller than two standard errors of one evaluation's mean reward "
        '"within noise".'
    )
    out.append(
        _table(
            ["claim", "verdict", "evidence"],
            [[c["claim"], f"**{c['verdict']}**", c["evidence"]] for c in claims],
        )
    )
    out.append(
        "Caveats that apply to every verdict: "
        + (
            "one seed (see the replicate below for the TDPO claims)"
            if replicates
            else ("this is one seed of several (the verdicts over seeds are at the top)" if preamble else "one seed")
        )
        + "; a tiny model trained for a few hundred steps rather than to "
        "convergence; a synthetic language whose reward a lexicon fully determines (the policy can raise it by "
        "choosing a handful of words, which is easier than pleasing a classifier); the frontier's KL is a Monte-Carlo "
        f"estimate from {num_samples} samples and its reward a mean over as many, so nearby frontiers are not "
        "distinguishable; the TDPO paper gives no numeric table for this experiment, only plots. The chosen/rejected "
        "imbalance of DPO in particular depends on the setup: in a development run of this pipeline with a wider MLP "
        "(512 instead of 256) and β ∈ {0.1, 0.5}, DPO at β = 0.1 ended at 17.0 (rejected) vs 9.4 (chosen) nats, a "
        "slope ratio of 1.8."
    )
    observations = observe(results)
    if observations:
        out.append("### Other observations (computed from the same runs)")
        out.append("\n".join(f"- {line}" for line in observations))
    for replicate in replicates or []:
        rep_config = replicate["config"]
        out.append(f"### Replicate: seed {rep_config['seed']} ({', '.join(rep_config['methods'])})")
        out.append(
            f"The whole pipeline again (new SFT model, new pairs, new evaluation samples) with `--seed "
            f"{rep_config['seed']}`, for the methods the TDPO paper's claims are about:"
        )
        out.append(
            f"```bash\n{replicate['command']}\n# and, to add its verdicts to this report:\n"
            f"python -m benchmarks.controlled_sentiment.run --report-only --output-dir {_output_dir(results)} "
            f"--replicates {_output_dir(replicate)}\n```"
        )
        rep_claims = [c for c in assess_claims(replicate) if c["verdict"] != "not tested"]
        out.append(
            _table(
                ["claim", "verdict", "evidence"],
                [[c["claim"], f"**{c['verdict']}**", c["evidence"]] for c in rep_claims],
            )
        )

    out.append("## Reproducibility")
    seed = config["seed"]
    out.append(
        "\n".join(
            [
                f"- **Seeds** (all derived from `--seed {seed}`): prompt split `{seed}`, model initialisation `{seed}`, "
                f"SFT reviews and batch order `{seed}`, train-pair sampling `{seed + 2}`, held-out-pair sampling "
                f"`{seed + 3}`, evaluation sampling `{seed + 1}` (the same at every evaluation of every run), "
                f"trainer seed (data order, for every method) `{seed}`. The tokenizer is deterministic.",
                f"- **Hardware**: {env['cpu_count']} CPU cores ({env['processor']}, {env['platform']}); "
                f"{config['workers']} runs in parallel with {config['threads_per_worker']} torch thread(s) each. Load "
                f"average at start {_load(env.get('load_average_at_start'))}, at end "
                f"{_load(env.get('load_average_at_end'))}. Other processes on the machine slow the wall times, not the "
                "results: every stage is seeded and deterministic for a given thread count (SFT uses "
                f"{config.get('main_threads') or config['workers'] * config['threads_per_worker']} threads, each "
                "preference run "
                f"{config['threads_per_worker']}).",
                f"- **Software**: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
                f"TRL {env['trl']}.",
            ]
        )
    )
    stage_rows = [
        [name, f"{timings[key]:.0f}"]
        for name, key in [
            ("tokenizer + model", "build_tokenizer_and_model_s"),
            ("SFT", "sft_s"),
            ("preference pairs", "preference_pairs_s"),
            ("SFT evaluation (step 0)", "sft_eval_s"),
            ("preference training + periodic evaluation (all runs)", "preference_training_s"),
            ("report", "report_s"),
            ("total", "total_s"),
            ("total CPU time of all processes (not wall time)", "cpu_total_s"),
        ]
        if isinstance(timings.get(key), (int, float))
    ]
    out.append(
        "Per-stage wall time (s):"
        + (
            " SFT and pairs reused from a previous run with the same settings."
            if timings.get("reused_sft_and_data")
            else ""
        )
    )
    out.append(_table(["stage", "wall time (s)"], stage_rows))
    example = manifest.get("examples", [{}])[0]
    if example:
        out.append(
            f"An example train pair, prompt `{example['prompt']}`: chosen `{example['chosen'].strip()}` (reward "
            f"{example['chosen_reward']:.3f}), rejected `{example['rejected'].strip()}` (reward "
            f"{example['rejected_reward']:.3f})."
        )


def _output_dir(results: dict) -> str:
    """The `--output-dir` of the recorded command (the default if it was not given)."""
    match = re.search(r"--output-dir[ =](\S+)", results["command"])
    return match.group(1) if match else "outputs/controlled_sentiment"


def _load(load) -> str:
    return "–" if not load else " / ".join(f"{value:.1f}" for value in load) + " (1 / 5 / 15 min)"


# ------------------------------------------------------------------------------------------------------------------
# Several seeds: effect sizes with confidence intervals, and verdicts by rules fixed before the runs
# ------------------------------------------------------------------------------------------------------------------

# Two-sided 95% Student t quantiles t_{0.975, n-1} for n seeds
_T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
# A frontier comparison needs both methods to have explored at least this much KL (nats) in every seed
MIN_OVERLAP_KL = 1.0
# "At least as well as": the non-inferiority margin of a frontier comparison (reward)
NON_INFERIORITY_MARGIN = 0.02
# The stabiliser's KL ratio: a run's KL below this (nats) counts as this, so that ln(KL_plain / KL_stabilised) stays
# finite for a run that hardly moved
KL_RATIO_FLOOR = 0.01

VERDICT_RULES = f"""\
These rules were fixed in the code (`report.py`) before the runs whose numbers follow, and the verdicts are computed
from the numbers by them:

- **Unit of replication**: the seed of the *whole* pipeline (SFT model, preference pairs, data order, evaluation
  samples). Each claim is reduced to one number per seed (its *effect*, defined below); the report gives the mean over
  seeds and its **95% confidence interval** `mean ± t(0.975, n−1) · sd / √n` (Student t over the n seeds).
- **Verdict**: **supported** when the whole interval lies on the side of the claim (above 0, or above the stated
  threshold), **contradicted** when the whole interval lies on the other side, **inconclusive** otherwise. With fewer
  than 2 seeds there is no interval and every verdict is inconclusive.
- **Frontier claims** ("A's reward–KL frontier lies above B's"): the effect is the mean, over 50 equally spaced KL
  budgets in (0, K], of frontier_A(KL) − frontier_B(KL) (the concave-hull frontier of every evaluation, defined under
  Results). K is the same for every seed: the smallest, over seeds and over both methods, of the largest sequential KL
  a method reached, so that both methods were measured across the whole range in every seed. If K < {MIN_OVERLAP_KL:g} nat
  the claim is **not decidable** at this scale. The claim is thus only tested over (0, K], which the table states.
- **"At least as well as"** (TGDPO vs DPO): the same effect; supported when the interval lies above
  −{NON_INFERIORITY_MARGIN:g} (non-inferiority margin), contradicted when it lies below it.
- **The stabiliser at equal KL** (added after the first 3-seed run of the default command, in which the plain TBPO
  runs gained final reward by drifting and no longer ending their completions, so that "final reward at the same β"
  favours the drift; first tested on new seeds): the frontier effect above, over the runs at the stabiliser β only,
  stabilised minus plain, with the non-inferiority margin.
- **DPO's rejected-side KL grows much faster**: effect = the ratio of the least-squares slopes (rejected / chosen) of
  the held-out-pair sequential KL over training, averaged over β. Supported when the interval lies above 1.5 ("much
  faster"), partly supported when above 1 only, contradicted when below 1.
- **TDPO2 keeps chosen and rejected balanced**: effect = relative |margin| |KL_r − KL_c| / (KL_r + KL_c) of DPO minus
  that of TDPO2 (α = 0.5), at the last step, averaged over β (relative, because TDPO2 moves less overall).
- **TDPO1 raises the chosen side more than TDPO2**: effect = chosen/rejected KL ratio of TDPO1 minus TDPO2's, last
  step, averaged over β.
- **Larger α is harder to optimise**: effect = final reward of TDPO2 α = 0.5 minus α = 2, averaged over β.
- **TBPO keeps more diversity than DPO**: effects = per-token entropy and distinct-1 of TBPO minus DPO's, last step,
  averaged over β; supported when both intervals lie above 0, contradicted when either lies below 0.
- **The stabiliser** (this package's claim, not a paper's): at the stabiliser β, effect = ln(KL_plain / KL_stabilised)
  of the final exact per-step sequential KL Σ_t KL(πθ‖π_ref)(s_t) (`stepwise`: never negative, unlike the Monte-Carlo
  sum; each floored at {KL_RATIO_FLOOR:g} nats), averaged over β: a log ratio, because the plain run's drift varies
  tenfold between seeds, so a difference in nats would be dominated by the seed that drifts most. Supported when the
  interval lies above 0 (the drift is smaller; the table also gives the factor e^effect) *and* the stabilised run's
  final reward is not worse by more than the non-inferiority margin (interval of its reward difference above
  −{NON_INFERIORITY_MARGIN:g}); contradicted when the log-ratio interval lies below 0 or the reward interval below
  −{NON_INFERIORITY_MARGIN:g}.
"""


def _interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval over seeds; the interval is (nan, nan) with fewer than 2 values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = _T_975.get(len(values), 1.96) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _side(low: float, high: float, threshold: float) -> str:
    if math.isnan(low):
        return "inconclusive (fewer than 2 seeds)"
    if low > threshold:
        return "supported"
    if high < threshold:
        return "contradicted"
    return "inconclusive"


def _final(results: dict, method: str, beta: float) -> dict | None:
    run = _run(results, method, beta)
    return run["evals"][-1] if run else None


def _mean_over_betas(results: dict, betas, effect) -> float | None:
    values = [effect(b) for b in betas]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _fmt_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(low):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def assess_claims_over_seeds(all_results: list[dict]) -> list[dict]:
    """Every claim with its per-seed effects, mean and 95% interval over seeds, and the verdict by `VERDICT_RULES`."""
    claims = []
    betas = all_results[0]["config"]["betas"]

    def done(method: str) -> bool:
        return all(method in _methods(r) for r in all_results)

    def add(name, effects, threshold, verdict=None, scope="", unit="reward", digits=3, extra=""):
        mean, low, high = _interval(effects)
        claims.append(
            {
                "claim": name,
                "verdict": verdict or _side(low, high, threshold),
                "effect": (mean, low, high),
                "per_seed": effects,
                "scope": scope,
                "unit": unit,
                "digits": digits,
                "extra": extra,
            }
        )

    def frontier_claim(name, better, worse, threshold=0.0, betas=None):
        if not (done(better) and done(worse)):  # a run of a subset of the methods: as every other claim, not listed
            return
        reach = min(min(_max_kl(r, better, betas=betas), _max_kl(r, worse, betas=betas)) for r in all_results)
        effects = [compare_frontiers(r, better, worse, reach, betas)["difference"] for r in all_results]
        verdict = None
        if reach < MIN_OVERLAP_KL:
            verdict = f"not decidable (overlap {reach:.2f} < {MIN_OVERLAP_KL:g} nat)"
        reaches = ", ".join(
            f"{_max_kl(r, better, betas=betas):.1f} vs {_max_kl(r, worse, betas=betas):.1f}" for r in all_results
        )
        runs = "" if betas is None else f"runs at β ∈ {{{', '.join(str(b) for b in betas)}}}, "
        add(
            name,
            effects,
            threshold,
            verdict,
            scope=f"{runs}KL ∈ (0, {reach:.2f}] nats (largest KL per seed: {reaches})",
            unit="mean frontier reward difference",
        )

    frontier_claim("TDPO2 (α=0.5)'s reward–KL frontier lies above DPO's", "tdpo2_a0.5", "dpo")
    frontier_claim("TDPO1's frontier lies above DPO's", "tdpo1", "dpo")
    frontier_claim("TDPO2 (α=0.5)'s frontier lies above TDPO1's", "tdpo2_a0.5", "tdpo1")

    if done("dpo"):

        def slope_ratio(r, b):
            run = _run(r, "dpo", b)
            if run is None:
                return None
            evals = _evals(r, run)
            slope_c, slope_r = _slope(evals, "kl_chosen"), _slope(evals, "kl_rejected")
            return slope_r / slope_c if slope_c > 0 else None

        effects = [_mean_over_betas(r, betas, lambda b, r=r: slope_ratio(r, b)) for r in all_results]
        mean, low, high = _interval(effects)
        if math.isnan(low):
            verdict = "inconclusive (fewer than 2 seeds)"
        elif low > 1.5:
            verdict = "supported"
        elif low > 1.0:
            verdict = "partly supported (faster, not 1.5× faster)"
        elif high < 1.0:
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        add(
            "DPO's sequential KL grows much faster on rejected than on chosen responses",
            effects,
            1.0,
            verdict,
            scope="all β; threshold 1.5",
            unit="slope ratio rejected/chosen",
            digits=2,
        )

    def relative_margin(e):
        return abs(e["kl_rejected"] - e["kl_chosen"]) / max(1e-9, e["kl_rejected"] + e["kl_chosen"])

    if done("dpo") and done("tdpo2_a0.5"):

        def balance(r, b):
            d, t = _final(r, "dpo", b), _final(r, "tdpo2_a0.5", b)
            return None if d is None or t is None else relative_margin(d) - relative_margin(t)

        add(
            "TDPO2 keeps the chosen and rejected sequential KL balanced (smaller relative |margin| than DPO)",
            [_mean_over_betas(r, betas, lambda b, r=r: balance(r, b)) for r in all_results],
            0.0,
            scope="last step, all β",
            unit="relative |margin| DPO − TDPO2",
        )
    if done("tdpo1") and done("tdpo2_a0.5"):

        def chosen_share(r, b):
            one, two = _final(r, "tdpo1", b), _final(r, "tdpo2_a0.5", b)
            if one is None or two is None:
                return None
            return one["kl_chosen"] / max(1e-9, one["kl_rejected"]) - two["kl_chosen"] / max(1e-9, two["kl_rejected"])

        add(
            "TDPO1 raises the chosen-side sequential KL more than TDPO2 (paper §4.4, §5.1)",
            [_mean_over_betas(r, betas, lambda b, r=r: chosen_share(r, b)) for r in all_results],
            0.0,
            scope="last step, all β",
            unit="chosen/rejected KL ratio TDPO1 − TDPO2",
        )
    if done("tdpo2_a0.5") and done("tdpo2_a2"):

        def alpha_gap(r, b):
            low_alpha, high_alpha = _final(r, "tdpo2_a0.5", b), _final(r, "tdpo2_a2", b)
            return None if low_alpha is None or high_alpha is None else low_alpha["reward"] - high_alpha["reward"]

        add(
            "A larger α in TDPO2 makes the reward harder to optimise",
            [_mean_over_betas(r, betas, lambda b, r=r: alpha_gap(r, b)) for r in all_results],
            0.0,
            scope="last step, all β",
            unit="final reward α=0.5 − α=2",
        )
    if done("tgdpo") and done("dpo"):
        frontier_claim(
            "TGDPO (guided by the DPO model) does at least as well as DPO (TGDPO paper)",
            "tgdpo",
            "dpo",
            threshold=-NON_INFERIORITY_MARGIN,
        )
    for method in ("tbpo_a", "tbpo_q"):
        if not (done(method) and done("dpo")):
            continue

        def diff(r, b, key, method=method):
            e, d = _final(r, method, b), _final(r, "dpo", b)
            return None if e is None or d is None else e[key] - d[key]

        entropy = [_mean_over_betas(r, betas, lambda b, r=r: diff(r, b, "entropy")) for r in all_results]
        distinct = [_mean_over_betas(r, betas, lambda b, r=r: diff(r, b, "distinct_1")) for r in all_results]
        verdicts = [_side(*_interval(values)[1:], 0.0) for values in (entropy, distinct)]
        if "contradicted" in verdicts:
            verdict = "contradicted"
        elif verdicts == ["supported", "supported"]:
            verdict = "supported"
        else:
            verdict = verdicts[0] if verdicts[0].startswith("inconclusive (") else "inconclusive"
        add(
            f"{METHOD_LABELS[method]} keeps more output diversity than DPO (higher entropy and distinct-1; TBPO paper)",
            entropy,
            0.0,
            verdict,
            scope="last step, all β",
            unit="entropy difference (nats/token)",
            extra=f"distinct-1 difference {_fmt_interval(*_interval(distinct))}",
        )
    stabiliser_betas = all_results[0]["config"].get("stabiliser_betas") or []
    for plain in ("tbpo_q", "tbpo_a"):
        for kind, label in (("floor", "the log R floor"), ("lam", "SBA(λ<0)")):
            stable = f"{plain}_{kind}"
            if not (done(plain) and done(stable)):
                continue

            def gap(r, b, key, plain=plain, stable=stable):
                p, s = _final(r, plain, b), _final(r, stable, b)
                if p is None or s is None:
                    return None
                if key == "reward":
                    return s["reward"] - p["reward"]
                return _log_kl(p[key]) - _log_kl(s[key])

            kl_effects = [
                _mean_over_betas(r, stabiliser_betas, lambda b, r=r: gap(r, b, "seq_kl_stepwise")) for r in all_results
            ]
            reward_effects = [
                _mean_over_betas(r, stabiliser_betas, lambda b, r=r: gap(r, b, "reward")) for r in all_results
            ]
            kl_mean, kl_low, kl_high = _interval(kl_effects)
            _, reward_low, reward_high = _interval(reward_effects)
            if math.isnan(kl_low):
                verdict = "inconclusive (fewer than 2 seeds)"
            elif kl_high < 0 or reward_high < -NON_INFERIORITY_MARGIN:
                verdict = "contradicted"
            elif kl_low > 0 and reward_low > -NON_INFERIORITY_MARGIN:
                verdict = "supported"
            else:
                verdict = "inconclusive"
            add(
                f"{label} curbs {METHOD_LABELS[plain]}'s drift at small β without losing reward (this package)",
                kl_effects,
                0.0,
                verdict,
                scope=f"last step, β ∈ {{{', '.join(str(b) for b in stabiliser_betas)}}}",
                unit=f"ln(KL plain / KL stabilised), final stepwise seq KL (factor e^mean = {math.exp(kl_mean):.1f}×)"
                if math.isfinite(kl_mean)
                else "ln(KL plain / KL stabilised), final stepwise seq KL",
                digits=2,
                extra=f"reward stabilised − plain {_fmt_interval(*_interval(reward_effects))}",
            )
    # Added after the 3-seed default run (whose plain TBPO runs won reward by not ending their completions): the
    # stabiliser judged at equal KL, by the frontier of the runs at the stabiliser β only
    for plain in ("tbpo_q", "tbpo_a"):
        stable = f"{plain}_floor"
        if done(plain) and done(stable) and stabiliser_betas:
            frontier_claim(
                f"the log R floor's frontier at small β is at least {METHOD_LABELS[plain]}'s (reward at equal KL; rule "
                "added after the first 3-seed run)",
                stable,
                plain,
                threshold=-NON_INFERIORITY_MARGIN,
                betas=stabiliser_betas,
            )
    return claims


def _stabiliser_rows(all_results: list[dict]) -> list[list[str]]:
    """TBPO-A and TBPO-Q at the stabiliser β, plain and stabilised: final reward, KL, EOS rate over seeds."""
    config = all_results[0]["config"]
    rows = []
    for variant in ("tbpo_a", "tbpo_q"):
        for beta in config.get("stabiliser_betas") or []:
            for method in (variant, f"{variant}_floor", f"{variant}_lam"):
                finals = [_final(r, method, beta) for r in all_results]
                finals = [e for e in finals if e is not None]
                if not finals:
                    continue
                peaks = [
                    max(_run(r, method, beta)["evals"], key=lambda e: e["reward"])["reward"]
                    for r in all_results
                    if _run(r, method, beta)
                ]
                setting = {
                    variant: "none (paper default)",
                    f"{variant}_floor": f"log_ratio_floor = {_floor_text(config, variant, beta)}",
                    f"{variant}_lam": f"generator_lambda = {config['tbpo_stable_lambda']:g}",
                }[method]

                def stat(key, digits, finals=finals):
                    mean, low, high = _interval([e[key] for e in finals])
                    if math.isnan(low):
                        return f"{mean:.{digits}f}"
                    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

                def geometric_kl(finals=finals):
                    # A drift that varies tenfold between seeds: the interval on the log scale, as the claim's rule
                    logs = [_log_kl(e["seq_kl_stepwise"]) for e in finals]
                    mean, low, high = _interval(logs)
                    per_seed = ", ".join(f"{e['seq_kl_stepwise']:.1f}" for e in finals)
                    if math.isnan(low):
                        return f"{math.exp(mean):.1f} ({per_seed})"
                    return f"{math.exp(mean):.1f} [{math.exp(low):.1f}, {math.exp(high):.1f}] ({per_seed})"

                rows.append(
                    [
                        METHOD_LABELS["tbpo_a" if variant == "tbpo_a" else "tbpo_q"],
                        f"{beta}",
                        setting,
                        stat("reward", 3),
                        f"{sum(peaks) / len(peaks):.3f}",
                        geometric_kl(),
                        stat("entropy", 3),
                        f"{sum(e['eos_rate'] for e in finals) / len(finals):.0%}",
                        f"{sum(e['length'] for e in finals) / len(finals):.1f}",
                        f"{len(finals)}",
                    ]
                )
    return rows


def plot_stabiliser(all_results: list[dict], path: Path) -> None:
    """Sequential KL and reward during training of TBPO-A/Q at the stabiliser β, plain and stabilised, mean over
    seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = all_results[0]["config"]
    betas = config.get("stabiliser_betas") or []
    fig, axes = plt.subplots(2, max(1, len(betas)), figsize=(5.5 * max(1, len(betas)), 7), squeeze=False)
    styles = {"": "-", "_floor": "--", "_lam": ":"}
    for column, beta in enumerate(betas):
        for variant in ("tbpo_a", "tbpo_q"):
            for suffix, style in styles.items():
                method = variant + suffix
                runs = [_run(r, method, beta) for r in all_results]
                runs = [run for run in runs if run]
                if not runs:
                    continue
                steps = [e["step"] for e in runs[0]["evals"]]
                for row, key in enumerate(("seq_kl_stepwise", "reward")):
                    values = [sum(run["evals"][i][key] for run in runs) / len(runs) for i in range(len(steps))]
                    axes[row][column].plot(steps, values, style, color=COLORS[variant], label=method_label(method))
        axes[0][column].set_title(f"β = {beta}")
        axes[0][column].set_ylabel("sequential KL (nats, stepwise)")
        axes[0][column].set_yscale("symlog", linthresh=1.0)
        axes[1][column].set_ylabel("mean reward")
        axes[1][column].set_xlabel("step")
        axes[0][column].legend(fontsize=7)
    fig.suptitle(f"TBPO at small β, with and without a stabiliser (mean of {len(all_results)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_multiseed_report(results: dict, doc_path: str | Path) -> Path:
    """The report of a run over several seeds: the claims' verdicts with their effect sizes and 95% intervals over
    seeds (rules in `VERDICT_RULES`), the frontiers over seeds, the stabiliser comparison, then the first seed in
    detail (`write_report`)."""
    doc_path = Path(doc_path)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    all_results = results["seeds"]
    config, timings, env = results["config"], results["timings"], results["environment"]
    seeds = [r["config"]["seed"] for r in all_results]
    claims = assess_claims_over_seeds(all_results)
    out = []
    out.append(
        f"**Summary of the verdicts over {len(seeds)} seeds** ({', '.join(map(str, seeds))}: each the whole pipeline, "
        "new SFT model, pairs and evaluation samples). The effect is one number per seed, defined with the verdict "
        'rules under "Verdict rules"; the table gives its mean over seeds, its 95% confidence interval (Student t '
        "over seeds) and each seed's value."
    )
    rows = []
    for c in claims:
        digits = c.get("digits", 3)
        effect = _fmt_interval(*c["effect"], digits=digits)
        detail = "; ".join(x for x in (c.get("unit", ""), c.get("extra", "")) if x)
        per_seed = ", ".join(f"{v:+.{digits}f}" for v in c["per_seed"] if v is not None)
        rows.append([c["claim"], f"**{c['verdict']}**", effect, detail, c.get("scope", ""), per_seed])
    out.append(
        _table(["claim", "verdict", "effect: mean [95% CI]", "effect measured as", "tested over", "per seed"], rows)
    )
    out += [f"**Note.** {note}" for note in results.get("notes", [])]

    out.append("## Command")
    out.append(f"```bash\n{results['command']}\n```")
    runs = [run for r in all_results for run in _ok_runs(r)]
    run_cpu = [run["cpu_time_s"] for run in runs if run.get("cpu_time_s")]
    load = env.get("load_average_at_start") or [math.nan]
    load_end = env.get("load_average_at_end") or [math.nan]
    cpu_total = timings.get("cpu_total_s")
    scale = "" if not config.get("extra", {}).get("scale_note") else f" {config['extra']['scale_note']}"
    if timings.get("overlapped"):
        stages = (
            f"everything in one pool of {config['workers']} processes of {config['threads_per_worker']} torch "
            f"thread(s) each: the {len(seeds)} seeds' tokenizer, SFT, pairs and step-0 evaluation first (all done "
            f"{timings.get('data_stages_s', math.nan) / 60:.1f} min in), and the {len(runs)} preference runs of all "
            f"seeds from {timings.get('first_run_start_s', math.nan) / 60:.1f} min on, a seed's runs starting as soon "
            "as its own SFT model and pairs were ready (so a core does not wait while the last seed is in SFT)"
            + (" and its TGDPO runs once its DPO guide was saved." if "tgdpo" in config["methods"] else ".")
        )
    else:
        stages = (
            f"{timings.get('data_stages_s', math.nan) / 60:.1f} min for the {len(seeds)} seeds' tokenizer, SFT, pairs "
            f"and step-0 evaluation, then {timings.get('preference_training_s', math.nan) / 60:.1f} min for the "
            f"{len(runs)} preference runs of all seeds ({config['workers']} at a time, one process of "
            f"{config['threads_per_worker']} thread(s) each"
            + ("; a seed's TGDPO runs start once its DPO guide is saved)." if "tgdpo" in config["methods"] else ").")
        )
    out.append(
        f"Total wall time **{timings.get('total_s', math.nan) / 60:.1f} min** on {env['cpu_count']} cores, "
        f"{stages} CPU time of all processes "
        f"{(cpu_total or math.nan) / 60:.1f} min, the preference runs {sum(run_cpu) / 60:.1f} of it "
        f"({sum(run_cpu) / max(1, len(run_cpu)):.0f} s each on average, evaluations included). Load average "
        f"{load[0]:.1f} at the start and {load_end[0]:.1f} at the end"
        + (
            f" (above {env['cpu_count']}: other jobs shared the cores and stretched the wall time; on free cores it is "
            f"about CPU time / {config['workers']})"
            if max(load[0], load_end[0]) > env["cpu_count"]
            else ""
        )
        + f".{scale} "
        "`--reuse` re-runs only the preference stage on the saved SFT models and pairs; `--report-only` rewrites this "
        "report from `results.json`."
    )
    reused = [r for r in all_results if r["manifest"].get("timings", {}).get("sft_s") is not None]
    if reused and any(
        r["timings"].get("reused_sft_and_data") or r["manifest"]["timings"].get("reused_sft_and_data")
        for r in all_results
    ):
        out.append(
            "The SFT models and pairs were reused (`--reuse`) from an earlier invocation with the same settings; their "
            "wall times then (s, SFT / pairs): "
            + ", ".join(
                f"seed {r['config']['seed']} {r['manifest']['timings']['sft_s']:.0f} / "
                f"{r['manifest']['timings'].get('preference_pairs_s', math.nan):.0f}"
                for r in reused
            )
            + " (2 seeds at a time where they were prepared together). Add them to the wall time above for a run from "
            "scratch."
        )
    out.append("## Verdict rules (fixed before the runs)")
    out.append(VERDICT_RULES.strip())

    out.append("## Results over seeds")
    out.append("### Reward–KL frontier at fixed KL budgets")
    budgets = [b for b in FRONTIER_BUDGETS]
    rows = []
    for method in [m for m in config["methods"] if all(m in _methods(r) for r in all_results)]:
        if method.endswith(("_floor", "_lam")):
            continue
        reach = min(_max_kl(r, method) for r in all_results)
        cells = []
        for budget in budgets:
            values = [_frontier_at(_frontier(_points(r, method, "seq_kl")), budget) for r in all_results]
            mean, low, high = _interval(values)
            text = f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} ± {(high - low) / 2:.3f}"
            cells.append(text + ("†" if budget > reach else ""))
        rows.append([method_label(method), *cells, f"{reach:.2f}"])
    out.append(
        "Mean over seeds of each seed's frontier (concave hull of all its evaluations, defined under Results below) at "
        "fixed sequential-KL budgets, ± the half-width of the 95% interval over seeds; † marks a budget beyond the "
        "largest KL the method reached in some seed (the value there is only its best reward). The last column is the "
        "smallest, over seeds, of the largest KL reached: frontier claims are tested below the smaller of two "
        "methods' values."
    )
    out.append(_table(["method", *(f"KL = {b:g}" for b in budgets), "reach (min over seeds)"], rows))
    half, last = config["max_steps"] // 2, config["max_steps"]
    reach_rows = []
    for method in [m for m in config["methods"] if all(m in _methods(r) for r in all_results)]:
        if method.endswith(("_floor", "_lam")):
            continue
        at_half = [_reach_at_step(r, method, half) for r in all_results]
        at_last = [_reach_at_step(r, method, last) for r in all_results]
        reach_rows.append(
            [
                method_label(method),
                f"{sum(at_half) / len(at_half):.2f}",
                f"{sum(at_last) / len(at_last):.2f}",
                f"{sum(at_last) / max(1e-9, sum(at_half)):.2f}×",
            ]
        )
    out.append(
        "How far each method's reach grows with training: the largest sequential KL it reached over every β, by "
        f"step {half} and by step {last} (mean over seeds). A method whose reach has levelled off would not overlap "
        "the others over a wider KL range with more steps at this learning rate."
    )
    out.append(_table(["method", f"reach by step {half}", f"reach by step {last}", "growth"], reach_rows))

    stabiliser_rows = _stabiliser_rows(all_results)
    if stabiliser_rows:
        figure = doc_path.with_name(f"{doc_path.stem}_stabiliser.png")
        plot_stabiliser(all_results, figure)
        out.append("### TBPO at small β, with and without a stabiliser")
        out.append(
            f"TBPO-A and TBPO-Q at β ∈ {{{', '.join(str(b) for b in config['stabiliser_betas'])}}}, last step "
            f"({config['max_steps']}), mean [95% interval] over seeds: the paper's loss; the loss with a floor on log R "
            "(`log_ratio_floor`, the package's stabiliser, docs/tbpo_trainer.md)"
            + (
                "; the generator SBA(λ < 0) (which saturates as R → 0)"
                if any(m.endswith("_lam") for m in config["methods"])
                else ""
            )
            + ". `peak reward` is the mean over seeds of each run's best evaluation; the KL is the exact per-step "
            "sequential KL the claim uses, averaged and bounded on the log scale (its drift varies tenfold between "
            "seeds); `EOS rate` the share of samples that end (the drift shows as completions that no longer do)."
        )
        out.append(
            _table(
                [
                    "variant",
                    "β",
                    "stabiliser",
                    "final reward",
                    "peak reward",
                    "seq KL (stepwise): geometric mean [95% CI] (per seed)",
                    "entropy",
                    "EOS rate",
                    "length",
                    "seeds",
                ],
                stabiliser_rows,
            )
        )
        out.append(f"![stabiliser]({figure.name})")
    failed = [(r["config"]["seed"], run) for r in all_results for run in r["runs"] if "error" in run]
    if failed:
        out.append("**Runs that did not complete:**")
        out.append(
            "\n".join(
                f"- seed {s}, {run['method']} (β = {run.get('beta', '–')}): `{run['error'][:300]}`"
                for s, run in failed
            )
        )
    return write_report(all_results[0], doc_path, preamble=out)
