"""`normswap finetune` on the command line: results on stdout, one-line errors, exit codes."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normswap.training.tiny import make_tiny_pair, tiny_corpus
from cli_util import error_line, run_cli

NORMSWAP = str(Path(sys.executable).parent / "normswap")
FAST = ["--batch-size", "4", "--block-size", "16", "--val-examples", "4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    teacher, student = make_tiny_pair(root, "causal")
    enc_teacher, enc_student = make_tiny_pair(root, "encoder")
    other_teacher, _ = make_tiny_pair(root, "causal", shuffled_vocab=True)
    data = root / "corpus.txt"
    data.write_text(tiny_corpus(200))
    return {"teacher": teacher, "student": student, "enc_teacher": enc_teacher, "enc_student": enc_student, "other_teacher": other_teacher, "data": data}


def test_json_result_on_stdout(pairs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ft"
    code, stdout, _ = run_cli(["finetune", str(pairs["student"]), "--teacher", str(pairs["teacher"]), "--data", str(pairs["data"]),
                               "--objective", "distill", "--steps", "3", "--out", str(out), "--format", "json", *FAST],
                              monkeypatch, capsys)
    assert code == 0
    result = json.loads(stdout)
    assert result["status"] == "completed" and result["step"] == 3 and result["objective"] == {"distill": 1.0}
    assert "val_loss" in result["val"] and (out / "config.json").is_file()


def test_existing_output_folder_needs_overwrite_or_resume(pairs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["finetune", str(pairs["student"]), "--data", str(pairs["data"]), "--steps", "2", "--out", str(out), *FAST]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "exists" in error_line(err) and "--overwrite" in err and (out / "keep.txt").exists()
    code, _, err = run_cli(args + ["--resume"], monkeypatch, capsys)
    assert code == 2 and "nothing to resume" in error_line(err)
    code, _, _ = run_cli(args + ["--overwrite"], monkeypatch, capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_different_vocabularies(pairs, tmp_path, monkeypatch, capsys):
    # same vocabulary size, different tokens
    code, _, err = run_cli(["finetune", str(pairs["student"]), "--teacher", str(pairs["other_teacher"]), "--data", str(pairs["data"]),
                            "--objective", "distill", "--steps", "2", "--out", str(tmp_path / "o"), *FAST], monkeypatch, capsys)
    assert code == 2 and "different vocabularies" in error_line(err) and "tokenizers" in err
    # a bare encoder teacher has no logits for a causal student
    code, _, err = run_cli(["finetune", str(pairs["student"]), "--teacher", str(pairs["enc_teacher"]), "--data", str(pairs["data"]),
                            "--objective", "distill", "--steps", "2", "--out", str(tmp_path / "o"), *FAST], monkeypatch, capsys)
    assert code == 2 and "no LM head" in error_line(err)
    standin = Path(os.environ.get("NORMSWAP_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets")) / "gpt2-standin-wt2"
    if standin.is_dir():
        code, _, err = run_cli(["finetune", str(pairs["student"]), "--teacher", str(standin), "--data", str(pairs["data"]),
                                "--objective", "distill", "--steps", "2", "--out", str(tmp_path / "o2"), *FAST], monkeypatch, capsys)
        assert code == 2 and "50257" in error_line(err)


def test_empty_data_and_tiny_budget(pairs, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    base = ["finetune", str(pairs["student"]), "--out", str(tmp_path / "o"), *FAST]
    code, _, err = run_cli(base + ["--data", str(empty), "--steps", "2"], monkeypatch, capsys)
    assert code == 2 and "empty" in error_line(err)
    code, _, err = run_cli(base + ["--data", str(pairs["data"]), "--tokens", "40"], monkeypatch, capsys)
    assert code == 2 and "smaller than one batch" in error_line(err)
    code, _, err = run_cli(base + ["--data", str(pairs["data"])], monkeypatch, capsys)
    assert code == 2 and "--steps" in error_line(err)
    code, _, err = run_cli(base + ["--data", str(pairs["data"]), "--steps", "2", "--objective", "distill"], monkeypatch, capsys)
    assert code == 2 and "--teacher" in error_line(err)
    assert not (tmp_path / "o").exists()  # nothing written for a refused run


def test_bare_encoder_distils_hidden_states(pairs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "enc"
    code, stdout, err = run_cli(["finetune", str(pairs["enc_student"]), "--teacher", str(pairs["enc_teacher"]), "--data", str(pairs["data"]),
                                 "--objective", "distill", "--steps", "3", "--out", str(out), "--format", "json", *FAST],
                                monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["config"]["packing"] == "lines" and "val_distill" in result["val"]
    code, _, err = run_cli(["finetune", str(pairs["enc_student"]), "--data", str(pairs["data"]), "--objective", "lm",
                            "--steps", "3", "--out", str(tmp_path / "enc2"), *FAST], monkeypatch, capsys)
    assert code == 2 and "no LM head" in error_line(err)


def test_subprocess_human_table_and_stderr_progress(pairs, tmp_path):
    """The installed console script: human table on stdout, logs on stderr (no progress bar without a TTY)."""
    out = tmp_path / "sub"
    proc = subprocess.run([NORMSWAP, "finetune", str(pairs["student"]), "--teacher", str(pairs["teacher"]), "--data", str(pairs["data"]),
                           "--objective", "lm=0.5,distill=0.5", "--steps", "2", "--out", str(out), *FAST],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "status" in proc.stdout and "completed" in proc.stdout and "normswap:" not in proc.stdout
    assert "step 2/2" in proc.stderr
    assert (out / "train_log.jsonl").is_file() and (out / "loss_curve.png").is_file()


def test_device_and_dtype_options(pairs, tmp_path, monkeypatch, capsys):
    base = ["finetune", str(pairs["student"]), "--teacher", str(pairs["teacher"]), "--data", str(pairs["data"]),
            "--objective", "distill", "--steps", "2", "--format", "json", *FAST]
    # the forms are checked before anything loads; a named device that is absent is one error line too
    code, _, err = run_cli([*base, "--out", str(tmp_path / "a"), "--device", "gpu"], monkeypatch, capsys)
    assert code == 2 and "unknown --device 'gpu'" in error_line(err)
    code, _, err = run_cli([*base, "--out", str(tmp_path / "a"), "--dtype", "float64"], monkeypatch, capsys)
    assert code == 2 and "unknown --dtype 'float64'" in error_line(err)
    if not torch.cuda.is_available():
        code, _, err = run_cli([*base, "--out", str(tmp_path / "a"), "--device", "cuda:0"], monkeypatch, capsys)
        assert code == 2 and "no CUDA device" in error_line(err)
    assert not (tmp_path / "a").exists()
    # explicit cpu, the checkpoint's own dtype: stated in the result
    code, out, err = run_cli([*base, "--out", str(tmp_path / "cpu"), "--device", "cpu"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out)
    assert (res["device"], res["dtype"], res["precision"], res["teacher_dtype"]) == ("cpu", "float32", "float32", "float32")
    assert res["config"]["device"] == "cpu" and res["config"]["dtype"] == "auto"
    assert res["distributed"] == {"processes": 1, "type": "single"}
    # bfloat16: saved in bfloat16, computed in bf16 (autocast), the teacher in bfloat16; it loads back
    code, out, err = run_cli([*base, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out)
    assert (res["dtype"], res["precision"], res["teacher_dtype"]) == ("bfloat16", "bfloat16", "bfloat16")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    from normswap.loading import load_pretrained

    assert next(load_pretrained(str(tmp_path / "bf16"), dtype="auto").parameters()).dtype == torch.bfloat16


def test_gradient_checkpointing(pairs, tmp_path, monkeypatch, capsys):
    base = ["finetune", str(pairs["student"]), "--data", str(pairs["data"]), "--steps", "3", "--format", "json", "--seed", "3", *FAST]
    code, out, err = run_cli([*base, "--out", str(tmp_path / "gc"), "--gradient-checkpointing"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["gradient_checkpointing"] is True
    code, out, err = run_cli([*base, "--out", str(tmp_path / "plain")], monkeypatch, capsys)
    assert code == 0, err
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "gc" / "model.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
    for k in a:  # recomputation changes memory, not the arithmetic
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # a model class without it: one error line, nothing written
    from transformers import GPT2LMHeadModel

    monkeypatch.setattr(GPT2LMHeadModel, "supports_gradient_checkpointing", False)
    code, _, err = run_cli([*base, "--out", str(tmp_path / "no"), "--gradient-checkpointing"], monkeypatch, capsys)
    assert code == 2 and "does not support gradient checkpointing" in error_line(err)
    assert not (tmp_path / "no").exists()
