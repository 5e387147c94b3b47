"""Contract tests of the private upstream members that `trl_tokenpref/_compat.py` reaches: each checks the behaviour we
rely on, so that an upgrade of TRL, transformers, accelerate or datasets that moves one fails here."""

import inspect

import pytest
import torch
import trl.kernels.chunked_logprob as trl_chunked_logprob
from accelerate import Accelerator
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, Trainer
from trl import DPOConfig, DPOTrainer

from trl_tokenpref import _compat


OWNERS = {"Trainer": Trainer, "DPOTrainer": DPOTrainer}


def dpo_trainer(model, tokenizer, dataset, output_dir, **config):
    args = DPOConfig(str(output_dir), report_to="none", use_cpu=True, **config)
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.fixture(scope="module")
def pairs(default_dataset):
    return default_dataset["train"].select(range(8))


@pytest.mark.parametrize("qualified_name", sorted(_compat.OVERRIDDEN_METHODS))
def test_overridden_methods_exist_with_the_parameters_we_pass(qualified_name):
    owner, method = qualified_name.split(".")
    function = getattr(OWNERS[owner], method, None)
    assert function is not None, f"{qualified_name} is gone: the trainers override it"
    expected = _compat.OVERRIDDEN_METHODS[qualified_name]
    assert tuple(inspect.signature(function).parameters)[: len(expected)] == expected


def test_dpo_trainer_attributes_and_precompute_call(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    calls = []

    class Spy(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            calls.append((name, batch_size, len(dataset)))
            return super()._precompute_ref_logps(dataset, name, batch_size)

    args = DPOConfig(
        str(tmp_path), report_to="none", use_cpu=True, precompute_ref_log_probs=True, precompute_ref_batch_size=4
    )
    trainer = Spy(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer)
    assert calls == [("train", 4, len(pairs))]  # called from `__init__`, with the precompute batch size
    expected_types = {
        "_metrics": dict,
        "_total_train_tokens": int,
        "_tp_size": int,
        "aux_loss_enabled": bool,
        "router_aux_loss_coef": float,
    }
    assert set(expected_types) | {"_signature_columns"} == set(_compat.DPO_TRAINER_ATTRIBUTES)
    for name, expected_type in expected_types.items():
        assert isinstance(getattr(trainer, name), expected_type), name
    trainer._set_signature_columns_if_needed()
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer._signature_columns)
    assert set(trainer._metrics) == {"train", "eval"}


def test_precompute_model_hash_and_reference_model(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    trainer = dpo_trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path / "a", precompute_ref_log_probs=True)
    model_hash = _compat.precompute_model_hash(trainer)
    assert isinstance(model_hash, str) and model_hash == _compat.hash_module(trainer.model)
    # No explicit reference and no DeepSpeed: the policy itself computes the reference values before training
    assert _compat.precompute_reference_model(trainer) is trainer.model

    other = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    changed = dpo_trainer(other, tiny_tokenizer, pairs, tmp_path / "b", precompute_ref_log_probs=True)
    assert _compat.precompute_model_hash(changed) != model_hash


def test_forget_prepared_model(tiny_model_path):
    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    assert any(m is prepared for m in accelerator._models)
    _compat.forget_prepared_model(accelerator, prepared)
    assert not any(m is prepared for m in accelerator._models)


def test_dataset_fingerprint_and_cache_file(tmp_path):
    first = Dataset.from_dict({"x": [1, 2, 3]})
    first.save_to_disk(str(tmp_path / "data"))
    on_disk = load_from_disk(str(tmp_path / "data"))
    assert _compat.dataset_fingerprint(on_disk) != _compat.dataset_fingerprint(on_disk.map(lambda row: {"x": 0}))
    cache_file = _compat.dataset_cache_file(on_disk, "abc123")
    # In the dataset's own folder, so that every process of a run finds the file the main process wrote
    assert cache_file.startswith(str(tmp_path / "data")) and "abc123" in cache_file


def test_attn_implementation(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="eager")
    assert _compat.attn_implementation(model.config) == "eager"


def test_tokenize_preference_dataset_is_dpo_trainers_preparation(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    trainer = dpo_trainer(tiny_model_path, tiny_tokenizer, pairs, tmp_path, max_length=None)
    args = DPOConfig(str(tmp_path), report_to="none", use_cpu=True, max_length=None)
    tokenized = _compat.tokenize_preference_dataset(pairs, tiny_tokenizer, args, "train")
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert tokenized.select_columns(columns).to_list() == trainer.train_dataset.select_columns(columns).to_list()


def test_set_trl_lm_head_tiles():
    before = (trl_chunked_logprob.TOKEN_CHUNK_SIZE, _compat._trl_trainer_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    try:
        assert _compat.set_trl_lm_head_tiles(256, 4096) == before
        assert trl_chunked_logprob.TOKEN_CHUNK_SIZE == 256
        assert _compat._trl_trainer_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 4096
        assert _compat._trl_chunked_divergence.VOCAB_CHUNK_SIZE == 4096
    finally:
        _compat.set_trl_lm_head_tiles(*before)


def test_trainer_save_and_step_hooks_we_override(tiny_model_path, tiny_tokenizer, pairs, tmp_path):
    """`checkpoints.TrainingGuardMixin` relies on: `_maybe_log_save_evaluate` runs once per optimizer step with that
    step's gradient norm, before the step is logged and saved (so a non-finite step is stopped before either);
    `_save_checkpoint` writes `output_dir/checkpoint-<step>` with `trainer_state.json` (so the manifest, written after
    it returns, lists every file); `training_step` returns the detached loss; a resume calls `_load_rng_state` with
    the checkpoint's path."""
    calls = []

    class Spy(DPOTrainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            calls.append(("training_step", loss.detach().clone()))
            return loss

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
            calls.append(("step", self.state.global_step, grad_norm))
            return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

        def log(self, logs, start_time=None):
            calls.append(("log", self.state.global_step))
            return super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            folder = tmp_path / f"checkpoint-{self.state.global_step}"
            calls.append(("saved", self.state.global_step, (folder / "trainer_state.json").is_file()))

        def _load_rng_state(self, checkpoint):
            calls.append(("rng", checkpoint))
            return super()._load_rng_state(checkpoint)

    args = DPOConfig(
        str(tmp_path), report_to="none", use_cpu=True, max_steps=2, per_device_train_batch_size=4, logging_steps=1,
        save_strategy="steps", save_steps=1, bf16=False,
    )  # fmt: skip
    Spy(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer).train()
    steps = [call for call in calls if call[0] != "training_step"]
    assert steps[:6] == [
        ("step", 1, steps[0][2]), ("log", 1), ("saved", 1, True), ("step", 2, steps[3][2]), ("log", 2),
        ("saved", 2, True),
    ]  # fmt: skip
    assert all(isinstance(call[2], (float, torch.Tensor)) and torch.isfinite(torch.as_tensor(call[2])) for call in
               (steps[0], steps[3]))  # fmt: skip
    losses = [call[1] for call in calls if call[0] == "training_step"]
    assert len(losses) == 2 and all(loss.dim() == 0 and not loss.requires_grad for loss in losses)

    calls.clear()
    args.max_steps = 3
    resumed = Spy(model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert ("rng", str(tmp_path / "checkpoint-2")) in calls


def test_set_attn_implementation_and_the_attention_interfaces(tiny_model_path, tmp_path):
    """What padding-free training relies on: a function registered with `AttentionInterface` (and a mask function with
    `AttentionMaskInterface`) under a new name can be switched to on a loaded model, its layers then call it with the
    keyword arguments given to the model's forward (`cu_seq_lens_q`), an all-ones `attention_mask` makes sdpa's mask
    creation build no mask, and the name is not written to `config.json`."""
    calls = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((attention_mask, kwargs.get("cu_seq_lens_q")))
        return _compat.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    _compat.AttentionInterface.register("test_recording_sdpa", recording_attention)
    _compat.AttentionMaskInterface.register("test_recording_sdpa", _compat.sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa")
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    _compat.set_attn_implementation(model, "test_recording_sdpa")
    assert _compat.attn_implementation(model.config) == "test_recording_sdpa"
    boundaries = torch.tensor([0, 4], dtype=torch.int32)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), cu_seq_lens_q=boundaries).logits
    torch.testing.assert_close(logits, expected)
    assert calls and all(mask is None and seq is boundaries for mask, seq in calls)
    model.save_pretrained(tmp_path)
    assert "test_recording_sdpa" not in (tmp_path / "config.json").read_text()
