import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bench.metrics import (
    ceiling,
    per_query,
    rowwise,
    seed_agreement,
    spearman_brown,
    take,
    top_k_overlap,
    two_way_bootstrap,
)

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
    assert np.isfinite(constant_prediction["pearson"]).sum() == np.isfinite(per_query(actual, actual)["pearson"]).sum() == 1


def test_top_k_overlap():
    actual = np.array([5.0, 4, 3, 2, 1])
    assert top_k_overlap(actual, actual, 2) == 1.0
    assert top_k_overlap(-actual, actual, 2) == 0.0
    assert top_k_overlap(np.array([5.0, 1, 4, 2, 3]), actual, 2) == 0.5
    assert top_k_overlap(actual, actual, 50) == 1.0  # k capped at the row length


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        per_query(np.zeros((2, 3)), np.zeros((3, 2)))


def test_rowwise_matches_scipy_with_leading_axes():
    generator = np.random.default_rng(3)
    x, y = generator.normal(size=(2, 4, 9)), generator.normal(size=(2, 4, 9))
    y[1, 2] = 5.0  # a constant actual row: NaN
    for name, reference in (("pearson", scipy.stats.pearsonr), ("spearman", scipy.stats.spearmanr)):
        values = rowwise(name, x, y)
        assert values.shape == (2, 4) and np.isnan(values[1, 2])
        assert values[0, 1] == pytest.approx(reference(x[0, 1], y[0, 1]).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="unknown correlation 'kendall'"):
        rowwise("kendall", x, y)


def synthetic_truth(generator, queries=60, columns=40, seeds=2, noise=1.0):
    """A noise-free effect (heavy-tailed, so a few columns dominate, as real removals do) and K seeds of it
    with independent noise: ``signal [Q, C]``, ``replicates [K, Q, C]``."""
    signal = generator.standard_t(3, size=(queries, columns))
    return signal, signal + noise * generator.normal(size=(seeds, queries, columns))


@pytest.mark.parametrize("seeds", [2, 4])
def test_an_oracle_scores_at_the_ceiling_and_no_honest_predictor_beats_it(seeds):
    """The oracle predicts the noise-free effect: against the K-seed mean it reaches √ρ_K (within the ceiling's
    interval); a noisier predictor stays below. The raw seed-vs-seed agreement r would be beaten."""
    generator = np.random.default_rng(7)
    oracle_scores, ceilings, agreements, noisy_scores = [], [], [], []
    for _ in range(20):
        signal, replicates = synthetic_truth(generator, seeds=seeds, noise=1.5)
        truth = replicates.mean(0)
        oracle_scores.append(np.nanmean(rowwise("pearson", signal, truth)))
        noisy_scores.append(np.nanmean(rowwise("pearson", signal + generator.normal(size=signal.shape), truth)))
        ceilings.append(np.nanmean(ceiling("pearson", replicates)))
        agreements.append(np.nanmean(seed_agreement("pearson", replicates)))
    gap = np.array(oracle_scores) - np.array(ceilings)
    assert abs(gap.mean()) < 3 * gap.std() / np.sqrt(len(gap)) + 0.02  # the oracle sits at the ceiling, unbiased
    assert np.mean(noisy_scores) < np.mean(ceilings) - 0.05
    assert np.mean(oracle_scores) > np.mean(agreements) + 0.1  # r is no ceiling: the oracle beats it


def test_spearman_brown():
    assert spearman_brown(0.5, 1) == pytest.approx(0.5)
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert spearman_brown(-0.3, 2) == 0.0  # anti-correlated seeds: no reliable signal
    assert spearman_brown(1.0, 5) == pytest.approx(1.0)


def queries_only_interval(values: np.ndarray, *, resamples: int, seed: int) -> tuple[float, float]:
    """The naive alternative: a percentile interval from resampling queries alone (columns held fixed)."""
    valid, generator = values[np.isfinite(values)], np.random.default_rng(seed)
    means = [valid[generator.integers(0, len(valid), len(valid))].mean() for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@pytest.mark.slow  # a coverage simulation: hundreds of bootstraps
@pytest.mark.parametrize(("blocks", "width"), [(1, 25), (6, 6)])
def test_two_way_bootstrap_covers_the_expected_value_where_queries_alone_do_not(blocks, width):
    """Queries share the columns. From a population of queries × columns, samples of 30 queries × ``blocks``
    blocks of ``width`` columns (6 × 6 is the group protocol's design); the statistic is the mean over queries of
    the per-query Pearson averaged over blocks, and the estimand its expectation at that design (Pearson over
    few heavy-tailed columns is biased towards 0, which no interval can undo).

    The two-way interval (estimate ± 1.96 bootstrap standard errors) covered the estimand in 89-94% of samples
    (120 trials per design, other seeds): bootstrap intervals for correlations over few columns run a little
    under 95%. The floor below, 0.80, is three binomial standard errors of 100 trials under the lower of those;
    resampling queries alone stays far below it."""
    generator = np.random.default_rng(11)
    population = 3000
    column_effect = generator.standard_t(5, population)
    query_gain = generator.uniform(0.2, 2.0, population)
    query_noise = generator.uniform(0.5, 2.0, population)
    spans = [np.arange(b * width, (b + 1) * width) for b in range(blocks)]

    def sample():
        rows, cols = generator.choice(population, 30), generator.choice(population, blocks * width)
        base = column_effect[cols][None, :] * np.ones((len(rows), 1))
        predicted = base + generator.normal(size=base.shape)
        actual = query_gain[rows, None] * base + query_noise[rows, None] * generator.normal(size=base.shape)
        return predicted, actual

    def statistic(predicted, actual):
        return lambda rows, chosen: np.nanmean(np.stack(
            [rowwise("pearson", take(predicted, rows, c), take(actual, rows, c)) for c in chosen]), axis=0)

    everything = np.arange(30)
    expected = np.mean([np.nanmean(statistic(*sample())(everything, spans)) for _ in range(2000)])
    two_way, queries_only, trials = 0, 0, 100
    for trial in range(trials):
        per_query = statistic(*sample())
        estimate = float(np.nanmean(per_query(everything, spans)))
        low, high = two_way_bootstrap(per_query, 30, lambda g: [s[g.integers(0, width, width)] for s in spans],
                                      estimate=estimate, resamples=300, seed=trial)
        two_way += low <= expected <= high
        low, high = queries_only_interval(per_query(everything, spans), resamples=300, seed=trial)
        queries_only += low <= expected <= high
    assert 0.80 <= two_way / trials <= 1.0
    assert queries_only / trials < two_way / trials - 0.15


@pytest.mark.parametrize("batch_entries", [1, 50, 10**7])
def test_two_way_bootstrap_in_batches_equals_one_resample_at_a_time(monkeypatch, batch_entries):
    """The batched bootstrap draws what a loop over resamples draws and evaluates the same statistic on each:
    against a reference loop (rows, then columns, from one generator; the statistic on one resample at a time),
    the interval is equal to rounding, whatever the batch size (1 resample, a few, all)."""
    import bench.metrics

    generator = np.random.default_rng(3)
    predicted, actual = generator.normal(size=(2, 12, 17))
    actual[0] = 1.0  # a constant row: undefined in every resample that draws it
    blocks = [np.arange(0, 9), np.arange(9, 17)]

    def statistic(rows, chosen):
        return np.nanmean(np.stack([rowwise("spearman", take(predicted, rows, c), take(actual, rows, c))
                                    for c in chosen]), axis=0)

    def draw(g):
        return [b[g.integers(0, len(b), len(b))] for b in blocks]

    estimate = float(np.nanmean(statistic(np.arange(12), blocks)))
    reference, means = np.random.default_rng(5), []
    for _ in range(200):
        rows = reference.integers(0, 12, 12)
        means.append(np.nanmean(statistic(rows, draw(reference))))
    half = 1.959963984540054 * np.std(means, ddof=1)
    monkeypatch.setattr(bench.metrics, "BATCH_ENTRIES", batch_entries)
    low, high = two_way_bootstrap(statistic, 12, draw, estimate=estimate, resamples=200, seed=5)
    assert (low, high) == pytest.approx((max(-1, estimate - half), min(1, estimate + half)), abs=1e-12)
    assert high - low > 0.05
