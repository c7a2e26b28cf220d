"""Wall time and memory of a phase (fit, score): what a cell records as its cost (``ifbench profile``, the
scaling sweep, is :mod:`bench.scaling`).

Host memory is sampled: a background thread reads the process's resident set
size (``/proc/self/statm``) every ``SAMPLE_SECONDS`` during the phase, so the
peak of a spike shorter than that can be missed. Nothing is reset, so outside
tools (``/usr/bin/time``, ``getrusage``) still see the process's true peak.
Recorded per phase: the process's peak RSS, and the phase's own increment over
the RSS when it started (what the estimator itself added). Where ``/proc`` is
missing, the process-lifetime peak from ``getrusage`` stands in and the
increment is unknown. GPU memory: ``torch.cuda.max_memory_allocated`` after a
reset (the peak CUDA allocation of the phase).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20
SAMPLE_SECONDS = 0.005


@dataclass
class PhaseProfile:
    """Filled in when the ``profiled`` block exits."""

    seconds: float = float("nan")
    peak_rss_mb: float = float("nan")
    baseline_rss_mb: float | None = None
    rss_increase_mb: float | None = None
    peak_cuda_mb: float | None = None
    rss_method: str = ""


def current_rss_mb(pid: int | str = "self") -> float | None:
    """A process's (default: this one's) resident set size now, or None without ``/proc``."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_MB
    except (OSError, IndexError, ValueError):
        return None


class _Sampler(threading.Thread):
    """Tracks the largest RSS seen until stopped."""

    def __init__(self, first: float):
        super().__init__(daemon=True, name="ifbench-rss-sampler")
        self.peak = first
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            rss = current_rss_mb()
            if rss is not None and rss > self.peak:
                self.peak = rss

    def stop(self) -> float:
        self.done.set()
        self.join()
        last = current_rss_mb()
        return max(self.peak, last if last is not None else self.peak)


@contextmanager
def profiled(device: torch.device | str = "cpu") -> Iterator[PhaseProfile]:
    """Measure the enclosed block: ``with profiled(dev) as p: ...; p.seconds, p.peak_rss_mb``."""
    device = torch.device(device)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    profile = PhaseProfile()
    baseline = current_rss_mb()
    sampler = _Sampler(baseline) if baseline is not None else None
    if sampler is not None:
        sampler.start()
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
        if sampler is not None and baseline is not None:
            profile.peak_rss_mb, profile.baseline_rss_mb = sampler.stop(), baseline
            profile.rss_increase_mb = profile.peak_rss_mb - baseline
            profile.rss_method = f"sampled every {SAMPLE_SECONDS * 1000:g} ms"
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
            profile.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024
            profile.rss_method = "process-lifetime peak (ru_maxrss)"
