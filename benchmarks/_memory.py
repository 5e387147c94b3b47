"""Peak resident memory of a region of code, on Linux.

`resource.getrusage(RUSAGE_SELF).ru_maxrss` is a high-water mark since the process started, so it also counts
whatever happened before the region (imports, model loading, dataset tokenization). Linux can reset the high-water
mark instead: writing `5` to `/proc/self/clear_refs` sets `VmHWM` to the current RSS. `PeakMemory` does that on
entry, and reports on exit the peak over the region (`VmHWM`) and its increase over the RSS at entry. Where the reset
is not permitted, it falls back to `ru_maxrss` (and says so with `exact=False`).
"""

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
