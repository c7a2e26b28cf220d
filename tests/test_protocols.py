"""The ground-truth protocols beyond leave-one-out, on toy-logreg (exact retraining in milliseconds)."""

import json
import textwrap

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.groundtruth.base import Evaluation, GroundTruth, Settings
from bench.groundtruth.groups import GroupRemoval, GroupRemovalConfig, plan_groups, unpack_groups
from bench.groundtruth.lds import LdsConfig, LinearDatamodelingScore, plan_subsets
from bench.groundtruth.mislabel import MislabelConfig, MislabelDetection, detection_metrics
from bench.groundtruth.retrain_length import RetrainLength, RetrainLengthConfig
from bench.groundtruth.updates import ClassRemoval, ClassRemovalConfig, LabelChange, LabelChangeConfig
from estimators.base import PARAMETER_UPDATE, SINGLE
from tasks.logreg import ToyLogReg

SETTINGS = Settings(top_k=5, resamples=50, seed=0)


@pytest.fixture(scope="module")
def toy_task():
    task = ToyLogReg(ToyLogReg.presets["default"], seed=0)
    data = task.load_data()
    return task, data, task.train(data)


class RecordingTask(ToyLogReg):
    """toy-logreg that remembers every removal it was asked to retrain without."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.removed: list[list[int]] = []

    def retrain_without(self, data, base, removals, spec=None):
        self.removed += [sorted(torch.as_tensor(r).tolist()) for r in removals]
        return super().retrain_without(data, base, removals, *([spec] if spec else []))


GROUP_CONFIG = GroupRemovalConfig(fractions=(0.05, 0.2), groups_per_cell=4, n_clusters=3)


def test_group_plan_is_what_gets_removed(toy_task):
    _, data, base = toy_task
    task = RecordingTask(ToyLogReg.presets["default"], seed=0)
    truth = GroupRemoval(GROUP_CONFIG, seed=3).compute(task, data, base, progress=False)
    groups = unpack_groups(truth.extra)
    assert task.removed == [g.tolist() for g in groups]  # exactly the planned groups, in order
    assert truth.actual.shape == (len(data.queries), 3 * 2 * 4)
    labels = data.train.targets.numpy()
    for group, kind, fraction in zip(groups, truth.extra["kinds"], truth.extra["fractions"], strict=True):
        assert len(set(group.tolist())) == len(group)
        if kind == 1:  # same-class: at most half of the class
            assert len(set(labels[group])) == 1
            assert len(group) == min(round(fraction * 60), int((labels == labels[group[0]]).sum()) // 2)
        else:
            assert len(group) == round(fraction * 60)
    again = plan_groups(task, data, base, GROUP_CONFIG, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again.groups, groups, strict=True))  # from the seed alone


def test_cluster_groups_are_coherent_in_feature_space(toy_task):
    task, data, base = toy_task
    plan = plan_groups(task, data, base, GroupRemovalConfig(kinds=("random", "cluster"), fractions=(0.2,),
                                                            groups_per_cell=6, n_clusters=3), seed=0)
    x = data.train.inputs.numpy()

    def spread(group):
        return float(np.linalg.norm(x[group] - x[group].mean(0), axis=1).mean())

    random = [spread(g) for g, k in zip(plan.groups, plan.kinds, strict=True) if k == 0]
    cluster = [spread(g) for g, k in zip(plan.groups, plan.kinds, strict=True) if k == 2]
    assert np.mean(cluster) < 0.6 * np.mean(random)


def test_group_metrics_on_constructed_cases():
    rng = np.random.default_rng(0)
    kinds = np.repeat([0, 1, 2], 4)
    actual = rng.normal(size=(5, 12))
    truth = GroundTruth("group", np.array([]), actual, extra={"kinds": np.repeat([0, 1, 2], 4),
                                                               "fractions": np.tile([0.1, 0.1, 0.3, 0.3], 3)})
    with pytest.raises(ValueError, match="at least 3 groups"):
        GroupRemoval(GROUP_CONFIG, seed=0).measure(actual, truth, SETTINGS)  # only 2 groups per cell
    truth = GroundTruth("group", np.array([]), actual, extra={"kinds": kinds, "fractions": np.full(12, 0.3)})
    protocol = GroupRemoval(GROUP_CONFIG, seed=0)
    perfect = protocol.measure(3 * actual + 1, truth, SETTINGS).metrics
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["pearson_cluster"] == pytest.approx(1.0)
    flipped = protocol.measure(-actual, truth, SETTINGS).metrics
    assert flipped["pearson_coherent_large"] == pytest.approx(-1.0)


def test_lds_subsets_and_metric(toy_task):
    _, data, base = toy_task
    removed = plan_subsets(60, 10, 0.5, seed=1)
    assert all(len(r) == 30 for r in removed) and len({tuple(r) for r in removed}) == 10
    task = RecordingTask(ToyLogReg.presets["default"], seed=0)
    truth = LinearDatamodelingScore(LdsConfig(n_subsets=10), seed=1).compute(task, data, base, progress=False)
    assert task.removed == [r.tolist() for r in removed]
    protocol = LinearDatamodelingScore(LdsConfig(n_subsets=10), seed=1)
    monotone = protocol.measure(np.exp(truth.actual * 5), truth, SETTINGS).metrics
    assert monotone["lds"] == pytest.approx(1.0)  # a rank correlation: any increasing map is perfect
    assert monotone["pearson"] < 1.0
    with pytest.raises(ValueError, match="alpha must be in"):
        plan_subsets(60, 10, 1.0, seed=0)


class FixedUpdate:
    """A stand-in estimator whose update is given (to test the protocol's arithmetic)."""

    capabilities = frozenset({PARAMETER_UPDATE})

    def __init__(self, delta):
        self.delta = delta

    def update(self, removed, new_targets=None):
        return self.delta


def evaluation(estimator, truth, task, data, base):
    return Evaluation(estimator, data.queries, truth, task, data, base, lambda update: update, SETTINGS)


@pytest.mark.parametrize("protocol", [ClassRemoval(ClassRemovalConfig(target_class=1), seed=0),
                                      LabelChange(LabelChangeConfig(fraction=0.1), seed=0)])
def test_update_protocols_score_the_retrained_and_unchanged_models_as_recorded(toy_task, protocol):
    task, data, base = toy_task
    truth = protocol.compute(task, data, base, progress=False)
    retrained = {n: torch.as_tensor(truth.extra[f"retrained.{n}"]) for n in base.params}
    exact = protocol.evaluate(evaluation(FixedUpdate({n: retrained[n] - base.params[n] for n in base.params}),
                                         truth, task, data, base)).metrics
    assert exact["param_distance"] == pytest.approx(0.0, abs=1e-12)
    assert exact["f1"] == pytest.approx(truth.diagnostics["retrained_f1"])
    nothing = protocol.evaluate(evaluation(FixedUpdate({}), truth, task, data, base)).metrics
    assert nothing["param_distance"] == pytest.approx(1.0) and nothing["f1"] == truth.diagnostics["original_f1"]
    changed = truth.extra["changed"]
    if isinstance(protocol, ClassRemoval):
        assert set(data.train.targets[changed].tolist()) == {1} and len(changed) == int((data.train.targets == 1).sum())
        assert truth.diagnostics["retrained_forget"] > 0.8  # the retrained model has forgotten class 1
    else:
        assert len(changed) == 6 and len(set(truth.extra["new_labels"].tolist())) == 1
        assert not set(truth.extra["new_labels"].tolist()) & set(data.train.targets[changed].tolist())


def test_mislabel_flips_and_detection_metrics(toy_task):
    task, data, base = toy_task
    truth = MislabelDetection(MislabelConfig(fraction=0.1), seed=0).compute(task, data, base, progress=False)
    noisy, labels = truth.extra["noisy_labels"], data.train.targets.numpy()
    assert np.flatnonzero(noisy != labels).tolist() == truth.extra["flipped"].tolist() and len(truth.extra["flipped"]) == 6
    assert truth.model is not None and not torch.equal(truth.model.params["weight"], base.params["weight"])
    is_flipped = np.zeros(100, dtype=bool)
    is_flipped[:10] = True
    perfect = detection_metrics(np.linspace(1, 0, 100), is_flipped)
    assert perfect == {"auc": 1.0, "found@10%": 1.0, "found@20%": 1.0, "found@30%": 1.0}
    reversed_ = detection_metrics(np.linspace(0, 1, 100), is_flipped)
    assert reversed_["auc"] == 0.0 and reversed_["found@30%"] == 0.0
    assert detection_metrics(np.r_[np.zeros(5), np.ones(95)], is_flipped)["found@10%"] == pytest.approx(0.5)


def test_the_loss_baseline_ranks_as_the_protocol_records_it(toy_task):
    """The ``loss`` row of a mislabel section is the training-loss ranking the ground truth records."""
    from estimators.base import FitContext
    from estimators.baselines import TrainingLoss

    task, data, base = toy_task
    protocol = MislabelDetection(MislabelConfig(fraction=0.1), seed=0)
    truth = protocol.compute(task, data, base, progress=False)
    noisy = protocol.fit_data(data, truth)
    estimator = TrainingLoss()
    estimator.fit(FitContext(task.build_model(), truth.model.params, task.loss, task.l2, noisy.train, seed=0))
    result = protocol.evaluate(evaluation(estimator, truth, task, noisy, truth.model)).metrics
    assert result["auc"] == truth.diagnostics["loss_ranking_auc"] > 0.5
    assert result["found@10%"] == truth.diagnostics["loss_ranking_found@10%"]


def test_mislabel_refuses_a_ranked_set_without_flipped_points(toy_task):
    """AUC is undefined without both kinds of point: a clear error, never a NaN reported as a result."""
    task, data, base = toy_task
    flipped = MislabelDetection(MislabelConfig(fraction=0.1), seed=0).compute(task, data, base, progress=False)
    assert flipped.diagnostics["flipped_ranked"] == 6  # n_ranked = 0 ranks every point
    for seed in range(20):  # a seed whose 2 ranked points miss all 6 flipped labels exists (P ≈ 0.81 each)
        try:
            MislabelDetection(MislabelConfig(fraction=0.1, n_ranked=2), seed=seed).compute(task, data, base, progress=False)
        except ValueError as error:
            assert "flipped labels; AUC needs both flipped and clean points" in str(error)
            break
    else:
        pytest.fail("no seed drew a ranked set without flipped points")


@pytest.mark.parametrize("protocol", ["loo", "retrain-length"])
def test_removal_counts_below_two_are_refused(protocol):
    """Per-query correlations across one removal are undefined."""
    from bench.groundtruth.loo import plan_removals
    from bench.groundtruth.retrain_length import plan_removal_groups

    plan = (lambda n: plan_removals(60, n, 0)) if protocol == "loo" else (lambda n: plan_removal_groups(60, n, 4, 0))
    assert len(plan(2)) == 2
    with pytest.raises(ValueError, match=f"{protocol}: n_removed must be in 2..60"):
        plan(1)


def test_retrain_length_measures_each_length_separately(toy_task):
    task, data, base = toy_task
    protocol = RetrainLength(RetrainLengthConfig(n_removed=8, epochs=(1, 10), seeds=2), seed=0)
    truth = protocol.compute(task, data, base, progress=False)
    assert truth.actual.shape == (len(data.queries), 16) and truth.replicates.shape == (2, len(data.queries), 16)
    np.testing.assert_allclose(truth.actual, truth.replicates.mean(0))  # scored against the mean over seeds
    assert truth.extra["steps"].tolist() == [1, 10]  # toy-logreg: 59 kept points, batches of 64
    short, long_ = truth.actual[:, :8], truth.actual[:, 8:]
    assert np.abs(long_).mean() > np.abs(short).mean()  # longer retraining moves further from θ̂
    predicted = np.concatenate([short * 2, -long_], axis=1)
    metrics = protocol.measure(predicted, truth, SETTINGS).metrics
    assert metrics["pearson@1ep"] == pytest.approx(1.0) and metrics["pearson@10ep"] == pytest.approx(-1.0)
    assert metrics["pearson"] == pytest.approx(0.0, abs=1e-9)


class FixedScores:
    """A stand-in single-score estimator: ``score`` returns the given columns of a fixed matrix."""

    capabilities = frozenset({SINGLE})

    def __init__(self, matrix):
        self.matrix = matrix

    def score(self, queries, train_idx):
        return torch.as_tensor(self.matrix[:, train_idx.numpy()], dtype=torch.float32)


def test_retrain_length_groups_are_what_gets_removed_and_are_scored_by_sums(toy_task):
    _, data, base = toy_task
    task = RecordingTask(ToyLogReg.presets["default"], seed=0)
    config = RetrainLengthConfig(n_removed=5, group_size=6, epochs=(1, 10), seeds=2)
    truth = RetrainLength(config, seed=4).compute(task, data, base, progress=False)
    groups = [g.tolist() for g in unpack_groups(truth.extra)]
    assert len(groups) == 5 and all(len(set(g)) == 6 for g in groups)
    # every planned group once per seed, nothing else: the shorter length is a snapshot of the longer run
    assert [r for r in task.removed if r] == groups * 2
    assert truth.actual.shape == (len(data.queries), 10) and truth.train_idx.size == 0
    single = np.random.default_rng(0).normal(size=(len(data.queries), len(data.train))).astype(np.float32).astype(np.float64)
    predicted = RetrainLength(config, seed=4).predict(evaluation(FixedScores(single), truth, task, data, base))
    sums = np.stack([single[:, g].sum(1) for g in groups], axis=1)
    np.testing.assert_allclose(predicted, np.concatenate([sums, sums], axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="group_size must be in"):
        RetrainLength(RetrainLengthConfig(group_size=60), seed=0).compute(task, data, base, progress=False)


SUITE = textwrap.dedent("""
    name = "toy-protocols"
    seed = 0
    threads = 1
    bootstrap_resamples = 50
    estimators = ["if-exact", "group-if-2", "tracin", "gif", "random"]

    [[tasks]]
    name = "toy-logreg"
    preset = "default"

    [[protocols]]
    name = "group"
    fractions = [0.05, 0.25]
    groups_per_cell = 4
    n_clusters = 3

    [[protocols]]
    name = "lds"
    n_subsets = 8

    [[protocols]]
    name = "class-removal"

    [[protocols]]
    name = "mislabel"
""")


@pytest.mark.slow
def test_every_protocol_runs_caches_and_reports_not_applicable(tmp_path, monkeypatch, capsys):
    suite, results = tmp_path / "suite.toml", tmp_path / "results"
    suite.write_text(SUITE)
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 0
    records = {(r["protocol"], r["estimator"]): r for r in map(json.loads, (results / "records.jsonl").read_text().splitlines())}
    assert len(records) == 4 * 5
    assert records["group", "group-if-2"]["status"] == "ok" and records["group", "tracin"]["status"] == "ok"
    assert records["class-removal", "tracin"]["status"] == "not-applicable"
    assert records["mislabel", "gif"]["status"] == "not-applicable" and records["mislabel", "tracin"]["status"] == "ok"
    assert records["group", "if-exact"]["metrics"]["pearson"] > 0.8 > records["group", "random"]["metrics"]["pearson"]
    assert records["class-removal", "gif"]["metrics"]["param_distance"] < 1.5
    board = (results / "leaderboard.md").read_text()
    assert "## Overview" in board and "## toy-logreg · mislabel" in board and "Not applicable" in board
    lines = len((results / "records.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 0
    assert "0 cell(s) run, 20 already finished" in capsys.readouterr().err  # not-applicable cells are finished too
    assert len((results / "records.jsonl").read_text().splitlines()) == lines

    computed = []
    original = GroupRemoval.compute

    def counting(self, *args, **kwargs):
        computed.append(self.config)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GroupRemoval, "compute", counting)
    suite.write_text(SUITE.replace('estimators = ["if-exact", "group-if-2", "tracin", "gif", "random"]',
                                   'estimators = ["if-exact", "group-if-1"]'))
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 0
    assert computed == []  # the cached group ground truth is reused for the new estimator
    assert len((results / "records.jsonl").read_text().splitlines()) == lines + 4
    suite.write_text(SUITE.replace("groups_per_cell = 4", "groups_per_cell = 3"))
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 0
    assert [c.groups_per_cell for c in computed] == [3]  # a changed setting makes a new one


@pytest.mark.slow
def test_protocol_models_are_cached_with_their_ground_truth(tmp_path):
    """mislabel trains its own model; a re-run with a new estimator reuses it (no retraining)."""
    suite, results = tmp_path / "suite.toml", tmp_path / "results"
    text = SUITE.split("[[protocols]]")[0] + '[[protocols]]\nname = "mislabel"\n'
    suite.write_text(text)
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 0
    first = {r["estimator"]: r for r in map(json.loads, (results / "records.jsonl").read_text().splitlines())}
    suite.write_text(text.replace('"random"]', '"random", "grad-dot"]'))
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 0
    records = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    grad_dot = records[-1]
    assert grad_dot["estimator"] == "grad-dot" and grad_dot["status"] == "ok"
    assert grad_dot["groundtruth_diagnostics"]["seconds"] == first["tracin"]["groundtruth_diagnostics"]["seconds"]


def test_confused_flips_go_to_the_wrong_class_theta_hat_likes_most(toy_task):
    task, data, base = toy_task
    truth = MislabelDetection(MislabelConfig(fraction=0.1), seed=0).compute(task, data, base, progress=False)
    logits, labels = MislabelDetection._logits(task, base, data.train), data.train.targets.numpy()
    for i in truth.extra["flipped"]:
        wrong = logits[i].copy()
        wrong[labels[i]] = -np.inf
        assert truth.extra["noisy_labels"][i] == np.argmax(wrong) != labels[i]
    uniform = MislabelDetection(MislabelConfig(fraction=0.1, flip="uniform"), seed=0).compute(task, data, base,
                                                                                             progress=False)
    assert uniform.extra["flipped"].tolist() == truth.extra["flipped"].tolist()  # the same points, other labels
    assert (uniform.extra["noisy_labels"] != truth.extra["noisy_labels"]).any()


def test_auc_interval_brackets_the_auc_and_narrows_with_more_points():
    from bench.groundtruth.mislabel import auc_interval

    generator = np.random.default_rng(0)

    def width(n):
        is_flipped = np.arange(n) < n // 10
        values = generator.normal(size=n) + 1.5 * is_flipped
        low, high = auc_interval(values, is_flipped, resamples=400, seed=1)
        assert low <= detection_metrics(values, is_flipped)["auc"] <= high
        return high - low

    assert width(2000) < width(200) / 2  # about 1/√10 as wide


@pytest.mark.parametrize(("options", "message"), [
    ('name = "loo-warm"\nwarm_epochs = 0.5', "protocol loo-warm: warm retrains must last at least 1 epoch"),
    ('name = "retrain-length"\nepochs = [1, 0.25]', "protocol retrain-length: warm retrains must last at least 1 epoch"),
    ('name = "lds"\nretrain = "hot"', "protocol lds: unknown retrain mode 'hot'. Valid: warm, scratch"),
    ('name = "mislabel"\nflip = "random"', "protocol mislabel: mislabel: unknown flip 'random'. Valid: confused, uniform"),
    ('name = "loo"\nn_removed = -5', "protocol loo: n_removed must be ≥ 2 (a correlation across removals needs two), got -5"),
    ('name = "lds"\nn_subsets = 2', "protocol lds: n_subsets must be ≥ 3 (a rank correlation across subsets), got 2"),
    ('name = "group"\nfractions = [0.1, 1.5]', "protocol group: fractions must be in (0, 1), got [0.1, 1.5]"),
])
def test_bad_protocol_values_are_refused_before_any_work(tmp_path, capsys, options, message):
    suite, results = tmp_path / "suite.toml", tmp_path / "results"
    suite.write_text(f'name = "bad"\nestimators = ["random"]\n[[tasks]]\nname = "toy-logreg"\n[[protocols]]\n{options}\n')
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not results.exists()  # nothing trained, nothing written


def test_update_protocols_choose_alpha_on_the_validation_half(toy_task):
    """α = 1 is the estimator's own update; α* maximises F1 on the validation half and is judged on the other."""
    from bench.groundtruth.updates import ALPHAS, halves, summary

    task, data, base = toy_task
    protocol = ClassRemoval(ClassRemovalConfig(target_class=1), seed=0)
    truth = protocol.compute(task, data, base, progress=False)
    exact = {n: torch.as_tensor(truth.extra[f"retrained.{n}"]) - base.params[n] for n in base.params}
    nothing = protocol.evaluate(evaluation(FixedUpdate({n: 0 * d for n, d in exact.items()}), truth, task, data, base))
    assert nothing.metrics["alpha_star"] == 1.0 and nothing.metrics["f1_best_alpha"] == nothing.metrics["f1"]
    assert nothing.metrics["f1"] == pytest.approx(truth.diagnostics["original_f1"])  # both on the evaluation half
    assert nothing.ci["f1"][0] <= nothing.metrics["f1"] <= nothing.ci["f1"][1]
    shrunk = protocol.evaluate(evaluation(FixedUpdate({n: d / 4 for n, d in exact.items()}), truth, task, data, base))
    alpha = shrunk.metrics["alpha_star"]
    validation, held_out = halves(data.test, protocol.seed)

    def f1(a, split):
        params = {n: base.params[n] + a * exact[n] / 4 for n in base.params}
        return summary(protocol.hits(task, data, params, truth.extra, split))["f1"]

    assert alpha >= 2  # the shrunk step is scaled back up towards the retrained model
    assert f1(alpha, validation) == max(f1(a, validation) for a in ALPHAS)
    assert shrunk.metrics["f1_best_alpha"] == f1(alpha, held_out) > shrunk.metrics["f1"]
