"""lds-scratch: subset models trained from scratch, shared by every base model (#24)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.groundtruth.base import Settings, TaskShape
from bench.groundtruth.lds import plan_subsets
from bench.groundtruth.lds_scratch import LdsScratch, LdsScratchConfig
from tasks.base import RetrainSpec, correct_class_margin
from tasks.resnet import MnistResNet, ResNetConfig

TINY = ResNetConfig(n_train=120, n_test=40, n_queries=5, image_size=14, width=4, epochs=2, batch_size=32,
                    retrain_batch=4)


@pytest.fixture(scope="module")
def truths():
    torch.set_num_threads(2)
    protocol = LdsScratch(LdsScratchConfig(n_subsets=4, seeds=2), seed=3)
    found = []
    for base_model in (0, 1):
        task = MnistResNet(TINY, seed=5, base_model=base_model)
        data = task.load_data()
        found.append((task, data, protocol.compute(task, data, task.train(data), progress=False)))
    return protocol, found


def test_the_truth_is_the_same_whichever_base_model_asks(truths):
    _, [(_, _, first), (_, _, second)] = truths
    assert np.array_equal(first.actual, second.actual) and np.array_equal(first.replicates, second.replicates)
    assert np.array_equal(first.extra["margin_replicates"], second.extra["margin_replicates"])


def test_subset_models_are_trained_from_scratch_under_seeds_no_base_model_has(truths):
    """Seed k's column m is the query loss of the model the task trains from scratch without subset m's complement
    under replicate seed k + 1 (stacked as the protocol stacks them: exactness of stacking is tested apart), each
    query's row centred over the subsets."""
    protocol, [(task, data, truth), (other, _, _)] = truths
    removed = [torch.as_tensor(r) for r in plan_subsets(len(data.train), 4, 0.5, protocol.seed)]
    assert truth.replicates.shape == (2, 5, 4)
    for k in range(2):
        assert task.replicate_seed(k + 1) not in (task.training_seed, other.training_seed)
        retrained = task.retrain_without(data, None, removed, RetrainSpec("scratch", k + 1))
        with torch.no_grad():
            losses = np.stack([task.per_example_measures(task.build_model(), r.params, data.queries)[0].numpy()
                               for r in retrained], axis=1).astype(np.float64)
        assert np.array_equal(losses - losses.mean(1, keepdims=True), truth.replicates[k])
    assert np.allclose(truth.actual, truth.replicates.mean(0))


def test_the_margin_is_the_correct_class_logit_minus_the_logsumexp_of_the_others():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    targets = torch.tensor([0, 2])
    expected = torch.tensor([2.0 - np.logaddexp(0.5, -1.0), 1.0 - np.logaddexp(0.0, 3.0)], dtype=torch.float32)
    assert torch.allclose(correct_class_margin(logits, targets), expected)
    two = torch.tensor([[1.5, -0.5]])  # two classes: the margin is the logit difference
    assert torch.allclose(correct_class_margin(two, torch.tensor([0])), torch.tensor([2.0]))


def test_an_oracle_scores_one_and_a_sign_flip_minus_one(truths):
    protocol, [(_, _, truth), _] = truths
    settings = Settings(resamples=50)
    good = protocol.measure(truth.actual, truth, settings).metrics  # an oracle of the loss change
    assert good["lds"] == pytest.approx(1.0)
    assert good["lds_margin"] > 0.5  # negated, it ranks the margins: they fall where the loss rises
    assert protocol.measure(-truth.actual, truth, settings).metrics["lds"] == pytest.approx(-1.0)
    assert set(protocol.noise_ceiling(truth, settings)) >= {"ceiling_lds", "ceiling_lds_margin", "informative"}


def test_convex_tasks_and_empty_subsets_are_refused_at_planning():
    with pytest.raises(ValueError, match="convex"):
        LdsScratch.check_against(LdsScratchConfig(), TaskShape("mnist-logreg", True, 4500))
    with pytest.raises(ValueError, match="keeps no point"):
        LdsScratch.check_against(LdsScratchConfig(alpha=0.01), TaskShape("t", False, 20))
    with pytest.raises(ValueError, match="seeds must be ≥ 2"):
        LdsScratchConfig(seeds=1)
