"""``ifbench profile``: log-log slopes, a small sweep end to end, resuming, a stopped point, the leaderboard section."""

import dataclasses
import math
import textwrap

import pytest

from bench import scaling, scaling_report
from bench.catalog import default_registries
from bench.cli import main

pytestmark = pytest.mark.slow  # sweeps that fit estimators at several sizes


def test_slope_recovers_a_power_law_and_follows_it():
    xs = [100, 200, 400, 800]
    slope = scaling.fit_slope(xs, [3.0 * x**1.5 for x in xs])
    assert slope.slope == pytest.approx(1.5) and slope.low == pytest.approx(1.5) and slope.high == pytest.approx(1.5)
    assert slope.at(10_000) == pytest.approx(3.0 * 10_000**1.5)
    noisy = scaling.fit_slope(xs, [3.0 * x**1.5 * f for x, f in zip(xs, (1.1, 0.9, 1.05, 0.97), strict=True)])
    assert noisy.low < 1.5 < noisy.high and noisy.high - noisy.low > 0.01  # an interval, and it covers
    low, high = noisy.span(10_000)  # the interval's slopes through the points' centre, far outside the range
    assert low < noisy.at(10_000) < high and low < 3.0 * 10_000**1.5 < high
    assert slope.span(10_000) == pytest.approx((slope.at(10_000), slope.at(10_000)))
    two = scaling.fit_slope([10, 20], [1.0, 8.0])  # the line through them, without an interval
    assert two.slope == pytest.approx(3.0) and math.isnan(two.low) and math.isnan(two.high)
    assert scaling.fit_slope([10, 10], [1.0, 8.0]) is None and scaling.fit_slope([10], [1.0]) is None


def test_the_p_axis_ridge_makes_the_whole_resnets_hessian_positive_definite():
    import torch

    from bench.context import fit_context
    from estimators.autodiff import FlatLoss
    from estimators.influence import full_hessian
    from tasks.resnet import MnistResNet

    task = MnistResNet(dataclasses.replace(MnistResNet.presets["smoke"], n_train=100, n_test=50, n_queries=2,
                                           width=1), seed=0)
    data = task.load_data()
    ctx = fit_context(task, data, task.train(data), seed=0)
    ridge = scaling.convexifying_ridge(ctx)
    flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss)
    spectrum = torch.linalg.eigvalsh(full_hessian(flat, ctx.train, ctx.l2).double())
    low, high = float(spectrum.min()), float(spectrum.max())
    assert low < 0  # the case it is for: the trained ResNet is not convex
    assert low + ridge > 0  # positive definite: the shift doubles a Ritz value that lies between low and 0
    # Ritz values lie inside the spectrum: the ridge never exceeds its rule applied to the exact extremes
    assert ridge <= 2 * -low + high / scaling.P_AXIS_CONDITION + 1e-6 * high


SMALL = scaling.SweepConfig(n_train=(100, 200, 400), n_queries=(2, 4, 8), n_train_for_queries=100, widths=(1, 2, 4),
                            n_train_for_widths=100, queries=5, repeats=1)


def test_a_small_sweep_measures_fits_and_renders(tmp_path):
    registry = default_registries(entry_points=False).estimators
    config = SMALL
    estimators = [(name, registry.get(name)) for name in ("grad-dot", "kfac", "loss")]
    points = scaling.sweep(estimators, ["n", "Q", "P"], config, progress=False, isolate=False)
    measured = [p for p in points if p.seconds is not None]
    assert {(p.estimator, p.axis) for p in measured} == {(e, a) for e in ("grad-dot", "kfac") for a in ("n", "Q", "P")}
    assert [p.note for p in points if p.estimator == "loss"] == ["no single scores"] * 9
    assert sorted(p.x() for p in measured if p.axis == "Q" and p.estimator == "grad-dot") == [2, 4, 8]
    sizes = sorted({p.n_parameters for p in measured if p.axis == "P" and p.estimator == "kfac"})
    assert len(sizes) == 3 and sizes[0] < sizes[1] < sizes[2]  # the whole network at each width
    scaling.save(points, config, tmp_path)
    loaded, payload = scaling.load(tmp_path)
    assert loaded == points and payload["config"]["widths"] == [1, 2, 4]
    text = "\n".join(scaling.render(loaded, payload, ["figures/scaling.png"]))
    assert "## Scaling profile" in text and "| `kfac` |" in text and "*extrapolated*" in text
    slope = scaling.fits(loaded)["grad-dot", "n", "time"]
    assert math.isfinite(slope.slope) and ("grad-dot", "Q", "time") in scaling.fits(loaded)
    assert [path.name for path in scaling.figure(loaded, tmp_path / "figures")] == ["scaling.png"]


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    registry = default_registries(entry_points=False).estimators
    estimators = [(name, registry.get(name)) for name in ("grad-dot", "random")]

    def save_then_stop(points):
        scaling.save(points, SMALL, tmp_path)
        if len(points) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scaling.sweep(estimators, ["n"], SMALL, progress=False, isolate=False, on_point=save_then_stop)
    import torch

    done = scaling.resumable(tmp_path, SMALL, torch.get_num_threads())
    assert len(done) == 3
    new = []
    points = scaling.sweep(estimators, ["n"], SMALL, progress=False, isolate=False, done=done,
                           on_point=lambda so_far: new.append(so_far[-1]))
    assert points[:3] == done and len(new) == 3 and len(points) == 6  # only the three missing points ran
    assert {p.where for p in points} == {(e, "n", n, 5, 0) for e in ("grad-dot", "random") for n in (100, 200, 400)}
    assert scaling.resumable(tmp_path, SMALL, torch.get_num_threads() + 1) == []  # other threads: measured again


SLOW = textwrap.dedent('''
    import time
    from bench.registry import registered
    from estimators.baselines import RandomScores

    @registered("zz-slow")
    class Slow(RandomScores):
        """Never finishes fitting."""
        def fit(self, ctx):
            time.sleep(600)
''')


def test_a_point_past_its_time_limit_is_stopped_and_ends_that_axis(tmp_path):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW)
    registry = default_registries([str(plugin)], entry_points=False).estimators
    config = scaling.SweepConfig(n_train=(100, 200), widths=(1,), n_queries=(2,), n_train_for_queries=100, queries=5,
                                 repeats=1, point_budget_s=2.0, axis_stop_s=2.0, point_timeout_s=4.0)
    points = scaling.sweep([(name, registry.get(name)) for name in ("zz-slow", "grad-dot")], ["n"], config,
                           progress=False, plugins=[str(plugin)])
    slow = [p for p in points if p.estimator == "zz-slow"]
    assert slow[0].seconds is None and "stopped: exceeded the time limit (point_timeout_s = 4 s)" in slow[0].note
    assert slow[1].note == "stopped at the time limit at a smaller size"  # not tried at n = 200
    assert all(p.seconds is not None for p in points if p.estimator == "grad-dot")  # the rest went on


def test_a_point_slower_than_axis_stop_ends_the_axis_and_a_faster_one_does_not():
    config = scaling.SweepConfig(point_budget_s=1.0, axis_stop_s=10.0, point_timeout_s=20.0)
    at = {"axis": "n", "n_train": 250, "n_parameters": 7850, "score_s": 1.0, "repeats": 1}
    assert scaling._stopped_below([scaling.Point("e", fit_s=8.5, **at)], "e", "n", config) == ""
    assert scaling._stopped_below([scaling.Point("e", fit_s=9.5, **at)], "e", "n", config) == (
        "slower than axis_stop_s = 10 s at a smaller size")
    assert scaling._stopped_below([scaling.Point("e", fit_s=9.5, **at)], "e", "Q", config) == ""  # another axis
    with pytest.raises(ValueError, match="0 < axis_stop_s ≤ point_timeout_s"):
        scaling.SweepConfig(axis_stop_s=200.0, point_timeout_s=120.0)


def test_profile_refuses_a_bad_axis(tmp_path, capsys):
    assert main(["profile", "--results", str(tmp_path / "p"), "--axes", "q"]) == 2
    assert "--axes must name some of n, Q, P, got q" in capsys.readouterr().err
    assert not (tmp_path / "p" / scaling.PROFILE_FILE).exists()


def test_the_n_and_q_axes_measure_their_shared_point_once():
    registry = default_registries(entry_points=False).estimators
    config = scaling.SweepConfig(n_train=(100, 200), n_queries=(5, 10), n_train_for_queries=100, queries=5, repeats=1)
    points = scaling.sweep([("grad-dot", registry.get("grad-dot"))], ["n", "Q"], config, progress=False, isolate=False)
    on_n = {(p.n_train, p.n_queries): p for p in points if p.axis == "n"}
    on_q = {(p.n_train, p.n_queries): p for p in points if p.axis == "Q"}
    assert set(on_n) == {(100, 5), (200, 5)} and set(on_q) == {(100, 5), (100, 10)}
    assert on_q[100, 5] == dataclasses.replace(on_n[100, 5], axis="Q")  # the same measurement, not a second one
    assert on_q[100, 10].fit_s != on_n[100, 5].fit_s


def test_memory_lines_leave_out_increments_below_the_floor():
    at = {"axis": "n", "n_parameters": 7850, "fit_s": 1.0, "score_s": 1.0, "repeats": 1}
    floor = scaling_report.MEMORY_FLOOR_MB
    noisy = [scaling.Point("e", n_train=n, own_mb=mb, **at) for n, mb in ((250, 0.0), (500, 3.8), (1000, 2 * floor),
                                                                         (2000, 4 * floor))]
    slope = scaling.fits(noisy)["e", "n", "memory"]
    assert slope.slope == pytest.approx(1.0) and slope.points == 2  # through the two sized points only
    quiet = [dataclasses.replace(p, own_mb=min(p.own_mb, floor / 2)) for p in noisy]
    assert ("e", "n", "memory") not in scaling.fits(quiet) and ("e", "n", "time") in scaling.fits(quiet)
