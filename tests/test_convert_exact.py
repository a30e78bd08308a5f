"""Exactness of LayerNorm -> RMSNorm on Pre-LN families, approximate on Post-LN, and folding."""
from __future__ import annotations

import pytest
import torch

import normswap
from tiny_models import POST_LN, PRE_LN, RMS_MODELS, tiny_inputs, tiny_model

TOL = 1e-5  # max |diff| / max |original| of logits (last hidden state without a head), fp32


def _out(model, x):
    with torch.no_grad():
        o = model(**x)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("tied_head", ["auto", "untie"])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("name", PRE_LN)
def test_pre_ln_rmsnorm_is_exact(name, fold, tied_head):
    model = tiny_model(name)
    x = tiny_inputs(model)
    ref = _out(model, x)
    model, result = normswap.convert(model, "rmsnorm", fold=fold, tied_head=tied_head)
    assert result.record.exact
    assert all(s.exact and s.type == "rmsnorm" for s in result.record.sites)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert _rel(ref, _out(model, x)) < TOL


@pytest.mark.parametrize("name", ["gpt2", "bloom", "falcon", "opt"])
def test_untie_folds_final_norm_into_head(name):
    model = tiny_model(name)
    model, result = normswap.convert(model, "rmsnorm", fold=True, tied_head="untie")
    assert result.record.tied_head == "untie"
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    final = [s for s in result.record.sites if s.placement == "final"]
    assert final and all(s.folded and not s.weight and not s.bias for s in final)


def test_center_embed_keeps_tie_and_reports_unfolded_final():
    model = tiny_model("gpt2")
    n_params = sum(p.numel() for p in model.parameters())
    model, result = normswap.convert(model, "rmsnorm", fold=True)
    assert result.record.tied_head == "center-embed"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) <= n_params  # no vocab x d copy
    assert "transformer.ln_f" in result.record.unfolded
    assert "untie" in result.record.unfolded["transformer.ln_f"]


def test_folded_norms_are_weightless_and_readers_gain_bias():
    model = tiny_model("gptj")  # q/k/v have no bias
    assert model.transformer.h[0].attn.q_proj.bias is None
    model, result = normswap.convert(model, "rmsnorm", fold=True)
    norm = model.transformer.h[0].ln_1
    assert norm.weight is None and norm.bias is None
    assert model.transformer.h[0].attn.q_proj.bias is not None
    assert "transformer.h.0.attn.q_proj" in result.record.new_biases


def test_writers_are_centred():
    model = tiny_model("gpt2")
    model, _ = normswap.convert(model, "rmsnorm", tied_head="untie")
    for block in model.transformer.h:
        w = block.attn.c_proj.weight.double()  # Conv1D [in, out]: centred over out
        assert float(w.mean(-1).abs().max()) < 1e-6
    assert float(model.transformer.wte.weight.double().mean(-1).abs().max()) < 1e-6


@pytest.mark.parametrize("name", POST_LN)
def test_post_ln_rmsnorm_is_approximate_and_unfolded(name):
    model = tiny_model(name)
    model, result = normswap.convert(model, "rmsnorm", fold=True)
    assert not result.record.exact
    assert all(not s.folded and s.method == "approximate" for s in result.record.sites)
    assert all(s.weight and s.bias for s in result.record.sites)  # affine kept in the norm
    assert set(result.record.unfolded) == {s.path for s in result.record.sites}
    v = result.verification
    assert v is not None and v["max_rel_diff"] > 1e-4  # measured and reported, not hidden


def test_dyt_fold_is_exact_reorganisation():
    """Folding DyT's affine into readers changes nothing beyond rounding. (Parallel calibration, so
    both runs fit the same inputs; sequential fits see each run's own rounding.)"""
    a, ra = normswap.convert(tiny_model("gpt2"), "dyt", fold=False, tied_head="untie", calib_tokens=512, sequential=False)
    b, rb = normswap.convert(tiny_model("gpt2"), "dyt", fold=True, tied_head="untie", calib_tokens=512, sequential=False)
    assert [s.alpha for s in ra.record.sites] == [s.alpha for s in rb.record.sites]
    x = tiny_inputs(a)
    assert _rel(_out(a, x), _out(b, x)) < TOL


@pytest.mark.parametrize("name", RMS_MODELS + ["bert", "gpt2"])
def test_dyt_replaces_every_site(name):
    model, result = normswap.convert(tiny_model(name), "dyt", calib_tokens=512)
    from normswap.modules import DyT

    assert len(result.record.sites) == sum(isinstance(m, DyT) for m in model.modules())
    assert all(s.method.startswith("calibrated") and s.alpha > 0 for s in result.record.sites)


@pytest.mark.parametrize("name", RMS_MODELS)
def test_rmsnorm_model_to_rmsnorm_folds_gains_exactly(name):
    """Already RMSNorm: normswap's RMSNorm with the gains folded (more in tests/test_rmsnorm_fold.py)."""
    model = tiny_model(name)
    x = tiny_inputs(model)
    ref = _out(model, x)
    model, result = normswap.convert(model, "rmsnorm")
    assert result.record.exact and all(s.exact and s.method in ("fold-gain", "keep-gain") for s in result.record.sites)
    assert _rel(ref, _out(model, x)) < TOL


def test_gemma_scale_is_one_plus_w():
    """Gemma's norm multiplies by (1 + w): alpha-init DyT must keep that scale, not w."""
    model = tiny_model("gemma")
    w = model.model.layers[0].input_layernorm.weight.detach().clone()
    model, _ = normswap.convert(model, "dyt", alpha_init=0.5, fold=False)
    assert torch.allclose(model.model.layers[0].input_layernorm.weight, 1.0 + w)


def test_unknown_target():
    with pytest.raises(normswap.NormswapError, match="unknown target"):
        normswap.convert(tiny_model("gpt2"), "batchnorm")
