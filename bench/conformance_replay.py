"""Conformance of an estimator that declares only ``replay`` (``magic``): checked on a tiny recorded SGD run.

The toy convex task has no training run to replay, so such an estimator is fitted on a tiny ResNet trained
by SGD (the embedded MNIST digits, 48 points, two epochs) and its scores are compared with leave-one-out
replays of that run (:func:`bench.groundtruth.replay.replay_effects`: each point's weight set to 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench import metrics
from bench.context import fit_context
from bench.groundtruth.base import validate_scores
from bench.groundtruth.replay import replay_effects
from estimators.base import Estimator
from tasks.resnet import MnistResNet, ResNetConfig

#: The tiny recorded run: small enough that exact replays of every removal take seconds.
TINY_RUN = ResNetConfig(n_train=48, n_test=12, n_queries=3, image_size=14, width=2, epochs=2, batch_size=16,
                        retrain_batch=4)
#: Training points whose leave-one-out replays the scores are compared with.
N_REMOVED = 8


def replay_checks(cls: type[Estimator], config: Any, agreement: Callable[[str, float, bool, str], Any],
                  check: Callable[[str, bool, str], Any]) -> list[Any]:
    """Fit, shape/dtype/finite, column subset, Pearson with exact replays, and a fresh instance's answer."""
    torch.manual_seed(0)
    task = MnistResNet(TINY_RUN, seed=0)
    data = task.load_data()
    base = task.train(data)
    estimator = cls(config)
    estimator.fit(fit_context(task, data, base, 0))
    train_idx = torch.arange(N_REMOVED)
    scores = estimator.score(data.queries, train_idx)
    problem = validate_scores(scores, (len(data.queries), N_REMOVED))
    checks = [check("fit", True, f"ran on a recorded SGD run ({task.recorded_run(data).run.steps} steps)"),
              check("shape, dtype, finite", problem is None, problem or f"float32 tensor {tuple(scores.shape)}")]
    if problem:
        return checks
    part = estimator.score(data.queries, train_idx[::2])
    same = torch.allclose(part, scores[:, ::2], rtol=1e-4, atol=1e-6)
    checks.append(check("column subset", same, "a subset of columns gives those columns" if same
                        else "scores for a subset of training points differ from the full matrix's columns"))
    actual, _ = replay_effects(task, data, base, [np.array([i]) for i in range(N_REMOVED)], data.queries, spec=None,
                               progress=False, desc="")
    pearson = float(np.nanmean(metrics.per_query(scores.numpy(), actual)["pearson"]))
    checks.append(agreement("agreement with exact replays", pearson, cls.is_baseline, "mean per-query Pearson"))
    again = cls(config)
    again.fit(fit_context(task, data, base, 0))
    repeat = torch.allclose(again.score(data.queries, train_idx), scores, rtol=1e-5, atol=1e-7)
    checks.append(check("deterministic", repeat, "a fresh instance gives the same answer" if repeat
                        else "two fresh instances differ"))
    return checks
