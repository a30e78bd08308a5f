"""Progressive norm removal (issue 16): the published swap order (MLP norms, attention norms, final
norm), the original norm restored right for every family (mix 0 is the teacher), per-token loss
medians and tails, and a short `normswap finetune --progressive` run."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normswap.archs import families
from normswap.conversion import convert_model
from normswap.evaluation.token_losses import text_batches, token_loss_stats
from normswap.training.config import TrainConfig
from normswap.training.progressive import (FadeNorm, set_mix, site_group, swap_order, unwrap_sites, wrap_sites)
from normswap.training.tiny import make_tiny_pair, tiny_corpus
from cli_util import run_cli
from tiny_models import model_output, rel_error, tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _convert(name: str, to: str, **kw):
    original = tiny_model(name)
    if to == "dyt" and "alpha_init" not in kw:
        kw["alpha_init"] = 0.7  # the teacher's affine, folded as it is
    student, result = convert_model(copy.deepcopy(original), to, calib_tokens=256, **kw)
    return original, student, result.record


# ------------------------------------------------------------------------------------------- order


def test_published_order_on_gpt2_llama_and_bert_records():
    _, _, gpt2 = _convert("gpt2", "dyt")
    assert [s.path for s, _, _ in swap_order(gpt2)] == [
        "transformer.h.0.ln_2", "transformer.h.1.ln_2", "transformer.h.0.ln_1", "transformer.h.1.ln_1", "transformer.ln_f"]
    assert [s.path for s, _, _ in swap_order(gpt2, "forward")] == [s.path for s in gpt2.sites]
    _, _, llama = _convert("llama", "dyt")
    assert [(s.path, g) for s, g, _ in swap_order(llama)] == [
        ("model.layers.0.post_attention_layernorm", "mlp"), ("model.layers.1.post_attention_layernorm", "mlp"),
        ("model.layers.0.input_layernorm", "attn"), ("model.layers.1.input_layernorm", "attn"), ("model.norm", "final")]
    _, _, bert = _convert("bert", "dyt")
    assert [(s.path, g) for s, g, _ in swap_order(bert)] == [
        ("bert.encoder.layer.0.attention.output.LayerNorm", "mlp"), ("bert.encoder.layer.1.attention.output.LayerNorm", "mlp"),
        ("bert.embeddings.LayerNorm", "attn"), ("bert.encoder.layer.0.output.LayerNorm", "attn"),
        ("bert.encoder.layer.1.output.LayerNorm", "attn"), ("cls.predictions.transform.LayerNorm", "final")]


def test_the_order_does_not_need_placements(tmp_path):
    """make_tiny_pair's records call every site "pre" (or "post"): norms outside the numbered blocks
    are still final (or embedding) norms."""
    _, s = make_tiny_pair(tmp_path, "causal")
    from normswap.loading import read_record

    rec = read_record(s)[0]
    assert [(x.path, g) for x, g, _ in swap_order(rec)][-1] == ("transformer.ln_f", "final")
    assert site_group("bert.embeddings.LayerNorm", "post")[0] == "attn"
    assert site_group("model.layers.3.mystery", "pre") == ("attn", "unknown name 'mystery': treated as attention")


ATTN_WORDS = ("attn", "attention", "q_proj", "query", "q_lin", "query_key_value")


@pytest.mark.parametrize("family", families(), ids=lambda f: f.model_type)
def test_the_name_table_agrees_with_every_family_table(family):
    """For every registered family, the group of each block norm (from its name) is what its readers
    in the family table say: attention where any reader is an attention projection (a parallel block's
    single norm included), MLP otherwise; model-level norms go by placement."""
    for stack in family.stacks:
        for n in stack.block_norms:
            want = "attn" if any(w in r for r in n.readers for w in ATTN_WORDS) else "mlp"
            got, why = site_group(f"{stack.blocks}.0.{n.name}", n.placement)
            assert got == want, (family.model_type, n.name, why)
            assert "no table entry" not in why and "unknown" not in why, (family.model_type, n.name)
        for n in stack.model_norms:
            assert site_group(n.name, n.placement)[0] == ("attn" if n.placement == "embed" else "final")
    for n in family.head_norms:
        assert site_group(n.name, n.placement)[0] == "final"


def test_swap_order_is_a_checked_setting():
    with pytest.raises(Exception, match="swap-order"):
        TrainConfig(steps=1, swap_order="backwards").check()


# ------------------------------------------------------------------------- the original norm


CASES = [
    ("gpt2", "dyt", {}),  # Pre-LN LayerNorm, centred stream, affines folded (ln_f: tied head)
    ("gpt2", "dyt", {"fold": False}),
    ("llama", "dyt", {}),  # RMSNorm family: the teacher's LlamaRMSNorm, weightless where folded
    ("gemma", "dyt", {}),  # Gemma scales by 1 + w: a neutral copy stores w = 0
    ("bert", "dyt", {}),  # Post-LN: nothing folds, the teacher's LayerNorm
    ("llama", "rmsnorm", {}),
    ("gpt2", "none", {"tied_head": "untie"}),  # every site nn.Identity: s * LN(x) against x
    ("gpt2", "none", {}),  # ln_f stays a FixedNorm (tied head)
    ("llama", "none", {}),
    ("bert", "none", {}),  # Post-LN: FixedNorm with the mean subtraction
]


@pytest.mark.parametrize("name,to,kw", CASES, ids=[f"{n}-{t}" + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "")
                                                  for n, t, kw in CASES])
def test_mix_zero_is_the_teacher_and_mix_one_the_converted_model(name, to, kw):
    teacher, student, record = _convert(name, to, **kw)
    x = tiny_inputs(student)
    converted = model_output(student, x)
    assert record.exact or rel_error(model_output(teacher, x), converted) > 1e-4  # the conversion changed the function
    paths = wrap_sites(student, record, teacher)  # folded `none` sites: the record's fixed scales
    assert sorted(paths) == sorted(s.path for s in record.sites)
    assert rel_error(model_output(teacher, x), model_output(student, x)) < 1e-5
    for path in paths:  # each restored norm gives what the teacher's norm gives, through the student's readers
        assert isinstance(student.get_submodule(path), FadeNorm)
    set_mix(student, paths, 1.0)
    assert torch.equal(model_output(student, x), converted)
    set_mix(student, paths[:2], 0.5)  # a fade in between runs both branches
    assert torch.isfinite(model_output(student, x)).all()
    unwrap_sites(student, paths)
    assert torch.equal(model_output(student, x), converted)


def test_a_folded_calibrated_dyt_start_is_close_and_says_so(caplog):
    teacher, student, record = _convert("gpt2", "dyt", alpha_init=None)
    with caplog.at_level(logging.WARNING, logger="normswap"):
        wrap_sites(student, record, teacher)
    assert "calibrated affine" in caplog.text
    x = tiny_inputs(student)
    assert rel_error(model_output(teacher, x), model_output(student, x)) < 0.5


def test_a_folded_none_site_needs_its_scale():
    teacher, student, record = _convert("gpt2", "none", tied_head="untie")
    assert all(s.scale > 0 for s in record.sites)
    record.sites[0].scale = None  # a record that does not keep it
    with pytest.raises(Exception, match="fixed scale"):
        wrap_sites(student, record, teacher)


# ------------------------------------------------------------------------------- token losses


def _independent(model, batches):
    """Per example, the model on the unpadded sequence alone; per token, F.cross_entropy."""
    losses = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            n = int(mask.sum())
            with torch.no_grad():
                logits = model(input_ids=ids[None, :n]).logits[0].float()
            for t in range(1, n):
                losses.append(float(F.cross_entropy(logits[t - 1:t], ids[t:t + 1])))
    return np.array(losses)


def test_token_loss_stats_match_an_independent_computation(tmp_path):
    teacher, _ = make_tiny_pair(tmp_path, "causal")
    from normswap.loading import load_pretrained, load_tokenizer

    model, tok = load_pretrained(str(teacher)), load_tokenizer(str(teacher))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 96, (6, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding: those targets do not count
    mask[4, 5:] = 0
    batches = [{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}]
    stats = token_loss_stats(model, batches, tok, worst=3, context=4)
    ref = _independent(model, batches)
    assert stats.tokens == len(ref) == 6 * 19 - 7 - 15
    assert stats.mean == pytest.approx(ref.mean(), rel=1e-6)
    for name, q in (("median", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
        assert getattr(stats, name) == pytest.approx(np.percentile(ref, q), rel=1e-6), name
    assert stats.max == pytest.approx(ref.max(), rel=1e-6)
    assert [w.loss for w in stats.worst] == pytest.approx(sorted(ref)[::-1][:3], rel=1e-6)
    w = stats.worst[0]
    row = ids[w.example]
    assert w.token == tok.decode([int(row[w.position])]) and w.context == tok.decode(row[max(0, w.position - 4):w.position].tolist())
    # a text is cut into blocks, each scored on its own
    text = tiny_corpus(20)
    by_text = token_loss_stats(model, text, tok, block_size=16, worst=0)
    blocks = text_batches(tok, text, block_size=16)
    ref = _independent(model, blocks)
    assert by_text.tokens == len(ref) and by_text.median == pytest.approx(np.median(ref), rel=1e-6)
    assert by_text.p99 == pytest.approx(np.percentile(ref, 99), rel=1e-6)


# --------------------------------------------------------------------------------- the CLI run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("removal")
    teacher, student = make_tiny_pair(root, "causal")
    data = root / "corpus.txt"
    data.write_text(tiny_corpus(200))
    return teacher, student, data


FAST = ["--batch-size", "4", "--block-size", "16", "--val-examples", "8", "--lr", "3e-3", "--objective", "distill"]


def test_cli_progressive_run_writes_the_token_loss_stats(pair, tmp_path, monkeypatch, capsys):
    teacher, student, data = pair
    out = tmp_path / "ft"
    code, stdout, err = run_cli(["finetune", student, "--teacher", teacher, "--data", data, "--steps", "12", "--progressive",
                                 "--swap-every", "2", "--out", out, "--format", "json", *FAST], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["config"]["swap_order"] == "published" and res["progressive"]["order"] == "published"
    assert [(s["path"], s["group"], s["start"]) for s in res["progressive"]["sites"]] == [
        ("transformer.h.0.ln_2", "mlp", 2), ("transformer.h.1.ln_2", "mlp", 4), ("transformer.h.0.ln_1", "attn", 6),
        ("transformer.h.1.ln_1", "attn", 8), ("transformer.ln_f", "final", 10)]
    assert "5 sites in published order (MLP norms, then attention norms, then the final norm(s): 2 mlp, 2 attn, 1 final)" in err
    t = res["token_losses"]
    assert {"teacher", "before", "after"} <= set(t) and t["examples"] == 8
    for role in ("teacher", "before", "after"):
        s = t[role]
        assert s["tokens"] == 8 * 15 and s["median"] <= s["p90"] <= s["p99"] <= s["p999"] <= s["max"]
        assert len(s["worst"]) == 5 and s["worst"][0]["loss"] == s["max"]
    assert json.loads((out / "finetune_result.json").read_text())["token_losses"]["after"] == t["after"]
    # the human table shows them side by side
    code, stdout, err = run_cli(["finetune", student, "--teacher", teacher, "--data", data, "--steps", "4", "--progressive",
                                 "--swap-order", "forward", "--out", tmp_path / "ft2", *FAST], monkeypatch, capsys)
    assert code == 0, err
    assert "student before" in stdout and "student after" in stdout and "worst tokens" in stdout and "p999" in stdout


def test_cli_progressive_run_of_a_none_student(pair, tmp_path, monkeypatch, capsys):
    teacher, _, data = pair
    student = tmp_path / "none"
    code, _, err = run_cli(["convert", teacher, "--to", "none", "--tied-head", "untie", "--calib-text", data, "--out", student],
                           monkeypatch, capsys)
    assert code == 0, err
    out = tmp_path / "ft"
    code, stdout, err = run_cli(["finetune", student, "--teacher", teacher, "--data", data, "--steps", "12", "--progressive",
                                 "--swap-every", "2", "--eval-every", "1", "--log-every", "1", "--out", out, "--format", "json", *FAST],
                                monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(stdout)
    t = res["token_losses"]
    assert t["before"]["mean"] != t["teacher"]["mean"] and t["after"]["tokens"] == t["teacher"]["tokens"]
    # the first step's loss is measured before any swap: the wrapped student is the teacher
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    code, _, err = run_cli(["finetune", student, "--teacher", teacher, "--data", data, "--steps", "1", "--out", tmp_path / "plain",
                            "--log-every", "1", *FAST], monkeypatch, capsys)
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == plain["step"] == 1 and first["loss"] < 0.1 * plain["loss"], (first["loss"], plain["loss"])
    import normswap

    model = normswap.load(out)
    assert not any(isinstance(m, FadeNorm) for m in model.modules())
    assert all(type(model.get_submodule(p)).__name__ in ("Identity", "FixedNorm") for p in (s["path"] for s in res["progressive"]["sites"]))


def test_resuming_a_run_from_before_swap_order_keeps_its_forward_order(tmp_path):
    from normswap.errors import NormswapError
    from normswap.training.api import CONFIG_FILE, _check_resume_config

    cfg = TrainConfig(steps=10, progressive=True).to_dict()
    del cfg["swap_order"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"student": "s", "teacher": "t", "data": "d", "audio": None,
                                                     "audio_subsets": None, "config": cfg}))
    with pytest.raises(NormswapError, match="swap_order"):
        _check_resume_config(tmp_path, TrainConfig(steps=10, progressive=True), student="s", teacher="t", data="d")
    _check_resume_config(tmp_path, TrainConfig(steps=10, progressive=True, swap_order="forward"), student="s", teacher="t", data="d")


def test_the_gpt2_nonorm_recipe_is_the_published_protocol():
    from pathlib import Path

    from normswap.recipes import load_recipe

    job = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "gpt2-nonorm.yaml").jobs[0]
    f = job.finetune
    assert job.model == "openai-community/gpt2" and job.convert.to == "none" and job.stages == ["convert", "finetune", "eval"]
    assert f.progressive and f.swap_order == "published" and f.teacher == "original" and "distill" in f.objective
    assert f.batch_size * f.grad_accum * f.block_size == 2 ** 19 and f.steps * 2 ** 19 == 157_286_400
    assert (f.lr, f.min_lr_ratio, f.weight_decay, f.clip) == (6e-4, 0.5, 0.01, 1.0) and 10 <= f.warmup <= 100
    assert 24 * f.swap_every + f.swap_every < f.steps / 2  # 25 removals, a few steps apart, in the first half
