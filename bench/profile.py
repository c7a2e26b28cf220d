"""Wall time and peak memory of a phase (fit, score).

Host memory: peak resident set size during the phase, from Linux's VmHWM after
resetting it through ``/proc/self/clear_refs`` (exact, no sampling thread);
where that is unavailable, the process-lifetime peak from ``getrusage``.
GPU memory: ``torch.cuda.max_memory_allocated`` after a reset.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class PhaseProfile:
    """Filled in when the ``profiled`` block exits."""

    seconds: float = float("nan")
    peak_rss_mb: float = float("nan")
    peak_cuda_mb: float | None = None
    rss_method: str = ""


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(exact: bool) -> tuple[float, str]:
    if exact:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "vmhwm"
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024, "ru_maxrss"


@contextmanager
def profiled(device: torch.device | str = "cpu") -> Iterator[PhaseProfile]:
    """Measure the enclosed block: ``with profiled(dev) as p: ...; p.seconds``."""
    device = torch.device(device)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    profile = PhaseProfile()
    exact = _reset_peak_rss()
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield profile
    finally:
        if on_cuda:
            torch.cuda.synchronize(device)
            profile.peak_cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
        profile.seconds = time.perf_counter() - start
        profile.peak_rss_mb, profile.rss_method = _peak_rss_mb(exact)
