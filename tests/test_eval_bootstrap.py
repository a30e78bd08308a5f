"""The shared paired bootstrap and the row-wise GLUE metrics, against independent computations."""
from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from normswap.evaluation import asr, bootstrap


def loop_interval(stat, a, b, resamples, seed, level=0.95):
    """The paired bootstrap written plainly: one numpy resample at a time, statistic on each model."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a), np.asarray(b)
    d = []
    for _ in range(resamples):
        idx = rng.integers(0, len(a), len(a))
        d.append(stat(a[idx]) - stat(b[idx]))
    tail = (1 - level) / 2 * 100
    return np.percentile(d, tail), np.percentile(d, 100 - tail)


def python_loop_interval(a, b, resamples, seed):
    """Another index stream altogether (random.Random), percentile by sorting: agrees only within Monte-Carlo error."""
    rng = random.Random(seed)
    n = len(a)
    d = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        d.append(sum(a[i] for i in idx) / n - sum(b[i] for i in idx) / n)
    d.sort()
    return d[int(0.025 * resamples)], d[int(0.975 * resamples) - 1]


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(5)
    n = 301  # odd, so block-wise draws meet the per-resample stream on an odd count too
    base = rng.normal(1.0, 1.0, n)
    return base + rng.normal(0.05, 0.5, n), base


def test_generic_bootstrap_equals_a_plain_numpy_loop(scores):
    a, b = scores
    median = np.median
    for resamples, seed, level in ((1000, 0, 0.95), (257, 3, 0.9)):
        got = bootstrap.paired_bootstrap(lambda idx: median(a[idx]) - median(b[idx]), len(a), resamples=resamples, seed=seed, level=level)
        want = loop_interval(median, a, b, resamples, seed, level)
        assert got == pytest.approx(want, abs=1e-12)
        batched = bootstrap.paired_bootstrap(lambda idx: np.median(a[idx], axis=1) - np.median(b[idx], axis=1), len(a),
                                             resamples=resamples, seed=seed, level=level, batched=True)
        assert batched == pytest.approx(got, abs=1e-12)


def test_mean_fast_path_equals_the_loop_and_agrees_with_scipy_and_another_stream(scores):
    a, b = scores
    got = bootstrap.paired_mean_ci(a, b, resamples=4000, seed=1)
    assert got == pytest.approx(loop_interval(np.mean, a, b, 4000, 1), abs=1e-12)
    ref = stats.bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True, vectorized=True, n_resamples=4000,
                          method="percentile", confidence_level=0.95, rng=np.random.default_rng(11)).confidence_interval
    other = python_loop_interval(a.tolist(), b.tolist(), 4000, 2)
    width = got[1] - got[0]
    for lo, hi in ((ref.low, ref.high), other):  # endpoint Monte-Carlo error at 4000 resamples ~ 2 % of the width
        assert abs(lo - got[0]) < 0.08 * width and abs(hi - got[1]) < 0.08 * width
    point = a.mean() - b.mean()
    assert got[0] < point < got[1]


def test_identical_inputs_give_zero_and_a_clearly_better_model_excludes_zero(scores):
    a, b = scores
    assert bootstrap.paired_mean_ci(b, b) == (0.0, 0.0)
    assert bootstrap.paired_bootstrap(lambda idx: np.median(b[idx]) - np.median(b[idx]), len(b)) == (0.0, 0.0)
    lo, hi = bootstrap.paired_mean_ci(b + 0.5, b + np.random.default_rng(0).normal(0, 0.3, len(b)))
    assert 0 < lo < hi


def test_per_item_accuracy_delta():
    rng = np.random.default_rng(2)
    correct_b = rng.random(500) < 0.7
    correct_a = correct_b | (rng.random(500) < 0.2)  # fixes some errors, breaks none
    lo, hi = bootstrap.paired_mean_ci(correct_a.astype(float), correct_b.astype(float), resamples=2000, seed=4)
    assert lo == pytest.approx(loop_interval(np.mean, correct_a * 1.0, correct_b * 1.0, 2000, 4)[0], abs=1e-12)
    assert 0 < lo < correct_a.mean() - correct_b.mean() < hi


def test_non_finite_deltas_are_left_out_and_bad_arguments_refused():
    d = bootstrap.bootstrap_deltas(lambda idx: np.where(idx[:, 0] % 2 == 0, np.nan, 1.0), 10, resamples=200, batched=True)
    assert 0 < d.size < 200 and (d == 1.0).all()
    with pytest.raises(ValueError, match="no finite bootstrap delta"):
        bootstrap.paired_bootstrap(lambda idx: float("nan"), 5, resamples=10)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap.paired_mean_ci([1.0], [0.0], resamples=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap.paired_mean_ci([1.0], [0.0], level=1.0)
    with pytest.raises(ValueError, match="equally long"):
        bootstrap.paired_mean_ci([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="one delta per resample"):
        bootstrap.paired_bootstrap(lambda idx: np.zeros(3), 5, resamples=10, batched=True)


def test_asr_interval_is_the_shared_bootstrap_of_the_wer_ratio():
    rng = np.random.default_rng(9)
    words = rng.integers(1, 20, 73)
    ea, eb = rng.binomial(words, 0.1), rng.binomial(words, 0.08)
    shared = bootstrap.paired_bootstrap(lambda idx: (ea[idx].sum() - eb[idx].sum()) / words[idx].sum(), len(words), resamples=500, seed=3)
    assert asr.paired_bootstrap(ea, eb, words, resamples=500, seed=3) == pytest.approx(shared, abs=1e-15)


# ------------------------------------------------------------------------------- row-wise metrics


def _rows(kind: str, k: int = 40, n: int = 57, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "binary":
        ref = rng.integers(0, 2, (k, n))
        pred = np.where(rng.random((k, n)) < 0.7, ref, 1 - ref)
    elif kind == "multi":
        ref = rng.integers(0, 3, (k, n))
        pred = np.where(rng.random((k, n)) < 0.6, ref, rng.integers(0, 3, (k, n)))
    else:  # scores on a coarse grid, so ranks tie
        ref = np.round(rng.uniform(0, 5, (k, n)) * 2) / 2
        pred = np.round((ref + rng.normal(0, 1.2, (k, n))) * 2) / 2
    return pred, ref


@pytest.mark.parametrize("metric,kind,ref_fn", [
    ("accuracy", "binary", lambda p, r: accuracy_score(r, p)),
    ("accuracy", "multi", lambda p, r: accuracy_score(r, p)),
    ("f1", "binary", lambda p, r: f1_score(r, p, zero_division=0.0)),
    ("matthews_correlation", "binary", lambda p, r: matthews_corrcoef(r, p)),
    ("matthews_correlation", "multi", lambda p, r: matthews_corrcoef(r, p)),
    ("pearson", "scores", lambda p, r: stats.pearsonr(p, r)[0]),
    ("spearmanr", "scores", lambda p, r: stats.spearmanr(p, r)[0]),
])
def test_row_metrics_match_sklearn_and_scipy(metric, kind, ref_fn):
    pred, ref = _rows(kind)
    got = bootstrap.metric_rows(metric, pred, ref)
    assert got.shape == (pred.shape[0],)
    assert got == pytest.approx([ref_fn(p, r) for p, r in zip(pred, ref)], abs=1e-12)


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_row_metrics_on_degenerate_rows():
    ref = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert bootstrap.matthews_rows(pred, ref).tolist() == [matthews_corrcoef(r, p) for p, r in zip(pred, ref)] == [0.0, 0.0, -1.0]
    assert bootstrap.f1_rows(pred, ref).tolist() == [f1_score(r, p, zero_division=0.0) for p, r in zip(pred, ref)]
    assert np.isnan(bootstrap.pearson_rows(np.ones((1, 5)), np.arange(5.0)[None]))[0]
    assert bootstrap.metric_value("accuracy", [1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no row-wise form"):
        bootstrap.metric_rows("bleu", pred, ref)
