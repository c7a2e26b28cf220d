"""One root seed, many derived seeds: each consumer gets its own stream."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(root: int, *keys: object) -> int:
    """A 63-bit seed determined by the root seed and the keys (names, indices)."""
    text = "/".join([str(int(root)), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def rng(root: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(root, *keys))


def torch_generator(root: int, *keys: object) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derive_seed(root, *keys))
    return generator
