"""`normswap inspect/convert/archs` as a user runs them: exit codes, one-line errors, outputs."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_model

CLI = [sys.executable, "-m", "normswap"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(d)
    return d


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip().startswith("normswap ")


def test_archs_json():
    proc = run("archs", "--format", "json")
    assert proc.returncode == 0
    types = {f["model_type"] for f in json.loads(proc.stdout)}
    assert {"gpt2", "gpt_neox", "gptj", "opt", "phi", "bloom", "falcon", "vit", "bert", "roberta", "distilbert", "electra", "xlm-roberta", "llama"} <= types


def test_inspect_json(tiny_gpt2):
    proc = run("inspect", tiny_gpt2, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["family"] == "gpt2" and rep["style"] == "pre" and rep["tied_head"] == "transformer.wte"
    assert rep["reader_check_passed"] is True
    assert [s["rmsnorm"] for s in rep["sites"]] == ["exact"] * 5


def test_convert_json_and_input_untouched(tiny_gpt2, tmp_path):
    before = _digest(tiny_gpt2)
    out = tmp_path / "rms"
    proc = run("convert", tiny_gpt2, "--to", "rmsnorm", "--fold", "--out", out, "--verify", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    for key in ("target", "exact", "sites", "max_abs_diff", "max_rel_diff", "seconds"):
        assert key in res
    assert res["exact"] is True and res["max_rel_diff"] < 1e-5 and res["verified"] is True
    assert {"path", "placement", "new_type", "folded"} <= set(res["sites"][0])
    assert _digest(tiny_gpt2) == before
    assert (out / "model.safetensors").is_file()


def test_convert_dyt_alpha_init(tiny_gpt2, tmp_path):
    proc = run("convert", tiny_gpt2, "--to", "dyt", "--alpha-init", "0.5", "--out", tmp_path / "d", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert {s["method"] for s in res["sites"]} == {"alpha-init"} and {s["alpha"] for s in res["sites"]} == {0.5}


def test_missing_model(tmp_path):
    _one_line_error(run("convert", tmp_path / "nope", "--to", "rmsnorm", "--out", tmp_path / "o"), "not found")
    assert not (tmp_path / "o").exists()


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(run("convert", tmp_path / "empty", "--to", "rmsnorm", "--out", tmp_path / "o"), "not a model folder")


def test_pickle_only_folder_refused(tmp_path, tiny_gpt2):
    d = tmp_path / "pkl"
    d.mkdir()
    (d / "config.json").write_text((tiny_gpt2 / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    _one_line_error(run("inspect", d), "safetensors only")


def test_corrupt_weights(tmp_path, tiny_gpt2):
    d = tmp_path / "corrupt"
    d.mkdir()
    for f in tiny_gpt2.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    _one_line_error(run("convert", d, "--to", "rmsnorm", "--out", tmp_path / "o"), "weights")
    assert not (tmp_path / "o").exists()


def test_t5_norms_are_found_by_behaviour(tmp_path):
    """T5LayerNorm is named a LayerNorm but computes an RMSNorm: discovery knows it by its output,
    so --to rmsnorm keeps each one's function (exact) instead of refusing or approximating."""
    from transformers import T5Config, T5Model

    d = tmp_path / "t5"
    T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100)).save_pretrained(d)
    proc = run("convert", d, "--to", "rmsnorm", "--out", tmp_path / "o", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["plan"] == "discovery" and res["exact"] is True and len(res["sites"]) == 7
    assert {s["method"] for s in res["sites"]} <= {"keep-gain", "fold-gain"} and res["max_rel_diff"] < 1e-5


def test_already_rmsnorm_folds_gains(tmp_path):
    d = tmp_path / "llama"
    tiny_model("llama").save_pretrained(d)
    proc = run("convert", d, "--to", "rmsnorm", "--out", tmp_path / "o", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["exact"] is True and all(s["folded"] and s["method"] == "fold-gain" for s in res["sites"])


def test_output_exists(tmp_path, tiny_gpt2):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(run("convert", tiny_gpt2, "--to", "rmsnorm", "--out", out), "exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_empty_calibration_text(tmp_path, tiny_gpt2):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _one_line_error(run("convert", tiny_gpt2, "--to", "dyt", "--calib-text", empty, "--out", tmp_path / "o"), "empty")
    assert not (tmp_path / "o").exists()


def test_unknown_target(tmp_path, tiny_gpt2):
    _one_line_error(run("convert", tiny_gpt2, "--to", "batchnorm", "--out", tmp_path / "o"), "unknown target")


def test_architecture_without_a_table_is_discovered(tmp_path):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    d = tmp_path / "neo"
    GPTNeoForCausalLM(GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global"], 2]], vocab_size=100, max_position_embeddings=64)).save_pretrained(d)
    proc = run("convert", d, "--to", "rmsnorm", "--tied-head", "untie", "--verify", "--out", tmp_path / "o", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["plan"] == "discovery" and res["family"] is None and res["exact"] is True and res["verified"] is True
    assert {s["method"] for s in res["sites"]} == {"exact"} and all(s["folded"] for s in res["sites"])
    assert res["max_rel_diff"] < 1e-5
    # --plan table has nothing to go on
    _one_line_error(run("convert", d, "--to", "rmsnorm", "--plan", "table", "--out", tmp_path / "o2"), "no family table for 'gpt_neo'")
    _one_line_error(run("convert", d, "--to", "rmsnorm", "--plan", "guess", "--out", tmp_path / "o3"), "unknown --plan 'guess'")


def test_unknown_option_is_a_usage_error_not_a_traceback():
    proc = run("convert", "--no-such-flag")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "No such option" in proc.stderr
