"""Discovery: the plan found from what a model computes, with no family table.

- On every tabled family (tables disabled), discovery finds the table's plan and converts exactly.
- On Hugging Face architectures without a table (tests/untabled_models.py), `--to rmsnorm --fold`
  is exact wherever the maths allows, or falls back per site with the reason.
- Norms are known by behaviour, not by name; a table that disagrees with the model is an error; an
  exactness claim that fails verification is an error.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import normswap
from normswap.archs import get_family
from normswap.archs.plan import build_plan, cross_check, table_plan
from normswap.errors import NormswapError
from cli_util import run_cli
from tiny_models import POST_LN, PRE_LN, RMS_MODELS, TINY, model_output as _out, rel_error as _rel, tiny_inputs, tiny_model
from untabled_models import UNTABLED, untabled_inputs, untabled_model

TOL = 1e-5  # max |diff| / max |original| of logits (last hidden state without a head), fp32


# ----------------------------------------------------------------------------- tabled families


@pytest.mark.parametrize("name", list(TINY))
def test_discovery_reproduces_the_table(name):
    model = tiny_model(name)
    table = table_plan(model, get_family(model.config.model_type))
    found = build_plan(model, "discover")
    assert found.source == "discovery" and found.family is None
    assert cross_check(table, found) == []
    # the same sites in the same order, and every reader the table lists (discovery may find more,
    # e.g. a Post-LN model's last norm read by its MLM head, which the family table cannot name)
    assert [(s.path, s.placement, s.kind) for s in found.sites] == [(s.path, s.placement, s.kind) for s in table.sites]
    for t, f in zip(table.sites, found.sites):
        assert set(t.readers) <= set(f.readers), t.path
        assert (t.centred, t.recenter, t.gain_offset) == (f.centred, f.recenter, f.gain_offset), t.path
    assert found.style == table.style and found.head == table.head and found.tied_embedding == table.tied_embedding


@pytest.mark.parametrize("name", PRE_LN + RMS_MODELS)
def test_discovered_plan_converts_exactly(name):
    model = tiny_model(name)
    x = tiny_inputs(model)
    ref = _out(model, x)
    model, result = normswap.convert(model, "rmsnorm", fold=True, tied_head="untie", plan="discover")
    assert result.record.plan == "discovery" and result.record.exact
    assert _rel(ref, _out(model, x)) < TOL


@pytest.mark.parametrize("name", POST_LN)
def test_discovered_post_ln_is_approximate_like_the_table(name):
    a, ra = normswap.convert(tiny_model(name), "rmsnorm", fold=True, plan="table")
    b, rb = normswap.convert(tiny_model(name), "rmsnorm", fold=True, plan="discover")
    assert not rb.record.exact and [s.method for s in rb.record.sites] == [s.method for s in ra.record.sites]
    x = tiny_inputs(a)
    assert torch.equal(_out(a, x), _out(b, x))  # the same conversion, bit for bit


def test_auto_uses_the_table_confirmed_by_discovery():
    plan = build_plan(tiny_model("gpt2"))
    assert plan.source == "table" and plan.checked
    assert build_plan(tiny_model("gpt2"), "table").checked is False  # the fast path: no probe pass


def test_a_table_that_disagrees_with_the_model_is_an_error(monkeypatch):
    """A table that misses a reader would fold the norm's affine into some readers only."""
    from normswap.archs import plan as plan_mod

    real = plan_mod.table_plan

    def wrong(model, family):
        p = real(model, family)
        p.sites[0].readers = p.sites[0].readers[:0] + ["transformer.h.0.mlp.c_fc"]  # reads ln_2, not ln_1
        return p

    monkeypatch.setattr(plan_mod, "table_plan", wrong)
    with pytest.raises(NormswapError, match=r"transformer\.h\.0\.ln_1: readers only the table has transformer\.h\.0\.mlp\.c_fc; "
                                            r"only discovery has transformer\.h\.0\.attn\.c_attn"):
        build_plan(tiny_model("gpt2"))


def test_an_exactness_claim_that_fails_verification_is_an_error(monkeypatch):
    """dinov2's layer scale keeps some norms from being centred; a plan that claimed otherwise is
    caught by the measurement, and nothing is returned as exact."""
    from normswap import conversion

    real = conversion.build_plan

    def overclaim(model, source="auto", probe=None):
        p = real(model, source, probe)
        for s in p.sites:
            s.centred, s.keep_mean = True, False
        return p

    monkeypatch.setattr(conversion, "build_plan", overclaim)
    with pytest.raises(NormswapError, match="claims to be exact, but its last_hidden_state differ"):
        normswap.convert(untabled_model("dinov2"), "rmsnorm", fold=True)


# ------------------------------------------------------------------------- norms by behaviour


class _HandMadeNorm(nn.Module):
    """A LayerNorm written out by hand, under a name that says nothing."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.3 + 1)
        self.bias = nn.Parameter(torch.randn(d) * 0.3)

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class _FakeLayerNorm(nn.Module):
    """Named like a norm, computes a per-channel scale: not a norm."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.3 + 1)

    def forward(self, x):
        return x * self.weight


def test_norms_are_recognised_by_what_they_compute():
    torch.manual_seed(0)
    model = tiny_model("gpt2")
    model.transformer.h[0].ln_1 = _HandMadeNorm(32)
    x = tiny_inputs(model)
    ref = _out(model, x)
    plan = build_plan(model, "discover")
    site = next(s for s in plan.sites if s.path == "transformer.h.0.ln_1")
    assert (site.kind, site.placement, site.readers, site.eps) == ("layernorm", "pre", ["transformer.h.0.attn.c_attn"], 1e-5)
    model, result = normswap.convert(model, "rmsnorm", fold=True, tied_head="untie", plan="discover")
    assert result.record.exact and _rel(ref, _out(model, x)) < TOL

    fake = tiny_model("gpt2")
    fake.transformer.h[1].attn.c_proj = nn.Sequential(fake.transformer.h[1].attn.c_proj, _FakeLayerNorm(32))
    plan = build_plan(fake, "discover")
    assert "transformer.h.1.attn.c_proj.1" in plan.other_norms
    assert "does not compute a LayerNorm or RMSNorm" in plan.other_norms["transformer.h.1.attn.c_proj.1"]


# ------------------------------------------------------------- architectures without a table

# name -> what `--to rmsnorm --fold --tied-head untie` gives: the methods of its sites, and for the
# sites that keep LayerNorm's mean subtraction the reason
EXACT_EVERYWHERE = ["gpt_neo", "gpt_bigcode", "codegen", "biogpt", "xglm", "persimmon", "stablelm", "stablelm-qk", "stablelm-par",
                    "olmo", "cohere", "cohere-qk", "mpt", "clip_text", "mbart", "pegasus", "m2m_100", "deit"]
FALLBACKS = {  # name -> (sites keeping LayerNorm's mean subtraction, words of the reason)
    "dinov2": (3, "scaled per channel by encoder.layer.0.layer_scale1.lambda1 (a layer scale)"),
    "beit": (4, "goes on to the model's output"),
    "siglip_vision": (1, "goes on to"),
}


def test_every_untabled_model_is_untabled():
    assert all(get_family(untabled_model(n).config.model_type) is None for n in UNTABLED)


@pytest.mark.parametrize("name", EXACT_EVERYWHERE + list(FALLBACKS))
def test_untabled_pre_ln_is_exact(name):
    model = untabled_model(name)
    x = untabled_inputs(model)
    ref = _out(model, x)
    model, result = normswap.convert(model, "rmsnorm", fold=True, tied_head="untie")
    rec = result.record
    assert rec.plan == "discovery" and rec.family is None and rec.exact
    assert _rel(ref, _out(model, x)) < TOL
    from normswap.modules import RMSNorm
    from normswap.surgery.paths import get_module

    assert all(isinstance(get_module(model, s.path), RMSNorm) for s in rec.sites)
    methods = [s.method for s in rec.sites]
    if name in FALLBACKS:
        n, words = FALLBACKS[name]
        assert methods.count("layernorm-semantics") == n and methods.count("exact") == len(methods) - n
        assert any(words in w for w in result.warnings), result.warnings
    else:
        assert set(methods) == {"exact"}
    # everything folds but embedding norms and a final norm whose output is the model's own
    assert set(rec.unfolded.values()) <= {"its output starts the residual stream", "its output is the model's output (last_hidden_state)"}


def test_untabled_explicit_centring_and_qk_norms():
    xglm = build_plan(untabled_model("xglm"), "discover")  # sinusoidal positions: a buffer, centred where the stream enters layer 0
    assert xglm.centred_inputs == ["model.layers.0"] and all(s.centred for s in xglm.sites)
    persimmon = build_plan(untabled_model("persimmon"), "discover")
    qk = [p for p in persimmon.other_norms if p.endswith(("q_layernorm", "k_layernorm"))]
    assert len(qk) == 4 and all("off the residual stream" in persimmon.other_norms[p] for p in qk)
    m2m = build_plan(untabled_model("m2m_100"), "discover")
    assert m2m.centred_inputs == ["model.encoder.layers.0", "model.decoder.layers.0"]
    enc_final = next(s for s in m2m.sites if s.path == "model.encoder.layer_norm")
    assert sorted(enc_final.readers) == sorted(f"model.decoder.layers.{i}.encoder_attn.{p}_proj" for i in range(2) for p in "kv")


@pytest.mark.parametrize("name", ["bart", "marian"])
def test_untabled_post_ln_is_approximate_and_measured(name):
    model, result = normswap.convert(untabled_model(name), "rmsnorm", fold=True)
    assert result.record.style == "post" and not result.record.exact
    assert set(result.record.unfolded.values()) == {"Post-LN: the norm's output is the residual stream itself"}
    assert result.verification["max_rel_diff"] > 1e-3


@pytest.mark.parametrize("name", ["qwen3", "olmo2", "phi3", "t5"])
def test_untabled_rmsnorm_models_keep_their_function(name):
    model = untabled_model(name)
    x = untabled_inputs(model)
    ref = _out(model, x)
    model, result = normswap.convert(model, "rmsnorm", fold=True, tied_head="untie")
    assert result.record.exact and {s.method for s in result.record.sites} <= {"fold-gain", "keep-gain"}
    assert _rel(ref, _out(model, x)) < TOL


@pytest.mark.parametrize("name,tied_head", [("xglm", "auto"), ("mbart", "auto"), ("m2m_100", "untie")])
def test_discovered_conversions_load_back_exactly(name, tied_head, tmp_path):
    """Explicitly centred inputs and centred lookups of embedding classes of their own (mbart's
    scaled lookups, shared by encoder and decoder) are rebuilt from the saved record."""
    model = untabled_model(name)
    x = untabled_inputs(model)
    converted, result = normswap.convert(model, "rmsnorm", fold=True, tied_head=tied_head)
    normswap.save(converted, tmp_path / "out", result.record)
    loaded = normswap.load(tmp_path / "out")
    assert torch.equal(_out(converted, x), _out(loaded, x))


# ---------------------------------------------------------------------------------------- CLI


def test_inspect_shows_a_discovered_plan(tmp_path, monkeypatch, capsys):
    untabled_model("xglm").save_pretrained(tmp_path / "xglm")
    code, out, err = run_cli(["inspect", tmp_path / "xglm", "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["plan"] == "discovery" and rep["family"] is None and rep["centred_inputs"] == ["model.layers.0"]
    first = rep["sites"][0]
    assert first["readers"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"] and first["rmsnorm"] == "exact"
    last = rep["sites"][-1]
    assert last["placement"] == "final" and "model.layers.1.fc2" in last["writers"] and last["readers"] == ["lm_head"]
    code, out, err = run_cli(["inspect", tmp_path / "xglm"], monkeypatch, capsys)
    assert code == 0 and "discovery (no family table" in out and "model.layers.0: its input is centred" in out, err
    assert "a sinusoidal" in out or "adds into the stream there" in out  # the reason for the explicit centring


def test_archs_says_other_architectures_are_discovered(monkeypatch, capsys):
    code, out, _ = run_cli(["archs"], monkeypatch, capsys)
    assert code == 0 and "Every other architecture is discovered" in out
