"""`normswap eval` end to end through the console entry point: outputs, files and one-line errors."""
from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from normswap.assets import asset
from test_eval_support import converted_folder, tiny_bert_folder, tiny_gpt2_folder, write_glue_dir
from cli_util import error_line, run_cli


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    gpt2 = tiny_gpt2_folder(root)
    bert = tiny_bert_folder(root)
    text = root / "valid.txt"
    valid = asset("wikitext2-tokenized", "valid.txt").read_text(encoding="utf-8")
    text.write_text(valid[:6000], encoding="utf-8")
    sts_file = root / "sts.tsv"
    lines = asset("glue", "STS-B", "dev.tsv").read_text().splitlines()
    sts_file.write_text("\n".join(lines[:1] + lines[1::60]) + "\n")  # header + 25 pairs
    return {"root": root, "gpt2": gpt2, "gpt2_rms": converted_folder(gpt2, "rmsnorm", root / "tiny-gpt2-rms"),
            "bert": bert, "bert_dyt": converted_folder(bert, "dyt", root / "tiny-bert-dyt"),
            "text": text, "sts": sts_file, "glue": write_glue_dir(root, 48, 24)}


def test_perplexity_json_and_results_folder(env, tmp_path, monkeypatch, capsys):
    """An exact RMSNorm conversion keeps the perplexity: delta ~ 0, same tokens and windows."""
    out = tmp_path / "res"
    code, stdout, _ = run_cli(["eval", env["gpt2_rms"], "--baseline", env["gpt2"], "--ppl", env["text"], "--max-length", 64,
                               "--stride", 32, "--out", out, "--format", "json"], monkeypatch, capsys)
    assert code == 0
    res = json.loads(stdout)
    p = res["ppl"]
    assert {"value", "baseline", "delta", "tokens", "max_length", "stride"} <= set(p)
    assert (p["max_length"], p["stride"], p["kind"]) == (64, 32, "causal")
    assert p["tokens"] == p["text_tokens"] - 1 > 1000
    assert p["value"] > 1000  # random tiny model: near the vocabulary size
    assert abs(p["delta"]) < 1e-3 * p["baseline"]
    # --device / --dtype default to auto: the results say what that meant (float32 checkpoints)
    assert res["dtype"] == res["compute_dtype"] == "float32" and res["device"] and res["placement"]["requested_dtype"] == "auto"
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["device"] == "auto" and saved["config"]["dtype"] == "auto"
    assert saved["config"]["stride"] == 32 and saved["config"]["model"] == str(env["gpt2_rms"])
    assert saved["versions"]["torch"] and saved["versions"]["transformers"] and saved["date"][:2] == "20"
    assert "git" in saved and saved["results"]["ppl"]["tokens"] == p["tokens"]
    assert (out / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sts_table_and_predictions(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    code, stdout, stderr = run_cli(["eval", env["bert_dyt"], "--baseline", env["bert"], "--sts", env["sts"], "--out", out], monkeypatch, capsys)
    assert code == 0, stderr
    assert stdout.splitlines()[0].split() == ["part", "task", "metric", "baseline", "converted", "delta"]
    assert re.search(r"^sts\s+zero-shot\s+spearman\s+\S+\s+\S+\s+[+-]\d", stdout, re.M)
    assert re.search(r"^sts\s+fidelity\s+mean cosine\s+\S+", stdout, re.M)
    assert "fidelity" in stdout and "25 pairs, mean pooling" in stdout
    rows = (out / "predictions" / "sts.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["index", "gold", "converted_cosine", "baseline_cosine"] and len(rows) == 26
    saved = json.loads((out / "results.json").read_text())["results"]["sts"]
    assert {"spearman", "pearson", "baseline_spearman", "fidelity"} <= set(saved)
    assert -1 <= saved["fidelity"] < 1


def test_glue_json_seeds_and_prediction_files(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    code, stdout, stderr = run_cli(["eval", env["bert_dyt"], "--baseline", env["bert"], "--glue", "sst2,stsb", "--glue-data", env["glue"],
                                    "--seeds", 2, "--epochs", 1, "--train-samples", 32, "--batch-size", 16, "--max-seq-length", 32,
                                    "--out", out, "--format", "json"], monkeypatch, capsys)
    assert code == 0, stderr
    g = json.loads(stdout)["glue"]
    assert set(g) == {"sst2", "stsb", "average"}
    assert set(g["stsb"]) == {"pearson", "spearmanr"}
    acc = g["sst2"]["accuracy"]
    assert {"mean", "std", "baseline_mean", "delta"} <= set(acc) and len(acc["seeds"]) == 2
    assert acc["delta"] == pytest.approx(acc["mean"] - acc["baseline_mean"])
    settings = json.loads(stdout)["glue_settings"]
    assert settings["train_samples"] == 32 and settings["data"]["sst2"] == {"train_examples": 32, "dev_examples": 24}
    for task in ("sst2", "stsb"):
        for seed in (0, 1):
            rows = (out / "predictions" / f"{task}_seed{seed}.tsv").read_text().splitlines()
            assert rows[0].split("\t") == ["row", "label", "converted", "baseline"] and len(rows) == 25
    assert rows[1].split("\t")[0] == "2"  # row numbers of the dev file (line 1 is the header)
    runs = json.loads((out / "results.json").read_text())["glue_runs"]
    assert len(runs) == 2 * 2 * 2 and {r["role"] for r in runs} == {"converted", "baseline"}


@pytest.mark.parametrize("case,needle", [
    ("unknown_task", "unknown GLUE task 'squad'"),
    ("missing_split", "has no dev.tsv"),
    ("empty_text", "is empty"),
    ("too_long", "--max-length 128 is above the 64 positions"),
    ("tokenizers", "use different tokenizers"),
    ("no_lm_head", "has no language-model head"),
    ("no_glue_data", "--glue needs --glue-data"),
    ("nothing", "nothing to evaluate"),
    ("missing_model", "not found"),
])
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, monkeypatch, capsys, case, needle):
    glue_dir = write_glue_dir(tmp_path, 8, 4)
    (glue_dir / "CoLA" / "dev.tsv").unlink()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    args = {
        "unknown_task": [env["bert"], "--glue", "sst2,squad", "--glue-data", glue_dir],
        "missing_split": [env["bert"], "--glue", "sst2,cola", "--glue-data", glue_dir],
        "empty_text": [env["gpt2_rms"], "--baseline", env["gpt2"], "--ppl", empty],
        "too_long": [env["gpt2_rms"], "--baseline", env["gpt2"], "--ppl", env["text"], "--max-length", 128],
        "tokenizers": [env["gpt2"], "--baseline", env["bert"], "--sts", env["sts"]],
        "no_lm_head": [env["bert_dyt"], "--baseline", env["bert"], "--ppl", env["text"]],
        "no_glue_data": [env["bert"], "--glue", "sst2"],
        "nothing": [env["bert"]],
        "missing_model": [tmp_path / "no-such-model", "--sts", env["sts"]],
    }[case]
    code, stdout, stderr = run_cli(["eval", *args], monkeypatch, capsys)
    assert needle in error_line(stderr, code)
    assert stdout == ""
