"""The cache keys of a planned suite: θ̂ per (task, base model), ground truths, predictions and cells.

One function each, so the runner, ``ifbench export`` and ``--against`` compute the same keys from a plan:
a published ground truth is found by the key this checkout plans for it, and a checkout whose task or
protocol changed plans another key (and is told so) instead of being judged against a stale truth.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

from bench import metrics
from bench.config import SuiteConfig
from bench.hashing import stable_hash
from bench.planning import PlannedComponent, PlannedTask
from bench.seeding import derive_seed


def task_seed(suite: SuiteConfig, task: str) -> int:
    return derive_seed(suite.seed, "task", task)


def _task_parts(suite: SuiteConfig, planned: PlannedTask) -> tuple:
    name = planned.spec.name
    return ("task", name, planned.cls.version, planned.config, task_seed(suite, name), suite.device.split(":")[0],
            suite.threads)


def data_key(suite: SuiteConfig, planned: PlannedTask) -> str:
    """Base model 0's θ̂, and the owner of the ground truths no θ̂ enters (``Protocol.depends_on_base`` false)."""
    return stable_hash(*_task_parts(suite, planned))


def task_key(suite: SuiteConfig, planned: PlannedTask, base_model: int) -> str:
    """θ̂ of ``base_model`` (base model 0's is the data key)."""
    if not base_model:
        return data_key(suite, planned)
    return stable_hash(*_task_parts(suite, planned), "base model", base_model)


def protocol_parts(suite: SuiteConfig, protocol: PlannedComponent) -> tuple:
    return (protocol.name, protocol.cls.version, protocol.config, derive_seed(suite.seed, "protocol", protocol.name))


def truth_key(suite: SuiteConfig, planned: PlannedTask, base_model: int, protocol: PlannedComponent) -> str:
    """The ground truth of ``protocol`` on this base model: owned by its θ̂, or by the data if no θ̂ enters it."""
    owner = task_key(suite, planned, base_model) if protocol.cls.depends_on_base else data_key(suite, planned)
    return stable_hash(owner, protocol_parts(suite, protocol))


def prediction_key(suite: SuiteConfig, task_key_: str, protocol: PlannedComponent, estimator: PlannedComponent,
                   fingerprint: str) -> str:
    """What an estimator's prediction depends on: the task, the ground truth's columns, the estimator."""
    return stable_hash(task_key_, protocol_parts(suite, protocol), estimator.name, estimator.config, fingerprint)


def cell_key(suite: SuiteConfig, prediction_key_: str) -> str:
    """A finished cell: the prediction plus how it is judged (metric settings and definitions)."""
    return stable_hash(prediction_key_, suite.top_k, suite.bootstrap_resamples, metrics.VERSION)


def protocol_instance(suite: SuiteConfig, protocol: PlannedComponent) -> Any:
    """The planned protocol, seeded as the runner seeds it."""
    return protocol.cls(protocol.config, seed=derive_seed(suite.seed, "protocol", protocol.name))


def estimator_fingerprint(cls: type) -> str:
    """The estimator's ``version``; for a plug-in (any module but those the ``estimators`` package ships, a file
    placed in ``estimators/`` included) also a hash of the source file that defines it, so editing the plug-in
    re-runs its cells."""
    from estimators import SHIPPED

    package, _, module = cls.__module__.partition(".")
    if package == "estimators" and module in SHIPPED:
        return f"v{cls.version}"
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:  # defined interactively: no file to hash
        source = None
    return f"v{cls.version}-{hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]}" if source else f"v{cls.version}"
