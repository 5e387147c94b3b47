"""The reference cache (`precompute_ref_log_probs=True` for TDPO and TBPO-A, docs/algorithms.md §9).

* the fused pass with a cache equals an independent full-logits computation of
  `KL_K = Σ_{v∈K} p(v)[log p(v) − log q(v)] + m[log m − log Q]`, in value and gradient, for any k and vocabulary tiling,
  equals the exact KL when K is the whole vocabulary, is 0 when the policy is the reference, and stays finite when the
  policy's mass outside K underflows;
* the trainers with the cache at `ref_top_k >= vocabulary` equal the live-reference trainers (loss and every
  gradient), and with a small k equal the loss computed from full logits;
* no reference model is kept, a step runs the policy only (under PEFT, no adapter-disabled pass);
* the cache is reused on a re-run and recomputed when the model or k changes; columns that do not match the rows are
  refused naming the row; eval datasets are cached too.

The fused pass computes its statistics in float32 whatever the input dtype, so the inputs here are float64 and the
tolerances are float32's: a relative error of a few 1e-7 per reduction, 1e-5 with margin.
"""

import math

import pytest
import torch
from datasets import Dataset, load_from_disk
from peft import LoraConfig
from testing_utils import (
    collated_batch,
    fast_args,
    loss_and_grads,
    padded_reference_top_k,
    padded_token_stats,
    perturb,
)

import trl_tokenpref.token_stats.fused as fused_kernel
from trl_tokenpref import TBPOConfig, TBPOTrainer, TDPOConfig, TDPOTrainer
from trl_tokenpref.losses import sequence_sum, tdpo_loss
from trl_tokenpref.precompute import REF_CACHE_COLUMNS, cache_bytes_per_token, check_per_token_columns
from trl_tokenpref.token_stats import LMHead, ReferenceCache, naive_token_stats


RTOL = 1e-5  # float32 statistics (see the module docstring)


def independent_cached_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, k: int) -> torch.Tensor:
    """KL_K from full logits, by its definition (float64, differentiable in the policy logits)."""
    q, p = policy_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    top = p.topk(min(k, p.size(-1)), dim=-1)
    in_k = (top.values.exp() * (top.values - q.gather(-1, top.indices))).sum(-1)
    log_m = p.scatter(-1, top.indices, -math.inf).logsumexp(-1)
    log_q_outside = q.scatter(-1, top.indices, -math.inf).logsumexp(-1)
    bucket = torch.where(log_m > -math.inf, log_m.exp() * (log_m - log_q_outside), torch.zeros_like(log_m))
    return in_k + torch.where(log_m > -math.inf, bucket, torch.zeros_like(log_m))


def cache_of(ref_logits: torch.Tensor, labels: torch.Tensor, k: int) -> ReferenceCache:
    p = ref_logits.log_softmax(-1)
    top = p.topk(min(k, p.size(-1)), dim=-1)
    return ReferenceCache(
        label_log_probs=p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1),
        topk_ids=top.indices,
        topk_log_probs=top.values,
        tail_log_mass=p.scatter(-1, top.indices, -math.inf).logsumexp(-1),
    )


@pytest.fixture(params=[7, 4096], ids=["vocab-tiles-of-7", "one-tile"])
def vocab_tile(request, monkeypatch):
    monkeypatch.setattr(fused_kernel, "CPU_VOCAB_TILE", request.param)
    return request.param


class TestCachedKL:
    rows, seq, hidden, vocab = 3, 6, 16, 50

    def inputs(self, seed=0, ref_scale=0.5):
        generator = torch.Generator().manual_seed(seed)
        h = torch.randn(self.rows, self.seq, self.hidden, dtype=torch.float64, generator=generator)
        weight = torch.randn(self.vocab, self.hidden, dtype=torch.float64, generator=generator) / 2
        ref_logits = h @ (weight + ref_scale * torch.randn(weight.shape, dtype=torch.float64, generator=generator)).T
        labels = torch.randint(0, self.vocab, (self.rows, self.seq), generator=generator)
        labels[0, :2] = -100  # a prompt
        labels[2, -1] = -100  # padding
        return h.requires_grad_(), weight.requires_grad_(), ref_logits, labels

    @pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
    def test_value_and_gradient_equal_the_definition(self, k, vocab_tile):
        h, weight, ref_logits, labels = self.inputs()
        mask = labels != -100
        stats = padded_token_stats(h, LMHead(weight), labels, ref_cache=cache_of(ref_logits, labels, k), chunk_size=4)
        expected_kl = torch.where(mask, independent_cached_kl(h @ weight.T, ref_logits, k), 0.0)
        expected_lp = torch.where(
            mask, (h @ weight.T).log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0
        )
        torch.testing.assert_close(stats.forward_kl.double(), expected_kl, rtol=RTOL, atol=RTOL)
        # The label log-probs of the reference are the stored ones, exactly
        assert torch.equal(stats.ref_log_probs[mask], cache_of(ref_logits, labels, k).label_log_probs[mask].float())
        g_kl = torch.randn(self.rows, self.seq, dtype=torch.float64)
        g_lp = torch.randn(self.rows, self.seq, dtype=torch.float64)
        ours = torch.autograd.grad((stats.forward_kl * g_kl + stats.log_probs * g_lp).sum(), (h, weight))
        theirs = torch.autograd.grad((expected_kl * g_kl + expected_lp * g_lp).sum(), (h, weight))
        for name, a, b in zip(("hidden", "weight"), ours, theirs):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * b.abs().max().item(), msg=name)

    def test_whole_vocabulary_is_the_exact_kl_and_a_lower_bound_otherwise(self, vocab_tile):
        h, weight, ref_logits, labels = self.inputs(seed=1)
        ref_hidden = h.detach()
        # Express the reference as hidden states through a head, to compare with the live exact KL
        ref_weight = torch.linalg.lstsq(
            ref_hidden.reshape(-1, self.hidden), ref_logits.reshape(-1, self.vocab)
        ).solution
        ref_logits = ref_hidden @ ref_weight
        exact = naive_token_stats(h, LMHead(weight), labels, ref_hidden, LMHead(ref_weight.T.contiguous())).forward_kl
        full = padded_token_stats(h, LMHead(weight), labels, ref_cache=cache_of(ref_logits, labels, self.vocab))
        torch.testing.assert_close(full.forward_kl.double(), exact.double(), rtol=RTOL, atol=RTOL)
        for k in (1, 3, 10):
            cached = padded_token_stats(h, LMHead(weight), labels, ref_cache=cache_of(ref_logits, labels, k))
            assert (cached.forward_kl.double() <= exact.double() + RTOL).all()  # log-sum inequality

    def test_zero_when_the_policy_is_the_reference(self, vocab_tile):
        h, weight, _, labels = self.inputs(seed=2)
        cache = cache_of(h.detach() @ weight.detach().T, labels, 4)
        stats = padded_token_stats(h, LMHead(weight), labels, ref_cache=cache)
        assert stats.forward_kl.abs().max() < 1e-5
        (grad,) = torch.autograd.grad(stats.forward_kl.sum(), weight)
        assert grad.abs().max() < 1e-5  # ∂KL_K/∂z = q − p = 0 in and outside K

    def test_finite_when_the_policy_mass_outside_k_underflows(self, vocab_tile):
        h, weight, ref_logits, labels = self.inputs(seed=3)
        cache = cache_of(ref_logits, labels, 3)
        # A policy whose logits put every token outside the cached ones 300 nats lower: Q = e^-300 underflows in
        # float32. The per-position offsets are folded into the hidden states (one extra feature per vocabulary
        # entry, read by an identity block of the head)
        logits_offset = torch.full((self.rows, self.seq, self.vocab), -300.0, dtype=torch.float64)
        logits_offset.scatter_(-1, cache.topk_ids, 0.0)
        features = torch.cat([h.detach(), logits_offset], -1).requires_grad_()
        head = torch.cat([weight.detach(), torch.eye(self.vocab, dtype=torch.float64)], -1).requires_grad_()
        stats = padded_token_stats(features, LMHead(head), labels, ref_cache=cache)
        expected = independent_cached_kl(features @ head.T, ref_logits, 3)
        mask = labels != -100
        assert torch.isfinite(stats.forward_kl).all()
        torch.testing.assert_close(stats.forward_kl.double()[mask], expected[mask], rtol=RTOL, atol=1e-3)
        grads = torch.autograd.grad(stats.forward_kl.sum(), (features, head))
        assert all(torch.isfinite(grad).all() for grad in grads)

    def test_reference_top_k(self, vocab_tile):
        h, weight, _, labels = self.inputs(seed=4)
        for k in (1, 6, 50, 99):
            cache = padded_reference_top_k(h.detach(), LMHead(weight.detach()), labels, k, chunk_size=5)
            expected = cache_of(h.detach() @ weight.detach().T, labels, k)
            mask = labels != -100
            assert cache.topk_ids.shape[-1] == min(k, self.vocab)
            assert torch.equal(cache.topk_ids[mask], expected.topk_ids[mask])
            for name in ("label_log_probs", "topk_log_probs", "tail_log_mass"):
                torch.testing.assert_close(
                    getattr(cache, name)[mask].double(), getattr(expected, name)[mask], rtol=RTOL, atol=RTOL
                )


# ---------------------------------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(default_dataset):
    return default_dataset["train"].select(range(16))


def trainer_of(trainer_class, config_class, model, tokenizer, dataset, output_dir, **config):
    args = fast_args(output_dir, config_class, **config)
    return trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


SETTINGS = [
    (TDPOTrainer, TDPOConfig, {"variant": "tdpo1"}),
    (TDPOTrainer, TDPOConfig, {"variant": "tdpo2", "alpha": 0.5}),
    (TBPOTrainer, TBPOConfig, {"variant": "tbpo_a"}),
]
SETTING_IDS = ["tdpo1", "tdpo2", "tbpo_a"]


@pytest.mark.parametrize("trainer_class, config_class, config", SETTINGS, ids=SETTING_IDS)
def test_whole_vocabulary_cache_equals_the_live_reference(
    trainer_class, config_class, config, tiny_model_path, tiny_tokenizer, pairs, tmp_path
):
    results = {}
    for precompute in (False, True):
        trainer = trainer_of(
            trainer_class, config_class, tiny_model_path, tiny_tokenizer, pairs, tmp_path / str(precompute),
            precompute_ref_log_probs=precompute, ref_top_k=10**6, **config,
        )  # fmt: skip
        assert (trainer.ref_model is None) is precompute  # full fine-tuning: no reference in memory with the cache
        perturb(
            trainer.model, seed=1, scale=0.05
        )  # away from the reference, so that the KL and its gradient are not 0
        results[precompute] = loss_and_grads(trainer, collated_batch(trainer))
    (live_loss, live_grads), (cached_loss, cached_grads) = results[False], results[True]
    torch.testing.assert_close(cached_loss, live_loss, rtol=RTOL, atol=0.0)
    assert cached_grads.keys() == live_grads.keys()
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=RTOL, atol=RTOL * grad.abs().max().item(), msg=name)


def test_small_k_loss_equals_the_definition(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    k, beta = 4, 0.1
    trainer = trainer_of(
        TDPOTrainer, TDPOConfig, tiny_model_path, tiny_tokenizer, pairs, tmp_path,
        precompute_ref_log_probs=True, ref_top_k=k, variant="tdpo1", beta=beta,
    )  # fmt: skip
    reference = type(trainer.model).from_pretrained(tiny_model_path).double().eval()
    perturb(trainer.model, seed=2, scale=0.05)
    batch = collated_batch(trainer)
    loss, _ = loss_and_grads(trainer, batch)

    policy = type(trainer.model).from_pretrained(tiny_model_path).double()
    policy.load_state_dict({name: p.double() for name, p in trainer.model.state_dict().items()})
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        policy_logits, ref_logits = policy(**inputs).logits[:, :-1], reference(**inputs).logits[:, :-1]
    label_lp = policy_logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_label_lp = ref_logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    kl = sequence_sum(independent_cached_kl(policy_logits, ref_logits, k), mask)
    logratios = sequence_sum(label_lp - ref_label_lp, mask)
    expected = tdpo_loss(*logratios.chunk(2), *kl.chunk(2), beta=beta, variant="tdpo1").losses.mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0.0)  # float32 model vs float64 oracle


def test_training_runs_the_policy_only_and_logs_the_tail_mass(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    trainer = trainer_of(
        TDPOTrainer, TDPOConfig, tiny_model_path, tiny_tokenizer, pairs, tmp_path,
        precompute_ref_log_probs=True, ref_top_k=8, max_steps=3,
    )  # fmt: skip
    assert trainer.ref_model is None
    assert set(REF_CACHE_COLUMNS) <= set(trainer.train_dataset.column_names)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    def no_reference_pass(*args, **kwargs):
        raise AssertionError("a training step with the reference cache ran a reference forward")

    trainer._reference_hidden_states = no_reference_pass
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert all(0.0 < log["kl/cache_tail_mass"] < 1.0 for log in logged)


def test_peft_skips_the_adapter_disabled_pass(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    args = fast_args(tmp_path, TDPOConfig, precompute_ref_log_probs=True, ref_top_k=8, max_steps=2)
    trainer = TDPOTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=pairs,
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    calls = []
    trainer._reference_adapter = lambda: calls.append(1)  # would be entered by any reference pass
    trainer.train()
    assert calls == []


def test_cache_is_reused_and_invalidated(tiny_model_path, tiny_tokenizer, pairs, tmp_path, monkeypatch):
    pairs.save_to_disk(str(tmp_path / "data"))
    on_disk = load_from_disk(str(tmp_path / "data"))
    computed = []
    original = TDPOTrainer._reference_top_k

    def counting(self, model, inputs, k):
        computed.append(k)
        return original(self, model, inputs, k)

    monkeypatch.setattr(TDPOTrainer, "_reference_top_k", counting)

    def run(k, model=tiny_model_path, max_length=1024):
        computed.clear()
        trainer = trainer_of(
            TDPOTrainer, TDPOConfig, model, tiny_tokenizer, on_disk, tmp_path / f"run{k}",
            precompute_ref_log_probs=True, ref_top_k=k, max_length=max_length,
        )  # fmt: skip
        return trainer, bool(computed)

    first, computed_first = run(4)
    second, computed_second = run(4)
    assert computed_first and not computed_second  # the same dataset, model and k: read from the cache file
    assert first.train_dataset["ref_chosen_topk_ids"] == second.train_dataset["ref_chosen_topk_ids"]
    assert run(5)[1]  # another k
    assert run(4, max_length=24)[1]  # another truncation
    other_model = type(first.model).from_pretrained(tiny_model_path)
    perturb(other_model, seed=5, scale=0.05)
    other_model.save_pretrained(tmp_path / "other")
    assert run(4, str(tmp_path / "other"))[1]  # another reference model


def test_eval_dataset_is_cached_too(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    args = fast_args(tmp_path, TDPOConfig, precompute_ref_log_probs=True, ref_top_k=8, eval_strategy="no")
    trainer = TDPOTrainer(
        model=tiny_model_path,
        args=args,
        train_dataset=pairs,
        eval_dataset=pairs.select(range(4)),
        processing_class=tiny_tokenizer,
    )
    assert set(REF_CACHE_COLUMNS) <= set(trainer.eval_dataset.column_names)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_kl/cache_tail_mass" in metrics


def test_columns_that_do_not_match_the_rows_are_refused():
    dataset = Dataset.from_dict(
        {
            "chosen_ids": [[1, 2], [3, 4, 5]],
            "rejected_ids": [[6], [7, 8]],
            "ref_chosen_topk_ids": [[1, 2, 3, 4], [1, 2, 3, 4]],  # k = 2: row 1 needs 6 values
            "ref_rejected_topk_ids": [[1, 2], [1, 2, 3, 4]],
        }
    )
    with pytest.raises(ValueError, match=r"Row 1 of the train dataset: `ref_chosen_topk_ids` holds 4 values"):
        check_per_token_columns(dataset, ["ref_chosen_topk_ids", "ref_rejected_topk_ids"], "train")


def test_cache_size_is_stated(tiny_model_path, tiny_tokenizer, pairs, tmp_path, capsys):
    trainer_of(
        TDPOTrainer, TDPOConfig, tiny_model_path, tiny_tokenizer, pairs, tmp_path,
        precompute_ref_log_probs=True, ref_top_k=16,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert f"x {cache_bytes_per_token(16)} bytes (ref_top_k=16)" in out and cache_bytes_per_token(16) == 136


@pytest.mark.parametrize("value", [0, -3, 2.5, None, True])
def test_ref_top_k_is_validated(value, tmp_path):
    with pytest.raises(ValueError, match="`ref_top_k` must be a positive integer"):
        TDPOConfig(str(tmp_path), ref_top_k=value, use_cpu=True, bf16=False, report_to="none")


def test_tbpo_q_still_refuses_precompute(tmp_path):
    with pytest.raises(ValueError, match="TBPO-Q cannot use `precompute_ref_log_probs=True`"):
        TBPOConfig(str(tmp_path), variant="tbpo_q", precompute_ref_log_probs=True, use_cpu=True, bf16=False)
