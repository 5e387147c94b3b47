"""The per-token statistics from full `[..., vocab]` logits: the naive computation the fused pass replaces, kept as
the ground truth of tests, the baseline of benchmarks, and the statistics of `evaluation.py` (which scores short
generations, where full logits are affordable)."""

from typing import NamedTuple

import torch

from .fused import _logits
from .lm_head import LMHead, gathered_lm_head
from .stats import TokenStats


class FullVocabularyStats(NamedTuple):
    """Per-position statistics from full `[..., vocab]` log-probabilities (naive, for tests, benchmarks, evaluation)."""

    entropy: torch.Tensor  # H(πθ)
    forward_kl: torch.Tensor  # KL(π_ref ‖ πθ), TDPO's κ
    reverse_kl: torch.Tensor  # KL(πθ ‖ π_ref), the RLHF KL


def full_vocabulary_stats(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> FullVocabularyStats:
    """Entropy and both KLs over the last dimension from full log-probabilities (`log_softmax`, so an underflowed
    probability contributes an exact 0, never `0 · log 0 = nan`)."""
    probs, ref_probs = log_probs.exp(), ref_log_probs.exp()
    return FullVocabularyStats(
        entropy=-(probs * log_probs).sum(-1),
        forward_kl=(ref_probs * (ref_log_probs - log_probs)).sum(-1),
        reverse_kl=(probs * (log_probs - ref_log_probs)).sum(-1),
    )


def naive_token_stats(
    hidden_states: torch.Tensor,
    lm_head: LMHead,
    labels: torch.Tensor,
    ref_hidden_states: torch.Tensor | None = None,
    ref_lm_head: LMHead | None = None,
) -> TokenStats:
    """The same statistics from full `[rows, seq, vocab]` float32 logits, as the official TDPO code computes them
    (but with `log_softmax`). Used as the reference in tests and as the naive baseline in benchmarks."""
    mask = labels != -100
    safe_labels = labels.clamp(min=0).unsqueeze(-1)

    def full_log_probs(hidden, head):
        logits, _ = _logits(hidden, head)
        return logits.log_softmax(dim=-1), logits

    with gathered_lm_head(lm_head, trainable=True) as policy_head:
        log_probs, logits = full_log_probs(hidden_states, policy_head)
    zero = torch.zeros((), device=hidden_states.device)
    stats = {
        "log_probs": torch.where(mask, log_probs.gather(-1, safe_labels).squeeze(-1), zero),
        "entropy": torch.where(mask, full_vocabulary_stats(log_probs, log_probs).entropy, zero).detach(),
        "mean_logits": torch.where(mask, logits.mean(-1), zero).detach(),
        "is_top1": (logits.argmax(-1) == labels) & mask,
    }
    if ref_hidden_states is not None:
        with torch.no_grad(), gathered_lm_head(ref_lm_head or lm_head, trainable=False) as ref_head:
            ref_log_probs, _ = full_log_probs(ref_hidden_states, ref_head)
        stats["ref_log_probs"] = torch.where(mask, ref_log_probs.gather(-1, safe_labels).squeeze(-1), zero)
        stats["forward_kl"] = torch.where(mask, full_vocabulary_stats(log_probs, ref_log_probs).forward_kl, zero)
    return TokenStats(**stats)
