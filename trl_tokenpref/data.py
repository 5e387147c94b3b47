"""
Embedded default preference dataset, generated deterministically in code.

Nothing here downloads anything: the tests, examples and benchmarks of `trl_tokenpref` run offline, so the default
dataset is built from word lists and templates with a seeded `random.Random`. The rows follow TRL's preference formats,
so they can be passed straight to [`~trl.DPOTrainer`] and to the token-level trainers of this package:

- standard: `{"prompt": str, "chosen": str, "rejected": str}`, with an explicit prompt (TRL's implicit-prompt
  extraction splits on the longest common *character* prefix, which can cut a word in half) and completions that
  start with a space, so the prompt always ends on a token boundary;
- conversational: `{"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}`.

Every pair carries a token-level signal that a tiny randomly initialised model picks up within tens of DPO steps. The
prompt describes a small scene (colours, counts, places, sums) and asks about it. The chosen completion answers
correctly and politely; the rejected completion answers wrongly, usually by naming a distractor from the same prompt,
and rudely. Chosen and rejected share most of their tokens ("The ball is"), so the preference is decided by a few
tokens (the fact and the tone), which is what token-level methods are meant to exploit. Their lengths differ, in both
directions, so that length alone does not separate them.
"""

import json
import random
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict

from .files import atomic_write


COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
OBJECTS = ["ball", "box", "cup", "hat", "car", "kite", "book", "lamp"]
ANIMALS = ["cats", "dogs", "birds", "fish", "ducks", "frogs"]
PLACES = ["garden", "kitchen", "park", "room", "yard", "barn"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Tone markers: several of each, of different lengths, so that neither side is systematically longer.
POLITE = ["Hope this helps!", "Happy to help.", "Thanks for asking!", "Glad I could help.", "Good question!", ""]
RUDE = ["Obviously.", "Stop asking me.", "Figure it out yourself.", "Whatever.", "Go away.", "Do not bother me again."]

_FORMATS = ("standard", "conversational")
# The default dataset: `load_default_dataset` splits this many pairs into train and test.
_DEFAULT_NUM_PAIRS = 320


def _join(*parts: str) -> str:
    """Joins the non-empty parts with single spaces, so that an empty tone marker leaves no double space."""
    return " ".join(part for part in parts if part)


def _other(rng: random.Random, choices: list[str], exclude: str) -> str:
    return rng.choice([choice for choice in choices if choice != exclude])


def _colour_pair(rng: random.Random) -> tuple[str, str, str]:
    obj1, obj2 = rng.sample(OBJECTS, 2)
    col1, col2 = rng.sample(COLORS, 2)
    asked, answer, distractor = (obj1, col1, col2) if rng.random() < 0.5 else (obj2, col2, col1)
    prompt = f"The {obj1} is {col1} and the {obj2} is {col2}. What color is the {asked}?"
    chosen = _join(f"The {asked} is {answer}.", rng.choice(POLITE))
    # Wrong by naming the other object's colour: the model has to attend to the right part of the prompt.
    rejected = _join(f"The {asked} is {distractor}.", rng.choice(RUDE))
    return prompt, chosen, rejected


def _count_pair(rng: random.Random) -> tuple[str, str, str]:
    animal1, animal2 = rng.sample(ANIMALS, 2)
    num1, num2 = rng.sample(NUMBER_WORDS[1:], 2)  # plural nouns, so never "one"
    place = rng.choice(PLACES)
    asked, answer, distractor = (animal1, num1, num2) if rng.random() < 0.5 else (animal2, num2, num1)
    prompt = f"I see {num1} {animal1} and {num2} {animal2} in the {place}. How many {asked} do I see?"
    chosen = _join(f"You see {answer} {asked}.", rng.choice(POLITE))
    rejected = _join(f"Maybe {distractor} {asked}.", rng.choice(RUDE))
    return prompt, chosen, rejected


def _yes_no_pair(rng: random.Random) -> tuple[str, str, str]:
    obj = rng.choice(OBJECTS)
    colour = rng.choice(COLORS)
    asked = colour if rng.random() < 0.5 else _other(rng, COLORS, colour)
    prompt = f"The {obj} is {colour}. Is the {obj} {asked}?"
    if asked == colour:
        chosen = _join(f"Yes, the {obj} is {colour}.", rng.choice(POLITE))
        rejected = _join("No.", rng.choice(RUDE))
    else:
        chosen = _join(f"No, the {obj} is {colour}, not {asked}.", rng.choice(POLITE))
        rejected = _join(f"Yes, it is {asked}.", rng.choice(RUDE))
    return prompt, chosen, rejected


def _place_pair(rng: random.Random) -> tuple[str, str, str]:
    obj1, obj2 = rng.sample(OBJECTS, 2)
    place1, place2 = rng.sample(PLACES, 2)
    asked, answer, distractor = (obj1, place1, place2) if rng.random() < 0.5 else (obj2, place2, place1)
    prompt = f"The {obj1} is in the {place1} and the {obj2} is in the {place2}. Where is the {asked}?"
    chosen = _join(f"The {asked} is in the {answer}.", rng.choice(POLITE))
    rejected = _join(f"In the {distractor}, I guess.", rng.choice(RUDE))
    return prompt, chosen, rejected


def _sum_pair(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    wrong = a + b + rng.choice([-2, -1, 1, 2])
    prompt = f"What is {a} plus {b}?"
    chosen = _join(f"{a} plus {b} is {a + b}.", rng.choice(POLITE))
    rejected = _join(f"It is {wrong}.", rng.choice(RUDE))
    return prompt, chosen, rejected


_TEMPLATES: list[Callable[[random.Random], tuple[str, str, str]]] = [
    _colour_pair,
    _count_pair,
    _yes_no_pair,
    _place_pair,
    _sum_pair,
]


def _make_pairs(num_pairs: int, seed: int) -> list[tuple[str, str, str]]:
    """Generates `num_pairs` `(prompt, chosen, rejected)` triples, completions without their leading space."""
    if num_pairs < 1:
        raise ValueError(f"`num_pairs` must be a positive integer, got {num_pairs}.")
    # A private generator: the dataset must not depend on, nor change, the global `random` state.
    rng = random.Random(seed)
    # Round-robin over the templates keeps them balanced; the shuffle mixes them so every batch sees several.
    pairs = [_TEMPLATES[index % len(_TEMPLATES)](rng) for index in range(num_pairs)]
    rng.shuffle(pairs)
    return pairs


def make_preference_dataset(num_pairs: int = 320, conversational: bool = False, seed: int = 0) -> Dataset:
    """
    Builds the synthetic preference dataset.

    Each prompt describes a small scene and asks a question about it; the chosen completion answers correctly and
    politely, the rejected one wrongly and rudely. See the module docstring for the design.

    Args:
        num_pairs (`int`, *optional*, defaults to `320`):
            Number of preference pairs to generate.
        conversational (`bool`, *optional*, defaults to `False`):
            If `False`, returns TRL's standard format: `prompt`, `chosen` and `rejected` are strings and the
            completions start with a space (`"What is 2 plus 3?"`, `" 2 plus 3 is 5. Happy to help."`). If `True`,
            returns TRL's conversational format: `prompt` is `[{"role": "user", "content": ...}]` and `chosen` and
            `rejected` are `[{"role": "assistant", "content": ...}]`, whose contents have no leading space (the chat
            template separates the turns). Both forms hold the same pairs, in the same order.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the private `random.Random` generator. The same seed always gives the same dataset.

    Returns:
        [`~datasets.Dataset`]: A dataset with the columns `prompt`, `chosen` and `rejected`.

    Example:

    ```python
    >>> from trl_tokenpref.data import make_preference_dataset

    >>> make_preference_dataset(num_pairs=4)[0]
    {'prompt': 'The car is in the barn and the lamp is in the yard. Where is the lamp?',
     'chosen': ' The lamp is in the yard. Thanks for asking!',
     'rejected': ' In the barn, I guess. Obviously.'}
    ```
    """
    pairs = _make_pairs(num_pairs, seed)
    if conversational:
        rows = [
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
            for prompt, chosen, rejected in pairs
        ]
    else:
        # The leading space makes the prompt end on a token boundary, so the tokenized prompt is a prefix of the
        # tokenized prompt+completion (otherwise TRL warns and trains on a truncated prompt).
        rows = [
            {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
            for prompt, chosen, rejected in pairs
        ]
    return Dataset.from_list(rows)


def _check_format(format: str) -> None:
    if format not in _FORMATS:
        raise ValueError(f"Unknown dataset format {format!r}: expected one of {', '.join(map(repr, _FORMATS))}.")


def load_default_dataset(format: str = "standard", test_size: int = 64, seed: int = 0) -> DatasetDict:
    """
    Loads the default preference dataset (320 pairs) split into train and test.

    The rows are already shuffled when generated, so the split is a plain cut: the first `320 - test_size` pairs are
    the train split and the last `test_size` pairs the test split.

    Args:
        format (`str`, *optional*, defaults to `"standard"`):
            `"standard"` for string columns or `"conversational"` for message lists (see
            [`make_preference_dataset`]).
        test_size (`int`, *optional*, defaults to `64`):
            Number of pairs in the test split, between 1 and 319.
        seed (`int`, *optional*, defaults to `0`):
            Seed passed to [`make_preference_dataset`].

    Returns:
        [`~datasets.DatasetDict`]: With the splits `"train"` and `"test"`.
    """
    _check_format(format)
    if not 0 < test_size < _DEFAULT_NUM_PAIRS:
        raise ValueError(f"`test_size` must be between 1 and {_DEFAULT_NUM_PAIRS - 1}, got {test_size}.")
    dataset = make_preference_dataset(_DEFAULT_NUM_PAIRS, conversational=format == "conversational", seed=seed)
    num_train = _DEFAULT_NUM_PAIRS - test_size
    return DatasetDict(
        {
            "train": dataset.select(range(num_train)),
            "test": dataset.select(range(num_train, _DEFAULT_NUM_PAIRS)),
        }
    )


def write_default_dataset(output_dir: str | Path, format: str = "standard") -> dict[str, str]:
    """
    Writes the default dataset as JSON Lines, for scripts that take local data files.

    The files load back with `datasets.load_dataset("json", data_files=paths)`.

    Args:
        output_dir (`str` or `Path`):
            Directory to write `train.jsonl` and `test.jsonl` into; created if needed.
        format (`str`, *optional*, defaults to `"standard"`):
            `"standard"` or `"conversational"`, see [`load_default_dataset`].

    Returns:
        `dict[str, str]`: The path of each split's file, keyed by split name (`"train"`, `"test"`).
    """
    splits = load_default_dataset(format)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, dataset in splits.items():
        path = output_dir / f"{split}.jsonl"
        with atomic_write(path) as file:  # whole or not at all: the training scripts read it
            for row in dataset:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[split] = str(path)
    return paths


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """
    Renders messages the way `trl_tokenpref.tiny.CHAT_TEMPLATE` does: `<|role|>content<|end|>` per message.

    Args:
        messages (`list[dict[str, str]]`):
            Messages with `"role"` and `"content"` keys.
        add_generation_prompt (`bool`, *optional*, defaults to `False`):
            Whether to append `<|assistant|>` to open the assistant's turn.

    Returns:
        `str`: The rendered conversation.
    """
    # Written out in Python so that building the tokenizer corpus needs no tokenizer nor Jinja;
    # `tests/test_tiny_and_data.py` checks that it agrees with the template.
    text = "".join(f"<|{message['role']}|>{message['content']}<|end|>" for message in messages)
    return text + "<|assistant|>" if add_generation_prompt else text


def default_corpus() -> list[str]:
    """
    Text lines to train the tiny tokenizer on.

    The lines are the prompts and completions of the default dataset, the standard prompt+completion concatenations,
    and the chat renderings of the conversational form. The chat renderings matter: after a special token such as
    `<|assistant|>`, a completion starts without a leading space, so its first word is a different pre-token than in
    the standard form. Special tokens appear verbatim in these lines; the trainer in `trl_tokenpref.tiny` removes them
    before learning merges, as the tokenizer does when encoding.

    Returns:
        `list[str]`: The corpus, in a deterministic order.
    """
    lines = []
    for prompt, chosen, rejected in _make_pairs(_DEFAULT_NUM_PAIRS, seed=0):
        lines += [prompt, " " + chosen, " " + rejected, f"{prompt} {chosen}", f"{prompt} {rejected}"]
        user = [{"role": "user", "content": prompt}]
        lines.append(render_chat(user, add_generation_prompt=True))
        for completion in (chosen, rejected):
            lines.append(render_chat(user + [{"role": "assistant", "content": completion}]))
    return lines


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: writes the default dataset as `train.jsonl` and `test.jsonl` and prints their paths.

    The training scripts take the written directory as `--dataset_name OUT_DIR` (see the `tiny` recipes).
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trl_tokenpref.data",
        description="Write the embedded default preference dataset as JSON Lines (train.jsonl, test.jsonl).",
    )
    parser.add_argument("output_dir", help="Directory to write train.jsonl and test.jsonl into.")
    parser.add_argument("--format", default="standard", choices=_FORMATS, help="TRL preference format of the rows.")
    args = parser.parse_args(argv)
    for split, path in write_default_dataset(args.output_dir, format=args.format).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
