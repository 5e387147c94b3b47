"""
Offline tiny tokenizer and causal LM for tests, examples and CPU benchmarks.

There is no model hub here (and CI should not depend on one), so the tokenizer and model are built from scratch:

- the tokenizer is a byte-level BPE trained with `tokenizers` on [`trl_tokenpref.data.default_corpus`], wrapped as a
  [`~transformers.PreTrainedTokenizerFast`] with pad/eos/bos/unk tokens and a small chat template;
- the model is a randomly initialised [`~transformers.LlamaModel`]-based causal LM (by default 2 layers, hidden size
  64: about 197k parameters), built under a fixed seed so that the same seed always gives the same weights.

Both are **saved** to a directory, and callers load them back with `from_pretrained(path)`. This is required, not a
convenience: without PEFT and without precomputed reference log-probabilities, TRL's `DPOTrainer` builds the reference
model by reloading `model.config._name_or_path`, which is empty for a model built with `from_config` and never saved
(the trainer then fails with an `OSError` about the repo id).

The chat template renders `<|role|>content<|end|>` per message and, with `add_generation_prompt=True`, appends
`<|assistant|>`. The prompt rendered alone is therefore an exact token prefix of the prompt followed by a completion;
otherwise TRL warns and silently drops the diverging end of the prompt from training.

Command line:

```bash
python -m trl_tokenpref.tiny OUT_DIR [--vocab-size 512] [--hidden-size 64] [--num-layers 2] [--num-heads 4] \
    [--intermediate-size 256] [--pad-vocab-to 32000] [--seed 0]
```
"""

import argparse
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from trl_tokenpref.data import default_corpus


SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# No whitespace is added anywhere (in particular not after the generation prompt), so that the prompt rendered with
# `add_generation_prompt=True` is a token prefix of the prompt+completion rendering. Mirrored by
# `trl_tokenpref.data.render_chat`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_SPECIAL_TOKENS_PATTERN = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))


def _corpus_pieces(lines: list[str]) -> Iterator[str]:
    """
    Yields the text between special tokens.

    `Tokenizer.train_from_iterator` does not split the special tokens out of its input, so it would spend merges on
    pieces such as `"<|"` or `"|><|"`. At encode time the tokenizer splits them out first, so training on the pieces
    between them learns exactly the merges that encoding uses.
    """
    for line in lines:
        for piece in _SPECIAL_TOKENS_PATTERN.split(line):
            if piece:
                yield piece


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """
    Trains the tiny byte-level BPE tokenizer on [`~trl_tokenpref.data.default_corpus`].

    Args:
        vocab_size (`int`, *optional*, defaults to `512`):
            Vocabulary size, special tokens and the 256 byte-level symbols included.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: The tokenizer, with pad/eos/bos/unk tokens and the chat template set.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"`vocab_size` must be at least {min_size} (256 bytes + special tokens), got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE(unk_token=None))  # byte-level: every string is encodable, no unknown token
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_pieces(default_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        # TRL's preference collator pads by itself; left padding is what generation needs.
        padding_side="left",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    output_dir: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    pad_vocab_to: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> str:
    """
    Builds and saves a tiny tokenizer and a randomly initialised Llama causal LM.

    Args:
        output_dir (`str` or `Path`):
            Directory to save the tokenizer and the model (safetensors) into; created if needed.
        vocab_size (`int`, *optional*, defaults to `512`):
            Size of the BPE vocabulary trained for the tokenizer.
        hidden_size (`int`, *optional*, defaults to `64`):
            Hidden size of the model.
        num_layers (`int`, *optional*, defaults to `2`):
            Number of decoder layers.
        num_heads (`int`, *optional*, defaults to `4`):
            Number of attention heads (and of key/value heads: no grouped-query attention).
        intermediate_size (`int`, *optional*, defaults to `256`):
            Size of the MLP's intermediate layer.
        pad_vocab_to (`int` or `None`, *optional*, defaults to `None`):
            If set, the model's vocabulary (embedding and LM head rows) is this size instead of the tokenizer's, as in
            real models whose vocabulary is padded. Useful for benchmarks, where the LM head dominates the cost (e.g.
            `32000`). Must be at least the tokenizer's size.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares the input embedding's weights.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the weight initialisation. The same arguments always give identical weights. The caller's global
            torch RNG state is left untouched.

    Returns:
        `str`: `output_dir`, to pass to `from_pretrained` or to TRL trainers.
    """
    tokenizer = build_tiny_tokenizer(vocab_size)
    model_vocab_size = len(tokenizer)
    if pad_vocab_to is not None:
        if pad_vocab_to < model_vocab_size:
            raise ValueError(
                f"`pad_vocab_to` ({pad_vocab_to}) must be at least the tokenizer's size ({model_vocab_size})."
            )
        model_vocab_size = pad_vocab_to
    if hidden_size % num_heads != 0:
        raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
    config = LlamaConfig(
        vocab_size=model_vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    # `fork_rng` restores the caller's RNG state afterwards: building a model must not change later random draws.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    return str(output_dir)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: builds the tiny model and prints its path and parameter count."""
    parser = argparse.ArgumentParser(
        prog="python -m trl_tokenpref.tiny", description="Build an offline tiny tokenizer and Llama causal LM."
    )
    parser.add_argument("output_dir", help="Directory to save the tokenizer and model into.")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size of the tokenizer.")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument(
        "--pad-vocab-to", type=int, default=None, help="Model vocabulary size, if larger than the tokenizer's."
    )
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    path = build_tiny_model(
        args.output_dir,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        pad_vocab_to=args.pad_vocab_to,
        tie_word_embeddings=args.tie_word_embeddings,
        seed=args.seed,
    )
    # Counted from the saved file rather than from the model built above, to report what callers will load.
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as file:
        num_parameters = sum(math.prod(file.get_slice(name).get_shape()) for name in file.keys())
    print(path)
    print(f"parameters: {num_parameters:,}")


if __name__ == "__main__":
    main()
