"""TGDPO's guards against training the wrong thing or failing late: token rewards computed at another β, a guidance
model equal to the reference, a guidance path that does not exist, a LoRA adapter folder as the guidance model, the
precompute script writing over its input, and recipe values (`alpha: null`, a cleared guidance path)."""

import logging
from pathlib import Path

import pytest
import torch
import transformers
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from testing_utils import fast_args
from transformers import AutoModelForCausalLM

from trl_tokenpref import TDPOConfig, TGDPOConfig, TGDPOTrainer


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_with_rewards(token_rewards_script, default_dataset, tiny_model_path, guidance_path, tmp_path_factory):
    """Token rewards at β = 0.1 written by the script with `save_to_disk`, with its info file beside them."""
    root = tmp_path_factory.mktemp("rewards")
    default_dataset["train"].select(range(8)).save_to_disk(str(root / "input"))
    token_rewards_script.main(
        ["--guidance_model", guidance_path, "--ref_model", tiny_model_path, "--dataset_path", str(root / "input"),
         "--output_dir", str(root / "output"), "--beta", "0.1", "--max_length", "0"]
    )  # fmt: skip
    return root / "output"


class TestTokenRewardsBeta:
    def test_training_at_another_beta_is_refused(self, data_with_rewards, tiny_model_path, tiny_tokenizer, tmp_path):
        dataset = load_from_disk(str(data_with_rewards))["train"]
        with pytest.raises(ValueError, match=r"computed at beta=0.1 .* but training uses beta=0.5"):
            TGDPOTrainer(
                model=tiny_model_path,
                args=fast_args(tmp_path, TGDPOConfig, beta=0.5),
                train_dataset=dataset,
                processing_class=tiny_tokenizer,
            )

    def test_training_at_the_same_beta_is_accepted(self, data_with_rewards, tiny_model_path, tiny_tokenizer, tmp_path):
        dataset = load_from_disk(str(data_with_rewards))["train"]
        trainer = TGDPOTrainer(
            model=tiny_model_path,
            args=fast_args(tmp_path, TGDPOConfig, beta=0.1),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        assert len(trainer.train_dataset) == 8


def test_the_training_script_reads_beta_beside_json_lines(
    token_rewards_script, default_dataset, tiny_model_path, guidance_path, tmp_path
):
    """JSON Lines loaded with `load_dataset` lose their folder; `scripts/run_tgdpo.py` checks the path it was given."""
    from trl_tokenpref.tgdpo.token_rewards import check_token_rewards_beta

    default_dataset["train"].select(range(4)).to_json(str(tmp_path / "train.jsonl"))
    token_rewards_script.main(
        ["--guidance_model", guidance_path, "--ref_model", tiny_model_path, "--dataset_path", str(tmp_path / "train.jsonl"),
         "--output_dir", str(tmp_path / "out"), "--beta", "0.2", "--output_format", "jsonl"]
    )  # fmt: skip
    for path in (tmp_path / "out", tmp_path / "out" / "train.jsonl"):
        check_token_rewards_beta(str(path), 0.2, "train")
        with pytest.raises(ValueError, match=r"computed at beta=0.2 .* training uses beta=0.1"):
            check_token_rewards_beta(str(path), 0.1, "train")
    check_token_rewards_beta("trl-lib/ultrafeedback_binarized", 0.1, "train")  # a Hub id: nothing to read


def test_guidance_equal_to_the_reference_is_warned(
    tiny_model_path, guidance_path, tiny_tokenizer, default_dataset, tmp_path, caplog
):
    caplog.set_level(logging.WARNING)
    dataset = default_dataset["train"].select(range(4))
    for guidance, warned in ((tiny_model_path, True), (guidance_path, False)):
        caplog.clear()
        TGDPOTrainer(
            model=tiny_model_path,
            guidance_model=guidance,
            args=fast_args(tmp_path, TGDPOConfig),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        messages = " ".join(record.getMessage() for record in caplog.records)
        assert ("same weights as the reference model" in messages) is warned


def refuse_model_loading(monkeypatch) -> None:
    """Make any model load fail the test: a check said to run "before anything loads" must raise first."""

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the check refused the input")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_loading))


def test_missing_guidance_path_is_refused_before_anything_loads(
    tiny_model_path, tiny_tokenizer, default_dataset, tmp_path, monkeypatch
):
    refuse_model_loading(monkeypatch)  # before the policy is loaded and the data tokenized
    with pytest.raises(
        FileNotFoundError, match="The guidance model cannot be loaded: .*no-such-model: no such file or directory"
    ):
        TGDPOTrainer(
            model=tiny_model_path,
            guidance_model=str(tmp_path / "no-such-model"),
            args=fast_args(tmp_path, TGDPOConfig),
            train_dataset=default_dataset["train"],
            processing_class=tiny_tokenizer,
        )


def test_lora_adapter_folder_as_guidance_model(tiny_model_path, tiny_tokenizer, default_dataset, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # a non-zero adapter
    torch.manual_seed(0)
    adapter = get_peft_model(base, lora)
    adapter.save_pretrained(tmp_path / "adapter")
    merged = adapter.merge_and_unload()

    trainer = TGDPOTrainer(
        model=tiny_model_path,
        guidance_model=str(tmp_path / "adapter"),
        args=fast_args(tmp_path, TGDPOConfig),
        train_dataset=default_dataset["train"].select(range(4)),
        processing_class=tiny_tokenizer,
    )
    loaded = dict(trainer.guidance_model.named_parameters())
    for name, param in merged.named_parameters():
        torch.testing.assert_close(loaded[name], param, rtol=0, atol=1e-6)  # merging rounds in float32


def test_script_refuses_models_of_another_vocabulary_and_data_it_cannot_render(
    token_rewards_script, default_dataset, conversational_dataset, tiny_model_path, tiny_tokenizer, tmp_path
):
    """The script's precompute shares the trainers' checks (`checks.check_same_vocabulary`, `check_chat_template`):
    a guidance model with another vocabulary, and conversational rows with a tokenizer without a chat template."""
    import copy

    from trl_tokenpref.tgdpo.token_rewards import compute_token_rewards

    wider = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    wider.resize_token_embeddings(wider.config.vocab_size + 10, mean_resizing=False)
    wider.save_pretrained(tmp_path / "wider")
    default_dataset["train"].select(range(4)).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(
        ValueError,
        match=r"^The guidance model's vocabulary has 522 entries but the reference's has 512 \(the widths of their "
        r"output logits\): .* so the two models must use one tokenizer\. Use a guidance model trained with that",
    ):
        token_rewards_script.main(
            ["--guidance_model", str(tmp_path / "wider"), "--ref_model", tiny_model_path,
             "--tokenizer", tiny_model_path, "--dataset_path", str(tmp_path / "data"),
             "--output_dir", str(tmp_path / "out")]
        )  # fmt: skip

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match=r"^The input dataset is conversational .* has no chat template"):
        compute_token_rewards(
            conversational_dataset["train"].select(range(4)),
            ref_model=model,
            guidance_model=model,
            tokenizer=tokenizer,
            beta=0.1,
            max_length=None,
        )


def test_script_refuses_to_write_over_its_input(
    token_rewards_script, default_dataset, tiny_model_path, tmp_path, monkeypatch
):
    default_dataset["train"].select(range(4)).save_to_disk(str(tmp_path / "data"))
    refuse_model_loading(monkeypatch)  # before any model is loaded
    for output_dir in (tmp_path / "data", tmp_path):
        with pytest.raises(ValueError, match="would overwrite the data it is computed from"):
            token_rewards_script.main(
                ["--guidance_model", tiny_model_path, "--ref_model", tiny_model_path,
                 "--dataset_path", str(tmp_path / "data"), "--output_dir", str(output_dir)]
            )  # fmt: skip


def test_script_help_shows_defaults(token_rewards_script, capsys):
    with pytest.raises(SystemExit):
        token_rewards_script.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for default in ("(default: 0.1)", "(default: 1024)", "(default: float32)", "(default: keep_start)"):
        assert default in help_text


class TestRecipeValues:
    @pytest.mark.parametrize("config_class", [TDPOConfig, TGDPOConfig])
    def test_alpha_null_is_a_clear_error(self, config_class, tmp_path):
        with pytest.raises(ValueError, match=r"`alpha` must be a number >= 0, got null \(None\)"):
            config_class(str(tmp_path), alpha=None, report_to="none", use_cpu=True, bf16=False)

    @pytest.mark.parametrize("value", ["none", "null", "None", ""])
    def test_a_cleared_guidance_path_is_none(self, value, tmp_path):
        assert (
            TGDPOConfig(
                str(tmp_path), guidance_model_name_or_path=value, use_cpu=True, bf16=False
            ).guidance_model_name_or_path
            is None
        )
