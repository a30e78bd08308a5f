"""Offline task data for lm-eval (normswap.evaluation.taskfiles): the original files of each task read
into the HF rows lm-eval expects, and lm-eval's own task built on them, checked against prompts,
choices and gold worked out by hand. No network, no model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from normswap.assets import asset
from normswap.errors import NormswapError
from normswap.evaluation import taskfiles
from normswap.evaluation.taskfiles import OFFLINE_TASKS, check_tasks_data, offline_task_config, read_task_rows

# lm-eval's folders holding the YAMLs of the tasks in the table. Indexing only these takes
# milliseconds; a plain TaskManager() indexes every lm-eval task (over 10 s on a busy machine) and
# finds the same YAML files.
_LM_EVAL_DIRS = ("lambada", "piqa", "arc", "hellaswag", "super_glue/boolq", "winogrande", "openbookqa")


@pytest.fixture(scope="module")
def tm():
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    base = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=[str(base / d) for d in _LM_EVAL_DIRS])


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _ai2(qid: str, stem: str, texts: list[str], labels: list[str], key: str) -> dict:
    return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": k} for t, k in zip(texts, labels)]},
            "answerKey": key}


# --------------------------------------------------------------------------- small files in the original formats

_WG1 = {"qID": "3D5G8J4N5CI2K40F4RZLF9OG2CKVTH-2", "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
        "option1": "Sarah", "option2": "Maria", "answer": "1"}
_WG2 = {"qID": "3D5G8J4N5CI2K40F4RZLF9OG2CKVTH-1", "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah", "option2": "Maria", "answer": "2"}
_HS_WIKIHOW = {"ind": 4, "activity_label": "Baking", "ctx_a": "[header] How to make a cake [title] Mix the flour.", "ctx_b": "then",
               "ctx": "[header] How to make a cake [title] Mix the flour. then", "split": "val", "split_type": "zeroshot",
               "label": 1, "endings": ["put it in the sink.", "add the eggs [step] slowly.", "sing.", "leave."],
               "source_id": "wikihow~11"}
_HS_ACTIVITYNET = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                   "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
                   "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
                   "source_id": "activitynet~v_-JhWjGDPHMY"}


def _write(task: str, root: Path) -> None:
    """The small files of `task` under root/<task>/, laid out as their authors ship them."""
    d = root / OFFLINE_TASKS[task].folder
    if task == "lambada_openai":
        _jsonl(d / "lambada_test.jsonl", [{"text": "He opened the door and saw his old friend Harlin"},
                                          {"text": "She looked at the sky and it was grey"}])
    elif task == "piqa":
        _jsonl(d / "valid.jsonl", [{"goal": "To keep bread fresh,", "sol1": "store it in the oven.", "sol2": "store it in a sealed bag."},
                                   {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Hammer the lid."}])
        _lines(d / "valid-labels.lst", ["1", "0"])
        _jsonl(d / "train.jsonl", [{"id": "t0", "goal": "Dry wet shoes.", "sol1": "Stuff them with paper.", "sol2": "Freeze them."}])
        _lines(d / "train-labels.lst", ["0"])
    elif task == "arc_easy":  # numeric labels (as in 97 real rows) and a 5-choice question; all three splits
        _jsonl(d / "ARC-Easy-Test.jsonl", [
            _ai2("NYSEDREGENTS_2015_4_1", "Which animal is a mammal?", ["frog", "dog", "snake"], ["1", "2", "3"], "2"),
            _ai2("Mercury_1", "Which is a gas?", ["ice", "steam", "rock", "wood", "iron"], list("ABCDE"), "B")])
        _jsonl(d / "ARC-Easy-Train.jsonl", [_ai2("Mercury_2", "Which is hot?", ["fire", "snow"], ["A", "B"], "A")])
        _jsonl(d / "ARC-Easy-Dev.jsonl", [_ai2("Mercury_3", "Which is cold?", ["fire", "snow"], ["A", "B"], "B")])
    elif task == "arc_challenge":  # the test file alone, as shipped in the assets
        _jsonl(d / "ARC-Challenge-Test.jsonl", [
            _ai2("Mercury_7175875", "A planet rotates faster. Which is the most likely effect?",
                 ["Density decreases.", "Years get longer.", "Days get shorter.", "Gravity gets stronger."], list("ABCD"), "C")])
    elif task == "hellaswag":
        _jsonl(d / "hellaswag_val.jsonl", [_HS_WIKIHOW, _HS_ACTIVITYNET])
    elif task == "boolq":
        _jsonl(d / "dev.jsonl", [
            {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky looks blue because of Rayleigh scattering."},
            {"question": "is the sea made of wine", "title": "Sea", "answer": False, "passage": "The sea is salt water."}])
    elif task == "winogrande":  # the 1.1 release: answers in the .jsonl and again in the .lst
        _jsonl(d / "dev.jsonl", [_WG1, _WG2])
        _lines(d / "dev-labels.lst", ["1", "2"])
        _jsonl(d / "train_xl.jsonl", [{**_WG2, "qID": "X-1"}])
        _lines(d / "train_xl-labels.lst", ["2"])
    elif task == "openbookqa":  # Data/Main of the release: test, train, dev
        _jsonl(d / "test.jsonl", [_ai2("7-980", "The sun is responsible for",
                                       ["puppies learning new tricks", "children growing up and getting old",
                                        "flowers wilting in a vase", "plants sprouting, blooming and wilting"], list("ABCD"), "D")])
        _jsonl(d / "train.jsonl", [_ai2("7-1", "Water is", ["wet", "dry"], ["A", "B"], "A")])
        _jsonl(d / "dev.jsonl", [_ai2("7-2", "Fire is", ["cold", "hot"], ["A", "B"], "B")])
    else:
        raise AssertionError(task)


# The rows each reader must give for the files above, per split, in the HF schema lm-eval loads.
_ROWS = {
    "lambada_openai": {"test": [{"text": "He opened the door and saw his old friend Harlin"},
                                {"text": "She looked at the sky and it was grey"}]},
    "piqa": {"validation": [{"goal": "To keep bread fresh,", "sol1": "store it in the oven.", "sol2": "store it in a sealed bag.", "label": 1},
                            {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Hammer the lid.", "label": 0}],
             "train": [{"goal": "Dry wet shoes.", "sol1": "Stuff them with paper.", "sol2": "Freeze them.", "label": 0}]},
    "arc_easy": {"test": [{"id": "NYSEDREGENTS_2015_4_1", "question": "Which animal is a mammal?",
                           "choices": {"text": ["frog", "dog", "snake"], "label": ["1", "2", "3"]}, "answerKey": "2"},
                          {"id": "Mercury_1", "question": "Which is a gas?",
                           "choices": {"text": ["ice", "steam", "rock", "wood", "iron"], "label": list("ABCDE")}, "answerKey": "B"}],
                 "train": [{"id": "Mercury_2", "question": "Which is hot?", "choices": {"text": ["fire", "snow"], "label": ["A", "B"]}, "answerKey": "A"}],
                 "validation": [{"id": "Mercury_3", "question": "Which is cold?", "choices": {"text": ["fire", "snow"], "label": ["A", "B"]}, "answerKey": "B"}]},
    "arc_challenge": {"test": [{"id": "Mercury_7175875", "question": "A planet rotates faster. Which is the most likely effect?",
                                "choices": {"text": ["Density decreases.", "Years get longer.", "Days get shorter.", "Gravity gets stronger."],
                                            "label": list("ABCD")}, "answerKey": "C"}]},
    "hellaswag": {"validation": [{**_HS_WIKIHOW, "label": "1"}, {**_HS_ACTIVITYNET, "label": "3"}]},
    "boolq": {"validation": [{"question": "is the sky blue", "passage": "The sky looks blue because of Rayleigh scattering.", "idx": 0, "label": 1},
                             {"question": "is the sea made of wine", "passage": "The sea is salt water.", "idx": 1, "label": 0}]},
    "winogrande": {"validation": [{k: _WG1[k] for k in ("sentence", "option1", "option2", "answer")},
                                  {k: _WG2[k] for k in ("sentence", "option1", "option2", "answer")}],
                   "train": [{k: _WG2[k] for k in ("sentence", "option1", "option2", "answer")}]},
    "openbookqa": {"test": [{"id": "7-980", "question_stem": "The sun is responsible for",
                             "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                                                  "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                                         "label": list("ABCD")}, "answerKey": "D"}],
                   "train": [{"id": "7-1", "question_stem": "Water is", "choices": {"text": ["wet", "dry"], "label": ["A", "B"]}, "answerKey": "A"}],
                   "validation": [{"id": "7-2", "question_stem": "Fire is", "choices": {"text": ["cold", "hot"], "label": ["A", "B"]}, "answerKey": "B"}]},
}

_WG_CTX = "Sarah was a much better surgeon than Maria so "
# lm-eval on the first scored doc: doc_to_text, doc_to_choice (None for lambada), doc_to_target, as worked out by hand
_FIRST_DOC = {
    "lambada_openai": ("He opened the door and saw his old friend", None, " Harlin"),
    "piqa": ("Question: To keep bread fresh,\nAnswer:", ["store it in the oven.", "store it in a sealed bag."], 1),
    "arc_easy": ("Question: Which animal is a mammal?\nAnswer:", ["frog", "dog", "snake"], 1),
    "arc_challenge": ("Question: A planet rotates faster. Which is the most likely effect?\nAnswer:",
                      ["Density decreases.", "Years get longer.", "Days get shorter.", "Gravity gets stronger."], 2),
    # process_docs: ctx_a + " " + ctx_b.capitalize(); " [title]" -> ". ", other [..] dropped, double spaces closed
    "hellaswag": ("Baking: How to make a cake. Mix the flour. Then",
                  ["put it in the sink.", "add the eggs slowly.", "sing.", "leave."], 1),
    "boolq": ("The sky looks blue because of Rayleigh scattering.\nQuestion: is the sky blue?\nAnswer:", ["no", "yes"], 1),
    # winogrande scores partial sentences: the contexts are the sentence up to "_" with each option, the
    # continuation is the rest; doc_to_text gives the gold index (answer "1" -> 0)
    "winogrande": (0, [_WG_CTX + "Sarah", _WG_CTX + "Maria"], "always got the harder cases."),
    "openbookqa": ("The sun is responsible for",
                   ["puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
                    "plants sprouting, blooming and wilting"], 3),
}
# The (context, continuation) pairs lm-eval sends the model for the first scored doc, zero-shot.
_FIRST_REQUESTS = {
    "lambada_openai": [("He opened the door and saw his old friend", " Harlin")],
    "winogrande": [(_WG_CTX + "Sarah", " always got the harder cases."), (_WG_CTX + "Maria", " always got the harder cases.")],
}
for _task, (_text, _choices, _) in _FIRST_DOC.items():
    if _task not in _FIRST_REQUESTS:  # one request per choice, after lm-eval's target delimiter " "
        _FIRST_REQUESTS[_task] = [(_text, " " + c) for c in _choices]


def _build(task: str, root: Path, tm):
    return tm.load_task_or_group([offline_task_config(task, root, tm)])[task]


def test_table_matches_lm_eval(tm):
    """The split the table reads as scored is the one lm-eval scores, and its split names are the YAML's."""
    from lm_eval.tasks._yaml_loader import load_yaml

    assert set(OFFLINE_TASKS) == set(_ROWS)
    for task, spec in OFFLINE_TASKS.items():
        cfg = load_yaml(tm.task_index[task].yaml_path, resolve_func=False)
        assert spec.scored == (cfg.get("test_split") or cfg.get("validation_split")), task
        yaml_splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
        assert set(spec.splits) <= yaml_splits, task


@pytest.mark.parametrize("task", sorted(OFFLINE_TASKS))
def test_rows_and_lm_eval_task(task, tmp_path, tm):
    _write(task, tmp_path)
    assert read_task_rows(task, tmp_path) == _ROWS[task]
    check_tasks_data([task], tmp_path)

    cfg = offline_task_config(task, tmp_path, tm)
    # lm-eval's own config, only the splits without files switched off and the data source set
    from lm_eval.tasks._yaml_loader import load_yaml
    own = load_yaml(tm.task_index[task].yaml_path, resolve_func=True)
    changed = {k for k in set(own) | set(cfg) if own.get(k) != cfg.get(k)}
    assert changed <= {"custom_dataset", "training_split", "validation_split"}, changed
    for key in ("training_split", "validation_split", "test_split"):
        assert cfg.get(key) == (own.get(key) if own.get(key) in _ROWS[task] else None), key

    t = _build(task, tmp_path, tm)
    assert t.config.task == task
    assert t.config.output_type == own["output_type"]
    assert all(ds.cache_files == [] for ds in t.dataset.values())  # in memory only
    docs = t.eval_docs
    assert len(docs) == len(_ROWS[task][OFFLINE_TASKS[task].scored])
    text, choices, target = _FIRST_DOC[task]
    doc = docs[0]
    assert t.doc_to_text(doc) == text
    assert (t.doc_to_choice(doc) if t.config.doc_to_choice is not None else None) == choices
    assert t.doc_to_target(doc) == target

    t.build_all_requests(limit=1)
    assert [inst.arguments for inst in t.instances] == _FIRST_REQUESTS[task]


def test_winogrande_answer_from_labels_file(tmp_path, tm):
    """Rows without an answer take it from the .lst; a .lst is optional when every row has one."""
    d = tmp_path / "winogrande"
    _jsonl(d / "dev.jsonl", [{k: v for k, v in _WG1.items() if k != "answer"}, _WG2])
    _lines(d / "dev-labels.lst", ["1", "2"])
    assert [r["answer"] for r in read_task_rows("winogrande", tmp_path)["validation"]] == ["1", "2"]
    (d / "dev-labels.lst").unlink()
    _jsonl(d / "dev.jsonl", [_WG2, _WG1])
    assert [r["answer"] for r in read_task_rows("winogrande", tmp_path)["validation"]] == ["2", "1"]
    t = _build("winogrande", tmp_path, tm)
    assert t.doc_to_text(t.eval_docs[0]) == 1
    assert t.config.training_split is None


def test_simple_evaluate_offline(tmp_path, tm):
    """The configs run through lm_eval.simple_evaluate (a stub model scoring by continuation length):
    results under the task's own name, per-sample logs holding the HF-schema doc."""
    import lm_eval
    from lm_eval.api.model import LM

    class Shortest(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(-float(len(r.args[1])), False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    for task in ("piqa", "winogrande"):
        _write(task, tmp_path)
    out = lm_eval.simple_evaluate(model=Shortest(), tasks=[offline_task_config(t, tmp_path, tm) for t in ("piqa", "winogrande")],
                                  task_manager=tm, log_samples=True)
    # piqa: the shorter solution is sol1 both times (gold 1, 0); winogrande: same length, first option wins (gold 0, 1)
    assert out["results"]["piqa"]["acc,none"] == 0.5
    assert out["results"]["winogrande"]["acc,none"] == 0.5
    assert out["n-samples"]["piqa"] == {"original": 2, "effective": 2}
    sample = out["samples"]["piqa"][0]
    assert sample["doc"] == _ROWS["piqa"]["validation"][0] and sample["target"] == 1
    assert out["configs"]["piqa"]["custom_dataset"] == {"task": "piqa", "data_dir": str(tmp_path)}


# --------------------------------------------------------------------------- the shipped files

_SHIPPED = {  # task: (rows in the scored split, gold index of the first row, a field of the first row)
    "lambada_openai": (5153, None, ("text", "In my palm is a clear stone")),
    "piqa": (1838, 0, ("goal", "How do I ready a guinea pig cage for it's new occupants?")),
    "arc_easy": (2376, 0, ("id", "Mercury_417466")),
    "arc_challenge": (1172, 2, ("id", "Mercury_7175875")),
    "hellaswag": (10042, 3, ("ctx", "A man is sitting on a roof. he")),
    "boolq": (3270, 0, ("question", "does ethanol take more energy make that produces")),
}


@pytest.fixture(scope="module")
def shipped() -> Path:
    root = asset("zeroshot")
    if not root.is_dir():
        pytest.skip(f"asset {root} not available (set NORMSWAP_ASSETS)")
    return root


def test_shipped_files(shipped, tmp_path, tm):
    check_tasks_data(list(_SHIPPED), shipped)
    for task, (n, gold, (key, start)) in _SHIPPED.items():
        rows = read_task_rows(task, shipped)
        assert list(rows) == [OFFLINE_TASKS[task].scored], task
        first = rows[OFFLINE_TASKS[task].scored][0]
        assert len(rows[OFFLINE_TASKS[task].scored]) == n, task
        assert first[key].startswith(start), task
        # lm-eval's gold for the first row, on a copy of the first line of each shipped file
        src, dst = shipped / task, tmp_path / task
        dst.mkdir()
        for f in src.iterdir():
            if f.suffix in (".jsonl", ".lst"):
                (dst / f.name).write_bytes(f.read_bytes().split(b"\n", 1)[0] + b"\n")
        t = _build(task, tmp_path, tm)
        doc = t.eval_docs[0]
        if task == "lambada_openai":
            assert t.doc_to_target(doc) == " signs"
            assert t.doc_to_text(doc).endswith("I don't care about")
        else:
            assert t.doc_to_target(doc) == gold, task


def test_shipped_folder_lacks_unshipped_tasks(shipped):
    with pytest.raises(NormswapError, match=r"has no winogrande/ folder .*dev\.jsonl"):
        check_tasks_data(["winogrande"], shipped)


# --------------------------------------------------------------------------- refusals


def _piqa_files(root: Path, rows: list | None = None, labels: list[str] | None = None) -> Path:
    d = root / "piqa"
    _jsonl(d / "valid.jsonl", rows if rows is not None else [{"goal": "g", "sol1": "a", "sol2": "b"}] * 3)
    _lines(d / "valid-labels.lst", labels if labels is not None else ["0", "1", "0"])
    return d


def _bad_json_line(root: Path) -> str:
    d = _piqa_files(root)
    (d / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": "g", "sol1": \n{"goal": "g"}\n')
    return r"piqa/valid\.jsonl:2: bad JSON"


def _empty_line(root: Path) -> str:
    d = _piqa_files(root)
    (d / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n\n{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    return r"piqa/valid\.jsonl:2: empty line"


def _not_object(root: Path) -> str:
    _piqa_files(root, rows=[{"goal": "g", "sol1": "a", "sol2": "b"}, ["g", "a", "b"], {"goal": "g", "sol1": "a", "sol2": "b"}])
    return r"piqa/valid\.jsonl:2: expected a JSON object"


def _not_utf8(root: Path) -> str:
    d = _piqa_files(root)
    (d / "valid.jsonl").write_bytes(b'{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": "\xff", "sol1": "a", "sol2": "b"}\n')
    return r"piqa/valid\.jsonl:2: not UTF-8"


def _empty_file(root: Path) -> str:
    d = _piqa_files(root)
    (d / "valid.jsonl").write_text("")
    return r"piqa/valid\.jsonl has no rows"


def _missing_field(root: Path) -> str:
    _piqa_files(root, rows=[{"goal": "g", "sol1": "a", "sol2": "b"}, {"goal": "g", "sol1": "a"}, {"goal": "g", "sol1": "a", "sol2": "b"}])
    return r"piqa/valid\.jsonl:2: missing field 'sol2'"


def _wrong_type(root: Path) -> str:
    _piqa_files(root, rows=[{"goal": "g", "sol1": "a", "sol2": 3}] * 3)
    return r"piqa/valid\.jsonl:1: field 'sol2' must be a string"


def _label_not_binary(root: Path) -> str:
    _piqa_files(root, labels=["0", "2", "1"])
    return r"piqa/valid-labels\.lst:2: label '2' is not one of 0, 1"


def _labels_short(root: Path) -> str:
    _piqa_files(root, labels=["0", "1"])
    return r"piqa/valid-labels\.lst has 2 labels but valid\.jsonl has 3 rows"


def _labels_missing(root: Path) -> str:
    (_piqa_files(root) / "valid-labels.lst").unlink()
    return r"piqa/valid-labels\.lst not found"


def _scored_file_missing(root: Path) -> str:
    d = _piqa_files(root)
    (d / "valid.jsonl").unlink()
    return r"piqa/valid\.jsonl not found \(task piqa expects valid\.jsonl and valid-labels\.lst in .*piqa\)"


def _train_without_labels(root: Path) -> str:
    d = _piqa_files(root)
    _jsonl(d / "train.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    return r"piqa/train-labels\.lst not found"


def _labels_without_rows(root: Path) -> str:
    d = _piqa_files(root)
    _lines(d / "train-labels.lst", ["0"])
    return r"piqa/train-labels\.lst has no train\.jsonl beside it"


def _arc_key_not_label(root: Path) -> str:
    _jsonl(root / "arc_easy" / "ARC-Easy-Test.jsonl", [_ai2("q1", "s", ["a", "b"], ["A", "B"], "A"),
                                                       _ai2("q2", "s", ["a", "b"], ["1", "2"], "B")])
    return r"arc_easy/ARC-Easy-Test\.jsonl:2: answerKey 'B' is not among the choice labels \['1', '2'\]"


def _arc_choice_missing_text(root: Path) -> str:
    row = _ai2("q1", "s", ["a", "b"], ["A", "B"], "A")
    del row["question"]["choices"][1]["text"]
    _jsonl(root / "arc_challenge" / "ARC-Challenge-Test.jsonl", [row])
    return r"ARC-Challenge-Test\.jsonl:1: missing field 'question\.choices\[1\]\.text'"


def _obqa_key_not_label(root: Path) -> str:
    _jsonl(root / "openbookqa" / "test.jsonl", [_ai2("7-1", "s", ["a", "b"], ["A", "B"], "C")])
    return r"openbookqa/test\.jsonl:1: answerKey 'C' is not among"


def _wg_no_blank(root: Path) -> str:
    _jsonl(root / "winogrande" / "dev.jsonl", [_WG1, {**_WG2, "sentence": "Sarah was better than Maria."}])
    return r"winogrande/dev\.jsonl:2: sentence has 0 '_' blanks, not exactly one"


def _wg_two_blanks(root: Path) -> str:
    _jsonl(root / "winogrande" / "dev.jsonl", [{**_WG1, "sentence": "_ was better than _."}])
    return r"winogrande/dev\.jsonl:1: sentence has 2 '_' blanks"


def _wg_no_answer(root: Path) -> str:
    _jsonl(root / "winogrande" / "dev.jsonl", [_WG1, {k: v for k, v in _WG2.items() if k != "answer"}])
    return r"winogrande/dev\.jsonl:2: missing field 'answer' and no labels file"


def _wg_bad_answer(root: Path) -> str:
    _jsonl(root / "winogrande" / "dev.jsonl", [{**_WG1, "answer": "3"}])
    return r"winogrande/dev\.jsonl:1: answer '3' is not '1' or '2'"


def _wg_disagrees(root: Path) -> str:
    _jsonl(root / "winogrande" / "dev.jsonl", [_WG1, _WG2])
    _lines(root / "winogrande" / "dev-labels.lst", ["1", "1"])
    return r"winogrande/dev\.jsonl:2: answer '2' disagrees with the labels file"


def _wg_label_not_12(root: Path) -> str:
    _jsonl(root / "winogrande" / "dev.jsonl", [_WG1])
    _lines(root / "winogrande" / "dev-labels.lst", ["0"])
    return r"winogrande/dev-labels\.lst:1: label '0' is not one of 1, 2"


def _boolq_answer_not_bool(root: Path) -> str:
    _jsonl(root / "boolq" / "dev.jsonl", [{"question": "q", "title": "t", "answer": "true", "passage": "p"}])
    return r"boolq/dev\.jsonl:1: field 'answer' must be true or false"


def _hellaswag_label_range(root: Path) -> str:
    _jsonl(root / "hellaswag" / "hellaswag_val.jsonl", [{**_HS_ACTIVITYNET, "label": 4}])
    return r"hellaswag/hellaswag_val\.jsonl:1: label 4 is not an index into the 4 endings"


def _missing_folder(root: Path) -> str:
    _piqa_files(root)
    return r"has no lambada_openai/ folder for task lambada_openai \(expected lambada_test\.jsonl in .*lambada_openai\)"


_REFUSALS = [_bad_json_line, _empty_line, _not_object, _not_utf8, _empty_file, _missing_field, _wrong_type,
             _label_not_binary, _labels_short, _labels_missing, _scored_file_missing, _train_without_labels,
             _labels_without_rows, _arc_key_not_label, _arc_choice_missing_text, _obqa_key_not_label, _wg_no_blank,
             _wg_two_blanks, _wg_no_answer, _wg_bad_answer, _wg_disagrees, _wg_label_not_12, _boolq_answer_not_bool,
             _hellaswag_label_range, _missing_folder]


@pytest.mark.parametrize("make", _REFUSALS, ids=[f.__name__.lstrip("_") for f in _REFUSALS])
def test_refusals(make, tmp_path):
    pattern = make(tmp_path)
    tasks = [p.name for p in tmp_path.iterdir()] + (["lambada_openai"] if make is _missing_folder else [])
    with pytest.raises(NormswapError, match=pattern) as err:
        check_tasks_data(tasks, tmp_path)
    assert "\n" not in str(err.value)


def test_unknown_task_and_folder(tmp_path):
    with pytest.raises(NormswapError, match=r"no offline reader for task 'mmlu'; known tasks: arc_challenge, arc_easy, boolq, hellaswag"):
        check_tasks_data(["piqa", "mmlu"], tmp_path)  # names are checked before any file
    with pytest.raises(NormswapError, match=r"tasks data folder .*nowhere not found"):
        check_tasks_data(["piqa"], tmp_path / "nowhere")


def test_config_refusals(tmp_path, tm, monkeypatch):
    _write("piqa", tmp_path)

    class NoTasks:
        task_index: dict = {}

    with pytest.raises(NormswapError, match="lm-eval has no task 'piqa'"):
        offline_task_config("piqa", tmp_path, NoTasks())
    # a newer lm-eval scoring another split than the table reads is caught, not silently followed
    monkeypatch.setitem(OFFLINE_TASKS, "piqa", taskfiles.OfflineTask(
        "piqa", "train", OFFLINE_TASKS["piqa"].splits, OFFLINE_TASKS["piqa"].reader, ("0", "1")))
    with pytest.raises(NormswapError, match=r"lm-eval scores split 'validation' of task piqa, but normswap reads 'train'"):
        offline_task_config("piqa", tmp_path, tm)
