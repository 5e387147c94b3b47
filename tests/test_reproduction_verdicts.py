"""The verdict rules of the controlled-sentiment reproduction (`benchmarks/controlled_sentiment/report.py`), on
hand-made results whose effects are computed here by hand: the interval over seeds, the reward-KL frontier, the range
a frontier claim is tested over, and the stabiliser's log-ratio rule. The pipeline itself is tested end to end in
`test_controlled_sentiment.py`; these tests pin down what turns its numbers into "supported" or "contradicted"."""

import math
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks/` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.controlled_sentiment import report  # noqa: E402


SFT_REWARD = 0.5


def evaluation(step, seq_kl, reward, **extra):
    values = {
        "step": step,
        "seq_kl": seq_kl,
        "seq_kl_stepwise": seq_kl,
        "reward": reward,
        "kl_chosen": 1.0,
        "kl_rejected": 1.0,
        "entropy": 1.0,
        "distinct_1": 0.1,
    }
    return {**values, **extra}


def results_of(runs, seed=0, betas=(0.1,), stabiliser_betas=(0.05, 0.1), max_steps=200):
    """A seed's results as `run.py` writes them: `runs` maps (method, β) to its evaluations."""
    methods = list(dict.fromkeys(method for method, _ in runs))
    return {
        "config": {
            "seed": seed,
            "methods": methods,
            "betas": list(betas),
            "stabiliser_betas": list(stabiliser_betas),
            "max_steps": max_steps,
        },
        "sft_eval": evaluation(0, 0.0, SFT_REWARD, kl_chosen=0.0, kl_rejected=0.0),
        "runs": [{"method": m, "beta": b, "evals": evals} for (m, b), evals in runs.items()],
    }


def claim(claims, start):
    (found,) = [c for c in claims if c["claim"].startswith(start)]
    return found


def test_interval_is_the_student_t_interval_over_seeds():
    mean, low, high = report._interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2) · sd / √n, sd = 1
    assert mean == pytest.approx(2.0, abs=1e-12)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half), abs=1e-12)
    # One seed: a mean but no interval; missing and non-finite values do not count as seeds
    assert report._interval([4.0, None, math.nan])[0] == 4.0
    assert all(math.isnan(v) for v in report._interval([4.0, None, math.nan])[1:])


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [(0.1, 0.3, "supported"), (-0.3, -0.1, "contradicted"), (-0.1, 0.3, "inconclusive"), (0.0, 0.3, "inconclusive")],
)
def test_side_of_the_interval_decides(low, high, verdict):
    assert report._side(low, high, 0.0) == verdict


def test_no_interval_is_never_a_verdict():
    assert report._side(math.nan, math.nan, 0.0).startswith("inconclusive")


def test_frontier_is_the_upper_concave_hull_up_to_the_best_reward():
    points = [(0.0, 0.5), (1.0, 0.7), (1.5, 0.6), (2.0, 0.8), (3.0, 0.75)]
    # (1.5, 0.6) lies below the chord; (3.0, 0.75) lies past the best reward
    assert report._frontier(points) == [(0.0, 0.5), (1.0, 0.7), (2.0, 0.8)]
    frontier = report._frontier(points)
    assert report._frontier_at(frontier, 0.5) == pytest.approx(0.6)
    assert report._frontier_at(frontier, 1.5) == pytest.approx(0.75)
    assert report._frontier_at(frontier, 10.0) == pytest.approx(0.8)  # flat past the last vertex


def frontier_seed(seed, shift=0.0, tdpo2_reach=2.0):
    """TDPO2 climbs 0.2/nat then 0.1/nat up to `tdpo2_reach`; DPO climbs 0.1/nat up to 4 nats."""
    return results_of(
        {
            ("dpo", 0.1): [evaluation(100, 1.0, 0.6 + shift), evaluation(200, 4.0, 0.9 + shift)],
            ("tdpo2_a0.5", 0.1): [
                evaluation(100, 1.0, 0.7),
                evaluation(200, tdpo2_reach, 0.7 + 0.1 * (tdpo2_reach - 1.0)),
            ],
        },
        seed=seed,
    )


def hand_frontier_difference(shift, reach):
    """The mean over 50 budgets in (0, reach] of TDPO2's frontier minus DPO's, from their hull vertices written out:
    TDPO2 is 0.5 + 0.2x on [0, 1] and 0.7 + 0.1(x − 1) past it; DPO, through (0, 0.5), (1, 0.6 + shift) and
    (4, 0.9 + shift), is 0.5 + (0.1 + shift)x on [0, 1] and 0.6 + shift + 0.1(x − 1) past it."""
    total = 0.0
    for i in range(50):
        x = reach * (i + 1) / 50
        tdpo2 = 0.5 + 0.2 * x if x <= 1 else 0.7 + 0.1 * (x - 1)
        dpo = 0.5 + (0.1 + shift) * x if x <= 1 else 0.6 + shift + 0.1 * (x - 1)
        total += tdpo2 - dpo
    return total / 50


def test_frontier_claim_is_tested_over_the_range_every_seed_reached():
    seeds = [frontier_seed(0, 0.00, 2.0), frontier_seed(1, 0.01, 1.5), frontier_seed(2, 0.02, 2.0)]
    claims = report.assess_claims_over_seeds(seeds)
    found = claim(claims, "TDPO2 (α=0.5)'s reward–KL frontier lies above DPO's")
    # The smallest largest-KL over seeds and both methods: seed 1's TDPO2
    assert "KL ∈ (0, 1.50]" in found["scope"]
    expected = [hand_frontier_difference(shift, 1.5) for shift in (0.00, 0.01, 0.02)]
    assert found["per_seed"] == pytest.approx(expected, abs=1e-12)
    mean, low, high = report._interval(expected)
    assert found["effect"] == pytest.approx((mean, low, high), abs=1e-12)
    assert low > 0 and found["verdict"] == "supported"


def test_frontier_claim_below_one_nat_of_overlap_is_not_decidable():
    seeds = [
        results_of(
            {
                ("dpo", 0.1): [evaluation(200, 4.0, 0.9)],
                ("tdpo2_a0.5", 0.1): [evaluation(200, 0.8, 0.66 + 0.01 * seed)],
            },
            seed=seed,
        )
        for seed in range(3)
    ]
    found = claim(report.assess_claims_over_seeds(seeds), "TDPO2 (α=0.5)'s reward–KL frontier")
    assert found["verdict"].startswith("not decidable")


def stabiliser_seed(seed, plain_kl, stable_kl, plain_reward, stable_reward):
    runs = {("dpo", 0.1): [evaluation(200, 3.0, 0.8)]}
    for beta in (0.05, 0.1):
        runs[("tbpo_a", beta)] = [evaluation(200, plain_kl[beta], plain_reward)]
        runs[("tbpo_a_floor", beta)] = [evaluation(200, stable_kl[beta], stable_reward)]
    return results_of(runs, seed=seed)


def test_stabiliser_effect_is_the_log_ratio_of_the_drift():
    # The plain drift varies tenfold between seeds; the stabiliser divides it by about 10 in every seed
    seeds = [
        stabiliser_seed(0, {0.05: 80.0, 0.1: 40.0}, {0.05: 8.0, 0.1: 4.0}, 0.70, 0.73),
        stabiliser_seed(1, {0.05: 8.0, 0.1: 6.0}, {0.05: 1.0, 0.1: 0.5}, 0.70, 0.72),
        stabiliser_seed(2, {0.05: 150.0, 0.1: 90.0}, {0.05: 12.0, 0.1: 10.0}, 0.70, 0.71),
    ]
    found = claim(report.assess_claims_over_seeds(seeds), "the log R floor curbs TBPO-A's drift")
    expected = [
        (math.log(10) + math.log(10)) / 2,
        (math.log(8) + math.log(12)) / 2,
        (math.log(12.5) + math.log(9)) / 2,
    ]
    assert found["per_seed"] == pytest.approx(expected, abs=1e-12)
    assert found["verdict"] == "supported"
    # In nats the same runs would be dominated by seed 2 (140 nats) against seed 1 (6.5)
    assert "ln(KL plain / KL stabilised)" in found["unit"]


def test_stabiliser_that_loses_reward_is_contradicted():
    seeds = [
        stabiliser_seed(seed, {0.05: 80.0, 0.1: 40.0}, {0.05: 8.0, 0.1: 4.0}, 0.80, 0.80 - loss)
        for seed, loss in enumerate((0.10, 0.12, 0.11))
    ]
    found = claim(report.assess_claims_over_seeds(seeds), "the log R floor curbs TBPO-A's drift")
    assert found["verdict"] == "contradicted"
    assert "reward stabilised − plain -0.110" in found["extra"]


def test_stabiliser_ratio_is_finite_for_a_run_that_did_not_move():
    seeds = [
        stabiliser_seed(seed, {0.05: 1.0, 0.1: 1.0}, {0.05: 0.0, 0.1: -0.2}, 0.70, 0.70 + 0.01 * seed)
        for seed in range(3)
    ]
    found = claim(report.assess_claims_over_seeds(seeds), "the log R floor curbs TBPO-A's drift")
    # Each KL below the floor counts as the floor (0.01 nats): ln(1 / 0.01) at both β
    assert found["per_seed"] == pytest.approx([math.log(1 / report.KL_RATIO_FLOOR)] * 3, abs=1e-12)


def test_stabiliser_frontier_claim_uses_the_stabiliser_betas_only():
    """The plain run at β = 0.5 (outside the stabiliser β) reaches a far better frontier; it must not count."""
    seeds = []
    for seed in range(3):
        runs = {
            ("tbpo_q", 0.1): [evaluation(100, 2.0, 0.56), evaluation(200, 80.0, 0.80)],
            ("tbpo_q", 0.5): [evaluation(200, 2.0, 0.95)],
            ("tbpo_q_floor", 0.1): [evaluation(100, 1.0, 0.62), evaluation(200, 2.0, 0.70 + 0.01 * seed)],
        }
        seeds.append(results_of(runs, seed=seed, betas=(0.1, 0.5), stabiliser_betas=(0.1,)))
    found = claim(report.assess_claims_over_seeds(seeds), "the log R floor's frontier at small β is at least TBPO-Q's")
    assert "runs at β ∈ {0.1}, KL ∈ (0, 2.00]" in found["scope"]
    # Hull vertices, written out. Plain at β = 0.1: (0, 0.5), (2, 0.56), (80, 0.8), so 0.5 + 0.03x up to 2 nats;
    # floored: (0, 0.5), (1, 0.62), (2, 0.70 + 0.01·seed), slopes 0.12 then 0.08 + 0.01·seed
    for seed, effect in enumerate(found["per_seed"]):
        total = 0.0
        for i in range(50):
            x = 2.0 * (i + 1) / 50
            floored = 0.5 + 0.12 * x if x <= 1 else 0.62 + (0.08 + 0.01 * seed) * (x - 1)
            total += floored - (0.5 + 0.03 * x)
        assert effect == pytest.approx(total / 50, abs=1e-12)
    assert found["verdict"] == "supported"
