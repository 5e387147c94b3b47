"""TBPOTrainer on a real (tiny) model: the reductions to BPO (label smoothing, the loss at initialisation, single-token
pairs), the per-token loss against a naive full-logits computation (TBPO-A and TBPO-Q, which also pins the alignment
by completion index and of hidden states with labels), the invariants that need a model, its own metrics, the TBPO-Q
head (gradients, optimizer, save/resume) and its own configuration errors. What every token-level trainer does
(sequence-level LR = DPO, trailing padding, logged metrics, training runs of both variants and of BPO, save/reload,
shared configuration errors) is in test_trainer_contract.py; the pure-loss invariants are in test_losses.py.
Invariant numbers refer to docs/algorithms.md §6."""

import copy
import functools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from testing_utils import (
    EQUIVALENCE_RTOL,
    FLOAT64_MODEL,
    STATS_ROUNDOFF,
    assert_relatively_close,
    assert_same_loss_and_grads,
    collated_batch,
    fast_args,
    last_metrics,
    loss_and_grads,
    model_parameters,
    perturb,
    perturb_head,
    with_trailing_padding,
)
from transformers import AutoModelForCausalLM
from trl import DPOTrainer

from trl_tokenpref import TBPOConfig, TBPOTrainer
from trl_tokenpref.losses import bregman_loss
from trl_tokenpref.tbpo import BaselineHead, load_baseline_head
from trl_tokenpref.tbpo.baseline_head import BASELINE_HEAD_NAME, BASELINE_OPTIMIZER_NAME


tbpo_args = functools.partial(fast_args, config_class=TBPOConfig)


@pytest.fixture
def tbpo(make_trainer):
    """`tbpo(output_dir, **config)`: a TBPOTrainer of the tiny model on `train_subset`."""
    return functools.partial(make_trainer, TBPOTrainer)


def swap_rejected_for_chosen(batch):
    """A batch whose rejected rows are copies of its chosen rows."""
    return {key: torch.cat([value.chunk(2)[0]] * 2) for key, value in batch.items()}


# The per-token loss at R = 1 (invariant 3): πθ = π_ref gives ρ = κ = 0, and the TBPO-Q head starts at b ≡ 0
LOSS_AT_INIT = {("lr", 0.0): math.log(2), ("sba", 0.0): 0.25, ("sba", -0.5): 1.0}


def dpo_and_sequence_level_lr(make_trainer, tmp_path, **config):
    """`trl.DPOTrainer` and sequence-level BPO with h = LR (plus `config`) on the same float64 model, moved away from
    the reference."""
    dpo = make_trainer(DPOTrainer, tmp_path / "dpo", model_init_kwargs=FLOAT64_MODEL)
    bpo_config = dict(token_level=False, generator="lr", model_init_kwargs=FLOAT64_MODEL, **config)
    bpo = make_trainer(TBPOTrainer, tmp_path / "bpo", **bpo_config)
    perturb(dpo.model)
    perturb(bpo.model)
    return dpo, bpo


class TestReductions:
    def test_label_smoothing_is_conservative_dpo(self, make_trainer, tmp_path):
        """With ε-label smoothing, sequence-level LR is (1 − ε)·DPO(pair) + ε·DPO(swapped pair), in value and
        gradient (TRL's own sigmoid loss ignores `label_smoothing`, so the flipped term comes from a swapped batch).
        Without smoothing it is DPO (invariants 15 and 24): test_trainer_contract.py."""
        epsilon = 0.1
        dpo, bpo = dpo_and_sequence_level_lr(make_trainer, tmp_path, label_smoothing=epsilon)
        batch = collated_batch(dpo)
        swapped = {key: torch.cat(value.chunk(2)[::-1]) for key, value in batch.items()}
        (dpo_loss, dpo_grads), (flipped_loss, flipped_grads) = loss_and_grads(dpo, batch), loss_and_grads(dpo, swapped)
        expected_loss = (1 - epsilon) * dpo_loss + epsilon * flipped_loss
        expected_grads = {
            name: (1 - epsilon) * grad + epsilon * flipped_grads[name] for name, grad in dpo_grads.items()
        }
        assert_same_loss_and_grads(loss_and_grads(bpo, batch), (expected_loss, expected_grads))

    def test_sequence_level_accepts_precomputed_reference(self, tbpo, tmp_path):
        """With `token_level=False` the summed reference log-probs suffice: precomputing them gives the same loss."""
        common = dict(token_level=False, model_init_kwargs=FLOAT64_MODEL)
        live = tbpo(tmp_path / "live", **common)
        precomputed = tbpo(tmp_path / "pre", precompute_ref_log_probs=True, **common)
        assert precomputed.ref_model is None and "ref_chosen_logps" in precomputed.train_dataset.column_names
        perturb(live.model)
        perturb(precomputed.model)
        assert_same_loss_and_grads(
            loss_and_grads(precomputed, collated_batch(precomputed)), loss_and_grads(live, collated_batch(live))
        )

    @pytest.mark.parametrize("variant", ["tbpo_a", "tbpo_q"])
    @pytest.mark.parametrize("generator, generator_lambda", list(LOSS_AT_INIT))
    def test_loss_at_initialisation_is_l_h_of_one(self, variant, generator, generator_lambda, tbpo, tmp_path):
        """Invariant 3: at πθ = π_ref every aligned token has R_t = 1, so the loss is ℓ_h(1)."""
        trainer = tbpo(tmp_path, variant=variant, generator=generator, generator_lambda=generator_lambda)
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, collated_batch(trainer))
        # ρ = κ = 0 exactly (policy and reference: the same weights through the same pass), so only the float32
        # rounding of ℓ_h(1) remains
        assert loss.item() == pytest.approx(LOSS_AT_INIT[generator, generator_lambda], rel=4 * STATS_ROUNDOFF, abs=0)

    def test_single_token_pairs_a_equals_q_equals_bpo(self, tbpo, tmp_path):
        """Invariant 24: when T = 1 both prefixes are [x], so w_1 = 1 in TBPO-A (equal KLs), TBPO-Q (centring one
        value gives 0) and BPO: the three losses and gradients coincide, away from initialisation too."""
        trainers = {
            name: tbpo(
                tmp_path / name,
                model_init_kwargs=FLOAT64_MODEL,
                **config,
            )
            for name, config in {
                "bpo": dict(token_level=False),
                "tbpo_a": dict(variant="tbpo_a"),
                "tbpo_q": dict(variant="tbpo_q"),
            }.items()
        }
        for trainer in trainers.values():
            perturb(trainer.model)
        perturb_head(trainers["tbpo_q"])
        batch = collated_batch(trainers["bpo"])
        # Keep only the first completion token of each response (the later tokens stay as unscored context)
        completion_mask = batch["completion_mask"]
        first = completion_mask.cumsum(dim=1) == 1
        batch = {**batch, "completion_mask": (completion_mask.bool() & first).long()}
        results = {name: loss_and_grads(trainer, batch) for name, trainer in trainers.items()}
        bpo_loss, bpo_grads = results["bpo"]
        assert bpo_loss > 0.25  # away from initialisation: the policy already prefers one side
        for name in ("tbpo_a", "tbpo_q"):
            loss, grads = results[name]
            policy_grads = {key: grad for key, grad in grads.items() if not key.startswith("baseline_head.")}
            assert_same_loss_and_grads((loss, policy_grads), results["bpo"])
        # TBPO-Q's head sees centred log w = 0 exactly, hence no gradient
        head_grads = [grad for key, grad in results["tbpo_q"][1].items() if key.startswith("baseline_head.")]
        assert head_grads and all((grad == 0).all() for grad in head_grads)


def naive_tbpo_loss(trainer, batch, generator):
    """TBPO from the models' full logits, pair by pair with Python indexing (no compaction helper): align the k-th
    completion token of each response, T = min(n_w, n_l), ρ and κ from log_softmax, and the TBPO-Q head applied to
    the final hidden state of the prefix before each token (the head is float32 whatever the model's dtype, as in the
    trainer). Returns the batch loss, in float64 for a float64 model."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    policy = trainer.model
    log_probs = F.log_softmax(policy(**inputs).logits[:, :-1], dim=-1)
    with torch.no_grad():
        ref_log_probs = F.log_softmax(trainer.ref_model(**inputs).logits[:, :-1], dim=-1)
    rho = (log_probs - ref_log_probs).gather(-1, labels).squeeze(-1)
    kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)
    if trainer.args.variant == "tbpo_q":
        with torch.no_grad():
            hidden = policy.model(**inputs).last_hidden_state[:, :-1]  # state s_t before the label at column t
        baselines = trainer.baseline_head(hidden.float())

    beta, num_pairs = trainer.args.beta, mask.size(0) // 2
    losses = []
    for i in range(num_pairs):
        chosen_idx, rejected_idx = mask[i].nonzero().squeeze(1), mask[num_pairs + i].nonzero().squeeze(1)
        length = min(len(chosen_idx), len(rejected_idx))
        chosen_idx, rejected_idx = chosen_idx[:length], rejected_idx[:length]
        if trainer.args.variant == "tbpo_a":
            log_w = kl[num_pairs + i, rejected_idx] - kl[i, chosen_idx]
        else:
            log_w = baselines[num_pairs + i, rejected_idx] - baselines[i, chosen_idx]
            log_w = (log_w - log_w.mean()).clamp(-trainer.args.baseline_clamp, trainer.args.baseline_clamp)
        inner = (rho[i, chosen_idx] - rho[num_pairs + i, rejected_idx]) - log_w  # −log R_t / β
        if generator == "lr":
            per_token = -F.logsigmoid(beta * inner)  # the per-token TDPO1 form (invariant 25)
        else:
            log_ratio = -beta * inner
            per_token = (log_ratio.exp() + log_ratio) / 4  # SBA(λ=0, s=4) = KLIEP/4
        losses.append(per_token.mean())
    return torch.stack(losses).mean()


class TestPerTokenLoss:
    @pytest.mark.parametrize(
        "variant, generator, baseline_hidden_size",
        [("tbpo_a", "lr", 1024), ("tbpo_a", "sba", 1024), ("tbpo_q", "lr", 1024), ("tbpo_q", "sba", 0)],
    )
    def test_matches_naive_full_logits(self, variant, generator, baseline_hidden_size, tbpo, tmp_path):
        """Invariant 25 (TBPO-A with h = LR is the per-token, min-length-averaged TDPO1) and its TBPO-Q counterpart,
        in value and gradient, on pairs of different lengths in both directions: float64 models against a float64
        naive computation (`testing_utils.EQUIVALENCE_RTOL`)."""
        trainer = tbpo(
            tmp_path,
            variant=variant,
            generator=generator,
            baseline_hidden_size=baseline_hidden_size,
            beta=0.5,
            model_init_kwargs=FLOAT64_MODEL,
        )
        perturb(trainer.model)
        perturb_head(trainer)
        batch = collated_batch(trainer, num_pairs=8)
        lengths = batch["completion_mask"].sum(dim=1).chunk(2)
        assert (lengths[0] > lengths[1]).any() and (lengths[0] < lengths[1]).any()

        loss, grads = loss_and_grads(trainer, batch)
        params = model_parameters(trainer, trainable_only=True)
        expected = naive_tbpo_loss(trainer, batch, generator)
        expected_grads = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
        assert_relatively_close(loss, expected, EQUIVALENCE_RTOL, "loss")
        for name, expected_grad in zip(params, expected_grads):
            if expected_grad is None:  # a parameter the loss does not reach
                assert name not in grads or not grads[name].any(), name
            else:
                assert_relatively_close(grads[name], expected_grad, EQUIVALENCE_RTOL, name)

    @pytest.mark.parametrize("variant", ["tbpo_a", "tbpo_q"])
    def test_identical_responses_give_zero_gradient(self, variant, tbpo, tmp_path):
        """Invariant 21: identical chosen and rejected rows give log R_t = 0 at every token and a zero gradient, for
        the policy and for the TBPO-Q head (b is identical on both sides), away from initialisation. Zero up to
        rounding: the two sides' gradients cancel in float32 reductions, so each gradient is compared with the one
        the same trainer gets from the real pairs."""
        trainer = tbpo(
            tmp_path,
            variant=variant,
            generator="sba",
            model_init_kwargs=FLOAT64_MODEL,
        )
        perturb(trainer.model)
        perturb_head(trainer)
        trainer.model.train()
        batch = collated_batch(trainer)
        _, reference_grads = loss_and_grads(trainer, batch)
        loss, grads = loss_and_grads(trainer, swap_rejected_for_chosen(batch))
        assert loss.item() == pytest.approx(0.25, rel=4 * STATS_ROUNDOFF, abs=0)  # ℓ_SBA(0,4)(R=1)
        # ρ_w − ρ_l = 0 exactly (the same rows through the same pass); TBPO-Q's centred b_l − b_w rounds in float64
        assert trainer._metrics["train"]["log_R/mean"][-1] == pytest.approx(0.0, abs=STATS_ROUNDOFF)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            assert grad.norm() <= EQUIVALENCE_RTOL * reference_grads[name].norm(), name

    @pytest.mark.parametrize("variant", ["tbpo_a", "tbpo_q"])
    def test_appending_to_the_longer_response_changes_nothing(self, variant, tiny_tokenizer, tbpo, tmp_path):
        """Invariant 22: only the first T = min(n_w, n_l) positions matter. Appending tokens to the longer completion
        of every pair (chosen or rejected, through the model) leaves loss and gradient unchanged (float64)."""
        trainer = tbpo(tmp_path, variant=variant, model_init_kwargs=FLOAT64_MODEL)
        perturb(trainer.model)
        perturb_head(trainer)
        batch = collated_batch(trainer, num_pairs=8)
        lengths = batch["completion_mask"].sum(dim=1)
        num_pairs, extra = len(lengths) // 2, 4
        longer_rows = [
            i if lengths[i] > lengths[num_pairs + i] else num_pairs + i
            for i in range(num_pairs)
            if lengths[i] != lengths[num_pairs + i]
        ]
        assert len(longer_rows) >= 4
        extended = with_trailing_padding(batch, extra, tiny_tokenizer.pad_token_id)
        generator = torch.Generator().manual_seed(0)
        for row in longer_rows:
            end = int(batch["attention_mask"][row].sum())  # right padding: the completion ends here
            extended["input_ids"][row, end : end + extra] = torch.randint(20, 400, (extra,), generator=generator)
            extended["attention_mask"][row, end : end + extra] = 1
            extended["completion_mask"][row, end : end + extra] = 1

        assert_same_loss_and_grads(loss_and_grads(trainer, extended), loss_and_grads(trainer, batch))

    @pytest.mark.parametrize(
        "variant, generator, generator_lambda",
        [("tbpo_a", "sba", 0.0), ("tbpo_a", "lsif", 0.0), ("tbpo_q", "ba", 1.0)],
    )
    def test_extreme_logits_stay_finite(self, variant, generator, generator_lambda, tbpo, tmp_path):
        """Invariant 27: with logits scaled far beyond the clamp, loss and gradients are finite."""
        trainer = tbpo(tmp_path, variant=variant, generator=generator, generator_lambda=generator_lambda, beta=1.0)
        with torch.no_grad():
            trainer.model.get_output_embeddings().weight.mul_(3000.0)
        trainer.model.train()
        loss, grads = loss_and_grads(trainer, collated_batch(trainer))
        assert torch.isfinite(loss) and loss > 1.0
        assert all(torch.isfinite(grad).all() for grad in grads.values())
        # Huge log-ratios on both sides of 0 (β = 1), but no token's loss exceeds ℓ_h at the clamp log R = 30
        assert 0 < trainer._metrics["train"]["log_R/frac_below_zero"][-1] < 1
        assert loss <= bregman_loss(torch.tensor(30.0), generator, generator_lambda)


class TestMetrics:
    @pytest.mark.parametrize("variant", ["tbpo_a", "tbpo_q"])
    def test_own_metric_values(self, variant, tbpo, tmp_path):
        """The values of TBPO's own metrics, and DPO's rewards keep DPO's meaning. Which metrics each variant logs (and
        not the other's), and that `kl/margin` is chosen − rejected: test_trainer_contract.py."""
        trainer = tbpo(tmp_path, variant=variant, beta=0.3)
        perturb(trainer.model)
        perturb_head(trainer)
        trainer.model.train()
        batch = collated_batch(trainer)
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        metrics = last_metrics(trainer)
        # DPO's rewards keep DPO's meaning: β Σ_t ρ_t per completion
        # The statistics are flat, one per labelled token in row order: the padded grid's masked positions, in order
        mask = batch["completion_mask"][:, 1:].bool()
        stats = trainer._policy_forward(
            trainer.model, batch, ref_hidden_states=trainer._reference_hidden_states(batch)
        ).stats
        logratios = torch.zeros(mask.shape, dtype=stats.log_probs.dtype).masked_scatter(
            mask, stats.log_probs - stats.ref_log_probs
        )
        chosen_sums = logratios.sum(1).chunk(2)[0]
        assert metrics["rewards/chosen"] == pytest.approx(0.3 * chosen_sums.mean().item(), abs=1e-5)
        lengths = batch["completion_mask"].sum(dim=1).chunk(2)
        assert metrics["min_length"] == pytest.approx(torch.minimum(*lengths).float().mean().item())
        assert 0 < metrics["log_R/frac_below_zero"] < 1
        if variant == "tbpo_q":
            assert metrics["baseline/log_w_abs_mean"] > 0


class TestBaselineHead:
    def test_gradients_reach_the_head_not_the_backbone(self, tbpo, tmp_path):
        """Invariant 26: the head reads detached hidden states. A loss through the head alone leaves the backbone
        without gradient; the TBPO loss gives the head a gradient (the zero-initialised output layer included)."""
        trainer = tbpo(tmp_path, variant="tbpo_q")
        head = trainer.baseline_head
        assert isinstance(head, BaselineHead) and head.hidden_size == 1024
        assert all(p.dtype == torch.float32 and p.device == trainer.accelerator.device for p in head.parameters())
        assert not any(p is q for p in head.parameters() for q in trainer.model.parameters())
        perturb(trainer.model)
        batch = collated_batch(trainer)
        outputs = trainer._policy_forward(trainer.model, batch, return_hidden_states=True)
        trainer._state_baselines(outputs.hidden_states).pow(2).sum().backward()
        assert all(p.grad is None for p in trainer.model.parameters())
        assert all(p.grad is not None for p in head.parameters())

        _, grads = loss_and_grads(trainer, batch)
        assert grads["baseline_head.net.2.weight"].abs().sum() > 0
        # No output bias: a constant shift of b cancels in b_l − b_w, so it could never be trained
        assert "baseline_head.net.2.bias" not in model_parameters(trainer, trainable_only=True)

    def test_head_optimizer_steps_once_per_policy_step(self, tbpo, tmp_path):
        """Separate optimizer (invariant 26): AdamW at `baseline_learning_rate`, none of the policy optimizer's
        parameters, stepped once per optimizer step of the policy under gradient accumulation."""
        trainer = tbpo(
            tmp_path,
            variant="tbpo_q",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=3,
            baseline_learning_rate=5e-3,
        )
        trainer.train()
        head_params = set(map(id, trainer.baseline_head.parameters()))
        policy_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert policy_params and not head_params & policy_params
        optimizer = trainer.baseline_optimizer
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 5e-3
        assert {float(state["step"]) for state in optimizer.state.values()} == {3.0}
        assert all(p.grad is None for p in trainer.baseline_head.parameters())  # zero_grad after each step
        assert sum("baseline/grad_norm" in log for log in trainer.state.log_history) == 3

    def test_save_and_resume_restore_the_head(self, tiny_model_path, tbpo, tmp_path):
        """Checkpoints hold the head and its optimizer next to (not inside) the model; resuming restores both, so a
        resumed run ends exactly where the uninterrupted run ends."""
        config = dict(
            variant="tbpo_q", max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4
        )
        first = tbpo(tmp_path / "run", **config)
        first.train()
        checkpoint = tmp_path / "run" / "checkpoint-2"
        for name in (BASELINE_HEAD_NAME, BASELINE_OPTIMIZER_NAME, "model.safetensors"):
            assert (checkpoint / name).is_file(), name
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as file:
            model_keys = set(file.keys())
        assert not any("baseline" in key or key.startswith("net.") for key in model_keys)
        assert model_keys == set(AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict())
        saved_head = load_baseline_head(str(checkpoint))
        assert saved_head.net[2].weight.abs().sum() > 0  # trained by then

        saved_optimizer = torch.load(checkpoint / BASELINE_OPTIMIZER_NAME, weights_only=True)
        assert {float(state["step"]) for state in saved_optimizer["state"].values()} == {2.0}

        # A fresh trainer starts from a zero head; loading the checkpoint restores the saved one
        resumed = tbpo(tmp_path / "resumed", **config)
        assert resumed.baseline_head.net[2].weight.abs().sum() == 0
        resumed._load_from_checkpoint(str(checkpoint))
        for name, tensor in saved_head.state_dict().items():
            torch.testing.assert_close(resumed.baseline_head.state_dict()[name], tensor, rtol=0, atol=0)

        # Resuming restores head, head optimizer (Adam moments included) and policy: the resumed run ends exactly
        # (bitwise: the same operations on the same values, on one machine) where the uninterrupted one ended
        restored_states = []
        original_load = resumed._load_optimizer_and_scheduler

        def load_and_record(checkpoint_dir):
            original_load(checkpoint_dir)
            restored_states.append(copy.deepcopy(resumed.baseline_optimizer.state_dict()))

        resumed._load_optimizer_and_scheduler = load_and_record
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert len(restored_states) == 1
        for index, state in saved_optimizer["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(restored_states[0]["state"][index][key], value, rtol=0, atol=0)
        for name, tensor in first.baseline_head.state_dict().items():
            assert torch.equal(resumed.baseline_head.state_dict()[name], tensor), name
        for name, param in first.model.named_parameters():
            assert torch.equal(resumed.model.get_parameter(name), param), name
        assert {float(s["step"]) for s in resumed.baseline_optimizer.state.values()} == {4.0}

        # `load_best_model_at_end` brings back the best checkpoint's head with its model
        first.state.best_model_checkpoint = str(checkpoint)
        first._load_best_model()
        for name, tensor in saved_head.state_dict().items():
            torch.testing.assert_close(first.baseline_head.state_dict()[name], tensor, rtol=0, atol=0)

    def test_head_step_unscales_fp16_gradients_and_skips_non_finite(self, tbpo, tmp_path, monkeypatch):
        """Under native fp16 AMP the loss (hence the head's gradients) carries the GradScaler's scale: the head's step
        removes it, and skips a step with non-finite gradients, as the scaler skips the policy's."""

        class FakeScaler:
            def is_enabled(self):
                return True

            def get_scale(self):
                return 1024.0

        trainer = tbpo(tmp_path, variant="tbpo_q", baseline_max_grad_norm=0.0)
        monkeypatch.setattr(trainer.accelerator, "scaler", FakeScaler())
        head = trainer.baseline_head
        for param in head.parameters():
            param.grad = torch.full_like(param, 1024.0)
        before = {name: p.detach().clone() for name, p in head.named_parameters()}
        trainer._baseline_optimizer_step()
        num_elements = sum(p.numel() for p in head.parameters())
        assert trainer._metrics["train"]["baseline/grad_norm"][-1] == pytest.approx(math.sqrt(num_elements), rel=1e-5)
        # Adam's first step moves every element by lr (the update is sign-like), whatever the gradient's scale
        for name, param in head.named_parameters():
            torch.testing.assert_close(param.detach(), before[name] - 1e-3, rtol=0, atol=1e-6)
            assert param.grad is None

        after_first_step = {name: p.detach().clone() for name, p in head.named_parameters()}
        for param in head.parameters():
            param.grad = torch.full_like(param, float("inf"))
        trainer._baseline_optimizer_step()
        assert math.isinf(trainer._metrics["train"]["baseline/grad_norm"][-1])
        for name, param in head.named_parameters():
            assert torch.equal(param.detach(), after_first_step[name]) and param.grad is None


class TestConfig:
    def test_precompute_is_refused_for_tbpo_q_only(self, tmp_path):
        common = dict(output_dir=str(tmp_path), use_cpu=True, precompute_ref_log_probs=True)
        # TBPO-A stores the reference cache (tests/test_reference_cache.py), BPO DPOTrainer's sums
        assert TBPOConfig(variant="tbpo_a", **common)._needs_reference_distribution
        with pytest.raises(ValueError, match="TBPO-Q cannot use `precompute_ref_log_probs=True`.*token_level=False"):
            TBPOConfig(variant="tbpo_q", **common)
        assert not TBPOConfig(token_level=False, **common)._needs_reference_distribution

    def test_defaults_follow_the_paper(self, tmp_path):
        args = TBPOConfig(output_dir=str(tmp_path), use_cpu=True)
        assert (args.variant, args.generator, args.generator_lambda, args.sba_scale) == ("tbpo_a", "sba", 0.0, 4.0)
        assert (args.log_ratio_clamp, args.baseline_clamp, args.baseline_learning_rate) == (30.0, 10.0, 1e-3)
        assert (args.baseline_hidden_size, args.beta, args.token_level) == (1024, 0.1, True)

    def test_label_smoothing_allowed(self, tmp_path):
        assert TBPOConfig(output_dir=str(tmp_path), use_cpu=True, label_smoothing=0.1).label_smoothing == 0.1

    def test_tbpo_q_without_token_level_warns(self, tmp_path):
        with pytest.warns(UserWarning, match="no effect with `token_level=False`"):
            TBPOConfig(output_dir=str(tmp_path), use_cpu=True, variant="tbpo_q", token_level=False)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(variant="tbpo_b"), "`variant` must be one of"),
            (dict(generator="hinge"), "`generator` must be one of"),
            (dict(generator="sba", generator_lambda=-1.0), "`generator_lambda` must be > -1"),
            (dict(generator="ba", generator_lambda=-2.0), "`generator_lambda` must be > -1"),
            (dict(sba_scale=0.0), "`sba_scale` must be a finite number > 0"),
            (dict(log_ratio_clamp=0.0), "`log_ratio_clamp` must be a finite number > 0"),
            (dict(generator="lsif", log_ratio_clamp=50.0), "overflows float32.*at most 40"),
            (dict(generator="ba", generator_lambda=2.0), "overflows float32"),
            (dict(label_smoothing=0.6), "`label_smoothing` must be in \\[0, 0.5\\]"),
            (dict(baseline_hidden_size=-1), "`baseline_hidden_size` must be >= 0"),
            (dict(baseline_learning_rate=0.0), "`baseline_learning_rate` must be a finite number > 0"),
            (dict(baseline_weight_decay=-0.1), "`baseline_weight_decay` must be >= 0"),
            (dict(baseline_max_grad_norm=-1.0), "`baseline_max_grad_norm` must be >= 0"),
            (dict(baseline_clamp=0.0), "`baseline_clamp` must be > 0"),
        ],
    )
    def test_invalid_values(self, kwargs, message, tmp_path):
        with pytest.raises(ValueError, match=message):
            TBPOConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)

    def test_head_is_sized_from_the_model(self, tbpo, tmp_path):
        trainer = tbpo(tmp_path, variant="tbpo_q", baseline_hidden_size=0)
        head = trainer.baseline_head
        assert isinstance(head.net, torch.nn.Linear) and head.input_size == trainer.model.config.hidden_size
        assert tbpo(tmp_path / "a").baseline_head is None


DISTRIBUTED_SCRIPT = """
import sys

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from trl_tokenpref import TBPOConfig, TBPOTrainer
from trl_tokenpref.losses import bregman_loss
from trl_tokenpref.data import load_default_dataset

torch.set_num_threads(1)
model_path, output_dir = sys.argv[1], sys.argv[2]
args = TBPOConfig(
    output_dir=output_dir, variant="tbpo_q", per_device_train_batch_size=4, max_steps=3, learning_rate=2e-3,
    lr_scheduler_type="constant", save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
    use_cpu=True, disable_tqdm=True, seed=0,
)
trainer = TBPOTrainer(
    model=model_path, args=args, train_dataset=load_default_dataset()["train"].select(range(32)),
    processing_class=AutoTokenizer.from_pretrained(model_path),
)
trainer.train()
head = torch.cat([p.detach().reshape(-1) for p in trainer.baseline_head.parameters()])
heads = [torch.zeros_like(head) for _ in range(dist.get_world_size())]
dist.all_gather(heads, head)
if dist.get_rank() == 0:
    print("HEAD_GAP", (heads[0] - heads[1]).abs().max().item(), "HEAD_NORM", head.norm().item())
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_head_gradients_are_averaged_across_processes(tiny_model_path, tmp_path):
    """Two CPU processes (DDP, gloo) see different micro-batches; the head, outside DDP, gets its gradients averaged
    before each step, so it stays identical on every process (without the all-reduce it drifts apart, ~3e-3)."""
    script = tmp_path / "train_tbpo_q.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(
        [*command, tiny_model_path, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("HEAD_GAP"))
    _, gap, _, norm = line.split()
    assert float(gap) == 0.0 and float(norm) > 0
