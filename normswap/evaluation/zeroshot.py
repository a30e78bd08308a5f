"""Zero-shot (and few-shot) tasks through lm-evaluation-harness, with the model object normswap loaded.

The numbers are lm-eval's own: normswap hands the already-loaded model (a converted folder keeps its
RMSNorm / DyT modules) to lm-eval's `HFLM` wrapper and calls `lm_eval.simple_evaluate`; it never
re-implements a prompt, a metric or an answer normalisation. What normswap adds:

- offline data: `--tasks-data DIR` maps the task files as their authors distribute them onto
  lm-eval's own task definitions (`normswap.evaluation.taskfiles`); online, plain task names go to
  lm-eval as usual; `--include-path DIR` adds a user's own lm-eval task YAMLs;
- a paired comparison: both models are scored on the same items (same documents, same few-shot
  examples: lm-eval's seeds are fixed), and every delta comes with a paired bootstrap 95% interval
  over those items, computed from lm-eval's per-sample values;
- one progress bar across all tasks and both models (requests done / total, ETA), or plain log
  lines when stderr is not a terminal.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.evaluation import bootstrap
from normswap.log import logger

# Per-sample value -> corpus figure, for the aggregations normswap can pair. lm-eval's per-sample
# value of `perplexity` is the log-likelihood of the target, and its aggregation exp(-mean(ll)).
_AGGREGATE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda x: x.mean(axis=-1),
    "perplexity": lambda x: np.exp(-x.mean(axis=-1)),
}


@dataclass
class TaskSettings:
    """What `--tasks` was asked to do (also written to the results file)."""

    names: list[str]
    data: str | None = None  # --tasks-data DIR: DIR/<task>/... in the authors' formats
    include_path: str | None = None  # --include-path DIR: the user's own lm-eval task YAMLs
    limit: int | None = None  # first N documents of each task (lm-eval's --limit)
    num_fewshot: int | None = None  # None: each task's own default (0 for the shipped ones)
    batch_size: int = 8
    resamples: int = 1000  # paired bootstrap of each delta
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_names(spec: str | Sequence[str] | None, option: str = "--tasks") -> list[str]:
    """`"piqa, arc_easy"` -> ["piqa", "arc_easy"]; duplicates and empty lists are mistakes."""
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec or ()]
    names = [t for t in names if t]
    if not names:
        raise NormswapError(f"{option} needs at least one task name")
    dupes = sorted({t for t in names if names.count(t) > 1})
    if dupes:
        raise NormswapError(f"{option} names {', '.join(dupes)} more than once")
    return names


def _offline() -> bool:
    return any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def task_manager(include_path: str | None = None, names: Sequence[str] = (), data: str | None = None) -> Any:
    """lm-eval's task index: its own tasks plus the user's YAMLs (`include_path`), quiet, built once
    per set of folders. Indexing every lm-eval task takes ~12 s, so when each of `names` is a task
    normswap maps from `data` or one in `include_path`, only those tasks' folders are indexed."""
    from normswap.evaluation import taskfiles

    user = [str(Path(include_path).resolve())] if include_path else []
    if names and data is not None:
        import lm_eval.tasks

        root = Path(lm_eval.tasks.__file__).parent
        dirs = sorted({str(root / taskfiles.OFFLINE_TASKS[t].harness_dir) for t in names if t in taskfiles.OFFLINE_TASKS})
        small = _task_manager(tuple(dirs + user), include_defaults=False)
        if all(t in small.all_tasks for t in names):
            return small
    return _task_manager(tuple(user), include_defaults=True)


_MANAGERS: dict[tuple, Any] = {}


def _task_manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    key = (paths, include_defaults)
    if key not in _MANAGERS:
        with _quiet_harness():
            from lm_eval.tasks import TaskManager

            _MANAGERS[key] = TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)
    return _MANAGERS[key]


def task_specs(settings: TaskSettings) -> list[Any]:
    """What lm-eval is given for each task: an offline config built from `--tasks-data`, or the
    name itself (lm-eval's own task, online, or one from `--include-path`). Cheap checks only."""
    from normswap.evaluation import taskfiles

    if settings.include_path is not None and not Path(settings.include_path).is_dir():
        raise NormswapError(f"--include-path {settings.include_path} is not a folder")
    if settings.data is not None and not Path(settings.data).is_dir():
        raise NormswapError(f"--tasks-data {settings.data} is not a folder")
    manager = task_manager(settings.include_path, settings.names, settings.data)
    own = _included_names(manager, settings.include_path)
    mapped = [t for t in settings.names if settings.data is not None and t in taskfiles.OFFLINE_TASKS and t not in own]
    if mapped:
        taskfiles.check_tasks_data(mapped, settings.data)
    specs: list[Any] = []
    for name in settings.names:
        if name in mapped:
            cfg = taskfiles.offline_task_config(name, settings.data, manager)
            splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
            if settings.num_fewshot and splits == {taskfiles.OFFLINE_TASKS[name].scored}:
                # lm-eval would draw the examples from the scored documents (for a test split, even
                # the document being scored): refuse rather than report a contaminated figure
                raise NormswapError(f"--num-fewshot {settings.num_fewshot}: {settings.data}/{taskfiles.OFFLINE_TASKS[name].folder} holds only "
                                    f"the scored {next(iter(splits))} split of {name}, so the few-shot examples would come from "
                                    "the documents being scored; add its train file (see normswap.evaluation.taskfiles.OFFLINE_TASKS)")
            specs.append(cfg)
            continue
        if name not in manager.all_tasks:
            import difflib

            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise NormswapError(f"unknown task {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                                + (f"; {settings.include_path} defines: {', '.join(sorted(own))}" if settings.include_path else ""))
        if name not in own and _offline():
            known = ", ".join(sorted(taskfiles.OFFLINE_TASKS))
            raise NormswapError(
                f"task {name} reads its data from the Hugging Face Hub, which is offline here: "
                + (f"give --tasks-data DIR holding {name}/ (normswap maps the original files of {known})"
                   if name in taskfiles.OFFLINE_TASKS else f"normswap can map local files only for {known}; "
                   "write a task YAML that reads local files and pass its folder with --include-path"))
        specs.append(name)
    return specs


def _included_names(manager: Any, include_path: str | None) -> set[str]:
    """Tasks defined by YAMLs under `include_path` (they take precedence over lm-eval's own)."""
    if not include_path:
        return set()
    root = Path(include_path).resolve()
    names = set()
    for name, entry in manager._index.items():  # noqa: SLF001 - lm-eval keeps the index private
        path = getattr(entry, "yaml_path", None)
        if path is not None and root in Path(path).resolve().parents:
            names.add(name)
    return names


# ------------------------------------------------------------------------------------------ progress


class RequestProgress:
    """One bar over every request of every task for every model: a tqdm bar on a terminal, else a
    log line every `every_s` seconds (`normswap.evaluation.progress.Progress`). lm-eval reports each
    finished request through its cache hook; the total grows as each task's requests are built."""

    def __init__(self, models: int, enabled: bool | None = None, every_s: float = 30.0) -> None:
        from normswap.evaluation.progress import Progress

        self.models, self.seen = models, 0
        self.bar = Progress(0, "zero-shot", enabled, unit="requests", every_s=every_s)
        self.tty = not self.bar.disable

    @property
    def done(self) -> int:
        return self.bar.n

    @property
    def total(self) -> int:
        return self.bar.total

    def start_model(self) -> None:
        self.seen += 1

    def add_requests(self, n: int) -> None:
        """A model is about to run `n` requests; the first model's count stands in for the others'."""
        if self.bar.total == 0:  # rates and ETA count from the first request, not from task building
            self.bar.restart()
        if self.seen <= 1:
            self.bar.total = self.bar.total + n * self.models

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _counting_lm(model: nn.Module, tokenizer: Any, batch_size: int, progress: RequestProgress) -> Any:
    """lm-eval's HFLM around `model`, its own bars off, every finished request counted."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    class Counted(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):  # noqa: ANN001 - lm-eval's signature
            progress.add_requests(len(requests))
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
            progress.add_requests(len(requests))
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
            progress.add_requests(len(requests))
            return super().generate_until(requests, disable_tqdm=True)

    class Hook(CacheHook):
        def __init__(self) -> None:
            super().__init__(None)

        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            progress.advance()

    lm = Counted(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    lm.set_cache_hook(Hook())
    return lm


class _quiet_harness:
    """lm-eval used as a library, without its noise: its print()s (e.g. "bootstrapping for stddev")
    never reach normswap's stdout, which carries only results (JSON with --format json); its bootstrap
    of stderrs runs in-process instead of forking a pool of every CPU beside a loaded model; and,
    unless `NORMSWAP_VERBOSE_HARNESS=1`, its INFO/WARNING logs, its own progress bars and `datasets`'
    map bars stay off stderr (normswap reports progress itself)."""

    def __enter__(self) -> None:
        import contextlib

        self.stack = contextlib.ExitStack()
        self.stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        self._setenv("DISABLE_MULTIPROC", "1")
        if os.environ.get("NORMSWAP_VERBOSE_HARNESS") == "1":
            return
        from functools import partial

        import datasets
        import lm_eval.api.task as task_module
        import tqdm

        self.stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))  # noqa: SIM115 - closed by the stack
        level = logging.getLogger("lm_eval").level
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.stack.callback(logging.getLogger("lm_eval").setLevel, level)
        for module in (task_module, tqdm):  # tqdm reads TQDM_DISABLE at import, not per bar
            original = module.tqdm
            module.tqdm = partial(original, disable=True)
            self.stack.callback(setattr, module, "tqdm", original)
        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            self.stack.callback(datasets.enable_progress_bars)

    def _setenv(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        self.stack.callback(lambda: os.environ.__setitem__(name, old) if old is not None else os.environ.pop(name, None))

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()


# ------------------------------------------------------------------------------------------- running


@dataclass
class HarnessRun:
    """lm-eval's outcome for one model: its results dict and per-task, per-document samples."""

    results: dict[str, Any]  # lm-eval's own output, samples removed
    samples: dict[str, list[dict[str, Any]]]  # task -> lm-eval's per-document records
    seconds: float


def evaluate_model(model: nn.Module, tokenizer: Any, specs: list[Any], settings: TaskSettings, manager: Any,
                   progress: RequestProgress) -> HarnessRun:
    """Score one loaded model on every task with lm-eval (`simple_evaluate`, per-sample logs on)."""
    import lm_eval

    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # lm-eval pads batches; GPT-2-style tokenizers have no pad
    t0 = time.perf_counter()
    progress.start_model()
    with _quiet_harness():
        lm = _counting_lm(model, tokenizer, settings.batch_size, progress)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(specs), task_manager=manager, num_fewshot=settings.num_fewshot,
                                      limit=settings.limit, log_samples=True, bootstrap_iters=1000)
    if out is None:
        raise NormswapError("lm-eval returned no results")
    out = dict(out)
    samples = out.pop("samples", {}) or {}
    return HarnessRun(out, samples, time.perf_counter() - t0)


def _metric_names(results: dict[str, Any], task: str) -> list[str]:
    """lm-eval's metric keys of one task ("acc,none" -> "acc"), stderr and bookkeeping left out."""
    names = []
    for key in results["results"][task]:
        if "," not in key or "_stderr" in key:
            continue
        names.append(key.split(",", 1)[0])
    return names


def _value(results: dict[str, Any], task: str, metric: str, suffix: str = "") -> float | None:
    row = results["results"][task]
    for key, value in row.items():
        if key.split(",", 1)[0] == metric + suffix and isinstance(value, (int, float)):
            return float(value)
    return None


def _per_item(run: HarnessRun, task: str, metric: str) -> tuple[list[int], np.ndarray, list[str]]:
    """(doc ids, per-document values, doc hashes) of one metric, in doc-id order."""
    rows = sorted(run.samples.get(task, []), key=lambda s: s["doc_id"])
    values = []
    for s in rows:
        v = s.get(metric)
        if isinstance(v, (list, tuple)):  # (value, weight) pairs of weighted metrics
            v = v[0]
        values.append(float(v))
    return [s["doc_id"] for s in rows], np.asarray(values, dtype=np.float64), [str(s.get("doc_hash", "")) for s in rows]


def _aggregation(manager_task: Any, metric: str) -> str | None:
    """The name of lm-eval's aggregation of `metric` in a task config, when normswap can pair it."""
    for m in manager_task.get("metric_list") or []:
        if m.get("metric") == metric:
            agg = m.get("aggregation")
            return agg if isinstance(agg, str) else None
    return None


def compare(runs: dict[str, HarnessRun], settings: TaskSettings) -> dict[str, dict[str, Any]]:
    """Per task and metric: both models' values and stderrs (lm-eval's) and the paired delta."""
    conv = runs["converted"]
    base = runs.get("baseline")
    out: dict[str, dict[str, Any]] = {}
    for task in conv.results["results"]:
        if task not in conv.samples:  # a group's aggregate row: its members are reported themselves
            continue
        config = conv.results.get("configs", {}).get(task, {})
        row: dict[str, Any] = {"documents": len(conv.samples[task]),
                               "num_fewshot": conv.results.get("n-shot", {}).get(task),
                               "version": conv.results.get("versions", {}).get(task)}
        for metric in _metric_names(conv.results, task):
            cell: dict[str, Any] = {"value": _value(conv.results, task, metric),
                                    "stderr": _value(conv.results, task, metric, "_stderr")}
            if base is not None:
                cell.update(baseline=_value(base.results, task, metric), baseline_stderr=_value(base.results, task, metric, "_stderr"))
                cell.update(_paired_delta(conv, base, task, metric, _aggregation(config, metric) or "mean", settings))
            row[metric] = cell
        out[task] = row
    return out


def _paired_delta(conv: HarnessRun, base: HarnessRun, task: str, metric: str, aggregation: str,
                  settings: TaskSettings) -> dict[str, Any]:
    ids_c, vals_c, hash_c = _per_item(conv, task, metric)
    ids_b, vals_b, hash_b = _per_item(base, task, metric)
    if ids_c != ids_b or hash_c != hash_b:
        raise NormswapError(f"{task}: the two models were not scored on the same documents, so their delta cannot be paired")
    agg = _AGGREGATE.get(aggregation)
    if agg is None:
        return {"delta": None, "ci95": None, "excludes_zero": None,
                "note": f"lm-eval aggregates {metric} by {aggregation}, which normswap cannot resample"}
    if not (np.isfinite(vals_c).all() and np.isfinite(vals_b).all()):
        raise NormswapError(f"{task} {metric}: a per-document value is not finite, so the delta is undefined")
    delta = float(agg(vals_c) - agg(vals_b))
    lo, hi = bootstrap.paired_bootstrap(lambda idx: agg(vals_c[idx]) - agg(vals_b[idx]), len(vals_c),
                                        resamples=settings.resamples, seed=settings.seed)
    return {"delta": delta, "ci95": [float(lo), float(hi)], "excludes_zero": bool(lo > 0 or hi < 0)}


def run_tasks(models: list[tuple[str, str]], settings: TaskSettings, specs: list[Any], out: Path | None,
              progress: bool | None = None, *, device: Any = "auto", dtype: Any = "float32") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load each model in turn (converted first), score it with lm-eval, then compare.

    `models` are (role, path) pairs. Returns the per-task rows (task -> metric -> cell) and the
    settings they depend on (with lm-eval's version and seconds per model); with `out`, lm-eval's
    own results (and per-sample logs) are written under out/lm_eval/.

    `device` and `dtype` place every model (`normswap.evaluation.placement`; the default float32
    is what this function always did); the settings record the dtypes each model ran in.
    """
    from normswap.evaluation import placement
    from normswap.evaluation.checks import lm_kind
    from normswap.loading import load_pretrained, load_tokenizer

    manager = task_manager(settings.include_path, settings.names, settings.data)
    bar = RequestProgress(len(models), progress)
    place = placement.resolve(device, dtype)
    runs: dict[str, HarnessRun] = {}
    precision: dict[str, dict[str, Any]] = {}
    try:
        for role, path in models:
            model = load_pretrained(path, dtype=place.load_dtype)
            if lm_kind(model) != "causal":
                raise NormswapError(f"--tasks needs a causal language model; {path} loads as {type(model).__name__}")
            precision[role] = {}
            with placement.placed(model.eval(), place, precision[role]) as model:
                tok = load_tokenizer(path)
                logger.info("zero-shot: %s on %s%s", path, ", ".join(settings.names),
                            f" (first {settings.limit} documents each)" if settings.limit else "")
                runs[role] = evaluate_model(model, tok, specs, settings, manager, bar)
            del model
    finally:
        bar.close()
    rows = compare(runs, settings)
    for role, run in runs.items():
        _check_finite(rows, role, dict(models)[role])
    info = {**settings.to_dict(), "lm_eval": runs["converted"].results.get("lm_eval_version"),
            "seconds": {role: run.seconds for role, run in runs.items()}, "device": place.describe()["device"],
            "precision": precision,
            "bootstrap": {"resamples": settings.resamples, "seed": settings.seed, "level": 0.95, "paired_over": "documents"}}
    if out is not None:
        info["files"] = write_harness_files(out / "lm_eval", runs)
    return rows, info


def _check_finite(rows: dict[str, dict[str, Any]], role: str, path: str) -> None:
    key = "value" if role == "converted" else "baseline"
    for task, row in rows.items():
        for metric, cell in row.items():
            if isinstance(cell, dict) and isinstance(cell.get(key), float) and not math.isfinite(cell[key]) and metric != "perplexity":
                raise NormswapError(f"{task} {metric} of {path} is {cell[key]}: the model's outputs are not finite")


def write_harness_files(folder: Path, runs: dict[str, HarnessRun]) -> dict[str, str]:
    """lm-eval's own results file per model (`<role>.json`) and its per-sample logs
    (`<role>_samples_<task>.jsonl`), serialised the way lm-eval serialises them."""
    from lm_eval.utils import handle_non_serializable

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, run in runs.items():
        path = folder / f"{role}.json"
        path.write_text(json.dumps(run.results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
        files[role] = str(path)
        for task, samples in run.samples.items():
            with (folder / f"{role}_samples_{task}.jsonl").open("w", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return files


def load_run(folder: Path, role: str = "converted") -> HarnessRun | None:
    """A run written by `write_harness_files` read back (None when `folder` holds none), so that
    models evaluated one at a time (a recipe's original, converted, recovered) can still be paired."""
    path = Path(folder) / f"{role}.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    samples = {}
    for task in results.get("results", {}):
        f = Path(folder) / f"{role}_samples_{task}.jsonl"
        if f.is_file():
            samples[task] = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return HarnessRun(results, samples, 0.0)


def paired_deltas(converted: HarnessRun, baseline: HarnessRun, settings: TaskSettings) -> dict[str, dict[str, Any]]:
    """task -> metric -> {delta, ci95, excludes_zero} of two runs scored on the same documents."""
    rows = compare({"converted": converted, "baseline": baseline}, settings)
    return {task: {m: {k: c[k] for k in ("delta", "ci95", "excludes_zero") if k in c} for m, c in row.items() if isinstance(c, dict)}
            for task, row in rows.items()}
