"""The peers section's records and report: ``peers.json`` (what ``ifbench peers`` measured) and its
markdown. No torch: the leaderboard renders it without the compute stack (the measuring is :mod:`bench.peers`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.atomic import atomic_write

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
