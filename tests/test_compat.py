"""Contract tests for every TRL symbol imported from outside `trl`'s top level (trl_tokenpref/_compat.py) and for the
DPOTrainer internals the trainers build on, and an import smoke test. Each test checks the behaviour we rely on, so
that a TRL upgrade that moves or changes one of them fails here, not inside a training run."""

import copy
import dataclasses
import inspect

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import build_trainer, collated_batch
from transformers import AutoModelForCausalLM

import trl_tokenpref
from trl_tokenpref import _compat


@pytest.fixture(scope="module")
def dpo_trainer(tiny_model_path, tiny_tokenizer, train_subset, tmp_path_factory):
    import trl

    return build_trainer(trl.DPOTrainer, tiny_model_path, tiny_tokenizer, train_subset, tmp_path_factory.mktemp("dpo"))


@pytest.fixture
def inputs(tiny_tokenizer):
    return tiny_tokenizer(["What is 2 plus 3? It is 5."], return_tensors="pt")


def test_public_api_imports():
    from trl_tokenpref import TBPOConfig, TBPOTrainer, TDPOConfig, TDPOTrainer, TGDPOConfig, TGDPOTrainer

    assert {"TDPOConfig", "TDPOTrainer", "TGDPOConfig", "TGDPOTrainer", "TBPOConfig", "TBPOTrainer"} <= set(
        trl_tokenpref.__all__
    )
    import trl

    for trainer, config in [(TDPOTrainer, TDPOConfig), (TGDPOTrainer, TGDPOConfig), (TBPOTrainer, TBPOConfig)]:
        assert issubclass(trainer, trl.DPOTrainer) and issubclass(config, trl.DPOConfig)


def test_supported_trl_version():
    assert _compat.TRL_VERSION.major == 1 and _compat.TRL_VERSION.minor == 16


def test_use_adapter_selects_the_reference_and_restores_the_adapter(tiny_model_path, inputs):
    """The reference pass under PEFT: `adapter_name=None` runs the base model (every adapter disabled), a name runs
    that adapter (the frozen "ref" copy of a re-trained adapter); leaving the context restores the trained one."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("ref", config)  # another random adapter
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
        model.set_adapter("ref")
        ref_logits = model(**inputs).logits
        model.set_adapter("default")
        assert not torch.allclose(adapter_logits, base_logits) and not torch.allclose(ref_logits, adapter_logits)

        with _compat.use_adapter(model, adapter_name=None):
            torch.testing.assert_close(model(**inputs).logits, base_logits, rtol=0, atol=0)
        torch.testing.assert_close(model(**inputs).logits, adapter_logits, rtol=0, atol=0)
        with _compat.use_adapter(model, adapter_name="ref"):
            assert model.active_adapter == "ref"
            torch.testing.assert_close(model(**inputs).logits, ref_logits, rtol=0, atol=0)
        assert model.active_adapter == "default"
        torch.testing.assert_close(model(**inputs).logits, adapter_logits, rtol=0, atol=0)


@pytest.mark.parametrize("enabled", [True, False])
def test_disable_gradient_checkpointing_restores_the_previous_state(tiny_model_path, enabled):
    """The reference pass runs without gradient checkpointing; the policy gets back what it had, with its kwargs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    kwargs = {"use_reentrant": False}
    if enabled:
        model.gradient_checkpointing_enable(kwargs)
    with _compat.disable_gradient_checkpointing(model, kwargs):
        assert not model.is_gradient_checkpointing
    assert model.is_gradient_checkpointing == enabled


def test_maybe_gather_lm_head_ctx_leaves_the_parameters_alone_without_zero3():
    """Without DeepSpeed ZeRO-3 the context gathers nothing: the fused pass reads the very same tensors, and it takes
    `None` for a missing bias and any number of parameters (the policy's and the reference's head, as we call it)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()
    weight, ref_weight = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3, 2))
    expected = weight.detach().clone(), ref_weight.detach().clone()
    pointers = weight.data_ptr(), ref_weight.data_ptr()
    with _compat.maybe_gather_lm_head_ctx(weight, None, ref_weight, None):
        assert (weight.data_ptr(), ref_weight.data_ptr()) == pointers
        assert torch.equal(weight, expected[0]) and torch.equal(ref_weight, expected[1])
    assert (weight.data_ptr(), ref_weight.data_ptr()) == pointers
    assert torch.equal(weight, expected[0]) and torch.equal(ref_weight, expected[1])


def test_data_collator_for_preference_layout():
    """Chosen rows first, then rejected rows; right padding; the completion mask marks completion tokens. (Its
    truncation: test_input_validation.py::test_scored_completion_tokens_match_the_collators_truncation.)"""
    collator = _compat.DataCollatorForPreference(pad_token_id=0)
    batch = collator(
        [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    torch.testing.assert_close(
        batch["input_ids"], torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]])
    )
    torch.testing.assert_close(
        batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    )
    torch.testing.assert_close(
        batch["completion_mask"], torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]])
    )


def test_chunked_kernel_signatures():
    """TRL's kernels serve as baselines in tests and benchmarks: the KL of a head with itself is 0, and the
    log-probs are log_softmax's."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, generator=generator)
    weight = torch.randn(7, 4, generator=generator)
    targets = torch.randint(0, 7, (5,), generator=generator)
    kl, _entropy = _compat.ChunkedDivergenceFunction.apply(hidden, weight, None, hidden, weight, None, 0.0)
    torch.testing.assert_close(kl, torch.zeros(5), atol=1e-6, rtol=0)
    log_probs = _compat.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0, ())[0]
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-6)


def test_dpo_trainer_metrics_are_averaged_per_mode_and_cleared(dpo_trainer):
    """The token-level trainers append their metrics to `self._metrics[mode][key]`; DPOTrainer's `log` averages each
    list into the log (with `eval_` in evaluation) and empties it."""
    trainer = dpo_trainer
    trainer.model.train()
    trainer._metrics["train"]["kl/chosen"] += [1.0, 2.0]
    trainer.log({"loss": 0.5})
    assert trainer.state.log_history[-1]["kl/chosen"] == 1.5 and trainer.state.log_history[-1]["loss"] == 0.5
    assert not trainer._metrics["train"]
    trainer.model.eval()
    trainer._metrics["eval"]["kl/chosen"].append(3.0)
    trainer.log({"eval_loss": 0.25})
    assert trainer.state.log_history[-1]["eval_kl/chosen"] == 3.0 and not trainer._metrics["eval"]
    trainer.model.train()


def test_dpo_trainer_state_we_rely_on(dpo_trainer):
    """The token count `num_tokens` accumulates in `_total_train_tokens` (divided by the tensor-parallel size),
    `aux_loss_enabled` says whether to add the MoE loss, `compute_loss` takes `num_items_in_batch`, and the columns
    kept by `remove_unused_columns` are the tokenized ones (TGDPO adds its own)."""
    trainer = dpo_trainer
    assert trainer._tp_size == 1 and trainer.aux_loss_enabled is False
    trainer.model.train()
    batch = collated_batch(trainer)
    before = trainer._total_train_tokens
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    assert trainer._total_train_tokens - before == batch["attention_mask"].sum().item()
    assert trainer._metrics["train"]["num_tokens"] == [trainer._total_train_tokens]
    trainer._metrics["train"].clear()
    trainer._signature_columns = None
    trainer._set_signature_columns_if_needed()
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer._signature_columns)


def test_model_loading_and_preparation_helpers(tiny_model_path):
    """TGDPO loads, freezes, hashes and prepares its guidance model with DPOTrainer's own helpers."""
    model = _compat.create_model_from_path(tiny_model_path, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64)
    assert model.dtype == torch.float64 and model.device.type == "cpu"
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # DeepSpeed and FSDP are not installed / not runnable on CPU here: their signatures are the contract we can check
    assert list(inspect.signature(_compat.prepare_deepspeed).parameters)[:2] == ["model", "accelerator"]
    assert list(inspect.signature(_compat.prepare_fsdp).parameters)[:2] == ["model", "accelerator"]
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    _compat.disable_dropout_in_model(module)
    assert module[1].p == 0


def test_hash_module_identifies_the_weights(tiny_model_path):
    """The guidance model's hash keys the cache of precomputed per-token columns: equal for equal weights (a copy,
    another load), different after any change of one weight, or of the dtype."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    digest = _compat.hash_module(model)
    assert _compat.hash_module(copy.deepcopy(model)) == digest
    assert _compat.hash_module(AutoModelForCausalLM.from_pretrained(tiny_model_path)) == digest
    changed = copy.deepcopy(model)
    with torch.no_grad():
        weight = changed.model.layers[1].mlp.down_proj.weight
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))  # one element, by one ulp
    assert _compat.hash_module(changed) != digest
    assert _compat.hash_module(copy.deepcopy(model).double()) != digest


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_dpo_prepare_dataset_uses_max_length_only_to_drop_rows(dpo_trainer, train_subset, truncation_mode):
    """`TokenLevelDPOTrainer._prepare_dataset` tokenizes through DPOTrainer's `_prepare_dataset` with `max_length=None`
    (keep_start), so that the rows whose prompt fills `max_length` are refused by name instead of dropped silently.
    That is only equivalent while DPOTrainer's sole use of `max_length` there is that filter (the collator
    truncates): with a short `max_length`, keep_start drops exactly those rows and truncates none, keep_end changes
    nothing."""
    trainer = dpo_trainer
    args = dataclasses.replace(trainer.args, max_length=None, truncation_mode=truncation_mode)
    untruncated = trainer._prepare_dataset(train_subset, trainer.processing_class, args, "train")
    prompt_lengths = [len(ids) for ids in untruncated["prompt_ids"]]
    max_length = sorted(prompt_lengths)[len(prompt_lengths) // 2]  # about half of the prompts fill it
    args = dataclasses.replace(args, max_length=max_length)
    prepared = trainer._prepare_dataset(train_subset, trainer.processing_class, args, "train")
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    kept = [i for i, n in enumerate(prompt_lengths) if n < max_length or truncation_mode == "keep_end"]
    assert 0 < len(kept) < len(train_subset) or truncation_mode == "keep_end"
    assert prepared.select_columns(columns).to_list() == untruncated.select(kept).select_columns(columns).to_list()
