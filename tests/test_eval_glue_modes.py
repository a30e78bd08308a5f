"""`normswap eval --glue` protocols from the command line: the probe mode, the reference fine-tuning
protocol's per-task settings, explicit options overriding them, and the output saying which
protocol produced a number."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from cli_util import refused, run_cli
from normswap.evaluation import glue, glue_data, glue_probe
from normswap.evaluation.runner import EvalRequest, glue_settings_for
from test_eval_support import converted_folder, tiny_bert_folder, write_glue_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("gluemodes")
    bert = tiny_bert_folder(root)
    return {"bert": bert, "bert_dyt": converted_folder(bert, "dyt", root / "tiny-bert-dyt"), "glue": write_glue_dir(root, 60, 30)}


def test_settings_per_task():
    sst2, rte = glue_data.task_spec("sst2"), glue_data.task_spec("rte")
    ref = EvalRequest(model="m", glue_protocol="reference", glue_given={"seeds": 3})
    assert glue_settings_for(ref, sst2) == glue.GlueSettings(**{**glue.REFERENCE_PROTOCOL["sst2"].to_dict(), "seeds": 3})
    assert glue_settings_for(ref, rte).epochs == glue.REFERENCE_PROTOCOL["rte"].epochs
    probe = EvalRequest(model="m", glue_mode="probe", glue_given={"train_samples": 100})
    assert glue_settings_for(probe, sst2).train_samples == 100
    assert glue_settings_for(probe, sst2).max_seq_length == glue_probe.PROBE_PROTOCOL["sst2"].max_seq_length
    custom = EvalRequest(model="m", glue_settings=glue.GlueSettings(epochs=1.5))
    assert glue_settings_for(custom, rte).epochs == 1.5


def test_probe_mode_from_the_cli(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    code, stdout, stderr = run_cli(["eval", env["bert_dyt"], "--baseline", env["bert"], "--glue", "sst2,stsb", "--glue-data", env["glue"],
                                    "--glue-mode", "probe", "--seeds", 2, "--train-samples", 50, "--out", out, "--format", "json"],
                                   monkeypatch, capsys)
    assert code == 0, stderr
    res = json.loads(stdout)
    st = res["glue_settings"]
    assert st["protocol"] == "probe" and st["mode"] == "probe" and st["tasks"]["sst2"]["train_samples"] == 50
    acc = res["glue"]["sst2"]["accuracy"]
    assert len(acc["seeds"]) == 2 and acc["delta_ci95"][0] <= acc["delta"] <= acc["delta_ci95"][1]
    assert "noise_floor" in acc and isinstance(acc["within_noise"], bool)
    code, stdout, stderr = run_cli(["eval", env["bert_dyt"], "--baseline", env["bert"], "--glue", "sst2", "--glue-data", env["glue"],
                                    "--glue-mode", "probe", "--seeds", 2, "--train-samples", 50], monkeypatch, capsys)
    assert code == 0, stderr
    assert "glue (probe)" in stdout and "delta 95% CI" in stdout and "paired bootstrap over dev items" in stdout


@pytest.mark.parametrize("args, needle", [
    (["--glue-mode", "probe", "--epochs", "2"], "--epochs applies to fine-tuning, not to --glue-mode probe"),
    (["--glue-mode", "probe", "--glue-protocol", "reference"], "is a fine-tuning protocol"),
    (["--glue-protocol", "fast"], "unknown --glue-protocol 'fast'"),
    (["--glue-mode", "linear"], "unknown --glue-mode 'linear'"),
])
def test_refused(env, args, needle, monkeypatch, capsys):
    code, _, err = run_cli(["eval", env["bert"], "--glue", "sst2", "--glue-data", env["glue"], *args], monkeypatch, capsys)
    refused(code, err, needle)
