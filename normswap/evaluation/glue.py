"""GLUE fine-tuning: one sequence-classification head per (model, task, seed), trained on train, scored on dev.

Baseline and converted models go through exactly the same code with the same settings, seed and
training rows, so the delta measures the conversion and nothing else. The seed fixes the head's
initialisation (it is drawn while the model loads), dropout and the order of the training batches.
Converted checkpoints keep their RMSNorm / DyT modules: `normswap.loading.load_pretrained` rebuilds
them before the new head is attached.

The loop is deliberately plain: AdamW (no decay on biases and norm weights), linear warm-up then
linear decay, gradient clipping at 1.0, dynamic padding; cross-entropy for classification and MSE
for STS-B regression. (`glue_probe` is the fast alternative: a frozen encoder and a linear head.)

`summarise` says how far each delta can be trusted: a paired bootstrap interval over dev items
(`normswap.evaluation.bootstrap`), the baseline's seed-to-seed std as the noise floor, and whether
the delta is within either.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.evaluation import bootstrap
from normswap.evaluation.glue_data import GlueExample, GlueTask
from normswap.evaluation.metrics import compute_glue_metrics
from normswap.evaluation.progress import progress_bar, short_name
from normswap.log import logger


@dataclass
class GlueSettings:
    """Fine-tuning hyperparameters, shared by baseline and converted model."""

    train_samples: int | None = None  # None: the whole train split
    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    max_seq_length: int = 128
    seeds: int = 1  # seeds 0 .. seeds-1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_batch_size: int = 128
    data_seed: int = 0  # picks the --train-samples subset

    def validate(self) -> None:
        """Refuse settings that cannot train: counts below 1, rates that are not positive finite numbers."""
        for name in ("epochs", "lr", "batch_size", "max_seq_length", "seeds", "eval_batch_size", "train_samples"):
            value = getattr(self, name)
            if value is None and name == "train_samples":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise NormswapError(f"--{name.replace('_', '-')} must be a positive {'number' if name in ('epochs', 'lr') else 'count'}, "
                                    f"got {value}")
        if self.max_seq_length < 2:
            raise NormswapError(f"--max-seq-length must be at least 2, got {self.max_seq_length}")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio <= 1):
            raise NormswapError(f"the warm-up ratio must be in [0, 1], got {self.warmup_ratio}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise NormswapError(f"the weight decay must be a non-negative number, got {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The reference fine-tuning protocol, per task: the settings normswap's published GLUE deltas are
# measured with (train_samples None: the whole train split). Copy before changing one, e.g.
# `dataclasses.replace(REFERENCE_PROTOCOL["rte"], seeds=3)`.
REFERENCE_PROTOCOL: dict[str, GlueSettings] = {
    "stsb": GlueSettings(train_samples=None, epochs=4, lr=1e-4, batch_size=32, max_seq_length=128, seeds=1),
    "cola": GlueSettings(train_samples=None, epochs=3, lr=5e-5, batch_size=32, max_seq_length=64, seeds=1),
    "rte": GlueSettings(train_samples=None, epochs=4, lr=5e-5, batch_size=16, max_seq_length=128, seeds=1),
    "sst2": GlueSettings(train_samples=20_000, epochs=2, lr=5e-5, batch_size=32, max_seq_length=64, seeds=1),
}


@dataclass
class GlueRun:
    """The outcome of fine-tuning one model on one task with one seed."""

    task: str
    seed: int
    metrics: dict[str, float]
    predictions: list[float] = field(repr=False)
    train_examples: int = 0
    steps: int = 0
    train_tokens: int = 0  # padded tokens seen in training
    seconds: float = 0.0
    # the dev labels the predictions are scored against (what the paired bootstrap of `summarise` needs)
    references: list[float] | None = field(default=None, repr=False)
    fit: dict[str, Any] | None = None  # probe mode: the head's chosen hyperparameter and its cross-validated score


@dataclass
class Encoded:
    """Tokenised examples of one split (no padding), with their labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[float | int]


def encode(tokenizer: Any, examples: Sequence[GlueExample], max_seq_length: int) -> Encoded:
    """Tokenise single sentences or pairs, truncated to `max_seq_length` tokens."""
    first = [e.texts[0] for e in examples]
    second = [e.texts[1] for e in examples] if len(examples[0].texts) > 1 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_seq_length, padding=False)
    return Encoded(enc["input_ids"], enc.get("token_type_ids"), [e.label for e in examples])


def _batch(data: Encoded, idx: Sequence[int], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    width = max(len(data.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(idx), width), dtype=torch.long)
    tt = torch.zeros((len(idx), width), dtype=torch.long) if data.token_type_ids is not None else None
    for r, i in enumerate(idx):
        n = len(data.input_ids[i])
        ids[r, :n] = torch.tensor(data.input_ids[i])
        att[r, :n] = 1
        if tt is not None:
            tt[r, :n] = torch.tensor(data.token_type_ids[i])  # type: ignore[index]
    out = {"input_ids": ids, "attention_mask": att}
    if tt is not None:
        out["token_type_ids"] = tt
    out["labels"] = torch.tensor([data.labels[i] for i in idx], dtype=torch.float32 if regression else torch.long)
    return out


def prepare_padding(model: nn.Module, tokenizer: Any) -> int:
    """The pad id; causal-LM tokenizers without one (GPT-2) pad with EOS, and the head is told so."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise NormswapError("the tokenizer has neither a pad nor an EOS token; cannot batch GLUE inputs")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return int(tokenizer.pad_token_id)


def _optimizer(model: nn.Module, s: GlueSettings, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)  # biases, norm weights, DyT alpha
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=s.lr,
                            foreach=True)
    warmup = int(s.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels)
    return nn.functional.cross_entropy(logits.float(), labels)


def _length_grouped_batches(data: Encoded, batch_size: int, gen: torch.Generator, group: int = 16) -> list[list[int]]:
    """One epoch of shuffled batches with little padding.

    Shuffle, cut into pools of `group` batches, sort each pool by length, cut it into batches and
    shuffle the batch order: still random, but batches hold similar lengths, which roughly halves
    the padded tokens (and the time) on short-sentence tasks.
    """
    perm = torch.randperm(len(data.labels), generator=gen).tolist()
    batches = []
    pool = batch_size * group
    for k in range(0, len(perm), pool):
        chunk = sorted(perm[k:k + pool], key=lambda i: len(data.input_ids[i]))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def train(model: nn.Module, data: Encoded, task: GlueTask, s: GlueSettings, seed: int, pad_id: int, progress: bool | None = None,
          name: str = "the model", compute: torch.dtype | None = None) -> tuple[int, int]:
    """Fine-tune `model` in place; returns (optimizer steps, padded training tokens). A NaN or
    infinite loss is an error naming `name`, the task, the seed and the step. `compute`, a half
    dtype, runs the passes under autocast in it (the weights stay as they are: float32 masters),
    float16 with loss scaling."""
    device = next(model.parameters()).device
    amp = _autocast(device, compute)
    scaler = torch.amp.GradScaler(device.type) if compute == torch.float16 else None
    n = len(data.labels)
    steps_per_epoch = math.ceil(n / s.batch_size)
    total = max(1, math.ceil(s.epochs * steps_per_epoch))
    opt, sched = _optimizer(model, s, total)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step, tokens = 0, 0
    bar = progress_bar(total, f"GLUE {task.name} train ({short_name(name)}, seed {seed})", progress, unit="steps")
    while step < total:
        for idx in _length_grouped_batches(data, s.batch_size, gen):
            if step >= total:
                break
            batch = _batch(data, idx, pad_id, task.is_regression)
            labels = batch.pop("labels").to(device)
            with amp():
                logits = model(**{key: v.to(device) for key, v in batch.items()}).logits
            loss = _loss(logits.float(), labels, task.is_regression)
            if not torch.isfinite(loss):
                why = ("before any update, so the model's outputs are not finite" if step == 0 else "; try a lower --lr")
                raise NormswapError(f"GLUE {task.name} fine-tuning of {name} (seed {seed}): the training loss became {loss.item()} "
                                    f"at step {step}{'' if step else ' '}{why}")
            if scaler is None:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += batch["input_ids"].numel()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1, tokens=batch["input_ids"].numel())
    bar.close()
    model.eval()
    return step, tokens


def _autocast(device: torch.device, compute: torch.dtype | None) -> Any:
    """A factory of autocast contexts in `compute` when it is a half dtype, else of no-ops."""
    if compute in (torch.float16, torch.bfloat16):
        return lambda: torch.autocast(device_type=device.type, dtype=compute)
    return contextlib.nullcontext


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, task: GlueTask, s: GlueSettings, pad_id: int, progress: bool | None = None,
            name: str = "the model", compute: torch.dtype | None = None) -> list[float]:
    """Dev predictions in example order: label ids, or scores for regression (batched by length).
    Non-finite logits are an error naming `name` (their argmax would be a meaningless label)."""
    device = next(model.parameters()).device
    amp = _autocast(device, compute)
    model.eval()
    order = sorted(range(len(data.labels)), key=lambda i: len(data.input_ids[i]))
    preds: list[float] = [0.0] * len(order)
    bar = progress_bar(len(order), f"GLUE {task.name} dev ({short_name(name)})", progress, unit="examples")
    for k in range(0, len(order), s.eval_batch_size):
        idx = order[k:k + s.eval_batch_size]
        batch = _batch(data, idx, pad_id, task.is_regression)
        batch.pop("labels")
        with amp():
            logits = model(**{key: v.to(device) for key, v in batch.items()}).logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise NormswapError(f"GLUE {task.name}: {name} produces non-finite (NaN or infinite) outputs on the dev split")
        out = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
        for i, v in zip(idx, out.tolist()):
            preds[i] = v
        bar.update(len(idx))
    bar.close()
    return preds


def load_classifier(name_or_path: str, task: GlueTask, seed: int, dtype: Any = torch.float32) -> nn.Module:
    """The model with a fresh classification head for `task`, initialised from `seed`, its weights
    in `dtype` (float32 by default; "auto": the checkpoint's own)."""
    import transformers

    from normswap.loading import load_pretrained

    auto = transformers.AutoModelForSequenceClassification
    torch.manual_seed(seed)
    try:
        try:
            labels = task.labels or ("score",)
            return load_pretrained(name_or_path, auto_class=auto, allow_new_head=True, num_labels=task.num_labels, dtype=dtype,
                                   id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)})
        except TypeError as err:
            if "unexpected keyword argument" not in str(err):
                raise
            # load_pretrained passes `config=` to from_pretrained for plain models, so num_labels
            # reaches the model's __init__ instead of the config: set it on the config ourselves.
            return _load_plain_classifier(name_or_path, task, seed, dtype)
    except (NormswapError, ValueError) as err:
        if "Unrecognized configuration class" in str(err) or "ForSequenceClassification" in str(err):
            raise NormswapError(f"{name_or_path} has no sequence-classification head in transformers, so it cannot run GLUE") from None
        raise


def _load_plain_classifier(name_or_path: str, task: GlueTask, seed: int, dtype: Any = torch.float32) -> nn.Module:
    """Plain (unconverted) checkpoint with a fresh head of `task.num_labels` outputs; safetensors only."""
    import transformers

    from normswap.loading import load_config

    config = load_config(name_or_path)
    labels = task.labels or ("score",)
    config.id2label, config.label2id = dict(enumerate(labels)), {v: k for k, v in enumerate(labels)}
    config.num_labels = task.num_labels
    torch.manual_seed(seed)
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            name_or_path, config=config, use_safetensors=True, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise NormswapError(f"cannot load {name_or_path} for sequence classification: {str(err).strip().splitlines()[0][:300]}") from None
    prefix = model.base_model_prefix
    missing = [k for k in info.get("missing_keys", []) if k.startswith(prefix + ".")]
    if missing:
        raise NormswapError(f"weights of {name_or_path} are incomplete: {len(missing)} missing, e.g. {missing[0]}")
    return model.eval()


def run_task_seed(
    name_or_path: str,
    tokenizer: Any,
    task: GlueTask,
    train_data: Encoded,
    dev_data: Encoded,
    settings: GlueSettings,
    seed: int,
    progress: bool | None = None,
    place: Any = None,
    precision: dict[str, Any] | None = None,
) -> GlueRun:
    """Load, fine-tune and score one model on one task with one seed.

    `place` (a `normswap.evaluation.placement.Placement`; None: float32 on the CPU, as before)
    sets the device and the dtype: the weights are loaded in its dtype, then trained as float32
    masters with the passes under autocast in the compute dtype when that is a half dtype.
    `precision`, if given, receives the dtypes it ran in."""
    t0 = time.perf_counter()
    compute = None
    if place is None:
        model = load_classifier(name_or_path, task, seed)
    else:
        from normswap.conversion import dominant_dtype

        model = load_classifier(name_or_path, task, seed, dtype=place.load_dtype)
        weights = dominant_dtype(model)
        compute = place.compute_dtype(weights)
        model = model.float().to(place.device)
        if precision is not None:
            precision.update(dtype=str(weights).replace("torch.", ""), compute_dtype=str(compute).replace("torch.", ""),
                             master_weights="float32", autocast=compute in (torch.float16, torch.bfloat16))
    pad_id = prepare_padding(model, tokenizer)
    torch.manual_seed(seed)  # dropout stream, independent of how much randomness loading used
    steps, tokens = train(model, train_data, task, settings, seed, pad_id, progress, name=name_or_path, compute=compute)
    preds = predict(model, dev_data, task, settings, pad_id, progress, name=name_or_path, compute=compute)
    metrics = scored(task, preds, dev_data.labels, name_or_path, seed)
    seconds = time.perf_counter() - t0
    logger.info("%s %s seed %d: %s (%d steps, %.0f s)", task.name, name_or_path, seed,
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), steps, seconds)
    return GlueRun(task.name, seed, metrics, preds, len(train_data.labels), steps, tokens, seconds, references=list(dev_data.labels))


def scored(task: GlueTask, preds: Sequence[float], labels: Sequence[float], name: str, seed: int) -> dict[str, float]:
    """The GLUE metrics of dev predictions; an undefined (non-finite) one is an error naming `name` and the seed."""
    metrics = compute_glue_metrics(task.name, preds, labels)
    for key, value in metrics.items():
        if not math.isfinite(value):
            why = "its dev predictions are all equal" if len(set(preds)) == 1 else "the metric is undefined on these predictions"
            raise NormswapError(f"GLUE {task.name} {key} of {name} (seed {seed}) is {value}: {why}")
    return metrics


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v == v]  # drop NaN (undefined correlations)
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(converted: Sequence[GlueRun], baseline: Sequence[GlueRun] | None, references: Sequence[float] | None = None, *,
              resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED, level: float = bootstrap.LEVEL) -> dict[str, dict[str, Any]]:
    """Per metric: mean and sample std (ddof 1) over seeds, the baseline's, delta = converted - baseline,
    and, with a baseline, how far that delta can be trusted:

    - `delta_ci95`: [lo, hi], the paired bootstrap percentile interval (`normswap.evaluation.bootstrap`,
      `resamples` resamples from `seed`) over dev items: each resample draws dev indices with
      replacement and takes the metric averaged over the converted model's seeds minus the same
      for the baseline, both on those indices (the per-seed dev predictions are `GlueRun.predictions`,
      the labels `references` or else the runs' own `GlueRun.references`). None when the runs carry
      no dev predictions or labels, or no resample gives a finite delta.
    - `noise_floor`: the baseline's seed-to-seed std (ddof 1); None with a single baseline seed.
    - `within_noise`: True when the interval contains 0 *or* |delta| <= 2 x noise_floor, i.e. the
      delta is explained by either dev-set sampling or seed-to-seed variation; False when neither
      check can explain it; None when neither check is available.

    Without a baseline the row holds mean, std and seeds only.
    """
    out: dict[str, dict[str, Any]] = {}
    labels = _references(converted, baseline, references)
    for metric in converted[0].metrics:
        vals = [r.metrics[metric] for r in converted]
        mean, std = _mean_std(vals)
        row: dict[str, Any] = {"mean": mean, "std": std, "seeds": vals}
        if baseline:
            bvals = [r.metrics[metric] for r in baseline]
            bmean, bstd = _mean_std(bvals)
            delta = mean - bmean
            row.update(baseline_mean=bmean, baseline_std=bstd, delta=delta, baseline_seeds=bvals)
            ci = None if labels is None else delta_interval(metric, converted, baseline, labels, resamples=resamples, seed=seed, level=level)
            noise = bstd if len([v for v in bvals if v == v]) > 1 else None
            checks = []
            if ci is not None:
                checks.append(ci[0] <= 0.0 <= ci[1])
            if noise is not None and delta == delta:
                checks.append(abs(delta) <= 2 * noise)
            row.update(delta_ci95=None if ci is None else list(ci), noise_floor=noise, within_noise=any(checks) if checks else None)
        out[metric] = row
    return out


def _references(converted: Sequence[GlueRun], baseline: Sequence[GlueRun] | None,
                references: Sequence[float] | None) -> np.ndarray | None:
    """The dev labels shared by all runs, or None when the bootstrap cannot run (no predictions or labels)."""
    if not baseline:
        return None
    runs = list(converted) + list(baseline)
    if references is None:
        given = [r.references for r in runs if r.references is not None]
        if len(given) < len(runs):
            return None
        if any(list(g) != list(given[0]) for g in given[1:]):
            raise ValueError("the GLUE runs were scored on different dev labels, so their deltas cannot be paired")
        references = given[0]
    n = len(references)
    if n == 0:
        return None
    bad = [r for r in runs if len(r.predictions) != n]
    if bad:
        if all(len(r.predictions) == 0 for r in bad):
            return None  # runs without their dev predictions (e.g. re-read from a summary)
        raise ValueError(f"the {bad[0].task} run of seed {bad[0].seed} has {len(bad[0].predictions)} dev predictions for {n} labels")
    return np.asarray(references, dtype=np.float64)


def delta_interval(metric: str, converted: Sequence[GlueRun], baseline: Sequence[GlueRun], references: Sequence[float] | np.ndarray, *,
                   resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED,
                   level: float = bootstrap.LEVEL) -> tuple[float, float] | None:
    """Paired bootstrap interval over dev items of (metric averaged over converted seeds) - (the same
    for the baseline), every seed of both models scored on the same resampled indices; None when no
    resample gives a finite delta (e.g. constant predictions make a correlation undefined)."""
    ref = np.asarray(references, dtype=np.float64)
    conv = [np.asarray(r.predictions, dtype=np.float64) for r in converted]
    base = [np.asarray(r.predictions, dtype=np.float64) for r in baseline]

    def delta(idx: np.ndarray) -> np.ndarray:
        y = ref[idx]
        c = np.mean([bootstrap.metric_rows(metric, p[idx], y) for p in conv], axis=0)
        b = np.mean([bootstrap.metric_rows(metric, p[idx], y) for p in base], axis=0)
        return c - b

    d = bootstrap.bootstrap_deltas(delta, len(ref), resamples=resamples, seed=seed, batched=True)
    return bootstrap.percentile_interval(d, level) if d.size else None


def glue_average(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """The GLUE score convention: average the metrics within each task, then average over tasks."""
    def task_mean(task_rows: dict[str, dict[str, Any]], key: str) -> float:
        return statistics.fmean(r[key] for r in task_rows.values())

    out = {"mean": statistics.fmean(task_mean(t, "mean") for t in summary.values())}
    if all("baseline_mean" in r for t in summary.values() for r in t.values()):
        out["baseline_mean"] = statistics.fmean(task_mean(t, "baseline_mean") for t in summary.values())
        out["delta"] = out["mean"] - out["baseline_mean"]
    return out
