"""Tests of the embedded preference dataset (`trl_tokenpref.data`) and the offline tiny model (`trl_tokenpref.tiny`)."""

import math
import os
import random


# Nothing in these tests may reach the Hub. `huggingface_hub` reads this when first imported, so set it before the
# imports below (the reload test also patches the constant, in case another test module imported it first).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import huggingface_hub  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from testing_utils import fast_args, logged_steps  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_tokenpref.data import (  # noqa: E402
    default_corpus,
    load_default_dataset,
    make_preference_dataset,
    render_chat,
    write_default_dataset,
)
from trl_tokenpref.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_model, main  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


# ----------------------------------------------------------------------------------------------------------- dataset


def test_dataset_is_deterministic():
    dataset = make_preference_dataset(num_pairs=50, seed=0)
    assert dataset.to_list() == make_preference_dataset(num_pairs=50, seed=0).to_list()
    assert dataset.to_list() != make_preference_dataset(num_pairs=50, seed=1).to_list()
    assert len(dataset) == 50


def test_dataset_does_not_touch_global_rng():
    state = random.getstate()
    make_preference_dataset(num_pairs=20, seed=3)
    assert random.getstate() == state


def test_dataset_rejects_non_positive_size():
    with pytest.raises(ValueError, match="num_pairs"):
        make_preference_dataset(num_pairs=0)


def test_standard_format():
    dataset = make_preference_dataset()
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    assert len(dataset) == 320
    for row in dataset:
        assert all(isinstance(row[key], str) for key in ("prompt", "chosen", "rejected"))
        # Explicit prompt ending on a token boundary; completions start with a space.
        assert row["prompt"].endswith("?") and not row["prompt"][-1].isspace()
        assert row["chosen"].startswith(" ") and not row["chosen"].startswith("  ")
        assert row["rejected"].startswith(" ") and not row["rejected"].startswith("  ")
        assert row["chosen"] != row["rejected"]
    # Several templates, and completions of differing lengths in both directions.
    questions = {" ".join(row["prompt"].rsplit(". ", 1)[-1].split()[:2]) for row in dataset}
    assert questions == {"What color", "How many", "Is the", "Where is", "What is"}
    longer_chosen = sum(len(row["chosen"]) > len(row["rejected"]) for row in dataset)
    assert 0 < longer_chosen < len(dataset)


def test_conversational_format():
    dataset = make_preference_dataset(num_pairs=40, conversational=True)
    assert dataset.column_names == ["prompt", "chosen", "rejected"]
    for row in dataset:
        assert [message["role"] for message in row["prompt"]] == ["user"]
        assert [message["role"] for message in row["chosen"]] == ["assistant"]
        assert [message["role"] for message in row["rejected"]] == ["assistant"]
        assert not row["chosen"][0]["content"].startswith(" ")


def test_both_forms_hold_the_same_pairs():
    standard = make_preference_dataset(num_pairs=60, seed=7)
    conversational = make_preference_dataset(num_pairs=60, conversational=True, seed=7)
    for text_row, chat_row in zip(standard, conversational, strict=True):
        assert chat_row["prompt"][0]["content"] == text_row["prompt"]
        assert " " + chat_row["chosen"][0]["content"] == text_row["chosen"]
        assert " " + chat_row["rejected"][0]["content"] == text_row["rejected"]


@pytest.mark.parametrize("format", ["standard", "conversational"])
def test_load_default_dataset(format):
    splits = load_default_dataset(format)
    assert set(splits) == {"train", "test"}
    assert (len(splits["train"]), len(splits["test"])) == (256, 64)
    full = make_preference_dataset(conversational=format == "conversational").to_list()
    assert splits["train"].to_list() + splits["test"].to_list() == full

    splits = load_default_dataset(format, test_size=20, seed=1)
    assert (len(splits["train"]), len(splits["test"])) == (300, 20)


def test_load_default_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Unknown dataset format 'chatml'"):
        load_default_dataset("chatml")
    with pytest.raises(ValueError, match="test_size"):
        load_default_dataset(test_size=320)


@pytest.mark.parametrize("format", ["standard", "conversational"])
def test_write_default_dataset_round_trips(tmp_path, format):
    paths = write_default_dataset(tmp_path / "data", format=format)
    assert set(paths) == {"train", "test"}
    assert all(path.endswith(".jsonl") and os.path.isfile(path) for path in paths.values())
    reloaded = load_dataset("json", data_files=paths, cache_dir=str(tmp_path / "cache"))
    expected = load_default_dataset(format)
    for split in ("train", "test"):
        assert reloaded[split].to_list() == expected[split].to_list()


def test_default_corpus():
    corpus = default_corpus()
    assert corpus == default_corpus()
    dataset = make_preference_dataset()
    assert dataset[0]["prompt"] in corpus and dataset[0]["chosen"] in corpus
    # Chat renderings, where completions follow `<|assistant|>` without a space.
    assert any(line.startswith("<|user|>") and "<|assistant|>" in line for line in corpus)


# -------------------------------------------------------------------------------------------------------- tiny model


def test_tiny_model_reloads_offline(tiny_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert huggingface_hub.constants.is_offline_mode()
    assert os.path.isfile(os.path.join(tiny_path, "model.safetensors"))

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert len(tokenizer) == 512
    assert model.config.vocab_size == 512
    assert model.config.model_type == "llama"
    assert model.config._name_or_path == tiny_path  # what DPOTrainer reloads the reference model from
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token) == tuple(
        SPECIAL_TOKENS[:4]
    )
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.num_parameters() == 196_928

    text = "The ball is red. What color is the ball?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    batch = tokenizer([text, "What is 2 plus 3?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 512)


def test_tiny_model_is_deterministic(tmp_path, tiny_path):
    rng_state = torch.random.get_rng_state()
    same = build_tiny_model(tmp_path / "same", seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is left alone
    other = build_tiny_model(tmp_path / "other", seed=1)

    reference = load_file(os.path.join(tiny_path, "model.safetensors"))
    same_weights = load_file(os.path.join(same, "model.safetensors"))
    other_weights = load_file(os.path.join(other, "model.safetensors"))
    assert reference.keys() == same_weights.keys() == other_weights.keys()
    assert all(torch.equal(reference[name], same_weights[name]) for name in reference)
    assert not all(torch.equal(reference[name], other_weights[name]) for name in reference)
    with open(os.path.join(tiny_path, "tokenizer.json")) as file, open(os.path.join(same, "tokenizer.json")) as other:
        assert file.read() == other.read()


def test_tiny_model_pad_vocab_to(tmp_path):
    path = build_tiny_model(tmp_path, pad_vocab_to=1000, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(AutoTokenizer.from_pretrained(path)) == 512
    assert model.config.vocab_size == 1000
    assert model.get_input_embeddings().weight.shape == (1000, 64)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with pytest.raises(ValueError, match="pad_vocab_to"):
        build_tiny_model(tmp_path / "too_small", pad_vocab_to=100)


def test_cli(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--hidden-size", "32", "--num-layers", "1", "--intermediate-size", "64"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "cli")
    num_parameters = AutoModelForCausalLM.from_pretrained(lines[0]).num_parameters()
    assert lines[1] == f"parameters: {num_parameters:,}"


def test_chat_template_matches_render_chat(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    row = make_preference_dataset(num_pairs=1, conversational=True)[0]
    for messages, add_generation_prompt in [(row["prompt"], True), (row["prompt"] + row["chosen"], False)]:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert rendered == render_chat(messages, add_generation_prompt=add_generation_prompt)


def test_prompt_is_token_prefix_and_sequences_are_short(tokenizer):
    # Mirrors the tokenization in `DPOTrainer._prepare_dataset`: if the prompt were not a token prefix of
    # prompt+completion, TRL would warn and drop the diverging end of the prompt.
    lengths = []
    for row in make_preference_dataset(conversational=True):
        prompt_ids = tokenizer.apply_chat_template(
            row["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True
        )["input_ids"]
        for key in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=True, return_dict=True)["input_ids"]
            assert ids[: len(prompt_ids)] == prompt_ids, row
            lengths.append(len(ids))
    for row in make_preference_dataset():
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        for key in ("chosen", "rejected"):
            ids = tokenizer(row["prompt"] + row[key] + tokenizer.eos_token)["input_ids"]  # TRL appends EOS
            assert ids[: len(prompt_ids)] == prompt_ids, row
            lengths.append(len(ids))
    assert max(lengths) < 64


# ------------------------------------------------------------------------------------------------------- learnability


def test_dpo_learns_default_dataset(tiny_path, tmp_path):
    from trl import DPOConfig, DPOTrainer

    # fast_args: TRL's default learning rate 1e-6 does nothing visible in 15 steps, and its bf16 autocast and gradient
    # checkpointing only slow a tiny fp32 model down on CPU
    args = fast_args(tmp_path, DPOConfig, max_steps=15)
    trainer = DPOTrainer(model=tiny_path, args=args, train_dataset=load_default_dataset()["train"])
    trainer.train()

    logs = logged_steps(trainer)
    assert len(logs) == 15
    losses = [log["loss"] for log in logs]
    accuracies = [log["rewards/accuracies"] for log in logs]
    # The policy starts as the reference: zero rewards, loss log(2), and no pair counted as won.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert accuracies[0] == 0.0
    # Measured: last-5 mean loss about 0.17 (0.26 at lr 1e-3); accuracy 1.0 from step 2 on.
    assert sum(losses[-5:]) / 5 < 0.45
    assert sum(accuracies[-5:]) / 5 >= 0.9
