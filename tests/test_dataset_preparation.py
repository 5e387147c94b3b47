"""Dataset preparation with DPOTrainer's behaviour where it drops rows, for map-style and streamed datasets alike:
rows whose truncation leaves no completion token are dropped (and named in a warning), a dataset or an epoch with no
trainable row is an error, identical pairs are warned about (TGDPO drops them), and DPOTrainer's tags are kept."""

import logging

import pytest
from datasets import Dataset
from testing_utils import fast_args
from trl import DPOConfig, DPOTrainer

from trl_tokenpref import TBPOConfig, TBPOTrainer, TDPOConfig, TDPOTrainer, TGDPOConfig, TGDPOTrainer


LONG_PROMPT = "the cat sat on the mat and the dog sat on the log " * 3


def mixed_rows(num_short: int = 6, long_rows=(2, 5)) -> dict:
    """Rows with short prompts, and at `long_rows` prompts that alone fill a `max_length` of 16 tokens."""
    prompts = [LONG_PROMPT if i in long_rows else f"Row {i}:" for i in range(num_short)]
    return {
        "prompt": prompts,
        "chosen": [f" good answer {i}" for i in range(num_short)],
        "rejected": [f" bad reply {i}" for i in range(num_short)],
    }


@pytest.fixture
def checks_log(caplog):
    caplog.set_level(logging.WARNING)
    return caplog


def warnings_of(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)


class TestDropsLikeDPOTrainer:
    def test_same_rows_as_dpo_trainer_with_a_warning_naming_them(
        self, tiny_model_path, tiny_tokenizer, tmp_path, checks_log
    ):
        dataset = Dataset.from_dict(mixed_rows())
        prompt_lens = [len(tiny_tokenizer(prompt)["input_ids"]) for prompt in dataset["prompt"]]
        max_length = 16
        assert [i for i, n in enumerate(prompt_lens) if n >= max_length] == [2, 5]  # the premise of this test
        dpo = DPOTrainer(
            model=tiny_model_path,
            args=DPOConfig(str(tmp_path / "dpo"), max_length=max_length, report_to="none", use_cpu=True),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        ours = TDPOTrainer(
            model=tiny_model_path,
            args=fast_args(tmp_path / "tdpo", max_length=max_length),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
        assert (
            ours.train_dataset.select_columns(columns).to_list() == dpo.train_dataset.select_columns(columns).to_list()
        )
        assert len(ours.train_dataset) == 4
        warning = warnings_of(checks_log)
        assert "Dropped 2 of the 6 rows of the train dataset (rows 2, 5)" in warning
        assert f"its prompt alone fills `max_length={max_length}`" in warning

    def test_a_dataset_with_no_trainable_row_is_refused(self, tiny_model_path, tiny_tokenizer, tmp_path):
        dataset = Dataset.from_dict(mixed_rows(num_short=3, long_rows=(0, 1, 2)))
        with pytest.raises(ValueError, match=r"Every row of the train dataset \(3\) keeps no completion token"):
            TDPOTrainer(
                model=tiny_model_path,
                args=fast_args(tmp_path, max_length=16),
                train_dataset=dataset,
                processing_class=tiny_tokenizer,
            )

    def test_streamed_rows_are_dropped_and_counted(self, tiny_model_path, tiny_tokenizer, tmp_path, checks_log):
        dataset = Dataset.from_dict(mixed_rows()).to_iterable_dataset()
        trainer = TDPOTrainer(
            model=tiny_model_path,
            args=fast_args(tmp_path, max_length=16, max_steps=2, per_device_train_batch_size=2),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        trainer.train()
        warning = warnings_of(checks_log)
        assert "Row 2 of the train dataset (an IterableDataset" in warning and "is dropped" in warning
        assert trainer.state.global_step == 2

    def test_a_streamed_epoch_with_no_trainable_row_is_an_error(self, tiny_model_path, tiny_tokenizer, tmp_path):
        dataset = Dataset.from_dict(mixed_rows(num_short=3, long_rows=(0, 1, 2))).to_iterable_dataset()
        trainer = TDPOTrainer(
            model=tiny_model_path,
            args=fast_args(tmp_path, max_length=16, max_steps=2, per_device_train_batch_size=2),
            train_dataset=dataset,
            processing_class=tiny_tokenizer,
        )
        with pytest.raises(ValueError, match=r"all 3 were dropped .* so the run would train nothing"):
            trainer.train()


class TestIdenticalPairs:
    def rows(self):
        rows = mixed_rows(num_short=6, long_rows=())
        rows["rejected"][1] = rows["chosen"][1]
        rows["rejected"][4] = rows["chosen"][4]
        return Dataset.from_dict(rows)

    def test_tdpo_keeps_them_with_a_warning(self, tiny_model_path, tiny_tokenizer, tmp_path, checks_log):
        trainer = TDPOTrainer(
            model=tiny_model_path, args=fast_args(tmp_path), train_dataset=self.rows(), processing_class=tiny_tokenizer
        )
        assert len(trainer.train_dataset) == 6
        assert "2 of the 6 pairs of the train dataset have identical chosen and rejected completions (rows 1, 4)" in (
            warnings_of(checks_log)
        )

    def test_tgdpo_drops_them(self, tiny_model_path, tiny_tokenizer, tmp_path, checks_log):
        trainer = TGDPOTrainer(
            model=tiny_model_path,
            guidance_model=tiny_model_path,
            args=fast_args(tmp_path, TGDPOConfig),
            train_dataset=self.rows(),
            processing_class=tiny_tokenizer,
        )
        assert len(trainer.train_dataset) == 4
        kept = trainer.train_dataset["prompt"]
        assert all(f"Row {i}:" in prompt for i, prompt in zip((0, 2, 3, 5), kept))
        assert "Dropped 2 of the 6 pairs of the train dataset (rows 1, 4)" in warnings_of(checks_log)


@pytest.mark.parametrize(
    "trainer_class, config_class, tag",
    [(TDPOTrainer, TDPOConfig, "tdpo"), (TGDPOTrainer, TGDPOConfig, "tgdpo"), (TBPOTrainer, TBPOConfig, "tbpo")],
)
def test_dpo_trainer_tags_are_kept_beside_ours(
    trainer_class, config_class, tag, tiny_model_path, tiny_tokenizer, tmp_path
):
    kwargs = {"guidance_model": tiny_model_path} if trainer_class is TGDPOTrainer else {}
    trainer = trainer_class(
        model=tiny_model_path,
        args=fast_args(tmp_path, config_class),
        train_dataset=Dataset.from_dict(mixed_rows(long_rows=())),
        processing_class=tiny_tokenizer,
        **kwargs,
    )
    assert set(DPOTrainer._tag_names) | {tag, "trl_tokenpref"} <= set(trainer.model.model_tags)
