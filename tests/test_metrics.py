import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bench.metrics import per_query, summarise, top_k_overlap

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(3, 25)), elements=finite), st.integers(0, 2**32 - 1))
def test_per_query_agrees_with_scipy(predicted, seed):
    noise = np.random.default_rng(seed).normal(size=(2, *predicted.shape))
    actual = predicted * noise[0] + noise[1]
    values = per_query(predicted, actual)
    for q in range(len(predicted)):
        p, a = predicted[q], actual[q]
        if np.ptp(a) == 0:
            assert all(np.isnan(values[name][q]) for name in ("pearson", "spearman", "kendall"))
            continue
        if np.ptp(p) == 0:
            assert all(values[name][q] == 0.0 for name in ("pearson", "spearman", "kendall"))
            continue
        assert values["pearson"][q] == pytest.approx(scipy.stats.pearsonr(p, a).statistic, nan_ok=True, abs=1e-9)
        assert values["spearman"][q] == pytest.approx(scipy.stats.spearmanr(p, a).statistic, nan_ok=True, abs=1e-9)
        assert values["kendall"][q] == pytest.approx(scipy.stats.kendalltau(p, a).statistic, nan_ok=True, abs=1e-9)


def test_constructed_cases():
    actual = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert per_query(actual * 3 + 1, actual)["pearson"][0] == pytest.approx(1.0)
    assert per_query(-actual, actual)["spearman"][0] == pytest.approx(-1.0)
    assert per_query(actual**3, actual)["spearman"][0] == pytest.approx(1.0)
    assert per_query(actual**3, actual)["pearson"][0] < 1.0


def test_constant_rows_drop_the_query_only_when_the_ground_truth_is_constant():
    """Every estimator is averaged over the same queries: the ground truth alone decides which are dropped."""
    actual = np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    constant_prediction = per_query(np.array([[7.0, 7.0, 7.0], [1.0, 2.0, 3.0]]), actual)
    for name in ("pearson", "spearman", "kendall"):
        assert constant_prediction[name][0] == 0.0 and np.isnan(constant_prediction[name][1])
    assert summarise(constant_prediction["pearson"]).n_valid == summarise(per_query(actual, actual)["pearson"]).n_valid == 1


def test_top_k_overlap():
    actual = np.array([5.0, 4, 3, 2, 1])
    assert top_k_overlap(actual, actual, 2) == 1.0
    assert top_k_overlap(-actual, actual, 2) == 0.0
    assert top_k_overlap(np.array([5.0, 1, 4, 2, 3]), actual, 2) == 0.5
    assert top_k_overlap(actual, actual, 50) == 1.0  # k capped at the row length


def test_summary_ci_and_nan_queries():
    values = np.array([0.1, 0.2, 0.3, 0.4, np.nan])
    summary = summarise(values, resamples=200, seed=1)
    assert summary.n_valid == 4 and summary.mean == pytest.approx(0.25)
    assert summary.low < summary.mean < summary.high
    assert summarise(values, resamples=200, seed=1) == summary  # seeded
    assert summarise(np.array([np.nan])).n_valid == 0


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        per_query(np.zeros((2, 3)), np.zeros((3, 2)))
