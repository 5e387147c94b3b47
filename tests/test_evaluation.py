"""`trl_tokenpref.evaluation` on hand-made cases: distinct-n of known texts, the entropy of known distributions, KL of a
model with itself, agreement with the trainers' per-token statistics, seeded generation, and the callback logging into
a trainer's `log_history` during a short run."""

import math

import pytest
import torch
from testing_utils import fast_args, logged_steps, perturb, text_length_reward
from transformers import AutoModelForCausalLM

from trl_tokenpref import TDPOTrainer
from trl_tokenpref.evaluation import (
    GenerationEvalCallback,
    distinct_n,
    entropy_from_logits,
    evaluate_policy,
    forward_kl_on_generations,
    generate_completions,
    pair_sequence_kl,
    predictive_entropy,
    score_completions,
    sequence_kl,
)
from trl_tokenpref.token_stats import lm_head_of, naive_token_stats


PROMPTS = ["What is 2 plus 3?", "The ball is red. Is the ball red?", "Where is the cup?"]


@pytest.fixture(scope="module")
def perturbed(tiny_model_path):
    """The tiny model moved away from itself, so that every KL is strictly positive."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    perturb(model, seed=1, scale=0.3)
    return model


@pytest.fixture(scope="module")
def generations(model, tiny_tokenizer):
    return generate_completions(model, tiny_tokenizer, PROMPTS, max_new_tokens=8, num_samples_per_prompt=2, seed=0)


# ------------------------------------------------------------------------------------------------------------------
# distinct-n
# ------------------------------------------------------------------------------------------------------------------


def test_distinct_n_of_known_texts():
    # 5 words, 4 distinct ("the" twice); 4 bigrams, all distinct
    assert distinct_n(["the cat saw the dog"], 1) == pytest.approx(4 / 5)
    assert distinct_n(["the cat saw the dog"], 2) == 1.0
    # A collapsed output: one word repeated
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    # Corpus level: n-grams are pooled over texts, but never span two texts
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["a", "b"], 2) == 0.0  # no bigram at all (not "a b" across the texts)
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="positive"):
        distinct_n(["a"], 0)


# ------------------------------------------------------------------------------------------------------------------
# Entropy
# ------------------------------------------------------------------------------------------------------------------


def test_entropy_of_known_distributions():
    vocab_size = 37
    assert entropy_from_logits(torch.zeros(vocab_size)).item() == pytest.approx(math.log(vocab_size), rel=1e-6)
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2
    logits = torch.tensor([0.5, 0.25, 0.25]).log()
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    # A near-deterministic distribution, including a probability that underflows: 0, not NaN
    assert entropy_from_logits(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


def test_predictive_entropy_of_a_uniform_policy(tiny_model_path, tiny_tokenizer, generations):
    """A model whose LM head is zero predicts the uniform distribution everywhere: entropy log V per token."""
    uniform = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        uniform.get_output_embeddings().weight.zero_()
    vocab_size = uniform.config.vocab_size
    assert predictive_entropy(uniform, generations) == pytest.approx(math.log(vocab_size), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# KL
# ------------------------------------------------------------------------------------------------------------------


def test_kl_of_a_model_with_itself_is_zero(model, tiny_model_path, tiny_tokenizer, generations):
    copy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert torch.equal(sequence_kl(model, copy, generations), torch.zeros(len(generations), dtype=torch.float64))
    assert torch.equal(
        forward_kl_on_generations(model, copy, generations), torch.zeros(len(generations), dtype=torch.float64)
    )
    metrics = evaluate_policy(
        model,
        copy,
        tiny_tokenizer,
        PROMPTS,
        text_length_reward,
        max_new_tokens=8,
        preference_pairs=[
            ("What is 2 plus 3?", " 5.", " 6."),
        ],
    )
    for key in ("seq_kl", "seq_kl_stepwise", "forward_kl", "kl_chosen", "kl_rejected", "kl_margin"):
        assert metrics[key] == 0.0, key


def test_kls_are_positive_and_match_the_trainers_token_stats(model, perturbed, tiny_tokenizer, generations):
    scores = score_completions(
        perturbed, model, generations.prompt_ids, generations.completion_ids, tiny_tokenizer.pad_token_id
    )
    assert (scores.forward_kl > 0).all() and (scores.reverse_kl > 0).all()
    # The forward KL is the κ_t of TDPO's loss: compare with the naive full-logits implementation, row by row
    for i in range(len(generations)):
        ids = torch.tensor([generations.prompt_ids[i] + generations.completion_ids[i]])
        labels = ids[:, 1:].clone()
        labels[:, : len(generations.prompt_ids[i]) - 1] = -100
        with torch.no_grad():
            hidden = perturbed.model(input_ids=ids).last_hidden_state[:, :-1]
            ref_hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        stats = naive_token_stats(hidden, lm_head_of(perturbed), labels, ref_hidden, lm_head_of(model))
        assert scores.forward_kl[i].item() == pytest.approx(stats.forward_kl.sum().item(), rel=1e-4, abs=1e-6)
        log_ratio = (stats.log_probs - stats.ref_log_probs).sum().item()
        assert scores.log_ratio[i].item() == pytest.approx(log_ratio, rel=1e-4, abs=1e-5)
        assert scores.num_tokens[i].item() == len(generations.completion_ids[i])


def test_scores_do_not_depend_on_batching(model, perturbed, tiny_tokenizer, generations):
    """Right padding of rows of different lengths changes nothing: each row is scored as if alone."""
    args = (generations.prompt_ids, generations.completion_ids, tiny_tokenizer.pad_token_id)
    together = score_completions(perturbed, model, *args, batch_size=64)
    alone = score_completions(perturbed, model, *args, batch_size=1)
    torch.testing.assert_close(together.forward_kl, alone.forward_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.log_ratio, alone.log_ratio, rtol=1e-5, atol=1e-5)


def test_pair_sequence_kl_sides(model, perturbed, tiny_tokenizer):
    pairs = [("What is 2 plus 3?", " 2 plus 3 is 5.", " It is 6. Go away."), ("Where is the cup?", " Here.", " No.")]
    result = pair_sequence_kl(perturbed, model, tiny_tokenizer, pairs)
    assert result["kl_chosen"] > 0 and result["kl_rejected"] > 0
    assert result["kl_margin"] == pytest.approx(result["kl_chosen"] - result["kl_rejected"])
    as_rows = pair_sequence_kl(
        perturbed, model, tiny_tokenizer, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    )
    assert as_rows == result


# ------------------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------------------


def test_generation_is_seeded_and_leaves_the_rng_and_mode_alone(model, tiny_tokenizer):
    model.train()
    state = torch.random.get_rng_state()
    first = generate_completions(model, tiny_tokenizer, PROMPTS, max_new_tokens=6, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training  # restored
    model.eval()
    again = generate_completions(model, tiny_tokenizer, PROMPTS, max_new_tokens=6, seed=3)
    assert first.completion_ids == again.completion_ids
    assert first.texts == again.texts
    eos = tiny_tokenizer.eos_token_id
    for ids in first.completion_ids:
        assert 0 < len(ids) <= 6
        assert eos not in ids[:-1]  # nothing kept after an EOS


def test_evaluate_policy_keys(model, perturbed, tiny_tokenizer):
    metrics, generations = evaluate_policy(
        perturbed, model, tiny_tokenizer, PROMPTS, text_length_reward, max_new_tokens=6, return_generations=True
    )
    assert metrics["reward"] == pytest.approx(sum(text_length_reward(generations.texts)) / len(generations))
    assert metrics["num_samples"] == len(PROMPTS)
    assert metrics["seq_kl_stepwise"] > 0 and metrics["forward_kl"] > 0
    assert 0 < metrics["distinct_1"] <= 1 and metrics["entropy"] > 0
    with pytest.raises(ValueError, match="rewards"):
        evaluate_policy(perturbed, model, tiny_tokenizer, PROMPTS, lambda texts: [0.0], max_new_tokens=2)


# ------------------------------------------------------------------------------------------------------------------
# The callback in a training run
# ------------------------------------------------------------------------------------------------------------------


def test_callback_logs_into_log_history(tiny_model_path, tiny_tokenizer, default_dataset, tmp_path):
    train = default_dataset["train"].select(range(16))
    pairs = default_dataset["test"].select(range(4))
    callback = GenerationEvalCallback(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        tiny_tokenizer,
        list(default_dataset["test"]["prompt"][:3]),
        text_length_reward,
        every_n_steps=2,
        preference_pairs=list(pairs),
        max_new_tokens=6,
    )
    args = fast_args(tmp_path, per_device_train_batch_size=4, max_steps=3)
    trainer = TDPOTrainer(
        model=tiny_model_path, args=args, train_dataset=train, processing_class=tiny_tokenizer, callbacks=[callback]
    )
    callback.attach(trainer)
    trainer.train()

    logged = [log for log in trainer.state.log_history if "eval_gen/reward" in log]
    # Step 0 (before training), step 2 (the period) and step 3 (the last step)
    assert [log["step"] for log in logged] == [0, 2, 3]
    for key in ("seq_kl", "seq_kl_stepwise", "forward_kl", "entropy", "distinct_1", "distinct_2", "kl_chosen"):
        assert all(f"eval_gen/{key}" in log for log in logged), key
    # At step 0 the policy is the reference: every KL is exactly 0
    assert logged[0]["eval_gen/seq_kl"] == 0.0 and logged[0]["eval_gen/kl_rejected"] == 0.0
    assert logged[-1]["eval_gen/kl_chosen"] > 0
    assert [entry["step"] for entry in callback.history] == [0, 2, 3]
    # The trainer's own training metrics are still logged every step (the callback does not flush them)
    train_logs = logged_steps(trainer)
    assert [log["step"] for log in train_logs] == [1, 2, 3]
    assert all("kl/chosen" in log and "rewards/accuracies" in log for log in train_logs)
