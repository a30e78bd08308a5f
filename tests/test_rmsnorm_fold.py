"""`--to rmsnorm` on families that already use RMSNorm (Llama, Mistral, Qwen2, Gemma): each norm
becomes normswap's RMSNorm with the same eps, and with `--fold` its gain moves into the linears that
read it (design notes 2.5; Gemma's gain is 1 + w). Exact in memory and streamed, bit-identical
between the two, and loaded back bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import normswap
from normswap.loading import save
from normswap.modules import RMSNorm
from normswap.streaming import checkpoint_files, stream_convert
from normswap.surgery.paths import get_module
from tiny_models import RMS_MODELS, tiny_inputs, tiny_model

TOL = 1e-5  # max |diff| / max |original| of the logits, fp32
# (tied, --tied-head): an untied head folds the final norm whatever the choice; a tied one only with untie
HEADS = [(False, "auto"), (True, "auto"), (True, "untie")]


def _model(name, tied):
    return tiny_model(name, tie_word_embeddings=tied)


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def _tensors(folder):
    state = {}
    for f in checkpoint_files(folder):
        state.update(load_file(str(f)))
    return state


def _norm_paths(model):
    return [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("tied,tied_head", HEADS)
@pytest.mark.parametrize("name", RMS_MODELS)
def test_fold_is_exact(name, tied, tied_head):
    model = _model(name, tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    eps = {p: float(getattr(get_module(model, p), "variance_epsilon", getattr(get_module(model, p), "eps", 0))) for p in _norm_paths(model)}
    x = tiny_inputs(model)
    ref = _logits(model, x)
    n_params = sum(p.numel() for p in model.parameters())
    model, result = normswap.convert(model, "rmsnorm", fold=True, tied_head=tied_head)
    rec = result.record
    assert _rel(ref, _logits(model, x)) <= TOL
    assert rec.exact and rec.target == "rmsnorm" and rec.family == name
    assert all(s.exact and s.type == "rmsnorm" for s in rec.sites)
    assert sorted(s.path for s in rec.sites) == sorted(eps)
    assert rec.new_biases == []  # no norm bias
    assert result.verification["max_rel_diff"] <= TOL  # every conversion is measured
    keeps_final = tied and tied_head == "auto"
    for s in rec.sites:
        norm = get_module(model, s.path)
        assert type(norm) is RMSNorm and norm.eps == s.eps == eps[s.path] and norm.bias is None
        if s.placement == "final" and keeps_final:
            assert norm.weight is not None and not s.folded and s.method == "keep-gain"
            assert "untie" in rec.unfolded[s.path]
        else:
            assert norm.weight is None and s.folded and s.method == "fold-gain", s.path
    assert set(rec.unfolded) == ({"model.norm"} if keeps_final else set())
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if tied and tied_head == "untie":
        assert rec.tied_head == "untie" and head.weight is not emb.weight and model.config.tie_word_embeddings is False
        assert sum(p.numel() for p in model.parameters()) == n_params + head.weight.numel() - sum(s.dim for s in rec.sites)
    else:
        assert rec.tied_head is None and (head.weight is emb.weight) == tied


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_gain_moves_into_readers_in_float64(name):
    """W <- W diag(g), one rounding of the float64 product; Gemma's g is 1 + w (in float32, as Gemma
    computes it); bias-carrying readers (Qwen2's q/k/v) keep their bias."""
    model = _model(name, False)
    layer = model.model.layers[0]
    w_in, w_post, w_final = (n.weight.detach().clone() for n in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm))
    readers = {"q": layer.self_attn.q_proj, "up": layer.mlp.up_proj, "head": model.lm_head}
    before = {k: m.weight.detach().clone() for k, m in readers.items()}
    model, _ = normswap.convert(model, "rmsnorm", fold=True)
    gain = (lambda w: 1.0 + w.float()) if name == "gemma" else (lambda w: w)
    for key, w in (("q", w_in), ("up", w_post), ("head", w_final)):
        want = (before[key].double() * gain(w).double()[None, :]).float()
        assert torch.equal(readers[key].weight, want), key


def test_qwen2_reader_biases_unchanged():
    model = _model("qwen2", False)
    q = model.model.layers[0].self_attn.q_proj
    bias = q.bias.detach().clone()
    model, result = normswap.convert(model, "rmsnorm", fold=True)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, bias) and result.record.new_biases == []


@pytest.mark.parametrize("name", RMS_MODELS)
def test_no_fold_keeps_the_gain(name):
    """--no-fold: the same function in normswap's RMSNorm (gain 1 + w for Gemma), readers untouched."""
    model = _model(name, True)
    x = tiny_inputs(model)
    ref = _logits(model, x)
    gains = {p: get_module(model, p).weight.detach().clone() for p in _norm_paths(model)}
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model, result = normswap.convert(model, "rmsnorm", fold=False, tied_head="untie")
    assert _rel(ref, _logits(model, x)) <= TOL
    assert result.record.exact and all(s.exact and not s.folded and s.method == "keep-gain" for s in result.record.sites)
    assert result.record.tied_head is None and any("without --fold" in w for w in result.warnings)  # no useless copy
    for path, w in gains.items():
        want = 1.0 + w.float() if name == "gemma" else w
        assert torch.equal(get_module(model, path).weight, want)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)


def test_center_embed_does_not_apply():
    model = _model("llama", True)
    x = tiny_inputs(model)
    ref = _logits(model, x)
    model, result = normswap.convert(model, "rmsnorm", fold=True, tied_head="center-embed")
    assert result.record.exact and result.record.tied_head is None and result.record.centered_embeddings == []
    assert any("center-embed" in w and "needs no centring" in w for w in result.warnings)
    assert list(result.record.unfolded) == ["model.norm"]
    assert _rel(ref, _logits(model, x)) <= TOL


# without --fold, untie changes nothing (the head stays tied): not a separate case
@pytest.mark.parametrize("tied,tied_head,fold", [(*h, True) for h in HEADS] + [(False, "auto", False), (True, "auto", False)])
@pytest.mark.parametrize("name", RMS_MODELS)
def test_streaming_equals_in_memory_and_loads_back(tmp_path, name, tied, tied_head, fold):
    original = _model(name, tied)
    src = tmp_path / "src"
    original.save_pretrained(src)
    x = tiny_inputs(original)
    ref = _logits(original, x)

    model, result = normswap.convert(str(src), "rmsnorm", fold=fold, tied_head=tied_head)
    save(model, tmp_path / "mem", result.record)
    streamed = stream_convert(src, tmp_path / "stream", "rmsnorm", fold=fold, tied_head=tied_head, copy_aux=False, save_tokenizer=False)
    assert streamed.record.exact and result.record.exact
    assert streamed.record.to_dict() | {"digest": None, "source": None} == result.record.to_dict() | {"digest": None, "source": None}

    mem, low = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert sorted(mem) == sorted(low)
    for k in mem:
        assert mem[k].dtype == low[k].dtype and torch.equal(mem[k], low[k]), k
    cfg_mem = json.loads((tmp_path / "mem" / "config.json").read_text())
    cfg_low = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert cfg_mem == cfg_low and cfg_mem["normswap"]["exact"] is True
    assert cfg_mem["tie_word_embeddings"] is (tied and tied_head != "untie")

    converted = _logits(model, x)
    assert _rel(ref, converted) <= TOL
    state = model.state_dict()
    for folder in ("mem", "stream"):
        loaded = normswap.load(tmp_path / folder)
        assert sorted(loaded.state_dict()) == sorted(state)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
        assert torch.equal(_logits(loaded, x), converted)
        assert [n for n, m in loaded.named_modules() if isinstance(m, RMSNorm) and m.weight is None] == \
               [n for n, m in model.named_modules() if isinstance(m, RMSNorm) and m.weight is None]
        head, emb = loaded.get_output_embeddings(), loaded.get_input_embeddings()
        assert (head.weight is emb.weight) == (tied and tied_head != "untie")


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_bfloat16_streaming_equals_in_memory(tmp_path, name):
    """A bf16 source converts to bf16: each folded weight rounded once, the same bits on both paths,
    within --verify's bf16 bound of the original."""
    src = tmp_path / "src"
    _model(name, True).to(torch.bfloat16).save_pretrained(src)
    model, result = normswap.convert(str(src), "rmsnorm", fold=True, tied_head="untie", verify=True)
    assert result.record.exact and result.record.dtype == "bfloat16"
    assert result.verification["max_rel_diff"] <= result.verification["exact_tolerance"] == 2.0 ** -6
    save(model, tmp_path / "mem", result.record)
    stream_convert(src, tmp_path / "stream", "rmsnorm", fold=True, tied_head="untie", copy_aux=False, save_tokenizer=False)
    mem, low = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert sorted(mem) == sorted(low) and all(mem[k].dtype == torch.bfloat16 and torch.equal(mem[k], low[k]) for k in mem)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "normswap", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_convert_and_inspect(tmp_path):
    src = tmp_path / "llama"
    _model("llama", True).save_pretrained(src)
    proc = _cli("inspect", src, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["reader_check_passed"] and {s["rmsnorm"] for s in rep["sites"]} == {"exact"}
    fold = {s["path"]: s["fold"] for s in rep["sites"]}
    assert fold.pop("model.norm").startswith("no: the LM head shares") and set(fold.values()) == {"yes"}

    proc = _cli("convert", src, "--to", "rmsnorm", "--fold", "--verify", "--out", tmp_path / "rms", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["exact"] and res["verified"] and res["max_rel_diff"] <= TOL
    assert list(res["unfolded"]) == ["model.norm"] and {s["method"] for s in res["sites"]} == {"fold-gain", "keep-gain"}
    from normswap.export.card import build_card

    card = build_card(tmp_path / "rms", "me/llama-rms")  # the model card says what was done, not "centred"
    assert "already used RMSNorm" in card and "centred" not in card

    proc = _cli("convert", src, "--to", "rmsnorm", "--fold", "--tied-head", "untie", "--low-memory", "--out", tmp_path / "low", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["exact"] and res["low_memory"] and res["tied_head"] == "untie" and res["unfolded"] == {}
    assert all(s["folded"] and s["method"] == "fold-gain" for s in res["sites"])
    proc = _cli("convert", src, "--to", "rmsnorm", "--no-fold", "--out", tmp_path / "kept")
    assert proc.returncode == 0 and "exact" in proc.stdout, proc.stderr


# --------------------------------------------------------------------------- SmolLM2-135M (real)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as built by ../shared/assets/smollm2-135m-instruct/fetch.sh."""
    path = Path(os.environ.get("NORMSWAP_CACHE", Path.home() / ".cache" / "normswap-assets")) / "smollm2-135m-instruct"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} not built (run PYTHON=.venv/bin/python ../shared/assets/smollm2-135m-instruct/fetch.sh)")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tied_head", ["auto", "untie"])
def test_smollm2_fold_is_exact(tmp_path, smollm2, tied_head, one_thread):
    """Llama, 30 layers, head tied to the embedding: every gain folds (the final one with untie)."""
    model, result = normswap.convert(str(smollm2), "rmsnorm", fold=True, tied_head=tied_head, verify=True)
    v = result.verification
    assert result.record.exact and v["max_rel_diff"] <= TOL, v
    assert len(result.record.sites) == 61 and sum(s.folded for s in result.record.sites) == (61 if tied_head == "untie" else 60)
    save(model, tmp_path / "mem", result.record)
    stream_convert(smollm2, tmp_path / "stream", "rmsnorm", fold=True, tied_head=tied_head, copy_aux=False, save_tokenizer=False)
    mem, low = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert sorted(mem) == sorted(low) and all(torch.equal(mem[k], low[k]) for k in mem)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_tensors_in_row_blocks_matches_the_float64_formula(conv1d, with_bias, monkeypatch):
    """`fold_tensors` works a few rows of the stored weight at a time (here 3 rows a block): the
    result is W diag(g) and c + W b (Linear) or diag(g) W and c + b W (GPT-2's Conv1D), computed
    here whole in float64 and rounded once."""
    import normswap.surgery.centre as centre
    from normswap.surgery.fold import fold_tensors

    torch.manual_seed(0)
    n_in, n_out = 11, 7
    w = torch.randn(n_in, n_out) if conv1d else torch.randn(n_out, n_in)
    c = torch.randn(n_out) if with_bias else None
    g, b = torch.rand(n_in) + 0.5, torch.randn(n_in)
    W, g64, b64 = w.double(), g.double(), b.double()
    want_w = (W * g64[:, None]) if conv1d else (W * g64[None, :])
    want_c = (b64 @ W if conv1d else W @ b64) + (c.double() if c is not None else 0)
    monkeypatch.setattr(centre, "BLOCK_ELEMS", 3 * w.shape[1])
    got_w, got_c = fold_tensors(w.clone(), None if c is None else c.clone(), g, b, conv1d)
    torch.testing.assert_close(got_w, want_w.float(), rtol=0, atol=0)
    torch.testing.assert_close(got_c, want_c.float(), rtol=1e-7, atol=1e-7)
