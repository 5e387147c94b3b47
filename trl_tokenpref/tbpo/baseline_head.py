"""The TBPO-Q state baseline head `b_φ(s)` and its files.

TBPO-Q (TokenRatio paper App. C.3, docs/algorithms.md §3.4) weighs each aligned token pair by
`log w_t = b_φ(s^l_t) − b_φ(s^w_t)`, where `b_φ` is a small MLP on the policy's *detached* final hidden state of the
prefix `s_t`. The head is not part of the language model: the trainer keeps it as an attribute, trains it with its own
optimizer, and writes it next to the model (`baseline_head.safetensors`), never into the model's own weights, so the
saved policy stays a plain [`~transformers.PreTrainedModel`] (or PEFT adapter) that loads anywhere.
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


BASELINE_HEAD_NAME = "baseline_head.safetensors"
BASELINE_OPTIMIZER_NAME = "baseline_optimizer.pt"


class BaselineHead(nn.Module):
    """Scalar state baseline `b_φ(s)`: `Linear(H → n) → GELU → Linear(n → 1)`, or `Linear(H → 1)` when `n = 0`.

    The output layer starts at zero, so `b_φ ≡ 0` and `log w_t = 0` at initialisation: TBPO-Q then starts exactly where
    TBPO-A and BPO start (the per-token loss is `ℓ_h(1)` when πθ = π_ref). The official code uses PyTorch's default
    initialisation; with it, the random initial `log w_t` perturbs the first steps for no benefit. The hidden layer
    keeps the default initialisation, so the output layer's gradient is non-zero from the first step.

    The output layer has no bias (the official code's has one): a constant added to `b_φ` cancels in
    `b_φ(s^l_t) − b_φ(s^w_t)` (and in the per-pair centring), so its gradient is always exactly zero.

    There is no dropout: with identical chosen and rejected prefixes, `b_φ` must give identical values on both sides
    (invariant 21: identical responses give zero gradient).

    Args:
        input_size (`int`):
            Size H of the policy's final hidden states.
        hidden_size (`int`, *optional*, defaults to `1024`):
            Width n of the hidden layer (the paper's value); `0` gives a single linear layer.
    """

    def __init__(self, input_size: int, hidden_size: int = 1024):
        super().__init__()
        if input_size < 1 or hidden_size < 0:
            raise ValueError(f"Expected input_size >= 1 and hidden_size >= 0, got {input_size} and {hidden_size}.")
        self.input_size = input_size
        self.hidden_size = hidden_size
        if hidden_size > 0:
            self.net = nn.Sequential(
                nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1, bias=False)
            )
        else:
            self.net = nn.Linear(input_size, 1, bias=False)
        output_layer = self.net[-1] if hidden_size > 0 else self.net
        nn.init.zeros_(output_layer.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., H]` hidden states → `[...]` baselines."""
        return self.net(hidden_states).squeeze(-1)


def save_baseline_head(head: BaselineHead, output_dir: str) -> str:
    """Write `head` to `output_dir/baseline_head.safetensors`, with its sizes in the file's metadata. Returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, BASELINE_HEAD_NAME)
    state_dict = {name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()}
    metadata = {"format": "pt", "config": json.dumps({"input_size": head.input_size, "hidden_size": head.hidden_size})}
    save_file(state_dict, path, metadata=metadata)
    return path


def load_baseline_head(path: str, device: torch.device | str | None = None) -> BaselineHead:
    """Build a [`BaselineHead`] from `baseline_head.safetensors`, or from the directory holding it.

    Example (inspect the learned baseline of a trained TBPO-Q model):

    ```python
    head = load_baseline_head("Qwen2.5-0.5B-TBPO")
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    baselines = head(hidden.float())  # b_φ(s_t) for every prefix
    ```
    """
    if os.path.isdir(path):
        path = os.path.join(path, BASELINE_HEAD_NAME)
    with safe_open(path, framework="pt", device="cpu") as file:
        config = json.loads(file.metadata()["config"])
        state_dict = {name: file.get_tensor(name) for name in file.keys()}
    head = BaselineHead(**config)
    head.load_state_dict(state_dict)
    return head.to(device) if device is not None else head


__all__ = [
    "BASELINE_HEAD_NAME",
    "BASELINE_OPTIMIZER_NAME",
    "BaselineHead",
    "load_baseline_head",
    "save_baseline_head",
]
