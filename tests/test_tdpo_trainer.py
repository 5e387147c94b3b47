"""TDPOTrainer: equivalence with TRL's DPOTrainer where the maths says so, the per-token KL of a real model against a
naive full-logits computation, training runs (full, explicit reference, LoRA, conversational, defaults), save/reload,
metrics, and configuration errors. Invariant numbers refer to ALGORITHMS.md §6."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from trl_tokenpref import TDPOConfig, TDPOTrainer
from trl_tokenpref.losses import sequence_sum


def fast_args(output_dir, config_class=TDPOConfig, **overrides):
    """Settings for tiny CPU runs: fp32, no gradient checkpointing, a high constant learning rate (the gradients of
    a tiny model are small and TRL's default 1e-6 would not move it)."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=12,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def collated_batch(trainer, num_pairs=6):
    examples = [trainer.train_dataset[i] for i in range(num_pairs)]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads


def perturb(model, seed=1, scale=0.05):
    """Move the policy away from the reference, so that the per-token KL and its gradient are not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def build(trainer_class, config_class, tiny_model_path, tiny_tokenizer, dataset, tmp_path, **config):
    args = fast_args(tmp_path / trainer_class.__name__, config_class, **config)
    return trainer_class(model=tiny_model_path, args=args, train_dataset=dataset, processing_class=tiny_tokenizer)


@pytest.fixture(scope="module")
def train_subset(default_dataset):
    return default_dataset["train"].select(range(32))


class TestEquivalenceWithDPO:
    @pytest.mark.parametrize(
        "variant, alpha, perturbed",
        [
            ("tdpo2", 0.0, True),  # invariant 4: α = 0 is DPO, also away from initialisation
            ("tdpo2", 0.0, False),
            ("tdpo2", 0.5, False),  # invariant 8: at initialisation κ = 0 and ∇κ = 0, so every variant is DPO
            ("tdpo1", 0.5, False),
        ],
    )
    def test_loss_and_gradient_equal_trl_dpo(
        self, variant, alpha, perturbed, tiny_model_path, tiny_tokenizer, train_subset, tmp_path
    ):
        dpo = build(DPOTrainer, DPOConfig, tiny_model_path, tiny_tokenizer, train_subset, tmp_path)
        tdpo = build(
            TDPOTrainer,
            TDPOConfig,
            tiny_model_path,
            tiny_tokenizer,
            train_subset,
            tmp_path,
            variant=variant,
            alpha=alpha,
        )
        if perturbed:
            perturb(dpo.model)
            perturb(tdpo.model)
        batch = collated_batch(dpo)
        dpo_loss, dpo_grads = loss_and_grads(dpo, batch)
        tdpo_loss, tdpo_grads = loss_and_grads(tdpo, batch)

        if not perturbed:
            torch.testing.assert_close(tdpo_loss, torch.tensor(math.log(2)), rtol=0, atol=1e-6)  # invariant 3
        torch.testing.assert_close(tdpo_loss, dpo_loss, rtol=1e-5, atol=1e-6)
        assert dpo_grads.keys() == tdpo_grads.keys()
        for name, grad in dpo_grads.items():
            torch.testing.assert_close(tdpo_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    def test_tdpo1_differs_from_dpo_away_from_init(self, tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
        """The KL term is live once the policy moved: TDPO1 is not DPO there, and TDPO1 = TDPO2(α=1) in value but
        not in gradient (invariant 7)."""
        trainers = {
            name: build(TDPOTrainer, TDPOConfig, tiny_model_path, tiny_tokenizer, train_subset, tmp_path, **config)
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
        assert not torch.allclose(results["tdpo1"][0], results["dpo_like"][0])
        torch.testing.assert_close(results["tdpo1"][0], results["tdpo2_alpha1"][0])
        grad_gap = max(
            (results["tdpo1"][1][name] - grad).abs().max().item() for name, grad in results["tdpo2_alpha1"][1].items()
        )
        assert grad_gap > 1e-6


class TestTokenStatistics:
    def test_forward_kl_and_logratios_match_full_logits(self, tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
        """The chunked statistics of the trainer equal a naive computation from the models' own full logits, with
        the same shift and mask (invariant 5 on a real model, and the alignment of hidden states with labels)."""
        trainer = build(TDPOTrainer, TDPOConfig, tiny_model_path, tiny_tokenizer, train_subset, tmp_path)
        perturb(trainer.model)
        batch = collated_batch(trainer)
        mask = batch["completion_mask"][:, 1:].bool()
        ref_hidden_states = trainer._reference_hidden_states(batch)
        stats = trainer._policy_forward(trainer.model, batch, ref_hidden_states=ref_hidden_states).stats

        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["input_ids"][:, 1:]
        policy_log_probs = F.log_softmax(trainer.model(**model_inputs).logits[:, :-1].float(), dim=-1)
        with torch.no_grad():
            ref_log_probs = F.log_softmax(trainer.ref_model(**model_inputs).logits[:, :-1].float(), dim=-1)
        naive_kl = (ref_log_probs.exp() * (ref_log_probs - policy_log_probs)).sum(-1)
        naive_logratio = (policy_log_probs - ref_log_probs).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

        torch.testing.assert_close(stats.forward_kl[mask], naive_kl[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            (stats.log_probs - stats.ref_log_probs)[mask], naive_logratio[mask], rtol=1e-4, atol=1e-5
        )
        assert (stats.forward_kl[mask] > 0).all()
        assert (stats.forward_kl[~mask] == 0).all()
        # Same gradient w.r.t. the parameters for a loss on the summed KL (the LM head's included)
        chosen_weight = torch.linspace(0.5, 1.5, mask.size(0)).unsqueeze(1)
        chunked = (sequence_sum(stats.forward_kl, mask) * chosen_weight.squeeze(1)).sum()
        naive = (torch.where(mask, naive_kl, 0.0).sum(1) * chosen_weight.squeeze(1)).sum()
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        for chunked_grad, naive_grad in zip(torch.autograd.grad(chunked, params), torch.autograd.grad(naive, params)):
            torch.testing.assert_close(chunked_grad, naive_grad, rtol=1e-4, atol=1e-6)

    def test_trailing_padding_changes_nothing(self, tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
        """Invariant 1: extra padding columns (attention 0, completion 0) leave the loss unchanged."""
        trainer = build(TDPOTrainer, TDPOConfig, tiny_model_path, tiny_tokenizer, train_subset, tmp_path)
        perturb(trainer.model)
        batch = collated_batch(trainer)
        padded = {
            "input_ids": F.pad(batch["input_ids"], (0, 5), value=tiny_tokenizer.pad_token_id),
            "attention_mask": F.pad(batch["attention_mask"], (0, 5), value=0),
            "completion_mask": F.pad(batch["completion_mask"], (0, 5), value=0),
        }
        with torch.no_grad():
            torch.testing.assert_close(
                trainer.compute_loss(trainer.model, padded), trainer.compute_loss(trainer.model, batch)
            )

    def test_logged_metrics(self, tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
        """`rewards/*` keep DPO's meaning β·Σρ; `tdpo_rewards/chosen` is the paper's β(S^ρ_w + S^κ_w) (invariant 10);
        `kl/margin` = `kl/chosen` − `kl/rejected`."""
        trainer = build(TDPOTrainer, TDPOConfig, tiny_model_path, tiny_tokenizer, train_subset, tmp_path, beta=0.3)
        perturb(trainer.model)
        trainer.model.train()
        batch = collated_batch(trainer)
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        dpo_keys = {
            "entropy",
            "num_tokens",
            "logits/chosen",
            "logits/rejected",
            "mean_token_accuracy",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        }
        assert dpo_keys | {"kl/chosen", "kl/rejected", "kl/margin"} <= metrics.keys()
        assert metrics["kl/chosen"] > 0 and metrics["kl/rejected"] > 0
        assert metrics["kl/margin"] == pytest.approx(metrics["kl/chosen"] - metrics["kl/rejected"], abs=1e-6)
        assert metrics["tdpo_rewards/chosen"] == pytest.approx(
            metrics["rewards/chosen"] + 0.3 * metrics["kl/chosen"], abs=1e-5
        )
        assert metrics["rewards/margins"] == pytest.approx(
            metrics["rewards/chosen"] - metrics["rewards/rejected"], abs=1e-6
        )


def changed_parameters(before, model):
    return {name for name, param in model.named_parameters() if not torch.equal(before[name], param.detach())}


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
        before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
        assert sum(losses[-5:]) / 5 < 0.5
        assert changed_parameters(before, trainer.model) == set(before)  # every trainable parameter moved
        # The reference is untouched
        for name, param in trainer.ref_model.named_parameters():
            torch.testing.assert_close(param, before[name])
        assert {"kl/chosen", "kl/rejected", "kl/margin"} <= trainer.state.log_history[-2].keys()

        metrics = trainer.evaluate()
        assert {"eval_loss", "eval_kl/chosen", "eval_kl/rejected", "eval_rewards/accuracies"} <= metrics.keys()

        trainer.save_model(str(tmp_path / "saved"))
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
        for name, param in reloaded.named_parameters():
            torch.testing.assert_close(param, trainer.model.get_parameter(name).detach())

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
        reference_before = {name: param.detach().clone() for name, param in ref_model.named_parameters()}
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        assert sum(losses[-4:]) / 4 < losses[0]
        assert not changed_parameters(reference_before, ref_model)

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
        before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        assert sum(losses[-5:]) / 5 < losses[0]
        changed = changed_parameters(before, trainer.model)
        trainable = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
        assert changed == trainable and all("lora_" in name for name in trainable)
        assert any(log.get("kl/rejected", 0) > 0 for log in trainer.state.log_history)

        trainer.save_model(str(tmp_path / "adapter"))
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        for name, param in reloaded.named_parameters():
            if "lora_" in name:
                torch.testing.assert_close(param, trainer.model.get_parameter(name).detach())

    def test_conversational_dataset(self, tiny_model_path, tiny_tokenizer, conversational_dataset, tmp_path):
        args = fast_args(tmp_path / "run", max_steps=8)
        trainer = TDPOTrainer(
            model=tiny_model_path,
            args=args,
            train_dataset=conversational_dataset["train"],
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
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
    def test_precompute_ref_log_probs_refused(self, tmp_path):
        with pytest.raises(ValueError, match="cannot use `precompute_ref_log_probs=True`.*whole next-token"):
            TDPOConfig(output_dir=str(tmp_path), use_cpu=True, precompute_ref_log_probs=True)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(alpha=-0.1), "`alpha` must be non-negative"),
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
