"""``ifbench peers``: pairs timed side by side, saved, loaded and rendered; peers stay out of ``"all"``."""

import dataclasses
import json
from typing import ClassVar

import pytest

from bench import peers
from bench.catalog import default_registries
from bench.leaderboard import render_markdown
from bench.planning import own_estimators
from estimators.tracin import GradDot
from tasks.logreg import ToyLogReg


class TwiceGradDot(GradDot):
    """A stand-in adapter: grad-dot's scores doubled, declared as another library's."""

    name = "twice-grad-dot"
    peer: ClassVar[str] = "numpy"
    counterpart: ClassVar[str] = "grad-dot"

    def score(self, queries, train_idx):
        return 2 * super().score(queries, train_idx)


def test_a_pair_is_timed_and_agrees_where_the_scores_are_proportional(tmp_path):
    task = ToyLogReg(ToyLogReg.presets["default"], seed=0)
    seen = []
    rows = peers.compare([(GradDot, TwiceGradDot)], task, threads=1, repeats=2, on_row=seen.append)
    (row,) = rows
    assert seen == rows and row.error == "" and row.library == "numpy" and row.library_version != "not installed"
    assert row.agreement == pytest.approx(1.0, abs=1e-6) and row.ours_s > 0 and row.peer_s > 0
    assert (row.n_queries, row.n_columns, row.repeats) == (15, 60, 2)
    peers.save(rows, tmp_path)
    loaded, commit = peers.load(tmp_path)
    assert commit and loaded == [dataclasses.replace(r, commit=commit) for r in rows]
    section = "\n".join(peers.render(rows, commit))
    assert "## Peer implementations side by side" in section and "| `grad-dot` | `twice-grad-dot` | numpy" in section
    assert f"| {row.ratio:.2f} |" in section


def test_a_peer_that_cannot_run_is_a_row_with_its_reason(tmp_path):
    class Missing(TwiceGradDot):
        name = "missing"
        peer: ClassVar[str] = "no-such-library"

        def fit(self, ctx):
            raise ImportError("no-such-library is not installed: pip install 'ifbench[peers]'")

    task = ToyLogReg(ToyLogReg.presets["smoke"], seed=0)
    (row,) = peers.compare([(GradDot, Missing)], task, threads=1, repeats=1)
    assert row.error.startswith("ImportError: no-such-library") and row.library_version == "not installed"
    assert "failed: ImportError" in "\n".join(peers.render([row]))


def test_peers_json_of_another_format_is_ignored_and_the_section_joins_the_leaderboard(tmp_path):
    (tmp_path / peers.PEERS_FILE).write_text(json.dumps({"format": 0, "rows": []}))
    assert peers.load(tmp_path) is None
    assert "Peer implementations" in render_markdown([], sections=["## Peer implementations side by side"])


def test_all_means_ifbenchs_own_estimators():
    registries = default_registries(entry_points=False)
    adapters = [n for n in registries.estimators.names() if registries.estimators.get(n).peer]
    own = own_estimators(registries)
    assert not set(adapters) & set(own) and set(adapters) | set(own) == set(registries.estimators.names())
    assert "grad-dot" in own


def test_merge_keeps_the_pairs_not_measured_now_with_their_commits(tmp_path):
    """``ifbench peers --merge``: rows of pairs not compared now stay, each naming the commit it was measured
    at (a file written before rows had one: its own commit); a pair compared again is replaced."""
    row = dict(ours_options="", library="lib", library_version="1", ours_s=1.0, peer_s=2.0, agreement=1.0,
               task="toy", n_queries=1, n_columns=2, threads=1, repeats=1)
    old = [dict(row, ours="a", peer="peer-a"), dict(row, ours="b", peer="peer-b")]
    (tmp_path / peers.PEERS_FILE).write_text(json.dumps({"format": 1, "commit": "0ldc0mmit000", "rows": old}))
    again = peers.PeerRow(**dict(row, ours="b", peer="peer-b", ours_s=0.5))
    peers.save([again], tmp_path, merge=True)
    loaded, commit = peers.load(tmp_path)
    assert [(r.peer, r.ours_s, r.commit) for r in loaded] == [("peer-a", 1.0, "0ldc0mmit000"), ("peer-b", 0.5, commit)]
    assert commit != "0ldc0mmit000"
    section = "\n".join(peers.render(loaded, commit))
    assert f"runs at commits 0ldc0mmit000 (`peer-a`); {commit[:12]} (`peer-b`)" in section or \
        f"runs at commits {commit[:12]} (`peer-b`); 0ldc0mmit000 (`peer-a`)" in section
    peers.save([again], tmp_path)  # without --merge the file holds what was measured now
    assert [r.peer for r in peers.load(tmp_path)[0]] == ["peer-b"]
