"""The run has the processes and the sharding its launcher asked for, or says so (trl_tokenpref/launch_checks.py).

accelerate 1.16 falls back silently in three cases: processes a launcher started together that do not join one run
(`--use_cpu false` on a machine without GPU: each process trains alone and writes the same output_dir), one process
where several were asked for (`accelerate launch --cpu --num_processes 2`), and FSDP asked for but plain data
parallelism run (TRL's fsdp2.yaml with `use_cpu: true`). The first tests set the launcher's environment variables in
this process and build a trainer; the `slow` ones launch the script as a user would.
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import asset_args

from trl_tokenpref import TDPOTrainer


REPO_ROOT = Path(__file__).resolve().parent.parent


def launch_warnings(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.name == "trl_tokenpref.launch_checks")


def test_processes_that_are_not_one_run_are_refused(make_trainer, monkeypatch, tmp_path):
    """WORLD_SIZE=2 from the launcher, but accelerate sees one process (no GPU, `use_cpu=False`): refused before the
    trainer loads or precomputes anything, naming the cause and the fix."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as error:
        make_trainer(TDPOTrainer, tmp_path, use_cpu=False)
    message = str(error.value)
    assert "2 processes were started together (WORLD_SIZE=2" in message
    assert "accelerate sees 1 process(es)" in message
    assert str(tmp_path) in message  # the output_dir both would write
    assert "use_cpu: true" in message  # the fix


def test_one_process_where_the_launcher_was_asked_for_several_warns(make_trainer, monkeypatch, tmp_path, caplog):
    """What `accelerate launch --cpu --num_processes 2` exports to the ONE process it starts."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with caplog.at_level(logging.WARNING):
        make_trainer(TDPOTrainer, tmp_path)
    warning = launch_warnings(caplog)
    assert "This run has ONE process, although `accelerate launch` was asked for several" in warning
    assert "--multi_gpu --num_processes N" in warning and "torchrun --nproc_per_node N" in warning
    assert "[RANK" not in warning  # one process: accelerate's rank prefix would say nothing


def test_fsdp_asked_for_but_not_enabled_warns(make_trainer, monkeypatch, tmp_path, caplog):
    """What `accelerate launch --config_file fsdp2.yaml` exports; with `use_cpu=True` accelerate runs no FSDP."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(TDPOTrainer, tmp_path)
    assert not trainer.is_fsdp_enabled
    warning = launch_warnings(caplog)
    assert (
        "The accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true), but this run is a single process" in warning
    )
    assert "with `use_cpu=True` it runs plain data parallelism" in warning


def test_a_plain_run_says_nothing(make_trainer, monkeypatch, tmp_path, caplog):
    for name in ("WORLD_SIZE", "ACCELERATE_USE_CPU", "MASTER_ADDR", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING):
        make_trainer(TDPOTrainer, tmp_path)
    assert launch_warnings(caplog) == ""


# ------------------------------------------------------------------------------------------------------------------
# As a user launches: `accelerate launch` with the tiny recipe (slow: each launch starts one or two interpreters)
# ------------------------------------------------------------------------------------------------------------------


def accelerate_launch(launcher_args: list[str], script_args: list[str]) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate is not None, "the `accelerate` launcher is not on PATH (pip install accelerate)"
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    command = [accelerate, "launch", *launcher_args, "--main_process_port", "0", "scripts/run_tdpo.py"]
    command += ["--config", "recipes/tdpo/tiny.yaml", *script_args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def quick_run(assets, output_dir) -> list[str]:
    return [*asset_args("tdpo", assets), "--output_dir", str(output_dir), "--max_steps", "1", "--eval_strategy", "no"]


@pytest.mark.slow
@pytest.mark.distributed
def test_launch_with_use_cpu_false_on_cpu_is_refused(assets, tmp_path):
    result = accelerate_launch(
        ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"],
        [*quick_run(assets, tmp_path / "run"), "--use_cpu", "false"],
    )
    assert result.returncode != 0
    assert "2 processes were started together (WORLD_SIZE=2" in result.stderr
    assert not (tmp_path / "run" / "checkpoint-1").exists()


@pytest.mark.slow
def test_launch_cpu_with_two_processes_warns_that_one_runs(assets, tmp_path):
    result = accelerate_launch(["--cpu", "--num_processes", "2"], quick_run(assets, tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "This run has ONE process, although `accelerate launch` was asked for several" in result.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_trl_fsdp2_config_on_cpu_warns_that_it_runs_ddp(assets, tmp_path):
    import trl

    config = Path(trl.__file__).parent / "accelerate_configs" / "fsdp2.yaml"
    result = accelerate_launch(
        ["--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no"],
        quick_run(assets, tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "asks for FSDP (ACCELERATE_USE_FSDP=true), but this run is plain data parallelism over 2" in result.stderr
