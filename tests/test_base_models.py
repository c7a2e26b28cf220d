"""Several base models per deep cell: seeds, the runner's repetition, and pooling for the leaderboard."""

import json
import textwrap

import numpy as np
import pytest
import scipy.stats
import torch

from bench.catalog import default_registries
from bench.cli import main
from bench.config import ConfigError, load_suite, parse_suite
from bench.leaderboard import render_markdown
from bench.metrics import INFORMATIVE_CEILING
from bench.planning import plan_suite
from bench.pooling import Z95, interval, pool_base_models, pooled_facts
from bench.records import Fact, Profile, fact
from tasks.resnet import MnistResNet, ResNetConfig

TINY_RESNET = ResNetConfig(n_train=120, n_test=40, n_queries=5, image_size=14, width=4, epochs=2, batch_size=32)


def _suite(text):
    return parse_suite(__import__("tomllib").loads(textwrap.dedent(text)))


def test_base_models_is_a_task_key_checked_at_planning():
    suite = _suite("""
        [[tasks]]
        name = "mnist-resnet"
        base_models = 3
        [[protocols]]
        name = "loo-warm"
    """)
    assert suite.tasks[0].base_models == 3 and "base_models" not in suite.tasks[0].options_dict()
    for bad in ("0", "2.5", "true", '"3"'):
        with pytest.raises(ConfigError, match="base_models must be an integer ≥ 1"):
            _suite(f'[[tasks]]\nname = "mnist-resnet"\nbase_models = {bad}\n[[protocols]]\nname = "loo"\n')
    with pytest.raises(ConfigError, match="only \\[\\[tasks\\]\\] tables take"):
        _suite('[[tasks]]\nname = "mnist-resnet"\n[[protocols]]\nname = "loo"\nbase_models = 2\n')
    convex = _suite('[[tasks]]\nname = "mnist-logreg"\nbase_models = 2\n[[protocols]]\nname = "loo"\n')
    with pytest.raises(ConfigError, match=r"mnist-logreg.*convex.*base_models must be 1, got 2"):
        plan_suite(convex, default_registries(entry_points=False))


def test_the_default_suite_repeats_every_deep_task_on_several_base_models():
    plan = plan_suite(load_suite("default"), default_registries(entry_points=False))
    counts = {planned.spec.name: planned.spec.base_models for planned in plan.tasks}
    # the convex task has one optimum; every deep one pools at least 3 θ̂ (an interval across base models needs them)
    assert counts["mnist-logreg"] == 1 and set(counts) == {"mnist-logreg", "mnist-resnet", "rt-bert"}
    assert all(counts[name] >= 3 for name in ("mnist-resnet", "rt-bert")), counts


def test_base_models_share_the_data_and_train_from_different_seeds():
    first, second = (MnistResNet(TINY_RESNET, seed=5, base_model=b) for b in (0, 1))
    assert first.training_seed == 5 and second.training_seed != 5
    assert MnistResNet(TINY_RESNET, seed=5, base_model=1).training_seed == second.training_seed  # reproducible
    assert first.replicate_seed(0) == 5 and second.replicate_seed(0) == second.training_seed
    assert first.replicate_seed(1) != second.replicate_seed(1)
    data, other = first.load_data(), second.load_data()
    assert torch.equal(data.train.inputs, other.train.inputs) and torch.equal(data.query_idx, other.query_idx)
    a, b = first.train(data), second.train(data)
    assert not torch.equal(a.params["fc.weight"], b.params["fc.weight"])
    assert torch.equal(a.params["fc.weight"], first.train(data, seed=5).params["fc.weight"])


def test_each_base_model_gets_its_own_cells_and_the_leaderboard_pools_them(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent("""
        name = "tiny"
        threads = 2
        bootstrap_resamples = 50
        estimators = ["grad-dot", "random"]
        [[tasks]]
        name = "mnist-resnet"
        base_models = 2
        n_train = 120
        n_test = 40
        n_queries = 5
        width = 4
        epochs = 2
        batch_size = 32
        [[protocols]]
        name = "loo-warm"
        n_removed = 4
        seeds = 2
    """))
    results = tmp_path / "r"
    args = ["run", "--suite", str(suite), "--results", str(results), "--no-progress", "--no-isolate"]
    assert main(args) == 0
    records = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert sorted((r["estimator"], r["base_model"]) for r in records) == [("grad-dot", 0), ("grad-dot", 1),
                                                                          ("random", 0), ("random", 1)]
    assert all(r["base_models"] == 2 and r["status"] == "ok" for r in records)
    first, second = sorted((r for r in records if r["estimator"] == "grad-dot"), key=lambda r: r["base_model"])
    assert first["cell_key"] != second["cell_key"]
    assert first["task_diagnostics"]["test_accuracy"] != second["task_diagnostics"]["test_accuracy"] or \
        first["metrics"]["pearson"] != second["metrics"]["pearson"]  # another θ̂, another ground truth
    assert main(args) == 0  # a re-run finds all four cells finished
    assert len((results / "records.jsonl").read_text().splitlines()) == 4
    (pooled,) = [r for r in pool_base_models(records) if r.estimator == "grad-dot"]
    values = [first["metrics"]["pearson"], second["metrics"]["pearson"]]
    assert pooled.metrics["pearson"] == pytest.approx(np.mean(values))
    assert pooled.spread["pearson"] == (min(values), max(values))
    board = (results / "leaderboard.md").read_text()
    assert "2 base models" in board and "base models' range" in board
    assert f"{min(values):.3f} – {max(values):.3f}" in board


def _record(base_model, value, ci, ceiling=0.6, ceiling_ci=(0.5, 0.7), status="ok", accuracy=0.9, r=0.41):
    return {"task": "t", "protocol": "p", "estimator": "e", "base_model": base_model, "base_models": 3,
            "status": status, "error": None if status == "ok" else "boom", "headline": "pearson",
            "metrics": {"pearson": value}, "ci": {"pearson": list(ci)}, "ceiling": ceiling,
            "groundtruth_diagnostics": {"ceiling_pearson": ceiling, "ceiling_pearson_ci": list(ceiling_ci),
                                        "seconds": 10.0, "informative": True},
            "task_diagnostics": {"test_accuracy": accuracy},
            "profile": {"fit_s": 1.0 + base_model, "peak_mem_mb": 100.0 * (base_model + 1)},
            "facts": [fact("{} queries × {} removed points", 5, 4).to_json(),
                      fact("scored against the mean of {} seeds (r = {})", 2, f"{r:.3f}").to_json()],
            "cell_key": f"k{base_model}"}


def test_pooling_means_values_and_combines_standard_errors():
    group = [_record(0, 0.4, (0.3, 0.5), r=0.41), _record(1, 0.5, (0.45, 0.55), r=0.47),
             _record(2, 0.6, (0.5, 0.7), accuracy=0.8, r=0.41)]
    (pooled,) = pool_base_models(group)
    assert pooled.metrics["pearson"] == pytest.approx(0.5) and pooled.spread["pearson"] == (0.4, 0.6)
    errors = np.array([0.1, 0.05, 0.1]) / Z95
    between = scipy.stats.t.ppf(0.975, 2) * np.std([0.4, 0.5, 0.6], ddof=1) / np.sqrt(3)
    half = np.hypot(between, Z95 * np.sqrt((errors**2).mean()))  # random effects: spread over θ̂ + shared error
    assert list(pooled.ci["pearson"]) == pytest.approx([0.5 - half, 0.5 + half])
    assert pooled.groundtruth_diagnostics["seconds"] == 30.0
    assert pooled.task_diagnostics["test_accuracy_range"] == [0.8, 0.9]
    assert pooled.profile == Profile(fit_s=2.0, peak_mem_mb=300.0)  # time: mean; memory: the largest
    assert [f.text for f in pooled.facts] == ["5 queries × 4 removed points",
                                              "scored against the mean of 2 seeds (r = 0.410–0.470)"]
    assert pooled.facts[1] == fact("scored against the mean of {} seeds (r = {})", 2, "0.410–0.470")
    assert pooled.cell_key == "k0" and pooled.base_models == 3


def test_pooling_decides_informative_on_the_pooled_ceiling():
    low = [_record(b, 0.1, (0.0, 0.2), ceiling=0.3, ceiling_ci=(0.1, 0.5)) for b in range(3)]
    (pooled,) = pool_base_models(low)
    lower = pooled.groundtruth_diagnostics["ceiling_pearson_ci"][0]
    assert lower < INFORMATIVE_CEILING and pooled.informative is False  # although every base said True
    agreeing = [_record(b, 0.1, (0.0, 0.2), ceiling=0.3, ceiling_ci=(0.22, 0.38)) for b in range(3)]
    assert pool_base_models(agreeing)[0].informative is True
    apart = [_record(b, 0.1, (0.0, 0.2), ceiling=c, ceiling_ci=(c - 0.08, c + 0.08)) for b, c in enumerate((0.3, 0.6, 0.9))]
    assert pool_base_models(apart)[0].informative is False  # each informative; the mean over θ̂ is not pinned down


def test_a_failed_base_model_fails_the_pooled_cell_naming_it():
    group = [_record(0, 0.4, (0.3, 0.5)), _record(1, 0.5, (0.4, 0.6), status="failed")]
    (pooled,) = pool_base_models(group)
    assert pooled.status == "failed" and pooled.error == "boom (base model 2 of 2)" and pooled.metrics == {}


def test_interval_needs_every_base_models_interval():
    assert interval([0.5, 0.5], [[0.4, 0.6], None]) is None
    assert interval([0.5], [[0.4, 0.6]]) == pytest.approx([0.4, 0.6])


def test_facts_that_differ_beyond_numbers_are_marked_as_the_first_base_models():
    def texts(*facts):
        return [f.text for f in pooled_facts([tuple(fact(t, *v) for t, v in base) for base in facts])]

    assert texts([("a {} b", [1])], [("c {} d", [2])]) == ["a 1 b (base model 1)"]
    assert texts([("x", []), ("y", [])], [("x", [])]) == ["x (base model 1)", "y (base model 1)"]
    assert texts([("r = {}", ["0.41"])], [("r = {}", ["0.47"])], [("r = {}", ["0.41"])]) == ["r = 0.41–0.47"]
    assert texts([("flip {}", ["up"])], [("flip {}", ["down"])]) == ["flip up (base model 1)"]  # words: no range


def test_version_1_sentences_are_upgraded_into_templates_and_values_on_read():
    old = Fact.from_json("scored against the mean of 2 seeds (r = 0.410; n = 1,234)", version=1)
    assert old == Fact("scored against the mean of {} seeds (r = {}; n = {})", ("2", "0.410", "1,234"))
    assert old.text == "scored against the mean of 2 seeds (r = 0.410; n = 1,234)"


def test_a_single_base_model_renders_as_before():
    record = _record(0, 0.4, (0.3, 0.5))
    record.update(base_models=1)
    board = render_markdown([record])
    assert "base models' range" not in board and "are a random effect" not in board
    assert "0.400 (0.300 – 0.500)" in board
