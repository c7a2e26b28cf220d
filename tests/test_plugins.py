"""Third-party estimators: entry points of installed distributions, and one-file plug-ins."""

import json
import textwrap
from pathlib import Path

import pytest

from bench.catalog import default_registries
from bench.cli import main

PLUGIN_SOURCE = textwrap.dedent('''
    import torch
    from bench.registry import registered
    from estimators.influence import ExactInfluence

    @registered("{name}")
    class Mine(ExactInfluence):
        """A user's estimator: exact influence, re-registered."""
''')


def install_fake_distribution(root, monkeypatch):
    """A real distribution on sys.path: a module plus a dist-info with an entry point."""
    source = PLUGIN_SOURCE.format(name="demo-entry").replace('@registered("demo-entry")\n', "")
    (root / "ifbench_demo_plugin.py").write_text(source)
    dist = root / "ifbench_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ifbench-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ifbench.estimators]\ndemo-entry = ifbench_demo_plugin:Mine\n")
    monkeypatch.syspath_prepend(str(root))


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch)
    registry = default_registries().estimators
    assert "demo-entry" in registry.names()
    assert registry.origin("demo-entry") == "entry point (ifbench-demo-plugin)"
    assert registry.get("demo-entry").__name__ == "Mine"


def test_one_file_plugin_runs_through_check_estimator(tmp_path, capsys):
    plugin = tmp_path / "my_estimator.py"
    plugin.write_text(PLUGIN_SOURCE.format(name="my-if"))
    assert main(["check-estimator", "my-if", "--plugin", str(plugin)]) == 0
    out = capsys.readouterr().out
    assert "my-if: conforms" in out and "FAIL" not in out


def test_missing_plugin_file_is_a_clear_error(tmp_path, capsys):
    assert main(["list", "--plugin", str(tmp_path / "absent.py")]) == 2
    assert "absent.py" in capsys.readouterr().err


def readme_example() -> str:
    """The one-file estimator the README shows (the block after ``# my_estimator.py``)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return readme.split("# my_estimator.py\n", 1)[1].split("```", 1)[0]


def test_readme_example_estimator_conforms_and_matches_grad_dot(tmp_path, capsys):
    """The README's example is what a new user copies: it must conform, and it computes grad-dot's scores
    (scored in column blocks, so that ranking every training point of a large task fits in memory)."""
    plugin = tmp_path / "readme_estimator.py"
    plugin.write_text(readme_example())
    assert main(["check-estimator", "my-grad-dot", "--plugin", str(plugin)]) == 0
    assert "my-grad-dot: conforms" in capsys.readouterr().out
    suite = tmp_path / "s.toml"
    suite.write_text('name = "readme"\nthreads = 1\nbootstrap_resamples = 20\nestimators = ["my-grad-dot", "grad-dot"]\n'
                     '[[tasks]]\nname = "toy-logreg"\nprotocols = ["loo", "lds"]\n'
                     '[[protocols]]\nname = "loo"\nn_removed = 20\n[[protocols]]\nname = "lds"\nn_subsets = 8\n')
    results = tmp_path / "r"
    assert main(["run", "--suite", str(suite), "--results", str(results), "--plugin", str(plugin), "--no-progress"]) == 0
    records = {(r["protocol"], r["estimator"]): r for r in map(json.loads, (results / "records.jsonl").read_text().splitlines())}
    for protocol in ("loo", "lds"):
        mine, builtin = records[protocol, "my-grad-dot"], records[protocol, "grad-dot"]
        assert mine["status"] == builtin["status"] == "ok"
        assert mine["metrics"] == pytest.approx(builtin["metrics"], abs=1e-6)


def test_list_aligns_every_description_and_version_names_the_installed_package(tmp_path, capsys):
    import re
    from importlib.metadata import version

    plugin = tmp_path / "long_named.py"
    plugin.write_text(PLUGIN_SOURCE.format(name="an-estimator-with-a-very-long-name"))
    assert main(["list", "--plugin", str(plugin)]) == 0
    out = capsys.readouterr().out
    assert "an-estimator-with-a-very-long-name  A user's estimator" in out and "``" not in out
    sections = re.split(r"^(?:estimators|tasks|protocols):$", out, flags=re.MULTILINE)[1:]
    assert len(sections) == 3
    for section in sections:  # within a section, every description starts in the same column
        columns = {match.end() for line in section.splitlines() if (match := re.match(r"  \S+ +", line))}
        assert len(columns) == 1, section
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"ifbench {version('ifbench')}"


def test_the_readme_example_imports_from_the_plug_in_surface_only():
    imports = [line for line in readme_example().splitlines() if line.startswith(("import ", "from "))]
    ours = [line for line in imports if line.split()[1].split(".")[0] in ("bench", "estimators", "tasks")]
    assert ours == ["from estimators.api import Estimator, FitContext, FlatLoss, per_example_grads, registered"]


def test_a_file_placed_in_estimators_is_a_plug_in_keyed_by_its_source(tmp_path, monkeypatch):
    import sys

    import estimators
    from bench.keys import estimator_fingerprint

    folder = tmp_path / "placed"
    folder.mkdir()
    (folder / "placed_estimator.py").write_text(PLUGIN_SOURCE.format(name="placed-est"))
    monkeypatch.setattr(estimators, "__path__", [*estimators.__path__, str(folder)])
    monkeypatch.delitem(sys.modules, "estimators.placed_estimator", raising=False)
    registry = default_registries(entry_points=False).estimators
    assert registry.origin("placed-est") == "plug-in file estimators/placed_estimator.py"
    assert registry.origin("grad-dot") == "built-in"  # so `ifbench list` tags only the placed file
    before = estimator_fingerprint(registry.get("placed-est"))
    (folder / "placed_estimator.py").write_text(PLUGIN_SOURCE.format(name="placed-est") + "\n# edited\n")
    monkeypatch.delitem(sys.modules, "estimators.placed_estimator")
    after = estimator_fingerprint(default_registries(entry_points=False).estimators.get("placed-est"))
    assert before != after and before.startswith("v1-")  # the edit re-runs its cells
    grad_dot = registry.get("grad-dot")
    assert estimator_fingerprint(grad_dot) == f"v{grad_dot.version}"  # shipped modules: keyed by version alone
