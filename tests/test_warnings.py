"""Warnings that must reach the user, and noise that must not (issues 23 and 24):

* a reference cache that leaves much of the reference's mass outside its top-k: warned after the precompute, with the
  measured mass and the `ref_top_k` to use;
* pairs whose chosen and rejected completions are identical: the warning shows in a script's output;
* a single-process run's warnings carry no `[RANK 0]` prefix (several processes keep accelerate's);
* `import trl_tokenpref` imports neither TRL's trainers nor peft nor bitsandbytes (whose import may print notices),
  so it prints nothing that `import trl` does not.
"""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from datasets import Dataset
from testing_utils import asset_args, fast_args

from trl_tokenpref import TDPOConfig, TDPOTrainer


REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # a subprocess on a shared 2-core machine: generous, but a hung run still fails


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    env.pop("WORLD_SIZE", None)
    return env


# ------------------------------------------------------------------------------------------------------------------
# The reference cache's tail mass (issue 24, item 4)
# ------------------------------------------------------------------------------------------------------------------


def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("The reference cache of the")]


def test_a_cache_missing_most_of_the_mass_is_warned_with_the_measured_mass(
    tiny_model_path, tiny_tokenizer, default_dataset, tmp_path, caplog
):
    """The random tiny reference is nearly uniform over 512 tokens: the top 64 leave ~0.84 of its mass outside
    (docs/benchmarks.md measures 0.823 on other data). The warning gives the mean mass over the cached tokens, as the
    cache holds it, and, the exact cache being small here, the whole vocabulary."""
    from trl_tokenpref.precompute import REF_TAIL_COLUMNS

    dataset = default_dataset["train"].select(range(16))
    args = fast_args(tmp_path, TDPOConfig, precompute_ref_log_probs=True, max_steps=1)
    with caplog.at_level(logging.WARNING):
        trainer = TDPOTrainer(model=tiny_model_path, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    [warning] = cache_warnings(caplog)
    masses = np.concatenate(
        [np.exp(np.concatenate([row for row in trainer.train_dataset[column] if row])) for column in REF_TAIL_COLUMNS]
    )
    assert 0.5 < masses.mean() < 1
    assert warning.startswith(
        f"The reference cache of the train dataset leaves on average {masses.mean():.3g} of the reference's "
        f"probability outside its top 64 tokens (`kl/cache_tail_mass`, over {masses.size:,} completion tokens)."
    )
    assert 'above 0.001 it exceeds about 1% (docs/benchmarks.md, "Reference cache")' in warning
    exact_mib = masses.size * (8 + 8 * 512) / 2**20
    assert warning.endswith(
        f"Set `ref_top_k=512`, the whole vocabulary (the KL is then exact; {exact_mib:,.1f} MiB for this dataset)."
    )

    # The whole vocabulary: the exact KL, nothing to warn about
    caplog.clear()
    args = fast_args(tmp_path, TDPOConfig, precompute_ref_log_probs=True, max_steps=1, ref_top_k=512)
    with caplog.at_level(logging.WARNING):
        TDPOTrainer(model=tiny_model_path, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)
    assert cache_warnings(caplog) == []


def cache_columns(top_probs: list[float], num_tokens: int) -> Dataset:
    """A dataset holding only the reference cache's top-k log-prob and tail columns: `num_tokens` tokens per side,
    each with the top-k probabilities `top_probs` and the rest of the mass in the bucket."""
    top_logps = [math.log(p) for p in top_probs] * num_tokens
    tail = [math.log(1 - sum(top_probs))] * num_tokens
    rows = {
        "ref_chosen_topk_logps": [top_logps],
        "ref_rejected_topk_logps": [top_logps],
        "ref_chosen_tail_logmass": [tail],
        "ref_rejected_tail_logmass": [tail],
    }
    return Dataset.from_dict(rows)


def test_the_smallest_sufficient_top_k_is_a_lower_bound_from_the_cached_probabilities():
    """Each uncached token is at most as likely as the k-th cached one (p_k), so caching j more removes at most j·p_k
    from a bucket of mass m: with m = 0.5 and p_k = 0.01, j >= (0.5 - 0.001) / 0.01 = 49.9, so k + 50."""
    from trl_tokenpref.checks import smallest_sufficient_top_k

    assert smallest_sufficient_top_k(np.array([0.5]), np.array([0.01]), 10, 1000, 1e-3) == 60
    # The mean over tokens: one token already below the threshold lowers what the other needs
    assert smallest_sufficient_top_k(np.array([0.5, 0.0]), np.array([0.01, 0.01]), 10, 1000, 1e-3) == 10 + 50
    assert smallest_sufficient_top_k(np.array([0.2, 0.0]), np.array([0.01, 0.01]), 10, 1000, 1e-3) == 10 + 20
    # Never beyond the vocabulary
    assert smallest_sufficient_top_k(np.array([0.9]), np.array([1e-9]), 10, 1000, 1e-3) == 1000


def test_a_large_vocabulary_gets_the_lower_bound_and_the_alternatives(caplog):
    """With a large vocabulary the exact cache is not cheap: the warning gives the lower bound on k (here the bucket
    holds 0.05 and the 4th cached token has 0.05, so at least 5), a power of two above it, the exact cache's size and
    the live reference."""
    from trl_tokenpref.checks import warn_if_reference_cache_misses_mass

    dataset = cache_columns([0.5, 0.3, 0.1, 0.05], num_tokens=100)
    with caplog.at_level(logging.WARNING):
        warn_if_reference_cache_misses_mass(dataset, "eval", k=4, vocab_size=2**20)
    [warning] = cache_warnings(caplog)
    assert warning.startswith(
        "The reference cache of the eval dataset leaves on average 0.05 of the reference's probability outside its "
        "top 4 tokens (`kl/cache_tail_mass`, over 200 completion tokens)."
    )
    exact_gib = 200 * (8 + 8 * 2**20) / 2**30
    assert warning.endswith(
        "Raise `ref_top_k` to at least 5 (a lower bound from the cached probabilities: no uncached token is more likely "
        "than the 4-th cached one, so fewer cannot suffice; the k that suffices may be larger), e.g. `ref_top_k=8`, and "
        "check `kl/cache_tail_mass` in the logs; or set `ref_top_k=1048576`, the whole vocabulary (the KL is then "
        f"exact; {exact_gib:,.1f} GiB for this dataset); or train against the live reference "
        "(`precompute_ref_log_probs=False`)."
    )
    # A bucket below the threshold: silent
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_if_reference_cache_misses_mass(cache_columns([0.9, 0.0995], 10), "train", k=2, vocab_size=2**20)
    assert cache_warnings(caplog) == []


# ------------------------------------------------------------------------------------------------------------------
# What a script prints (issue 23, item 9; issue 24, item 9)
# ------------------------------------------------------------------------------------------------------------------


def test_identical_pairs_are_warned_in_a_scripts_output(assets, tmp_path):
    """The warning must be in what the user sees of a script run (its stderr), without a `[RANK 0]` prefix."""
    data = tmp_path / "data"
    data.mkdir()
    with open(Path(assets["data"]) / "train.jsonl") as source, open(data / "train.jsonl", "w") as target:
        for i, line in enumerate(source):
            row = json.loads(line)
            if i % 4 == 0:
                row["rejected"] = row["chosen"]
            target.write(json.dumps(row) + "\n")
    args = asset_args("tdpo", assets) + ["--dataset_name", str(data)]
    result = subprocess.run(
        [sys.executable, "scripts/run_tdpo.py", "--config", "recipes/tdpo/tiny.yaml", *args, "--max_steps", "1",
         "--eval_strategy", "no", "--save_strategy", "no", "--output_dir", str(tmp_path / "run")],
        cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if "have identical chosen and rejected completions" in line]
    assert lines == [
        "64 of the 256 pairs of the train dataset have identical chosen and rejected completions (rows 0, 4, 8, 12, "
        "16, 20, 24, 28, 32, 36, ...): they express no preference, cost compute, and the per-token terms of TDPO still "
        "train on them. Drop them before training, e.g. with `dataset.filter(lambda row: row['chosen'] != "
        "row['rejected'])`."
    ], result.stderr[-4000:]


def test_warnings_have_a_rank_prefix_only_under_several_processes(monkeypatch, caplog):
    from accelerate import PartialState

    from trl_tokenpref._logging import get_logger

    PartialState()  # the state a run has (one process here)
    logger = get_logger("trl_tokenpref.test_warnings")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING):
        logger.warning("one process")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        logger.warning("several processes")
    assert [r.getMessage() for r in caplog.records] == ["one process", "[RANK 0] several processes"]


def test_the_trainers_warn_without_a_rank_prefix(
    tiny_model_path, tiny_tokenizer, default_dataset, tmp_path, caplog, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rows = default_dataset["train"].select(range(8)).to_list()
    rows[2]["rejected"] = rows[2]["chosen"]
    args = fast_args(tmp_path)
    with caplog.at_level(logging.WARNING):
        TDPOTrainer(
            model=tiny_model_path, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer
        )
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("trl_tokenpref")]
    assert any(message.startswith("1 of the 8 pairs of the train dataset have identical") for message in ours), ours
    assert not any(message.startswith("[RANK") for message in ours)


def python_output(statement: str) -> subprocess.CompletedProcess:
    code = (
        f"import sys\n{statement}\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'bitsandbytes', 'peft', 'deepspeed'}))\n"
        "print('trl.trainer.dpo_trainer' in sys.modules)"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=120
    )


def test_importing_the_package_prints_nothing_that_importing_trl_does_not():
    """bitsandbytes (with the `qlora` extra) prints notices at import on some machines ("Skipping publisher trust
    check ...", "Failed to load CPU gemm_4bit_forward ..."); `import trl` does not import it, and neither does
    `import trl_tokenpref`: the trainers (and through them TRL's trainers, peft and bitsandbytes) load on first use."""
    trl = python_output("import trl")
    ours = python_output("import trl_tokenpref")
    assert trl.returncode == ours.returncode == 0, ours.stderr
    assert (ours.stdout, ours.stderr) == (trl.stdout, trl.stderr)
    assert ours.stdout.splitlines() == ["[]", "False"]
    # The modules a script imports before its trainer (argument parsing, the checks before loading) stay light too
    assert python_output("import trl_tokenpref.cli, trl_tokenpref.checks, trl_tokenpref.data").stdout.splitlines() == [
        "[]",
        "False",
    ]
