"""Peak memory of a measurement: host resident set (VmHWM) and GPU pools.

On Linux, writing "5" to /proc/self/clear_refs resets the peak resident set size (VmHWM),
so every measurement gets its own peak; elsewhere the process's lifetime peak
(``ru_maxrss``) is reported and marked as such.
"""

from __future__ import annotations

import resource
import sys

MIB = 1024 * 1024


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak() -> bool:
    """Reset the host peak (True when the platform allows it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / MIB if sys.platform == "darwin" else ru / 1024


class PeakMemory:
    """``with PeakMemory(gpu_xp, torch_cuda) as m: ...`` then m.host_mib, m.gpu_mib (None without a GPU)."""

    def __init__(self, xp=None, torch_cuda: bool = False):
        self.xp = xp
        self.torch_cuda = torch_cuda
        self.host_mib: float | None = None
        self.gpu_mib: float | None = None
        self.host_scope = "measurement"

    def __enter__(self):
        if not reset_peak():
            self.host_scope = "process lifetime (peak reset unsupported here)"
        if self.torch_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.host_mib = round(peak_rss_mib(), 1)
        gpu = []
        if self.xp is not None and self.xp.__name__ == "cupy":
            # CuPy keeps no peak counter; its pool holds every block it has needed, so its
            # total after the run is the peak of what the pool handed out.
            gpu.append(self.xp.get_default_memory_pool().total_bytes())
        if self.torch_cuda:
            import torch

            gpu.append(torch.cuda.max_memory_reserved())
        if gpu:
            self.gpu_mib = round(sum(gpu) / MIB, 1)
        return False
