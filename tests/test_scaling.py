"""``ifbench profile``: log-log slopes, a small sweep end to end, the leaderboard section."""

import math

import pytest

from bench import scaling
from bench.catalog import default_registries
from bench.cli import main


def test_slope_recovers_a_power_law_and_follows_it():
    xs = [100, 200, 400, 800]
    slope = scaling.fit_slope(xs, [3.0 * x**1.5 for x in xs])
    assert slope.slope == pytest.approx(1.5) and slope.low == pytest.approx(1.5) and slope.high == pytest.approx(1.5)
    assert slope.at(10_000) == pytest.approx(3.0 * 10_000**1.5)
    noisy = scaling.fit_slope(xs, [3.0 * x**1.5 * f for x, f in zip(xs, (1.1, 0.9, 1.05, 0.97), strict=True)])
    assert noisy.low < 1.5 < noisy.high and noisy.high - noisy.low > 0.01  # an interval, and it covers
    assert scaling.fit_slope([1, 2], [1, 2]) is None  # two points leave no interval


def test_a_small_sweep_measures_fits_and_renders(tmp_path):
    registry = default_registries(entry_points=False).estimators
    config = scaling.SweepConfig(n_train=(100, 200, 400), widths=(1, 2, 4), n_train_for_widths=100, n_queries=5,
                                 repeats=1)
    estimators = [(name, registry.get(name)) for name in ("grad-dot", "kfac", "loss")]
    points = scaling.sweep(estimators, ["n", "P"], config, progress=False)
    measured = [p for p in points if p.seconds is not None]
    assert {(p.estimator, p.axis) for p in measured} == {(e, a) for e in ("grad-dot", "kfac") for a in ("n", "P")}
    assert [p.note for p in points if p.estimator == "loss"] == ["no single scores"] * 6
    sizes = sorted({p.n_parameters for p in measured if p.axis == "P" and p.estimator == "kfac"})
    assert len(sizes) == 3 and sizes[0] < sizes[1] < sizes[2]  # the whole network at each width
    scaling.save(points, config, tmp_path)
    loaded, payload = scaling.load(tmp_path)
    assert loaded == points and payload["config"]["widths"] == [1, 2, 4]
    text = "\n".join(scaling.render(loaded, payload, ["figures/scaling.png"]))
    assert "## Scaling profile" in text and "| `kfac` |" in text and "*extrapolated*" in text
    slope = scaling.fits(loaded)["grad-dot", "n", "time"]
    assert math.isfinite(slope.slope)


def test_profile_refuses_a_bad_axis(tmp_path, capsys):
    assert main(["profile", "--results", str(tmp_path / "p"), "--axes", "q"]) == 2
    assert "--axes must name n and/or P, got q" in capsys.readouterr().err
    assert not (tmp_path / "p" / scaling.PROFILE_FILE).exists()
