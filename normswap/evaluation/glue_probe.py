"""The fast GLUE protocol for small machines (`--glue-mode probe`): a frozen encoder, pooled
features, a linear head fitted by scikit-learn.

Per (model, task, seed):

1. The seed draws the training rows: `train_samples` rows of the train split
   (`glue_data.subsample(rows, train_samples, seed)`), so seeds differ by their training data and
   the seed-to-seed spread is a real one. Baseline and converted model with the same seed see the
   same rows, the same folds and the same grid.
2. Features: the encoder's last hidden state mean-pooled over real tokens (`sts.embed`, the
   pooling of the zero-shot STS evaluation), batched, without gradients, in eval mode, then float64.
   A single sentence gives its pooled vector u; a pair (RTE, STS-B, MRPC...) encodes each sentence
   on its own and uses [u, v, |u - v|, u * v] (the SentEval convention). Features are standardised
   with the training rows' mean and std.
3. The head: classification by `LogisticRegression` (lbfgs), regression (STS-B) by `Ridge`
   (closed form), predictions clipped to STS-B's [0, 5]. Its C (alpha) is the first best of a small
   fixed grid by k-fold cross-validation on the training rows only (folds shuffled with the seed;
   the task's first GLUE metric on the pooled out-of-fold predictions; standardisation refitted in
   each fold), then the head is refitted on all training rows with it.
4. Dev predictions are scored by `compute_glue_metrics`, exactly as fine-tuned runs are, and come
   back as a `glue.GlueRun`, so summaries, bootstrap intervals and prediction files are shared.

A probe measures what the frozen representation holds, not what fine-tuning can make of it: its
scores sit below fine-tuned ones, but they take minutes on a CPU and move with the conversion.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.evaluation import bootstrap, glue, glue_data, placement, sts
from normswap.evaluation.glue_data import GlueExample, GlueTask
from normswap.log import logger

# Half-decade grids, wide enough that cross-validation on MiniLM features picks an inner value on
# every task measured (RTE's 1,536 pair features on 2,000 rows want C 3e-5 to 1e-3, SST-2 1e-3 to
# 3e-3, balanced CoLA 1e-3 to 0.3 on a flat curve; STS-B's ridge alpha 1e4).
C_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)  # inverse L2 strength of the logistic head
ALPHA_GRID = (10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)  # L2 strength of the ridge head
STSB_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class ProbeSettings:
    """A probe's settings, shared by baseline and converted model."""

    train_samples: int | None = None  # rows per seed; None: the whole train split (then seeds differ only by their folds)
    cv_folds: int = 5
    grid: tuple[float, ...] | None = None  # C (classification) or alpha (regression); None: C_GRID / ALPHA_GRID
    batch_size: int = 64  # sentences per forward pass of the feature extraction
    max_seq_length: int = 128  # tokens per sentence (each sentence of a pair on its own)
    seeds: int = 3  # seeds 0 .. seeds-1
    max_iter: int = 2000  # lbfgs iterations of the logistic head
    class_weight: str | None = None  # "balanced": labels weighed by inverse frequency (the logistic head only)

    def validate(self) -> None:
        """Refuse settings that cannot fit: non-positive counts, fewer than 2 folds, an empty or non-positive grid."""
        for name in ("cv_folds", "batch_size", "max_seq_length", "seeds", "max_iter", "train_samples"):
            value = getattr(self, name)
            if value is None and name == "train_samples":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NormswapError(f"probe {name.replace('_', ' ')} must be a positive count, got {value!r}")
        if self.cv_folds < 2:
            raise NormswapError(f"probe cross-validation needs at least 2 folds, got {self.cv_folds}")
        if self.max_seq_length < 2:
            raise NormswapError(f"probe max sequence length must be at least 2, got {self.max_seq_length}")
        if self.class_weight not in (None, "balanced"):
            raise NormswapError(f"the probe class weight must be None or 'balanced', got {self.class_weight!r}")
        if self.grid is not None and (not self.grid or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in self.grid)):
            raise NormswapError(f"the probe grid must hold positive finite numbers, got {self.grid!r}")

    def grid_for(self, task: GlueTask) -> tuple[float, ...]:
        """The grid searched for `task`: the given one, else C_GRID or ALPHA_GRID by the task's kind."""
        if self.grid is not None:
            return tuple(float(v) for v in self.grid)
        return ALPHA_GRID if task.is_regression else C_GRID

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Per-task defaults. The subset sizes leave some train rows out of every seed, so seeds really
# draw different training sets (the baseline's seed-to-seed std is the noise floor of the delta),
# while keeping the fit as close to full data as the task allows and the whole table a few CPU
# minutes per model:
# - SST-2: 12,000 of 67,349 phrases; the accuracy has flattened by then (a logistic probe on
#   MiniLM's mean-pooled features reaches ~0.80 at 12k) and feature extraction stays ~1.5 minutes.
# - CoLA: 7,500 of 8,551 sentences: nearly all of a small set; MCC is noisy and wants every row.
#   Its labels are 70 % "acceptable", and an unweighted head leans to that label, which MCC
#   punishes: balanced class weights lift MiniLM's probe MCC from ~0.11 to ~0.15 (5 seeds, in CV too).
# - RTE: 2,000 of 2,490 pairs: the set is tiny, so most of it, still leaving 490 rows to vary.
# - STS-B: 5,000 of 5,749 pairs: the ridge's Pearson keeps rising with data.
# Pairs use max_seq_length 128 per sentence (RTE premises are long); single sentences 64 (SST-2
# and CoLA sentences are short, and padding costs time).
# Measured on all-MiniLM-L6-v2, dev, seeds 0-2, one CPU thread of a shared 2-core machine: SST-2
# accuracy 0.802 +- 0.002, STS-B Pearson 0.857 +- 0.001, RTE accuracy 0.575 +- 0.016, CoLA MCC
# 0.147 +- 0.019; the first seed of all four tasks took 5 minutes, 3 seeds 9 (features cached).
PROBE_PROTOCOL: dict[str, ProbeSettings] = {
    "sst2": ProbeSettings(train_samples=12_000, max_seq_length=64),
    "cola": ProbeSettings(train_samples=7_500, max_seq_length=64, class_weight="balanced"),
    "rte": ProbeSettings(train_samples=2_000, max_seq_length=128),
    "stsb": ProbeSettings(train_samples=5_000, max_seq_length=128),
}


def probe_settings(task: GlueTask | str) -> ProbeSettings:
    """The protocol's settings for `task`, or the defaults for a task the table does not list."""
    name = task.name if isinstance(task, GlueTask) else glue_data.task_spec(task).name
    return PROBE_PROTOCOL.get(name, ProbeSettings())


# ------------------------------------------------------------------------------------------ features


def load_encoder(name_or_path: str, dtype: Any = torch.float32) -> nn.Module:
    """The bare encoder (AutoModel: no head), plain or converted, in eval mode, its weights in
    `dtype` (float32 by default; "auto": the checkpoint's own)."""
    import transformers

    from normswap.loading import load_pretrained

    return load_pretrained(name_or_path, auto_class=transformers.AutoModel, dtype=dtype).eval()


def pair_features(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[u, v, |u - v|, u * v] per row (SentEval's pair features)."""
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def sentence_features(model: nn.Module | None, tokenizer: Any, texts: Sequence[str], settings: ProbeSettings, *, name: str,
                      progress: bool | None = None, cache: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Mean-pooled last hidden states [len(texts), hidden] as float64, each distinct text embedded once.

    `cache` (text -> vector) is filled and reused; `model` may be None when the cache has every text.
    A non-finite feature is an error naming `name`.
    """
    cache = {} if cache is None else cache
    todo = list(dict.fromkeys(t for t in texts if t not in cache))
    if todo:
        if model is None:
            raise ValueError("sentence_features needs the model for texts that are not cached")
        model.eval()
        with torch.no_grad():
            emb = sts.embed(model, tokenizer, todo, pooling="mean", batch_size=settings.batch_size,
                            max_seq_length=settings.max_seq_length, progress=progress)
        emb = emb.numpy()
        bad = int((~np.isfinite(emb)).any(axis=1).sum())
        if bad:
            raise NormswapError(f"{name} produces non-finite (NaN or infinite) features for {bad} of {len(todo)} sentences")
        cache.update(zip(todo, emb))
    return np.stack([cache[t] for t in texts]).astype(np.float64)


def features(model: nn.Module | None, tokenizer: Any, rows: Sequence[GlueExample], settings: ProbeSettings, *, name: str,
             progress: bool | None = None, cache: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The probe's features of `rows`: u for single sentences, [u, v, |u-v|, u*v] for pairs."""
    cache = {} if cache is None else cache
    width = len(rows[0].texts)
    if width == 1:
        return sentence_features(model, tokenizer, [r.texts[0] for r in rows], settings, name=name, progress=progress, cache=cache)
    if width != 2:
        raise ValueError(f"GLUE rows hold one sentence or a pair, not {width}")
    n = len(rows)
    both = sentence_features(model, tokenizer, [r.texts[0] for r in rows] + [r.texts[1] for r in rows], settings, name=name,
                             progress=progress, cache=cache)
    return pair_features(both[:n], both[n:])


# ---------------------------------------------------------------------------------------------- head


def _head(task: GlueTask, value: float, settings: ProbeSettings) -> Any:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task.is_regression:
        return make_pipeline(StandardScaler(), Ridge(alpha=value, solver="cholesky"))
    return make_pipeline(StandardScaler(), LogisticRegression(C=value, solver="lbfgs", max_iter=settings.max_iter,
                                                              class_weight=settings.class_weight))


def _predict(task: GlueTask, head: Any, x: np.ndarray) -> np.ndarray:
    out = head.predict(x)
    return np.clip(out, *STSB_RANGE) if task.is_regression else out


def _fit(task: GlueTask, head: Any, x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        head.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("GLUE %s probe: lbfgs did not converge in %d iterations (C %g)", task.name, head[-1].max_iter, head[-1].C)
    return head


def _folds(task: GlueTask, y: np.ndarray, settings: ProbeSettings, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold, StratifiedKFold

    if task.is_regression:
        k = min(settings.cv_folds, len(y))
        if k < 2:
            raise NormswapError(f"GLUE {task.name} probe: {len(y)} training row(s) cannot be cross-validated")
        return list(KFold(k, shuffle=True, random_state=seed).split(y))
    counts = np.unique(y, return_counts=True)[1]
    if len(counts) < 2:
        raise NormswapError(f"GLUE {task.name} probe: the training rows hold one label only, so no classifier can be fitted")
    k = min(settings.cv_folds, int(counts.min()))
    if k < 2:
        raise NormswapError(f"GLUE {task.name} probe: a label occurs once in the training rows, too rarely for cross-validation")
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def fit_head(task: GlueTask, x: np.ndarray, y: np.ndarray, settings: ProbeSettings, seed: int) -> tuple[Any, dict[str, Any]]:
    """The head (scaler + linear model) refitted on all of (x, y) with the grid value that
    cross-validates best, and what was chosen: {"param", "value", "cv_metric", "cv_folds", "cv_score",
    "cv_scores"} (one score per grid value, in grid order; None where the metric was undefined)."""
    metric = task.metrics[0]
    folds = _folds(task, y, settings, seed)
    scores = []
    for value in settings.grid_for(task):
        oof = np.zeros(len(y), dtype=np.float64)
        for train_idx, test_idx in folds:
            head = _fit(task, _head(task, value, settings), x[train_idx], y[train_idx])
            oof[test_idx] = _predict(task, head, x[test_idx])
        score = bootstrap.metric_value(metric, oof, y)
        scores.append(score if math.isfinite(score) else -math.inf)
    best = int(np.argmax(scores))  # the first best in grid order
    value = settings.grid_for(task)[best]
    head = _fit(task, _head(task, value, settings), x, y)
    info = {"param": "alpha" if task.is_regression else "C", "value": value, "cv_metric": metric, "cv_folds": len(folds),
            "cv_score": scores[best], "cv_scores": [s if math.isfinite(s) else None for s in scores]}
    return head, info


# ----------------------------------------------------------------------------------------------- run


def run_probe_task_seed(
    name_or_path: str,
    tokenizer: Any,
    task: GlueTask,
    train_rows: Sequence[GlueExample],
    dev_rows: Sequence[GlueExample],
    settings: ProbeSettings,
    seed: int,
    progress: bool | None = None,
    cache: dict[Any, dict[str, np.ndarray]] | None = None,
    place: Any = None,
    precision: dict[str, Any] | None = None,
) -> glue.GlueRun:
    """Probe one model on one task with one seed: `train_samples` rows drawn with `seed` from
    `train_rows`, features, a cross-validated linear head, dev predictions and GLUE metrics.

    `cache` (optional, kept by the caller across seeds and roles) maps (name_or_path,
    max_seq_length) to the model's features by text, so later seeds embed only the rows they add
    (and load no model when nothing is new). Only share one while the model folders stay unchanged.

    `place` (a `normswap.evaluation.placement.Placement`; None: float32 on the CPU, as before)
    sets the encoder's device and dtype; `precision`, if given, receives the dtypes it ran in.
    """
    settings.validate()
    t0 = time.perf_counter()
    rows = glue_data.subsample(list(train_rows), settings.train_samples, seed)
    store = {} if cache is None else cache.setdefault((str(name_or_path), settings.max_seq_length), {})
    texts = {t for r in list(rows) + list(dev_rows) for t in r.texts}
    model = None
    if not texts <= store.keys():
        model = load_encoder(name_or_path) if place is None else load_encoder(name_or_path, dtype=place.load_dtype)
        glue.prepare_padding(model, tokenizer)
    try:
        with contextlib.ExitStack() as stack:
            if model is not None and place is not None:
                model = stack.enter_context(placement.placed(model, place, precision))
            x_train = features(model, tokenizer, rows, settings, name=name_or_path, progress=progress, cache=store)
            x_dev = features(model, tokenizer, dev_rows, settings, name=name_or_path, progress=progress, cache=store)
    finally:
        del model
    y_train = np.asarray([r.label for r in rows], dtype=np.float64 if task.is_regression else np.int64)
    head, info = fit_head(task, x_train, y_train, settings, seed)
    out = _predict(task, head, x_dev)
    preds = [float(p) for p in out] if task.is_regression else [int(p) for p in out]
    labels = [r.label for r in dev_rows]
    metrics = glue.scored(task, preds, labels, name_or_path, seed)
    steps = 0 if task.is_regression else int(np.max(head[-1].n_iter_))
    seconds = time.perf_counter() - t0
    logger.info("%s %s probe seed %d: %s (%s %g, %.0f s)", task.name, name_or_path, seed,
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), info["param"], info["value"], seconds)
    return glue.GlueRun(task.name, seed, metrics, preds, len(rows), steps, 0, seconds, references=list(labels), fit=info)
