"""The training loop end to end on tiny teacher/student pairs: saving, resume, NaN guard, Ctrl-C,
progressive swapping, parameter selection."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

import normswap
from normswap.modules import DyT
from normswap.training import TrainingDiverged, finetune
from normswap.training.checkpoint import latest_checkpoint, list_checkpoints
from normswap.training.progressive import FadeNorm, Schedule
from normswap.training.tiny import make_tiny_pair, tiny_corpus

FAST = dict(batch_size=4, block_size=16, lr=3e-3, val_examples=4, log_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    teacher, student = make_tiny_pair(root, "causal")
    data = root / "corpus.txt"
    data.write_text(tiny_corpus(300))
    return teacher, student, data


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_distill_run_writes_a_loadable_model_log_and_plot(pair, tmp_path):
    teacher, student, data = pair
    out = tmp_path / "ft"
    res = finetune(student, teacher=teacher, data=data, out=out, objective="distill", steps=12, eval_every=4, **FAST)
    assert res.status == "completed" and res.step == 12 and res.tokens == 12 * 4 * 16
    model = normswap.load(out)  # strict load of the normswap format
    assert any(isinstance(m, DyT) for m in model.modules())
    record, _ = normswap.loading.read_record(out)
    assert record.source["finetune"]["steps"] == 12 and record.source["finetune"]["objective"] == {"distill": 1.0}
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    vals = [e["val_loss"] for e in log if e["kind"] == "val"]
    assert len([e for e in log if e["kind"] == "train"]) == 12 and len(vals) == 3
    assert vals[-1] < vals[0]  # distillation pulls the student towards the teacher
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "tokenizer.json").is_file()
    before, after = _weights(student), _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _interrupt_at(step_to_stop: int):
    def on_step(step: int, info: dict, model) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C path: handler sets a flag
    return on_step


def test_interrupted_then_resumed_run_equals_uninterrupted_run(pair, tmp_path):
    teacher, student, data = pair
    # dropout on, so the RNG state must be restored too; accumulation and a mixed objective on
    settings = dict(objective="lm=0.5,distill=0.5", steps=10, grad_accum=2, save_every=4, dropout=0.1, **FAST)
    full = finetune(student, teacher=teacher, data=data, out=tmp_path / "a", **settings)
    part = finetune(student, teacher=teacher, data=data, out=tmp_path / "b", on_step=_interrupt_at(6), **settings)
    assert part.status == "interrupted" and part.step == 6
    assert latest_checkpoint(tmp_path / "b").name == "step-0000006"
    assert not (tmp_path / "b" / "config.json").exists()  # no final model for an unfinished run
    with pytest.raises(normswap.NormswapError, match="exists"):
        finetune(student, teacher=teacher, data=data, out=tmp_path / "b", **settings)
    done = finetune(student, teacher=teacher, data=data, out=tmp_path / "b", resume=True, **settings)
    assert done.status == "completed" and done.step == 10 and done.tokens == full.tokens
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    # the resumed log reads like one run
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, 11))
    # a different seed would change the data order: refused on resume
    part2 = finetune(student, teacher=teacher, data=data, out=tmp_path / "c", on_step=_interrupt_at(2), **settings)
    assert part2.status == "interrupted"
    with pytest.raises(normswap.NormswapError, match="seed"):
        finetune(student, teacher=teacher, data=data, out=tmp_path / "c", resume=True, **{**settings, "seed": 1})


def test_nan_loss_stops_and_leaves_last_good_checkpoint(pair, tmp_path):
    teacher, student, data = pair
    out = tmp_path / "nan"

    def poison(step: int, info: dict, model) -> None:
        if step == 4:  # after the step-3 checkpoint, corrupt the live weights
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*step-0000003") as err:
        finetune(student, teacher=teacher, data=data, out=out, objective="distill", steps=10, save_every=3,
                 on_step=poison, **FAST)
    assert "\n" not in str(err.value)
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["step-0000003"]
    assert all(torch.isfinite(t).all() for t in _weights(ckpts[0]).values())
    assert not (out / "config.json").exists()
    assert (out / "loss_curve.png").is_file()  # the log so far is still plotted


def test_norms_only_changes_only_norm_parameters(pair, tmp_path):
    teacher, student, data = pair
    out = tmp_path / "norms"
    finetune(student, teacher=teacher, data=data, out=out, objective="distill", steps=4, train="norms", **FAST)
    before, after = _weights(student), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".ln_" in k for k in changed)
    assert any(k.endswith("alpha") for k in changed)


def test_progressive_swaps_sites_in_turn(pair, tmp_path):
    teacher, student, data = pair
    seen: list[list[float]] = []

    def watch(step: int, info: dict, model) -> None:
        seen.append([float(m.mix) for m in model.modules() if isinstance(m, FadeNorm)])

    res = finetune(student, teacher=teacher, data=data, out=tmp_path / "prog", objective="distill", steps=12,
                   progressive=True, swap_every=2, on_step=watch, **FAST)
    assert res.status == "completed"
    n_sites = len(seen[0])
    assert n_sites == 5  # 2 layers x (ln_1, ln_2) + ln_f
    # mixes seen after step s were set before it ran: site k swaps at step 2(k+1)
    assert [sum(m) for m in seen] == [min(n_sites, (s - 1) // 2) for s in range(1, 13)]
    model = normswap.load(tmp_path / "prog")
    assert not any(isinstance(m, FadeNorm) for m in model.modules())
    assert sum(isinstance(m, DyT) for m in model.modules()) == n_sites


def test_fade_schedule():
    s = Schedule(every=3, fade=2)
    assert [s.mix(0, t) for t in range(2, 6)] == [0.0, 0.5, 1.0, 1.0]
    assert [s.mix(1, t) for t in range(5, 9)] == [0.0, 0.5, 1.0, 1.0]


def test_progressive_start_matches_the_teacher(pair, tmp_path):
    """Before any swap the wrapped student computes the teacher's function (the restored LayerNorms)."""
    teacher, student, data = pair
    from normswap.loading import load_pretrained, read_record
    from normswap.training.progressive import wrap_sites

    s, t = load_pretrained(str(student)), load_pretrained(str(teacher))
    ids = torch.randint(6, 96, (2, 10))
    with torch.no_grad():
        assert not torch.allclose(s(input_ids=ids).logits, t(input_ids=ids).logits, atol=1e-4)
        wrap_sites(s, read_record(student)[0], t)
        torch.testing.assert_close(s(input_ids=ids).logits, t(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_time_limit_keeps_the_model(pair, tmp_path):
    teacher, student, data = pair
    res = finetune(student, teacher=teacher, data=data, out=tmp_path / "t", objective="distill", steps=50,
                   max_seconds=1e-6, **FAST)
    assert res.status == "time_limit" and res.step == 1 and res.total_steps == 50
    assert isinstance(normswap.load(tmp_path / "t"), torch.nn.Module)
    assert latest_checkpoint(tmp_path / "t").name == "step-0000001"  # resumable


def test_masked_lm_student_trains_with_mlm_and_distill(tmp_path):
    teacher, student = make_tiny_pair(tmp_path, "masked")
    data = tmp_path / "c.txt"
    data.write_text(tiny_corpus(200))
    res = finetune(student, teacher=teacher, data=data, out=tmp_path / "mlm", objective="lm=0.5,distill=0.5", steps=3, **FAST)
    assert res.status == "completed" and res.config["packing"] == "blocks"
    assert {"val_lm", "val_distill", "val_ppl"} <= set(res.val)
    log = [json.loads(ln) for ln in (tmp_path / "mlm" / "train_log.jsonl").read_text().splitlines()]
    assert all(e["loss_lm"] > 0 and e["loss_distill"] >= 0 for e in log if e["kind"] == "train")
    assert type(normswap.load(tmp_path / "mlm")).__name__ == "BertForMaskedLM"


def test_device_and_dtype_keywords(pair, tmp_path):
    """`device=` and `dtype=` (what the recipe runner passes) are TrainConfig fields; the result states them."""
    from normswap.training import TrainConfig

    teacher, student, data = pair
    res = finetune(student, teacher=teacher, data=data, out=tmp_path / "kw", objective="distill", steps=2,
                   device="cpu", dtype="float32", **FAST)
    assert (res.device, res.dtype, res.precision, res.teacher_dtype) == ("cpu", "float32", "float32", "float32")
    assert res.to_dict()["config"]["device"] == "cpu" and res.to_dict()["config"]["dtype"] == "float32"
    cfg = TrainConfig(objective="distill", steps=2, device="auto", dtype="auto", **FAST)
    res = finetune(student, teacher=teacher, data=data, out=tmp_path / "cfg", config=cfg)
    assert res.status == "completed" and res.dtype == "float32"
    with pytest.raises(normswap.NormswapError, match="unknown --dtype"):
        finetune(student, data=data, out=tmp_path / "x", steps=2, dtype="int8", **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(normswap.NormswapError, match="no CUDA device"):
            finetune(student, data=data, out=tmp_path / "x", steps=2, device="cuda", **FAST)
    assert not (tmp_path / "x").exists()
