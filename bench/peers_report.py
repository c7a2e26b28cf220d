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
    #: the commit this row was measured at (rows of a file written before rows had one: the file's commit)
    commit: str = ""

    @property
    def ratio(self) -> float:
        """ours / peer: below 1 means ifbench is faster."""
        return self.ours_s / self.peer_s if self.peer_s > 0 else float("nan")


def save(rows: Sequence[PeerRow], results_dir: Path, *, merge: bool = False) -> Path:
    """Write ``rows`` (stamped with this commit) to ``RESULTS/peers.json``; ``merge`` keeps the file's rows for
    the pairs not measured now, each with the commit it was measured at, in their order, the new rows after."""
    from bench.environment import git_commit

    commit = git_commit()
    fresh = [dataclasses.replace(row, commit=commit) for row in rows]
    kept: list[PeerRow] = []
    if merge and (loaded := load(results_dir)) is not None:
        measured = {_pair(row) for row in fresh}
        kept = [row for row in loaded[0] if _pair(row) not in measured]
    path = Path(results_dir) / PEERS_FILE
    payload = {"format": PEERS_FORMAT, "commit": commit, "rows": [dataclasses.asdict(row) for row in [*kept, *fresh]]}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, sort_keys=True)))
    return path


def _pair(row: PeerRow) -> tuple[str, str, str, str]:
    return row.ours, row.ours_options, row.peer, row.task


def load(results_dir: Path) -> tuple[list[PeerRow], str] | None:
    """The rows ``ifbench peers`` saved (each with the commit it was measured at) and the file's latest commit,
    or None where it has not run (or wrote another format)."""
    path = Path(results_dir) / PEERS_FILE
    if not path.exists():
        return None
    payload: dict[str, Any] = json.loads(path.read_text())
    if payload.get("format") != PEERS_FORMAT:
        return None
    commit = str(payload.get("commit", "unknown"))
    rows = [PeerRow(**row) for row in payload["rows"]]
    return [row if row.commit else dataclasses.replace(row, commit=commit) for row in rows], commit


def _commits_sentence(rows: Sequence[PeerRow], commit: str) -> str:
    """Where the rows were measured: one commit, or each commit with the pairs measured there."""
    by_commit: dict[str, list[str]] = {}
    for row in rows:
        by_commit.setdefault(row.commit or commit, []).append(f"`{row.peer}`")
    if len(by_commit) == 1:
        return f"from `ifbench peers` at commit {next(iter(by_commit))[:12]}"
    parts = [f"{c[:12]} ({', '.join(peers)})" for c, peers in sorted(by_commit.items(), key=lambda item: -len(item[1]))]
    return "from `ifbench peers` runs at commits " + "; ".join(parts)


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
        f"{_commits_sentence(rows, commit)}. *Agreement* is the Pearson correlation of the two score "
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
