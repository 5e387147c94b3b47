"""The training scripts (`scripts/run_*.py`), their recipes (`recipes/*/*.yaml`) and their shared helpers
(`trl_tokenpref/cli.py`).

Each script is run as a user runs it, in a subprocess from the repository root, on the tiny offline model and the
embedded dataset written to disk: it trains from its `tiny` recipe, saves a model that reloads, and resumes from its own
checkpoint. Every recipe must parse into its script's dataclasses with no unknown key (an option TRL removed, or a typo,
would otherwise be ignored silently by `parse_args_and_config(fail_with_unknown_args=False)`).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import METHODS, asset_args


REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO_ROOT / "recipes").glob("*/*.yaml"))
# A subprocess on a shared 2-core machine: generous, but a hung run still fails instead of blocking the suite
TIMEOUT_S = 600


def load_script(method: str):
    spec = importlib.util.spec_from_file_location(f"run_{method}", REPO_ROOT / "scripts" / f"run_{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",  # the tiny model gains nothing from threads on a shared 2-core machine
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def run_script(method: str, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, f"scripts/run_{method}.py", "--config", f"recipes/{method}/tiny.yaml", *args])


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


# ------------------------------------------------------------------------------------------------- end to end runs


@pytest.mark.parametrize("method", METHODS)
def test_script_trains_saves_reloads_and_resumes(method, assets, tmp_path):
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "run"
    common = [*asset_args(method, assets), "--output_dir", str(output_dir), "--logging_steps", "1"]
    common += ["--save_steps", "2", "--eval_strategy", "no"]

    run_script(method, *common, "--max_steps", "4")
    assert trainer_state(output_dir / "checkpoint-4")["global_step"] == 4
    # The final model reloads as a plain causal LM, with the trained (not the initial) weights
    trained = AutoModelForCausalLM.from_pretrained(output_dir)
    initial = AutoModelForCausalLM.from_pretrained(assets["model"])
    assert any(not torch.equal(param, initial.state_dict()[name]) for name, param in trained.state_dict().items()), (
        "the saved model equals the initial one"
    )

    # Resume from the last checkpoint (`last`): steps 5-6 continue from step 4 instead of restarting at 1
    result = run_script(method, *common, "--max_steps", "6", "--resume_from_checkpoint", "last")
    assert f"Resuming from {output_dir / 'checkpoint-4'}" in result.stdout
    state = trainer_state(output_dir / "checkpoint-6")
    assert state["global_step"] == 6
    logged_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged_steps == [1, 2, 3, 4, 5, 6]  # steps 1-4 come from checkpoint-4's state, 5-6 from the resumed run


def test_qlora_run_trains_an_adapter(assets, tmp_path):
    """QLoRA of the tiny model from the tiny recipe: 4-bit base (bitsandbytes' CPU path), LoRA adapter trained.
    bitsandbytes comes with the `qlora` extra, which CI installs (`.[dev,qlora]`): without it this test fails."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "run"
    args = [*asset_args("tdpo", assets), "--output_dir", str(output_dir), "--max_steps", "3", "--logging_steps", "1"]
    args += ["--eval_strategy", "no", "--save_strategy", "no", "--learning_rate", "1e-2"]
    args += ["--use_peft", "--load_in_4bit", "--lora_r", "8", "--lora_alpha", "16"]
    args += ["--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj"]
    run_script("tdpo", *args)

    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert not (output_dir / "model.safetensors").exists()  # only the adapter is saved
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    model = PeftModel.from_pretrained(base, output_dir)
    lora_b = [param for name, param in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(param.abs().sum() > 0 for param in lora_b)  # lora_B starts at zero: it was trained


# ---------------------------------------------------------------------------------------------------------- recipes


def test_every_method_has_its_recipes():
    for method in METHODS:
        names = [path.stem for path in (REPO_ROOT / "recipes" / method).glob("*.yaml")]
        assert "tiny" in names, f"recipes/{method} has no tiny recipe"
        for kind in ("lora_", "qlora_", "full_", "paper_"):
            assert any(name.startswith(kind) for name in names), f"recipes/{method} has no {kind}* recipe: {names}"


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{path.parent.name}/{path.name}" for path in RECIPES])
def test_recipe_parses_into_the_script_dataclasses(recipe):
    method = recipe.parent.name
    parser = load_script(method).make_parser()
    # `use_cpu`: GPU recipes set bf16, which TrainingArguments refuses on a machine without a GPU unless told to
    # run on CPU; it changes no other value
    *dataclasses, config_remaining, cli_remaining = parser.parse_args_and_config(
        args=["--config", str(recipe), "--use_cpu", "true"],
        return_remaining_strings=True,
        separate_remaining_strings=True,
    )
    assert config_remaining == [], f"{recipe}: keys that no dataclass has: {config_remaining}"
    assert cli_remaining == []
    script_args, training_args, model_args, dataset_args = dataclasses
    assert type(training_args).__name__ == f"{method.upper()}Config"
    assert model_args.model_name_or_path
    assert script_args.dataset_name or dataset_args.datasets
    if recipe.stem != "tiny":
        # A GPU recipe loads the model in bf16 (ModelConfig's default is float32) or says why not
        assert model_args.dtype == "bfloat16" or "fp32" in recipe.read_text()
        assert training_args.bf16 and training_args.gradient_checkpointing


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{path.parent.name}/{path.name}" for path in RECIPES])
def test_recipe_header_gives_its_launch_command(recipe):
    relative = recipe.relative_to(REPO_ROOT).as_posix()
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"scripts/run_{recipe.parent.name}.py --config {relative}" in header


# ----------------------------------------------------------------------------------------------- trl_tokenpref.cli


def script_arguments(**kwargs):
    from trl import DatasetMixtureConfig, ScriptArguments

    return ScriptArguments(**kwargs), DatasetMixtureConfig()


def test_load_preference_dataset_from_local_files(assets, tmp_path):
    from datasets import Dataset, load_dataset

    from trl_tokenpref.cli import load_preference_dataset

    data_dir = Path(assets["data"])
    # A directory of train.jsonl / test.jsonl: splits named after the files
    dataset = load_preference_dataset(*script_arguments(dataset_name=str(data_dir)))
    assert set(dataset) == {"train", "test"}
    assert dataset["train"].column_names == ["prompt", "chosen", "rejected"]
    # One file: it is the train split (or whichever `dataset_train_split` names)
    dataset = load_preference_dataset(*script_arguments(dataset_name=str(data_dir / "test.jsonl")))
    assert set(dataset) == {"train"} and len(dataset["train"]) == 64
    dataset = load_preference_dataset(
        *script_arguments(dataset_name=str(data_dir / "test.jsonl"), dataset_train_split="prefs")
    )
    assert set(dataset) == {"prefs"}
    # Parquet, and a `save_to_disk` directory
    rows = load_dataset("json", data_files=str(data_dir / "test.jsonl"), split="train")
    rows.to_parquet(str(tmp_path / "pairs.parquet"))
    dataset = load_preference_dataset(*script_arguments(dataset_name=str(tmp_path / "pairs.parquet")))
    assert dataset["train"].to_list() == rows.to_list()
    Dataset.from_list(rows.to_list()).save_to_disk(str(tmp_path / "saved"))
    dataset = load_preference_dataset(*script_arguments(dataset_name=str(tmp_path / "saved")))
    assert dataset["train"].to_list() == rows.to_list()


def test_load_preference_dataset_mixture_and_errors(assets, tmp_path):
    from trl import DatasetMixtureConfig, ScriptArguments

    from trl_tokenpref.cli import load_preference_dataset

    test_file = str(Path(assets["data"]) / "test.jsonl")
    mixture = DatasetMixtureConfig(datasets=[{"path": "json", "data_files": test_file}], test_split_size=0.25)
    dataset = load_preference_dataset(ScriptArguments(), mixture)
    assert (len(dataset["train"]), len(dataset["test"])) == (48, 16)

    with pytest.raises(ValueError, match="No dataset given"):
        load_preference_dataset(ScriptArguments(), DatasetMixtureConfig())
    (tmp_path / "pairs.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="expected one of the extensions"):
        load_preference_dataset(ScriptArguments(dataset_name=str(tmp_path / "pairs.txt")), DatasetMixtureConfig())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_dataset(ScriptArguments(dataset_name=str(tmp_path / "missing.jsonl")), DatasetMixtureConfig())


def test_resolve_resume_from_checkpoint(tmp_path):
    from types import SimpleNamespace

    from trl_tokenpref.cli import resolve_resume_from_checkpoint

    def resolve(value):
        return resolve_resume_from_checkpoint(SimpleNamespace(resume_from_checkpoint=value, output_dir=str(tmp_path)))

    assert resolve(None) is None
    assert resolve("false") is None
    assert resolve("some/checkpoint-7") == "some/checkpoint-7"
    with pytest.raises(ValueError, match="holds no `checkpoint-\\*` folder"):
        resolve("last")
    import torch
    from safetensors.torch import save_file

    for step in (5, 12):  # complete checkpoints: a trainer state and (readable, finite) weights
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        save_file({"weight": torch.zeros(2)}, str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    assert resolve("last") == str(tmp_path / "checkpoint-12")
    assert resolve(True) == str(tmp_path / "checkpoint-12")  # `resume_from_checkpoint: true` in a YAML recipe
