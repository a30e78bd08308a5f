"""GLUE probe mode: frozen pooled features and a scikit-learn head, checked against an independent
re-computation (features pooled here one sentence at a time, heads fitted here with scikit-learn)."""
from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, matthews_corrcoef
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from normswap.assets import asset
from normswap.errors import NormswapError
from normswap.evaluation import glue, glue_data, glue_probe
from normswap.loading import load_tokenizer
from test_eval_support import converted_folder, sentiment_rows, tiny_bert_folder, write_glue_dir

SETTINGS = glue_probe.ProbeSettings(train_samples=64, cv_folds=3, grid=(0.03, 0.3, 3.0), batch_size=16, max_seq_length=32)


def _write_rte(glue_dir):
    """A pair classification task: entailment when both sentences have the same polarity."""
    (glue_dir / "RTE").mkdir(exist_ok=True)
    for split, n, seed in (("train", 96, 3), ("dev", 40, 4)):
        rows = sentiment_rows(2 * n, seed)
        body = "".join(f"{i}\t{a}\t{b}\t{'entailment' if ya == yb else 'not_entailment'}\n"
                       for i, ((a, ya), (b, yb)) in enumerate(zip(rows[:n], rows[n:])))
        (glue_dir / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + body)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    plain = tiny_bert_folder(root)
    glue_dir = write_glue_dir(root)
    _write_rte(glue_dir)
    return {"plain": str(plain), "glue": glue_dir, "tok": load_tokenizer(str(plain)), "root": root}


def _splits(tiny, task):
    spec = glue_data.task_spec(task)
    return spec, glue_data.read_split(tiny["glue"], spec, "train"), glue_data.read_split(tiny["glue"], spec, "dev")


def pooled(folder, tok, texts, max_length=32):
    """Mean of the last hidden state over the tokens of each sentence, one unpadded sentence at a time."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(**enc).last_hidden_state[0].mean(0).double().numpy())
    return np.stack(out)


def independent_features(tiny, rows):
    if len(rows[0].texts) == 1:
        return pooled(tiny["plain"], tiny["tok"], [r.texts[0] for r in rows])
    u = pooled(tiny["plain"], tiny["tok"], [r.texts[0] for r in rows])
    v = pooled(tiny["plain"], tiny["tok"], [r.texts[1] for r in rows])
    return np.hstack([u, v, np.abs(u - v), u * v])


@pytest.mark.parametrize("task,weight", [("sst2", None), ("cola", "balanced"), ("rte", None)])
def test_classification_probe_matches_sklearn_on_the_same_features(tiny, task, weight, one_thread):
    spec, train, dev = _splits(tiny, task)
    settings = dataclasses.replace(SETTINGS, class_weight=weight)
    run = glue_probe.run_probe_task_seed(tiny["plain"], tiny["tok"], spec, train, dev, settings, seed=0)
    assert isinstance(run, glue.GlueRun) and run.task == task and run.seed == 0
    rows = glue_data.subsample(train, 64, seed=0)
    assert run.train_examples == 64 and len(run.predictions) == len(dev)
    labels = [r.label for r in dev]
    assert run.references == labels
    # the CV rule, redone here: stratified 3-fold (shuffled with the seed), pooled out-of-fold task metric, first best
    x, y = independent_features(tiny, rows), np.array([r.label for r in rows])
    score = matthews_corrcoef if task == "cola" else accuracy_score
    cv = []
    for c in SETTINGS.grid:
        oof = np.zeros(len(y), dtype=int)
        for tr, te in StratifiedKFold(3, shuffle=True, random_state=0).split(x, y):
            head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight=weight))
            oof[te] = head.fit(x[tr], y[tr]).predict(x[te])
        cv.append(score(y, oof))
    assert run.fit["param"] == "C" and run.fit["value"] == SETTINGS.grid[int(np.argmax(cv))]
    assert run.fit["cv_scores"] == pytest.approx(cv, abs=1e-12)
    head = make_pipeline(StandardScaler(), LogisticRegression(C=run.fit["value"], max_iter=2000, class_weight=weight)).fit(x, y)
    pred = head.predict(independent_features(tiny, dev))
    assert (pred == np.array(run.predictions)).mean() >= 0.95  # same features up to float32 batching noise
    if task == "cola":
        assert run.metrics == {"matthews_correlation": pytest.approx(matthews_corrcoef(labels, run.predictions), abs=1e-12)}
    else:
        assert run.metrics == {"accuracy": pytest.approx(accuracy_score(labels, run.predictions), abs=1e-12)}


def test_regression_probe_matches_ridge_and_scipy(tiny, one_thread):
    spec, train, dev = _splits(tiny, "stsb")
    run = glue_probe.run_probe_task_seed(tiny["plain"], tiny["tok"], spec, train, dev, SETTINGS, seed=2)
    assert run.fit["param"] == "alpha" and run.fit["value"] in SETTINGS.grid
    rows = glue_data.subsample(train, 64, seed=2)
    x, y = independent_features(tiny, rows), np.array([r.label for r in rows])
    head = make_pipeline(StandardScaler(), Ridge(alpha=run.fit["value"])).fit(x, y)
    pred = np.clip(head.predict(independent_features(tiny, dev)), 0, 5)
    assert np.array(run.predictions) == pytest.approx(pred, abs=1e-3)
    assert all(0.0 <= p <= 5.0 for p in run.predictions)
    labels = [r.label for r in dev]
    # `evaluate` hands the metric float32 scores, hence 1e-6
    assert run.metrics["pearson"] == pytest.approx(stats.pearsonr(run.predictions, labels)[0], abs=1e-6)
    assert run.metrics["spearmanr"] == pytest.approx(stats.spearmanr(run.predictions, labels)[0], abs=1e-6)


def test_pair_feature_layout(tiny):
    u, v = np.array([[1.0, -2.0]]), np.array([[3.0, 0.5]])
    assert glue_probe.pair_features(u, v).tolist() == [[1.0, -2.0, 3.0, 0.5, 2.0, 2.5, 3.0, -1.0]]
    _, train, _ = _splits(tiny, "rte")
    rows = train[:12]
    model = glue_probe.load_encoder(tiny["plain"])
    x = glue_probe.features(model, tiny["tok"], rows, SETTINGS, name="tiny")
    assert x.dtype == np.float64 and x.shape == (12, 4 * 32)
    assert x == pytest.approx(independent_features(tiny, rows), abs=1e-5)  # each sentence of a pair encoded on its own
    single = glue_probe.features(model, tiny["tok"], _splits(tiny, "sst2")[1][:5], SETTINGS, name="tiny")
    assert single.shape == (5, 32)


def test_seeds_draw_different_train_subsets_and_the_cache_skips_the_model(tiny, monkeypatch, one_thread):
    spec, train, dev = _splits(tiny, "sst2")
    subsets = [[r.row for r in glue_data.subsample(train, 64, seed=s)] for s in (0, 1)]
    assert subsets[0] != subsets[1]
    cache: dict = {}
    runs = [glue_probe.run_probe_task_seed(tiny["plain"], tiny["tok"], spec, train, dev, SETTINGS, seed=s, cache=cache) for s in (0, 1)]
    assert [r.train_examples for r in runs] == [64, 64]
    seen = set(subsets[0]) | set(subsets[1])
    assert set(cache[(tiny["plain"], 32)]) == {r.texts[0] for r in train if r.row in seen} | {r.texts[0] for r in dev}

    def no_model(path):
        raise AssertionError("every text is cached: no model should load")

    monkeypatch.setattr(glue_probe, "load_encoder", no_model)
    again = glue_probe.run_probe_task_seed(tiny["plain"], tiny["tok"], spec, train, dev, SETTINGS, seed=1, cache=cache)
    assert again.predictions == runs[1].predictions and again.metrics == runs[1].metrics


def test_a_converted_model_probes_like_a_plain_one(tiny, one_thread):
    rms = converted_folder(tiny["root"] / "tiny-bert", "rmsnorm", tiny["root"] / "tiny-rms")
    spec, train, dev = _splits(tiny, "sst2")
    conv = glue_probe.run_probe_task_seed(str(rms), tiny["tok"], spec, train, dev, SETTINGS, seed=0)
    base = glue_probe.run_probe_task_seed(tiny["plain"], tiny["tok"], spec, train, dev, SETTINGS, seed=0)
    assert len(conv.predictions) == len(dev)
    summary = glue.summarise([conv], [base])["accuracy"]
    assert summary["delta"] == pytest.approx(conv.metrics["accuracy"] - base.metrics["accuracy"])
    assert summary["delta_ci95"][0] <= summary["delta"] <= summary["delta_ci95"][1] and summary["noise_floor"] is None


def test_non_finite_features_name_the_model(tiny, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny["plain"])
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.fill_(3e38)  # finite weights, but the LayerNorm statistics overflow
    bad = tmp_path / "nan-bert"
    model.save_pretrained(bad)
    tiny["tok"].save_pretrained(bad)
    spec, train, dev = _splits(tiny, "sst2")
    with pytest.raises(NormswapError, match=r"nan-bert produces non-finite .* features"):
        glue_probe.run_probe_task_seed(str(bad), tiny["tok"], spec, train, dev, SETTINGS, seed=0)


def test_settings_protocol_and_validation():
    assert {t: glue_probe.PROBE_PROTOCOL[t].train_samples for t in ("sst2", "cola", "rte", "stsb")} == {
        "sst2": 12_000, "cola": 7_500, "rte": 2_000, "stsb": 5_000}
    assert glue_probe.probe_settings("SST-2") is glue_probe.PROBE_PROTOCOL["sst2"]
    assert glue_probe.probe_settings("mrpc") == glue_probe.ProbeSettings()
    assert glue_probe.PROBE_PROTOCOL["cola"].class_weight == "balanced"  # MCC punishes a head leaning to the majority label
    assert glue_probe.ProbeSettings().grid_for(glue_data.task_spec("stsb")) == glue_probe.ALPHA_GRID
    assert glue_probe.ProbeSettings().grid_for(glue_data.task_spec("rte")) == glue_probe.C_GRID
    for bad, needle in ((dict(cv_folds=1), "at least 2 folds"), (dict(batch_size=0), "batch size"), (dict(grid=()), "grid"),
                        (dict(grid=(1.0, -1.0)), "grid"), (dict(train_samples=0), "train samples"),
                        (dict(class_weight="auto"), "class weight")):
        with pytest.raises(NormswapError, match=needle):
            glue_probe.ProbeSettings(**bad).validate()


def test_one_label_train_rows_are_a_clear_error(tiny):
    spec, train, dev = _splits(tiny, "sst2")
    ones = [r for r in train if r.label == 1]
    with pytest.raises(NormswapError, match="one label only"):
        glue_probe.run_probe_task_seed(tiny["plain"], tiny["tok"], spec, ones, dev, SETTINGS, seed=0)


# ------------------------------------------------------------------------------ real MiniLM (slow)

TARGETS = {"sst2": ("accuracy", 0.78), "stsb": ("pearson", 0.80), "rte": ("accuracy", 0.55), "cola": ("matthews_correlation", 0.10)}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TARGETS))
def test_minilm_probe_reaches_its_targets(task, minilm_path, one_thread):
    if not asset("glue").is_dir():
        pytest.skip("GLUE assets missing")
    spec = glue_data.task_spec(task)
    train, dev = (glue_data.read_split(asset("glue"), spec, split) for split in ("train", "dev"))
    t0 = time.perf_counter()
    run = glue_probe.run_probe_task_seed(str(minilm_path), load_tokenizer(str(minilm_path)), spec, train, dev,
                                         glue_probe.probe_settings(spec), seed=0)
    metric, target = TARGETS[task]
    print(f"{task}: {metric} {run.metrics[metric]:.4f} ({run.fit['param']} {run.fit['value']:g}), {time.perf_counter() - t0:.0f} s")
    assert run.metrics[metric] >= target
