"""FastIF (Guo et al., EMNLP 2021): kNN preselection, then fast LiSSA influence on the candidates only.

For each query, only its ``k`` nearest training points in a feature space of
the model (penultimate features, or [CLS] on BERT tasks) are scored, with
classic influence whose s_test comes from LiSSA at fast settings (shallow
recursion, large batches). Points not preselected score exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.base import SINGLE, Estimator, FitContext, NotApplicable
from estimators.influence import LissaConfig, LissaInfluence
from estimators.knn import KNN_INDEXES, IndexConfig, NeighbourIndex
from estimators.options import at_least, one_of, within
from tasks.base import Split


@dataclass(frozen=True)
class FastIfConfig:
    """``k`` candidates per query (capped at n); ``features``: a feature space the task offers;
    ``index``: "exact" or "ivf" (approximate: ``n_lists`` cells, ``n_probe`` searched). The LiSSA
    fields default to if-lissa's (``scale = 0``: 1.25 × the top Hessian eigenvalue), and the shipped suites
    set them equal to its, so that FastIF differs from if-lissa by the kNN preselection alone: the paper's
    claim is that at the same solver, preselection finds the most influential points at a fraction of the
    cost. FastIF's own faster solver settings (depth 200, batch 512) are options, not a different method."""

    k: int = 1000
    features: str = "penultimate"
    index: str = "exact"
    n_lists: int = 32
    n_probe: int = 4
    depth: int = LissaConfig.depth
    batch_size: int = LissaConfig.batch_size
    repeats: int = LissaConfig.repeats
    scale: float = LissaConfig.scale
    damping: float = LissaConfig.damping
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64

    def __post_init__(self) -> None:
        at_least(1, k=self.k, n_lists=self.n_lists, n_probe=self.n_probe, depth=self.depth,
                 batch_size=self.batch_size, repeats=self.repeats, grad_chunk=self.grad_chunk)
        one_of("kNN index", self.index, KNN_INDEXES)
        at_least(0, scale=self.scale)
        within("damping", self.damping, 0, 1, why="LiSSA multiplies by 1 − damping each step")


@registered("fastif")
class FastIf(Estimator):
    """Influence of each query's k nearest training points (fast LiSSA); zero for the rest."""

    Config: ClassVar[type] = FastIfConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})
    uses_head_view: ClassVar[bool] = True
    version: ClassVar[str] = "3"  # 3: if-lissa's LiSSA settings by default; 2: LiSSA in float32

    @classmethod
    def runs_on_head_view(cls, config: FastIfConfig) -> bool:
        return super().runs_on_head_view(config) and config.features == "penultimate"

    def fit(self, ctx: FitContext) -> None:
        cfg = self.config
        if cfg.k < 1:
            raise ValueError(f"fastif: k must be ≥ 1, got {cfg.k}")
        if ctx.embed is None or cfg.features not in ctx.embedding_spaces:
            raise NotApplicable(f"the task offers no {cfg.features!r} feature space "
                                f"(it offers: {', '.join(ctx.embedding_spaces) or 'none'})")
        self.ctx = ctx
        self.influence = LissaInfluence(LissaConfig(depth=cfg.depth, repeats=cfg.repeats, batch_size=cfg.batch_size,
                                                    scale=cfg.scale, damping=cfg.damping, parameters=cfg.parameters,
                                                    grad_chunk=cfg.grad_chunk))
        self.influence.fit(ctx)
        index_config = IndexConfig(cfg.index, cfg.n_lists, cfg.n_probe)
        self.index = NeighbourIndex(ctx.embed(ctx.train, cfg.features), index_config, ctx.seed)
        self._info: dict[str, float] = {}

    def candidates(self, queries: Split) -> Tensor:
        """``[len(queries), n]`` bool: which training points each query scores."""
        neighbours = self.index.search(self.ctx.embed(queries, self.config.features), self.config.k)
        mask = torch.zeros(len(queries), self.ctx.n_train + 1, dtype=torch.bool, device=neighbours.device)
        mask.scatter_(1, torch.where(neighbours < 0, self.ctx.n_train, neighbours), True)  # -1 → spare column
        return mask[:, :-1]

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        mask = self.candidates(queries)[:, train_idx.to(self.index.points.device)].to(train_idx.device)
        scores = torch.zeros(len(queries), len(train_idx), dtype=torch.float32, device=train_idx.device)
        needed = mask.any(0)
        if bool(needed.any()):  # gradients only for columns some query preselected
            grads = self.influence.grads(self.ctx.train.subset(train_idx[needed]))
            full = self.influence.s_test(queries) @ grads.T / self.ctx.n_train
            scores[:, needed] = torch.where(mask[:, needed], full, torch.zeros_like(full)).float()
        self._info.update(candidates_per_query=float(mask.sum(1).double().mean()),
                          columns_scored=float(needed.sum()), columns=float(len(train_idx)))
        return scores

    def diagnostics(self) -> dict[str, float]:
        return {**self.influence.diagnostics(), **self._info, "k": float(min(self.config.k, self.ctx.n_train))}
