"""Seeded, deterministic train/test splits and query sets shared by every task."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bench.seeding import rng
from tasks.base import Split, Task, TaskData


def check_sizes(n_train: int, n_test: int, n_queries: int) -> None:
    """Refuse split sizes no task can use (checked when a suite is planned, not after training)."""
    if n_train < 2:
        raise ValueError(f"n_train must be ≥ 2, got {n_train}")
    if n_test < 1:
        raise ValueError(f"n_test must be ≥ 1, got {n_test}")
    if not 1 <= n_queries <= n_test:
        raise ValueError(f"n_queries must be in 1..n_test={n_test}, got {n_queries}")


def check_finite(name: str, value: float, *, positive: bool = False) -> None:
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '≥ 0'}, got {value}")


def seeded_query_idx(task: Task, n_test: int, n_queries: int) -> Tensor:
    """Sorted indices into the test split, drawn from ``(task.seed, task.name, "queries")``."""
    if not 0 < n_queries <= n_test:
        raise ValueError(f"{task.name}: n_queries must be in 1..n_test={n_test}, got {n_queries}")
    chosen = np.sort(rng(task.seed, task.name, "queries").choice(n_test, n_queries, replace=False))
    return torch.as_tensor(chosen, device=task.device)


def fixed_splits(task: Task, train: Split, test: Split, n_queries: int) -> TaskData:
    """Given train and test splits (on any device) plus a seeded query set, on ``task.device``."""
    return TaskData(train.to(task.device), test.to(task.device), seeded_query_idx(task, len(test), n_queries))


def seeded_splits(task: Task, x: Tensor, y: Tensor, n_train: int, n_test: int, n_queries: int) -> TaskData:
    """Seeded disjoint train/test split of ``x, y`` (from ``(task.seed, task.name, "split")``) and queries."""
    if n_train + n_test > len(y):
        raise ValueError(f"{task.name}: n_train + n_test = {n_train + n_test} exceeds the {len(y)} examples")
    order = torch.as_tensor(rng(task.seed, task.name, "split").permutation(len(y)))
    train_idx, test_idx = order[:n_train], order[n_train : n_train + n_test]
    return fixed_splits(task, Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx]), n_queries)
