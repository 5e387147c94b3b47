"""
Generation-based evaluation of a policy against its reference: reward, KL, entropy and diversity.

The TDPO paper's controlled-sentiment experiment (§5.1, Fig. 3) judges a method by what its policy *generates*: the
mean reward of sampled completions against their sequential KL divergence from the reference, and the sequential KL on
the chosen and rejected responses of held-out pairs during training. This module computes those quantities for any
causal LM with a tokenizer, plus the entropy and distinct-n diversity the token-level papers report:

- [`generate_completions`]: samples completions (plain ancestral sampling by default, so the samples follow πθ);
- [`score_completions`]: per-completion sums of the per-token statistics of a policy and a reference on given
  completions: log-ratios, the exact per-position forward and reverse KL, and the policy entropy;
- [`sequence_kl`], [`forward_kl_on_generations`], [`predictive_entropy`], [`distinct_n`]: the individual metrics;
- [`evaluate_policy`]: all of them on one set of prompts, returned as a flat `dict`;
- [`GenerationEvalCallback`]: a [`~transformers.TrainerCallback`] that runs [`evaluate_policy`] every N steps and
  logs the results (`eval_gen/reward`, `eval_gen/seq_kl`, ...) into the trainer's `log_history`, with optional
  chosen/rejected sequential KL on fixed preference pairs (`eval_gen/kl_chosen`, ...), so that every method (DPO
  included, which logs no KL) is measured the same way.

Two estimators of the sequential reverse KL `KL(πθ ‖ π_ref)` of the completion distribution are reported, both
unbiased for samples `y ~ πθ`:

- `seq_kl`: the Monte-Carlo estimate `Σ_t [log πθ(y_t|s_t) − log π_ref(y_t|s_t)]` averaged over the samples, as in
  the DPO and TDPO papers' frontier plots;
- `seq_kl_stepwise`: `Σ_t KL(πθ(·|s_t) ‖ π_ref(·|s_t))`, exact over the vocabulary at each visited state: its
  expectation is the same (chain rule of KL), its variance lower, and it is never negative.

Both are only KL estimates when the samples come from πθ itself: with `temperature != 1`, `top_k` or `top_p`, they
estimate `E_{y ~ sampler}[log πθ/π_ref]` instead.
"""

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from .checks import check_same_vocabulary, output_vocab_size
from .token_stats import full_vocabulary_stats


__all__ = [
    "CompletionScores",
    "GenerationEvalCallback",
    "Generations",
    "distinct_n",
    "entropy_from_logits",
    "evaluate_policy",
    "forward_kl_on_generations",
    "generate_completions",
    "pair_sequence_kl",
    "predictive_entropy",
    "score_completions",
    "sequence_kl",
]

RewardFn = Callable[[list[str]], Sequence[float]]


# ------------------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Generations:
    """Sampled completions, as token ids (what is scored) and as text (what the reward reads).

    Attributes:
        prompts (`list[str]`): The prompt of each sample (repeated `num_samples_per_prompt` times).
        prompt_ids (`list[list[int]]`): The tokenized prompt of each sample, without padding.
        completion_ids (`list[list[int]]`): The generated tokens of each sample, up to and including the EOS token
            when one was generated, without padding.
        texts (`list[str]`): The decoded completions, special tokens skipped.
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP-style wrapper (`.module`), which has no `generate`."""
    while hasattr(model, "module") and not hasattr(model, "generate"):
        model = model.module
    return model


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------------------------
# Input checks: at the call (or at the callback's construction), not deep inside torch or after hours of training
# ------------------------------------------------------------------------------------------------------------------

# The sampling arguments of `generate_completions` that `evaluate_policy` and `GenerationEvalCallback` pass through
SAMPLING_ARGUMENTS = (
    "max_new_tokens",
    "num_samples_per_prompt",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "batch_size",
)


def _check_sampling_arguments(
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples_per_prompt: int = 1,
    batch_size: int = 64,
) -> None:
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("num_samples_per_prompt", num_samples_per_prompt),
        ("batch_size", batch_size),
    ):
        if not (is_int(value) and value >= 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not (is_int(top_k) and top_k >= 0):
        raise ValueError(f"`top_k` must be an integer >= 0 (0 disables top-k filtering), got {top_k!r}.")
    if not is_int(seed):
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"`temperature` must be a finite number > 0 (1.0 samples from the policy), got {temperature!r}."
        )
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"`top_p` must be in (0, 1] (1.0 disables nucleus filtering), got {top_p!r}.")


def _check_prompts(prompts) -> list[str]:
    """`prompts` as a list of strings, or a `TypeError`/`ValueError` saying what is wrong with it."""
    if isinstance(prompts, str):
        raise TypeError(
            "`prompts` must be a sequence of strings, got a single string, which would be read as one prompt per "
            "character: pass `[prompt]`."
        )
    try:
        prompts = list(prompts)
    except TypeError:
        raise TypeError(f"`prompts` must be a sequence of strings, got {type(prompts).__name__}.") from None
    if not prompts:
        raise ValueError("`prompts` is empty: give at least one prompt to generate from.")
    not_strings = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    if not_strings:
        raise TypeError(
            f"`prompts` must hold strings, but {len(not_strings)} do not (indices {not_strings[:10]}; the first is a "
            f"{type(prompts[not_strings[0]]).__name__}). Render a conversational prompt to text first, e.g. with "
            "`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`."
        )
    return prompts


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids of each prompt (plain text, no special tokens), refusing prompts without any token."""
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    empty = [i for i, ids in enumerate(encoded) if len(ids) == 0]
    if empty:
        raise ValueError(
            f"{len(empty)} prompt(s) have no token (indices {empty[:10]}, e.g. {prompts[empty[0]]!r}): the first "
            "completion token is predicted from the prompt's last token, so every prompt needs at least one. Remove "
            "them or give them text."
        )
    return encoded


def _check_same_vocabulary(policy: torch.nn.Module, reference: torch.nn.Module | None) -> None:
    if reference is not None:
        check_same_vocabulary(
            _unwrap(policy),
            _unwrap(reference),
            "reference",
            "every KL compares their next-token distributions token by token, so they must share one tokenizer.",
            "Pass the reference the policy was trained from (e.g. its SFT model).",
        )


def _check_token_ids(rows: Sequence[Sequence[int]], model: torch.nn.Module, what: str) -> None:
    vocab_size = output_vocab_size(_unwrap(model))
    largest = max((max(row) for row in rows if len(row) > 0), default=None)
    if vocab_size is not None and largest is not None and (largest >= vocab_size or largest < 0):
        raise ValueError(
            f"The {what} hold token id {largest}, but the model has {vocab_size} output logits: the tokenizer is not "
            "the model's. Use the tokenizer the model was trained with."
        )


def _check_pairs(pairs) -> list[tuple[str, str, str]]:
    """`(prompt, chosen, rejected)` triples from triples or rows with those keys, or an error naming the bad row."""
    if isinstance(pairs, (str, dict)):
        raise TypeError(
            "`preference_pairs` must be a sequence of (prompt, chosen, rejected) triples or rows with those keys, "
            f"got a single {type(pairs).__name__}: wrap it in a list."
        )
    triples = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, dict):
            lacking = [key for key in ("prompt", "chosen", "rejected") if key not in pair]
            if lacking:
                raise ValueError(f"Preference pair {i} has no {lacking} key(s); its keys are {sorted(pair)}.")
            triple = (pair["prompt"], pair["chosen"], pair["rejected"])
        elif isinstance(pair, (list, tuple)) and len(pair) == 3:
            triple = tuple(pair)
        else:
            raise TypeError(
                f"Preference pair {i} must be a (prompt, chosen, rejected) triple or a row with those keys, got "
                f"{pair!r:.100}."
            )
        if not all(isinstance(text, str) for text in triple):
            raise TypeError(
                f"Preference pair {i} must hold strings (plain text, as in TRL's standard format), got types "
                f"{[type(text).__name__ for text in triple]}."
            )
        triples.append(triple)
    return triples


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples_per_prompt: int = 1,
    batch_size: int = 64,
) -> Generations:
    """
    Samples completions of `prompts` from `model`.

    The defaults are plain ancestral sampling (`temperature=1`, no top-k, no top-p), the only setting under which the
    samples follow the policy πθ and the KL estimates of [`evaluate_policy`] are unbiased. Sampling runs under a
    forked RNG seeded with `seed`: the same model and seed give the same samples, and the caller's RNG state (for
    instance a trainer's) is left untouched. The model's training mode is restored afterwards.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            A causal LM (a PEFT model works too).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer; needs a pad or EOS token. Prompts are tokenized as plain text, without special tokens
            added (the convention of TRL's standard, non-conversational datasets).
        prompts (`Sequence[str]`):
            The prompts.
        max_new_tokens (`int`, *optional*, defaults to `32`):
            Maximum number of generated tokens; a completion stops earlier at the EOS token.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k filtering; `0` disables it (Transformers' own default would be 50).
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus filtering; `1.0` disables it.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sampling.
        num_samples_per_prompt (`int`, *optional*, defaults to `1`):
            Number of completions per prompt; the samples of one prompt are consecutive.
        batch_size (`int`, *optional*, defaults to `64`):
            Number of sequences generated at once.

    Returns:
        [`Generations`]: The prompts, token ids and decoded texts.
    """
    prompts = _check_prompts(prompts)
    _check_sampling_arguments(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        num_samples_per_prompt=num_samples_per_prompt,
        batch_size=batch_size,
    )
    model = _unwrap(model)
    device = _device_of(model)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token: set `tokenizer.pad_token`.")
    encoded_prompts = _encode_prompts(tokenizer, prompts)
    _check_token_ids(encoded_prompts, model, "tokenized prompts")
    expanded = [prompt for prompt in prompts for _ in range(num_samples_per_prompt)]
    encoded = [list(ids) for ids in encoded_prompts for _ in range(num_samples_per_prompt)]
    completion_ids = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start : start + batch_size]
                width = max(len(ids) for ids in batch)
                # Left padding, so that every row's next token is at the last column
                input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + ids for ids in batch], device=device)
                attention_mask = torch.tensor(
                    [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device
                )
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                for row in output[:, width:].tolist():
                    # Keep the EOS token (it is a sampled action, and TRL scores it too); drop what follows
                    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                        row = row[: row.index(tokenizer.eos_token_id) + 1]
                    completion_ids.append(row)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Generations(prompts=expanded, prompt_ids=encoded, completion_ids=completion_ids, texts=texts)


# ------------------------------------------------------------------------------------------------------------------
# Per-completion statistics
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class CompletionScores:
    """Per-completion sums over the completion tokens, each a float64 tensor of shape `[N]`.

    Attributes:
        log_ratio (`torch.Tensor`): `Σ_t log πθ(y_t|s_t) − log π_ref(y_t|s_t)`; its mean over samples `y ~ πθ` is the
            Monte-Carlo estimate of the sequential reverse KL.
        reverse_kl (`torch.Tensor`): `Σ_t KL(πθ(·|s_t) ‖ π_ref(·|s_t))`, exact over the vocabulary.
        forward_kl (`torch.Tensor`): `Σ_t KL(π_ref(·|s_t) ‖ πθ(·|s_t))`, exact over the vocabulary: TDPO's sequential
            KL `D_SeqKL(x, y; π_ref ‖ πθ)` (paper Def. 4.3), the `kl/chosen` / `kl/rejected` that `TDPOTrainer` logs.
        entropy (`torch.Tensor`): `Σ_t H(πθ(·|s_t))`.
        num_tokens (`torch.Tensor`): Number of completion tokens.
    """

    log_ratio: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    entropy: torch.Tensor
    num_tokens: torch.Tensor


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy `H(softmax(logits))` over the last dimension, in nats, from `log_softmax` (no `0 · log 0` NaN)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return full_vocabulary_stats(log_probs, log_probs).entropy


def _right_padded_batch(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prompt + completion` rows, right-padded: input ids, attention mask, and the completion mask of the labels
    (aligned with `input_ids[:, 1:]`)."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        length = len(prompt) + len(completion)
        input_ids[i, :length] = torch.tensor(prompt + completion)
        attention_mask[i, :length] = 1
        completion_mask[i, len(prompt) : length] = True
    return input_ids.to(device), attention_mask.to(device), completion_mask[:, 1:].to(device)


@torch.no_grad()
def score_completions(
    policy: PreTrainedModel,
    reference: PreTrainedModel | None,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_token_id: int = 0,
    batch_size: int = 32,
) -> CompletionScores:
    """
    Per-completion sums of the per-token statistics of `policy` against `reference` on given completions.

    Each row is scored as `prompt + completion` (right-padded, so positions start at 0 as in training); only the
    completion tokens are summed. The policy and reference logits of one batch are materialised in float32, so lower
    `batch_size` for a large vocabulary.

    Args:
        policy ([`~transformers.PreTrainedModel`]):
            The policy πθ.
        reference ([`~transformers.PreTrainedModel`] or `None`):
            The reference π_ref; must share the policy's tokenizer. `None` scores the policy alone (every log-ratio
            and KL is then 0; the entropy is computed).
        prompt_ids (`list[list[int]]`):
            Prompt tokens of each row, without padding. A prompt must have at least one token.
        completion_ids (`list[list[int]]`):
            Completion tokens of each row, without padding (include the EOS token to score it).
        pad_token_id (`int`, *optional*, defaults to `0`):
            Token used for padding (masked out; any valid id works).
        batch_size (`int`, *optional*, defaults to `32`):
            Rows scored at once.

    Returns:
        [`CompletionScores`]: Sums over each completion's tokens; 0 for an empty completion.
    """
    policy = _unwrap(policy)
    reference = None if reference is None else _unwrap(reference)
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"`prompt_ids` and `completion_ids` must have one row each per completion, got {len(prompt_ids)} and "
            f"{len(completion_ids)} rows."
        )
    if len(prompt_ids) == 0:
        raise ValueError("Nothing to score: `prompt_ids` and `completion_ids` are empty.")
    empty = [i for i, ids in enumerate(prompt_ids) if len(ids) == 0]
    if empty:
        raise ValueError(
            f"Every prompt needs at least one token (the first completion token is predicted from it), but rows "
            f"{empty[:10]} have none."
        )
    _check_same_vocabulary(policy, reference)
    _check_token_ids([*prompt_ids, *completion_ids], policy, "prompts and completions")
    device = _device_of(policy)
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in ("lr", "rkl", "fkl", "ent", "n")}
    modes = policy.training, None if reference is None else reference.training
    policy.eval()
    if reference is not None:
        reference.eval()
    try:
        for start in range(0, len(prompt_ids), batch_size):
            stop = start + batch_size
            input_ids, attention_mask, mask = _right_padded_batch(
                prompt_ids[start:stop], completion_ids[start:stop], pad_token_id, device
            )
            policy_logits = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            if reference is None:
                reference_logits = policy_logits
            else:
                reference_logits = reference(
                    input_ids=input_ids.to(_device_of(reference)),
                    attention_mask=attention_mask.to(_device_of(reference)),
                    use_cache=False,
                ).logits.to(device)
            log_probs = F.log_softmax(policy_logits[:, :-1].float(), dim=-1)
            ref_log_probs = F.log_softmax(reference_logits[:, :-1].float(), dim=-1)
            labels = input_ids[:, 1:].unsqueeze(-1)
            full = full_vocabulary_stats(log_probs, ref_log_probs)
            per_token = {
                "lr": (log_probs.gather(-1, labels) - ref_log_probs.gather(-1, labels)).squeeze(-1),
                "rkl": full.reverse_kl,
                "fkl": full.forward_kl,
                "ent": full.entropy,
                "n": torch.ones_like(mask, dtype=torch.float32),
            }
            for name, values in per_token.items():
                # `where`, not a product: a masked position may hold -inf - -inf = nan
                sums[name].append(torch.where(mask, values, 0.0).double().sum(-1).cpu())
    finally:
        policy.train(modes[0])
        if reference is not None:
            reference.train(modes[1])
    cat = {name: torch.cat(values) for name, values in sums.items()}
    return CompletionScores(
        log_ratio=cat["lr"],
        reverse_kl=cat["rkl"],
        forward_kl=cat["fkl"],
        entropy=cat["ent"],
        num_tokens=cat["n"],
    )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def sequence_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    generations: Generations,
    pad_token_id: int = 0,
    batch_size: int = 32,
) -> torch.Tensor:
    """
    Monte-Carlo estimate of the sequential reverse KL on sampled completions, one value per sample.

    `Σ_t log πθ(y_t|s_t) − log π_ref(y_t|s_t)` over the generated tokens. For `y ~ πθ` its mean is an unbiased estimate
    of `KL(πθ(·|x) ‖ π_ref(·|x))` over whole completions, the x-axis of the DPO and TDPO papers' reward-KL frontiers.
    A single value can be negative; only the mean is a KL estimate.

    Args:
        policy ([`~transformers.PreTrainedModel`]): The policy that generated `generations`.
        reference ([`~transformers.PreTrainedModel`]): The reference.
        generations ([`Generations`]): Output of [`generate_completions`] with `policy`.
        pad_token_id (`int`, *optional*, defaults to `0`): Padding id used while scoring.
        batch_size (`int`, *optional*, defaults to `32`): Rows scored at once.

    Returns:
        `torch.Tensor`: float64, shape `[N]`.
    """
    return score_completions(
        policy, reference, generations.prompt_ids, generations.completion_ids, pad_token_id, batch_size
    ).log_ratio


def forward_kl_on_generations(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    generations: Generations,
    pad_token_id: int = 0,
    batch_size: int = 32,
) -> torch.Tensor:
    """
    Sequential forward KL `Σ_t KL(π_ref(·|s_t) ‖ πθ(·|s_t))` over the generated tokens, exact over the vocabulary.

    This is TDPO's `D_SeqKL(x, y; π_ref ‖ πθ)` (paper Def. 4.3) on the policy's own samples: the quantity of the TDPO
    paper's forward-KL frontier (App. C, Fig. 6a).

    Args:
        policy, reference, generations, pad_token_id, batch_size: As in [`sequence_kl`].

    Returns:
        `torch.Tensor`: float64, shape `[N]`, non-negative.
    """
    return score_completions(
        policy, reference, generations.prompt_ids, generations.completion_ids, pad_token_id, batch_size
    ).forward_kl


def predictive_entropy(
    policy: PreTrainedModel, generations: Generations, pad_token_id: int = 0, batch_size: int = 32
) -> float:
    """
    Mean per-token entropy `H(πθ(·|s_t))` of the policy over the states it visits on its generations, in nats.

    Averaged over all generated tokens (not per sequence first), so long completions weigh more, as in a per-token
    metric.

    Args:
        policy ([`~transformers.PreTrainedModel`]): The policy.
        generations ([`Generations`]): Its samples.
        pad_token_id (`int`, *optional*, defaults to `0`): Padding id used while scoring.
        batch_size (`int`, *optional*, defaults to `32`): Rows scored at once.

    Returns:
        `float`: The mean entropy; `nan` if no token was generated.
    """
    scores = score_completions(
        policy, None, generations.prompt_ids, generations.completion_ids, pad_token_id, batch_size
    )
    total = scores.num_tokens.sum().item()
    return scores.entropy.sum().item() / total if total > 0 else math.nan


def distinct_n(texts: Sequence[str], n: int) -> float:
    """
    Corpus-level distinct-n (Li et al., 2016): distinct word n-grams over all word n-grams of all texts.

    Words are whitespace-separated; n-grams never span two texts. 1.0 means no n-gram repeats, values near 0 mean
    the texts repeat the same few n-grams (a collapsed policy).

    Args:
        texts (`Sequence[str]`): The generated texts.
        n (`int`): The n-gram order, >= 1.

    Returns:
        `float`: In `[0, 1]`; 0.0 when the texts hold no n-gram.

    Example:

    ```python
    >>> distinct_n(["the cat saw the dog"], 1)  # 4 distinct words out of 5
    0.8
    ```
    """
    if n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n}.")
    total = 0
    distinct = set()
    for text in texts:
        words = text.split()
        ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(ngrams)
        distinct.update(ngrams)
    return len(distinct) / total if total else 0.0


def pair_sequence_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str, str]] | Sequence[dict[str, str]],
    batch_size: int = 32,
) -> dict[str, float]:
    """
    Mean sequential KL on the chosen and on the rejected completions of fixed preference pairs.

    Each completion is tokenized as TRL's standard format does (plain text, the EOS token appended) and scored after
    its prompt. The forward KL is exactly what `TDPOTrainer` logs as `kl/chosen` and `kl/rejected`, but computed for
    any policy (DPO's trainer logs no KL) on the same fixed pairs, so that methods compare on equal terms; the
    reverse KL `Σ_t KL(πθ ‖ π_ref)` at the same states is the notation of the TDPO paper's Fig. 3b–d caption.

    Args:
        policy ([`~transformers.PreTrainedModel`]): The policy.
        reference ([`~transformers.PreTrainedModel`]): The reference.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The shared tokenizer.
        pairs (`Sequence`): `(prompt, chosen, rejected)` triples or rows with those keys, completions as plain text
            (starting with a space if the prompt does not end with one).
        batch_size (`int`, *optional*, defaults to `32`): Rows scored at once.

    Returns:
        `dict[str, float]`: `kl_chosen`, `kl_rejected`, `kl_margin` (chosen − rejected, the sign convention of TDPO's
        `kl/margin`) for the forward KL, and `reverse_kl_chosen`, `reverse_kl_rejected`, `reverse_kl_margin`.
    """
    triples = _check_pairs(pairs)
    if not triples:
        raise ValueError("`pairs` is empty: give at least one (prompt, chosen, rejected) triple.")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids = [encode(prompt) for prompt, _, _ in triples]
    results = {}
    for side, index in (("chosen", 1), ("rejected", 2)):
        completion_ids = [encode(triple[index]) + eos for triple in triples]
        scores = score_completions(policy, reference, prompt_ids, completion_ids, _pad_id(tokenizer), batch_size)
        results[f"kl_{side}"] = scores.forward_kl.mean().item()
        results[f"reverse_kl_{side}"] = scores.reverse_kl.mean().item()
    results["kl_margin"] = results["kl_chosen"] - results["kl_rejected"]
    results["reverse_kl_margin"] = results["reverse_kl_chosen"] - results["reverse_kl_rejected"]
    return results


# ------------------------------------------------------------------------------------------------------------------
# Everything at once, and during training
# ------------------------------------------------------------------------------------------------------------------


def evaluate_policy(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    max_new_tokens: int = 32,
    num_samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    preference_pairs: Sequence | None = None,
    return_generations: bool = False,
) -> dict[str, float] | tuple[dict[str, float], Generations]:
    """
    Samples completions of `prompts` from `policy` and measures them against `reference`.

    Args:
        policy ([`~transformers.PreTrainedModel`]):
            The policy πθ.
        reference ([`~transformers.PreTrainedModel`]):
            The reference π_ref (for instance the SFT model); must share the policy's tokenizer.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The shared tokenizer.
        prompts (`Sequence[str]`):
            Held-out prompts.
        reward_fn (`Callable[[list[str]], Sequence[float]]`):
            Called once with the list of decoded completions (without their prompts); returns one reward each.
        max_new_tokens, num_samples_per_prompt, temperature, top_k, top_p, seed, batch_size:
            Sampling settings, see [`generate_completions`]. Keep the defaults `temperature=1, top_k=0, top_p=1` for
            the KL metrics to be KL estimates.
        preference_pairs (`Sequence`, *optional*):
            `(prompt, chosen, rejected)` triples (or rows with those keys). When given, the mean sequential KL on
            each side is added (see [`pair_sequence_kl`]).
        return_generations (`bool`, *optional*, defaults to `False`):
            Whether to also return the [`Generations`].

    Returns:
        `dict[str, float]` with:

        - `reward`, `reward_std`: mean and standard deviation of the reward of the samples;
        - `seq_kl`: Monte-Carlo sequential reverse KL, mean of `Σ_t log πθ/π_ref` ([`sequence_kl`]);
        - `seq_kl_stepwise`: mean of `Σ_t KL(πθ ‖ π_ref)(s_t)`, the lower-variance estimate of the same KL;
        - `forward_kl`: mean of `Σ_t KL(π_ref ‖ πθ)(s_t)` ([`forward_kl_on_generations`]);
        - `entropy`: mean per-token entropy of πθ on its samples ([`predictive_entropy`]);
        - `distinct_1`, `distinct_2`: [`distinct_n`] of the decoded completions;
        - `length`: mean number of generated tokens; `eos_rate`: fraction of samples that ended with EOS;
          `num_samples`: number of samples;
        - with `preference_pairs`: `kl_chosen`, `kl_rejected`, `kl_margin`, `reverse_kl_chosen`,
          `reverse_kl_rejected`, `reverse_kl_margin`.

        And the [`Generations`] if `return_generations=True`.
    """
    if not callable(reward_fn):
        raise TypeError(f"`reward_fn` must be a callable (list of texts -> rewards), got {type(reward_fn).__name__}.")
    # Before sampling: a reference with another vocabulary or a malformed pair would only fail once sampled
    _check_same_vocabulary(policy, reference)
    if preference_pairs is not None:
        _check_pairs(preference_pairs)
    generations = generate_completions(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        num_samples_per_prompt=num_samples_per_prompt,
        batch_size=batch_size,
    )
    rewards = torch.tensor([float(r) for r in reward_fn(generations.texts)], dtype=torch.float64)
    if rewards.numel() != len(generations):
        raise ValueError(f"`reward_fn` returned {rewards.numel()} rewards for {len(generations)} completions.")
    pad_token_id = _pad_id(tokenizer)
    scores = score_completions(
        policy, reference, generations.prompt_ids, generations.completion_ids, pad_token_id, batch_size
    )
    num_tokens = scores.num_tokens.sum().item()
    eos_id = tokenizer.eos_token_id
    metrics = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "seq_kl": scores.log_ratio.mean().item(),
        "seq_kl_stepwise": scores.reverse_kl.mean().item(),
        "forward_kl": scores.forward_kl.mean().item(),
        "entropy": scores.entropy.sum().item() / num_tokens if num_tokens else math.nan,
        "distinct_1": distinct_n(generations.texts, 1),
        "distinct_2": distinct_n(generations.texts, 2),
        "length": scores.num_tokens.mean().item(),
        "eos_rate": sum(bool(ids) and ids[-1] == eos_id for ids in generations.completion_ids) / len(generations),
        "num_samples": len(generations),
    }
    if preference_pairs is not None and len(preference_pairs) > 0:
        metrics.update(pair_sequence_kl(policy, reference, tokenizer, preference_pairs, batch_size=batch_size))
    return (metrics, generations) if return_generations else metrics


class GenerationEvalCallback(TrainerCallback):
    """
    Runs [`evaluate_policy`] every `every_n_steps` optimisation steps and logs the results into the trainer's log.

    The metrics are logged with the prefix `eval_gen/` (`eval_gen/reward`, `eval_gen/seq_kl`, `eval_gen/kl_chosen`,
    ...) into `trainer.state.log_history`, with their `step`; every evaluation is also kept in `self.history`. When the
    callback knows its trainer (pass `trainer=` or call [`attach`]), the other callbacks' `on_log` (printing, W&B,
    TensorBoard) receive them too. They are appended directly rather than through `trainer.log`, because TRL's
    trainers flush their accumulated training metrics in `log`. The step-0 evaluation reaches the other callbacks
    (the console's progress bar included) at the first step, once they have all started.

    The arguments (prompts, pairs, sampling settings, the names in `**generation_kwargs`) are checked when the callback
    is built, and the reference's vocabulary against the policy's when training begins, rather than at the first
    evaluation, `every_n_steps` steps into training.

    Sampling uses a fixed seed (the same samples for the same model) under a forked RNG, so evaluating does not change
    the training run's random draws, and two methods evaluated with the same callback settings see the same
    prompts, seeds and pairs.

    Args:
        reference ([`~transformers.PreTrainedModel`]):
            The reference π_ref, kept frozen (e.g. the SFT model the trainer's `ref_model` was loaded from). Moved to
            the policy's device at the first evaluation.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The shared tokenizer.
        prompts (`Sequence[str]`):
            Held-out prompts.
        reward_fn (`Callable[[list[str]], Sequence[float]]`):
            Reward of a list of completions.
        every_n_steps (`int`, *optional*, defaults to `50`):
            Evaluation period, in optimisation steps. The last step is always evaluated.
        eval_on_start (`bool`, *optional*, defaults to `True`):
            Whether to evaluate at step 0, before training (the reference point of the curves).
        preference_pairs (`Sequence`, *optional*):
            Fixed `(prompt, chosen, rejected)` pairs on which to log the chosen/rejected sequential KL.
        prefix (`str`, *optional*, defaults to `"eval_gen/"`):
            Prefix of the logged keys.
        trainer ([`~transformers.Trainer`], *optional*):
            The trainer, whose other callbacks then receive the logs through `on_log`.
        **generation_kwargs:
            Passed to [`evaluate_policy`]: `max_new_tokens`, `num_samples_per_prompt`, `temperature`, `top_k`,
            `top_p`, `seed`, `batch_size`.

    Example:

    ```python
    callback = GenerationEvalCallback(ref_model, tokenizer, held_out_prompts, reward_fn, every_n_steps=25)
    trainer = DPOTrainer(model=..., args=..., train_dataset=..., callbacks=[callback])
    callback.attach(trainer)
    trainer.train()
    rewards = [(log["step"], log["eval_gen/reward"]) for log in trainer.state.log_history if "eval_gen/reward" in log]
    ```
    """

    def __init__(
        self,
        reference: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        reward_fn: RewardFn,
        every_n_steps: int = 50,
        eval_on_start: bool = True,
        preference_pairs: Sequence | None = None,
        prefix: str = "eval_gen/",
        trainer=None,
        **generation_kwargs,
    ):
        # Everything is checked here, at construction: a mistake would otherwise surface at the first evaluation,
        # after `every_n_steps` steps of training
        unknown = sorted(set(generation_kwargs) - set(SAMPLING_ARGUMENTS))
        if unknown:
            hints = []
            for name in unknown:
                match = difflib.get_close_matches(name, SAMPLING_ARGUMENTS, n=1)
                hints.append(f"`{name}`" + (f" (did you mean `{match[0]}`?)" if match else ""))
            raise TypeError(
                f"GenerationEvalCallback got unknown argument(s) {', '.join(hints)}. Its generation arguments are "
                f"{', '.join(SAMPLING_ARGUMENTS)}."
            )
        _check_sampling_arguments(**generation_kwargs)
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive integer, got {every_n_steps!r}.")
        if not isinstance(reference, torch.nn.Module):
            raise TypeError(
                f"`reference` must be the reference model (a torch module), got {type(reference).__name__}."
            )
        if not callable(reward_fn):
            raise TypeError(
                f"`reward_fn` must be a callable (list of texts -> rewards), got {type(reward_fn).__name__}."
            )
        prompts = _check_prompts(prompts)
        _check_token_ids(_encode_prompts(tokenizer, prompts), reference, "tokenized prompts")
        if preference_pairs is not None:
            preference_pairs = _check_pairs(preference_pairs)
        self.reference = reference.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.reward_fn = reward_fn
        self.every_n_steps = every_n_steps
        self.eval_on_start = eval_on_start
        self.preference_pairs = preference_pairs
        self.prefix = prefix
        self.trainer = trainer
        self.generation_kwargs = generation_kwargs
        self.history: list[dict[str, float]] = []
        self._last_step = None
        # The step-0 logs, sent to the other callbacks at the first step: at `on_train_begin` the progress bar, which
        # prints the logs, does not exist yet (the trainer adds its progress callback after the user's callbacks)
        self._pending_logs: dict[str, float] | None = None

    def attach(self, trainer) -> "GenerationEvalCallback":
        """Forwards the logs to `trainer`'s other callbacks from now on; returns the callback."""
        self.trainer = trainer
        return self

    def evaluate(self, model: PreTrainedModel, step: int) -> dict[str, float]:
        """Evaluates `model` now and returns the metrics (with `step`), without logging them."""
        policy = _unwrap(model)
        if _device_of(self.reference) != _device_of(policy):
            self.reference.to(_device_of(policy))
        metrics = evaluate_policy(
            policy,
            self.reference,
            self.tokenizer,
            self.prompts,
            self.reward_fn,
            preference_pairs=self.preference_pairs,
            **self.generation_kwargs,
        )
        return {"step": step, **metrics}

    def _evaluate_and_log(self, model, state, defer: bool = False) -> None:
        """Evaluates `model` at this step (once), appends the logs to `state.log_history` and hands them to the other
        callbacks now or, with `defer`, at the next step."""
        if model is None or self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        result = self.evaluate(model, state.global_step)
        self.history.append(result)
        if not state.is_world_process_zero:
            return
        logs = {f"{self.prefix}{key}": value for key, value in result.items() if key != "step"}
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        logs["step"] = state.global_step
        # Appended directly, not through `trainer.log`: TRL's trainers merge and clear their accumulated training
        # metrics in `log`, which would steal them from the next regular training log
        state.log_history.append(logs)
        if defer:
            self._pending_logs = logs
        else:
            self._send_logs(state, logs)

    def _send_logs(self, state, logs: dict[str, float]) -> None:
        """Hands `logs` to the trainer's other callbacks (printing, progress bar, trackers), if it is known."""
        if self.trainer is None:
            return
        # `call_event`, not `on_log`: `CallbackHandler.on_log` also clears `control.should_log`, which would skip the
        # trainer's own log of this step
        trainer = self.trainer
        trainer.control = trainer.callback_handler.call_event(
            "on_log", trainer.args, state, trainer.control, logs=dict(logs)
        )

    def _send_pending_logs(self, state) -> None:
        if self._pending_logs is not None:
            logs, self._pending_logs = self._pending_logs, None
            self._send_logs(state, logs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _check_same_vocabulary(model, self.reference)
        if self.eval_on_start:
            self._evaluate_and_log(model, state, defer=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._send_pending_logs(state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            self._evaluate_and_log(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._send_pending_logs(state)  # a run without any step
        # The last step of an epoch-based run whose length is not a multiple of the period
        self._evaluate_and_log(model, state)
