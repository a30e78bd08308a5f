"""Zero-shot tasks through lm-evaluation-harness: normswap's numbers are lm-eval's own, the offline
task files feed lm-eval's task definitions, deltas are paired, and mistakes are one-line errors."""
from __future__ import annotations

import json
import math
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from normswap.assets import asset
from cli_util import refused, run_cli
from test_eval_support import converted_folder, tiny_bert_folder, tiny_gpt2_folder

lm_eval = pytest.importorskip("lm_eval")

DOCS = {"piqa": 12, "lambada_openai": 10}


def _head(src, dst, n):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    data = root / "tasks"
    z = asset("zeroshot")
    _head(z / "piqa" / "valid.jsonl", data / "piqa" / "valid.jsonl", DOCS["piqa"])
    _head(z / "piqa" / "valid-labels.lst", data / "piqa" / "valid-labels.lst", DOCS["piqa"])
    _head(z / "lambada_openai" / "lambada_test.jsonl", data / "lambada_openai" / "lambada_test.jsonl", DOCS["lambada_openai"])
    gpt2 = tiny_gpt2_folder(root)
    return {"root": root, "data": data, "gpt2": gpt2, "gpt2_rms": converted_folder(gpt2, "rmsnorm", root / "tiny-gpt2-rms"),
            "gpt2_other": tiny_gpt2_folder(root, seed=1, name="tiny-gpt2-b")}


def _eval(env, model, baseline=None, tasks="piqa,lambada_openai", **kw):
    from normswap.evaluation.runner import EvalRequest, run_eval
    from normswap.evaluation.zeroshot import TaskSettings

    settings = TaskSettings(names=tasks, data=str(env["data"]), **kw)
    return run_eval(EvalRequest(model=str(model), baseline=str(baseline) if baseline else None, tasks=settings, progress=False))


def test_metrics_equal_lm_eval_run_directly(env):
    """The same plain model and data through lm-eval's own evaluator give identical figures."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from normswap.evaluation import taskfiles, zeroshot

    res = _eval(env, env["gpt2"])
    manager = zeroshot.task_manager(None, list(DOCS), str(env["data"]))
    tok = AutoTokenizer.from_pretrained(env["gpt2"])
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(env["gpt2"]).eval()
    direct = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu"),
                                     tasks=[taskfiles.offline_task_config(t, env["data"], manager) for t in DOCS],
                                     task_manager=manager, bootstrap_iters=1000)
    for task, n in DOCS.items():
        row = direct["results"][task]
        assert res["tasks"][task]["documents"] == n
        for metric in (("perplexity", "acc") if task == "lambada_openai" else ("acc", "acc_norm")):
            cell = res["tasks"][task][metric]
            assert cell["value"] == row[f"{metric},none"], (task, metric)
            stderr = row.get(f"{metric}_stderr,none")
            if isinstance(stderr, float) and math.isfinite(stderr):
                assert cell["stderr"] == pytest.approx(stderr, rel=1e-12), (task, metric)


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), lm-eval's tokenisation: the pair encoded whole, the context's
    tokens split off its front; the oldest context tokens dropped to fit the model's positions."""
    whole = tok(context + continuation)["input_ids"]
    n_cont = len(whole) - len(tok(context)["input_ids"])
    whole = whole[-(model.config.n_positions + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
    return float(sum(logits[i - 1, whole[i]] for i in range(len(whole) - n_cont, len(whole))))


def test_piqa_accuracy_against_an_independent_loop(env):
    """The offline PIQA files reach lm-eval's prompt, choices and gold: acc and acc_norm equal a
    plain loop over the documents (prompt "Question: <goal>\\nAnswer:", choices " <sol>")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = _eval(env, env["gpt2"], tasks="piqa")
    tok = AutoTokenizer.from_pretrained(env["gpt2"])
    model = AutoModelForCausalLM.from_pretrained(env["gpt2"]).eval()
    rows = [json.loads(line) for line in (env["data"] / "piqa" / "valid.jsonl").read_text().splitlines()]
    labels = [int(x) for x in (env["data"] / "piqa" / "valid-labels.lst").read_text().split()]
    acc, acc_norm = [], []
    for r, gold in zip(rows, labels):
        lls = [_loglik(model, tok, f"Question: {r['goal']}\nAnswer:", " " + s) for s in (r["sol1"], r["sol2"])]
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax([ll / len(s) for ll, s in zip(lls, (r["sol1"], r["sol2"]))]) == gold))
    assert res["tasks"]["piqa"]["acc"]["value"] == pytest.approx(np.mean(acc))
    assert res["tasks"]["piqa"]["acc_norm"]["value"] == pytest.approx(np.mean(acc_norm))


def test_paired_deltas(env):
    """A model against itself: delta 0 and the interval [0, 0]. The exact RMSNorm conversion keeps
    the figures; a different random model gets a paired interval around its delta."""
    same = _eval(env, env["gpt2"], baseline=env["gpt2"], tasks="piqa")["tasks"]["piqa"]["acc"]
    assert same["delta"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["excludes_zero"] is False
    rms = _eval(env, env["gpt2_rms"], baseline=env["gpt2"])["tasks"]
    assert rms["piqa"]["acc"]["delta"] == 0.0
    assert abs(rms["lambada_openai"]["perplexity"]["delta"]) < 1e-3 * rms["lambada_openai"]["perplexity"]["baseline"]
    other = _eval(env, env["gpt2_other"], baseline=env["gpt2"], tasks="lambada_openai")["tasks"]["lambada_openai"]["perplexity"]
    lo, hi = other["ci95"]
    assert lo <= other["delta"] <= hi and lo < hi
    assert other["excludes_zero"] == (lo > 0 or hi < 0)


def test_cli_json_files_and_chart(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    code, stdout, stderr = run_cli(["eval", env["gpt2_rms"], "--baseline", env["gpt2"], "--tasks", "piqa,lambada_openai", "--tasks-data",
                                    env["data"], "--limit", 6, "--batch-size", 4, "--out", out, "--format", "json"], monkeypatch, capsys)
    assert code == 0, stderr
    res = json.loads(stdout)  # lm-eval's own print()s (its perplexity bootstrap) stay off stdout
    cell = res["tasks"]["piqa"]["acc"]
    assert {"value", "stderr", "baseline", "baseline_stderr", "delta", "ci95", "excludes_zero"} <= set(cell)
    assert res["tasks"]["piqa"]["documents"] == 6 and res["tasks_settings"]["limit"] == 6
    own = json.loads((out / "lm_eval" / "converted.json").read_text())
    assert own["results"]["piqa"]["acc,none"] == cell["value"]
    assert len((out / "lm_eval" / "baseline_samples_piqa.jsonl").read_text().splitlines()) == 6
    assert (out / "deltas.png").read_bytes()[:4] == b"\x89PNG"
    code, stdout, stderr = run_cli(["eval", env["gpt2_rms"], "--baseline", env["gpt2"], "--tasks", "piqa", "--tasks-data", env["data"],
                                    "--limit", 4], monkeypatch, capsys)
    assert code == 0, stderr
    assert "zero-shot" in stdout and "piqa" in stdout and "delta 95% CI" in stdout and "first 4 documents" in stdout


def test_progress_lines_off_a_terminal(env, caplog):
    import logging

    from normswap.evaluation import zeroshot

    bar = zeroshot.RequestProgress(models=2, enabled=False, every_s=0.0)
    bar.start_model()
    bar.add_requests(5)
    with caplog.at_level(logging.INFO, logger="normswap"):
        bar.advance()
    bar.close()
    assert bar.total == 10 and "zero-shot: 1/10 requests" in caplog.text and "eta" in caplog.text


def test_include_path_task(env, tmp_path):
    """A user's own lm-eval task YAML (local JSON data) runs offline beside the mapped ones."""
    folder = tmp_path / "mytasks"
    folder.mkdir()
    data = tmp_path / "capitals.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"q": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0},
        {"q": "The capital of Italy is", "choices": ["Paris", "Rome"], "gold": 1},
        {"q": "The capital of Spain is", "choices": ["Madrid", "Oslo"], "gold": 0}]) + "\n")
    (folder / "capitals.yaml").write_text(
        "task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    res = _eval(env, env["gpt2"], baseline=env["gpt2"], tasks="capitals,piqa", include_path=str(folder))
    assert res["tasks"]["capitals"]["documents"] == 3 and res["tasks"]["capitals"]["acc"]["delta"] == 0.0
    assert res["tasks"]["piqa"]["documents"] == DOCS["piqa"]


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "piqa_nope"], "unknown task 'piqa_nope'"),
    (["--tasks", "piqa"], "give --tasks-data DIR"),
    (["--tasks", "piqa,piqa"], "more than once"),
    (["--limit", "5"], "--limit needs --tasks"),
    (["--tasks", "piqa", "--limit", "0", "--tasks-data", "{data}"], "--limit must be positive"),
    (["--tasks", "arc_easy", "--tasks-data", "{data}"], "arc_easy"),
    (["--tasks", "piqa", "--tasks-data", "{root}/nowhere"], "is not a folder"),
    (["--tasks", "lambada_openai", "--tasks-data", "{data}", "--num-fewshot", "2"], "would come from the documents being scored"),
])
def test_refused(env, args, needle, monkeypatch, capsys):
    args = [a.format(data=env["data"], root=env["root"]) for a in args]
    code, _, err = run_cli(["eval", env["gpt2"], *args], monkeypatch, capsys)
    refused(code, err, needle)


def test_masked_lm_refused(env, tmp_path, monkeypatch, capsys):
    bert = tiny_bert_folder(tmp_path)
    code, _, err = run_cli(["eval", bert, "--tasks", "piqa", "--tasks-data", env["data"]], monkeypatch, capsys)
    refused(code, err, "needs a causal language model")


def test_recipe_tasks_with_paired_intervals(env, tmp_path, monkeypatch, capsys):
    """`eval: {tasks: ...}` in a recipe: the report shows each task's figures and the paired interval."""
    recipe = tmp_path / "zs.yaml"
    recipe.write_text(f"name: zs\nmodel: {env['gpt2']}\nstages: [convert, eval]\nconvert: {{to: rmsnorm, calib_tokens: 256}}\n"
                      f"eval: {{models: [original, converted], tasks: {{names: [piqa], data: {env['data']}, limit: 8}}}}\n")
    code, stdout, stderr = run_cli(["recipe", "run", recipe, "--output-dir", tmp_path / "runs"], monkeypatch, capsys)
    assert code == 0, stderr
    out = tmp_path / "runs" / "zs"
    report = (out / "report.md").read_text()
    assert "piqa acc" in report and "[+0.0000, +0.0000]" in report
    job = json.loads((out / "results.json").read_text())["jobs"][0]
    assert job["metrics"]["tasks_piqa_acc"]["ci95_converted"] == [0.0, 0.0]
