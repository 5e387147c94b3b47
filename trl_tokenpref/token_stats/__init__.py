"""Per-token statistics of a policy (and its reference) from hidden states and the LM head, in chunks.

Every token-level method needs, per completion token t with label y_t:

* the policy log-probability `log πθ(y_t|s_t)` (and, for DPO's metrics, the entropy, the mean logit and whether the
  label is the argmax),
* the reference log-probability `log π_ref(y_t|s_t)`,
* for TDPO and TBPO-A, the exact forward KL over the whole vocabulary,
  `κ_t = KL(π_ref(·|s_t) ‖ πθ(·|s_t)) = Σ_v p_ref(v) [log p_ref(v) − log pθ(v)]` (TDPO paper Def. 4.3).

A naive implementation materialises `[tokens, vocab]` logits for both models (the official TDPO code does, in fp32).
`_FusedTokenStats` instead projects one tile (a chunk of tokens x a slice of the vocabulary; on GPU the whole
vocabulary) at a time through both LM heads, folds it into per-token running statistics (online softmax), and keeps
nothing of size `vocab` between tiles: every statistic comes from that one projection of each tile. Only the two
logsumexps are saved; the backward projects each tile again and applies the closed-form gradient

    ∂ log pθ(y)/∂z = onehot(y) − pθ        ∂ κ/∂z = pθ − p_ref          (z: the policy logits)

so the `[tokens, vocab]` logits never exist in forward or backward. Only the tokens that carry a label (the completion
tokens) are projected: prompt and padding positions cost nothing.

Log-probabilities are logits minus their logsumexp, never `softmax().log()`: the official TDPO code returns NaN when
a reference probability underflows to 0 (`0 * log 0`); here such a term is `0 * finite = 0`.

The package, one job per module:

* `lm_head.py`: [`LMHead`] and [`gathered_lm_head`], the one way to read an LM head's parameters (ZeRO-3, FSDP2);
* `fused.py`: the chunked kernel (`_FusedTokenStats`) and its tile sizes;
* `stats.py`: the entry points [`compute_token_stats`] and [`reference_top_k`] (the reference cache's precompute);
* `model_forward.py`: [`add_token_stats_head`], which computes the statistics inside the model's own forward;
* `naive.py`: the same statistics from full logits, for tests, benchmarks and evaluation.

Cost (docs/benchmarks.md): the LM-head work of a TDPO step (2 projections forward, 2 recomputed and 2 gradient GEMMs
backward) measured within a few percent of DPOTrainer's (1 + 1 forward, 1 + 2 backward, but about three times as many
elementwise passes per tile in TRL's CPU fallback), and every tile buffer is reused across tiles.
"""

from .fused import CPU_TILE_ELEMENTS, CPU_VOCAB_TILE, GPU_TILE_ELEMENTS, default_token_chunk_size
from .lm_head import LMHead, gathered_lm_head, lm_head_of
from .model_forward import TokenStatsOutput, add_token_stats_head
from .naive import FullVocabularyStats, full_vocabulary_stats, naive_token_stats
from .stats import ReferenceCache, TokenStats, compute_token_stats, reference_top_k


__all__ = [
    "CPU_TILE_ELEMENTS",
    "CPU_VOCAB_TILE",
    "GPU_TILE_ELEMENTS",
    "FullVocabularyStats",
    "LMHead",
    "ReferenceCache",
    "TokenStats",
    "TokenStatsOutput",
    "add_token_stats_head",
    "compute_token_stats",
    "default_token_chunk_size",
    "full_vocabulary_stats",
    "gathered_lm_head",
    "lm_head_of",
    "naive_token_stats",
    "reference_top_k",
]
