"""Checks a command makes before any work: the device, the results folder's name and that it can be written.
Torch is imported only when a CUDA device is asked for."""

from __future__ import annotations

import re
from pathlib import Path

from bench.config import ConfigError


def check_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one, before any folder is made (torch imported only then)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for but torch.cuda.is_available() is False; use --device cpu")


def slug(name: str) -> str:
    """A suite name as one safe folder name: never a path (no separators, no '..'), never empty."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-") or "suite"


def check_writable(results: Path) -> None:
    """Refuse a results folder that cannot be written, before any training."""
    if results.exists() and not results.is_dir():
        raise ConfigError(f"results path {results} exists and is not a folder")
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / ".ifbench-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"results folder {results} is not writable: {err.strerror or err}") from None


def split_names(values: list[str] | None) -> list[str] | None:
    """Accept both ``--x a b`` and ``--x a,b`` (None: not given)."""
    if values is None:
        return None
    return [part for value in values for part in value.split(",") if part]
