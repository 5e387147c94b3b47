"""FSDP2 on two CPU processes (gloo): every trainer's `compute_loss` on sharded models gives the unsharded loss and
gradients.

`tests/_fsdp2_worker.py` runs under `torchrun --nproc_per_node 2`. Per trainer (TDPO-2, TBPO-A, TBPO-Q with its
baseline head, TGDPO with a guidance model, TDPO-2 with the LM head wrapped as its own unit, TDPO-2 on packed batches
(`padding_free=True`), TDPO-2 with the reference cache) it computes the loss and the gradients unsharded on the full batch, then
shards the policy as accelerate's FSDP2 plugin does (each decoder layer, the embedding, the final norm with the LM
head, then the root) and the reference and guidance models as TRL's `prepare_fsdp` does (the root), and computes them
again:

* with the **full batch on both ranks**. FSDP2 all-gathers the exact parameters, so each rank runs the unsharded
  computation on the same values, and its reduce-scatter averages two identical gradients (float64: each is halved,
  then summed, both exact in binary floating point). The loss, every gradient and every logged metric must therefore
  be *exactly* the unsharded ones: any difference means that sharding changed the computation.
* with **each rank's half of the batch**, as in data-parallel training. Every loss is a mean over pairs, so the
  averaged gradient equals the full batch's in exact arithmetic. The models are float64, but the fused pass computes
  the per-token statistics and accumulates the LM head's gradient in float32 (token_stats/fused.py), so the two
  computations differ by float32 rounding of sums over the 76 completion tokens of the batch: at most 76 × 2⁻²⁴ ≈
  4.5e-6 relative, hence `SPLIT_RTOL = 1e-5` (measured: 2.4e-7 at most). The control: each rank's own
  half-batch gradient differs from the full batch's by more than 10 % for every parameter (measured: 68 % or more),
  so a gradient that missed FSDP's reduction (e.g. one that reached a sharded parameter directly) fails by four orders
  of magnitude.

Nothing reaches the frozen reference or guidance models. The metrics reduced across the ranks equal the full batch's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM


REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_fsdp2_worker.py"
CASES = ["tdpo2", "tbpo_a", "tbpo_q", "tgdpo", "tdpo2_head_unit", "tdpo2_packed", "tdpo2_cached"]
SPLIT_RTOL = 1e-5  # float32 rounding of the fused pass's sums, see the module docstring
CONTROL_MIN_GAP = 0.1  # a gradient without the reduction across ranks is this far off at least (measured: 0.68)


def perturbed_copy(source: str, target: Path, seed: int, scale: float, lm_head_only: bool = False) -> str:
    """Save `source` with Gaussian noise added to its weights (all of them, or only the LM head)."""
    model = AutoModelForCausalLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not lm_head_only or name.startswith("lm_head"):
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def fsdp2_inputs(tiny_model_path, default_dataset, tmp_path_factory) -> dict[str, str]:
    """The worker's models and dataset: the policy moved away from the reference (ρ_t and the KL gradient non-zero), a
    guidance model that is not the reference (token rewards non-zero), 8 pairs on disk."""
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    default_dataset["train"].select(range(8)).save_to_disk(str(tmp_path / "data"))
    return {
        "policy": perturbed_copy(tiny_model_path, tmp_path / "policy", seed=1, scale=0.05),
        "reference": tiny_model_path,
        "guidance": perturbed_copy(tiny_model_path, tmp_path / "guidance", seed=2, scale=0.1, lm_head_only=True),
        "dataset": str(tmp_path / "data"),
        "tmp_path": str(tmp_path),
    }


@pytest.fixture(scope="module")
def fsdp2_results(fsdp2_inputs) -> list[dict]:
    """One torchrun launch for every trainer (the interpreter start and imports dominate the cost); returns each
    rank's results."""
    tmp_path = Path(fsdp2_inputs["tmp_path"])
    policy, guidance = fsdp2_inputs["policy"], fsdp2_inputs["guidance"]
    tiny_model_path = fsdp2_inputs["reference"]
    output_dir = tmp_path / "out"
    output_dir.mkdir()

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    command += ["--policy", policy, "--reference", tiny_model_path, "--guidance", guidance]
    command += ["--dataset", str(tmp_path / "data"), "--output_dir", str(output_dir), "--cases", *CASES]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the FSDP2 worker failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_fsdp2_sharding_mirrors_accelerate_and_trl(fsdp2_results, case, rank):
    """The models really are sharded, as accelerate (policy) and TRL (reference, guidance) shard them: every parameter
    a DTensor, each rank holding half of every LM head."""
    sharding = fsdp2_results[rank][case]["sharding"]
    expected_models = {"policy", "reference"} | ({"guidance"} if case == "tgdpo" else set())
    assert set(sharding) == expected_models
    policy_units = set(sharding["policy"]["fsdp_units"])
    assert {"", "model.layers.0", "model.layers.1"} <= policy_units, policy_units  # decoder layers, then the root
    assert "lm_head" in policy_units  # with the final norm, in one unit (accelerate >= 1.15)
    for name in expected_models - {"policy"}:
        assert sharding[name]["fsdp_units"] == [""], name  # `prepare_fsdp`: the root only
    for name, model in sharding.items():
        assert model["plain_params"] == [], f"{name}: parameters left unsharded: {model['plain_params']}"
        assert model["lm_head_local_rows"] * 2 == model["lm_head_rows"], name


@pytest.mark.distributed
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_fsdp2_same_batch_is_exactly_unsharded(fsdp2_results, case, rank):
    result = fsdp2_results[rank][case]
    assert result["loss_same_batch"] == result["loss"]
    gaps = {name: gap for name, gap in result["grad_gaps_same_batch"].items() if gap != 0.0}
    assert gaps == {}, f"sharded gradients differ from the unsharded ones (relative gaps): {gaps}"
    assert result["metrics_same_batch"] == result["metrics"]
    assert result["frozen_params_with_grad"] == []
    if case == "tbpo_q":
        assert any(name.startswith("baseline_head.") for name in result["grad_gaps_same_batch"])
    if case == "tdpo2_cached":
        assert "kl/cache_tail_mass" in result["metrics"]  # the reference cache, not a live reference pass


@pytest.mark.distributed
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_fsdp2_split_batch_matches_full_batch(fsdp2_results, case, rank):
    result = fsdp2_results[rank][case]
    assert result["loss_split"] == pytest.approx(result["loss"], rel=SPLIT_RTOL)
    norms = result["grad_norms"]
    assert all(norm > 0 for norm in norms.values()), "a parameter without gradient would prove nothing"
    if case == "tbpo_q":
        assert any(name.startswith("baseline_head.") for name in norms)
    too_far = {name: gap for name, gap in result["grad_gaps_split"].items() if not gap < SPLIT_RTOL}
    assert too_far == {}, f"averaged half-batch gradients differ from the full batch's (relative gaps): {too_far}"
    # The control: without the reduction across ranks every parameter would be far off
    too_close = {name: gap for name, gap in result["grad_gaps_unreduced"].items() if not gap > CONTROL_MIN_GAP}
    assert too_close == {}, f"the half batch alone already gives these gradients, so they prove nothing: {too_close}"
    expected = result["metrics"]
    assert result["metrics_split"].keys() == expected.keys()
    for key, value in expected.items():
        assert result["metrics_split"][key] == pytest.approx(value, rel=SPLIT_RTOL, abs=1e-7), key


@pytest.mark.distributed
def test_fsdp2_reference_cache_equals_one_process_precompute(fsdp2_results, fsdp2_inputs):
    """The reference cache that two processes computed together (each scoring part of the rows, then gathered) is, on
    both ranks, the cache one process computes alone: same top-k ids, and log-probs equal to float32 rounding (the
    fused pass works in float32, and the padding of each batch differs with the rows it holds)."""
    from datasets import Dataset, load_from_disk
    from transformers import AutoTokenizer

    from trl_tokenpref import TDPOConfig, TDPOTrainer
    from trl_tokenpref.precompute import REF_CACHE_COLUMNS, REF_TOPK_IDS_COLUMNS

    # In memory, so that this precompute runs instead of reading the cache file the two processes wrote next to it
    pairs = Dataset.from_list(list(load_from_disk(fsdp2_inputs["dataset"])))
    args = TDPOConfig(
        output_dir=str(Path(fsdp2_inputs["tmp_path"]) / "one_process"),
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        variant="tdpo2",
        alpha=0.5,
        precompute_ref_log_probs=True,
        ref_top_k=8,
    )
    trainer = TDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(fsdp2_inputs["policy"], dtype=torch.float64),
        ref_model=AutoModelForCausalLM.from_pretrained(fsdp2_inputs["reference"], dtype=torch.float64),
        args=args,
        train_dataset=pairs,
        processing_class=AutoTokenizer.from_pretrained(fsdp2_inputs["reference"]),
    )
    for rank in (0, 1):
        cache = fsdp2_results[rank]["tdpo2_cached"]["reference_cache"]
        for column in REF_CACHE_COLUMNS:
            expected = list(trainer.train_dataset[column])
            assert len(cache[column]) == len(expected) == len(pairs), column
            for row, (got, want) in enumerate(zip(cache[column], expected)):
                if column in REF_TOPK_IDS_COLUMNS:
                    assert got == want, (rank, column, row)
                    continue
                got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
                assert got.shape == want.shape, (rank, column, row)
                finite = torch.isfinite(want)
                assert torch.equal(finite, torch.isfinite(got)), (rank, column, row)  # -inf: K is the whole vocabulary
                # A few float32 ulps of the log-probs' magnitude (measured: bitwise equal on the development machine)
                tolerance = 8 * torch.finfo(torch.float32).eps * want[finite].abs().max().clamp(min=1.0).item()
                assert (got[finite] - want[finite]).abs().max().item() <= tolerance, (rank, column, row)
