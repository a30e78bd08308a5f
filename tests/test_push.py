"""`normswap push`: the upload folder, the card, and the arguments of the (monkeypatched) Hub calls.
No test touches the network; the token must never show up in output or logs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import normswap
from normswap.errors import NormswapError
from normswap.export import push
from normswap.export.card import build_card, looks_like_hub_id
from normswap.loading import save
from tiny_models import tiny_model

TOKEN = "hf_SECRETtoken1234567890abcdef"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    model, result = normswap.convert(tiny_model("gpt2"), "dyt", alpha_init=0.7)
    out = tmp_path_factory.mktemp("push") / "job" / "finetune"
    save(model, out, result.record)
    # a recipe job's results.json beside it, as `normswap recipe run` writes it
    job = {"name": "job", "model": "gpt2", "target": "dyt", "models": {"original": "gpt2", "converted": str(out.parent / "convert"), "recovered": str(out)},
           "config": {"eval": {"ppl": {"data": "/data/wikitext2-tokenized/valid.txt"}}},
           "metrics": {"ppl": {"label": "perplexity", "better": "lower", "note": "8192 tokens", "original": 30.0, "converted": 40.0,
                               "recovered": 31.5, "delta_converted": 10.0, "delta_recovered": 1.5},
                       "glue_sst2_accuracy": {"label": "GLUE sst2 accuracy", "better": "higher", "note": "", "original": 0.9,
                                              "converted": 0.8, "recovered": 0.88, "delta_converted": -0.1, "delta_recovered": -0.02}}}
    (out.parent / "results.json").write_text(json.dumps(job))
    return out


class _FakeApi:
    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **kw):
        _FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kw):
        _FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        _FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        kw["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        kw["card"] = (folder / "README.md").read_text()
        kw["config"] = json.loads((folder / "config.json").read_text())
        _FakeApi.calls.append(("upload_folder", kw))

        class Info:
            commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/abc"
        return Info()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return _FakeApi.calls


def _card_meta(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_push_calls_the_hub_with_the_right_arguments(converted, fake_hub):
    info = push(converted, "me/tiny-dyt", private=True, revision="v1")
    names = [c[0] for c in fake_hub]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert fake_hub[0][1]["token"] == TOKEN  # taken from the environment
    assert fake_hub[1][1] == {"repo_id": "me/tiny-dyt", "private": True, "exist_ok": True, "repo_type": "model"}
    assert fake_hub[2][1]["branch"] == "v1"
    up = fake_hub[3][1]
    assert up["repo_id"] == "me/tiny-dyt" and up["revision"] == "v1" and up["repo_type"] == "model"
    assert {"README.md", "config.json", "model.safetensors", "modeling_normswap.py"} <= set(up["files"])
    assert "results.json" not in up["files"]
    assert up["config"]["auto_map"]["AutoModelForCausalLM"] == "modeling_normswap.NormswapForCausalLM"
    assert info["url"].endswith("/commit/abc") and not Path(up["folder_path"]).exists()  # the temporary export is gone


def test_card_metadata_and_model_index(converted, fake_hub):
    push(converted, "me/tiny-dyt")
    card = fake_hub[-1][1]["card"]
    meta = _card_meta(card)
    assert {"normswap", "dyt", "gpt2"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # the tiny model came from memory, not from a Hub id
    results = meta["model-index"][0]["results"]
    metrics = {(m["type"], m["value"]) for r in results for m in r["metrics"]}
    assert ("perplexity", 31.5) in metrics and ("perplexity_delta", 1.5) in metrics  # the recovered model's figures
    assert ("accuracy_delta", -0.02) in metrics
    assert "trust_remote_code=True" in card and "| perplexity | 30 | 40 | 31.5 | +10 | +1.5 |" in card


def test_card_names_a_hub_base_model(converted, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(converted, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["normswap"]["source"] = {"model": "gpt2", "revision": None}
    (folder / "config.json").write_text(json.dumps(cfg))
    meta = _card_meta(build_card(folder, "me/x"))
    assert meta["base_model"] == "gpt2"
    assert looks_like_hub_id("EleutherAI/pythia-160m") and not looks_like_hub_id("/abs/path") and not looks_like_hub_id("a/b/c")


def test_dry_run_writes_the_folder_and_uploads_nothing(converted, fake_hub, tmp_path):
    out = tmp_path / "export"
    info = push(converted, "me/tiny-dyt", dry_run=True, export_dir=out)
    assert fake_hub == []
    assert info["folder"] == str(out) and (out / "README.md").is_file() and (out / "modeling_normswap.py").is_file()
    assert info["results"] == "job" and info["role"] == "recovered"
    push(converted, "me/tiny-dyt", dry_run=True, export_dir=out)  # an earlier export is replaced


def test_push_without_token_and_bad_input(converted, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(NormswapError, match="no Hugging Face token"):
        push(converted, "me/x")
    plain = tmp_path / "plain"
    tiny_model("gpt2").save_pretrained(plain)
    with pytest.raises(NormswapError, match="not a converted checkpoint"):
        push(plain, "me/x", dry_run=True)
    with pytest.raises(NormswapError, match="not a Hub repository id"):
        push(converted, "me/x/y", dry_run=True, export_dir=tmp_path / "e")


def test_token_never_shown_even_when_the_hub_echoes_it(converted, fake_hub, monkeypatch, tmp_path):
    from normswap.cli import app

    def boom(self, **kw):
        raise RuntimeError(f"401 Unauthorized for token {TOKEN}")

    runner = CliRunner()
    ok = runner.invoke(app, ["push", str(converted), "me/tiny-dyt", "--private"])
    assert ok.exit_code == 0, ok.output
    monkeypatch.setattr(_FakeApi, "upload_folder", boom)
    bad = runner.invoke(app, ["-v", "push", str(converted), "me/tiny-dyt"])
    assert bad.exit_code != 0 and isinstance(bad.exception, NormswapError)
    shown = ok.output + bad.output + str(bad.exception)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            shown += f.read_text(errors="ignore")
    assert "***" in str(bad.exception)
    assert TOKEN not in shown


def _cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "normswap", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_push_error_is_one_line(converted, tmp_path):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}  # no token anywhere
    proc = _cli("push", converted, "me/x", env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "no Hugging Face token" in errors[0], proc.stderr


def test_cli_dry_run_prints_where(converted, fake_hub, tmp_path):
    from normswap.cli import app

    res = CliRunner().invoke(app, ["push", str(converted), "me/tiny", "--dry-run", "--export-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "out") in res.output and (tmp_path / "out" / "README.md").is_file() and fake_hub == []
    bad = CliRunner().invoke(app, ["push", str(tmp_path), "me/x", "--dry-run"])
    assert bad.exit_code != 0 and "not a model folder" in str(bad.exception)
