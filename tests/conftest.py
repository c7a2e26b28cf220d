"""Shared fixtures: a toy logistic-regression problem solved exactly."""

from __future__ import annotations

import pytest
import torch

from bench.conformance import ToyProblem, toy_problem


@pytest.fixture(scope="session")
def toy() -> ToyProblem:
    """toy-logreg (60 points) trained to ‖∇J‖ ≤ 1e-12, with exact LOO effects for every point."""
    torch.set_num_threads(2)
    return toy_problem(seed=0)
