"""``ifbench peers``: ifbench's estimators beside the peers' implementations of the same methods.

Every registered peer adapter (``Estimator.peer``) runs next to its counterpart (``Estimator.counterpart``) on one
cell: the same task, θ̂, queries and columns (every training point), at the same thread count. Each side is
fitted and scored ``repeats`` times afresh, alternating, and the median wall time is kept; their agreement is
the Pearson correlation of all score entries. The rows go to ``RESULTS/peers.json``; the leaderboard renders
them as its "Peer implementations side by side" section, with ``ours / peer`` (below 1: ifbench is faster).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bench.context import fit_context
from bench.peers_report import PEERS_FILE as PEERS_FILE
from bench.peers_report import PeerRow as PeerRow
from bench.peers_report import load as load
from bench.peers_report import render as render
from bench.peers_report import save as save
from estimators.base import Estimator, FitContext
from tasks.base import Split, Task


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def timed_scores(cls: type[Estimator], ctx: FitContext, queries: Split, columns: torch.Tensor,
                 options: dict[str, Any] | None = None) -> tuple[float, np.ndarray]:
    """Wall seconds of a fresh instance's fit + score (with ``options`` over its defaults), and its scores ``[Q, J]``."""
    start = time.perf_counter()
    estimator = cls(dataclasses.replace(cls.Config(), **options) if options else None)
    estimator.fit(ctx)
    scores = estimator.score(queries, columns)
    return time.perf_counter() - start, scores.detach().cpu().double().numpy()


def compare_pair(ours: type[Estimator], peer: type[Estimator], task: Task, ctx: FitContext, queries: Split, *,
                 threads: int, repeats: int) -> PeerRow:
    """Time both sides ``repeats`` times, alternating (so drifts of a shared machine hit both alike)."""
    columns = torch.arange(ctx.n_train)
    from bench.formatting import option_text

    options = ", ".join(f"{k} = {option_text(v)}" for k, v in peer.counterpart_options.items())
    row = PeerRow(ours.name, options, peer.name, peer.peer, library_version(peer.peer), float("nan"), float("nan"),
                  float("nan"), task.name, len(queries), len(columns), threads, repeats)
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    try:
        for _ in range(repeats):
            seconds, ours_scores = timed_scores(ours, ctx, queries, columns, peer.counterpart_options)
            times["ours"].append(seconds)
            seconds, peer_scores = timed_scores(peer, ctx, queries, columns)
            times["peer"].append(seconds)
    except Exception as err:  # a library missing, not applicable or crashing: a row with its reason, the rest go on
        return dataclasses.replace(row, error=f"{type(err).__name__}: {err}")
    agreement = float(np.corrcoef(ours_scores.ravel(), peer_scores.ravel())[0, 1])
    return dataclasses.replace(row, ours_s=statistics.median(times["ours"]), peer_s=statistics.median(times["peer"]),
                               agreement=agreement)


def compare(pairs: Sequence[tuple[type[Estimator], type[Estimator]]], task: Task, *, threads: int, repeats: int,
            seed: int = 0, on_row: Callable[[PeerRow], None] | None = None) -> list[PeerRow]:
    """Train ``task``'s θ̂ once, then :func:`compare_pair` for each (ours, peer) on its queries and every
    training point."""
    torch.set_num_threads(threads)
    data = task.load_data()
    base = task.train(data)
    ctx = fit_context(task, data, base, seed)
    rows = []
    for ours, peer in pairs:
        rows.append(compare_pair(ours, peer, task, ctx, data.queries, threads=threads, repeats=repeats))
        if on_row is not None:
            on_row(rows[-1])
    return rows
