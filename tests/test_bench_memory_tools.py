"""The measuring tools behind `benchmarks/gpu_7b.py`'s CPU run of the 7B path (docs/memory_and_scaling.md, "The 7B
path at its real sizes, on CPU"): `_memory.PhasePeakMemory` gives a phase of a region its own peak, and
`_cpu_bf16_gemm` takes bf16 products in PyTorch's fast CPU layout without changing values, gradients or what autograd
keeps. The script itself runs end to end on the tiny model (`slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks/` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import _cpu_bf16_gemm, _memory  # noqa: E402


MIB = 2**20


def _filled(mib: int) -> torch.Tensor:
    """A float32 tensor of `mib` MiB with every page written (resident)."""
    return torch.ones(mib * MIB // 4)


def test_phase_peak_memory_gives_each_phase_its_own_rise():
    with _memory.PhasePeakMemory() as memory:
        with memory.phase("outer"):
            outer = _filled(64)
            with memory.phase("nested"):
                nested = _filled(16)
                del nested
            del outer
        small = _filled(1)
    del small
    assert memory.exact, "/proc/self/clear_refs could not reset the high-water mark"
    phases = memory.phases
    # The outer phase allocated its 64 MiB; the nested one only its own 16 MiB, the outer 64 MiB being resident
    # already when it started; time in the nested phase is not the outer's
    assert phases["outer"]["rise_mb"] >= 63
    assert 15 <= phases["nested"]["rise_mb"] < 40
    assert phases["nested"]["peak_mb"] - memory.start_rss_mb >= 63 + 15
    assert phases["outer"]["segments"] == 2  # before and after the nested call
    assert phases["other"]["rise_mb"] < 40
    assert memory.peak_delta_mb >= 63 + 15
    assert not memory.active
    # Outside the region a phase measures nothing
    with memory.phase("late"):
        pass
    assert "late" not in memory.phases


def _linear_step(layer, x, output_weights):
    for tensor in (x, *layer.parameters()):
        tensor.grad = None
    out = layer(x)
    (out.float() * output_weights).sum().backward()
    grads = [None if t.grad is None else t.grad.clone() for t in (x, layer.weight, layer.bias)]
    return out, grads


def test_cpu_bf16_gemm_keeps_values_and_gradients_and_what_autograd_saves():
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 80, dtype=torch.bfloat16)
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16, requires_grad=True)
    output_weights = torch.randn(3, 7, 80)
    expected_out, expected_grads = _linear_step(layer, x, output_weights)
    original_linear = torch.nn.functional.linear
    _cpu_bf16_gemm.patch()
    try:
        out, grads = _linear_step(layer, x, output_weights)
        assert "LinearTN" in type(out.grad_fn).__name__  # the patched product ran
        # A frozen weight: like aten's linear, the input is not kept for a weight gradient nobody needs
        layer.weight.requires_grad_(False)
        frozen = layer(x)
        saved_input, saved_weight = frozen.grad_fn.saved_tensors
        assert saved_input is None and saved_weight is not None
        layer.weight.requires_grad_(True)
        # Under bf16 autocast a float32 layer computes in bf16, as aten's autocast does
        float_layer = torch.nn.Linear(96, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert float_layer(x.detach()).dtype == torch.bfloat16
        # The fused pass's hidden-state gradient product
        from trl_tokenpref.token_stats import fused

        a, b = torch.randn(20, 300, dtype=torch.bfloat16), torch.randn(300, 40, dtype=torch.bfloat16)
        accumulator = torch.zeros(20, 40)
        fused._addmm_fp32_(accumulator, a, b)
    finally:
        _cpu_bf16_gemm.unpatch()
    assert torch.nn.functional.linear is original_linear
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        # Another summation order in bf16: a few bf16 ulps
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-2)
    torch.testing.assert_close(accumulator, (a @ b).float(), rtol=2**-6, atol=1e-1)


@pytest.mark.slow
def test_gpu_7b_cpu_mode_measures_a_step_and_its_lm_head(tiny_model_path, tmp_path):
    """`gpu_7b.py --allow-cpu --dtype bfloat16` on the tiny model: each configuration trains in its own process and
    reports the step's rise over the built trainer and the LM-head phases (our pass: with its tile loops)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_7b.py"), "--model", tiny_model_path, "--allow-cpu"]
    command += ["--dtype", "bfloat16", "--modes", "lora", "--configs", "dpo", "tdpo2-cached", "--seq", "64"]
    command += ["--pairs", "1", "--warmup", "1", "--steps", "1", "--no-write", "--work-dir", str(tmp_path)]
    command += ["--results-dir", str(tmp_path / "results")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["config"]] = result
    assert set(results) == {"dpo", "tdpo2-cached"}, proc.stdout[-3000:]
    for config, result in results.items():
        assert "error" not in result, result
        assert result["dtype"] == "bfloat16" and result["cpu_gemm_patch"]
        assert result["delta_gb"] == pytest.approx(result["peak_gb"] - result["base_gb"])
        assert result["delta_gb"] > 0
        phases = result["phases"]
        assert phases["lm_head_forward"]["segments"] >= 2, config  # one per step at least
        assert phases["lm_head_backward"]["segments"] >= 2, config
    assert "lm_head_tiles_forward" in results["tdpo2-cached"]["phases"]
    assert "lm_head_tiles_backward" in results["tdpo2-cached"]["phases"]
    # DPO's reference pass is a second call of TRL's kernel: policy and reference in each of the 2 steps
    assert results["dpo"]["phases"]["lm_head_forward"]["segments"] == 4
    assert len(list((tmp_path / "results").glob("gpu-*.json"))) == 1
