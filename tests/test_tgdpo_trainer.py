"""TGDPOTrainer: the guidance changing the loss, the loss of a real batch against a naive full-logits computation,
on-the-fly vs precomputed token rewards (and reference log-probs), the per-token collator, validation of precomputed
columns, training from the precompute script's output (LoRA), its own metric and configuration errors. What every
token-level trainer does (DPO equivalence at α = 0 or with the reference as guidance, trailing padding, logged
metrics, training runs, save/reload, shared configuration errors) is in `tests/test_trainer_contract.py`. Invariant numbers refer to docs/algorithms.md §6; the hand-computed 2-token case (13) and the pure
monotonicity check (14) are in `tests/test_losses.py`."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import load_dataset
from peft import LoraConfig
from testing_utils import (
    EQUIVALENCE_RTOL,
    FLOAT64_MODEL,
    TRAINER_CASES,
    assert_relatively_close,
    assert_same_loss_and_grads,
    changed_parameters,
    collated_batch,
    fast_args,
    last_metrics,
    logged_losses,
    loss_and_grads,
    model_parameters,
    perturbed_copy,
    saved_in_float64,
    snapshot,
)
from transformers import AutoModelForCausalLM

from trl_tokenpref import TGDPOConfig, TGDPOTrainer
from trl_tokenpref.tgdpo import DataCollatorForTGDPO
from trl_tokenpref.tiny import build_tiny_model
from trl_tokenpref.token_batch import TokenBatch


REPO_ROOT = Path(__file__).resolve().parent.parent
ALPHA = TRAINER_CASES["tgdpo"].config["alpha"]  # 5: large enough that a misplaced token reward shows (see there)
NEW_METRICS = TRAINER_CASES["tgdpo"].own_metrics
tgdpo_args = functools.partial(fast_args, config_class=TGDPOConfig)


@pytest.fixture(scope="module")
def policy_path(tiny_model_path, tmp_path_factory) -> str:
    """The model to train: the reference (`tiny_model_path`) moved away, so that ρ_t ≠ 0 from the first step."""
    return perturbed_copy(tiny_model_path, tmp_path_factory.mktemp("policy"), seed=1, scale=0.05)


@pytest.fixture(scope="module")
def precomputed(token_rewards_script, default_dataset, tiny_model_path, guidance_path, tmp_path_factory):
    """The precompute script run in-process on local JSON Lines files (32 train and 8 test pairs), written as JSON
    Lines and loaded back: the whole file round trip a user goes through. The script loads float64 copies of the
    models (`--dtype auto`), as the equivalence tests below run the trainers in float64."""
    data_dir = tmp_path_factory.mktemp("data")
    default_dataset["train"].select(range(32)).to_json(str(data_dir / "train.jsonl"))
    default_dataset["test"].select(range(8)).to_json(str(data_dir / "test.jsonl"))
    output_dir = tmp_path_factory.mktemp("token_rewards")
    models = {
        "--guidance_model": saved_in_float64(guidance_path, tmp_path_factory.mktemp("guidance64")),
        "--ref_model": saved_in_float64(tiny_model_path, tmp_path_factory.mktemp("ref64")),
    }
    paths = token_rewards_script.main(
        [*(item for option in models.items() for item in option), "--tokenizer", tiny_model_path, "--dtype", "auto"]
        + ["--dataset_path", str(data_dir), "--output_dir", str(output_dir), "--output_format", "jsonl"]
        # 32 and 8 rows: the last batch is partial (gathering must not drop its rejected half)
        + ["--beta", "0.1", "--batch_size", "3"]
    )
    info = json.loads((output_dir / "token_rewards_info.json").read_text())
    return load_dataset("json", data_files=paths), info


def tgdpo(model_path, tokenizer, dataset, tmp_path, ref_path=None, guidance=None, **config):
    """A float64 TGDPOTrainer training `model_path`, with an explicit reference loaded from `ref_path` (if given)."""
    ref_model = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float64) if ref_path else None
    name = "-".join(f"{key}={value}" for key, value in config.items()) or "default"
    return TGDPOTrainer(
        model=model_path,
        ref_model=ref_model,
        guidance_model=guidance,
        args=tgdpo_args(
            tmp_path / name,
            alpha=config.pop("alpha", ALPHA),
            model_init_kwargs=FLOAT64_MODEL,
            **config,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


class TestEquivalenceWithDPO:
    def test_guidance_changes_the_loss(
        self, policy_path, guidance_path, tiny_model_path, tiny_tokenizer, train_subset, tmp_path
    ):
        """The control of `test_trainer_contract.py::test_loss_and_gradient_equal_trl_dpo` (α = 0, or the reference as
        guidance, is DPO): with α > 0 and a guidance model unlike the reference, the loss is not DPO's."""
        common = dict(ref_path=tiny_model_path, guidance=guidance_path)
        losses = [
            loss_and_grads(trainer, collated_batch(trainer))[0]
            for trainer in (
                tgdpo(policy_path, tiny_tokenizer, train_subset, tmp_path, alpha=0.0, **common),
                tgdpo(policy_path, tiny_tokenizer, train_subset, tmp_path, alpha=ALPHA, **common),
            )
        ]
        assert abs(losses[0] - losses[1]) > 1e-3


class TestLoss:
    def test_matches_naive_full_logits_computation(
        self, policy_path, guidance_path, tiny_model_path, tiny_tokenizer, train_subset, tmp_path
    ):
        """Invariants 12 and 13 on a real batch: the loss and the policy gradient equal
        −log σ(β Σ_t (1 + α r̂^w_t) ρ^w_t − β Σ_t (1 − α r̂^l_t) ρ^l_t) computed from the three models' full logits,
        with r̂ = β (log π_guide − log π_ref) a constant; no gradient reaches the reference or the guidance model.
        The naive computation is float64 throughout; the trainer's differs by its float32 statistics."""
        beta = 0.2
        trainer = tgdpo(policy_path, tiny_tokenizer, train_subset, tmp_path, tiny_model_path, guidance_path, beta=beta)
        batch = collated_batch(trainer)
        loss, grads = loss_and_grads(trainer, batch)

        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["input_ids"][:, 1:].unsqueeze(-1)
        mask = batch["completion_mask"][:, 1:].bool()

        def label_log_probs(model):
            logits = model(**inputs).logits[:, :-1]
            assert logits.dtype == torch.float64
            return F.log_softmax(logits, dim=-1).gather(-1, labels).squeeze(-1)

        with torch.no_grad():
            ref = label_log_probs(trainer.ref_model)
            rewards = beta * (label_log_probs(trainer.guidance_model) - ref)
        rho = torch.where(mask, label_log_probs(trainer.model) - ref, 0.0)
        weights = torch.where(mask, torch.cat([1 + ALPHA * rewards.chunk(2)[0], 1 - ALPHA * rewards.chunk(2)[1]]), 0.0)
        chosen, rejected = (weights * rho).sum(-1).chunk(2)
        naive = -F.logsigmoid(beta * (chosen - rejected)).mean()
        assert (rewards[mask].abs() > 1e-3).float().mean() > 0.5  # the guidance is not trivial
        params = dict(trainer.model.named_parameters())
        naive_grads = torch.autograd.grad(naive, list(params.values()))
        assert_same_loss_and_grads((loss, grads), (naive.detach(), dict(zip(params, naive_grads))))

        # Invariant 12: nothing reaches the reference or the guidance model
        trainer.compute_loss(trainer.model, batch).backward()
        for frozen in (trainer.ref_model, trainer.guidance_model):
            assert all(param.grad is None for param in frozen.parameters())
        assert not any(param.requires_grad for param in trainer.guidance_model.parameters())

    def test_monotone_in_precomputed_rewards(
        self, policy_path, tiny_model_path, tiny_tokenizer, precomputed, tmp_path
    ):
        """Invariant 14 through the trainer: raising r̂ on chosen tokens with ρ > 0, or on rejected tokens with ρ > 0,
        lowers the loss."""
        trainer = tgdpo(policy_path, tiny_tokenizer, precomputed[0]["train"], tmp_path, tiny_model_path)
        batch = collated_batch(trainer)
        with torch.no_grad():
            stats = trainer._policy_forward(
                trainer.model, batch, ref_hidden_states=trainer._reference_hidden_states(batch)
            ).stats
            # Flat per-token values, and the collated columns in the same order: the chosen tokens, then the rejected
            rho = stats.log_probs - stats.ref_log_probs
            num_chosen = batch["chosen_token_rewards"].numel()
            base = trainer.compute_loss(trainer.model, batch)
            for column, half in (("chosen_token_rewards", 0), ("rejected_token_rewards", 1)):
                positive = rho.split([num_chosen, rho.numel() - num_chosen])[half] > 0
                assert positive.any()
                bumped = dict(batch, **{column: batch[column] + 0.1 * positive})
                assert trainer.compute_loss(trainer.model, bumped) < base

    def test_negative_weight_metric_and_clamp(
        self, policy_path, guidance_path, tiny_model_path, tiny_tokenizer, train_subset, tmp_path
    ):
        """`token_rewards/negative_weights` counts weights 1 ± α r̂ < 0 (sign flips, docs/algorithms.md §2.5 a);
        `min_token_weight=0` removes them and changes the loss. Which metrics TGDPO logs: test_trainer_contract.py."""
        results = {}
        for name, config in {"free": {}, "clamped": {"min_token_weight": 0.0, "max_token_weight": 3.0}}.items():
            trainer = tgdpo(
                policy_path,
                tiny_tokenizer,
                train_subset,
                tmp_path,
                tiny_model_path,
                guidance_path,
                alpha=50.0,
                **config,
            )
            trainer.model.train()
            with torch.no_grad():
                loss = trainer.compute_loss(trainer.model, collated_batch(trainer))
            results[name] = (loss, last_metrics(trainer))
        assert results["free"][1]["token_rewards/negative_weights"] > 0.05
        assert results["clamped"][1]["token_rewards/negative_weights"] == 0.0
        assert not torch.allclose(results["free"][0], results["clamped"][0])


class TestPrecomputed:
    def test_on_the_fly_and_precomputed_give_the_same_loss(
        self, policy_path, guidance_path, tiny_model_path, tiny_tokenizer, precomputed, tmp_path
    ):
        """The same batch, four ways: guidance model on the fly; precomputed reference log-probs and guidance rewards
        (`precompute_ref_log_probs=True`); the script's reward columns with the reference on the fly; and the script's
        columns with precomputed reference log-probs (a DPO-cost step). Same loss and gradient in float64, to the
        rounding of the float32 statistics (`testing_utils.EQUIVALENCE_RTOL`)."""
        dataset = precomputed[0]["train"]
        without_columns = dataset.remove_columns(["chosen_token_rewards", "rejected_token_rewards"])
        common = dict(model_path=policy_path, tokenizer=tiny_tokenizer, tmp_path=tmp_path, ref_path=tiny_model_path)
        trainers = {
            "on_the_fly": tgdpo(dataset=without_columns, guidance=guidance_path, **common),
            "precompute_all": tgdpo(
                dataset=without_columns,
                guidance=guidance_path,
                precompute_ref_log_probs=True,
                precompute_ref_batch_size=5,  # a partial last batch
                **common,
            ),
            "columns": tgdpo(dataset=dataset, **common),
            "columns_precompute_ref": tgdpo(dataset=dataset, precompute_ref_log_probs=True, **common),
        }
        # Nothing but the policy's forward is left to a step that has every per-token column
        assert trainers["columns_precompute_ref"].guidance_model is None
        batch = collated_batch(trainers["columns_precompute_ref"])
        assert {"chosen_token_rewards", "ref_chosen_token_logps"} <= batch.keys()
        expected = loss_and_grads(trainers["on_the_fly"], collated_batch(trainers["on_the_fly"]))
        for trainer in trainers.values():
            assert_same_loss_and_grads(loss_and_grads(trainer, collated_batch(trainer)), expected)
        # Every row, the partial last batches included: the in-trainer precompute stores the script's rewards, and the
        # same reference log-probs whether or not it also computes the rewards
        stored, reference_only = (
            trainers["precompute_all"].train_dataset,
            trainers["columns_precompute_ref"].train_dataset,
        )
        for side in ("chosen", "rejected"):
            for row, (mine, script) in enumerate(
                zip(stored[f"{side}_token_rewards"], dataset[f"{side}_token_rewards"], strict=True)
            ):
                assert_relatively_close(torch.tensor(mine), torch.tensor(script), EQUIVALENCE_RTOL, f"{side} {row}")
            column = f"ref_{side}_token_logps"
            for row, (mine, other) in enumerate(zip(stored[column], reference_only[column], strict=True)):
                assert_relatively_close(torch.tensor(mine), torch.tensor(other), EQUIVALENCE_RTOL, f"{column} {row}")

    def test_peft_precompute_uses_the_adapter_free_reference(
        self, tiny_model_path, guidance_path, tiny_tokenizer, train_subset, tmp_path
    ):
        """With LoRA the reference is the model with its adapter disabled, in the precompute pass too: precomputed and
        on-the-fly reference log-probs and rewards give the same loss and gradient (a random, non-zero adapter makes
        the policy differ from the reference)."""
        results = []
        for precompute in (False, True):
            trainer = TGDPOTrainer(
                model=tiny_model_path,
                guidance_model=guidance_path,
                args=tgdpo_args(
                    tmp_path / str(precompute),
                    model_init_kwargs=FLOAT64_MODEL,
                    alpha=ALPHA,
                    precompute_ref_log_probs=precompute,
                    precompute_ref_batch_size=5,
                ),
                train_dataset=train_subset,
                processing_class=tiny_tokenizer,
                peft_config=LoraConfig(
                    r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
                ),
            )
            results.append(loss_and_grads(trainer, collated_batch(trainer)))
        assert abs(results[0][0] - math.log(2)) > 1e-3
        assert_same_loss_and_grads(results[1], results[0])

    def test_script_output_and_info(self, precomputed, tiny_model_path, tiny_tokenizer, tmp_path):
        """One finite value per completion token as the trainer tokenizes it, and the info file records β."""
        dataset, info = precomputed
        assert info["beta"] == 0.1 and info["max_length"] == 1024 and set(info["splits"]) == {"train", "test"}
        trainer = tgdpo(tiny_model_path, tiny_tokenizer, dataset["train"], tmp_path)
        for row in trainer.train_dataset.select(range(8)):
            for side in ("chosen", "rejected"):
                values = row[f"{side}_token_rewards"]
                assert len(values) == len(row[f"{side}_ids"]) and all(math.isfinite(v) for v in values)
        # The columns survive `remove_unused_columns=True` and reach the batch
        assert "rejected_token_rewards" in next(iter(trainer.get_train_dataloader()))

    def test_truncated_values_and_max_length(self, token_rewards_script, train_subset, tiny_model_path, tmp_path):
        """Values computed with `max_length=20` have nulls for the truncated tokens: training at `max_length=20`
        accepts them, training at the default `max_length` refuses them, naming a row."""
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        train_subset.select(range(8)).to_json(str(data_dir / "train.jsonl"))
        paths = token_rewards_script.main(
            ["--guidance_model", tiny_model_path, "--ref_model", tiny_model_path, "--dataset_path", str(data_dir)]
            + ["--output_dir", str(tmp_path / "out"), "--max_length", "20"]
        )
        from datasets import load_from_disk

        dataset = load_from_disk(str(tmp_path / "out"))["train"]
        assert paths == {"train": str(tmp_path / "out" / "train")}
        assert any(None in row["chosen_token_rewards"] for row in dataset)
        trainer = TGDPOTrainer(
            model=tiny_model_path, args=tgdpo_args(tmp_path / "ok", max_length=20), train_dataset=dataset
        )
        with torch.no_grad():
            batch = collated_batch(trainer, 8)
            torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), torch.tensor(math.log(2)))
        with pytest.raises(
            ValueError, match=r"Row \d+ of the train dataset: `\w+_token_rewards` has no value \(null\)"
        ):
            TGDPOTrainer(model=tiny_model_path, args=tgdpo_args(tmp_path / "bad"), train_dataset=dataset)
        # An IterableDataset cannot be checked before training: the collator refuses the batch instead
        trainer = TGDPOTrainer(
            model=tiny_model_path, args=tgdpo_args(tmp_path / "iterable"), train_dataset=dataset.to_iterable_dataset()
        )
        with pytest.raises(ValueError, match="missing or non-finite value in `chosen_token_rewards`"):
            trainer.train()

    @pytest.mark.parametrize(
        "corrupt, message",
        [
            (
                lambda row: row["chosen_token_rewards"][:-1],
                r"Row 3 of the train dataset: `chosen_token_rewards` has \d+ ",
            ),
            (lambda row: row["chosen_token_rewards"][:-1] + [math.nan], "Row 3 .* holds nan at completion token"),
            (lambda row: None, r"Row 3 .*`chosen_token_rewards` has no value \(null\), but"),
        ],
    )
    def test_bad_rows_are_rejected(self, corrupt, message, precomputed, tiny_model_path, tiny_tokenizer, tmp_path):
        dataset = precomputed[0]["train"]

        def edit(row, index):
            if index == 3:
                row["chosen_token_rewards"] = corrupt(row)
            return row

        with pytest.raises(ValueError, match=message):
            tgdpo(tiny_model_path, tiny_tokenizer, dataset.map(edit, with_indices=True), tmp_path)

    def test_sources_are_checked(self, precomputed, guidance_path, tiny_model_path, tiny_tokenizer, tmp_path):
        dataset = precomputed[0]["train"]
        with pytest.raises(ValueError, match="needs token rewards .* no source"):
            tgdpo(
                tiny_model_path,
                tiny_tokenizer,
                dataset.remove_columns("chosen_token_rewards").remove_columns("rejected_token_rewards"),
                tmp_path,
            )
        with pytest.raises(ValueError, match="has the column `chosen_token_rewards` but not its counterpart"):
            tgdpo(tiny_model_path, tiny_tokenizer, dataset.remove_columns("rejected_token_rewards"), tmp_path)
        with pytest.raises(ValueError, match="ambiguous"):
            tgdpo(tiny_model_path, tiny_tokenizer, dataset, tmp_path, guidance=guidance_path)
        with pytest.raises(ValueError, match="Give the guidance model in one place only"):
            TGDPOTrainer(
                model=tiny_model_path,
                guidance_model=guidance_path,
                args=tgdpo_args(tmp_path, guidance_model_name_or_path=guidance_path),
                train_dataset=dataset,
            )


class TestCollator:
    def test_values_are_collated_flat_and_truncated_like_ids(self):
        """Each side's values come flat, row by row, one per completion token that training reads (the order of the
        batch's labelled tokens, `TokenBatch`); truncation (both modes) cuts the values exactly as the ids, and a
        truncated-away value may be missing (None). The same for a packed batch."""
        examples = [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "chosen_token_rewards": [0.1, 0.2],
             "rejected_token_rewards": [0.3]},
            {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12],
             "chosen_token_rewards": [0.4], "rejected_token_rewards": [0.5, 0.6, None]},
        ]  # fmt: skip
        for padding_free in (False, True):
            output = DataCollatorForTGDPO(pad_token_id=0, max_length=4, padding_free=padding_free)(examples)
            if not padding_free:
                assert output["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 0], [1, 2, 3, 6], [7, 8, 10, 11]]
            torch.testing.assert_close(output["chosen_token_rewards"], torch.tensor([0.1, 0.4]))
            torch.testing.assert_close(output["rejected_token_rewards"], torch.tensor([0.3, 0.5, 0.6]))
            assert TokenBatch.from_inputs(output).labels.tolist() == [4, 9, 6, 10, 11]
        # keep_end cuts the start: here the whole prompt and the first completion token of the rejected row 2
        keep_end = DataCollatorForTGDPO(pad_token_id=0, max_length=2, truncation_mode="keep_end")
        examples[1]["rejected_token_rewards"] = [None, 0.5, 0.6]
        output = keep_end(examples)
        assert output["input_ids"].tolist() == [[4, 5], [8, 9], [3, 6], [11, 12]]
        torch.testing.assert_close(output["chosen_token_rewards"], torch.tensor([0.2, 0.4]))
        # Row 2 of rejected is [11, 12]: 11 sits at position 0 (no label), 12's value 0.6 is read
        torch.testing.assert_close(output["rejected_token_rewards"], torch.tensor([0.3, 0.6]))
        assert TokenBatch.from_inputs(output).labels.tolist() == [5, 9, 6, 12]

    def test_bad_values_are_rejected(self):
        example = {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}
        collator = DataCollatorForTGDPO(pad_token_id=0)
        with pytest.raises(ValueError, match="Example 0 of this batch has 1 values in `chosen_token_rewards` but 2"):
            collator([dict(example, chosen_token_rewards=[0.1], rejected_token_rewards=[0.2])])
        with pytest.raises(ValueError, match="missing or non-finite value in `rejected_token_rewards`"):
            collator([dict(example, chosen_token_rewards=[0.1, 0.2], rejected_token_rewards=[math.inf])])


class TestTraining:
    def test_lora_from_the_script_output(self, tiny_model_path, tiny_tokenizer, precomputed, tmp_path):
        """The precompute script's output trains (with precomputed reference log-probs: a DPO-cost step), with LoRA:
        only the adapter moves."""
        dataset = precomputed[0]
        trainer = TGDPOTrainer(
            model=tiny_model_path,
            args=tgdpo_args(
                tmp_path / "run", alpha=0.5, learning_rate=2e-2, max_steps=12, precompute_ref_log_probs=True
            ),
            train_dataset=dataset["train"],
            eval_dataset=dataset["test"],
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
        assert trainer.ref_model is None and trainer.guidance_model is None
        before = snapshot(model_parameters(trainer))
        trainer.train()
        losses = logged_losses(trainer)
        assert sum(losses[-4:]) / 4 < losses[0] - 0.05
        trainable = set(model_parameters(trainer, trainable_only=True))
        assert changed_parameters(before, model_parameters(trainer)) == trainable and all(
            "lora_" in n for n in trainable
        )
        assert NEW_METRICS <= trainer.state.log_history[-2].keys()
        assert "eval_token_rewards/rejected" in trainer.evaluate()


class TestConfigAndErrors:
    def test_defaults(self, tmp_path):
        args = TGDPOConfig(output_dir=str(tmp_path), use_cpu=True)
        assert args.alpha == 0.5 and args.beta == 0.1 and args.token_weight_clamp is None
        assert args.guidance_model_name_or_path is None
        assert TGDPOConfig(output_dir=str(tmp_path), use_cpu=True, min_token_weight=0.0).token_weight_clamp == (
            0.0,
            math.inf,
        )
        # Precomputed reference log-probs are allowed (unlike TDPO), and init kwargs may come as JSON from the CLI
        args = TGDPOConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            precompute_ref_log_probs=True,
            guidance_model_init_kwargs='{"dtype": "bfloat16"}',
        )
        assert args.guidance_model_init_kwargs == {"dtype": "bfloat16"}
        # `none` from the command line clears a path set by a recipe
        assert (
            TGDPOConfig(
                output_dir=str(tmp_path), use_cpu=True, guidance_model_name_or_path="None"
            ).guidance_model_name_or_path
            is None
        )

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(alpha=-0.1), "`alpha` must be a finite number >= 0"),
            (dict(alpha=math.inf), "`alpha` must be a finite number >= 0"),
            (dict(min_token_weight=2.0, max_token_weight=1.0), "must not exceed `max_token_weight`"),
            (dict(max_token_weight=math.nan), "`max_token_weight` must be a finite number"),
        ],
    )
    def test_invalid_values(self, kwargs, message, tmp_path):
        with pytest.raises(ValueError, match=message):
            TGDPOConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)

    def test_guidance_model_errors(self, tiny_model_path, tiny_tokenizer, train_subset, tmp_path):
        other_vocab = build_tiny_model(tmp_path / "other", vocab_size=400)
        for guidance in (other_vocab, AutoModelForCausalLM.from_pretrained(other_vocab)):
            with pytest.raises(ValueError, match="vocabulary has 400 entries but the policy's has 512"):
                tgdpo(tiny_model_path, tiny_tokenizer, train_subset, tmp_path, guidance=guidance)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        with pytest.raises(ValueError, match="`guidance_model` is the model being trained"):
            TGDPOTrainer(model=model, guidance_model=model, args=tgdpo_args(tmp_path), train_dataset=train_subset)
