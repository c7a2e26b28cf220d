"""Third-party estimators: entry points of installed distributions, and one-file plug-ins."""

import textwrap

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
