"""The offline controlled-sentiment benchmark: the programmatic reward on hand-made reviews, the grammar and prompt
split, and a `--quick` run of the whole pipeline (SFT, pairs, every method, report) with a handful of steps."""

import json
import math
import re
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks/` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.controlled_sentiment import language  # noqa: E402
from benchmarks.controlled_sentiment.language import (  # noqa: E402
    REWARD_TEMPERATURE,
    batch_sentiment_reward,
    make_prompts,
    make_sft_corpus,
    sentiment_reward,
    sentiment_score,
)


# ------------------------------------------------------------------------------------------------------------------
# The reward
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("the movie was good", 1.0),
        ("the movie was very good", 1.5),  # intensifier × 1.5
        ("the movie was not good", -0.5),  # negation: flipped and halved
        ("the movie was not bad", 0.5),
        ("the movie was not very good", -0.75),  # both modifiers apply to the next sentiment word
        ("it was great. i hated it", 0.0),  # 2.0 − 2.0
        ("not long, but good", 1.0),  # "long" uses the negation up; "good" is not negated
        ("not the good", -0.5),  # a non-lexicon word in between keeps the negation pending
        ("the film was not. good", 1.0),  # punctuation ends the negation's scope
        ("i did not enjoy it", -0.75),
        ("i would not recommend it", -0.75),
        ("the plot is extremely boring and the music was slightly nice", -3.0 + 0.375),
        ("the movie was", 0.0),  # no sentiment word
        ("", 0.0),
    ],
)
def test_sentiment_score_hand_made(text, score):
    assert sentiment_score(text) == pytest.approx(score)


def test_reward_orders_and_bounds():
    positive = sentiment_reward(" very good and i loved it.")
    negative = sentiment_reward(" awful and i hated it.")
    assert 0.5 < positive < 1 and 0 < negative < 0.5
    assert sentiment_reward(" great") > sentiment_reward(" good") > sentiment_reward(" fine") > 0.5
    # Negation flips which side of 0.5 the reward is on
    assert sentiment_reward(" good") > 0.5 > sentiment_reward(" not good")
    assert sentiment_reward(" bad") < 0.5 < sentiment_reward(" not bad")
    # No sentiment, or byte-level garbage, is neutral
    assert sentiment_reward(" the story follows a young woman.") == 0.5
    assert sentiment_reward("\ufffd\ufffd<eos> 123 zzz") == 0.5
    # The documented squashing
    assert sentiment_reward(" good") == pytest.approx(1 / (1 + math.exp(-1.0 / REWARD_TEMPERATURE)))
    # Case- and punctuation-insensitive
    assert sentiment_reward("GOOD!") == sentiment_reward("good")


def test_reward_is_deterministic():
    texts = [" very good but the ending felt slow.", " not bad, i did not hate it.", " the cast is horrible."]
    assert batch_sentiment_reward(texts) == batch_sentiment_reward(list(texts))
    assert batch_sentiment_reward(texts) == [sentiment_reward(text) for text in texts]


# ------------------------------------------------------------------------------------------------------------------
# The grammar
# ------------------------------------------------------------------------------------------------------------------


def test_prompt_split_is_disjoint_and_seeded():
    train, held_out = make_prompts(seed=0, num_held_out=64)
    assert len(held_out) == 64 and not set(train) & set(held_out)
    assert make_prompts(seed=0, num_held_out=64) == (train, held_out)
    assert make_prompts(seed=1, num_held_out=64)[1] != held_out
    # The openings carry no sentiment: the reward of a completion is the reward of the review
    assert all(sentiment_score(prompt) == 0 for prompt in train + held_out)
    with pytest.raises(ValueError, match="num_held_out"):
        make_prompts(num_held_out=0)


def test_sft_corpus_has_mixed_sentiment_and_a_closed_vocabulary():
    train, _ = make_prompts()
    reviews = make_sft_corpus(train, 500, seed=0)
    assert reviews == make_sft_corpus(train, 500, seed=0)
    rewards = [sentiment_reward(completion) for _, completion in reviews]
    assert min(rewards) < 0.2 and max(rewards) > 0.8
    assert 0.35 < sum(rewards) / len(rewards) < 0.65
    vocabulary = set()
    for line in language.tokenizer_corpus():
        vocabulary.update(re.findall(r"[a-z]+", line))
    for prompt, completion in reviews:
        assert completion.startswith(" ") and completion.endswith(".")
        assert set(re.findall(r"[a-z]+", prompt + completion)) <= vocabulary


# ------------------------------------------------------------------------------------------------------------------
# The pipeline, end to end, with a handful of steps
# ------------------------------------------------------------------------------------------------------------------


def test_quick_pipeline_end_to_end(tmp_path):
    from benchmarks.controlled_sentiment.pipeline import METHOD_LABELS
    from benchmarks.controlled_sentiment.run import main

    output_dir = tmp_path / "controlled_sentiment"
    results = main(["--quick", "--output-dir", str(output_dir)])

    config = results["config"]
    assert config["quick"] and config["workers"] == 1
    runs = results["runs"]
    # A method the pipeline skips (its trainer not importable) or that fails is lost coverage, not a pass
    failed = [f"{run['method']}: {run['error']}" for run in runs if "error" in run or run.get("skipped")]
    assert not failed, failed
    assert {run["method"] for run in runs} == set(METHOD_LABELS)
    for run in runs:
        steps = [evaluation["step"] for evaluation in run["evals"]]
        assert steps == list(range(1, config["max_steps"] + 1))
        for evaluation in run["evals"]:
            assert 0 < evaluation["reward"] < 1
            for key in ("seq_kl", "forward_kl", "entropy", "distinct_1", "kl_chosen", "kl_rejected"):
                assert math.isfinite(evaluation[key]), (run["method"], key)
    # The step-0 point is the SFT model against itself
    assert results["sft_eval"]["seq_kl"] == 0.0 and results["sft_eval"]["kl_chosen"] == 0.0

    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["timings"]["total_s"] > 0
    doc = output_dir / "reproduction.md"  # --quick never overwrites docs/reproduction.md
    text = doc.read_text()
    for section in ("## Command", "## Results", "What the numbers support", "## Reproducibility", "Seeds"):
        assert section in text
    for figure in ("reproduction_frontier.png", "reproduction_seqkl.png", "reproduction_seqkl_margin.png"):
        assert (output_dir / figure).stat().st_size > 0
        assert figure in text


def test_quick_pipeline_over_seeds_in_one_pool(tmp_path):
    """Two seeds on two workers: both seeds' SFT and every run share one process pool, each seed's TGDPO waits for
    its own DPO guide, and the report is the one over seeds."""
    from benchmarks.controlled_sentiment.run import main

    output_dir = tmp_path / "controlled_sentiment"
    arguments = ["--quick", "--seeds", "0", "1", "--workers", "2", "--methods", "dpo", "tgdpo"]
    results = main([*arguments, "--output-dir", str(output_dir)])

    assert [seed_results["config"]["seed"] for seed_results in results["seeds"]] == [0, 1]
    assert results["timings"]["overlapped"]
    assert 0 < results["timings"]["first_run_start_s"] <= results["timings"]["total_s"]
    for seed_results in results["seeds"]:
        seed = seed_results["config"]["seed"]
        runs = seed_results["runs"]
        assert sorted(run["method"] for run in runs) == ["dpo", "tgdpo"], runs
        assert not [run for run in runs if "error" in run], runs
        # Each seed has its own SFT model, pairs and guide
        assert seed_results["manifest"]["sft_path"] == str(output_dir / f"seed{seed}" / "sft")
        (tgdpo,) = [run for run in runs if run["method"] == "tgdpo"]
        assert (output_dir / f"seed{seed}" / "runs" / "dpo_beta0.1").is_dir()
        assert tgdpo["evals"][-1]["step"] == seed_results["config"]["max_steps"]
        assert (output_dir / f"seed{seed}" / "results.json").is_file()
    # Different seeds give different SFT models, so their step-0 rewards differ
    assert results["seeds"][0]["sft_eval"]["reward"] != results["seeds"][1]["sft_eval"]["reward"]
    text = (output_dir / "reproduction.md").read_text()
    assert "Summary of the verdicts over 2 seeds" in text and "one pool of 2 processes" in text
