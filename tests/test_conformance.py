"""check-estimator chooses its checks by declared capability, each against the toy task's exact answer (#28)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from bench.cli import main, parse_options
from bench.config import ConfigError
from bench.conformance import check_estimator
from estimators.base import GROUP, Estimator
from estimators.group import SecondOrderGroupInfluence
from estimators.influence import ExactInfluence


def _failed(checks):
    return {c.name: c.detail for c in checks if not c.passed}


def test_a_group_only_estimator_that_returns_nan_fails():
    class NanGroups(Estimator):
        name = "nan-groups"
        capabilities: ClassVar[frozenset[str]] = frozenset({GROUP})

        def fit(self, ctx):
            self.n = ctx.n_train

        def score_groups(self, queries, groups):
            return torch.full((len(queries), len(groups)), float("nan"))

    failed = _failed(check_estimator(NanGroups))
    assert "non-finite" in failed["group scores: shape, dtype, finite"]


def test_group_scores_with_a_flipped_sign_fail_against_exact_group_removal():
    class Flipped(SecondOrderGroupInfluence):
        name = "flipped-groups"

        def score_groups(self, queries, groups):
            return -super().score_groups(queries, groups)

    failed = _failed(check_estimator(Flipped))
    assert "flipped" in failed["group scores vs exact group removal"]  # (its single scores are groups of one)


def test_a_sign_flipped_update_fails_and_a_flipped_self_influence_too():
    class Flipped(ExactInfluence):
        name = "flipped-update"

        def update(self, removed, new_targets=None):
            return {k: -v for k, v in super().update(removed, new_targets).items()}

        def self_influence(self, train_idx):
            return -super().self_influence(train_idx)

    failed = _failed(check_estimator(Flipped))
    assert set(failed) == {"update vs exact retraining", "self-influence sign"}
    assert "flipped" in failed["update vs exact retraining"] and "flipped" in failed["self-influence sign"]


def test_an_exception_in_a_second_fit_is_a_failed_check_not_a_traceback():
    class Once(ExactInfluence):
        name = "once"
        fits = 0

        def fit(self, ctx):
            type(self).fits += 1
            if type(self).fits > 1:
                raise RuntimeError("cannot fit twice")
            super().fit(ctx)

    failed = _failed(check_estimator(Once))
    assert failed == {"deterministic": "RuntimeError: cannot fit twice"}


def test_options_are_read_as_in_a_suite_file():
    assert parse_options(["max_iter=5", "dtype=float64", "parameters=['fc']", "tol=1e-3"]) == {
        "max_iter": 5, "dtype": "float64", "parameters": ["fc"], "tol": 1e-3}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["max_iter"])


def test_check_estimator_takes_options_and_refuses_bad_ones_before_any_work(capsys):
    assert main(["check-estimator", "if-cg", "--option", "max_iter=200", "--no-progress"]) == 0
    assert "if-cg: conforms" in capsys.readouterr().out
    assert main(["check-estimator", "if-cg", "--option", "max_itr=5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'max_itr'" in err and "Did you mean 'max_iter'" in err
    assert main(["check-estimator", "fastif", "--option", "k=0", "--no-progress"]) == 2
    assert "fastif" in capsys.readouterr().err
