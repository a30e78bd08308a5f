"""GLUE tasks and their data, read from the standard GLUE TSV layout (`<dir>/<Task>/{train,dev}.tsv`).

The task table says, per task, where the files are, which columns hold the text(s) and the label,
how labels map to ids (in the order of the Hugging Face `glue` dataset, so that F1's positive class
is GLUE's: paraphrase / duplicate = 1), and which metrics GLUE reports.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from normswap.errors import NormswapError
from normswap import textfiles as readers


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out on disk and scored."""

    name: str  # metric config name: "cola", "sst2", ...
    folder: str  # GLUE folder name: "CoLA", "SST-2", ...
    text_columns: tuple[str | int, ...]  # header names, or column indices for header-less files
    label_column: str | int
    labels: tuple[str, ...] | None  # None for regression (STS-B)
    metrics: tuple[str, ...]
    header: bool = True
    dev_file: str = "dev.tsv"

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    # CoLA ships without a header: source, label, original label, sentence.
    "cola": GlueTask("cola", "CoLA", (3,), 1, _BINARY, ("matthews_correlation",), header=False),
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), "label", _BINARY, ("accuracy",)),
    "mrpc": GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY, ("accuracy", "f1")),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BINARY, ("accuracy", "f1")),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearmanr")),
    "mnli": GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
                     ("accuracy",), dev_file="dev_matched.tsv"),
    "mnli_mismatched": GlueTask("mnli_mismatched", "MNLI", ("sentence1", "sentence2"), "gold_label",
                                ("entailment", "neutral", "contradiction"), ("accuracy",), dev_file="dev_mismatched.tsv"),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, ("accuracy",)),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, ("accuracy",)),
    "wnli": GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", _BINARY, ("accuracy",)),
}

_ALIASES = {"mnli_matched": "mnli", "mnli-m": "mnli", "mnli-mm": "mnli_mismatched", "mnli_mm": "mnli_mismatched"}


def task_spec(name: str) -> GlueTask:
    """The task named `name`, accepting GLUE folder spellings ("SST-2", "STS-B") and lower case."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    key = key.replace("-", "")
    if key not in TASKS:
        raise NormswapError(f"unknown GLUE task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[key]


def parse_tasks(spec: str) -> list[GlueTask]:
    """Tasks from a comma-separated list such as "sst2,cola,rte,stsb" (duplicates dropped)."""
    names = [s for s in (p.strip() for p in spec.split(",")) if s]
    if not names:
        raise NormswapError("--glue needs at least one task, e.g. --glue sst2,cola")
    out: list[GlueTask] = []
    for n in names:
        t = task_spec(n)
        if t not in out:
            out.append(t)
    return out


@dataclass
class GlueExample:
    """One example: its text(s), its label (id, or float score for STS-B) and its row in the file."""

    texts: tuple[str, ...]
    label: float | int
    row: int


def task_dir(data_dir: str | os.PathLike, task: GlueTask) -> Path:
    """The task's folder under `data_dir` (exact GLUE name, else a case- and dash-insensitive match)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise NormswapError(f"GLUE data folder {data_dir} " + ("is a file, not a folder" if root.exists() else "not found"))
    exact = root / task.folder
    if exact.is_dir():
        return exact
    want = task.folder.lower().replace("-", "")
    for child in root.iterdir():
        if child.is_dir() and child.name.lower().replace("-", "").replace("_", "") == want:
            return child
    raise NormswapError(f"GLUE data folder {data_dir} has no {task.folder}/ folder for task {task.name}")


def split_file(data_dir: str | os.PathLike, task: GlueTask, split: str) -> Path:
    """Path of the train or dev file of a task, with a clear error when it is missing."""
    folder = task_dir(data_dir, task)
    name = "train.tsv" if split == "train" else task.dev_file
    path = folder / name
    if not path.exists():
        raise NormswapError(f"{folder} has no {name}: the {split} split of {task.name} is missing")
    return readers.check_regular_file(path, f"GLUE {split} file")


def read_split(data_dir: str | os.PathLike, task: GlueTask, split: str) -> list[GlueExample]:
    """All examples of one split; malformed rows are an error naming the line, not silently dropped.

    Also one line each: bytes that are not UTF-8, a line over `readers.MAX_LINE_CHARS`, a row with
    more columns than the header or fewer than the task needs, a label outside the task's labels,
    a regression score that is not a finite number.
    """
    path = split_file(data_dir, task, split)
    lines = [(n, row) for n, row in readers.read_tsv(path, f"GLUE {split} file")
             if row and not all(not c.strip() for c in row)]
    width = None
    if task.header:
        if not lines:
            raise NormswapError(f"{path} is empty")
        header = [h.strip() for h in lines[0][1]]
        width = len(header)
        try:
            text_idx = [header.index(c) for c in task.text_columns]  # type: ignore[arg-type]
            label_idx = header.index(task.label_column)  # type: ignore[arg-type]
        except ValueError:
            raise NormswapError(f"{path}: header {readers.shown(chr(9).join(header), 120)} lacks the {task.name} columns {task.text_columns + (task.label_column,)}") from None
        body = lines[1:]
    else:
        text_idx, label_idx = list(task.text_columns), task.label_column  # type: ignore[assignment]
        body = lines
    examples = []
    for line, row in body:
        if width is not None and len(row) > width:
            raise NormswapError(f"{path}:{line}: {len(row)} columns but the header has {width} (a tab inside a sentence?)")
        try:
            texts = tuple(row[i] for i in text_idx)  # type: ignore[index]
            raw = row[label_idx].strip()  # type: ignore[index]
        except IndexError:
            raise NormswapError(f"{path}:{line}: expected at least {max(text_idx + [label_idx]) + 1} columns, got {len(row)}") from None
        examples.append(GlueExample(texts, _label(task, raw, path, line), line))
    if not examples:
        raise NormswapError(f"{path} has no examples")
    return examples


def _label(task: GlueTask, raw: str, path: Path, line: int) -> float | int:
    if task.labels is None:
        try:
            score = float(raw)
        except ValueError:
            raise NormswapError(f"{path}:{line}: score {readers.shown(raw)} is not a number") from None
        if not math.isfinite(score):
            raise NormswapError(f"{path}:{line}: score {readers.shown(raw)} is not a finite number")
        return score
    if raw not in task.labels:
        raise NormswapError(f"{path}:{line}: label {readers.shown(raw)} is not one of {', '.join(task.labels)}")
    return task.labels.index(raw)


def subsample(examples: list[GlueExample], n: int | None, seed: int = 0) -> list[GlueExample]:
    """A fixed random subset of `n` examples (all when n is None or too large), in file order.

    The subset depends on `seed` only, so baseline and converted models train on the same rows.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 1:
        raise NormswapError(f"--train-samples must be positive, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]
