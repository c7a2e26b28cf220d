"""The deterministic track: θ̂'s recorded run, its weighted replays (lds-replay, loo-replay) and ``magic`` on it.

Tolerances (float32 throughout, as the task trains): the two trainers (torch.optim over a stacked model, and
the functional replay MAGIC differentiates) compute the same steps with kernels that round differently, by
about √(terms)·ε ≈ 1e-6 relative per step (ε = 6e-8); eight steps at lr ≤ 0.05 do not amplify that past
10×, so 1e-5 relative on parameters and 1e-5 absolute on query losses of order 1 hold with room.
"""

import json
import textwrap

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.context import fit_context
from bench.groundtruth.base import GroundTruth, Settings, TaskShape
from bench.groundtruth.replay import LdsReplay, LdsReplayConfig, LooReplay, LooReplayConfig, replay_effects
from bench.metrics import replay_ceiling
from estimators.autodiff import FlatLoss
from estimators.magic import Magic
from estimators.metagradient import removal_scores, replay
from tasks.resnet import MnistResNet, ResNetConfig

TINY = ResNetConfig(n_train=64, n_test=20, n_queries=4, image_size=14, width=2, epochs=2, batch_size=16,
                    retrain_batch=4)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    task = MnistResNet(TINY, seed=3)
    data = task.load_data()
    return task, data, task.train(data)


def _flat(task, recorded):
    return FlatLoss.of(task.build_model(), recorded.start, task.loss, tuple(recorded.start))


def test_the_recorded_run_replays_to_the_trained_model(tiny):
    task, data, base = tiny
    recorded = task.recorded_run(data)
    assert recorded.run.steps == 2 * 4  # 64 points in batches of 16, two epochs
    theta, _ = replay(_flat(task, recorded), data.train, recorded.run)
    trained = torch.cat([base.params[name].reshape(-1) for name in recorded.start])
    assert float((theta - trained).norm() / trained.norm()) < 1e-5
    assert float((recorded.run.theta0 - trained).norm() / trained.norm()) > 1e-2  # it trained: not a trivial match


def test_weighted_replays_are_the_run_magic_differentiates(tiny):
    """Between two removals, replay_effects' Δ differ as the functional replay's losses with those weights at 0.

    Columns are compared with each other (each Δ is against the stacked control, whose own rounding can flip a
    ReLU or max-pool branch of this tiny net: the control is checked by the floor's diagnostic instead)."""
    task, data, base = tiny
    removals = [np.array([0, 5, 9]), np.array([2]), np.arange(10, 30)]
    effects, diagnostics = replay_effects(task, data, base, removals, data.queries, spec=None, progress=False, desc="")
    recorded = task.recorded_run(data)
    flat = _flat(task, recorded)

    def losses(removed):
        weights = torch.ones(len(data.train))
        weights[torch.as_tensor(removed)] = 0.0
        theta, _ = replay(flat, data.train, recorded.run, weights)
        return flat.batch_losses(theta, data.queries.inputs, data.queries.targets).double().numpy()

    functional = [losses(removed) for removed in removals]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        np.testing.assert_allclose(effects[:, a] - effects[:, b], functional[a] - functional[b], rtol=0, atol=1e-5)
    assert np.abs(effects[:, 2]).max() > 1e-3  # dropping 20 of 64 points moves the losses: not zeros compared
    assert diagnostics["deterministic"] == 1.0 and diagnostics["replay_models"] == len(removals) + 4
    assert diagnostics["control_vs_lone_rms"] < diagnostics["effect_rms"] / 10  # the floor below the effects
    assert diagnostics["probe_rms"] > 0 and diagnostics["warm"] == 0.0


def test_a_warm_replay_starts_from_the_trained_model_and_is_what_magic_differentiates(tiny):
    """recipe = "warm": the run starts at θ̂ with a constant 0.1× rate; magic's scores are its metagradient."""
    task, data, base = tiny
    protocol = LooReplay(LooReplayConfig(recipe="warm", n_removed=4, n_queries=3), seed=0)
    spec = protocol.replay_spec(task, data)
    recorded = task.recorded_run(data, base, spec)
    trained = torch.cat([base.params[name].reshape(-1) for name in recorded.start])
    assert torch.equal(recorded.run.theta0, trained) and recorded.run.steps == 4  # one epoch of 64 in batches of 16
    assert set(recorded.run.learning_rates) == {0.1 * task.recipe.lr}
    control = task.replay_weighted(data, torch.ones(1, len(data.train)), base, spec)[0]
    theta, _ = replay(_flat(task, recorded), data.train, recorded.run)
    replayed = torch.cat([control[name].reshape(-1) for name in recorded.start])
    assert float((theta - replayed).norm() / (replayed - trained).norm()) < 1e-4  # the same run, and it moved
    estimator = Magic()
    estimator.fit(fit_context(task, data, base, seed=0))
    index = torch.arange(6)
    expected = removal_scores(_flat(task, recorded), data.train, recorded.run, data.queries, checkpoint_every=32)
    torch.testing.assert_close(estimator.score_replay(data.queries, index, recorded), expected[:, index].float())
    own = estimator.score(data.queries, index)
    assert not torch.allclose(own, expected[:, index].float())  # θ̂'s own run is another run: another answer


def test_magic_scores_are_the_negated_metagradient_of_the_recorded_run(tiny):
    task, data, base = tiny
    estimator = Magic()
    estimator.fit(fit_context(task, data, base, seed=0))
    index = torch.tensor([3, 0, 7])
    scores = estimator.score(data.queries, index)
    recorded = task.recorded_run(data)
    expected = removal_scores(_flat(task, recorded), data.train, recorded.run, data.queries, checkpoint_every=32)
    torch.testing.assert_close(scores, expected[:, index].float())
    assert estimator.diagnostics()["replay_vs_base_relative"] < 1e-5
    assert estimator.diagnostics()["steps"] == 8


def test_bad_replay_options_are_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"drop_fraction must be in \(0, 1\).*got 1.5"):
        LdsReplayConfig(drop_fraction=1.5)
    with pytest.raises(ValueError, match="sweep fractions must be distinct"):
        LdsReplayConfig(drop_fraction=0.05, sweep=(0.05, 0.5))
    with pytest.raises(ValueError, match=r"unknown recipe 'cold'\. Valid recipes: scratch, warm"):
        LooReplayConfig(recipe="cold")
    with pytest.raises(ValueError, match="n_removed must be ≥ 2"):
        LooReplayConfig(n_removed=1)
    with pytest.raises(ValueError, match="mnist-logreg is convex"):
        LdsReplay.check_against(LdsReplayConfig(), TaskShape("mnist-logreg", True, 1000))
    with pytest.raises(ValueError, match=r"n_removed must be in 2\.\.64"):
        LooReplay.check_against(LooReplayConfig(n_removed=100), TaskShape("mnist-resnet", False, 64))


def test_the_sweep_plans_each_fraction_of_the_training_set():
    protocol = LdsReplay(LdsReplayConfig(drop_fraction=0.01, sweep=(0.1, 0.5), n_subsets=4), seed=0)
    planned = protocol.plan(1000)
    assert [len(removed) for removed in planned] == [10] * 4 + [100] * 4 + [500] * 4
    assert protocol.columns == ("lds_drop_0.1", "lds_drop_0.5")
    assert [len(removed) for removed in protocol.plan(1000)] == [len(removed) for removed in planned]
    assert all(np.array_equal(a, b) for a, b in zip(protocol.plan(1000), planned, strict=True))  # from the seed


def _replayed_truth(signal: np.ndarray, noise_sd: float, generator: np.random.Generator) -> GroundTruth:
    """``signal [Q, C]`` plus arithmetic noise: each replay's own, and the float32 floor two runs' difference."""
    actual = signal + generator.normal(0, noise_sd, signal.shape)
    floor = generator.normal(0, noise_sd * np.sqrt(2), signal.shape[0])  # one per query, as replay_effects has
    return GroundTruth("loo-replay", np.arange(signal.shape[1]), actual,
                       {"control_vs_lone_rms": float(np.sqrt(np.mean(floor**2)))})


def test_the_replay_ceiling_is_what_the_noise_free_effects_reach():
    """An oracle that knows the effects without the trainer's rounding correlates with the truth at the ceiling,
    √(1 − 0.75² / (1 + 0.75²)) = 0.8. Q = 2000 queries × C = 400 columns: the floor's variance from 2000 draws
    has relative error √(2/2000) ≈ 0.03, moving the ceiling by about 0.007; the mean Pearson's error is below
    0.001; 0.03 is four of the first."""
    generator = np.random.default_rng(0)
    signal = generator.normal(0, 1.0, (2000, 400))
    truth = _replayed_truth(signal, 0.75, generator)
    protocol = LooReplay(LooReplayConfig(n_removed=400), seed=0)
    ceiling = protocol.noise_ceiling(truth, Settings(10, 50, 0))
    oracle = protocol.measure(signal, truth, Settings(10, 50, 0)).metrics["pearson"]
    assert abs(ceiling["ceiling_pearson"] - 0.8) < 0.03 and abs(oracle - ceiling["ceiling_pearson"]) < 0.03
    low, high = ceiling["ceiling_pearson_ci"]
    assert low < ceiling["ceiling_pearson"] < high and ceiling["informative"]


def test_a_floor_that_rivals_the_effects_leaves_the_replayed_column_uninformative():
    generator = np.random.default_rng(1)
    truth = _replayed_truth(generator.normal(0, 0.1, (8, 8)), 1.0, generator)
    ceiling = LooReplay(LooReplayConfig(n_removed=8), seed=0).noise_ceiling(truth, Settings(10, 50, 0))
    assert ceiling["ceiling_pearson_ci"][0] < 0.2 and not ceiling["informative"]
    assert replay_ceiling(0.0, truth.actual).tolist() == [1.0] * 8  # no noise: the ceiling is 1


@pytest.mark.slow
def test_the_deterministic_track_end_to_end(tmp_path):
    """Capped to one base model, magic not applicable on seed-averaged truths, its own aggregate, exportable."""
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent("""
        name = "tiny"
        threads = 2
        bootstrap_resamples = 50
        estimators = ["magic", "grad-dot", "random"]
        [[tasks]]
        name = "mnist-resnet"
        n_train = 96
        n_test = 30
        n_queries = 5
        width = 2
        epochs = 2
        batch_size = 32
        retrain_batch = 4
        base_models = 2
        protocols = ["lds-replay", "loo-replay", "lds-replay-warm", "lds"]
        [[protocols]]
        name = "lds-replay"
        n_subsets = 4
        n_queries = 3
        drop_fraction = 0.05
        sweep = [0.5]
        [[protocols]]
        name = "loo-replay"
        n_removed = 4
        n_queries = 3
        [[protocols]]
        name = "lds-replay-warm"
        n_subsets = 4
        n_queries = 3
        drop_fraction = 0.05
        sweep = [0.5]
        [[protocols]]
        name = "lds"
        n_subsets = 4
    """))
    results = tmp_path / "r"
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 0
    records = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    replayed = [r for r in records if "replay" in r["protocol"]]
    assert {r["base_model"] for r in replayed} == {0} and {r["base_models"] for r in replayed} == {1}
    assert {r["base_model"] for r in records if r["protocol"] == "lds"} == {0, 1}
    magic = {r["protocol"]: r for r in records if r["estimator"] == "magic" and r["base_model"] == 0}
    assert magic["lds"]["status"] == "not-applicable" and "magic provides replay" in magic["lds"]["error"]
    assert magic["lds-replay"]["status"] == "ok" and magic["lds-replay"]["n_queries"] == 3
    assert set(magic["lds-replay"]["metrics"]) == {"lds", "lds_drop_0.5"}
    # six steps: the floor (~1e-7) is far below the effects, so the ceiling is near 1 and the column informative
    assert 0.9 < magic["lds-replay"]["ceiling"] <= 1.0 and magic["lds-replay"]["informative"]
    # 3 steps at 0.1× the rate: linear in the weights far below the effects, so 4 subsets rank right (0.5: room
    # for one swapped pair of near-equal effects)
    assert magic["lds-replay-warm"]["status"] == "ok" and magic["lds-replay-warm"]["metrics"]["lds"] > 0.5
    board = (results / "leaderboard.md").read_text()
    assert "score / ceiling: deterministic replay (deep)" in board and "**Deterministic replay**" in board
    assert "mnist-resnet · deterministic (deterministic)" in board
    out = tmp_path / "published"
    assert main(["export", "--results", str(results), "--out", str(out)]) == 0
    from bench.published import open_published

    published = open_published(out)
    entries = [entry for entry in published.manifest["truths"] if entry["protocol"] == "lds-replay"]
    assert [entry["base_models"] for entry in entries] == [[0]]
    assert published.truth_arrays(entries[0])["actual"].shape == (3, 8)
