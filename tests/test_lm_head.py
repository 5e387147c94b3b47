"""The one way to read an LM head (`trl_tokenpref/token_stats/lm_head.py`, docs/architecture.md): every read of a
policy, reference or guidance head's parameters goes through `gathered_lm_head`, which gathers them under ZeRO-3 and
FSDP2 (tested under both in tests/test_deepspeed.py and tests/test_fsdp2.py) and is free without sharding (here).
The source test keeps the rule from eroding: a new direct read of a head's parameters elsewhere fails it."""

import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

from trl_tokenpref.token_stats import gathered_lm_head, lm_head_of


PACKAGE = Path(__file__).resolve().parents[1] / "trl_tokenpref"
# Reads of a head's parameters or of a weight's sizes: the patterns a ZeRO-3 shard (0 rows) or an FSDP2 DTensor breaks
DIRECT_HEAD_READ = re.compile(
    r"lm_head\.(weight|bias)\b|get_output_embeddings\(\)\.(weight|bias)\b|\.weight\.(size|shape|numel)\b"
)


def _code_without_comments_and_strings(source: str) -> str:
    """The source's code tokens only: messages and comments may name `lm_head.weight`."""
    kept = [
        token.string
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type not in (tokenize.COMMENT, tokenize.STRING)
        # Python >= 3.12 splits an f-string into tokens: its text parts are strings too, its fields code
        and not (hasattr(tokenize, "FSTRING_MIDDLE") and token.type == tokenize.FSTRING_MIDDLE)
    ]
    return "".join(kept)


def test_no_module_but_lm_head_reads_a_head_directly():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() == "token_stats/lm_head.py":
            continue
        code = _code_without_comments_and_strings(path.read_text())
        offenders += [f"{path.relative_to(PACKAGE)}: {match.group(0)}" for match in DIRECT_HEAD_READ.finditer(code)]
    assert not offenders, (
        "read the head through `token_stats.gathered_lm_head` (sizes inside it): a direct read sees a ZeRO-3 shard "
        f"of 0 rows or an FSDP2 DTensor: {offenders}"
    )


def test_the_source_check_sees_a_direct_read():
    code = _code_without_comments_and_strings(
        "weight = model.lm_head.weight  # lm_head.weight in a comment\n"
        "rows = head.weight.shape[0]\n"
        "message = 'read lm_head.weight'\n"
        "bias = model.get_output_embeddings().bias\n"
    )
    found = [match.group(0) for match in DIRECT_HEAD_READ.finditer(code)]
    assert found == ["lm_head.weight", ".weight.shape", "get_output_embeddings().bias"]


def _causal_lm(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("trainable", [True, False])
def test_an_unsharded_head_is_yielded_as_it_is(trainable):
    model = _causal_lm()
    head = lm_head_of(model)
    with gathered_lm_head(head, trainable=trainable) as gathered:
        assert gathered.weight is model.lm_head.weight  # no copy, no detach: gradients reach the parameter
        assert gathered.bias is None and gathered.vocab_size == 48
        assert gathered.logit_scale == 1.0 and gathered.softcap is None


def test_a_tied_head_is_the_input_embedding():
    model = _causal_lm(tie=True)
    with gathered_lm_head(lm_head_of(model), trainable=True) as gathered:
        assert gathered.weight is model.get_input_embeddings().weight


def test_no_head_yields_none():
    with gathered_lm_head(None, trainable=False) as gathered:
        assert gathered is None


def test_lm_head_of_reads_the_configs_logit_scaling():
    model = _causal_lm()
    model.config.logit_scale = 0.5  # Cohere's convention
    model.config.final_logit_softcapping = 30.0  # Gemma 2's
    head = lm_head_of(model)
    assert (head.logit_scale, head.softcap) == (0.5, 30.0)
    model.config.logits_scaling = 8.0  # Granite's divisor: not supported, refused with what to do
    with pytest.raises(NotImplementedError, match="scales its logits with `logits_scaling`.*open an issue"):
        lm_head_of(model)
    assert torch.is_tensor(head.weight)
