"""Disk use of outputs: a completed fine-tuning keeps its final model, not its training checkpoints
(unless asked); interrupted and time-limited runs keep them to resume; a recipe's shared
evaluation of the original is hard-linked into each job, not copied."""
from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

import normswap
from normswap.training import finetune
from normswap.training.checkpoint import CHECKPOINTS, drop_checkpoints, folder_bytes, latest_checkpoint
from normswap.training.tiny import make_tiny_pair, tiny_corpus

FAST = dict(objective="distill", batch_size=4, block_size=16, lr=3e-3, val_examples=4, log_every=1, save_every=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    teacher, student = make_tiny_pair(root, "causal")
    data = root / "corpus.txt"
    data.write_text(tiny_corpus(300))
    return {"teacher": teacher, "student": student, "data": data}


def _run(pair, out, **kw):
    return finetune(pair["student"], teacher=pair["teacher"], data=pair["data"], out=out, **{**FAST, "steps": 6, **kw})


def _model_bytes(folder) -> int:
    return (folder / "model.safetensors").stat().st_size


def test_completed_run_keeps_the_model_not_the_checkpoints(pair, tmp_path):
    kept = _run(pair, tmp_path / "kept", retain_checkpoints=True)
    dropped = _run(pair, tmp_path / "dropped")
    assert kept.status == dropped.status == "completed"
    assert latest_checkpoint(tmp_path / "kept") is not None and kept.checkpoint
    assert not (tmp_path / "dropped" / CHECKPOINTS).exists() and dropped.checkpoint is None
    assert json.loads((tmp_path / "dropped" / "finetune_result.json").read_text())["checkpoint"] is None
    # the same training, the same final model: only the checkpoints differ
    a, b = load_file(str(tmp_path / "kept" / "model.safetensors")), load_file(str(tmp_path / "dropped" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(normswap.load(tmp_path / "dropped"), torch.nn.Module)
    before, after = folder_bytes(tmp_path / "kept"), folder_bytes(tmp_path / "dropped")
    # each checkpoint holds the weights again and AdamW's two moments: ~3x the model, two kept
    ckpts = folder_bytes(tmp_path / "kept" / CHECKPOINTS)
    assert ckpts > 5 * _model_bytes(tmp_path / "dropped")
    assert before - after == pytest.approx(ckpts, abs=1000)  # the rest differs by a path in finetune_result.json
    assert after < 2 * _model_bytes(tmp_path / "dropped")


def _interrupt_at(n):
    import signal

    def on_step(step, info, model):
        if step == n:
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


def test_interrupted_run_keeps_its_checkpoint_resumes_then_drops_it(pair, tmp_path):
    out = tmp_path / "ft"
    part = _run(pair, out, on_step=_interrupt_at(3))
    assert part.status == "interrupted" and latest_checkpoint(out).name == "step-0000003"
    done = _run(pair, out, resume=True)
    assert done.status == "completed" and done.step == 6 and not (out / CHECKPOINTS).exists()
    steps = [json.loads(ln)["step"] for ln in (out / "train_log.jsonl").read_text().splitlines() if '"train"' in ln]
    assert steps == list(range(1, 7))  # it did resume: the log reads like one run


def test_time_limited_run_keeps_its_checkpoints(pair, tmp_path):
    res = _run(pair, tmp_path / "t", steps=50, max_seconds=1e-6)
    assert res.status == "time_limit" and latest_checkpoint(tmp_path / "t") is not None


def test_overwrite_replacement_drops_checkpoints_too(pair, tmp_path):
    out = tmp_path / "ft"
    _run(pair, out, steps=2)
    again = _run(pair, out, steps=4, overwrite=True)
    assert again.status == "completed" and again.step == 4
    assert not (out / CHECKPOINTS).exists()
    assert not list(tmp_path.glob(".ft.*")) and sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_fine_tuning_a_fine_tuned_model_keeps_its_own_training_files(pair, tmp_path):
    """The student's files are copied into the new model (tokenizer and such), but a fine-tuned
    student's checkpoints, log, plot and run files are its own run's, not this one's."""
    first = tmp_path / "first"
    _run(pair, first, steps=4, retain_checkpoints=True)  # checkpoints step-2 and step-4 stay in the student
    second = tmp_path / "second"
    _run({**pair, "student": first}, second, steps=2, save_every=1, keep_checkpoints=5, retain_checkpoints=True)
    assert sorted(p.name for p in (second / CHECKPOINTS).iterdir()) == ["step-0000001", "step-0000002"]  # its own only
    steps = [json.loads(ln)["step"] for ln in (second / "train_log.jsonl").read_text().splitlines() if '"train"' in ln]
    assert steps == [1, 2]
    assert json.loads((second / "finetune_config.json").read_text())["student"] == str(first)
    assert json.loads((second / "finetune_result.json").read_text())["step"] == 2
    assert (second / "tokenizer.json").is_file()


def test_drop_checkpoints_clears_the_trash_of_a_killed_deletion(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    trash = tmp_path / f".{CHECKPOINTS}.tmp-{dead}-abc123"  # renamed aside, then the process died mid-delete
    (trash / "step-0000002").mkdir(parents=True)
    (trash / "step-0000002" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / CHECKPOINTS / "step-0000004").mkdir(parents=True)
    (tmp_path / CHECKPOINTS / "step-0000004" / "optimizer.pt").write_bytes(b"y" * 300)
    assert drop_checkpoints(tmp_path) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert drop_checkpoints(tmp_path) == 0  # nothing left: nothing to do


# ------------------------------------------------------------------------------------------ recipes


def test_link_tree_links_where_it_can_and_copies_where_it_cannot(tmp_path, monkeypatch):
    from normswap.recipes import runner

    src = tmp_path / "src"
    (src / "lm_eval").mkdir(parents=True)
    (src / "results.json").write_text('{"results": {}}')
    (src / "lm_eval" / "samples.jsonl").write_text("{}\n" * 10)
    runner.link_tree(src, tmp_path / "linked")
    for rel in ("results.json", "lm_eval/samples.jsonl"):
        assert os.path.samefile(src / rel, tmp_path / "linked" / rel)

    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(runner.os, "link", no_links)
    runner.link_tree(src, tmp_path / "copied")
    for rel in ("results.json", "lm_eval/samples.jsonl"):
        assert not os.path.samefile(src / rel, tmp_path / "copied" / rel)
        assert (tmp_path / "copied" / rel).read_bytes() == (src / rel).read_bytes()


def test_recipe_shares_the_original_evaluation_by_hard_links(tmp_path):
    from test_eval_support import tiny_gpt2_folder

    from normswap.assets import asset
    from normswap.recipes import load_recipe, run_recipe

    valid = asset("wikitext2-tokenized", "valid.txt")
    if not valid.is_file():
        pytest.skip("wikitext2 asset missing")
    model = tiny_gpt2_folder(tmp_path)
    text = tmp_path / "small.txt"
    text.write_text(valid.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    job = f"    model: {model}\n    eval:\n      ppl: {{data: {text}, max_length: 32, max_tokens: 128}}\n      models: [original]\n"
    (tmp_path / "r.yaml").write_text(f"name: r\nruns:\n  - name: a\n{job}  - name: b\n{job}")
    run_recipe(load_recipe(tmp_path / "r.yaml"), output_dir=tmp_path / "runs")
    run = tmp_path / "runs" / "r"
    a, b = run / "a" / "eval" / "original" / "results.json", run / "b" / "eval" / "original" / "results.json"
    assert json.loads(a.read_text())["results"]["ppl"] == json.loads(b.read_text())["results"]["ppl"]
    assert os.path.samefile(a, b)  # one file on disk, two names
