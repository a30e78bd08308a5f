"""The paired bootstrap behind every converted - baseline delta normswap reports, and GLUE metrics
computed over many resamples at once.

Both models are scored on the same items (dev examples, utterances, ...). A resample draws n item
indices with replacement and both models are scored on *those same* indices: that is what makes
the bootstrap paired, so item difficulty cancels and only the difference between the models
varies. The interval is the percentile one: the (1 - level)/2 and (1 + level)/2 quantiles of the
resampled deltas (numpy's default linear interpolation).

The index stream is fixed by the seed: `numpy.random.default_rng(seed)`, one `integers(0, n, n)`
per resample, in order (drawn in blocks of several resamples, which gives the same rows), so reruns
and independent re-implementations agree to the last bit.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
_BLOCK_ITEMS = 2**22  # indices held at once (32 MiB of int64)


def _check(n_items: int, resamples: int, level: float) -> None:
    if not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise ValueError(f"a bootstrap needs at least one item, got {n_items}")
    if not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"the number of bootstrap resamples must be a positive count, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"the interval level must be in (0, 1), got {level}")


def resample_indices(n_items: int, resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[np.ndarray]:
    """The resamples' item indices as (k, n_items) int64 blocks, `resamples` rows in all, in order."""
    _check(n_items, resamples, 0.5)
    rng = np.random.default_rng(seed)
    block = max(1, min(resamples, _BLOCK_ITEMS // n_items))
    done = 0
    while done < resamples:
        k = min(block, resamples - done)
        yield rng.integers(0, n_items, size=(k, n_items))
        done += k


def bootstrap_deltas(delta_fn: Callable[[np.ndarray], float | np.ndarray], n_items: int, *, resamples: int = RESAMPLES,
                     seed: int = SEED, batched: bool = False) -> np.ndarray:
    """The finite resampled deltas, in resample order.

    `delta_fn` gets one resample's index array (shape (n,)) and returns statistic(converted) -
    statistic(baseline) on it; with `batched=True` it gets a (k, n) matrix of k resamples and returns
    their k deltas (the fast path). Resamples whose delta is NaN or infinite (a correlation of a
    constant resample, a WER without reference words) are left out.
    """
    _check(n_items, resamples, 0.5)
    out = []
    for idx in resample_indices(n_items, resamples, seed):
        if batched:
            d = np.asarray(delta_fn(idx), dtype=np.float64).reshape(-1)
            if d.shape[0] != idx.shape[0]:
                raise ValueError(f"a batched delta_fn must return one delta per resample: got {d.shape[0]} for {idx.shape[0]}")
        else:
            d = np.array([float(delta_fn(row)) for row in idx], dtype=np.float64)
        out.append(d[np.isfinite(d)])
    return np.concatenate(out)


def percentile_interval(deltas: np.ndarray | Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of resampled deltas at `level` (0.95: the 2.5th and 97.5th percentiles)."""
    if not 0 < level < 1:
        raise ValueError(f"the interval level must be in (0, 1), got {level}")
    d = np.asarray(deltas, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no finite bootstrap delta: the interval is undefined")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(d, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap(delta_fn: Callable[[np.ndarray], float | np.ndarray], n_items: int, *, resamples: int = RESAMPLES,
                     seed: int = SEED, level: float = LEVEL, batched: bool = False) -> tuple[float, float]:
    """Percentile interval of statistic(converted) - statistic(baseline) over paired resamples of n items.

    `delta_fn(idx)` computes the delta on the items `idx` (both models on the same indices); see
    `bootstrap_deltas` for `batched`. ValueError when no resample gives a finite delta.
    """
    _check(n_items, resamples, level)
    return percentile_interval(bootstrap_deltas(delta_fn, n_items, resamples=resamples, seed=seed, batched=batched), level)


def paired_mean_ci(converted: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray, *, resamples: int = RESAMPLES,
                   seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Interval for mean(converted) - mean(baseline) of per-item scores (0/1 correctness, losses...)."""
    a, b = np.asarray(converted, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_mean_ci needs two equally long, non-empty 1-D score lists, got {a.shape} and {b.shape}")
    diff = a - b
    return paired_bootstrap(lambda idx: diff[idx].mean(axis=1), len(diff), resamples=resamples, seed=seed, level=level, batched=True)


# ------------------------------------------------------------------------- GLUE metrics, row-wise
# Each takes (k, n) arrays (predictions and references of k resamples) and returns the k metric
# values, with the conventions of normswap/metrics/glue_metric.py: F1 of label 1 and MCC are 0 when
# undefined, correlations are NaN when a side is constant.


def accuracy_rows(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Fraction of exact matches per row."""
    return (np.asarray(pred) == np.asarray(ref)).mean(axis=-1)


def f1_rows(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """F1 of the positive class (label 1) per row; 0 without a true positive."""
    p, r = np.asarray(pred) == 1, np.asarray(ref) == 1
    tp = (p & r).sum(axis=-1).astype(np.float64)
    fp_fn = (p != r).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp > 0, 2 * tp / (2 * tp + fp_fn), 0.0)


def matthews_rows(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Matthews correlation per row (multi-class form, as sklearn's); 0 where undefined."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    n = np.full(pred.shape[:-1], pred.shape[-1], dtype=np.float64)
    correct = (pred == ref).sum(axis=-1).astype(np.float64)
    tp_dot = np.zeros_like(n)
    pp = np.zeros_like(n)
    tt = np.zeros_like(n)
    for c in np.union1d(np.unique(pred), np.unique(ref)):
        t_k = (ref == c).sum(axis=-1).astype(np.float64)
        p_k = (pred == c).sum(axis=-1).astype(np.float64)
        tp_dot += t_k * p_k
        pp += p_k * p_k
        tt += t_k * t_k
    cov_ytyp = correct * n - tp_dot
    denom = (n * n - pp) * (n * n - tt)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, cov_ytyp / np.sqrt(np.where(denom > 0, denom, 1.0)), 0.0)


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation per row; NaN where a side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (x * y).sum(axis=-1) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho per row: Pearson of the average ranks (ties share their mean rank)."""
    from scipy.stats import rankdata

    return pearson_rows(rankdata(np.asarray(x, dtype=np.float64), axis=-1), rankdata(np.asarray(y, dtype=np.float64), axis=-1))


METRIC_ROWS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "accuracy": accuracy_rows,
    "f1": f1_rows,
    "matthews_correlation": matthews_rows,
    "pearson": pearson_rows,
    "spearmanr": spearman_rows,
}


def metric_rows(metric: str, pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The GLUE metric named `metric` (a key of `compute_glue_metrics`' result) of each row."""
    try:
        fn = METRIC_ROWS[metric]
    except KeyError:
        raise ValueError(f"no row-wise form of the GLUE metric {metric!r} (known: {', '.join(METRIC_ROWS)})") from None
    return fn(pred, ref)


def metric_value(metric: str, predictions: Sequence[float] | np.ndarray, references: Sequence[float] | np.ndarray) -> float:
    """The metric of one set of predictions (the rows functions on a single row)."""
    return float(metric_rows(metric, np.asarray(predictions)[None], np.asarray(references)[None])[0])
