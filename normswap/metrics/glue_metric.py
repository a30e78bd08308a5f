"""GLUE metrics as an `evaluate` module, loaded by path: `evaluate.load(<this file>, config_name=task)`.

Why a local module: `evaluate.load("glue", ...)` fetches its script from the Hugging Face Hub, which
is unreachable on offline machines. This file is self-contained (numpy only: `evaluate` copies it
into its module cache, where the normswap package is not importable), and the metrics are written
out here so that the tests can check them against scikit-learn and scipy independently.

Metrics follow the GLUE definitions:
- cola: Matthews correlation;
- stsb: Pearson and Spearman correlation (regression scores);
- mrpc, qqp: accuracy and F1 of the positive class;
- sst2, rte, qnli, mnli, mnli_matched, mnli_mismatched, wnli: accuracy.
"""
from __future__ import annotations

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={ICLR}, year={2019}
}
"""

_DESCRIPTION = "GLUE task metrics (offline, numpy only): Matthews for CoLA, Pearson/Spearman for STS-B, accuracy/F1 for MRPC and QQP, accuracy elsewhere."

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (int), or predicted scores (float) for stsb.
    references: gold labels (int), or gold scores (float) for stsb.
Returns:
    cola: {"matthews_correlation"}; stsb: {"pearson", "spearmanr"};
    mrpc, qqp: {"accuracy", "f1"}; others: {"accuracy"}.
Examples:
    >>> m = evaluate.load("normswap/metrics/glue_metric.py", config_name="mrpc")
    >>> m.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "ax")


def accuracy(preds: np.ndarray, refs: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(preds == refs))


def f1_binary(preds: np.ndarray, refs: np.ndarray) -> float:
    """F1 of the positive class (label 1); 0 when there is no true positive."""
    tp = float(np.sum((preds == 1) & (refs == 1)))
    fp = float(np.sum((preds == 1) & (refs != 1)))
    fn = float(np.sum((preds != 1) & (refs == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(preds: np.ndarray, refs: np.ndarray) -> float:
    """Matthews correlation from the confusion matrix (multi-class form, as in sklearn); 0 if undefined."""
    labels = np.union1d(preds, refs)
    index = {v: i for i, v in enumerate(labels.tolist())}
    c = np.zeros((len(labels), len(labels)), dtype=np.float64)
    for p, r in zip(preds.tolist(), refs.tolist()):
        c[index[r], index[p]] += 1
    t_k, p_k = c.sum(axis=1), c.sum(axis=0)
    n, correct = c.sum(), np.trace(c)
    cov_ytyp = correct * n - np.dot(t_k, p_k)
    cov_ypyp = n * n - np.dot(p_k, p_k)
    cov_ytyt = n * n - np.dot(t_k, t_k)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation coefficient (NaN when either side is constant)."""
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denom = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return float(np.dot(x, y) / denom) if denom > 0 else float("nan")


def rank_average(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (what Spearman's rho needs)."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_a)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(a)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of ranks s+1 .. e
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of the average ranks."""
    return pearson(rank_average(np.asarray(x, dtype=np.float64)), rank_average(np.asarray(y, dtype=np.float64)))


def glue_compute(task: str, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The GLUE metrics of one task."""
    if task == "stsb":
        p, r = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        return {"pearson": pearson(p, r), "spearmanr": spearman(p, r)}
    p, r = np.asarray(predictions).astype(np.int64), np.asarray(references).astype(np.int64)
    if task == "cola":
        return {"matthews_correlation": matthews(p, r)}
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy(p, r), "f1": f1_binary(p, r)}
    return {"accuracy": accuracy(p, r)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    """The GLUE metric of the task named by `config_name`."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in TASKS:
            raise KeyError(f"unknown GLUE task {self.config_name!r}; expected one of {', '.join(TASKS)}")
        kind = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(kind), "references": datasets.Value(kind)}),
            format="numpy",
        )

    def _compute(self, predictions, references):  # noqa: ANN001 - signature fixed by evaluate
        return glue_compute(self.config_name, predictions, references)
