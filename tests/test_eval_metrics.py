"""The offline GLUE metric module, loaded through `evaluate` by path, against scikit-learn and scipy."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from normswap.errors import NormswapError
from normswap.evaluation.metrics import METRIC_PATH, compute_glue_metrics, glue_metric


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_metric_is_an_evaluate_module_loaded_from_the_package():
    import evaluate

    assert METRIC_PATH.is_file() and METRIC_PATH.parent.name == "metrics"
    m = glue_metric("mrpc")
    assert isinstance(m, evaluate.Metric)
    assert m.config_name == "mrpc"


@pytest.mark.parametrize("task", ["sst2", "rte", "qnli", "wnli", "mnli"])
def test_accuracy_tasks(task, rng):
    refs = rng.integers(0, 3 if task == "mnli" else 2, 300)
    preds = np.where(rng.random(300) < 0.7, refs, rng.integers(0, 3 if task == "mnli" else 2, 300))
    got = compute_glue_metrics(task, preds, refs)
    assert set(got) == {"accuracy"}
    assert got["accuracy"] == pytest.approx(accuracy_score(refs, preds), abs=1e-12)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task, rng):
    refs = rng.integers(0, 2, 500)
    preds = np.where(rng.random(500) < 0.6, refs, 1 - refs)
    got = compute_glue_metrics(task, preds, refs)
    assert got["accuracy"] == pytest.approx(accuracy_score(refs, preds), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(refs, preds), abs=1e-12)


def test_f1_without_true_positives_is_zero():
    assert compute_glue_metrics("mrpc", [0, 0, 0], [1, 0, 1])["f1"] == 0.0 == f1_score([1, 0, 1], [0, 0, 0], zero_division=0)


def test_matthews_binary_and_degenerate(rng):
    refs = rng.integers(0, 2, 400)
    preds = np.where(rng.random(400) < 0.8, refs, 1 - refs)
    assert compute_glue_metrics("cola", preds, refs)["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs, preds), abs=1e-12)
    # constant predictions: undefined correlation, reported as 0 like sklearn
    assert compute_glue_metrics("cola", [1] * 10, refs[:10])["matthews_correlation"] == matthews_corrcoef(refs[:10], [1] * 10) == 0.0


def test_stsb_pearson_and_spearman_with_ties(rng):
    refs = np.round(rng.uniform(0, 5, 300) * 4) / 4  # many ties, as in STS-B gold scores
    preds = refs + rng.normal(0, 1.2, 300)
    preds[:40] = np.round(preds[:40])  # ties among predictions too
    got = compute_glue_metrics("stsb", preds, refs)
    assert got["pearson"] == pytest.approx(pearsonr(preds, refs)[0], abs=1e-6)
    assert got["spearmanr"] == pytest.approx(spearmanr(preds, refs)[0], abs=1e-6)
    assert got["spearmanr"] != pytest.approx(got["pearson"], abs=1e-4)


def test_unknown_task_is_a_user_error():
    with pytest.raises(NormswapError, match="unknown GLUE task 'squad'"):
        glue_metric("squad")
