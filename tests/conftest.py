"""Shared fixtures: an offline tiny model saved to disk, the embedded dataset, and one torch thread.

DPOTrainer reloads the reference model from the policy's path, so the tiny model must live in a folder. It is built
once per test session. Tests run with one torch thread: the tiny models gain nothing from two, and CI shares its two
cores with the test runner itself.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Session-scoped, so module- and session-scoped fixtures (e.g. a reference run) use the same thread count as
    the tests that compare against them: CPU matmuls sum in another order with another thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from trl_tokenpref.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def default_dataset():
    from trl_tokenpref.data import load_default_dataset

    return load_default_dataset()


@pytest.fixture(scope="session")
def conversational_dataset():
    from trl_tokenpref.data import load_default_dataset

    return load_default_dataset(format="conversational")


@pytest.fixture(scope="session")
def train_subset(default_dataset):
    """32 training pairs: enough for the batches of the loss and metric tests, quick to tokenize."""
    return default_dataset["train"].select(range(32))


@pytest.fixture(scope="session")
def guidance_path(tiny_model_path, tmp_path_factory) -> str:
    """A TGDPO guidance model with the tiny model's tokenizer: its LM head perturbed, so that the token rewards r̂ vary
    by token (|r̂| ~ 0.1 at β = 0.1)."""
    from testing_utils import perturbed_copy

    return perturbed_copy(tiny_model_path, tmp_path_factory.mktemp("guidance"), seed=2, scale=0.1, lm_head_only=True)


@pytest.fixture(scope="session")
def dpo_metric_keys(tiny_model_path, tiny_tokenizer, train_subset, tmp_path_factory) -> dict[str, set[str]]:
    """The metric keys `trl.DPOTrainer` logs in each mode, read off a real `compute_loss` call (not written down
    here): every token-level trainer must log at least these."""
    from testing_utils import build_trainer, collated_batch
    from trl import DPOTrainer

    trainer = build_trainer(
        DPOTrainer, tiny_model_path, tiny_tokenizer, train_subset, tmp_path_factory.mktemp("dpo-metric-keys")
    )
    batch = collated_batch(trainer)
    keys = {}
    for mode, set_mode in (("train", trainer.model.train), ("eval", trainer.model.eval)):
        set_mode()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        keys[mode] = set(trainer._metrics[mode])
    assert {"rewards/margins", "logps/chosen"} <= keys["train"] == keys["eval"], keys
    return keys


@pytest.fixture
def make_trainer(tiny_model_path, tiny_tokenizer, train_subset):
    """`make_trainer(trainer_class, output_dir, trainer_kwargs=None, **config)`: a trainer (ours or `trl.DPOTrainer`)
    of the tiny model on `train_subset`, with `testing_utils.fast_args` plus `config`."""
    from testing_utils import build_trainer

    def make(trainer_class, output_dir, trainer_kwargs=None, **config):
        return build_trainer(
            trainer_class, tiny_model_path, tiny_tokenizer, train_subset, output_dir, trainer_kwargs, **config
        )

    return make


@pytest.fixture
def make_case_trainer(tiny_model_path, tiny_tokenizer, train_subset, guidance_path):
    """`make_case_trainer(case, output_dir, dataset=None, trainer_kwargs=None, **config)`: the trainer of
    `testing_utils.TRAINER_CASES[case]` with the case's config plus `config`, on `dataset` (default `train_subset`);
    TGDPO's with the `guidance_path` model unless `trainer_kwargs` names another."""
    from testing_utils import TRAINER_CASES, build_trainer

    def make(case, output_dir, dataset=None, trainer_kwargs=None, **config):
        spec = TRAINER_CASES[case]
        trainer_kwargs = dict(trainer_kwargs or {})
        if spec.needs_guidance:
            trainer_kwargs.setdefault("guidance_model", guidance_path)
        dataset = train_subset if dataset is None else dataset
        config = {**spec.config, **config}
        return build_trainer(
            spec.trainer_class, tiny_model_path, tiny_tokenizer, dataset, output_dir, trainer_kwargs, **config
        )

    return make


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
    """The tiny assets the recipes point at, built by their own commands (`python -m trl_tokenpref.tiny` / `.data`)
    into a temporary folder: a model, a guidance model of another seed, the embedded dataset."""
    from trl_tokenpref import data, tiny

    root = tmp_path_factory.mktemp("assets")
    tiny.main([str(root / "tiny-model")])
    tiny.main([str(root / "tiny-guidance"), "--seed", "1"])
    data.main([str(root / "tiny-data")])
    return {
        "model": str(root / "tiny-model"),
        "guidance": str(root / "tiny-guidance"),
        "data": str(root / "tiny-data"),
    }


@pytest.fixture(scope="session")
def token_rewards_script():
    """`scripts/compute_token_rewards.py`, imported as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "compute_token_rewards.py"
    spec = importlib.util.spec_from_file_location("compute_token_rewards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tiny_model_path):
    """The tiny model in evaluation mode, one per test module."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
