"""What the checkpoint manifest and the resume checks cost on a large checkpoint (`trl_tokenpref/checkpoints.py`).

Writes a checkpoint the way `Trainer._save_checkpoint` writes a full fine-tune's: `model.safetensors` (the weights),
`optimizer.pt` (AdamW's two moments: twice the weights, in float32) and the small files, then times, against that save:

* `write`: `write_checkpoint_manifest`, the last step of every save (sizes and XXH3-128 checksums of every file), right
  after the save, as in training (the files are still in the page cache);
* `verify (warm)`: `verify_checkpoint` on the same files (the manifest's checksums and the weights' finiteness);
* `verify (cold)`: the same after the files were evicted from the page cache (`posix_fadvise(DONTNEED)`), as at a
  resume on a machine that did not write them;
* `load (cold)`: what a resume reads anyway (`safetensors.torch.load_file` of the weights and `torch.load` of the
  optimizer state), cold, for comparison.

```bash
.venv/bin/python benchmarks/checkpoint_manifest.py --weights_gib 2 --folder /tmp/manifest-bench
```
Writes `benchmarks/results/checkpoint_manifest.json` unless `--no-write`. The folder is removed at the end.
"""

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trl_tokenpref.checkpoints import _verified, verify_checkpoint, write_checkpoint_manifest


RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_manifest.json"


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (written back first): the next read comes from the disk."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def write_checkpoint(folder: Path, weights_gib: float, tensor_mib: int = 256) -> float:
    """A checkpoint with `weights_gib` GiB of float32 weights and an AdamW state of twice that; returns the seconds its
    save took (the weights, the optimizer state, the small files; in the page cache, as `Trainer` leaves them)."""
    numel = tensor_mib * 2**20 // 4
    count = max(1, round(weights_gib * 1024 / tensor_mib))
    weights = {f"layers.{i}.weight": torch.randn(numel) for i in range(count)}
    optimizer = {
        "state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(numel), "exp_avg_sq": torch.rand(numel)}
                  for i in range(count)},
        "param_groups": [{"lr": 1e-5, "params": list(range(count))}],
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer, folder / "optimizer.pt")
    torch.save({"last_epoch": 10}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights_gib", type=float, default=2.0, help="GiB of weights (the optimizer state is 2x).")
    parser.add_argument("--folder", default="/tmp/checkpoint-manifest-bench", help="Where to write the checkpoint.")
    parser.add_argument("--no-write", action="store_true", help="Print the result only.")
    args = parser.parse_args()
    checkpoint = Path(args.folder) / "checkpoint-10"
    shutil.rmtree(args.folder, ignore_errors=True)
    try:
        save = write_checkpoint(checkpoint, args.weights_gib)
        size = sum(path.stat().st_size for path in checkpoint.iterdir())
        write = timed(lambda: write_checkpoint_manifest(str(checkpoint), {}))
        verify_warm = timed(lambda: verify_checkpoint(str(checkpoint)))
        assert verify_checkpoint(str(checkpoint)).complete
        _verified.clear()
        evict(checkpoint)
        verify_cold = timed(lambda: verify_checkpoint(str(checkpoint)))
        evict(checkpoint)
        load_cold = timed(lambda: (load_file(str(checkpoint / "model.safetensors")),
                                   torch.load(checkpoint / "optimizer.pt", weights_only=True)))  # fmt: skip
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)
    result = {
        "checkpoint_gib": round(size / 2**30, 2),
        "seconds": {
            "save": round(save, 2),
            "write": round(write, 2),
            "verify (warm)": round(verify_warm, 2),
            "verify (cold)": round(verify_cold, 2),
            "load (cold)": round(load_cold, 2),
        },
        "write / save": round(write / save, 3),
        "verify (cold) / load (cold)": round(verify_cold / load_cold, 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    print(json.dumps(result, indent=1))
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
