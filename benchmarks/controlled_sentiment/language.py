"""
A synthetic "movie review" language with a known, programmatic sentiment reward.

This stands in for IMDb and for the sentiment classifier of the TDPO paper's controlled-sentiment experiment (§5.1,
Fig. 3), neither of which can be downloaded here. Everything is deterministic code:

- [`sentiment_score`] / [`sentiment_reward`]: the reward. A lexicon of sentiment words (adjectives and verbs) with
  weights, intensifiers that scale the next sentiment word, and negations that flip and dampen it (as in lexicon
  classifiers such as VADER: "not good" is mildly negative, "not bad" mildly positive). The score is the sum over
  the sentiment words of the text; the reward is `sigmoid(score / REWARD_TEMPERATURE)`, a number in `(0, 1)` read as
  "the probability that the review is positive", like the classifier's output in the paper.
- [`make_review`] / [`make_sft_corpus`]: a small grammar that writes reviews of mixed sentiment. Each review has a
  latent polarity (the probability that each of its sentiment slots is positive) so that the corpus, and the SFT
  model trained on it, produce both enthusiastic and scathing reviews, and everything in between.
- [`make_prompts`]: review openings ("the movie was", "honestly the plot felt"), as the paper's IMDb prefixes,
  split into train and held-out prompts that never overlap.

The reward only reads words it knows, so the byte-level garbage a tiny model may emit scores 0 rather than failing.
"""

import math
import random
import re


# ------------------------------------------------------------------------------------------------------------------
# The lexicon and the reward
# ------------------------------------------------------------------------------------------------------------------

# Weight of each sentiment word. The magnitudes are graded (fine < good < great < perfect) so that the reward rewards
# *stronger* positive words, not only positive ones: there is always more reward to gain, as with a classifier's
# confidence.
POSITIVE_ADJECTIVES = {
    "nice": 0.75,
    "fine": 0.5,
    "solid": 0.75,
    "good": 1.0,
    "fun": 1.0,
    "funny": 1.0,
    "charming": 1.25,
    "clever": 1.25,
    "enjoyable": 1.5,
    "beautiful": 1.5,
    "moving": 1.5,
    "great": 2.0,
    "wonderful": 2.5,
    "brilliant": 2.5,
    "excellent": 2.5,
    "perfect": 3.0,
}
NEGATIVE_ADJECTIVES = {
    "slow": -0.5,
    "predictable": -0.75,
    "bad": -1.0,
    "dull": -1.0,
    "weak": -1.0,
    "messy": -1.0,
    "annoying": -1.25,
    "boring": -1.5,
    "poor": -1.5,
    "stupid": -2.0,
    "painful": -2.0,
    "awful": -2.5,
    "terrible": -2.5,
    "horrible": -2.5,
    "worst": -3.0,
}
# Adjectives that carry no sentiment but still take modifiers: "not long" uses up its negation, which must not carry
# over to a later sentiment word.
NEUTRAL_ADJECTIVES = [
    "long",
    "short",
    "loud",
    "quiet",
    "simple",
    "strange",
    "dark",
    "old",
    "new",
    "familiar",
    "serious",
]
# Verbs, in the forms the grammar uses ("i loved it", "i did not enjoy it", "i would recommend it")
POSITIVE_VERBS = {"liked": 1.0, "like": 1.0, "enjoyed": 1.5, "enjoy": 1.5, "loved": 2.0, "love": 2.0, "recommend": 1.5}
NEGATIVE_VERBS = {"disliked": -1.5, "dislike": -1.5, "hated": -2.0, "hate": -2.0, "regret": -1.5}

SENTIMENT_WEIGHTS: dict[str, float] = {
    **POSITIVE_ADJECTIVES,
    **NEGATIVE_ADJECTIVES,
    **POSITIVE_VERBS,
    **NEGATIVE_VERBS,
}
# Words that use up pending modifiers without scoring
NEUTRAL_WORDS = frozenset(NEUTRAL_ADJECTIVES)

INTENSIFIERS = {
    "slightly": 0.5,
    "somewhat": 0.7,
    "quite": 1.2,
    "pretty": 1.2,
    "so": 1.3,
    "very": 1.5,
    "really": 1.5,
    "truly": 1.5,
    "extremely": 2.0,
}
NEGATIONS = frozenset({"not", "never", "hardly"})
# A negated sentiment word counts with this factor: flipped, and weaker ("not great" < "bad" < 0 < "not bad")
NEGATION_FACTOR = -0.5
# Clause boundaries end the scope of pending modifiers: "not long, but good" does not negate "good"
CLAUSE_BOUNDARY_WORDS = frozenset({"but", "and", "although", "though"})
# The reward is sigmoid(score / REWARD_TEMPERATURE). With 2.0, one "good" gives 0.62, one "great" 0.73 and a review
# with three strong positive words about 0.97: the reward keeps rising with how positive the review is.
REWARD_TEMPERATURE = 2.0

_WORD_OR_PUNCTUATION = re.compile(r"[a-z]+|[.,;:!?]")


def sentiment_score(text: str) -> float:
    """
    Lexicon sentiment score of a text: the sum of the weights of its sentiment words, scaled by their modifiers.

    The text is lower-cased and split into words and punctuation; anything else (digits, stray bytes, special tokens)
    is ignored. Scanning left to right, intensifiers multiply and negations flip (factor `NEGATION_FACTOR`) the next
    sentiment word of the same clause; a neutral adjective ("not long") uses the pending modifiers up without scoring,
    and punctuation or a conjunction ("but", "and") drops them.

    Args:
        text (`str`):
            The review (or just a completion).

    Returns:
        `float`: The score: positive for a positive review, negative for a negative one, 0 without sentiment words.

    Example:

    ```python
    >>> sentiment_score("the movie was very good")
    1.5
    >>> sentiment_score("the movie was not good")
    -0.5
    ```
    """
    score = 0.0
    multiplier = 1.0
    for word in _WORD_OR_PUNCTUATION.findall(text.lower()):
        if word in SENTIMENT_WEIGHTS:
            score += multiplier * SENTIMENT_WEIGHTS[word]
            multiplier = 1.0
        elif word in NEUTRAL_WORDS or word in CLAUSE_BOUNDARY_WORDS or not word.isalpha():
            multiplier = 1.0
        elif word in INTENSIFIERS:
            multiplier *= INTENSIFIERS[word]
        elif word in NEGATIONS:
            multiplier *= NEGATION_FACTOR
    return score


def sentiment_reward(text: str) -> float:
    """
    The reward of the experiment: `sigmoid(sentiment_score(text) / REWARD_TEMPERATURE)`, in `(0, 1)`.

    Deterministic and cheap; plays the role of the sentiment classifier's P(positive) in the TDPO paper (§5.1).

    Args:
        text (`str`):
            The generated completion (the prompt is usually left out: it carries no sentiment).

    Returns:
        `float`: 0.5 for a text without sentiment, towards 1 for a positive review and towards 0 for a negative one.
    """
    return 1.0 / (1.0 + math.exp(-sentiment_score(text) / REWARD_TEMPERATURE))


def batch_sentiment_reward(texts: list[str]) -> list[float]:
    """[`sentiment_reward`] of each text (the `reward_fn` signature that `trl_tokenpref.evaluation` expects)."""
    return [sentiment_reward(text) for text in texts]


# ------------------------------------------------------------------------------------------------------------------
# The grammar: prompts and reviews
# ------------------------------------------------------------------------------------------------------------------

SUBJECTS = [
    "movie",
    "film",
    "plot",
    "story",
    "acting",
    "ending",
    "music",
    "cast",
    "script",
    "dialogue",
    "director",
    "soundtrack",
    "lead actor",
    "first half",
    "second half",
    "villain",
]
LEAD_INS = ["", "i think", "honestly", "overall", "to be fair", "in my opinion", "i must say", "sadly", "frankly"]
LINKING_VERBS = ["was", "is", "felt", "seemed"]
FILLERS = [
    "i watched it with my friends",
    "i saw it last week",
    "it runs for two hours",
    "the story follows a young woman",
    "it is set in a small town",
    "the cast includes many actors",
    "it is based on a book",
    "my brother chose it",
    "we went on a friday",
    "i had heard about it",
    "the theater was full",
    "it came out last year",
]
NOUNS_FOR_ATTRIBUTES = ["film", "movie", "story", "ride", "experience", "watch", "effort"]


def make_prompts(seed: int = 0, num_held_out: int = 64) -> tuple[list[str], list[str]]:
    """
    Review openings, split into train and held-out prompts.

    Every opening is `[lead-in] the SUBJECT VERB` ("the movie was", "honestly the plot felt"), as the IMDb review
    prefixes the paper prompts GPT-2 with. The openings carry no sentiment; the split is a seeded shuffle of all of
    them, so that the held-out prompts are never trained on.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shuffle.
        num_held_out (`int`, *optional*, defaults to `64`):
            Number of held-out prompts.

    Returns:
        `tuple[list[str], list[str]]`: The train prompts and the held-out prompts.
    """
    prompts = [
        " ".join(part for part in (lead_in, "the", subject, verb) if part)
        for lead_in in LEAD_INS
        for subject in SUBJECTS
        for verb in LINKING_VERBS
    ]
    if not 0 < num_held_out < len(prompts):
        raise ValueError(f"`num_held_out` must be between 1 and {len(prompts) - 1}, got {num_held_out}.")
    random.Random(seed).shuffle(prompts)
    return prompts[num_held_out:], prompts[:num_held_out]


def _sentiment_word(rng: random.Random, positive: bool, table: dict[str, float]) -> str:
    words = [word for word, weight in table.items() if (weight > 0) == positive]
    return rng.choice(words)


def _modified_adjective(rng: random.Random, positive_probability: float) -> str:
    """An adjective with optional intensifier and negation. The *surface* word follows the review's polarity; a
    negation then flips its meaning, which the reward accounts for and the model has to learn."""
    if rng.random() < 0.12:
        adjective = rng.choice(NEUTRAL_ADJECTIVES)
    else:
        adjective = rng.choice(
            list(POSITIVE_ADJECTIVES) if rng.random() < positive_probability else list(NEGATIVE_ADJECTIVES)
        )
    parts = []
    if rng.random() < 0.15:
        parts.append("not")
    if rng.random() < 0.35:
        parts.append(rng.choice(list(INTENSIFIERS)))
    return " ".join([*parts, adjective])


def _clause(rng: random.Random, positive_probability: float) -> str:
    """One clause after the first: a judgement of another aspect, a verb phrase or a neutral filler."""
    kind = rng.random()
    if kind < 0.4:
        subject = rng.choice(SUBJECTS)
        return f"the {subject} {rng.choice(LINKING_VERBS)} {_modified_adjective(rng, positive_probability)}"
    if kind < 0.6:
        positive = rng.random() < positive_probability
        if rng.random() < 0.2:  # "i did not enjoy it": the negation flips the verb
            verb = _sentiment_word(rng, not positive, {k: v for k, v in SENTIMENT_WEIGHTS.items() if k in _BASE_VERBS})
            return f"i did not {verb} it"
        if rng.random() < 0.25:
            return "i would recommend it" if positive else "i would not recommend it"
        verb = _sentiment_word(rng, positive, {k: v for k, v in SENTIMENT_WEIGHTS.items() if k in _PAST_VERBS})
        return f"i {verb} it"
    if kind < 0.75:
        return f"it was a {_modified_adjective(rng, positive_probability)} {rng.choice(NOUNS_FOR_ATTRIBUTES)}"
    return rng.choice(FILLERS)


_BASE_VERBS = frozenset({"like", "enjoy", "love", "dislike", "hate"})
_PAST_VERBS = frozenset({"liked", "enjoyed", "loved", "disliked", "hated"})
_CONNECTORS = [" and ", " but ", ", ", ". ", ". "]


def make_review(rng: random.Random, prompt: str) -> str:
    """
    The continuation of one review after its opening `prompt`, starting with a space and ending with a period.

    The review draws a polarity (the probability that each sentiment slot is positive: 0.1, 0.3, 0.5, 0.7 or 0.9),
    completes the opening with an adjective phrase, then adds one to three clauses.

    Args:
        rng (`random.Random`):
            The generator to draw from.
        prompt (`str`):
            The opening (it only matters through the caller: every opening ends with a linking verb).

    Returns:
        `str`: The completion, e.g. `" very good but the ending felt slow."`.
    """
    del prompt  # every opening ends with a linking verb, so every continuation fits every opening
    positive_probability = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])
    text = _modified_adjective(rng, positive_probability)
    for _ in range(rng.randint(1, 3)):
        text += rng.choice(_CONNECTORS) + _clause(rng, positive_probability)
    return " " + text + "."


def make_sft_corpus(prompts: list[str], num_reviews: int, seed: int = 0) -> list[tuple[str, str]]:
    """
    `(prompt, completion)` reviews for the SFT stage, drawn with a private seeded generator.

    Args:
        prompts (`list[str]`):
            The openings to draw from (the train prompts: held-out openings are never seen).
        num_reviews (`int`):
            Number of reviews.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the generator.

    Returns:
        `list[tuple[str, str]]`: The reviews, completions starting with a space.
    """
    rng = random.Random(seed)
    reviews = []
    for _ in range(num_reviews):
        prompt = rng.choice(prompts)
        reviews.append((prompt, make_review(rng, prompt)))
    return reviews


def tokenizer_corpus() -> list[str]:
    """Lines to train the experiment's BPE tokenizer on: a fixed sample of reviews covering every word."""
    train, held_out = make_prompts()
    lines = [prompt + completion for prompt, completion in make_sft_corpus(train + held_out, 4000, seed=12345)]
    # Every word of the lexicon and grammar at least once, so that each can become a token
    vocabulary = [
        *SENTIMENT_WEIGHTS,
        *NEUTRAL_ADJECTIVES,
        *INTENSIFIERS,
        *NEGATIONS,
        *CLAUSE_BOUNDARY_WORDS,
        *SUBJECTS,
        *LEAD_INS,
        *FILLERS,
        *NOUNS_FOR_ATTRIBUTES,
    ]
    lines += [" " + word for word in vocabulary if word]
    return lines
