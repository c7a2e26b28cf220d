"""Nearest-neighbour search for candidate preselection: exact, or an IVF index (k-means coarse cells)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.cluster.vq
import torch
from torch import Tensor

KNN_INDEXES = ("exact", "ivf")


@dataclass(frozen=True)
class IndexConfig:
    """``kind``: "exact" (brute-force L2) or "ivf" (``n_lists`` k-means cells, ``n_probe`` searched)."""

    kind: str = "exact"
    n_lists: int = 32
    n_probe: int = 4


class NeighbourIndex:
    """k nearest (L2) rows of ``points [n, d]`` for each query row."""

    def __init__(self, points: Tensor, config: IndexConfig, seed: int):
        if config.kind not in KNN_INDEXES:
            raise ValueError(f"unknown kNN index {config.kind!r}. Valid: {', '.join(KNN_INDEXES)}")
        self.points, self.config = points.double(), config
        if config.kind == "ivf":
            n_lists = min(config.n_lists, len(points))
            centroids, labels = scipy.cluster.vq.kmeans2(self.points.cpu().numpy(), n_lists, minit="++",
                                                         seed=np.random.default_rng(seed))
            self.centroids = torch.as_tensor(centroids, dtype=torch.float64, device=points.device)
            self.labels = torch.as_tensor(labels, device=points.device)

    def search(self, queries: Tensor, k: int) -> Tensor:
        """``[len(queries), min(k, n)]`` indices into ``points``, nearest first (ties by index)."""
        queries, k = queries.double(), min(k, len(self.points))
        if self.config.kind == "exact":
            return torch.cdist(queries, self.points).topk(k, dim=1, largest=False, sorted=True).indices
        cells = torch.cdist(queries, self.centroids).topk(min(self.config.n_probe, len(self.centroids)), dim=1,
                                                          largest=False).indices
        rows = []
        for query, probe in zip(queries, cells, strict=True):
            candidates = torch.nonzero(torch.isin(self.labels, probe)).flatten()
            distances = torch.cdist(query[None], self.points[candidates])[0]
            order = distances.topk(min(k, len(candidates)), largest=False, sorted=True).indices
            found = candidates[order]
            rows.append(torch.cat([found, found.new_full((k - len(found),), -1)]))  # -1: fewer than k probed
        return torch.stack(rows)
