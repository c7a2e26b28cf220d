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
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.atomic import atomic_write
from bench.context import fit_context
from estimators.base import Estimator, FitContext
from tasks.base import Split, Task

PEERS_FILE = "peers.json"
PEERS_FORMAT = 1


@dataclass(frozen=True)
class PeerRow:
    """One (ours, peer) pair on one cell; times are medians of fit + score over ``repeats``, in seconds."""

    ours: str
    ours_options: str
    peer: str
    library: str
    library_version: str
    ours_s: float
    peer_s: float
    agreement: float
    task: str
    n_queries: int
    n_columns: int
    threads: int
    repeats: int
    error: str = ""

    @property
    def ratio(self) -> float:
        """ours / peer: below 1 means ifbench is faster."""
        return self.ours_s / self.peer_s if self.peer_s > 0 else float("nan")


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


def save(rows: Sequence[PeerRow], results_dir: Path) -> Path:
    from bench.environment import git_commit

    path = Path(results_dir) / PEERS_FILE
    payload = {"format": PEERS_FORMAT, "commit": git_commit(), "rows": [dataclasses.asdict(row) for row in rows]}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, sort_keys=True)))
    return path


def load(results_dir: Path) -> tuple[list[PeerRow], str] | None:
    """The rows ``ifbench peers`` saved and the commit it ran at, or None where it has not run (or wrote
    another format)."""
    path = Path(results_dir) / PEERS_FILE
    if not path.exists():
        return None
    payload: dict[str, Any] = json.loads(path.read_text())
    if payload.get("format") != PEERS_FORMAT:
        return None
    return [PeerRow(**row) for row in payload["rows"]], str(payload.get("commit", "unknown"))


def render(rows: Sequence[PeerRow], commit: str = "unknown") -> list[str]:
    """The leaderboard's section: one row per (ours, peer) pair."""
    if not rows:
        return []
    first = rows[0]
    lines = [
        "## Peer implementations side by side", "",
        f"ifbench's estimators beside other libraries' implementations of the same method, on `{first.task}` "
        f"({first.n_queries} queries × all {first.n_columns:,} training points as columns, the same θ̂), at "
        f"{first.threads} thread(s): fit + score wall seconds, the median of {first.repeats} alternating runs, "
        f"from `ifbench peers` at commit {commit[:12]}. *Agreement* is the Pearson correlation of the two score "
        "matrices' entries. *ours / peer* below 1 means ifbench is faster.", "",
        "| ours | peer | library | ours s | peer s | agreement | ours / peer |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ours = f"`{row.ours}`" + (f" ({row.ours_options})" if row.ours_options else "")
        if row.error:
            lines.append(f"| {ours} | `{row.peer}` | {row.library} {row.library_version} | – | – | – | "
                         f"failed: {row.error.replace('|', '/')} |")
            continue
        lines.append(f"| {ours} | `{row.peer}` | {row.library} {row.library_version} | {row.ours_s:.3g} | "
                     f"{row.peer_s:.3g} | {row.agreement:.4f} | {row.ratio:.2f} |")
    return [*lines, ""]
