"""`padding_free=True`: the models run on a batch's real tokens only, packed into one row, and nothing else changes.

* **One step, every trainer, both reference modes.** The packed batch's loss, every gradient and every logged metric
  equal the padded batch's. The models are float64, so that the tolerance follows from rounding: the two layouts run
  the same float64 operations on the same values (attention per sequence against attention over the padded row with
  its padding masked out), whose results differ by float64 roundings, which can move the fused pass's float32
  statistics by one float32 rounding (`testing_utils.EQUIVALENCE_RTOL`). Measured: 4e-16 relative, i.e. identical
  float32 statistics. A packed batch whose attention crossed sequence boundaries moves the loss at the first decimal
  (checked, so that the comparison can fail).
* **Training.** Gradient accumulation over packed micro-batches (2 pairs x 2 steps) gives the parameters of padded
  full batches (4 pairs x 1 step); a packed run resumed from its checkpoint is bitwise the uninterrupted packed run.
  Two processes (DDP) are in `tests/test_distributed.py`.
* **Attention.** The per-sequence sdpa runs with no mask (none is built) and the sequences' boundaries; an
  implementation that cannot run sequences on their own (eager) or a sliding window under sdpa is refused before
  training, with the fix; so is a custom collator, which cannot pack.
"""

import math
import shutil

import pytest
import torch
from peft import LoraConfig
from testing_utils import (
    EQUIVALENCE_RTOL,
    FLOAT64_MODEL,
    HEAD_RTOL,
    assert_relatively_close,
    assert_same_loss_and_grads,
    build_trainer,
    collated_batch,
    fast_args,
    logged_steps,
    loss_and_grads,
    model_parameters,
    perturb,
    snapshot,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_tokenpref import TBPOConfig, TBPOTrainer, TDPOConfig, TDPOTrainer, TGDPOConfig, TGDPOTrainer, packing
from trl_tokenpref._compat import set_attn_implementation
from trl_tokenpref.packing import PACKED_SDPA
from trl_tokenpref.token_batch import TokenBatch


# name: (trainer class, config, whether the trainer takes the guidance model)
STEP_CASES = {
    "tdpo2": (TDPOTrainer, dict(variant="tdpo2"), False),
    "tdpo2_cached": (TDPOTrainer, dict(variant="tdpo2", precompute_ref_log_probs=True), False),
    "tdpo1": (TDPOTrainer, dict(variant="tdpo1"), False),
    "tgdpo_guidance_model": (TGDPOTrainer, dict(alpha=5.0), True),
    "tgdpo_precomputed": (TGDPOTrainer, dict(alpha=5.0, precompute_ref_log_probs=True), True),
    "tbpo_a": (TBPOTrainer, dict(variant="tbpo_a"), False),
    "tbpo_a_cached": (TBPOTrainer, dict(variant="tbpo_a", precompute_ref_log_probs=True), False),
    "tbpo_q": (TBPOTrainer, dict(variant="tbpo_q", baseline_hidden_size=32), False),
    "bpo_sequence_level": (TBPOTrainer, dict(token_level=False), False),
    # LoRA: the reference is the same model with its adapter disabled, run on the same packed row
    "tdpo2_lora": (TDPOTrainer, dict(variant="tdpo2"), False),
}
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def step_trainer(case, padding_free, model_path, tokenizer, dataset, guidance_path, output_dir, **config):
    trainer_class, case_config, uses_guidance = STEP_CASES[case]
    trainer_kwargs = {"guidance_model": guidance_path} if uses_guidance else {}
    if case.endswith("_lora"):
        torch.manual_seed(0)  # the same random adapter for both layouts
        trainer_kwargs["peft_config"] = LORA
    trainer = build_trainer(
        trainer_class,
        model_path,
        tokenizer,
        dataset,
        output_dir,
        trainer_kwargs,
        model_init_kwargs=FLOAT64_MODEL,
        padding_free=padding_free,
        **case_config,
        **config,
    )
    # The policy away from its reference, so that ρ, κ and their gradients are not zero; the same draw for both
    if not case.endswith("_lora"):  # LoRA: the random adapter moves the policy away from the reference
        perturb(trainer.model, seed=1, scale=0.05)
    if getattr(trainer, "baseline_head", None) is not None:
        perturb(trainer.baseline_head, seed=3, scale=0.05)
    return trainer


def one_step(trainer, num_pairs: int = 8) -> tuple:
    batch = collated_batch(trainer, num_pairs)
    trainer._metrics["train"].clear()
    trainer.model.train()
    loss, grads = loss_and_grads(trainer, batch)
    return (loss, grads), {key: values[-1] for key, values in trainer._metrics["train"].items()}, batch


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_packed_step_equals_padded_step(case, tiny_model_path, tiny_tokenizer, train_subset, guidance_path, tmp_path):
    runs = {}
    for padding_free in (False, True):
        trainer = step_trainer(
            case,
            padding_free,
            tiny_model_path,
            tiny_tokenizer,
            train_subset,
            guidance_path,
            tmp_path / str(padding_free),
        )
        runs[padding_free] = one_step(trainer)
    (padded, padded_metrics, padded_batch), (packed, packed_metrics, packed_batch) = runs[False], runs[True]

    # The packed batch is one row of the real tokens, with the sequences' boundaries
    real_tokens = int(padded_batch["attention_mask"].sum())
    assert packed_batch["input_ids"].shape == (1, real_tokens) < padded_batch["input_ids"].shape
    assert packed_batch["cu_seq_lens"].tolist()[-1] == real_tokens

    assert_same_loss_and_grads(packed, padded)
    assert packed_metrics.keys() == padded_metrics.keys()
    for key, value in padded_metrics.items():
        assert math.isclose(packed_metrics[key], value, rel_tol=EQUIVALENCE_RTOL, abs_tol=1e-12), key
    # The padding the packed step did not compute: 1 − real tokens / the padded layout's positions, logged both ways
    rows, length = padded_batch["input_ids"].shape
    assert padded_metrics["padding/fraction"] == pytest.approx(1 - real_tokens / (rows * length), abs=1e-12)
    assert padded_metrics["padding/fraction"] > 0.05  # the comparison is about something


def test_attention_across_sequences_would_be_caught(
    tiny_model_path, tiny_tokenizer, train_subset, guidance_path, monkeypatch
):
    """The control of the equivalence test: the same packed row, the same positions, but attention over the whole row
    (the boundaries not given, and an all-ones mask, so that transformers does not infer them from `position_ids`
    either) gives another loss."""
    trainer = step_trainer("tdpo2", True, tiny_model_path, tiny_tokenizer, train_subset, guidance_path, "unused")
    batch = collated_batch(trainer, 8)
    token_batch = TokenBatch.from_inputs(batch)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        crossing = {key: value for key, value in batch.items() if key != "cu_seq_lens"}
        crossing["attention_mask"] = torch.ones_like(batch["input_ids"])
        monkeypatch.setattr(TokenBatch, "from_inputs", classmethod(lambda cls, inputs: token_batch))
        crossing_loss = trainer.compute_loss(trainer.model, crossing)
    assert abs(crossing_loss - loss) > 1e-3


# ------------------------------------------------------------------------------------------------------- training


def train_args(config_class, output_dir, **overrides):
    """Plain SGD, no clipping, float64: a wrongly scaled or wrongly attended gradient shows in the parameters."""
    settings = dict(
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=0.1,
        optim="sgd",
        max_grad_norm=0.0,
        model_init_kwargs=FLOAT64_MODEL,
    )
    return fast_args(output_dir, config_class, **{**settings, **overrides})


GA_CASES = {
    "tdpo2_cached": (TDPOTrainer, TDPOConfig, dict(precompute_ref_log_probs=True), False),
    "tgdpo_precomputed": (TGDPOTrainer, TGDPOConfig, dict(alpha=5.0, precompute_ref_log_probs=True), True),
    "tbpo_q": (TBPOTrainer, TBPOConfig, dict(variant="tbpo_q", baseline_hidden_size=32), False),
}


@pytest.mark.parametrize("case", list(GA_CASES))
def test_packed_gradient_accumulation_matches_padded_full_batches(
    case, tiny_model_path, tiny_tokenizer, default_dataset, guidance_path, tmp_path
):
    trainer_class, config_class, config, uses_guidance = GA_CASES[case]
    pairs = default_dataset["train"].select(range(16))
    updates, logs = {}, {}
    for padding_free, batch_size, accumulation in ((False, 4, 1), (True, 2, 2)):
        args = train_args(
            config_class,
            tmp_path / str(padding_free),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            padding_free=padding_free,
            **config,
        )
        extra = {"guidance_model": guidance_path} if uses_guidance else {}
        trainer = trainer_class(
            model=tiny_model_path, args=args, train_dataset=pairs, processing_class=tiny_tokenizer, **extra
        )
        before = snapshot(model_parameters(trainer, trainable_only=True))
        trainer.train()
        after = snapshot(model_parameters(trainer, trainable_only=True))
        updates[padding_free] = {name: after[name] - before[name] for name in before}
        logs[padding_free] = logged_steps(trainer)
    for name, update in updates[False].items():
        assert update.norm() > 0, f"{name} did not move: the comparison would prove nothing"
        rtol = HEAD_RTOL if name.startswith("baseline_head.") else EQUIVALENCE_RTOL
        assert_relatively_close(updates[True][name], update, rtol, f"{name}: packed 2 x 2 against padded 4 x 1")
    assert [log["loss"] for log in logs[True]] == pytest.approx([log["loss"] for log in logs[False]], rel=1e-6)


def test_a_resumed_packed_run_is_the_uninterrupted_run(tiny_model_path, tiny_tokenizer, default_dataset, tmp_path):
    """Six packed steps with the reference cache and attention dropout (the RNG matters), against three, a
    checkpoint, and three resumed: bitwise the same losses and parameters."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attention_dropout=0.1)
    model_path = tmp_path / "dropout-model"
    model.save_pretrained(model_path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(model_path)
    pairs = default_dataset["train"].select(range(16))

    def build(output_dir):
        args = fast_args(
            output_dir,
            TDPOConfig,
            per_device_train_batch_size=4,
            max_steps=6,
            learning_rate=5e-3,
            save_strategy="steps",
            save_steps=3,
            disable_dropout=False,
            padding_free=True,
            precompute_ref_log_probs=True,
        )
        return TDPOTrainer(model=str(model_path), args=args, train_dataset=pairs, processing_class=tiny_tokenizer)

    full = build(tmp_path / "full")
    full.train()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = build(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    full_logs, resumed_logs = logged_steps(full), logged_steps(resumed)
    assert [log["step"] for log in resumed_logs] == list(range(1, 7))
    for key in ("loss", "grad_norm", "kl/chosen", "padding/fraction"):
        assert [log[key] for log in resumed_logs] == [log[key] for log in full_logs], key
    for name, value in snapshot(model_parameters(full, trainable_only=True)).items():
        assert torch.equal(resumed.model.get_parameter(name).detach(), value), name


# ------------------------------------------------------------------------------------------------------ attention


def test_packed_attention_runs_per_sequence_without_a_mask(tiny_model_path, tiny_tokenizer, train_subset, monkeypatch):
    """The sdpa model is switched to the per-sequence sdpa, which gets no mask (none is built: its cost would be
    T x T) and the boundaries of the batch's sequences."""
    trainer = build_trainer(
        TDPOTrainer, tiny_model_path, tiny_tokenizer, train_subset, "unused", None, padding_free=True
    )
    assert trainer.model.config._attn_implementation == PACKED_SDPA
    calls = []
    original = packing.packed_sdpa_attention_forward

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append((attention_mask, kwargs.get("cu_seq_lens_q"), query.shape))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(packing.AttentionInterface._global_mapping, PACKED_SDPA, recording)
    batch = collated_batch(trainer, 4)
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    assert calls, "the per-sequence attention was not called"
    for attention_mask, boundaries, shape in calls:
        assert attention_mask is None
        assert boundaries.tolist() == batch["cu_seq_lens"].tolist()
        assert shape[2] == batch["input_ids"].size(1)  # the packed row, not a padded batch
    # An unpacked call (generation, a padded forward) is plain sdpa with its mask
    calls.clear()
    with torch.no_grad():
        trainer.model(
            input_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]])
        )
    assert calls and all(boundaries is None for _, boundaries, _ in calls)


def test_flash_attention_gets_the_varlen_arguments_and_no_mask(
    tiny_model_path, tiny_tokenizer, train_subset, guidance_path, monkeypatch
):
    """FlashAttention's varlen path cannot run on CPU, so a stand-in with its contract takes its place: it must get no
    attention mask (FlashAttention would take an all-ones mask as one sequence over the whole row) and the boundaries
    with their maximum length, as transformers' `_flash_attention_forward` expects them; given those, running each
    sequence on its own gives the padded step's loss."""
    calls = []

    def varlen_stand_in(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
    ):
        calls.append((attention_mask, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"]))
        return packing.packed_sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)

    name = "test_varlen_stand_in"  # a name without "flash": transformers would look for a hub kernel
    packing.AttentionInterface.register(name, varlen_stand_in)
    real_check = packing._is_flash_attention
    monkeypatch.setattr(
        packing, "_is_flash_attention", lambda implementation: implementation == name or real_check(implementation)
    )
    padded = step_trainer("tdpo2", False, tiny_model_path, tiny_tokenizer, train_subset, guidance_path, "unused")
    packed = step_trainer("tdpo2", True, tiny_model_path, tiny_tokenizer, train_subset, guidance_path, "unused")
    for model in (packed.model, packed.ref_model):
        set_attn_implementation(model, name)
    batch = collated_batch(packed, 8)
    with torch.no_grad():
        loss = packed.compute_loss(packed.model, batch)
        expected = padded.compute_loss(padded.model, collated_batch(padded, 8))
    assert calls
    lengths = batch["cu_seq_lens"][1:] - batch["cu_seq_lens"][:-1]
    for attention_mask, boundaries_q, boundaries_k, max_length in calls:
        assert attention_mask is None
        assert boundaries_q.tolist() == boundaries_k.tolist() == batch["cu_seq_lens"].tolist()
        assert boundaries_q.dtype == torch.int32 and max_length == int(lengths.max())
    assert_relatively_close(loss, expected, EQUIVALENCE_RTOL, "loss")


def test_attention_that_cannot_run_per_sequence_is_refused(tiny_model_path, tiny_tokenizer, train_subset):
    with pytest.raises(ValueError) as error:
        build_trainer(
            TDPOTrainer,
            tiny_model_path,
            tiny_tokenizer,
            train_subset,
            "unused",
            None,
            padding_free=True,
            model_init_kwargs={"attn_implementation": "eager"},
        )
    message = str(error.value)
    assert "policy model uses 'eager'" in message and "attn_implementation='sdpa'" in message
    assert "padding_free=False" in message


def test_a_sliding_window_under_sdpa_is_refused(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa")
    model.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding window of 16 tokens.*flash_attention_2"):
        packing.prepare_model_for_packing(model, "policy")


def test_a_custom_collator_is_refused(tiny_model_path, tiny_tokenizer, train_subset):
    class MyCollator(DataCollatorForPreference):
        pass

    with pytest.raises(ValueError, match=r"custom data collator was given \(MyCollator\).*Subclass"):
        build_trainer(
            TDPOTrainer,
            tiny_model_path,
            tiny_tokenizer,
            train_subset,
            "unused",
            {"data_collator": MyCollator(pad_token_id=tiny_tokenizer.pad_token_id)},
            padding_free=True,
        )


def test_the_config_keeps_the_users_value(tiny_model_path, tiny_tokenizer, train_subset):
    """DPOTrainer 1.16 would set its `padding_free` off; ours keeps the user's value on the config and the trainer."""
    trainer = build_trainer(
        TDPOTrainer, tiny_model_path, tiny_tokenizer, train_subset, "unused", None, padding_free=True
    )
    assert trainer.args.padding_free is True and trainer.padding_free is True
    assert trainer.data_collator.padding_free is True
