"""Contract tests for every TRL symbol imported from outside `trl`'s top level (trl_tokenpref/_compat.py), and an
import smoke test. A TRL upgrade that moves or changes one of them fails here, not inside a training run."""

import inspect

import torch

import trl_tokenpref
from trl_tokenpref import _compat


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


def test_use_adapter_signature():
    assert list(inspect.signature(_compat.use_adapter).parameters) == ["model", "adapter_name"]


def test_disable_gradient_checkpointing_signature():
    assert list(inspect.signature(_compat.disable_gradient_checkpointing).parameters) == [
        "model",
        "gradient_checkpointing_kwargs",
    ]


def test_maybe_gather_lm_head_ctx_is_a_null_context_without_zero3():
    weight = torch.nn.Parameter(torch.ones(3, 2))
    with _compat.maybe_gather_lm_head_ctx(weight, None):
        assert weight.shape == (3, 2)


def test_data_collator_for_preference_layout():
    """Chosen rows first, then rejected rows; right padding; the completion mask marks completion tokens."""
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
        batch["completion_mask"], torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]])
    )


def test_chunked_kernel_signatures():
    """TRL's kernels serve as baselines in tests and benchmarks."""
    hidden = torch.randn(5, 4)
    weight = torch.randn(7, 4)
    targets = torch.randint(0, 7, (5,))
    kl, _entropy = _compat.ChunkedDivergenceFunction.apply(hidden, weight, None, hidden, weight, None, 0.0)
    torch.testing.assert_close(kl, torch.zeros(5), atol=1e-6, rtol=0)
    log_probs = _compat.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0, ())[0]
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-6)


def test_dpo_trainer_hooks_we_rely_on():
    """DPOTrainer attributes and methods the token-level trainers use."""
    import trl

    source = inspect.getsource(trl.DPOTrainer.__init__)
    for attribute in ("self._metrics", "self._total_train_tokens", "self._tp_size", "self.aux_loss_enabled"):
        assert attribute in source, attribute
    assert "num_items_in_batch" in inspect.signature(trl.DPOTrainer.compute_loss).parameters
    assert callable(trl.DPOTrainer._set_signature_columns_if_needed)


def test_model_loading_and_preparation_helpers():
    """TGDPO loads, freezes, hashes and prepares its guidance model with DPOTrainer's own helpers."""
    assert list(inspect.signature(_compat.create_model_from_path).parameters)[0] == "model_id"
    assert list(inspect.signature(_compat.prepare_deepspeed).parameters)[:2] == ["model", "accelerator"]
    assert list(inspect.signature(_compat.prepare_fsdp).parameters)[:2] == ["model", "accelerator"]
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    _compat.disable_dropout_in_model(module)
    assert module[1].p == 0
    assert _compat.hash_module(module) == _compat.hash_module(module)


def test_dpo_prepare_dataset_uses_max_length_only_to_drop_rows():
    """`TokenLevelDPOTrainer._prepare_dataset` tokenizes through DPOTrainer's `_prepare_dataset` with `max_length=None`
    (keep_start), so that the rows whose prompt fills `max_length` are refused by name instead of dropped silently.
    That is only equivalent while DPOTrainer's sole use of `max_length` there is that filter (the collator truncates)."""
    import trl

    source = inspect.getsource(trl.DPOTrainer._prepare_dataset)
    uses = [line.strip() for line in source.splitlines() if "max_length" in line and not line.strip().startswith("#")]
    assert uses == [
        'if args.max_length is not None and args.truncation_mode == "keep_start":',
        'dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length, **map_kwargs)',
    ]
