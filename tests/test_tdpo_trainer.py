"""TDPOTrainer: where it differs from DPO, the per-token KL of a real model against a naive full-logits computation,
its own metric, and its own configuration errors. What every token-level trainer does (DPO equivalence at α = 0 and
at initialisation, trailing padding, logged metrics, training runs, save/reload, shared configuration errors) is in
test_trainer_contract.py. Invariant numbers refer to docs/algorithms.md §6."""

import pytest
import torch
import torch.nn.functional as F
from testing_utils import (
    EQUIVALENCE_RTOL,
    FLOAT64_MODEL,
    assert_relatively_close,
    collated_batch,
    last_metrics,
    loss_and_grads,
    model_parameters,
    perturb,
    relative_gap,
)

from trl_tokenpref import TDPOConfig, TDPOTrainer
from trl_tokenpref.token_batch import TokenBatch


class TestEquivalenceWithDPO:
    """Where TDPO stops being DPO. The settings where it is DPO (α = 0; any variant at initialisation) are tested
    against DPOTrainer in test_trainer_contract.py."""

    def test_tdpo1_differs_from_dpo_away_from_init(self, make_trainer, tmp_path):
        """The KL term is live once the policy moved: TDPO1 is not DPO there, and TDPO1 = TDPO2(α=1) in value but
        not in gradient (invariant 7)."""
        trainers = {
            name: make_trainer(
                TDPOTrainer,
                tmp_path / name,
                model_init_kwargs=FLOAT64_MODEL,
                **config,
            )
            for name, config in {
                "dpo_like": dict(variant="tdpo2", alpha=0.0),
                "tdpo1": dict(variant="tdpo1"),
                "tdpo2_alpha1": dict(variant="tdpo2", alpha=1.0),
            }.items()
        }
        for trainer in trainers.values():
            perturb(trainer.model)
        batch = collated_batch(trainers["tdpo1"])
        results = {name: loss_and_grads(trainer, batch) for name, trainer in trainers.items()}
        assert relative_gap(results["tdpo1"][0], results["dpo_like"][0]) > 1e3 * EQUIVALENCE_RTOL
        assert_relatively_close(results["tdpo1"][0], results["tdpo2_alpha1"][0], EQUIVALENCE_RTOL, "loss")
        grad_gap = max(
            relative_gap(results["tdpo1"][1][name], grad) for name, grad in results["tdpo2_alpha1"][1].items()
        )
        assert grad_gap > 1e3 * EQUIVALENCE_RTOL


class TestTokenStatistics:
    def test_forward_kl_and_logratios_match_full_logits(self, make_trainer, tmp_path):
        """The chunked statistics of the trainer equal a naive float64 computation from the models' own full logits,
        with the same shift and mask (invariant 5 on a real model, and the alignment of hidden states with labels).
        The fused pass rounds its statistics to float32: κ_t = E_ref[z_r − z] − lse_ref + lse and ρ_t = (z_y − lse) −
        (z_ref,y − lse_ref) are differences of terms as large as the logsumexps, so each is bounded by
        `EQUIVALENCE_RTOL` times the magnitude of its terms, token by token."""
        trainer = make_trainer(TDPOTrainer, tmp_path, model_init_kwargs=FLOAT64_MODEL)
        perturb(trainer.model)
        batch = collated_batch(trainer)
        mask = batch["completion_mask"][:, 1:].bool()
        ref_hidden_states = trainer._reference_hidden_states(batch)
        stats = trainer._policy_forward(trainer.model, batch, ref_hidden_states=ref_hidden_states).stats

        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["input_ids"][:, 1:].unsqueeze(-1)
        policy_logits = trainer.model(**model_inputs).logits[:, :-1]
        with torch.no_grad():
            ref_logits = trainer.ref_model(**model_inputs).logits[:, :-1]
        assert policy_logits.dtype == torch.float64
        policy_log_probs, ref_log_probs = F.log_softmax(policy_logits, dim=-1), F.log_softmax(ref_logits, dim=-1)
        naive_kl = (ref_log_probs.exp() * (ref_log_probs - policy_log_probs)).sum(-1)
        naive_logratio = (policy_log_probs - ref_log_probs).gather(-1, labels).squeeze(-1)

        lse_magnitude = (policy_logits.logsumexp(-1).abs() + ref_logits.logsumexp(-1).abs()).detach()
        label_log_probs = torch.cat([policy_log_probs.gather(-1, labels), ref_log_probs.gather(-1, labels)], dim=-1)
        label_magnitude = label_log_probs.abs().sum(-1).detach()
        # The statistics are flat, one per labelled token in row order: the padded grid's masked positions, in order
        kl_error = (stats.forward_kl.double() - naive_kl[mask]).abs().detach()
        logratio_error = ((stats.log_probs - stats.ref_log_probs).double() - naive_logratio[mask]).abs().detach()
        assert (kl_error <= EQUIVALENCE_RTOL * lse_magnitude[mask]).all(), (kl_error / lse_magnitude[mask]).max()
        assert (logratio_error <= EQUIVALENCE_RTOL * label_magnitude[mask]).all()
        assert stats.forward_kl.shape == (int(mask.sum()),)
        assert (stats.forward_kl > 0).all()
        # Same gradient w.r.t. the parameters for a loss on the summed KL (the LM head's included)
        chosen_weight = torch.linspace(0.5, 1.5, mask.size(0), dtype=torch.float64)
        chunked = (TokenBatch.from_inputs(batch).sequence_sums(stats.forward_kl) * chosen_weight).sum()
        naive = (torch.where(mask, naive_kl, 0.0).sum(1) * chosen_weight).sum()
        params = dict(model_parameters(trainer, trainable_only=True))
        chunked_grads = torch.autograd.grad(chunked, list(params.values()))
        naive_grads = torch.autograd.grad(naive, list(params.values()))
        for name, chunked_grad, naive_grad in zip(params, chunked_grads, naive_grads):
            assert_relatively_close(chunked_grad, naive_grad, EQUIVALENCE_RTOL, name)

    @pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
    def test_tdpo_rewards_are_the_papers(self, variant, make_trainer, tmp_path):
        """`tdpo_rewards/chosen` is the paper's β(S^ρ_w + S^κ_w) (invariant 10), and likewise for the rejected side.
        Which metrics every trainer logs, and that each margin is chosen − rejected: test_trainer_contract.py; the
        values of DPO's metrics: test_dpo_metrics.py."""
        trainer = make_trainer(TDPOTrainer, tmp_path, variant=variant, beta=0.3)
        perturb(trainer.model)
        trainer.model.train()
        batch = collated_batch(trainer)
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        metrics = last_metrics(trainer)
        for side in ("chosen", "rejected"):
            assert metrics[f"tdpo_rewards/{side}"] == pytest.approx(
                metrics[f"rewards/{side}"] + 0.3 * metrics[f"kl/{side}"], abs=1e-5
            )


class TestConfigErrors:
    def test_precompute_ref_log_probs_takes_the_reference_cache(self, tmp_path):
        # Accepted: the reference cache (tests/test_reference_cache.py checks what it computes)
        args = TDPOConfig(output_dir=str(tmp_path), use_cpu=True, precompute_ref_log_probs=True, ref_top_k=7)
        assert args._needs_reference_distribution and args.ref_top_k == 7

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(alpha=-0.1), "`alpha` must be a finite number >= 0"),
            (dict(variant="tdpo3"), "`variant` must be one of"),
        ],
    )
    def test_invalid_values(self, kwargs, message, tmp_path):
        with pytest.raises(ValueError, match=message):
            TDPOConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)
