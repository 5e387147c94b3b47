"""`trl_tokenpref.evaluation` refuses bad input at the call (or when the callback is built), with a message that says
what is wrong, instead of crashing deep inside torch or after `every_n_steps` of training; and the callback's step-0
evaluation reaches the console like every later one."""

import pytest
import torch
from testing_utils import text_length_reward
from transformers import AutoModelForCausalLM

from trl_tokenpref import TDPOConfig, TDPOTrainer
from trl_tokenpref.evaluation import (
    GenerationEvalCallback,
    evaluate_policy,
    generate_completions,
    pair_sequence_kl,
    score_completions,
)
from trl_tokenpref.tiny import build_tiny_model


PROMPTS = ["What is 2 plus 3?", "Where is the cup?"]


@pytest.fixture(scope="module")
def wider_model(tiny_model_path):
    """The tiny model with 64 more rows in its embedding and LM head: another vocabulary for the same tokenizer."""
    wider = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    wider.resize_token_embeddings(wider.config.vocab_size + 64, mean_resizing=False)
    return wider.eval()


# ------------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------------


def test_a_string_is_not_a_list_of_prompts(model, tiny_tokenizer):
    # Before: "What is 2 plus 3?" became 17 one-character prompts
    with pytest.raises(TypeError, match=r"got a single string.*pass `\[prompt\]`"):
        generate_completions(model, tiny_tokenizer, "What is 2 plus 3?", max_new_tokens=2)
    with pytest.raises(TypeError, match="single string"):
        evaluate_policy(model, model, tiny_tokenizer, "What is 2 plus 3?", text_length_reward, max_new_tokens=2)


def test_no_prompt_and_empty_prompts_are_refused(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="`prompts` is empty"):
        generate_completions(model, tiny_tokenizer, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="`prompts` is empty"):
        evaluate_policy(model, model, tiny_tokenizer, [], text_length_reward, max_new_tokens=2)
    # An empty prompt (index 1) has no token to predict the first completion token from
    with pytest.raises(ValueError, match=r"1 prompt\(s\) have no token \(indices \[1\]"):
        generate_completions(model, tiny_tokenizer, ["Where is the cup?", "", "Hi"], max_new_tokens=2)
    with pytest.raises(TypeError, match=r"must hold strings.*indices \[0\].*apply_chat_template"):
        generate_completions(model, tiny_tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=2)


def test_sampling_arguments_are_checked(model, tiny_tokenizer):
    for kwargs, message in (
        ({"max_new_tokens": 0}, "`max_new_tokens` must be a positive integer"),
        ({"temperature": 0.0}, "`temperature` must be a finite number > 0"),
        ({"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
        ({"top_k": -1}, "`top_k` must be an integer >= 0"),
        ({"num_samples_per_prompt": 0}, "`num_samples_per_prompt` must be a positive integer"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=message):
            generate_completions(model, tiny_tokenizer, PROMPTS, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Vocabularies
# ------------------------------------------------------------------------------------------------------------------


def test_a_reference_with_another_vocabulary_is_refused_before_sampling(model, wider_model, tiny_tokenizer):
    vocab_size = model.config.vocab_size
    expected = (
        rf"The reference's vocabulary has {vocab_size + 64} entries but the policy's has {vocab_size} \(the widths"
    )
    with pytest.raises(ValueError, match=expected):
        evaluate_policy(model, wider_model, tiny_tokenizer, PROMPTS, text_length_reward, max_new_tokens=2)
    with pytest.raises(ValueError, match=expected):
        score_completions(model, wider_model, [[1, 2]], [[3]])
    with pytest.raises(ValueError, match=expected):
        pair_sequence_kl(model, wider_model, tiny_tokenizer, [("Hi", " yes", " no")])


def test_token_ids_beyond_the_vocabulary_are_refused(model):
    vocab_size = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"token id {vocab_size}, but the model has {vocab_size} output logits"):
        score_completions(model, None, [[1, 2]], [[vocab_size]])


def test_token_ids_of_another_tokenizer_are_refused(tmp_path, tiny_tokenizer):
    """A model with a smaller vocabulary than the tokenizer's ids: the prompts are refused before generation."""
    small = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "model"))
    small.resize_token_embeddings(8, mean_resizing=False)
    ids = tiny_tokenizer("Where is the cup?", add_special_tokens=False)["input_ids"]
    assert max(ids) >= 8
    with pytest.raises(ValueError, match="output logits: the tokenizer is not the model's"):
        generate_completions(small, tiny_tokenizer, ["Where is the cup?"], max_new_tokens=2)


def test_scoring_rows_are_checked(model):
    with pytest.raises(ValueError, match="Nothing to score"):
        score_completions(model, None, [], [])
    with pytest.raises(ValueError, match="one row each per completion, got 2 and 1"):
        score_completions(model, None, [[1], [2]], [[3]])


def test_preference_pairs_are_checked(model, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"Preference pair 1 has no \['rejected'\] key"):
        pair_sequence_kl(model, model, tiny_tokenizer, [("Hi", " a", " b"), {"prompt": "Hi", "chosen": " a"}])
    with pytest.raises(TypeError, match="Preference pair 0 must be a"):
        pair_sequence_kl(model, model, tiny_tokenizer, [("Hi", " a")])
    with pytest.raises(ValueError, match="`pairs` is empty"):
        pair_sequence_kl(model, model, tiny_tokenizer, [])


# ------------------------------------------------------------------------------------------------------------------
# The callback: checked when built
# ------------------------------------------------------------------------------------------------------------------


def test_callback_arguments_are_checked_at_construction(model, tiny_tokenizer):
    def build(**kwargs):
        arguments = dict(reference=model, tokenizer=tiny_tokenizer, prompts=PROMPTS, reward_fn=text_length_reward)
        arguments.update(kwargs)
        return GenerationEvalCallback(**arguments)

    # A typo in a generation argument: before, a TypeError at the first evaluation, `every_n_steps` into training
    with pytest.raises(TypeError, match=r"unknown argument\(s\) `max_new_token` \(did you mean `max_new_tokens`\?\)"):
        build(max_new_token=8)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        build(temperature=-1.0)
    with pytest.raises(TypeError, match="single string"):
        build(prompts="What is 2 plus 3?")
    with pytest.raises(ValueError, match="`prompts` is empty"):
        build(prompts=[])
    with pytest.raises(ValueError, match="have no token"):
        build(prompts=["Hi", ""])
    with pytest.raises(ValueError, match="has no \\['chosen', 'rejected'\\] key"):
        build(preference_pairs=[{"prompt": "Hi"}])
    with pytest.raises(TypeError, match="`reward_fn` must be a callable"):
        build(reward_fn=None)
    with pytest.raises(TypeError, match="`reference` must be the reference model"):
        build(reference="my-sft-model")
    with pytest.raises(ValueError, match="`every_n_steps` must be a positive integer"):
        build(every_n_steps=0)
    # What is valid still builds: rows with extra keys, a tuple of prompts, every sampling argument
    callback = build(
        prompts=tuple(PROMPTS),
        preference_pairs=[{"prompt": "Hi", "chosen": " a", "rejected": " b", "score": 1}],
        max_new_tokens=4,
        num_samples_per_prompt=2,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        seed=3,
        batch_size=2,
    )
    assert callback.prompts == PROMPTS
    assert callback.preference_pairs == [("Hi", " a", " b")]


def tiny_run_config(tmp_path, **kwargs) -> TDPOConfig:
    config = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=2e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
    )
    config.update(kwargs)
    return TDPOConfig(**config)


def test_callback_refuses_a_reference_with_another_vocabulary_when_training_begins(
    tiny_model_path, tiny_tokenizer, default_dataset, wider_model, tmp_path
):
    callback = GenerationEvalCallback(
        wider_model, tiny_tokenizer, PROMPTS, text_length_reward, eval_on_start=False, max_new_tokens=2
    )
    trainer = TDPOTrainer(
        model=tiny_model_path,
        args=tiny_run_config(tmp_path, disable_tqdm=True),
        train_dataset=default_dataset["train"].select(range(8)),
        processing_class=tiny_tokenizer,
        callbacks=[callback],
    )
    initial = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="The reference's vocabulary has 576 entries but the policy's has 512"):
        trainer.train()
    # Refused before the first step: no parameter moved
    assert trainer.state.global_step == 0
    assert all(torch.equal(param, initial[name]) for name, param in trainer.model.named_parameters())


# ------------------------------------------------------------------------------------------------------------------
# The callback: the step-0 evaluation reaches the console
# ------------------------------------------------------------------------------------------------------------------


def test_step_0_evaluation_reaches_the_progress_bar(
    tiny_model_path, tiny_tokenizer, default_dataset, tmp_path, capsys
):
    """With the default progress bar (`disable_tqdm=False`), the trainer's `ProgressCallback` writes every log it
    receives; at `on_train_begin` its bar does not exist yet, so the step-0 results used to be dropped."""
    callback = GenerationEvalCallback(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        tiny_tokenizer,
        PROMPTS,
        text_length_reward,
        every_n_steps=2,
        max_new_tokens=4,
    )
    trainer = TDPOTrainer(
        model=tiny_model_path,
        args=tiny_run_config(tmp_path, disable_tqdm=False),
        train_dataset=default_dataset["train"].select(range(8)),
        processing_class=tiny_tokenizer,
        callbacks=[callback],
    )
    callback.attach(trainer)
    capsys.readouterr()
    trainer.train()
    output = capsys.readouterr()
    console = output.out + output.err
    printed = [line for line in console.splitlines() if "eval_gen/reward" in line]
    # Step 0 and step 2 (the period, also the last step), each printed once
    assert len(printed) == 2, console[-3000:]
    steps = [log["step"] for log in trainer.state.log_history if "eval_gen/reward" in log]
    assert steps == [0, 2]
    step_0 = next(log for log in trainer.state.log_history if log.get("step") == 0 and "eval_gen/reward" in log)
    # The progress bar formats floats with 4 significant digits: the printed step-0 line carries the step-0 KL (0)
    assert step_0["eval_gen/seq_kl"] == 0.0
    assert "'eval_gen/seq_kl': '0'" in printed[0]


def test_step_0_evaluation_reaches_the_printer(tiny_model_path, tiny_tokenizer, default_dataset, tmp_path, capsys):
    callback = GenerationEvalCallback(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        tiny_tokenizer,
        PROMPTS,
        text_length_reward,
        every_n_steps=5,
        max_new_tokens=4,
    )
    trainer = TDPOTrainer(
        model=tiny_model_path,
        args=tiny_run_config(tmp_path, disable_tqdm=True, max_steps=1),
        train_dataset=default_dataset["train"].select(range(8)),
        processing_class=tiny_tokenizer,
        callbacks=[callback],
    )
    callback.attach(trainer)
    capsys.readouterr()
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if "eval_gen/reward" in line]
    assert len(printed) == 2  # step 0, and step 1 (the last step)
    assert "'step': 0" in printed[0] and "'step': 1" in printed[1]
