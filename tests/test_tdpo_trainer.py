"""TDPOTrainer: equivalence with TRL's DPOTrainer where the maths says so, the per-token KL of a real model against a
naive full-logits computation, training runs (full, explicit reference, LoRA, conversational, defaults), save/reload,
metrics, and configuration errors. Invariant numbers refer to docs/algorithms.md §6."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from testing_utils import (
    EQUIVALENCE_RTOL,
    FLOAT64_MODEL,
    STATS_ROUNDOFF,
    assert_relatively_close,
    assert_same_loss_and_grads,
    assert_saved_adapter_reloads,
    assert_saved_model_reloads,
    assert_trailing_padding_changes_nothing,
    changed_parameters,
    collated_batch,
    fast_args,
    last_metrics,
    logged_losses,
    loss_and_grads,
    model_parameters,
    perturb,
    relative_gap,
    snapshot,
)
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from trl_tokenpref import TDPOConfig, TDPOTrainer
from trl_tokenpref.token_batch import TokenBatch


class TestEquivalenceWithDPO:
    """In float64 (see `testing_utils.EQUIVALENCE_RTOL`): DPOTrainer and TDPOTrainer compute the same maths with
    different kernels, so their results differ by float32 roundings of the per-token statistics only."""

    @pytest.mark.parametrize(
        "variant, alpha, perturbed",
        [
            ("tdpo2", 0.0, True),  # invariant 4: α = 0 is DPO, also away from initialisation
            ("tdpo2", 0.0, False),
            ("tdpo2", 0.5, False),  # invariant 8: at initialisation κ = 0 and ∇κ = 0, so every variant is DPO
            ("tdpo1", 0.5, False),
        ],
    )
    def test_loss_and_gradient_equal_trl_dpo(self, variant, alpha, perturbed, make_trainer, tmp_path):
        common = dict(model_init_kwargs=FLOAT64_MODEL)
        dpo = make_trainer(DPOTrainer, tmp_path / "dpo", **common)
        tdpo = make_trainer(
            TDPOTrainer,
            tmp_path,
            variant=variant,
            alpha=alpha,
            **common,
        )
        assert tdpo.model.dtype == dpo.model.dtype == tdpo.ref_model.dtype == torch.float64
        if perturbed:
            perturb(dpo.model)
            perturb(tdpo.model)
        batch = collated_batch(dpo)
        expected = loss_and_grads(dpo, batch)
        result = loss_and_grads(tdpo, batch)

        if not perturbed:
            # Invariant 3: ρ = 0 exactly (policy and reference are the same weights through the same pass), so the
            # loss is log 2 up to the rounding of −log σ(0) to float32
            assert result[0].item() == pytest.approx(math.log(2), rel=STATS_ROUNDOFF, abs=0)
        assert_same_loss_and_grads(result, expected)

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

    def test_trailing_padding_changes_nothing(self, tiny_tokenizer, make_trainer, tmp_path):
        """Invariant 1: extra padding columns (attention 0, completion 0) leave the loss unchanged."""
        trainer = make_trainer(TDPOTrainer, tmp_path, model_init_kwargs=FLOAT64_MODEL)
        perturb(trainer.model)
        assert_trailing_padding_changes_nothing(trainer, tiny_tokenizer.pad_token_id)

    def test_logged_metrics(self, dpo_metric_keys, make_trainer, tmp_path):
        """Every metric DPOTrainer logs (their values: test_dpo_metrics.py), and TDPO's own: `tdpo_rewards/chosen` is
        the paper's β(S^ρ_w + S^κ_w) (invariant 10); `kl/margin` = `kl/chosen` − `kl/rejected`."""
        trainer = make_trainer(TDPOTrainer, tmp_path, beta=0.3)
        perturb(trainer.model)
        trainer.model.train()
        batch = collated_batch(trainer)
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        metrics = last_metrics(trainer)
        assert dpo_metric_keys["train"] | {"kl/chosen", "kl/rejected", "kl/margin"} <= metrics.keys()
        assert metrics["kl/chosen"] > 0 and metrics["kl/rejected"] > 0
        assert metrics["kl/margin"] == pytest.approx(metrics["kl/chosen"] - metrics["kl/rejected"], abs=1e-6)
        assert metrics["tdpo_rewards/chosen"] == pytest.approx(
            metrics["rewards/chosen"] + 0.3 * metrics["kl/chosen"], abs=1e-5
        )
        assert metrics["rewards/margins"] == pytest.approx(
            metrics["rewards/chosen"] - metrics["rewards/rejected"], abs=1e-6
        )


class TestTraining:
    def test_full_fine_tuning_reloaded_reference(self, tiny_model_path, tiny_tokenizer, default_dataset, tmp_path):
        args = fast_args(tmp_path / "run", max_steps=15)
        trainer = TDPOTrainer(
            model=tiny_model_path,
            args=args,
            train_dataset=default_dataset["train"],
            eval_dataset=default_dataset["test"],
            processing_class=tiny_tokenizer,
        )
        before = snapshot(model_parameters(trainer))
        trainer.train()
        losses = logged_losses(trainer)
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
        assert sum(losses[-5:]) / 5 < 0.5
        assert changed_parameters(before, model_parameters(trainer)) == set(before)  # every trainable parameter moved
        # The reference is untouched
        for name, param in trainer.ref_model.named_parameters():
            torch.testing.assert_close(param, before[name])
        assert {"kl/chosen", "kl/rejected", "kl/margin"} <= trainer.state.log_history[-2].keys()

        metrics = trainer.evaluate()
        assert {"eval_loss", "eval_kl/chosen", "eval_kl/rejected", "eval_rewards/accuracies"} <= metrics.keys()

        assert_saved_model_reloads(trainer, tmp_path / "saved")

    def test_explicit_reference_model_tdpo1(self, tiny_model_path, tiny_tokenizer, default_dataset, tmp_path):
        ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        args = fast_args(tmp_path / "run", variant="tdpo1")
        trainer = TDPOTrainer(
            model=tiny_model_path,
            ref_model=ref_model,
            args=args,
            train_dataset=default_dataset["train"],
            processing_class=tiny_tokenizer,
        )
        assert trainer.ref_model is ref_model
        reference_before = snapshot(dict(ref_model.named_parameters()))
        trainer.train()
        losses = logged_losses(trainer)
        assert sum(losses[-4:]) / 4 < losses[0]
        assert not changed_parameters(reference_before, dict(ref_model.named_parameters()))

    def test_lora(self, tiny_model_path, tiny_tokenizer, default_dataset, tmp_path):
        args = fast_args(tmp_path / "run", learning_rate=2e-2, max_steps=15)
        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = TDPOTrainer(
            model=tiny_model_path,
            args=args,
            train_dataset=default_dataset["train"],
            processing_class=tiny_tokenizer,
            peft_config=peft_config,
        )
        assert trainer.ref_model is None  # the reference is the model with its adapter disabled
        before = snapshot(model_parameters(trainer))
        trainer.train()
        losses = logged_losses(trainer)
        assert sum(losses[-5:]) / 5 < losses[0]
        changed = changed_parameters(before, model_parameters(trainer))
        trainable = set(model_parameters(trainer, trainable_only=True))
        assert changed == trainable and all("lora_" in name for name in trainable)
        assert any(log.get("kl/rejected", 0) > 0 for log in trainer.state.log_history)

        assert_saved_adapter_reloads(trainer, tiny_model_path, tmp_path / "adapter")

    def test_conversational_dataset(self, tiny_model_path, tiny_tokenizer, conversational_dataset, tmp_path):
        args = fast_args(tmp_path / "run", max_steps=8)
        trainer = TDPOTrainer(
            model=tiny_model_path,
            args=args,
            train_dataset=conversational_dataset["train"],
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        losses = logged_losses(trainer)
        assert losses[-1] < losses[0]

    def test_config_defaults_plus_output_dir(self, tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
        """TDPOConfig's defaults (TRL's: bf16 autocast, gradient checkpointing, lr 1e-6, 3 epochs) train as is.
        `use_cpu=True` is what DPOConfig itself needs on a machine without a GPU, since bf16 defaults to True."""
        args = TDPOConfig(output_dir=str(tmp_path / "defaults"), use_cpu=True)
        trainer = TDPOTrainer(
            model=tiny_model_path,
            args=args,
            train_dataset=train_subset.select(range(16)),
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] > 0

    def test_model_instance_and_default_args(
        self, tiny_model_path, tiny_tokenizer, train_subset, tmp_path, monkeypatch
    ):
        """`args=None` builds `TDPOConfig("<model>-TDPO")`, as DPOTrainer does."""
        monkeypatch.chdir(tmp_path)
        # TRL's default bf16=True is refused by transformers on a machine without a bf16 GPU (DPOTrainer alike)
        monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        trainer = TDPOTrainer(model=model, train_dataset=train_subset, processing_class=tiny_tokenizer)
        assert isinstance(trainer.args, TDPOConfig)
        assert trainer.args.output_dir.endswith("model-TDPO")


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
            (dict(beta=0.0), "`beta` must be positive"),
            (dict(loss_type=["ipo"]), "defines its own loss"),
            (dict(f_divergence_type="forward_kl"), "does not implement"),
            (dict(token_chunk_size=0), "`token_chunk_size` must be a positive integer"),
        ],
    )
    def test_invalid_values(self, kwargs, message, tmp_path):
        with pytest.raises(ValueError, match=message):
            TDPOConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)

    def test_dpo_config_is_refused_with_a_fix(self, tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
        with pytest.raises(TypeError, match="must be a `TDPOConfig`"):
            TDPOTrainer(
                model=tiny_model_path,
                args=DPOConfig(output_dir=str(tmp_path), use_cpu=True),
                train_dataset=train_subset,
                processing_class=tiny_tokenizer,
            )
