"""What the training scripts check before training (`trl_tokenpref.cli`), each on the case a user hit:

* a checkpoint whose save was killed: `--resume_from_checkpoint last` resumes from the newest complete one, names the
  skipped one and what it lacks, and deletes nothing;
* a typo in a `--config` file's key: still ignored, as TRL ignores it, but named in a warning with the closest field;
* a local model / guidance model / dataset path that does not exist: one error naming all of them, before loading;
* a dataset without a test split under a recipe that evaluates: the splits it has and what to pass;
* a fresh run into an `output_dir` that holds checkpoints: a warning before training;
* the tiny recipes and the demo: a progress bar, no deprecation warning, no DDP `find_unused_parameters` warning.

The scripts run in-process (their `make_parser` and `main`, as `python scripts/run_*.py` calls them) on the tiny
offline model, for a few steps.
"""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from testing_utils import asset_args


REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO_ROOT / "recipes").glob("*/*.yaml"))
TINY_RECIPES = [REPO_ROOT / "recipes" / method / "tiny.yaml" for method in ("tdpo", "tgdpo", "tbpo")]


def load_script(method: str):
    spec = importlib.util.spec_from_file_location(f"run_{method}", REPO_ROOT / "scripts" / f"run_{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(method: str, *args: str, recipe: Path | None = None):
    from trl_tokenpref.cli import parse_args_and_config

    recipe = recipe or REPO_ROOT / "recipes" / method / "tiny.yaml"
    return parse_args_and_config(load_script(method).make_parser(), ["--config", str(recipe), *args])


def run_script(method: str, *args: str, recipe: Path | None = None) -> None:
    """`python scripts/run_<method>.py --config recipes/<method>/tiny.yaml ARGS`, in this process."""
    load_script(method).main(*parse(method, *args, recipe=recipe))


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def folder_listing(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(folder.iterdir())}


def stub_file(path: Path) -> None:
    """A small file of the kind its name says, readable as such: resuming checks that a checkpoint's weights load and
    are finite, that its torch archives are intact and that its trainer state has `TrainerState`'s fields."""
    import torch
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file({"weight": torch.zeros(2)}, str(path))
    elif path.suffix in (".pt", ".pth", ".bin"):
        torch.save({}, path)
    else:
        path.write_text("{}" if path.suffix == ".json" else "x")


def kill_during_optimizer_save(checkpoint: Path) -> None:
    """What a `kill -9` while `optimizer.pt` is written leaves: the weights, a truncated `optimizer.pt`, and none of
    what `Trainer._save_checkpoint` writes after it (scheduler, RNG state, trainer state, and then the manifest)."""
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    for name in ("scheduler.pt", "rng_state.pth", "trainer_state.json", "checkpoint_manifest.json"):
        (checkpoint / name).unlink()


# ------------------------------------------------------------------------------------------------------------------
# 1. Resuming after a save that was killed
# ------------------------------------------------------------------------------------------------------------------


def test_resume_last_skips_a_checkpoint_whose_save_was_killed(assets, tmp_path, caplog, capfd):
    output_dir = tmp_path / "run"
    common = [*asset_args("tdpo", assets), "--output_dir", str(output_dir), "--eval_strategy", "no"]
    common += ["--logging_steps", "1", "--save_steps", "2", "--save_total_limit", "10"]
    run_script("tdpo", *common, "--max_steps", "4")
    # The tiny recipe shows the progress bar (it had `disable_tqdm: true`): its last state is "4/4"
    assert "4/4" in capfd.readouterr().err
    original_losses = {e["step"]: e["loss"] for e in trainer_state(output_dir / "checkpoint-4")["log_history"]}
    kill_during_optimizer_save(output_dir / "checkpoint-4")

    # Before: `last` picked checkpoint-4 by its name and every retry failed with FileNotFoundError
    with caplog.at_level(logging.WARNING):
        run_script("tdpo", *common, "--max_steps", "6", "--resume_from_checkpoint", "last")
    assert f"Resuming from {output_dir / 'checkpoint-2'}" in capfd.readouterr().out
    skipped = [
        record.getMessage() for record in caplog.records if "Skipping the incomplete checkpoint" in record.getMessage()
    ]
    assert len(skipped) == 1, caplog.text
    assert str(output_dir / "checkpoint-4") in skipped[0]
    assert "lacks trainer_state.json, scheduler.pt, rng_state.pth" in skipped[0]
    assert f"Resuming from {output_dir / 'checkpoint-2'}" in skipped[0]

    # Steps 3-6 were trained again from checkpoint-2's state (weights, optimizer, RNG, data position): steps 3 and 4
    # repeat the killed run's losses, computed by the same operations on the same batches in the same order
    state = trainer_state(output_dir / "checkpoint-6")
    logged = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    assert list(logged) == [1, 2, 3, 4, 5, 6]
    assert [logged[step] for step in (1, 2, 3, 4)] == pytest.approx(
        [original_losses[step] for step in (1, 2, 3, 4)], rel=1e-5
    )
    # The resumed run wrote a complete checkpoint-4 over the incomplete one when it saved step 4 again
    assert trainer_state(output_dir / "checkpoint-4")["global_step"] == 4


def test_resume_last_picks_the_newest_complete_checkpoint_and_deletes_nothing(tmp_path, caplog):
    from trl_tokenpref.cli import resolve_resume_from_checkpoint

    def checkpoint(step: int, *names: str) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in names:
            stub_file(folder / name)
        return folder

    full = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
    checkpoint(5, *full)
    checkpoint(10, *full)
    killed = checkpoint(15, "model.safetensors", "optimizer.pt")
    empty = checkpoint(20)  # killed right after the folder was created
    listings = {folder: folder_listing(folder) for folder in (killed, empty)}

    args = SimpleNamespace(resume_from_checkpoint="last", output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_from_checkpoint(args) == str(tmp_path / "checkpoint-10")
    messages = [r.getMessage() for r in caplog.records if "Skipping the incomplete checkpoint" in r.getMessage()]
    assert len(messages) == 2
    assert f"{empty}: it lacks trainer_state.json, the model weights" in messages[0]
    assert f"{killed}: it lacks trainer_state.json, scheduler.pt, rng_state.pth" in messages[1]
    # Nothing was deleted or changed
    assert {folder: folder_listing(folder) for folder in (killed, empty)} == listings
    assert (tmp_path / "checkpoint-5").is_dir()


def test_resume_last_without_a_complete_checkpoint_is_a_clear_error(tmp_path):
    from trl_tokenpref.cli import resolve_resume_from_checkpoint

    (tmp_path / "checkpoint-3").mkdir()
    stub_file(tmp_path / "checkpoint-3" / "model.safetensors")
    args = SimpleNamespace(resume_from_checkpoint="last", output_dir=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"none of its checkpoints can be resumed from: .*checkpoint-3: it lacks trainer_state.json"
    ):
        resolve_resume_from_checkpoint(args)
    assert (tmp_path / "checkpoint-3" / "model.safetensors").is_file()


def test_what_a_complete_checkpoint_is(tmp_path):
    """`missing_checkpoint_files` on the layouts `Trainer._save_checkpoint` writes and on what an interrupted save
    leaves of them."""
    from trl_tokenpref.cli import missing_checkpoint_files

    def layout(name: str, files: dict[str, str], folders: tuple[str, ...] = ()) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for file_name, content in files.items():
            (folder / file_name).parent.mkdir(parents=True, exist_ok=True)
            (folder / file_name).write_text(content)
        for sub in folders:
            (folder / sub).mkdir()
        return str(folder)

    state = {"trainer_state.json": "{}"}
    states = {"optimizer.pt": "x", "scheduler.pt": "x", "rng_state.pth": "x"}
    # Full save; `save_only_model=True` (weights and trainer state only); a LoRA adapter; 2 processes' RNG files
    assert missing_checkpoint_files(layout("full", {"model.safetensors": "x", **states, **state})) == []
    assert missing_checkpoint_files(layout("model-only", {"model.safetensors": "x", **state})) == []
    assert missing_checkpoint_files(layout("adapter", {"adapter_model.safetensors": "x", **states, **state})) == []
    ranks = {"optimizer.pt": "x", "scheduler.pt": "x", "rng_state_0.pth": "x", "rng_state_1.pth": "x"}
    assert missing_checkpoint_files(layout("ddp", {"model.safetensors": "x", **ranks, **state})) == []
    # DeepSpeed ZeRO-3 without gathered weights: model and optimizer in `global_step*`, no scheduler.pt
    deepspeed = layout("deepspeed", {"rng_state_0.pth": "x", "latest": "global_step4", **state}, ("global_step4",))
    assert missing_checkpoint_files(deepspeed) == []
    # TBPO-Q: its head and the head's optimizer
    tbpo = {"model.safetensors": "x", "baseline_head.safetensors": "x", **states, **state}
    assert missing_checkpoint_files(layout("tbpo-q", {**tbpo, "baseline_optimizer.pt": "x"})) == []
    assert missing_checkpoint_files(layout("tbpo-q-killed", tbpo)) == ["baseline_optimizer.pt"]
    assert (
        missing_checkpoint_files(
            layout("tbpo-q-model-only", {"model.safetensors": "x", "baseline_head.safetensors": "x", **state})
        )
        == []
    )

    # Interrupted: a truncated trainer state, a shard an index lists, the RNG state of a full save
    assert missing_checkpoint_files(
        layout("truncated", {"model.safetensors": "x", **states, "trainer_state.json": '{"a'})
    ) == ["a readable trainer_state.json (it is truncated or corrupt)"]
    index = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    )
    sharded = {"model.safetensors.index.json": index, "model-00001-of-00002.safetensors": "x", **states, **state}
    assert missing_checkpoint_files(layout("sharded", sharded)) == [
        "model-00002-of-00002.safetensors (listed in model.safetensors.index.json)"
    ]
    no_rng = {"model.safetensors": "x", "optimizer.pt": "x", "scheduler.pt": "x", **state}
    assert missing_checkpoint_files(layout("no-rng", no_rng)) == ["rng_state.pth"]


def test_an_explicit_incomplete_checkpoint(tmp_path, caplog):
    """A path given explicitly: refused when `Trainer.train` would fail on it (no trainer state, no weights);
    resumed from, with a warning, when only what `Trainer` silently skips (optimizer, scheduler, RNG) is missing."""
    from trl_tokenpref.cli import check_checkpoint

    killed = tmp_path / "checkpoint-4"
    killed.mkdir()
    stub_file(killed / "model.safetensors")
    stub_file(killed / "optimizer.pt")
    with pytest.raises(
        ValueError, match=r"checkpoint-4 is incomplete: it lacks trainer_state.json.*`--resume_from_checkpoint last`"
    ):
        check_checkpoint(str(killed))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        check_checkpoint(str(tmp_path / "nope"))

    stub_file(killed / "trainer_state.json")
    stub_file(killed / "scheduler.pt")
    with caplog.at_level(logging.WARNING):
        check_checkpoint(str(killed))
    assert "lacks rng_state.pth: training resumes from its weights and trainer state" in caplog.text


def test_the_scripts_check_an_explicit_checkpoint_before_loading(assets, tmp_path):
    from trl_tokenpref.cli import check_before_loading

    killed = tmp_path / "run" / "checkpoint-4"
    killed.mkdir(parents=True)
    stub_file(killed / "model.safetensors")
    parsed = parse("tdpo", *asset_args("tdpo", assets), "--output_dir", str(tmp_path / "run"),
                   "--resume_from_checkpoint", str(killed))  # fmt: skip
    with pytest.raises(ValueError, match="checkpoint-4 is incomplete: it lacks trainer_state.json"):
        check_before_loading(*parsed)


def test_real_checkpoints_are_complete_and_a_killed_tbpo_q_save_is_skipped(assets, tmp_path, caplog):
    """The files a TBPO-Q run really writes pass the check, with and without `save_only_model`; a save killed while
    `baseline_optimizer.pt` was written (after the policy's optimizer and scheduler) is skipped."""
    from trl_tokenpref.cli import missing_checkpoint_files, resolve_resume_from_checkpoint

    output_dir = tmp_path / "run"
    common = [*asset_args("tbpo", assets), "--output_dir", str(output_dir), "--eval_strategy", "no"]
    run_script("tbpo", *common, "--max_steps", "2", "--save_steps", "1")
    for step in (1, 2):
        assert missing_checkpoint_files(str(output_dir / f"checkpoint-{step}")) == []
    killed = output_dir / "checkpoint-2"
    for name in ("baseline_optimizer.pt", "rng_state.pth", "trainer_state.json"):
        (killed / name).unlink()
    assert missing_checkpoint_files(str(killed)) == ["trainer_state.json", "rng_state.pth", "baseline_optimizer.pt"]
    with caplog.at_level(logging.WARNING):
        resolved = resolve_resume_from_checkpoint(
            SimpleNamespace(resume_from_checkpoint="last", output_dir=str(output_dir))
        )
    assert resolved == str(output_dir / "checkpoint-1")
    assert "lacks trainer_state.json, rng_state.pth, baseline_optimizer.pt" in caplog.text

    model_only = tmp_path / "model-only"
    run_script("tbpo", *asset_args("tbpo", assets), "--output_dir", str(model_only), "--eval_strategy", "no",
               "--max_steps", "1", "--save_steps", "1", "--save_only_model", "true")  # fmt: skip
    assert not (model_only / "checkpoint-1" / "optimizer.pt").exists()
    assert missing_checkpoint_files(str(model_only / "checkpoint-1")) == []


# ------------------------------------------------------------------------------------------------------------------
# 3. Unknown keys in the config file
# ------------------------------------------------------------------------------------------------------------------


def test_a_typo_in_a_config_key_is_named_in_a_warning(tmp_path, caplog):
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "tdpo" / "tiny.yaml").read_text())
    recipe.update(alpah=0.0, num_processes=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with caplog.at_level(logging.WARNING):
        _, training_args, _, _ = parse("tdpo", recipe=path)
    # Still ignored, as TrlParser ignores it (the run uses the default alpha), but named
    assert training_args.alpha == 0.5
    warning = [r.getMessage() for r in caplog.records if "Ignored 2 key(s)" in r.getMessage()]
    assert len(warning) == 1, caplog.text
    assert str(path) in warning[0]
    assert "`alpah` (did you mean `alpha`?)" in warning[0]
    assert "`num_processes` (an `accelerate launch` option" in warning[0]


def test_a_typo_on_the_command_line_is_an_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"--alpah \(did you mean `alpha`\?\)"):
        parse("tdpo", "--alpah", "0.0")


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{path.parent.name}/{path.name}" for path in RECIPES])
def test_recipes_parse_without_warnings(recipe, caplog):
    """No ignored key and no FutureWarning (the deprecated `gradient_checkpointing` alias warned at every parse)."""
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse(recipe.parent.name, "--use_cpu", "true", recipe=recipe)
    assert "Ignored" not in caplog.text
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_tiny_recipes_show_a_progress_bar_and_set_the_non_deprecated_fields():
    for recipe in TINY_RECIPES:
        _, training_args, _, _ = parse(recipe.parent.name, recipe=recipe)
        assert training_args.disable_tqdm is False, recipe
        assert training_args.activation_checkpointing is False and training_args.gradient_checkpointing is False
        assert training_args.ddp_find_unused_parameters is False
        assert "gradient_checkpointing" not in yaml.safe_load(recipe.read_text())


# ------------------------------------------------------------------------------------------------------------------
# 8. Local paths that do not exist
# ------------------------------------------------------------------------------------------------------------------


def test_which_paths_are_local(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    from trl_tokenpref.cli import missing_local_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    # Hub ids pass
    for hub_id in ("Qwen/Qwen2.5-0.5B", "gpt2", "trl-lib/ultrafeedback_binarized"):
        assert missing_local_path(hub_id) is None
        assert missing_local_path(hub_id, "dataset") is None
    # Paths that can only be local, and do not exist
    for path in ("./model", "../model", "/no/such/model", "~/no-such-model-xyz", "outputs/tiny/model", "model/"):
        assert missing_local_path(path) == f"{path}: no such file or directory", path
    assert missing_local_path("train.jsonl", "dataset") == "train.jsonl: no such file or directory"
    # `org/name` is local when the folder `org` exists here, unless `org/name` is in the Hub cache
    (tmp_path / "outputs").mkdir()
    problem = missing_local_path("outputs/tiny-model")
    assert "in the folder 'outputs' (which exists here" in problem and "`hf download outputs/tiny-model`" in problem
    assert "--repo-type dataset" in missing_local_path("outputs/tiny-data", "dataset")
    (tmp_path / "hub" / "models--outputs--tiny-model").mkdir(parents=True)
    assert missing_local_path("outputs/tiny-model") is None
    # What exists passes
    (tmp_path / "outputs" / "model").mkdir()
    assert missing_local_path("outputs/model") is None
    assert missing_local_path(str(tmp_path / "outputs" / "model")) is None

    # Offline, a Hub id loads only from the cache (the Hub's, `datasets`' own, or the model's `cache_dir`)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set, so nothing is downloaded" in missing_local_path("Qwen/Qwen2.5-0.5B")
    assert "HF_HUB_OFFLINE is set" in missing_local_path("gpt2", "dataset")
    (tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B").mkdir()
    (tmp_path / "datasets" / "trl-lib___ultrafeedback_binarized").mkdir(parents=True)
    (tmp_path / "own-cache" / "models--gpt2").mkdir(parents=True)
    assert missing_local_path("Qwen/Qwen2.5-0.5B") is None
    assert missing_local_path("trl-lib/ultrafeedback_binarized", "dataset") is None
    assert missing_local_path("gpt2", cache_dir=str(tmp_path / "own-cache")) is None
    assert missing_local_path("json", "dataset") is None  # a `datasets` builder, as in a `datasets:` mixture


def test_missing_local_paths_are_named_at_once_before_loading(assets, tmp_path, monkeypatch):
    """Model, guidance model and dataset: one error naming the three, before anything is loaded (before: a Hub error
    about the first, or minutes of retries without a network)."""
    import datasets
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    missing = {
        "model_name_or_path": str(tmp_path / "no-model"),
        "guidance_model_name_or_path": "./no-guidance",
        "dataset_name": str(tmp_path / "no-data" / "train.jsonl"),
    }
    args = [item for name, path in missing.items() for item in (f"--{name}", path)]
    with pytest.raises(FileNotFoundError, match="These paths do not exist") as error:
        run_script("tgdpo", *args, "--output_dir", str(tmp_path / "run"))
    for name, path in missing.items():
        assert f"--{name} {path}: no such file or directory" in str(error.value)
    # A Hub id is not refused by the check when the Hub can be reached
    from huggingface_hub import constants

    from trl_tokenpref.cli import check_local_paths_exist

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    script_args, training_args, model_args, dataset_args = parse(
        "tgdpo", "--model_name_or_path", "Qwen/Qwen2.5-0.5B", "--guidance_model_name_or_path", "Qwen/Qwen2.5-0.5B",
        "--dataset_name", "trl-lib/ultrafeedback_binarized", "--output_dir", str(tmp_path / "run"),
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    check_local_paths_exist(script_args, training_args, model_args, dataset_args)


def test_a_mixture_s_local_paths_are_checked(assets, tmp_path):
    from trl import DatasetMixtureConfig

    from trl_tokenpref.cli import check_local_paths_exist

    script_args, training_args, model_args, _ = parse("tdpo", *asset_args("tdpo", assets))
    test_file = str(Path(assets["data"]) / "test.jsonl")
    mixture = DatasetMixtureConfig(
        datasets=[{"path": "json", "data_files": test_file}, {"path": str(tmp_path / "no-such-folder")}]
    )
    with pytest.raises(FileNotFoundError) as error:
        check_local_paths_exist(script_args, training_args, model_args, mixture)
    assert f"datasets[1].path: {tmp_path / 'no-such-folder'}: no such file or directory" in str(error.value)
    assert "datasets[0]" not in str(error.value)  # `json` is a builder, not a path nor a Hub id
    check_local_paths_exist(
        script_args, training_args, model_args, DatasetMixtureConfig(datasets=mixture.datasets[:1])
    )


# ------------------------------------------------------------------------------------------------------------------
# 9. No test split under a recipe that evaluates
# ------------------------------------------------------------------------------------------------------------------


def test_a_dataset_without_test_split_under_an_evaluating_recipe(assets, tmp_path):
    train_file = str(Path(assets["data"]) / "train.jsonl")
    # Before: a bare `KeyError: 'test'`
    with pytest.raises(ValueError) as error:
        run_script("tdpo", *asset_args("tdpo", assets), "--dataset_name", train_file, "--output_dir", str(tmp_path))
    message = str(error.value)
    assert "The run evaluates (`eval_strategy='steps'`) on the 'test' split" in message
    assert "has no such split (its splits: ['train'])" in message
    assert "`--dataset_test_split NAME`" in message and "`--eval_strategy no`" in message


def test_select_splits():
    from datasets import Dataset, DatasetDict

    from trl_tokenpref.cli import select_splits

    rows = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    dataset = DatasetDict(train=rows, validation=rows)

    def args(eval_strategy="steps", **script):
        script_args = SimpleNamespace(dataset_name="pairs", dataset_train_split="train", dataset_test_split="test")
        script_args.__dict__.update(script)
        return script_args, SimpleNamespace(eval_strategy=eval_strategy)

    train, evaluation = select_splits(dataset, *args(eval_strategy="no"))
    assert train is dataset["train"] and evaluation is None
    train, evaluation = select_splits(dataset, *args(dataset_test_split="validation"))
    assert evaluation is dataset["validation"]
    with pytest.raises(ValueError, match=r"its splits: \['train', 'validation'\].*`--dataset_test_split validation`"):
        select_splits(dataset, *args())
    with pytest.raises(ValueError, match=r"no 'prefs' split to train on \(its splits: \['train', 'validation'\]\)"):
        select_splits(dataset, *args(dataset_train_split="prefs"))


# ------------------------------------------------------------------------------------------------------------------
# Data files without rows (issue 24, item 6)
# ------------------------------------------------------------------------------------------------------------------


def test_empty_data_files_are_named_before_loading(assets, tmp_path):
    """`datasets`' JSON builder fails on an empty file with a bare `StopIteration` (a whitespace-only one: "Instruction
    'train' corresponds to no data"), naming no file: refused before the model is loaded, naming each file."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("")
    (folder / "test.jsonl").write_text("\n\n")
    for dataset_name, listed in [
        (str(folder), f"{folder / 'test.jsonl'} (2 bytes), {folder / 'train.jsonl'} (0 bytes)"),
        (str(folder / "train.jsonl"), f"{folder / 'train.jsonl'} (0 bytes)"),
    ]:
        args = asset_args("tdpo", assets) + ["--dataset_name", dataset_name, "--output_dir", str(tmp_path / "run")]
        with pytest.raises(ValueError) as error:
            run_script("tdpo", *args)
        assert str(error.value) == (
            f"The dataset {dataset_name} has data files without any row: {listed}. Write the rows into them (a write "
            "that was interrupted leaves an empty file: run what wrote it again; `python -m trl_tokenpref.data DIR` "
            "writes the default dataset), or remove them (the test split is only read when the run evaluates)."
        )


def test_which_data_files_are_empty(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trl_tokenpref.cli import empty_data_files

    (tmp_path / "a.json").write_text(" [ ] ")
    (tmp_path / "b.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "c.csv").write_text("")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "e.parquet")
    (tmp_path / "notes.txt").write_text("")  # not a data file `load_dataset` reads
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "f.json").write_text("")  # hidden, as datasets skips it
    empty = [Path(entry.split(" (")[0]).name for entry in empty_data_files(tmp_path)]
    assert empty == ["a.json", "c.csv", "d.parquet"]


# ------------------------------------------------------------------------------------------------------------------
# Saved adapters and model cards name their base model (issue 24, item 8)
# ------------------------------------------------------------------------------------------------------------------


def test_a_saved_adapter_loads_from_another_directory_and_its_card_names_the_base(assets, tmp_path, monkeypatch):
    """The recipes give the model as `./outputs/tiny-model`: stored as given, the adapter's base path only resolved
    from the launch directory ("Repo id must be in the form ..." elsewhere), and TRL's card said "a fine-tuned version
    of [None](https://huggingface.co/None)" for a local base."""
    from peft import AutoPeftModelForCausalLM

    model = Path(assets["model"])
    monkeypatch.chdir(model.parent)
    output_dir = tmp_path / "adapter"
    args = asset_args("tdpo", assets) + ["--model_name_or_path", f"./{model.name}", "--output_dir", str(output_dir)]
    run_script("tdpo", *args, "--use_peft", "--lora_r", "4", "--max_steps", "1", "--save_steps", "1",
               "--eval_strategy", "no")  # fmt: skip
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(model.resolve())
    card = (output_dir / "README.md").read_text()
    assert f"This model is a fine-tuned version of the local model `{model.resolve()}`." in card
    assert "[None]" not in card

    monkeypatch.chdir(tmp_path)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(output_dir))
    assert reloaded.peft_config["default"].base_model_name_or_path == str(model.resolve())


def test_a_model_loaded_from_a_relative_folder_saves_an_adapter_that_loads_anywhere(assets, tmp_path, monkeypatch):
    """The Python API with a model object: `from_pretrained("./tiny-model")` keeps the relative path as its
    `name_or_path`, which PEFT stored as the adapter's base."""
    from datasets import load_dataset
    from peft import AutoPeftModelForCausalLM, LoraConfig
    from testing_utils import fast_args
    from transformers import AutoModelForCausalLM

    from trl_tokenpref import TDPOConfig, TDPOTrainer

    model_dir = Path(assets["model"])
    monkeypatch.chdir(model_dir.parent)
    model = AutoModelForCausalLM.from_pretrained(f"./{model_dir.name}")
    args = fast_args(tmp_path / "adapter", TDPOConfig, max_steps=1)
    dataset = load_dataset("json", data_files=str(Path(assets["data"]) / "train.jsonl"), split="train").select(
        range(4)
    )
    trainer = TDPOTrainer(model=model, args=args, train_dataset=dataset,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    trainer.train()
    trainer.save_model()
    assert model.config.name_or_path == model.name_or_path == str(model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert reloaded.peft_config["default"].base_model_name_or_path == str(model_dir.resolve())


# ------------------------------------------------------------------------------------------------------------------
# A fresh run into an output_dir that holds checkpoints
# ------------------------------------------------------------------------------------------------------------------


def test_a_fresh_run_into_an_output_dir_with_checkpoints_is_warned(assets, tmp_path, caplog):
    from trl_tokenpref.cli import check_before_loading

    output_dir = tmp_path / "run"
    for step in (20, 40):
        (output_dir / f"checkpoint-{step}").mkdir(parents=True)
    parsed = parse("tdpo", *asset_args("tdpo", assets), "--output_dir", str(output_dir))
    with caplog.at_level(logging.WARNING):
        check_before_loading(*parsed)
    assert (
        f"{str(output_dir)!r} already holds checkpoints of an earlier run (checkpoint-20, checkpoint-40), and this "
        "run starts from step 0. Its checkpoints write over those with the same step numbers, and "
        "`save_total_limit=2` deletes the oldest"
    ) in caplog.text
    assert "pass `--resume_from_checkpoint last`" in caplog.text

    # Resuming (`last` is replaced by the checkpoint it resolves to), or an empty output_dir: no warning
    caplog.clear()
    for step in (20, 40):
        stub_file(output_dir / f"checkpoint-{step}" / "model.safetensors")
        stub_file(output_dir / f"checkpoint-{step}" / "trainer_state.json")
    resuming = parse(
        "tdpo", *asset_args("tdpo", assets), "--output_dir", str(output_dir), "--resume_from_checkpoint", "last"
    )
    fresh = parse("tdpo", *asset_args("tdpo", assets), "--output_dir", str(tmp_path / "fresh"))
    with caplog.at_level(logging.WARNING):
        check_before_loading(*resuming)
        check_before_loading(*fresh)
    assert "already holds checkpoints" not in caplog.text
    assert resuming[1].resume_from_checkpoint == str(output_dir / "checkpoint-40")
    assert fresh[1].resume_from_checkpoint is None


# ------------------------------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------------------------------


def test_the_demo_shows_no_warning(tmp_path, capfd, caplog):
    from trl_tokenpref import demo

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        metrics = demo.main(["--steps", "2", "--output-dir", str(tmp_path)])
    output = capfd.readouterr()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    # bitsandbytes (the optional `qlora` extra, imported by peft) reports at import, where it is installed without its
    # optional `kernels` package, that it lacks that package: the environment's, not a default of ours or of a
    # dependency's, and printed once whatever the demo does
    logged = [record.getMessage() for record in caplog.records if not record.name.startswith("bitsandbytes")]
    assert logged == []
    assert "warn" not in (output.out + output.err).replace(str(tmp_path), "<output-dir>").lower()
    assert output.err == ""  # no progress bar of the tiny model's loading and saving either: the table is the output
    assert "Held-out evaluation:" in output.out and metrics["eval_loss"] > 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["tdpo", "tgdpo", "tbpo"])
def test_two_process_tiny_runs_without_the_find_unused_parameters_warning(method, assets, tmp_path):
    """`ddp_find_unused_parameters: false` in the tiny recipes: DDP no longer warns from every rank, and (the reason
    it is safe) every parameter still gets a gradient, or DDP would fail the second step."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the `accelerate` launcher is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", f"scripts/run_{method}.py", "--config",
               f"recipes/{method}/tiny.yaml", *asset_args(method, assets), "--output_dir", str(tmp_path),
               "--max_steps", "3", "--per_device_train_batch_size", "2", "--eval_strategy", "no",
               "--save_strategy", "no"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "find_unused_parameters" not in result.stderr
