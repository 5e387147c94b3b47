"""Bad input is refused before training, with an error that names the problem, the row and the fix.

The checks live in one place (`testing_utils.CHECK_MODULES`), called by `TokenLevelDPOTrainer`, so every trainer runs
them; the first test checks that for all three. The rest use TDPO. Each error must come from our own check, at init (before `train()`),
and not from deep inside a chat template, a tokenizer or torch: the tests assert where it is raised. TGDPO's token-reward
columns are validated separately (test_tgdpo_trainer.py); configuration values that the existing trainer tests already
cover are not repeated here.
"""

import copy
import functools
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from testing_utils import (
    CHECK_MODULES,
    METHODS,
    drop_rows_without_completion_tokens,
    fast_args,
    rows_without_completion_tokens,
    scored_completion_counts,
    scored_completion_range,
    why_no_completion_token,
)
from transformers import AutoModelForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_tokenpref import TBPOConfig, TDPOConfig, TDPOTrainer, TGDPOConfig


# One step of four pairs: most tests only build a trainer, the few that train need no more
validation_args = functools.partial(fast_args, per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3)


def build(model, dataset, tokenizer, tmp_path, method="tdpo", trainer_kwargs=None, **config):
    """A trainer of `method` with `validation_args` plus `config`; TGDPO's guidance model is the model itself."""
    trainer_class, config_class = METHODS[method]
    kwargs = {"guidance_model": model} if method == "tgdpo" else {}
    kwargs.update(trainer_kwargs or {})
    return trainer_class(
        model=model,
        args=validation_args(tmp_path, config_class, **config),
        train_dataset=dataset,
        processing_class=tokenizer,
        **kwargs,
    )


def edit_rows(dataset: Dataset, edits: dict[int, dict]) -> Dataset:
    rows = dataset.to_list()
    for index, fields in edits.items():
        rows[index].update(fields)
    return Dataset.from_list(rows)


def raised_by_our_check(excinfo) -> bool:
    """The error comes from the trainers' own checks, not from a template, a tokenizer, datasets or torch."""
    return Path(excinfo.traceback[-1].path).resolve() in CHECK_MODULES


@pytest.fixture(scope="module")
def standard(default_dataset):
    return default_dataset["train"].select(range(16))


@pytest.fixture(scope="module")
def conversational(conversational_dataset):
    return conversational_dataset["train"].select(range(16))


# ------------------------------------------------------------------------------------------------------ raw rows


@pytest.mark.parametrize("method", list(METHODS))
def test_every_trainer_checks_rows_at_init(method, tiny_model_path, tiny_tokenizer, standard, tmp_path):
    dataset = edit_rows(standard, {5: {"chosen": None}})
    with pytest.raises(ValueError, match=r"^Row 5 of the train dataset: `chosen` is missing \(None\)\. Fix") as error:
        build(tiny_model_path, dataset, tiny_tokenizer, tmp_path, method)
    assert raised_by_our_check(error)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt=""), r"the prompt is empty"),
        (dict(prompt="  \n "), r"the prompt is empty \(or only whitespace\)"),
        (dict(chosen=""), r"the chosen completion is empty"),
        (dict(rejected=" <eos>"), r"the rejected completion is empty"),  # DPOTrainer would append nothing more
        (dict(rejected=None), r"`rejected` is missing \(None\)"),
    ],
)
def test_standard_rows(fields, message, tiny_model_path, tiny_tokenizer, standard, tmp_path):
    with pytest.raises(ValueError, match=rf"^Row 3 of the train dataset: {message}") as error:
        build(tiny_model_path, edit_rows(standard, {3: fields}), tiny_tokenizer, tmp_path)
    assert raised_by_our_check(error)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(chosen=[user("hi")]), r"the chosen completion has the roles \['user'\], but a completion is the"),
        (dict(rejected=[assistant("a"), user("b"), assistant("c")]), r"the rejected completion has the roles"),
        (dict(prompt=[user("q"), assistant("a")]), r"the prompt's last turn has the role 'assistant'"),
        (dict(prompt=[{"role": "system", "content": "be nice"}]), r"the prompt's last turn has the role 'system'"),
        (dict(prompt=[]), r"`prompt` is an empty list of messages"),
        (dict(chosen=[]), r"the chosen completion is an empty list of messages"),
        (dict(rejected=[assistant("  ")]), r"the rejected completion is empty"),
        (dict(prompt=[user("")]), r"every message of the prompt is empty"),
        (
            dict(chosen=[{"role": None, "content": "hi"}]),
            r"message 0 of `chosen` has the role None, but a message's role must be a string such as 'system', "
            r"'user', 'assistant' or 'tool' .*reads back with `role: None`\. Give every message its role\.",
        ),
    ],
)
def test_conversational_rows(fields, message, tiny_model_path, tiny_tokenizer, conversational, tmp_path):
    with pytest.raises(ValueError, match=rf"^Row 2 of the train dataset: {message}") as error:
        build(tiny_model_path, edit_rows(conversational, {2: fields}), tiny_tokenizer, tmp_path)
    assert raised_by_our_check(error)


def test_malformed_formats(tiny_model_path, tiny_tokenizer, standard, conversational, tmp_path):
    mixed = standard.remove_columns("chosen").add_column("chosen", conversational["chosen"])
    with pytest.raises(ValueError, match=r"^Row 0 .*`prompt` is a string, `chosen` is a list of messages, `rejected`"):
        build(tiny_model_path, mixed, tiny_tokenizer, tmp_path)

    sharegpt = Dataset.from_dict(
        {
            "prompt": [[{"from": "human", "value": "hi"}]] * 4,
            "chosen": [[{"from": "gpt", "value": "hello"}]] * 4,
            "rejected": [[{"from": "gpt", "value": "go away"}]] * 4,
        }
    )
    with pytest.raises(ValueError, match=r"message 0 of `prompt` is not a .*ShareGPT format.*maybe_convert_to_chatml"):
        build(tiny_model_path, sharegpt, tiny_tokenizer, tmp_path)

    numbers = Dataset.from_dict({"prompt": ["a b", "c d"], "chosen": [1, 2], "rejected": [3, 4]})
    with pytest.raises(ValueError, match=r"^Row 0 .*`chosen` must be a string or a list of messages, got a int"):
        build(tiny_model_path, numbers, tiny_tokenizer, tmp_path)


def test_every_bad_row_is_counted(tiny_model_path, tiny_tokenizer, standard, tmp_path):
    dataset = edit_rows(standard, {1: {"prompt": ""}, 4: {"chosen": None}, 9: {"rejected": ""}})
    with pytest.raises(ValueError, match=r"^Row 1 .* 3 of its 16 rows have a problem \(rows 1, 4, 9\)\. Fix or drop"):
        build(tiny_model_path, dataset, tiny_tokenizer, tmp_path)


def test_missing_columns_and_empty_dataset(tiny_model_path, tiny_tokenizer, standard, tmp_path):
    with pytest.raises(ValueError, match=r"has no `rejected` column \(its columns are \['prompt', 'chosen'\]\)") as e:
        build(tiny_model_path, standard.remove_columns("rejected"), tiny_tokenizer, tmp_path)
    assert raised_by_our_check(e)
    with pytest.raises(ValueError, match=r"has no `chosen` and no `rejected` column.*rename_column"):
        build(tiny_model_path, standard.rename_columns({"chosen": "a", "rejected": "b"}), tiny_tokenizer, tmp_path)
    tokenized = Dataset.from_dict({"prompt_ids": [[1, 2]], "chosen_ids": [[3]], "rejected_ids": [[4]]})
    with pytest.raises(ValueError, match=r"takes no pre-tokenized `\*_ids` columns alone"):
        build(tiny_model_path, tokenized, tiny_tokenizer, tmp_path)
    with pytest.raises(ValueError, match=r"^The train dataset has no rows\.$"):
        build(tiny_model_path, standard.select([]), tiny_tokenizer, tmp_path)


def test_implicit_prompt(tiny_model_path, tiny_tokenizer, standard, conversational, tmp_path):
    """Without a `prompt` column, TRL takes the longest common start of chosen and rejected as the prompt: a valid
    implicit-prompt dataset trains, one whose rows share no start is refused."""
    implicit = conversational.map(
        lambda row: {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]},
        remove_columns=["prompt"],
    )
    trainer = build(tiny_model_path, implicit, tiny_tokenizer, tmp_path)
    assert len(trainer.train_dataset) == len(implicit)

    other_question = [user("Something else?"), assistant("No.")]
    with pytest.raises(ValueError, match=r"^Row 6 .*no `prompt` column.*differ from their first message"):
        build(tiny_model_path, edit_rows(implicit, {6: {"rejected": other_question}}), tiny_tokenizer, tmp_path)
    strings = Dataset.from_dict({"chosen": ["Yes it is.", "Sure."], "rejected": ["It is not.", "Sure not."]})
    with pytest.raises(ValueError, match=r"^Row 0 .*differ from their first character: the prompt is empty"):
        build(tiny_model_path, strings, tiny_tokenizer, tmp_path)


def test_streamed_rows_are_checked_as_they_are_read(tiny_model_path, tiny_tokenizer, standard, tmp_path):
    """An IterableDataset cannot be checked before training: the first row is checked at init, the others when
    they are read."""
    with pytest.raises(ValueError, match=r"^Row 0 of the train dataset \(an IterableDataset.*the prompt is empty"):
        build(
            tiny_model_path, edit_rows(standard, {0: {"prompt": ""}}).to_iterable_dataset(), tiny_tokenizer, tmp_path
        )
    trainer = build(
        tiny_model_path, edit_rows(standard, {6: {"chosen": ""}}).to_iterable_dataset(), tiny_tokenizer, tmp_path
    )
    trainer.args.max_steps = 4
    with pytest.raises(
        ValueError, match=r"^Row 6 of the train dataset \(an IterableDataset.*chosen completion is empty"
    ):
        trainer.train()
    # Documented exception: a streamed row whose prompt fills `max_length` is dropped, as DPOTrainer drops it (a
    # stream cannot be checked before training, and failing hours into a run would lose more than the row)
    prompt_lengths = [len(tiny_tokenizer(prompt)["input_ids"]) for prompt in standard["prompt"]]
    max_length = sorted(prompt_lengths)[len(prompt_lengths) // 2]
    trainer = build(tiny_model_path, standard.to_iterable_dataset(), tiny_tokenizer, tmp_path, max_length=max_length)
    kept = list(trainer.train_dataset)
    assert len(kept) == sum(n < max_length for n in prompt_lengths)


# ------------------------------------------------------------------------------------------------- token counts


def test_prompt_filling_max_length_is_dropped_like_dpo_trainer(
    tiny_model_path, tiny_tokenizer, standard, tmp_path, caplog
):
    """DPOTrainer drops rows whose prompt alone fills `max_length` (keep_start); the trainers drop the same rows, and
    name them in a warning with their count and why."""
    prompt_lengths = [len(tiny_tokenizer(prompt)["input_ids"]) for prompt in standard["prompt"]]
    max_length = sorted(prompt_lengths)[len(prompt_lengths) // 2]  # about half of the prompts fill it
    too_long = [i for i, n in enumerate(prompt_lengths) if n >= max_length]
    trainer = build(tiny_model_path, standard, tiny_tokenizer, tmp_path, max_length=max_length)
    assert len(trainer.train_dataset) == len(standard) - len(too_long)
    kept_prompts = set(trainer.train_dataset["prompt"])
    assert all(standard[i]["prompt"] not in kept_prompts for i in too_long)
    message = " ".join(record.getMessage() for record in caplog.records)
    listed = ", ".join(map(str, too_long[:10])) + (", ..." if len(too_long) > 10 else "")
    assert f"Dropped {len(too_long)} of the {len(standard)} rows of the train dataset (rows {listed})" in message
    assert (
        f"Row {too_long[0]}: its prompt alone fills `max_length={max_length}` "
        f"(prompt {prompt_lengths[too_long[0]]} tokens, chosen "
    ) in message
    assert "raise `max_length` or shorten their prompts" in message

    # With room for every prompt, nothing is dropped, and the collator still truncates to `max_length`
    max_length = max(prompt_lengths) + 3
    trainer = build(tiny_model_path, standard, tiny_tokenizer, tmp_path, max_length=max_length)
    assert len(trainer.train_dataset) == len(standard) and trainer.data_collator.max_length == max_length
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(standard))])
    assert batch["input_ids"].size(1) == max_length
    assert (batch["completion_mask"][:, 1:].sum(dim=1) > 0).all()
    # keep_end keeps the end of every completion: no row is refused at the short max_length either
    trainer = build(
        tiny_model_path, standard, tiny_tokenizer, tmp_path, max_length=max_length - 6, truncation_mode="keep_end"
    )
    assert len(trainer.train_dataset) == len(standard)


def test_token_count_messages():
    """A tokenized prompt that is empty (prompt and prompt+completion tokenize differently from the first token)
    and a completion that tokenizes to nothing are found, and explained with their lengths."""
    args = TDPOConfig(output_dir="unused", use_cpu=True, report_to="none", max_length=None)
    empty_prompt = Dataset.from_dict(
        {"prompt_ids": [[1, 2], []], "chosen_ids": [[3, 4], [5]], "rejected_ids": [[6], [7]]}
    )
    assert rows_without_completion_tokens(empty_prompt, args).tolist() == [1]
    assert why_no_completion_token(0, 1, 1, None, "keep_start").startswith(
        "its tokenized prompt is empty (prompt 0 tokens, chosen 1, rejected 1)"
    )
    empty_completion = Dataset.from_dict(
        {"prompt_ids": [[1, 2], [3]], "chosen_ids": [[3], [4]], "rejected_ids": [[], [5]]}
    )
    assert rows_without_completion_tokens(empty_completion, args).tolist() == [0]
    assert len(drop_rows_without_completion_tokens(empty_completion, "train", args)) == 1
    with pytest.raises(ValueError, match=r"^Every row of the train dataset \(1\) keeps no completion token"):
        drop_rows_without_completion_tokens(empty_completion.select([0]), "train", args)
    assert "a completion keeps no token after truncation (prompt 2 tokens, chosen 1, rejected 0" in (
        why_no_completion_token(2, 1, 0, None, "keep_start")
    )


def collated_completion_positions(collator, prompt_len: int, completion_lens: tuple[int, int]) -> list[dict]:
    """Run TRL's `DataCollatorForPreference` on one pair with distinct token ids (prompt 1000+i, chosen 2000+j,
    rejected 3000+j) and return, for the chosen and the rejected row, {completion index j: position} of the completion
    tokens that survive its truncation."""
    example = {
        "prompt_ids": [1000 + i for i in range(prompt_len)],
        "chosen_ids": [2000 + j for j in range(completion_lens[0])],
        "rejected_ids": [3000 + j for j in range(completion_lens[1])],
    }
    batch = collator([example])
    rows = []
    for row, offset in zip(batch["input_ids"].tolist(), (2000, 3000)):
        rows.append(
            {token - offset: position for position, token in enumerate(row) if offset <= token < offset + 1000}
        )
    return rows


def test_scored_completion_tokens_match_the_collators_truncation():
    """`scored_completion_range` (TGDPO's collator aligns per-token values with it) and the vectorised
    `scored_completion_counts` (the dataset check refuses rows with no token to train on) describe what TRL's
    `DataCollatorForPreference` really does: which completion tokens survive its truncation and at which positions,
    over random lengths, `max_length` values and both truncation modes."""
    generator = random.Random(0)
    cases = []
    for _ in range(3000):
        prompt_len = generator.randint(0, 9)
        completion_lens = (generator.randint(0, 9), generator.randint(0, 9))
        max_length = generator.choice([None, *range(2, 20)])
        mode = generator.choice(["keep_start", "keep_end"])
        cases.append((prompt_len, completion_lens, max_length, mode))
    outcomes = set()
    for case in cases:
        prompt_len, completion_lens, max_length, mode = case
        collator = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)
        for completion_len, survivors in zip(completion_lens, collated_completion_positions(collator, *case[:2])):
            # Position 0 has no label (no token before it predicts it): a token there is not trained on
            scored = {index: position for index, position in survivors.items() if position > 0}
            name = dict(prompt=prompt_len, completion=completion_len, max_length=max_length, mode=mode)
            start, stop, first_position = scored_completion_range(prompt_len, completion_len, max_length, mode)
            expected = {index: first_position + index - start for index in range(start, stop)}
            assert scored == expected, name
            count = scored_completion_counts(np.array([prompt_len]), np.array([completion_len]), max_length, mode)
            assert count.tolist() == [len(scored)], name
            if completion_len:
                kept = "all" if len(scored) == completion_len else "some" if scored else "none"
                outcomes.add((mode, kept, 0 in survivors.values()))
    # Both modes keep all, some or none of a completion (some: truncation cuts into it), and keep_end also cuts the
    # whole prompt, so that a surviving completion token lands at position 0 (no label)
    assert {(mode, kept) for mode, kept, _ in outcomes} == {
        (mode, kept) for mode in ("keep_start", "keep_end") for kept in ("all", "some", "none")
    }
    assert ("keep_end", "some", True) in outcomes


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_without_pad_token_warns_and_trains(tiny_model_path, tiny_tokenizer, standard, tmp_path, caplog):
    """DPOTrainer pads with EOS when there is no pad token. Safe here (masks never compare ids with the pad id):
    a warning, and the EOS ending each completion is still trained on."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    with caplog.at_level(logging.WARNING):
        trainer = build(tiny_model_path, standard, tokenizer, tmp_path)
    assert any("has no pad token, so batches are padded with its EOS token" in r.message for r in caplog.records)
    eos_id = tiny_tokenizer.eos_token_id
    assert trainer.data_collator.pad_token_id == eos_id
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    # Every completion ends with a trained EOS, although EOS is also the padding that follows it
    last = mask.long().cumsum(dim=1).argmax(dim=1)
    assert (labels[torch.arange(labels.size(0)), last] == eos_id).all()
    assert (labels[~mask & (batch["attention_mask"][:, 1:] == 0)] == eos_id).all()
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_tokenizer_without_pad_nor_eos_is_refused(tiny_model_path, tiny_tokenizer, standard, conversational, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(ValueError, match=r"has neither a pad token nor an EOS token") as error:
        build(tiny_model_path, standard, tokenizer, tmp_path)
    assert raised_by_our_check(error)
    # A pad token but no EOS: fine for conversational data, refused for strings (DPOTrainer appends EOS to them)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = None
    build(tiny_model_path, conversational, tokenizer, tmp_path)
    with pytest.raises(ValueError, match=r"appends the EOS token to string completions.*has no EOS token"):
        build(tiny_model_path, standard, tokenizer, tmp_path)


def test_tokenizer_loaded_from_the_model_path_is_checked(tiny_model_path, tiny_tokenizer, standard, tmp_path):
    """Without `processing_class`, the tokenizer is loaded from the model's path (as DPOTrainer does) and checked."""
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model_path).save_pretrained(model_dir)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token, tokenizer.eos_token = None, None
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"has neither a pad token nor an EOS token"):
        TDPOTrainer(model=str(model_dir), args=validation_args(tmp_path / "run"), train_dataset=standard)


def test_conversational_rows_need_a_chat_template(tiny_model_path, tiny_tokenizer, conversational, tmp_path):
    """Without a chat template, transformers' error comes from deep inside the tokenization and names neither the
    dataset nor what to pass: ours says both."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(
        ValueError,
        match=r"^The train dataset is conversational .* has no chat template to render the messages into text\. "
        r"Pass as `processing_class` a tokenizer whose `chat_template` is set.*`chat_template\.jinja`.*standard format",
    ) as error:
        build(tiny_model_path, conversational, tokenizer, tmp_path)
    assert raised_by_our_check(error)


# ------------------------------------------------------------------------- vocabularies and token ids (issue 24)


@pytest.fixture(scope="module")
def wider_model(tiny_model_path):
    """The tiny model with 10 more rows in its embedding and LM head (522 against 512): another vocabulary."""
    wider = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    wider.resize_token_embeddings(wider.config.vocab_size + 10, mean_resizing=False)
    return wider


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precompute"])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_reference_with_another_vocabulary_is_refused(
    method, precompute, tiny_model_path, tiny_tokenizer, standard, wider_model, tmp_path
):
    """TDPO trained with such a reference without a word (its `kl/chosen` was 0.295 instead of 0.04). Refused for
    every method, before the precompute reads the reference (inside DPOTrainer's init) or training does."""
    with pytest.raises(
        ValueError,
        match=r"^The reference model's vocabulary has 522 entries but the policy's has 512 \(the widths of their "
        r"output logits\): .* so they must use one tokenizer\. Pass as `ref_model` the model the policy starts from",
    ) as error:
        build(
            tiny_model_path,
            standard,
            tiny_tokenizer,
            tmp_path,
            method,
            {"ref_model": wider_model},
            precompute_ref_log_probs=precompute,
        )
    assert raised_by_our_check(error)


def test_vocabulary_sizes_are_read_without_the_weights(tiny_model_path):
    """Under DeepSpeed ZeRO-3 a partitioned weight has the shape [0], and a quantised head's weight is packed: the
    sizes come from the modules' `out_features` / `num_embeddings` (or the config), never from a weight's shape."""
    from trl_tokenpref.checks import embedding_rows, output_vocab_size

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.lm_head.weight = torch.nn.Parameter(torch.empty(0))
    model.model.embed_tokens.weight = torch.nn.Parameter(torch.empty(0))
    assert output_vocab_size(model) == embedding_rows(model) == 512
    model.lm_head = torch.nn.Identity()  # no `out_features`: the config's size
    assert output_vocab_size(model) == 512


def with_added_tokens(tokenizer, count: int):
    """The tokenizer with `count` tokens added after its last id (as `tokenizer.add_tokens` does for a new task)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([f"<new{i}>" for i in range(count)])
    return tokenizer


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precompute"])
def test_token_ids_beyond_the_embedding_are_refused(precompute, tiny_model_path, tiny_tokenizer, standard, tmp_path):
    """A tokenizer with tokens added (ids 512-515) and no resize of the 512-row embedding: training crashed after 3
    steps with `IndexError: index out of range in self`. Now refused before any step (and before the precompute),
    naming the id, its row, both sizes and the fix."""
    tokenizer = with_added_tokens(tiny_tokenizer, 4)
    dataset = edit_rows(standard, {3: {"chosen": standard[3]["chosen"] + " <new3>"}})
    with pytest.raises(
        ValueError,
        match=r"^The train dataset holds token id 515 \(row 3, `chosen_ids`\), but the model's embedding has 512 "
        r"rows \(ids 0 to 511\): the tokenizer \(516 tokens, largest id 515\) is not the model's, or tokens were "
        r"added to it without resizing the model\. .*`model\.resize_token_embeddings\(len\(tokenizer\)\)`",
    ) as error:
        build(tiny_model_path, dataset, tokenizer, tmp_path, precompute_ref_log_probs=precompute)
    assert raised_by_our_check(error)


def test_a_pad_token_beyond_the_embedding_is_refused(tiny_model_path, tiny_tokenizer, standard, tmp_path):
    """A pad token added without a resize: the data holds no such id, but every padded batch does."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<new_pad>"})
    with pytest.raises(
        ValueError,
        match=r"^Batches are padded with the token id 512 \(the pad token\), but the model's embedding has 512 rows.*"
        r"To pad without a new token, set `tokenizer\.pad_token = tokenizer\.eos_token`",
    ):
        build(tiny_model_path, standard, tokenizer, tmp_path)


def test_a_larger_tokenizer_is_warned_and_a_padded_embedding_is_fine(
    tiny_model_path, tiny_tokenizer, standard, tmp_path, caplog
):
    """Tokens the data never uses, beyond the embedding: DPOTrainer trains, so do we, with a warning naming both
    sizes. A tokenizer smaller than the embedding (real models pad their vocabulary) is normal: nothing said."""
    from trl_tokenpref.tiny import build_tiny_model

    with caplog.at_level(logging.WARNING):
        build(tiny_model_path, standard, with_added_tokens(tiny_tokenizer, 4), tmp_path)
    warned = [r.getMessage() for r in caplog.records if "has ids that the model cannot embed" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert warned[0].startswith(
        "The tokenizer (516 tokens, largest id 515) has ids that the model cannot embed: the model's embedding has "
        "512 rows (ids 0 to 511)."
    )
    assert "resize_token_embeddings" in warned[0]

    caplog.clear()
    padded = build_tiny_model(tmp_path / "padded", pad_vocab_to=640)
    with caplog.at_level(logging.WARNING):
        build(padded, standard, tiny_tokenizer, tmp_path)
    assert "cannot embed" not in caplog.text


# ------------------------------------------------------------------------------------- identical pairs (issue 23)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_dataset_of_identical_pairs_only_is_refused(method, tiny_model_path, tiny_tokenizer, standard, tmp_path):
    """Every pair with chosen == rejected: nothing to learn (the loss stays at ln 2, yet the optimiser moves the
    weights; TGDPO, which drops such pairs, was left with an empty dataset and a bare `num_samples=0`)."""
    identical = standard.map(lambda row: {"rejected": row["chosen"]})
    with pytest.raises(
        ValueError,
        match=r"^Every pair of the train dataset \(16 rows\) has identical chosen and rejected completions \(the same "
        r"tokens\), so the dataset expresses no preference.*Check how the `rejected` column was built.*dataset\.filter",
    ) as error:
        build(tiny_model_path, identical, tiny_tokenizer, tmp_path, method)
    assert raised_by_our_check(error)


# -------------------------------------------------------------------------------------------- LM head and PEFT


@pytest.mark.parametrize("method", list(METHODS))
def test_lora_on_the_lm_head_is_refused(method, tiny_model_path, tiny_tokenizer, standard, tmp_path):
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"Applying a PEFT adapter to `lm_head` is not supported.*target_modules"):
        build(tiny_model_path, standard, tiny_tokenizer, tmp_path, method, {"peft_config": peft_config})


def test_trained_lm_head_copy_is_not_the_reference(tiny_model_path, tiny_tokenizer, standard, tmp_path):
    """PEFT's `modules_to_save=["lm_head"]` trains a copy of the LM head. The reference must keep the initial head:
    its log-probs are those of the adapter-free model, and the per-token KL sees the trained head. (Before this was
    checked, the reference used the trained copy, and the KL of the head stayed 0 whatever it learned.)"""
    peft_config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    trainer = build(tiny_model_path, standard, tiny_tokenizer, tmp_path, trainer_kwargs={"peft_config": peft_config})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and "lora_" not in name:  # the trained copy of the head
                param.add_(torch.randn(param.shape, generator=generator))
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    mask = batch["completion_mask"][:, 1:].bool()
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        stats = trainer._policy_forward(trainer.model, batch, trainer._reference_hidden_states(batch)).stats
        with trainer.model.disable_adapter():
            ref_logits = trainer.model(**model_inputs).logits[:, :-1]
        policy_logits = trainer.model(**model_inputs).logits[:, :-1]
    ref_log_probs = F.log_softmax(ref_logits.float(), -1).gather(-1, labels).squeeze(-1)
    policy_log_probs = F.log_softmax(policy_logits.float(), -1).gather(-1, labels).squeeze(-1)
    # The statistics are flat, one per labelled token in row order: the padded grid's masked positions, in order
    torch.testing.assert_close(stats.log_probs, policy_log_probs[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.ref_log_probs, ref_log_probs[mask], rtol=1e-4, atol=1e-4)
    assert stats.forward_kl.mean() > 1e-3


def test_trainable_token_rows_of_the_lm_head_are_refused(tiny_model_path, tiny_tokenizer, standard, tmp_path):
    """PEFT's `trainable_token_indices` on the LM head would fail at the first step inside PEFT (its wrapper has no
    `bias`): refused at init instead."""
    peft_config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"lm_head": [5, 9]})
    with pytest.raises(
        ValueError, match=r"`trainable_token_indices` on the LM head is not supported.*modules_to_save"
    ):
        build(tiny_model_path, standard, tiny_tokenizer, tmp_path, trainer_kwargs={"peft_config": peft_config})


def load_4bit(path, **quantization):
    """The model in 4 bits (bitsandbytes' CPU backend). bitsandbytes comes with the `qlora` extra, which CI installs
    (`.[dev,qlora]`): a missing package or backend fails here rather than skipping the QLoRA checks."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, **quantization)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config), config


def test_4bit_lm_head_is_refused(tiny_model_path, tiny_tokenizer, standard, tmp_path):
    """An explicit `llm_int8_skip_modules` replaces bitsandbytes' default list (which keeps the LM head in full
    precision): the quantized head is refused at init, for a model instance and for a path with a config alike."""
    model, config = load_4bit(tiny_model_path, llm_int8_skip_modules=[])
    assert type(model.lm_head.weight).__name__ == "Params4bit"
    lora = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"The LM head is quantized \(Params4bit\).*add the LM head's name") as e:
        build(model, standard, tiny_tokenizer, tmp_path, trainer_kwargs={"peft_config": lora})
    assert raised_by_our_check(e)
    with pytest.raises(ValueError, match=r"The LM head is quantized \(Params4bit\)"):
        quantized = {"peft_config": lora, "quantization_config": config}
        build(tiny_model_path, standard, tiny_tokenizer, tmp_path, trainer_kwargs=quantized)
    # bitsandbytes' default keeps the head in full precision: accepted
    model, _ = load_4bit(tiny_model_path)
    build(model, standard, tiny_tokenizer, tmp_path, trainer_kwargs={"peft_config": lora})


# ---------------------------------------------------------------------------------------------------- configs
# Only the values the trainer tests do not already refuse: NaN and inf (which pass a `x <= 0` test), and the
# truncation settings that DPOTrainer would only reject at the first batch.


@pytest.mark.parametrize("config_class", [TDPOConfig, TGDPOConfig, TBPOConfig])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=math.nan), r"`beta` must be positive and finite, got nan"),
        (dict(beta=math.inf), r"`beta` must be positive and finite, got inf"),
        (dict(max_length=1), r"`max_length` must be at least 2, or None"),
        (dict(truncation_mode="middle"), r"`truncation_mode` must be 'keep_start' or 'keep_end', got 'middle'"),
    ],
)
def test_shared_config_values(config_class, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config_class(output_dir=str(tmp_path), use_cpu=True, **kwargs)


@pytest.mark.parametrize(
    "config_class, kwargs, message",
    [
        (TDPOConfig, dict(alpha=math.nan), r"`alpha` must be a finite number >= 0, got nan"),
        (TDPOConfig, dict(alpha=math.inf), r"`alpha` must be a finite number >= 0"),
        (TGDPOConfig, dict(alpha=math.nan), r"`alpha` must be a finite number >= 0"),
        (TBPOConfig, dict(baseline_weight_decay=math.inf), r"`baseline_weight_decay` must be >= 0 and finite"),
    ],
)
def test_method_config_values(config_class, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config_class(output_dir=str(tmp_path), use_cpu=True, **kwargs)
