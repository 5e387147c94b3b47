"""Files the package writes for a later run to read: written whole or not at all, and fingerprinted.

A run that is killed (pre-emption, `kill -9`, a lost node) or that fills the disk while it writes a file must not leave
a file that a later run reads as if it were complete. So every such file (the reference cache, `compute_token_rewards.py`
's data and info file, a checkpoint's manifest, the tiny dataset) is written to a temporary file beside it and renamed
over the final name once it is complete ([`atomic_write`]): a reader sees the old file or the new one, never half of
one. A rename is atomic on one filesystem (POSIX `rename`, and `os.replace` on Windows).

The temporary files are named `.<name>.tmp-<host>-<pid>-<random>`: hidden (so `load_dataset(folder)` skips them), and
naming the process that writes them, so that the orphans of a killed writer are recognised and removed by the next
run on that host ([`remove_orphan_temporaries`]) without touching a file that a live process is still writing.

[`file_digest`] is the content fingerprint the manifests and info files record (xxHash's XXH3-128: a checksum against
accidental corruption, a bad copy, a truncated transfer; not a defence against a deliberate forgery). It hashes
12–14 GB/s of data already in memory on one core of our CPU machine (CPU time, a 256 MiB buffer in 16 MiB updates),
far more than a disk delivers: what a fingerprint costs is reading the file.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

import xxhash


DIGEST_NAME = "xxh3_128"
_READ_CHUNK = 8 << 20
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host_tag() -> str:
    """This machine's name as it appears in a temporary name (without `-`, which separates the name's fields)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temporary_path(path: str | os.PathLike) -> Path:
    """A new temporary name beside `path`, naming this host and process (see [`remove_orphan_temporaries`])."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_atomically(temporary: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the complete file `temporary` over `path` (on one filesystem: atomic), after flushing it to disk, so
    that even a machine that loses power right after holds either the old file or the whole new one."""
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_folder(Path(path).parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """`open(path, mode)` whose content appears at `path` only once the `with` block has completed: the file is
    written under a temporary name beside `path` and renamed over it at the end. If the block raises, the temporary
    file is removed and `path` is left as it was.

    ```python
    with atomic_write("info.json") as file:
        json.dump(info, file)
    ```
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write writes a whole file: mode must contain 'w', got {mode!r}.")
    temporary = temporary_path(path)
    try:
        with open(temporary, mode, encoding=None if "b" in mode else encoding) as file:
            yield file
        replace_atomically(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_json_atomically(path: str | os.PathLike, content, **dump_kwargs) -> None:
    """`json.dump(content)` into `path`, atomically (see [`atomic_write`])."""
    with atomic_write(path) as file:
        json.dump(content, file, **dump_kwargs)


def file_digest(path: str | os.PathLike) -> str:
    """The hexadecimal XXH3-128 digest of the file's bytes."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> dict:
    """`{"size": bytes, "xxh3_128": digest}`: what a manifest or an info file records of a file it describes."""
    return {"size": os.path.getsize(path), DIGEST_NAME: file_digest(path)}


def fingerprint_mismatch(path: str | os.PathLike, expected: dict) -> str | None:
    """Why the file at `path` is not the one `expected` ([`file_fingerprint`]) describes, or None when it is. The size
    is compared first: a truncated file is named as such without reading it."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if expected.get("size") is not None and size != expected["size"]:
        return f"{path} has {size:,} bytes where {expected['size']:,} were written (truncated or replaced)"
    if expected.get(DIGEST_NAME) is not None and file_digest(path) != expected[DIGEST_NAME]:
        return (
            f"{path} does not hold the bytes that were written (its {DIGEST_NAME} checksum differs: changed after it "
            "was written, a bad copy or a disk error)"
        )
    return None


def process_is_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_orphan_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files (and staged folders, named by [`temporary_path`] too) in `folder` whose writer is
    gone: written on this host by a process that no longer runs (e.g. a precompute killed while it wrote its cache file). Files of live processes and
    of other hosts are left alone. Returns the deleted paths."""
    host, removed = _host_tag(), []
    with contextlib.suppress(OSError):
        for entry in os.scandir(Path(folder)):
            match = _TEMPORARY.match(entry.name)
            if match is None or match["host"] != host or entry.is_symlink():
                continue
            pid = int(match["pid"])
            if pid == os.getpid() or process_is_running(pid):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir():  # a folder staged whole (`compute_token_rewards.py --output_format disk`)
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(entry.path)
    return removed
