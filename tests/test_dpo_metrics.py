"""The DPO metrics of the token-level trainers against `trl.DPOTrainer`'s, on the same batch and the same model.

Every trainer logs what DPOTrainer logs, with DPOTrainer's meaning, next to its own metrics: the implicit rewards
`rewards/*` = β·Σ_t ρ_t (not a method's own reward), `logps/*`, `logits/*`, `entropy`, `mean_token_accuracy` and
`num_tokens`. The key set is read off DPOTrainer by running it (nothing here names DPOTrainer's keys), and each value
is compared with DPOTrainer's on one float64 model and batch, in training and in evaluation mode.

Tolerances: both trainers compute these from float32 per-token statistics (`testing_utils.EQUIVALENCE_RTOL`), so a
value agrees to that many roundoffs of the magnitudes it is made of: |logps| for a sum of log-probs (all ≤ 0, so no
cancellation), β·(|logps| + |reference logps|) for a reward (a difference), the entropy itself, and for a mean logit
(a mean over the vocabulary, which cancels) the largest |logit| of the batch. Counts (`num_tokens`, accuracies) are
equal exactly.
"""

import pytest
import torch
from testing_utils import (
    EQUIVALENCE_RTOL,
    FLOAT64_MODEL,
    TRAINER_CASES,
    collated_batch,
    last_metrics,
    perturb,
)
from trl import DPOTrainer


BETA = 0.3
EXACT = {"num_tokens", "mean_token_accuracy", "rewards/accuracies"}


def favour_the_most_frequent_label(model, batch) -> None:
    """Make the batch's most frequent completion token the policy's argmax at most positions (its LM-head row gains
    the mean hidden state), so that `mean_token_accuracy` is neither 0 nor 1 (a random tiny model's is 0)."""
    mask = batch["completion_mask"][:, 1:].bool()
    token = batch["input_ids"][:, 1:][mask].bincount().argmax()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        direction = model.model(**inputs).last_hidden_state[:, :-1][mask].mean(dim=0)
        model.get_output_embeddings().weight[token] += 10 * direction / direction.norm() ** 2


def metric_scales(metrics: dict[str, float], max_abs_logit: float) -> dict[str, float]:
    """The magnitude of the terms each of DPOTrainer's metrics is computed from (see the module docstring)."""
    scales = {"entropy": abs(metrics["entropy"])}
    for side in ("chosen", "rejected"):
        logps = metrics[f"logps/{side}"]
        ref_logps = logps - metrics[f"rewards/{side}"] / BETA  # rewards = β (logps − ref_logps)
        scales[f"logps/{side}"] = abs(logps)
        scales[f"rewards/{side}"] = BETA * (abs(logps) + abs(ref_logps))
        scales[f"logits/{side}"] = max_abs_logit
    scales["rewards/margins"] = scales["rewards/chosen"] + scales["rewards/rejected"]
    return scales


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_dpo_metrics_equal_dpo_trainers(case, mode, dpo_metric_keys, make_trainer, make_case_trainer, tmp_path):
    common = dict(model_init_kwargs=FLOAT64_MODEL, beta=BETA)
    dpo = make_trainer(DPOTrainer, tmp_path / "dpo", **common)
    trainer = make_case_trainer(case, tmp_path / case, **common)
    batch = collated_batch(dpo, num_pairs=8)
    for each in (dpo, trainer):
        assert each.model.dtype == torch.float64
        perturb(each.model)  # away from the reference: rewards, margins and accuracies are not all 0
        favour_the_most_frequent_label(each.model, batch)
        each.model.train(mode == "train")
        with torch.no_grad():
            each.compute_loss(each.model, batch)
    expected, metrics = last_metrics(dpo, mode), last_metrics(trainer, mode)

    assert set(expected) == dpo_metric_keys[mode]  # what DPOTrainer logs does not depend on the model's dtype
    assert set(expected) <= set(metrics), f"missing: {sorted(set(expected) - set(metrics))}"
    assert 0 < expected["rewards/accuracies"] < 1 and 0 < expected["mean_token_accuracy"] < 1
    assert expected["num_tokens"] == (batch["attention_mask"].sum().item() if mode == "train" else 0)
    with torch.no_grad():
        logits = dpo.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    max_abs_logit = logits[batch["completion_mask"][:, 1:].bool()].abs().max().item()
    scales = metric_scales(expected, max_abs_logit)
    assert set(scales) | EXACT == set(expected), "a DPO metric without a tolerance: add its scale"
    for key, value in expected.items():
        if key in EXACT:
            assert metrics[key] == value, key
        else:
            gap = abs(metrics[key] - value)
            assert gap <= EQUIVALENCE_RTOL * scales[key], f"{key}: {metrics[key]} against DPOTrainer's {value}"
