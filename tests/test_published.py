"""Published ground truth (#27): export → load → score, integrity, and the tables' exact round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench.atomic import arrays_digest
from bench.cli import main
from bench.truth_tables import from_tables, to_tables

TINY_SUITE = """
name = "tiny-published"
seed = 0
threads = 1
estimators = ["grad-dot", "random"]
bootstrap_resamples = 100

[[tasks]]
name = "mnist-logreg"
preset = "smoke"
protocols = ["loo", "mislabel"]

[[tasks]]
name = "mnist-resnet"
preset = "smoke"
base_models = 2
protocols = ["loo-warm", "lds-scratch"]
n_train = 120
n_test = 40
n_queries = 5
width = 4
epochs = 2
batch_size = 32

[[protocols]]
name = "loo"
n_removed = 20

[[protocols]]
name = "mislabel"

[[protocols]]
name = "loo-warm"
n_removed = 4
seeds = 2
warm_epochs = 1.0

[[protocols]]
name = "lds-scratch"
n_subsets = 4
seeds = 2
"""

PLUGIN = '''
import torch
from estimators.api import Estimator, FitContext, FlatLoss, per_example_grads, registered


@registered("my-grad-dot")
class MyGradDot(Estimator):
    """grad-dot written by a user."""

    uses_head_view = True

    def fit(self, ctx: FitContext) -> None:
        self.ctx = ctx
        self.flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss, ctx.default_parameters or None)

    def score(self, queries, train_idx):
        g = per_example_grads(self.flat, queries)
        return (g @ per_example_grads(self.flat, self.ctx.train.subset(train_idx)).T / self.ctx.n_train).float()
'''


def _records(path: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["protocol"], r["estimator"], r.get("base_model") or 0): r for r in rows}


# -- the tables alone (fast) ------------------------------------------------------------------------------------

def _every_form() -> dict[str, np.ndarray]:
    generator = np.random.default_rng(0)
    groups = [np.sort(generator.choice(50, size, replace=False)) for size in (3, 7, 1, 5)]
    return {"actual": generator.normal(size=(6, 4)), "replicates": generator.normal(size=(2, 6, 4)),
            "extra.margin_replicates": generator.normal(size=(2, 6, 4)).astype(np.float32),
            "train_idx": np.array([], dtype=np.int64), "extra.members": np.concatenate(groups),
            "extra.offsets": np.cumsum([0, *map(len, groups)]), "extra.kinds": np.array([0, 1, 2, 0]),
            "extra.fractions": np.array([0.01, 0.1, 0.3, 0.01]),
            "extra.flipped": np.array([3, 9, 11, 40]),  # 4 = the column count by chance: still not per column
            "extra.retrained.weight": generator.normal(size=(3, 5)).astype(np.float32),
            "extra.noisy": np.array([True, False, True]), "extra.epochs": np.array([1, 2, 4], dtype=np.int32)}


def test_every_array_comes_back_bit_for_bit_with_its_dtype(tmp_path):
    import datasets

    arrays = _every_form()
    tables, layout = to_tables(arrays, np.arange(6) * 3)
    tables.save_to_disk(str(tmp_path / "truth"))
    back = from_tables(datasets.load_from_disk(str(tmp_path / "truth")), layout)
    assert set(back) == set(arrays) and arrays_digest(back) == arrays_digest(arrays)
    assert all(back[name].dtype == arrays[name].dtype for name in arrays)
    columns = datasets.load_from_disk(str(tmp_path / "truth"))["columns"]
    assert columns.column_names == ["column", "effect", "effect_by_seed", "margin_replicates", "train_indices",
                                    "kinds", "fractions"]
    assert columns[1]["train_indices"] == arrays["extra.members"][3:10].tolist()
    assert columns[2]["effect"] == arrays["actual"][:, 2].tolist()  # float64 kept exact, not narrowed
    assert layout["extra.flipped"]["table"] == "arrays"


def test_a_truth_whose_groups_are_not_its_columns_keeps_them_whole(tmp_path):
    import datasets

    arrays = {"actual": np.ones((2, 6)), "extra.members": np.arange(6), "extra.offsets": np.array([0, 2, 4, 6])}
    tables, layout = to_tables(arrays, None)
    assert layout["extra.members"]["table"] == "arrays" and "queries" not in tables
    tables.save_to_disk(str(tmp_path / "t"))
    assert arrays_digest(from_tables(datasets.load_from_disk(str(tmp_path / "t")), layout)) == arrays_digest(arrays)


# -- end to end (slow): a tiny suite run, exported, scored against ----------------------------------------------

@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    (root / "suite.toml").write_text(TINY_SUITE)
    (root / "my_estimator.py").write_text(PLUGIN)
    assert main(["run", "--suite", str(root / "suite.toml"), "--results", str(root / "run"), "--no-isolate",
                 "--no-progress"]) == 0
    assert main(["export", "--results", str(root / "run"), "--out", str(root / "pub"), "--no-figures"]) == 0
    return root


@pytest.mark.slow
def test_scoring_a_published_estimator_against_the_export_reproduces_it_bit_for_bit(published, capsys):
    """grad-dot scored again against the exported truth (θ̂ the published one): every record as published; the
    new estimator is ranked among the published rows in the rendered leaderboard."""
    results = published / "against"
    code = main(["run", "--against", str(published / "pub"), "--plugin", str(published / "my_estimator.py"),
                 "--estimators", "grad-dot", "my-grad-dot", "--results", str(results), "--no-isolate", "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert "every published ground truth holds on this machine" in err
    before, after = _records(published / "pub" / "records.jsonl"), _records(results / "records.jsonl")
    rescored = [key for key in after if key[2] == "grad-dot"]
    assert len(rescored) == 6
    for key in rescored:
        fields = ("metrics", "ci", "per_query", "ceiling", "facts", "cell_key", "truth_digest", "base_digest")
        assert {f: after[key].get(f) for f in fields} == {f: before[key].get(f) for f in fields}, key
    assert after[("mnist-logreg", "loo", "random", 0)] == before[("mnist-logreg", "loo", "random", 0)]
    board = (results / "leaderboard.md").read_text()
    assert "`my-grad-dot`" in board and "`random`" in board
    assert "`my-grad-dot` agrees with `grad-dot`" in board  # the same quantity: paired with the published row


@pytest.mark.slow
def test_the_export_loads_with_datasets_alone(published):
    script = textwrap.dedent(f"""
        import json, sys, datasets
        root = {str(published / "pub")!r}
        manifest = json.load(open(root + "/manifest.json"))
        for entry in manifest["truths"]:
            truth = datasets.load_from_disk(root + "/" + entry["path"])
            columns = truth["columns"].column_names
            assert columns[:2] == ["column", "effect"], columns
            assert len(truth["columns"]) == entry["n_columns"] and len(truth["columns"][0]["effect"]) == entry["n_queries"]
            if entry["query_test_index"]:
                assert truth["queries"].column_names == ["query", "test_index"]
        scratch = datasets.load_from_disk(root + "/groundtruth/mnist-resnet--lds-scratch")["columns"]
        assert {{"effect_by_seed", "train_indices", "margin_replicates"}} <= set(scratch.column_names)
        assert not any(name == "bench" or name.startswith("bench.") for name in sys.modules)
        print(len(manifest["truths"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "5"  # loo, mislabel; lds-scratch shared; loo-warm on each of 2 base models


@pytest.fixture
def copy(published, tmp_path):
    shutil.copytree(published / "pub", tmp_path / "pub")
    return tmp_path / "pub"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["altered", "truncated", "missing"])
def test_a_damaged_file_is_refused_naming_it(copy, damage):
    from bench.published import PublishedError, open_published

    arrow = next((copy / "groundtruth" / "mnist-resnet--lds-scratch" / "columns").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    if damage == "altered":
        data[len(data) // 2] ^= 0xFF
        arrow.write_bytes(bytes(data))
    elif damage == "truncated":
        arrow.write_bytes(bytes(data[:-100]))
    else:
        arrow.unlink()
    with pytest.raises(PublishedError, match=str(arrow)):
        open_published(copy)


@pytest.mark.slow
def test_arrays_altered_with_a_matching_file_digest_are_refused(copy):
    """The second lock: a file re-signed in the manifest after its values changed still fails its truth's digest."""
    import datasets

    from bench.atomic import file_digest
    from bench.published import PublishedError, open_published

    path = copy / "groundtruth" / "mnist-logreg--loo"
    tables = datasets.load_from_disk(str(path), keep_in_memory=True)
    altered = tables["columns"].map(lambda row: {"effect": [v + 1.0 for v in row["effect"]]}, keep_in_memory=True)
    shutil.rmtree(path)
    datasets.DatasetDict({**tables, "columns": altered}).save_to_disk(str(path))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("groundtruth/mnist-logreg--loo/")}
    manifest["files"].update({str(p.relative_to(copy)): {"sha256": file_digest(p), "bytes": p.stat().st_size}
                              for p in path.rglob("*") if p.is_file()})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    published = open_published(copy)
    entry = next(t for t in published.manifest["truths"] if t["name"] == "mnist-logreg--loo")
    with pytest.raises(PublishedError, match="differ from the manifest's digest"):
        published.truth_arrays(entry)


@pytest.mark.slow
def test_another_schema_version_is_refused_naming_both(copy):
    from bench.published import PublishedError, open_published

    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(PublishedError, match=r"schema version 99; this ifbench reads versions 1, 2"):
        open_published(copy)


@pytest.mark.slow
def test_a_checkout_that_plans_other_keys_is_refused_before_any_work(copy, tmp_path, capsys):
    """A protocol option changed since publication: the truth it names is not the published one."""
    from bench.atomic import file_digest

    suite = copy / "suite.toml"
    suite.write_text(suite.read_text().replace("n_subsets = 4", "n_subsets = 5"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["suite.toml"] = {"sha256": file_digest(suite), "bytes": suite.stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code = main(["run", "--against", str(copy), "--estimators", "grad-dot", "--results", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 2 and not (tmp_path / "r" / "records.jsonl").exists()
    assert "mnist-resnet--lds-scratch (base model 0): published" in capsys.readouterr().err


@pytest.mark.slow
def test_a_machine_that_does_not_reproduce_theta_scores_only_the_truths_no_theta_enters(published, tmp_path, capsys):
    """θ̂ of base model 2 is not what the records name (as on a machine whose bits differ): its from-scratch
    cells are scored, its fine-tune response's cells are recorded as failed with the reason, and the command
    says which truths do not hold."""
    from bench.published import open_published, seed_folder

    results = tmp_path / "r"
    seed_folder(open_published(published / "pub"), results, rescored={"my-grad-dot"})
    lines = (results / "records.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows:
        if row["task"] == "mnist-resnet" and row["base_model"] == 1:
            row["base_digest"] = "0" * 64
    (results / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["run", "--against", str(published / "pub"), "--plugin", str(published / "my_estimator.py"),
                 "--estimators", "my-grad-dot", "--results", str(results), "--no-isolate", "--no-progress"])
    assert code == 1  # the θ̂-dependent cells are failed
    err = capsys.readouterr().err
    assert "mnist-resnet--loo-warm--base1: measured around the published θ̂" in err
    after = _records(results / "records.jsonl")
    assert after[("mnist-resnet", "lds-scratch", "my-grad-dot", 1)]["status"] == "ok"
    assert after[("mnist-resnet", "loo-warm", "my-grad-dot", 0)]["status"] == "ok"
    failed = after[("mnist-resnet", "loo-warm", "my-grad-dot", 1)]
    assert failed["status"] == "failed" and "does not hold for this one" in failed["error"]


@pytest.mark.slow
def test_push_sends_every_truth_through_push_to_hub_and_the_folder(published, monkeypatch):
    import datasets
    import huggingface_hub

    from bench.published import push

    calls = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, name, config_name: calls.append(("config", name, config_name)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("folder", kw["repo_id"], kw["path_in_repo"],
                                                         tuple(kw["allow_patterns"]))))
    push(published / "pub", "me/ifbench-truth")
    manifest = json.loads((published / "pub" / "manifest.json").read_text())
    assert [c[2] for c in calls if c[0] == "config"] == [t["name"] for t in manifest["truths"]]
    folder = next(c for c in calls if c[0] == "folder")
    assert folder[1:3] == ("me/ifbench-truth", "published") and set(folder[3]) == {*manifest["files"], "manifest.json"}


def test_an_unreachable_hub_name_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--against", "someone/no-such-truth", "--estimators", "grad-dot", "--no-progress"])
    assert code == 2
    assert "the hub dataset 'someone/no-such-truth' could not be reached" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("extra, message", [([], "give --estimators"), (["--estimators", "x", "--suite", "smoke"],
                                                                          "leave out --suite")])
def test_against_refuses_what_it_cannot_honour(extra, message, capsys):
    assert main(["run", "--against", "leaderboard", *extra, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
