"""Facts about the software and machine recorded with every result."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import warnings
from functools import cache
from pathlib import Path

PACKAGES = ("ifbench", "torch", "torchvision", "numpy", "scipy", "transformers")


@cache
def git_commit() -> str:
    """``git describe --always --dirty`` of the source tree, or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache
def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {platform.processor() or platform.machine()}"


def silence_known_warnings() -> None:
    """torch's forward-mode AD loads jit decompositions on first use and warns about its own jit.script."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
