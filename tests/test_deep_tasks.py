"""Deep tasks: real loaders, deterministic SGD, exclusion of removed points, noise ceiling."""

import json
import pickle
import textwrap

import numpy as np
import pytest
import torch

from bench.cli import main
from tasks.base import RetrainSpec
from tasks.datasets import DatasetNotFoundError
from tasks.network_data import load_cifar10, load_rotten_tomatoes, load_sst2
from tasks.network_tasks import Cifar10ResNet, CifarConfig, HubBertConfig, RtHubBert, Sst2Bert
from tasks.resnet import MnistResNet, ResNetConfig
from tasks.sgd import SgdRecipe, epoch_order, run_sgd
from tasks.text_data import load_rt_snippets

TINY_RESNET = ResNetConfig(n_train=120, n_test=40, n_queries=5, image_size=14, width=4, epochs=2, batch_size=32)


def test_rt_loader_counts_and_balance():
    texts, labels = load_rt_snippets()
    assert len(texts) == len(labels) == 12_808
    assert int(labels.sum()) == 7_403 and int((labels == 0).sum()) == 5_405
    assert all(isinstance(t, str) and t for t in texts[:100])


def test_text_goes_through_hugging_face_datasets_to_the_same_features():
    """The corpus is a ``datasets.Dataset`` tokenised by ``.map``: the same ids as the tokenizer called directly,
    and so bit-identical frozen features (published rt-bert ground truths stay valid)."""
    import datasets

    from tasks.bert import frozen_features, load_pretrained
    from tasks.text_data import as_dataset, minilm_path, tokenised

    texts, labels = load_rt_snippets()
    corpus = as_dataset(texts[:40], labels[:40])
    assert isinstance(corpus, datasets.Dataset) and corpus.column_names == ["text", "label"]
    tokenizer, model = load_pretrained(str(minilm_path()))
    encoded = tokenised(corpus, tokenizer, 16)
    direct = tokenizer(texts[:40], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    rows = encoded[: len(encoded)]
    assert set(rows) == set(direct) and all(torch.equal(rows[k], direct[k]) for k in direct)
    with torch.no_grad():
        hidden = [model.bert(**{k: v[i : i + 16] for k, v in direct.items()}, output_hidden_states=True).hidden_states[5]
                  for i in range(0, 40, 16)]
    features = frozen_features(model, encoded, trainable_layers=1, batch_size=16)
    assert torch.equal(features[..., :-1], torch.cat(hidden)) and torch.equal(features[..., -1],
                                                                               direct["attention_mask"].float())


def test_same_seed_gives_bit_identical_training():
    torch.set_num_threads(2)
    task = MnistResNet(TINY_RESNET, seed=0)
    data = task.load_data()
    first, second = task.train(data), task.train(data)
    assert all(torch.equal(first.params[k], second.params[k]) for k in first.params)
    other = task.train(data, seed=1)
    assert not torch.equal(first.params["fc.weight"], other.params["fc.weight"])


def test_checkpoints_carry_the_learning_rate_in_force():
    task = MnistResNet(TINY_RESNET, seed=0)
    base = task.train(task.load_data())
    assert len(base.checkpoints) == TINY_RESNET.n_checkpoints
    rates = [c.learning_rate for c in base.checkpoints]
    assert rates == sorted(rates, reverse=True) and rates[0] < TINY_RESNET.lr  # cosine decay
    assert [c.step for c in base.checkpoints] == sorted({c.step for c in base.checkpoints})


def test_retraining_without_a_point_excludes_exactly_that_point():
    recipe = SgdRecipe(epochs=3, batch_size=7, lr=0.01, n_checkpoints=1)
    n, removed = 50, 17
    model = torch.nn.Linear(3, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    from tasks.base import Split

    split = Split(torch.randn(n, 3), torch.randint(0, 2, (n,)))
    loss = torch.nn.functional.cross_entropy

    def visits(exclude):
        seen = []
        run_sgd(model, params, split, lambda o, t: loss(o, t, reduction="none"), recipe, seed=3, exclude=exclude,
                on_batch=lambda batch: seen.append(batch.clone()))
        return torch.cat(seen)

    full, without = visits(None), visits(torch.tensor([removed]))
    assert (without == removed).sum() == 0
    assert len(without) == recipe.epochs * (n - 1)
    for epoch in range(recipe.epochs):  # every other point once per epoch, in the same order
        chunk = without[epoch * (n - 1) : (epoch + 1) * (n - 1)]
        assert sorted(chunk.tolist()) == [i for i in range(n) if i != removed]
        reference = full[epoch * n : (epoch + 1) * n]
        assert torch.equal(chunk, reference[reference != removed])
    assert torch.equal(epoch_order(n, 3, 0, None), full[:n])


def test_warm_retrain_with_nothing_removed_is_the_control():
    task = MnistResNet(TINY_RESNET, seed=0)
    data = task.load_data()
    base = task.train(data)
    spec = RetrainSpec("warm", 0, 5, 0.1)
    control = task.retrain_without(data, base, [torch.tensor([], dtype=torch.long)], spec)[0].params
    again = task.retrain_without(data, base, [torch.tensor([], dtype=torch.long)], spec)[0].params
    removed = task.retrain_without(data, base, [torch.tensor([0])], spec)[0].params
    assert all(torch.equal(control[k], again[k]) for k in control)
    assert not all(torch.equal(control[k], removed[k]) for k in control)


def test_warm_ground_truth_has_no_structurally_zero_column():
    """One epoch or more visits every removed point, under every seed: no column of any seed is exactly 0
    (a shorter warm run never reaches some removed points, and is refused)."""
    from bench.groundtruth.loo import LeaveOneOutWarm, LooConfig

    task = MnistResNet(TINY_RESNET, seed=0)
    data = task.load_data()
    base = task.train(data)
    truth = LeaveOneOutWarm(LooConfig(n_removed=12, seeds=2, warm_epochs=1.0), seed=0).compute(task, data, base,
                                                                                           progress=False)
    assert truth.replicates.shape == (2, len(data.queries), 12)
    assert (np.abs(truth.replicates).max(axis=1) > 0).all()  # [seed, column]: some query moved
    assert truth.diagnostics["warm_steps"] == 4  # 119 kept points in batches of 32
    with pytest.raises(ValueError, match="at least 1 epoch"):
        LeaveOneOutWarm(LooConfig(n_removed=12, warm_epochs=0.5), seed=0).compute(task, data, base, progress=False)


def test_the_root_seed_reaches_warm_retrains_batch_order():
    """Same θ̂ and spec, tasks seeded differently (as ``--seed`` does): the warm retrains visit batches in
    another order, so their parameters differ; the same seed repeats them bit for bit."""
    data = MnistResNet(TINY_RESNET, seed=0).load_data()
    base = MnistResNet(TINY_RESNET, seed=0).train(data)
    spec = RetrainSpec("warm", 0, 4, 0.1)

    def retrained(task_seed):
        return MnistResNet(TINY_RESNET, seed=task_seed).retrain_without(data, base, [torch.tensor([3])], spec)[0].params

    first, again, other = retrained(0), retrained(0), retrained(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def write_cifar(root, per_batch=30):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": generator.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": list(generator.integers(0, 10, per_batch)), b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar_loader_reads_the_real_format(tmp_path):
    write_cifar(tmp_path)
    parts = load_cifar10(str(tmp_path))
    assert parts["train"][0].shape == (150, 3, 32, 32) and parts["test"][0].shape == (30, 3, 32, 32)
    assert parts["train"][1].dtype == np.int64
    config = CifarConfig(n_train=40, n_test=20, n_queries=4, data_dir=str(tmp_path), epochs=1, batch_size=20)
    task = Cifar10ResNet(config, seed=0)
    base = task.train(task.load_data())
    assert 0.0 <= base.diagnostics["test_accuracy"] <= 1.0


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="download"):
        load_cifar10(str(tmp_path))


def write_sst2_and_tiny_bert(root):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["good", "bad", "movie", "great", "awful", "fun", "dull", "plot", "acting"]
    (root / "SST-2").mkdir()
    generator = np.random.default_rng(0)
    for name, n in (("train.tsv", 40), ("dev.tsv", 16)):
        rows = ["sentence\tlabel"] + [f"{' '.join(generator.choice(words, 4))} \t{i % 2}" for i in range(n)]
        (root / "SST-2" / name).write_text("\n".join(rows) + "\n")
    model_dir = root / "tiny-bert"
    vocab = model_dir / "vocab.txt"
    model_dir.mkdir()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    config = BertConfig(vocab_size=14, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    return model_dir


def test_sst2_loader_and_hub_style_checkpoint(tmp_path):
    model_dir = write_sst2_and_tiny_bert(tmp_path)
    parts = load_sst2(str(tmp_path))
    assert len(parts["train"][0]) == 40 and len(parts["test"][0]) == 16 and set(parts["train"][1]) == {0, 1}
    config = HubBertConfig(checkpoint=str(model_dir), data_dir=str(tmp_path), n_train=24, n_test=12, n_queries=4,
                           max_length=8, epochs=1, batch_size=8)
    task = Sst2Bert(config, seed=0)
    data = task.load_data()
    assert data.train.inputs.shape == (24, 8, 17)  # hidden 16 + the packed attention mask
    assert 0.0 <= task.train(data).diagnostics["test_accuracy"] <= 1.0


def test_missing_sst2_and_unknown_checkpoint_are_clear(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="SST-2"):
        load_sst2(str(tmp_path))
    write_sst2_and_tiny_bert(tmp_path)
    task = Sst2Bert(HubBertConfig(checkpoint=str(tmp_path / "nowhere"), data_dir=str(tmp_path), n_train=8, n_test=4,
                                  n_queries=2), seed=0)
    with pytest.raises(DatasetNotFoundError, match="cannot load BERT checkpoint"):
        task.load_data()


def save_rotten_tomatoes(root, sizes=(("train", 40), ("validation", 8), ("test", 16))):
    """A small corpus in the hub dataset's saved format (DatasetDict.save_to_disk), its columns and splits."""
    import datasets

    words = ["good", "bad", "movie", "great", "awful", "fun", "dull", "plot", "acting"]
    generator = np.random.default_rng(1)
    parts = {name: datasets.Dataset.from_dict({"text": [" ".join(generator.choice(words, 5)) for _ in range(n)],
                                                "label": [i % 2 for i in range(n)]}) for name, n in sizes}
    datasets.DatasetDict(parts).save_to_disk(str(root / "rotten_tomatoes"))


def test_rotten_tomatoes_loads_the_hubs_saved_splits(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="Rotten Tomatoes not found"):
        load_rotten_tomatoes(str(tmp_path))
    model_dir = write_sst2_and_tiny_bert(tmp_path)
    save_rotten_tomatoes(tmp_path)
    parts = load_rotten_tomatoes(str(tmp_path))
    assert {k: len(v[0]) for k, v in parts.items()} == {"train": 40, "test": 16} and set(parts["test"][1]) == {0, 1}
    config = HubBertConfig(checkpoint=str(model_dir), data_dir=str(tmp_path), n_train=24, n_test=12, n_queries=4,
                           max_length=8, epochs=1, batch_size=8)
    data = RtHubBert(config, seed=0).load_data()
    assert data.train.inputs.shape == (24, 8, 17) and len(data.test) == 12


def test_tokenised_text_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    """``Dataset.map``'s tokens go to an Arrow file under the cache folder once; a second call reads them
    (the tokenizer is not called again) and a different length or text is a different file."""
    from transformers import BertTokenizerFast

    from tasks.text_data import as_dataset, tokenised

    monkeypatch.setenv("IFBENCH_CACHE", str(tmp_path / "cache"))
    model_dir = write_sst2_and_tiny_bert(tmp_path)

    class Counting(BertTokenizerFast):
        calls = 0

        def __call__(self, *args, **kwargs):
            type(self).calls += 1
            return super().__call__(*args, **kwargs)

    tokenizer = Counting.from_pretrained(str(model_dir))
    corpus = as_dataset(["good movie", "awful plot acting", "fun"], np.array([1, 0, 1]))
    first = tokenised(corpus, tokenizer, 8)
    files = sorted((tmp_path / "cache" / "tokenised").glob("*.arrow"))
    assert len(files) == 1 and Counting.calls == 1
    second = tokenised(corpus, tokenizer, 8)
    assert Counting.calls == 1 and torch.equal(first[:]["input_ids"], second[:]["input_ids"])
    tokenised(corpus, tokenizer, 6)
    tokenised(as_dataset(["good movie", "awful plot acting", "dull"], np.array([1, 0, 1])), tokenizer, 8)
    assert Counting.calls == 3 and len(list((tmp_path / "cache" / "tokenised").glob("*.arrow"))) == 3


@pytest.mark.slow
def test_deep_protocols_end_to_end_with_noise_ceiling(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent("""
        name = "tiny"
        threads = 2
        bootstrap_resamples = 50
        estimators = ["if-exact", "random"]
        [[tasks]]
        name = "mnist-resnet"
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
        [[protocols]]
        name = "loo-scratch"
        n_removed = 2
        seeds = 2
    """))
    results = tmp_path / "r"
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 0
    written = (results / "records.jsonl").read_text()
    records = [json.loads(line) for line in written.splitlines()]
    by = {(r["protocol"], r["estimator"]): r for r in records}
    for protocol in ("loo-warm", "loo-scratch"):
        record = by[protocol, "if-exact"]
        assert record["status"] == "ok" and record["groundtruth_diagnostics"]["seeds"] == 2
        assert 0 <= record["groundtruth_diagnostics"]["ceiling_pearson"] <= 1
    assert "*noise ceiling*" in (results / "leaderboard.md").read_text()
    suite.write_text(suite.read_text() + '[[protocols]]\nname = "loo"\n')  # exact retraining on a deep net
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 2  # refused at planning
    assert "protocol 'loo' retrains exactly and needs a convex task" in capsys.readouterr().err
    assert (results / "records.jsonl").read_text() == written


@pytest.mark.parametrize("estimator", ["if-exact", "if-cg", "grad-dot", "gif", "group-if-2"])
def test_head_view_gives_the_same_influence_as_the_whole_model(estimator):
    from bench.catalog import default_registries
    from estimators.base import FitContext

    task = MnistResNet(TINY_RESNET, seed=0)
    data = task.load_data()
    base = task.train(data)
    cls = default_registries().estimators.get(estimator)
    idx = torch.arange(0, 120, 9)
    whole = cls()
    whole.fit(FitContext(task.build_model(), base.params, task.loss, task.l2, data.train, 0,
                         default_parameters=("fc",)))
    view = task.head_view(base.params)
    assert view is not None and view.prefix == "fc" and set(view.params) == {"weight", "bias"}
    head = cls()
    head.fit(FitContext(view.module, view.params, task.loss, task.l2, view.split(data.train), 0))
    on_head, on_whole = head.score(view.split(data.queries), idx), whole.score(data.queries, idx)
    if estimator != "if-cg":  # direct solves: the same numbers up to float32 rounding
        torch.testing.assert_close(on_head, on_whole, rtol=1e-3, atol=1e-6)
        return
    # CG stops at ‖r‖ ≤ tol·‖g_q‖ and H ⪰ l2·I on the head, so each solve's s_test is within tol·‖g_q‖/l2 of
    # H⁻¹g_q and each score (g_zᵀ s_test / n) within tol·‖g_q‖·‖g_z‖/(n·l2): two solves, twice that; plus
    # float32 rounding of the Hessian-vector products (1e-4 relative)
    from estimators.autodiff import FlatLoss, per_example_grads

    flat = FlatLoss.of(view.module, view.params, task.loss)
    g_query = per_example_grads(flat, view.split(data.queries)).double().norm(dim=1)
    g_train = per_example_grads(flat, view.split(data.train).subset(idx)).double().norm(dim=1)
    tol = cls.Config().tol
    bound = 2 * tol * g_query[:, None] * g_train[None, :] / (len(data.train) * task.l2)
    gap = (on_head.double() - on_whole.double()).abs()
    assert (gap <= bound + 1e-4 * on_whole.double().abs() + 1e-9).all(), float((gap - bound).max())
    assert float(bound.max()) < 0.1 * float(on_whole.abs().max())  # the bound is tight enough to mean something


def test_tracin_through_checkpoint_head_views_equals_whole_model_gradients():
    """TracIn restricted to fc runs the trunk once per checkpoint (head view at that checkpoint);
    the scores equal the learning-rate-weighted whole-model fc gradient products."""
    from estimators.autodiff import FlatLoss, per_example_grads
    from estimators.base import FitContext
    from estimators.tracin import TracIn

    task = MnistResNet(TINY_RESNET, seed=0)
    data = task.load_data()
    base = task.train(data)
    idx = torch.arange(0, 120, 11)
    ctx = FitContext(task.build_model(), base.params, task.loss, task.l2, data.train, 0, base.checkpoints,
                     default_parameters=("fc",), head_view_at=task.head_view)
    tracin = TracIn()
    tracin.fit(ctx)
    expected = 0
    for checkpoint in base.checkpoints:
        flat = FlatLoss.of(task.build_model(), checkpoint.params, task.loss, ("fc",))
        expected = expected + checkpoint.learning_rate * (
            per_example_grads(flat, data.queries) @ per_example_grads(flat, data.train.subset(idx)).T)
    torch.testing.assert_close(tracin.score(data.queries, idx), expected.float(), rtol=1e-4, atol=1e-7)


def test_bert_offers_cls_features_and_fastif_leaves_the_head_view_for_them(tmp_path):
    from estimators.fastif import FastIf, FastIfConfig

    model_dir = write_sst2_and_tiny_bert(tmp_path)
    config = HubBertConfig(checkpoint=str(model_dir), data_dir=str(tmp_path), n_train=24, n_test=12, n_queries=4,
                           max_length=8, epochs=1, batch_size=8)
    task = Sst2Bert(config, seed=0)
    data = task.load_data()
    base = task.train(data)
    model = task.build_model()
    cls = task.embed(base.params, data.queries, "cls")
    pooled = task.embed(base.params, data.queries, "penultimate")
    with torch.no_grad():
        top = torch.func.functional_call(model, base.params, (data.queries.inputs,), strict=False)
    assert cls.shape == pooled.shape == (4, 16) and not torch.allclose(cls, pooled)
    head = torch.nn.functional.linear(pooled, base.params["classifier.weight"], base.params["classifier.bias"])
    torch.testing.assert_close(head, top)  # "penultimate" is exactly the classifier's input
    assert FastIf.runs_on_head_view(FastIfConfig()) and not FastIf.runs_on_head_view(FastIfConfig(features="cls"))
    with pytest.raises(ValueError, match="unknown feature space 'pooler'"):
        task.embed(base.params, data.queries, "pooler")


@pytest.mark.slow
def test_full_suite_protocols_run_on_the_network_tasks(tmp_path):
    """Every protocol the ``full`` suite lists for SST-2 runs on files in the real format (tiny BERT). CIFAR-10's
    ResNet-18 costs ~5 minutes even on 48 images here, so its protocols run on a tiny mnist-resnet, the same
    ResNetTask code (those the default and smoke suites do not already run there)."""
    from bench.config import load_suite

    lists = {t.name: list(t.protocols) for t in load_suite("full").tasks}
    on_mnist_resnet = {p for name in ("default", "smoke") for t in load_suite(name).tasks if t.name == "mnist-resnet"
                       for p in t.protocols}
    tiny_protocols = {
        "loo-warm": "n_removed = 2", "loo-scratch": "n_removed = 2", "lds": "n_subsets = 3",
        "lds-scratch": "n_subsets = 3", "label-change": "fraction = 0.1", "mislabel": "n_ranked = 0",
        "group": "fractions = [0.1]\ngroups_per_cell = 2", "retrain-length": "n_removed = 3\nepochs = [1, 2]",
        "lds-replay": "n_subsets = 6\nn_queries = 2\ndrop_fraction = 0.1\nsweep = []\nfirst_base_models = 1",
        "loo-replay": "n_removed = 6\nn_queries = 2\nfirst_base_models = 1",
    }
    missing = sorted(set(lists["cifar10-resnet"]) - on_mnist_resnet)
    if missing:
        resnet = ('name = "tiny-resnet"\nthreads = 2\nbootstrap_resamples = 20\nestimators = ["if-exact", "random"]\n'
                  '[[tasks]]\nname = "mnist-resnet"\npreset = "smoke"\nn_train = 200\nn_test = 60\nn_queries = 4\n'
                  f'epochs = 1\nprotocols = {json.dumps(missing)}\n')
        resnet += "".join(f'[[protocols]]\nname = "{p}"\n{tiny_protocols[p]}\n' for p in missing)
        (tmp_path / "resnet.toml").write_text(resnet)
        assert main(["run", "--suite", str(tmp_path / "resnet.toml"), "--results", str(tmp_path / "rr"),
                     "--no-progress", "--no-isolate"]) == 0
        ran = [json.loads(line) for line in (tmp_path / "rr" / "records.jsonl").read_text().splitlines()]
        assert {r["protocol"] for r in ran if r["status"] == "ok"} == set(missing)
    model_dir = write_sst2_and_tiny_bert(tmp_path)
    text = ('name = "tiny-full"\nthreads = 2\nbootstrap_resamples = 20\n'
            'estimators = ["if-exact", "gif", "tracin", "magic", "random"]\n'
            f'[[tasks]]\nname = "sst2-bert"\npreset = "smoke"\ncheckpoint = "{model_dir}"\nn_train = 32\n'
            f'n_test = 12\nn_queries = 4\nmax_length = 8\nprotocols = {json.dumps(lists["sst2-bert"])}\n')
    for protocol in lists["sst2-bert"]:
        text += f'[[protocols]]\nname = "{protocol}"\n{tiny_protocols[protocol]}\n'
    (tmp_path / "s.toml").write_text(text)
    results = tmp_path / "r"
    assert main(["run", "--suite", str(tmp_path / "s.toml"), "--results", str(results), "--data-dir", str(tmp_path),
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert {r["protocol"] for r in records} == set(lists["sst2-bert"])
    failed = [(r["protocol"], r["estimator"], r["error"]) for r in records if r["status"] == "failed"]
    assert not failed
    assert {r["status"] for r in records if r["estimator"] == "if-exact"} == {"ok"}
    undefined = [(r["protocol"], r["estimator"]) for r in records
                 if r["status"] == "ok" and r["headline"] and r["metrics"].get(r["headline"]) is None]
    assert not undefined, f"ok cells with an undefined headline metric: {undefined}"


def test_layer_rows_on_a_bert_layer_are_exact(tmp_path):
    """On a real (tiny) BERT layer, whose Linear layers act along the sequence: TRAK's Kronecker sketch with sides
    as wide as the layers equals dense no-projection TRAK over the same Linear weights and biases, and grad-dot
    from batched backward passes equals vmapped per-example gradients, as do DataInf and Arnoldi (same Krylov
    space: the same HVPs) scoring training points a chunk at a time from them; a 2-model
    ensemble trains its second model by the task's recipe from a seed of its own."""
    from bench.context import fit_context
    from estimators.arnoldi import ArnoldiInfluence
    from estimators.datainf import DataInf
    from estimators.layers import covered_layers, layer_parameter_names
    from estimators.tracin import GradDot
    from estimators.trak import Trak

    model_dir = write_sst2_and_tiny_bert(tmp_path)
    config = HubBertConfig(checkpoint=str(model_dir), data_dir=str(tmp_path), n_train=24, n_test=12, n_queries=4,
                           max_length=8, epochs=1, batch_size=8)
    task = Sst2Bert(config, seed=0)
    data = task.load_data()
    trained = fit_context(task, data, task.train(data), seed=0)
    ctx = trained.in_dtype(torch.float64)  # the comparisons in float64: rounding (~1e-16) times κ stays far below 1e-8
    queries = data.queries.in_dtype(torch.float64)
    linear = layer_parameter_names(covered_layers(ctx.model, ctx.params, ()))
    assert any(n.startswith("layer.attention") for n in linear) and "classifier.weight" in linear
    idx = torch.arange(24)

    def scores(cls, context=ctx, **options):
        estimator = cls(cls.Config(**options))
        estimator.fit(context)
        return estimator, estimator.score(queries if context is ctx else data.queries, idx)

    _, dense = scores(Trak, parameters=linear, projection_dim=0)
    sketch, sketched = scores(Trak, parameters=("*",), projection="kronecker", side_dim=64)
    assert sketch.diagnostics()["features"] == sketch.diagnostics()["n_parameters"] == sum(ctx.params[n].numel() for n in linear)
    torch.testing.assert_close(sketched, dense, rtol=1e-6, atol=1e-9)  # float32 output: within a few ulps
    _, by_vmap = scores(GradDot, parameters=linear)
    _, by_layers = scores(GradDot, parameters=("*",), gradients="layers", column_chunk=10)
    torch.testing.assert_close(by_layers, by_vmap, rtol=1e-6, atol=1e-9)
    _, kept = scores(DataInf, parameters=linear)
    _, streamed = scores(DataInf, parameters=("*",), gradients="layers", column_chunk=10)
    torch.testing.assert_close(streamed, kept, rtol=1e-6, atol=1e-12)
    whole, by_vmap = scores(ArnoldiInfluence, parameters=linear, iterations=12, rank=6, damping=0.01)
    chunked, by_layers = scores(ArnoldiInfluence, parameters=("*",), iterations=12, rank=6, damping=0.01,
                                gradients="layers", column_chunk=10)
    assert chunked.diagnostics()["n_parameters"] == whole.diagnostics()["n_parameters"]
    torch.testing.assert_close(by_layers, by_vmap, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(chunked.self_influence(idx), whole.self_influence(idx), rtol=1e-6, atol=1e-12)
    ensemble, _ = scores(Trak, trained, parameters=("*",), projection="kronecker", side_dim=4, models=2)
    assert ensemble.diagnostics()["models"] == 2.0 and ensemble.diagnostics()["ensemble_training_s"] > 0
