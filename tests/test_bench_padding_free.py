"""The arithmetic behind `benchmarks/bench_padding_free.py` (docs/benchmarks.md, "Padding-free training"): the
equal-length bound holds the same real and completion tokens as the batch it bounds, and the table's speedups are
medians of per-batch ratios, computed here by hand. The measurement itself is not run in tests (a CPU benchmark)."""

import sys
from pathlib import Path

import numpy as np
import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks/` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_padding_free as bench  # noqa: E402


def _truncated_lengths(pairs, max_length):
    """(sequence length, completion length) of each of the 2B sequences after `keep_start` truncation."""
    lengths = []
    for pair in pairs:
        for side in ("chosen_ids", "rejected_ids"):
            total = min(len(pair["prompt_ids"]) + len(pair[side]), max_length)
            lengths.append((total, total - len(pair["prompt_ids"])))
    return lengths


@pytest.mark.parametrize("max_length", [256, 1024])
def test_sampled_pairs_leave_a_completion_token_and_vary_in_length(max_length):
    pairs = bench.sample_pairs(np.random.default_rng(0), 16, max_length, (3, 100))
    assert len(pairs) == 16
    assert all(len(pair["prompt_ids"]) < max_length - 1 for pair in pairs)
    assert all(3 <= token < 100 for pair in pairs for ids in pair.values() for token in ids)
    lengths = [length for length, _ in _truncated_lengths(pairs, max_length)]
    assert len(set(lengths)) > 1  # a padded batch of these holds padding: the point of the benchmark


def test_equal_length_bound_holds_the_same_tokens_in_equal_sequences():
    rng = np.random.default_rng(1)
    max_length = 512
    pairs = bench.sample_pairs(rng, 8, max_length, (3, 100))
    bound = bench.equal_length_pairs(pairs, max_length, rng, (3, 100))
    original, equal = _truncated_lengths(pairs, max_length), _truncated_lengths(bound, max_length)
    assert len(equal) == len(original)
    assert len({length for length, _ in equal}) == 1 and len({completion for _, completion in equal}) == 1
    # one length per sequence, rounded: the totals differ by at most half a token per sequence
    sequences = len(original)
    assert abs(sum(length for length, _ in equal) - sum(length for length, _ in original)) <= sequences / 2
    assert abs(sum(c for _, c in equal) - sum(c for _, c in original)) <= sequences / 2


def _record(batch, layout, cpu_s, peak, positions=100, real=100):
    return {"method": "tdpo2", "pairs": 2, "max_length": 1024, "layout": layout, "batch": batch,
            "positions": positions, "real_tokens": real, "completion_tokens": 50, "cpu_s": cpu_s,
            "wall_s": cpu_s, "peak_delta_mb": peak}  # fmt: skip


def test_summary_takes_medians_of_per_batch_ratios_and_drops_incomplete_batches():
    records = [
        _record(0, "padded", 2.0, 100.0, positions=200, real=100), _record(0, "packed", 1.0, 50.0),
        _record(0, "equal", 1.0, 40.0),
        _record(1, "padded", 6.0, 300.0, positions=400, real=100), _record(1, "packed", 2.0, 100.0),
        _record(1, "equal", 1.0, 80.0),
        _record(2, "padded", 9.0, 9.0, positions=900, real=100), _record(2, "packed", 1.0, 1.0),  # no "equal"
    ]  # fmt: skip
    (row,) = bench.summarise(records)
    assert row["batches"] == 2
    assert row["padding"] == pytest.approx((0.5 + 0.75) / 2)
    assert row["speedup"] == pytest.approx((2.0 + 3.0) / 2)  # the median of the ratios, not the ratio of medians
    assert row["speedup_spread"] == (2.0, 3.0)
    assert row["over_bound"] == pytest.approx((1.0 + 2.0) / 2)
    assert row["bound_speedup"] == pytest.approx((2.0 + 6.0) / 2)
    assert row["memory"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert "**2.50×** (2.00–3.00)" in bench.table([row])


def test_a_later_saved_run_replaces_the_cells_it_measured_again():
    meta = {"date": "2026-12-06", "machine": "m", "command": "first", "minutes": None, "batches": 2, "warmup": 1,
            "json": "a.json"}  # fmt: skip
    first = {"meta": meta, "records": [_record(0, "padded", 2.0, 1.0), _record(0, "packed", 1.0, 1.0)]}
    second = {"meta": {**meta, "date": "2026-12-07", "command": "second", "minutes": 5.0, "json": "b.json"},
              "records": [_record(0, "packed", 0.5, 1.0), _record(0, "equal", 0.5, 1.0)]}  # fmt: skip
    records, merged = bench.merge_saved([first, second])
    by_layout = {record["layout"]: record["cpu_s"] for record in records}
    assert by_layout == {"padded": 2.0, "packed": 0.5, "equal": 0.5}
    assert merged["date"] == "2026-12-07" and merged["minutes"] is None
    assert merged["command"] == "first` + `second" and merged["json"] == "a.json`, `b.json"
