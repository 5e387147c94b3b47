"""Peak resident memory of a region of code, on Linux.

`resource.getrusage(RUSAGE_SELF).ru_maxrss` is a high-water mark since the process started, so it also counts
whatever happened before the region (imports, model loading, dataset tokenization). Linux can reset the high-water
mark instead: writing `5` to `/proc/self/clear_refs` sets `VmHWM` to the current RSS. `PeakMemory` does that on
entry, and reports on exit the peak over the region (`VmHWM`) and its increase over the RSS at entry. Where the reset
is not permitted, it falls back to `ru_maxrss` (and says so with `exact=False`).

`PhasePeakMemory` does the same for named phases of a region (e.g. the LM-head pass inside a training step), returning
freed memory to the OS at each phase boundary (`release_free_memory`), and on a GPU with `torch.cuda`'s counters.
"""

import contextlib
import ctypes
import re
import resource


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as file:
            match = re.search(rf"^{field}:\s+(\d+) kB", file.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


class PeakMemory:
    """`with PeakMemory() as memory: ...` then `memory.peak_rss_mb`, `memory.peak_delta_mb`, `memory.exact`."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")
            self.exact = _status_kb("VmHWM") is not None
        except OSError:
            self.exact = False
        self.start_rss_mb = current_rss_mb()
        return self

    def __exit__(self, *exc):
        hwm_kb = _status_kb("VmHWM") if self.exact else None
        if hwm_kb is None:
            hwm_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        self.peak_rss_mb = hwm_kb / 1024
        self.peak_delta_mb = self.peak_rss_mb - self.start_rss_mb
        return False


def release_free_memory() -> None:
    """Return the C allocator's freed pages to the OS (glibc `malloc_trim`), so that the resident set is the memory
    in use: freed blocks below glibc's mmap threshold otherwise stay resident and are reused by later allocations,
    which hides them from a later high-water mark. A no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


class PhasePeakMemory:
    """Peak memory of a region split into named phases, e.g. the LM-head pass inside a training step.

    `with PhasePeakMemory() as memory:` measures the region like [`PeakMemory`] (`memory.peak_rss_mb`,
    `memory.start_rss_mb`, `memory.peak_delta_mb`); inside it, `with memory.phase("lm_head_forward"): ...` closes the
    current segment, returns freed memory to the OS (`release_free_memory`) and resets the high-water mark, so that
    the phase's own peak is known. `memory.phases[name]` then holds, over every segment of that phase, `peak_mb` (the
    highest resident set reached in it), `rise_mb` (the largest rise of the resident set within one segment over its
    level at the segment's start: what the phase itself allocates) and `segments`. Time outside any phase is the phase
    `"other"`. Phases nest: time in a nested phase counts for the nested one only, and the outer phase resumes with a
    fresh segment (so a phase called once with one nested call inside has two segments).

    `backend="cuda"` measures `torch.cuda.max_memory_allocated` the same way (for GPU runs); "rss" is the resident set
    of this process (Linux, `/proc/self/clear_refs`; `exact=False` and no phases where that reset is not permitted).
    """

    def __init__(self, backend: str = "rss"):
        if backend not in ("rss", "cuda"):
            raise ValueError(f"backend must be 'rss' or 'cuda', got {backend!r}")
        self.backend = backend
        self.active = False

    def _current_mb(self) -> float:
        if self.backend == "cuda":
            import torch

            return torch.cuda.memory_allocated() / 2**20
        return current_rss_mb()

    def _peak_mb(self) -> float:
        if self.backend == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        hwm_kb = _status_kb("VmHWM") if self.exact else None
        if hwm_kb is None:
            hwm_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return hwm_kb / 1024

    def _open_segment(self) -> None:
        if self.backend == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_memory()
            if self.exact:
                _reset_high_water_mark()
        self._segment_start_mb = self._current_mb()

    def _close_segment(self) -> None:
        if self.backend == "cuda":
            import torch

            torch.cuda.synchronize()
        peak = self._peak_mb()
        self.peak_rss_mb = max(self.peak_rss_mb, peak)
        record = self.phases.setdefault(self._stack[-1], {"peak_mb": 0.0, "rise_mb": 0.0, "segments": 0})
        record["peak_mb"] = max(record["peak_mb"], peak)
        record["rise_mb"] = max(record["rise_mb"], peak - self._segment_start_mb)
        record["segments"] += 1

    def __enter__(self):
        self.exact = True if self.backend == "cuda" else _reset_high_water_mark()
        if self.backend == "rss":
            release_free_memory()
        self.phases, self._stack = {}, ["other"]
        self._open_segment()
        self.start_rss_mb = self.peak_rss_mb = self._segment_start_mb
        self.active = True
        return self

    @contextlib.contextmanager
    def phase(self, name: str):
        if not (self.active and self.exact):  # outside the region, or no resettable high-water mark
            yield
            return
        self._close_segment()
        self._stack.append(name)
        self._open_segment()
        try:
            yield
        finally:
            self._close_segment()
            self._stack.pop()
            self._open_segment()

    def __exit__(self, *exc):
        self._close_segment()
        self.active = False
        self.peak_delta_mb = self.peak_rss_mb - self.start_rss_mb
        return False
