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
