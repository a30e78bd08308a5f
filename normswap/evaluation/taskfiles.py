"""Offline data for lm-eval's zero-shot tasks, read from the files exactly as their authors ship them.

The user gives a folder holding one sub-folder per task (`<dir>/piqa/valid.jsonl`, ...). Each task's
files are read into rows of the schema of the Hugging Face dataset lm-eval's YAML names (so its
`doc_to_text`, `doc_to_choice`, `doc_to_target` and `process_docs` run unchanged), and
`offline_task_config` hands lm-eval the registered task's own config with `custom_dataset` set to a
callable that builds those rows in memory: no `datasets.load_dataset`, no network, no cache files.

`OFFLINE_TASKS` is the table: per task, its folder, the files of each split (named as lm-eval's YAML
names the split), the split lm-eval scores, and the reader that turns the original rows into HF rows.
Readers are strict: a row they cannot read is an error naming the file and line, never skipped, and
rows keep the file's order.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normswap.errors import NormswapError
from normswap.textfiles import check_regular_file, decode_utf8, read_bytes, shown

# --------------------------------------------------------------------------- reading files


@dataclass(frozen=True)
class _Row:
    """One JSON object of a .jsonl file, with where it came from (for error messages)."""

    path: Path
    line: int
    obj: dict[str, Any]

    def fail(self, msg: str) -> NormswapError:
        return NormswapError(f"{self.path}:{self.line}: {msg}")

    def get(self, dotted: str, kind: type | tuple[type, ...], obj: Any = None, name: str | None = None) -> Any:
        """Field `dotted` ("question.stem") of the row (or of `obj` in it, called `name` in messages),
        which must exist and be of `kind`."""
        value: Any = self.obj if obj is None else obj
        dotted_shown = dotted if name is None else f"{name}.{dotted}"
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise self.fail(f"missing field '{dotted_shown}'")
            value = value[part]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(f"field '{dotted_shown}' must be {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.fail(f"field '{dotted_shown}' must be {_kind_name(kind)}, got {type(value).__name__} {shown(str(value))}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(1-based line number, text) of every line of a UTF-8 file (universal newlines, BOM dropped)."""
    text = decode_utf8(read_bytes(check_regular_file(path, what), what), path)
    return [(n, line.rstrip("\r\n")) for n, line in enumerate(io.StringIO(text, newline=""), start=1)]


def _read_jsonl(path: Path) -> list[_Row]:
    rows = []
    for n, line in _lines(path, "task data file"):
        if not line.strip():
            raise NormswapError(f"{path}:{n}: empty line (a .jsonl file holds one JSON object per line)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise NormswapError(f"{path}:{n}: bad JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise NormswapError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append(_Row(path, n, obj))
    if not rows:
        raise NormswapError(f"task data file {path} has no rows")
    return rows


def _read_labels(path: Path, values: tuple[str, ...], n_rows: int, rows_path: Path) -> list[str]:
    """The labels of a .lst file (one a line, each one of `values`), as many as the .jsonl has rows."""
    labels = []
    for n, line in _lines(path, "labels file"):
        label = line.strip()
        if label not in values:
            raise NormswapError(f"{path}:{n}: label {shown(label)} is not one of {', '.join(values)}")
        labels.append(label)
    if len(labels) != n_rows:
        raise NormswapError(f"{path} has {len(labels)} labels but {rows_path.name} has {n_rows} rows")
    return labels


# --------------------------------------------------------------------------- readers: original rows -> HF rows
# Each takes the parsed .jsonl rows and the labels of the .lst file (None where the split has none)
# and returns the rows of the HF dataset lm-eval's YAML loads, in the same order.

Reader = Callable[[list[_Row], "list[str] | None"], list[dict[str, Any]]]


def _lambada(rows: list[_Row], labels: list[str] | None) -> list[dict[str, Any]]:
    # EleutherAI/lambada_openai: text (the target is its last word, split off by lm-eval's YAML)
    return [{"text": r.get("text", str)} for r in rows]


def _piqa(rows: list[_Row], labels: list[str] | None) -> list[dict[str, Any]]:
    # baber/piqa: goal, sol1, sol2, label (0 -> sol1, 1 -> sol2, from the aligned .lst)
    assert labels is not None
    return [{"goal": r.get("goal", str), "sol1": r.get("sol1", str), "sol2": r.get("sol2", str), "label": int(label)}
            for r, label in zip(rows, labels)]


def _ai2_choices(r: _Row) -> dict[str, list[str]]:
    """question.choices [{text, label}] as HF's {text: [...], label: [...]}, the answer key among the labels."""
    choices = r.get("question.choices", list)
    if not choices:
        raise r.fail("field 'question.choices' is empty")
    texts, keys = [], []
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise r.fail(f"question.choices[{i}] must be an object with text and label")
        texts.append(r.get("text", str, obj=choice, name=f"question.choices[{i}]"))
        keys.append(r.get("label", str, obj=choice, name=f"question.choices[{i}]"))
    if len(set(keys)) != len(keys):
        raise r.fail(f"question.choices labels {keys} repeat a label")
    return {"text": texts, "label": keys}


def _answer_key(r: _Row, labels: list[str], key: str) -> str:
    if key not in labels:
        raise r.fail(f"answerKey {key!r} is not among the choice labels {labels}")
    return key


def _arc(rows: list[_Row], labels: list[str] | None) -> list[dict[str, Any]]:
    # allenai/ai2_arc: id, question (the stem as a string), choices {text, label}, answerKey
    out = []
    for r in rows:
        choices = _ai2_choices(r)
        key = r.get("answerKey", str)
        _answer_key(r, choices["label"], key)
        out.append({"id": r.get("id", str), "question": r.get("question.stem", str), "choices": choices, "answerKey": key})
    return out


def _openbookqa(rows: list[_Row], labels: list[str] | None) -> list[dict[str, Any]]:
    # allenai/openbookqa main: id, question_stem, choices {text, label}, answerKey; lm-eval's YAML
    # looks the key up as answerKey.lstrip(), so that is what must be among the labels.
    out = []
    for r in rows:
        choices = _ai2_choices(r)
        key = r.get("answerKey", str)
        _answer_key(r, choices["label"], key.lstrip())
        out.append({"id": r.get("id", str), "question_stem": r.get("question.stem", str), "choices": choices, "answerKey": key})
    return out


def _hellaswag(rows: list[_Row], labels: list[str] | None) -> list[dict[str, Any]]:
    # Rowan/hellaswag: the file's fields as they are, but label as a string (HF's type);
    # lm-eval's process_docs then builds query/choices/gold from them.
    out = []
    for r in rows:
        endings = r.get("endings", list)
        for i, ending in enumerate(endings):
            if not isinstance(ending, str):
                raise r.fail(f"endings[{i}] must be a string, got {type(ending).__name__}")
        label = r.get("label", int)
        if not 0 <= label < len(endings):
            raise r.fail(f"label {label} is not an index into the {len(endings)} endings")
        out.append({"ind": r.get("ind", int), "activity_label": r.get("activity_label", str),
                    "ctx_a": r.get("ctx_a", str), "ctx_b": r.get("ctx_b", str), "ctx": r.get("ctx", str),
                    "endings": endings, "source_id": r.get("source_id", str), "split": r.get("split", str),
                    "split_type": r.get("split_type", str), "label": str(label)})
    return out


def _boolq(rows: list[_Row], labels: list[str] | None) -> list[dict[str, Any]]:
    # super_glue boolq: question, passage, idx (the row's index), label (1 = True: doc_to_choice is ["no", "yes"])
    return [{"question": r.get("question", str), "passage": r.get("passage", str), "idx": i,
             "label": int(r.get("answer", bool))} for i, r in enumerate(rows)]


def _winogrande(rows: list[_Row], labels: list[str] | None) -> list[dict[str, Any]]:
    # allenai/winogrande winogrande_xl: sentence (one "_" blank), option1, option2, answer "1"/"2".
    # The answer is the row's own where it has one (the .lst must then agree), else the .lst's.
    out = []
    for i, r in enumerate(rows):
        sentence = r.get("sentence", str)
        if sentence.count("_") != 1:
            raise r.fail(f"sentence has {sentence.count('_')} '_' blanks, not exactly one: {shown(sentence)}")
        if "answer" in r.obj:
            answer = r.get("answer", str)
            if answer not in ("1", "2"):
                raise r.fail(f"answer {answer!r} is not '1' or '2'")
            if labels is not None and labels[i] != answer:
                raise r.fail(f"answer {answer!r} disagrees with the labels file ({labels[i]!r} on its line {i + 1})")
        elif labels is not None:
            answer = labels[i]
        else:
            raise r.fail("missing field 'answer' and no labels file beside it to give it")
        out.append({"sentence": sentence, "option1": r.get("option1", str), "option2": r.get("option2", str),
                    "answer": answer})
    return out


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class OfflineTask:
    """Where one lm-eval task's original files are and how they become the HF rows lm-eval expects."""

    folder: str  # sub-folder of the tasks data folder
    scored: str  # the split lm-eval scores: its YAML's test_split if set, else validation_split
    splits: Mapping[str, tuple[str, str | None]]  # split (as lm-eval's YAML names it) -> (.jsonl, labels .lst or None)
    reader: Reader
    label_values: tuple[str, ...] = ()  # what one line of a labels file may hold
    labels_optional: bool = False  # a split's labels file may be absent (the rows then carry the answer)
    note: str = field(default="", compare=False)  # why, for an odd case
    harness_dir: str = ""  # lm-eval's folder of this task's YAML, under lm_eval/tasks/ (indexing it alone is fast)


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "lambada_openai": OfflineTask(
        "lambada_openai", "test", {"test": ("lambada_test.jsonl", None)}, _lambada,
        harness_dir="lambada", note="OpenAI's detokenised test set; lm-eval's YAML has no other split"),
    "piqa": OfflineTask(
        "piqa", "validation",
        {"validation": ("valid.jsonl", "valid-labels.lst"), "train": ("train.jsonl", "train-labels.lst")},
        _piqa, label_values=("0", "1"),
        harness_dir="piqa", note="labels ship in a separate .lst aligned line by line; the test set's labels are not public"),
    "arc_easy": OfflineTask(
        "arc_easy", "test",
        {"test": ("ARC-Easy-Test.jsonl", None), "train": ("ARC-Easy-Train.jsonl", None),
         "validation": ("ARC-Easy-Dev.jsonl", None)}, _arc,
        harness_dir="arc", note="the release calls the validation split Dev"),
    "arc_challenge": OfflineTask(
        "arc_challenge", "test",
        {"test": ("ARC-Challenge-Test.jsonl", None), "train": ("ARC-Challenge-Train.jsonl", None),
         "validation": ("ARC-Challenge-Dev.jsonl", None)}, _arc,
        harness_dir="arc", note="the release calls the validation split Dev"),
    "hellaswag": OfflineTask(
        "hellaswag", "validation",
        {"validation": ("hellaswag_val.jsonl", None), "train": ("hellaswag_train.jsonl", None)}, _hellaswag,
        harness_dir="hellaswag", note="the test file has no labels, so lm-eval scores validation"),
    "boolq": OfflineTask(
        "boolq", "validation", {"validation": ("dev.jsonl", None), "train": ("train.jsonl", None)}, _boolq,
        harness_dir="super_glue/boolq", note="lm-eval's boolq is SuperGLUE's: idx/label fields, scored on dev (its validation)"),
    "winogrande": OfflineTask(
        "winogrande", "validation",
        {"validation": ("dev.jsonl", "dev-labels.lst"), "train": ("train_xl.jsonl", "train_xl-labels.lst")},
        _winogrande, label_values=("1", "2"), labels_optional=True,
        harness_dir="winogrande", note="the 1.1 release puts answers both in the .jsonl and a .lst; the .lst only has to be there "
             "for rows without one; lm-eval uses the xl training size"),
    "openbookqa": OfflineTask(
        "openbookqa", "test",
        {"test": ("test.jsonl", None), "train": ("train.jsonl", None), "validation": ("dev.jsonl", None)},
        _openbookqa, harness_dir="openbookqa", note="the Data/Main files of the release; the validation split is called dev"),
}


# --------------------------------------------------------------------------- public API


def _spec(task: str) -> OfflineTask:
    spec = OFFLINE_TASKS.get(task)
    if spec is None:
        raise NormswapError(f"no offline reader for task {task!r}; known tasks: {', '.join(sorted(OFFLINE_TASKS))}")
    return spec


def _split_files(task: str, data_dir: str | os.PathLike) -> dict[str, tuple[Path, Path | None]]:
    """split -> (.jsonl path, labels path or None) for the splits whose files are there; the scored
    split must be, and a split is either whole or absent."""
    spec = _spec(task)
    root = Path(data_dir)
    if not root.is_dir():
        raise NormswapError(f"tasks data folder {data_dir} not found" if not root.exists()
                            else f"tasks data folder {data_dir} is not a folder")
    folder = root / spec.folder
    rows_file, labels_file = spec.splits[spec.scored]
    expected = rows_file if not labels_file else (
        f"{rows_file} (and {labels_file} for rows without an answer)" if spec.labels_optional else f"{rows_file} and {labels_file}")
    if not folder.is_dir():
        raise NormswapError(f"tasks data folder {data_dir} has no {spec.folder}/ folder for task {task} "
                            f"(expected {expected} in {folder})")
    found: dict[str, tuple[Path, Path | None]] = {}
    for split, (rows_name, labels_name) in spec.splits.items():
        rows_path = folder / rows_name
        labels_path = folder / labels_name if labels_name else None
        has_labels = labels_path is not None and labels_path.exists()
        if not rows_path.exists():
            if split == spec.scored:
                raise NormswapError(f"{rows_path} not found (task {task} expects {expected} in {folder})")
            if has_labels:
                raise NormswapError(f"{labels_path} has no {rows_name} beside it (task {task}, split {split})")
            continue
        if labels_path is not None and not has_labels and not spec.labels_optional:
            raise NormswapError(f"{labels_path} not found (task {task} reads the labels of {rows_name} from it)")
        found[split] = (rows_path, labels_path if has_labels else None)
    return found


def read_task_rows(task: str, data_dir: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """split -> rows, in the HF schema lm-eval's YAML for `task` expects, read from `data_dir/<folder>/`.

    The split lm-eval scores must be there; the others (lm-eval's few-shot sources) are read where
    their files are.
    """
    spec = _spec(task)
    out = {}
    for split, (rows_path, labels_path) in _split_files(task, data_dir).items():
        rows = _read_jsonl(rows_path)
        labels = _read_labels(labels_path, spec.label_values, len(rows), rows_path) if labels_path else None
        out[split] = spec.reader(rows, labels)
    return out


def check_tasks_data(tasks: list[str], data_dir: str | os.PathLike) -> None:
    """Refuse, before any model loads, unknown tasks and missing or malformed files (one line each)."""
    for task in tasks:
        _spec(task)
    for task in dict.fromkeys(tasks):
        read_task_rows(task, data_dir)


@dataclass(frozen=True)
class LocalTaskData:
    """lm-eval's `custom_dataset`: called with the task's metadata as keywords, returns its splits
    as in-memory `datasets.Dataset`s. Its repr is what lm-eval writes for it in the results' configs."""

    task: str
    data_dir: str

    def __call__(self, **_metadata: Any) -> dict[str, Any]:
        import datasets

        return {split: datasets.Dataset.from_list(rows) for split, rows in read_task_rows(self.task, self.data_dir).items()}


_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def offline_task_config(task: str, data_dir: str | os.PathLike, task_manager: Any) -> dict[str, Any]:
    """lm-eval's own config of `task` (from `task_manager`'s index, `include:` followed and
    `!function` resolved), reading its data from `data_dir` instead of the Hub: `custom_dataset` set,
    and the splits whose files are absent set to None so that lm-eval never asks for them.

    Pass the result to `task_manager.load_task_or_group([...])` or `lm_eval.simple_evaluate(tasks=[...])`.
    """
    from copy import deepcopy

    from lm_eval.tasks._yaml_loader import load_yaml

    spec = _spec(task)
    present = _split_files(task, data_dir)
    entry = task_manager.task_index.get(task)
    if entry is None:
        raise NormswapError(f"lm-eval has no task {task!r} in its task index")
    cfg = deepcopy(load_yaml(entry.yaml_path, resolve_func=True)) if entry.yaml_path else deepcopy(entry.cfg or {})
    scored = cfg.get("test_split") or cfg.get("validation_split")
    if scored != spec.scored:  # a newer lm-eval changed which split it scores; the table must follow
        raise NormswapError(f"lm-eval scores split {scored!r} of task {task}, but normswap reads {spec.scored!r} for it")
    for key in _SPLIT_KEYS:
        if cfg.get(key) is not None and cfg[key] not in present:
            cfg[key] = None
    cfg["custom_dataset"] = LocalTaskData(task, os.path.abspath(data_dir))
    return cfg
