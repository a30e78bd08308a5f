"""`--to none`: every norm a fixed scale folded into its readers, so no normalisation is left."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import normswap
from normswap.conversion import average_rms, convert_model
from normswap.loading import save
from normswap.modules import DyT, FixedNorm, RMSNorm
from normswap.samples import model_inputs
from cli_util import refused, run_cli
from tiny_models import POST_LN, RMS_MODELS, TINY, model_output, rel_error, tiny_inputs, tiny_model


def normalisation_modules(model: nn.Module) -> list[str]:
    """Modules that divide by a statistic of their input: LayerNorm, any *RMSNorm / *LayerNorm class
    of transformers, normswap's RMSNorm, and DyT (elementwise, but a norm's stand-in)."""
    found = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, RMSNorm, DyT)) or cls.endswith(("RMSNorm", "LayerNorm")):
            found.append(name)
    return found


@pytest.mark.parametrize("name", list(TINY))
def test_no_normalisation_is_left_and_the_checkpoint_loads_back_bit_identically(tmp_path, name):
    model, result = convert_model(tiny_model(name), "none", calib_tokens=256, tied_head="untie")
    assert normalisation_modules(model) == []
    assert result.record.target == "none" and not result.record.exact
    kinds = {s.type for s in result.record.sites}
    assert kinds <= {"none", "identity"}
    # what could not fold is a fixed scale: the stream itself (Post-LN) or a visible output
    for s in result.record.sites:
        assert (s.type == "identity") == s.folded, s
        assert s.folded or s.path in result.record.unfolded
    out = tmp_path / name
    save(model, out, result.record)
    loaded = normswap.load(out)
    x = tiny_inputs(model)
    assert torch.equal(model_output(model, x), model_output(loaded, x))
    assert normalisation_modules(loaded) == []


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_the_fixed_scale_is_the_average_rms_of_the_original_norms_input(name):
    """The first site reads what the original's first norm reads (centred, for a Pre-LN LayerNorm):
    its scale is the mean over calibration tokens of sqrt(var + eps), computed here in numpy."""
    original = tiny_model(name)
    model, result = convert_model(copy.deepcopy(original), "none", calib_tokens=256, fold=False)
    first = result.record.sites[0]
    batches = model_inputs(original, n_tokens=256, what="calibration", teacher=original)
    seen = []
    norm = original.get_submodule(first.path)
    handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, first.dim).double().numpy()))
    with torch.no_grad():
        for b in batches:
            original(**b)
    handle.remove()
    x = np.concatenate(seen)
    if isinstance(norm, nn.LayerNorm):
        x = x - x.mean(-1, keepdims=True)
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    expected = np.sqrt((x ** 2).mean(-1) + eps).mean()
    got = float(model.get_submodule(first.path).scale.detach())
    assert got == pytest.approx(expected, rel=1e-5)
    assert result.calibration[first.path]["scale"] == pytest.approx(expected, rel=1e-6)


def test_a_fixed_norm_computes_its_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 16) * 3 + 1
    m = FixedNorm(16, scale=2.5, center=True)
    with torch.no_grad():
        m.weight.copy_(torch.randn(16))
        m.bias.copy_(torch.randn(16))
        want = (x - x.mean(-1, keepdim=True)) / 2.5 * m.weight + m.bias
        assert torch.allclose(m(x), want, atol=1e-6)
        m.center = False
        assert torch.allclose(m(x), x / 2.5 * m.weight + m.bias, atol=1e-6)
    assert average_rms(torch.full((3, 4), 2.0), 0.0, center=False) == pytest.approx(2.0)
    assert average_rms(torch.full((3, 4), 2.0), 0.0, center=True) == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "whisper"])
def test_folding_the_fixed_scales_is_exact(name):
    """Folded and unfolded conversions compute the same function (the folds are exact)."""
    unfolded, _ = convert_model(tiny_model(name), "none", calib_tokens=256, fold=False, tied_head="untie")
    folded, r = convert_model(tiny_model(name), "none", calib_tokens=256, fold=True, tied_head="untie")
    assert any(s.folded for s in r.record.sites)
    x = tiny_inputs(folded)
    assert rel_error(model_output(unfolded, x), model_output(folded, x)) < 1e-5


@pytest.mark.parametrize("name", POST_LN[:2])
def test_post_ln_sites_keep_the_mean_subtraction(name):
    model, result = convert_model(tiny_model(name), "none", calib_tokens=256)
    for s in result.record.sites:
        m = model.get_submodule(s.path)
        assert isinstance(m, FixedNorm) and m.center and s.center, s.path


def test_a_tied_head_keeps_the_final_scale_unless_untied():
    model, result = convert_model(tiny_model("llama", tie_word_embeddings=True), "none", calib_tokens=256)
    final = result.record.sites[-1]
    assert not final.folded and "shares its weight" in result.record.unfolded[final.path]
    assert isinstance(model.get_submodule(final.path), FixedNorm)


def test_cli_to_none(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    tiny_model("gpt2").save_pretrained(src)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["convert", str(src), "--to", "none", "--tied-head", "untie", "--out", str(out), "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["target"] == "none" and report["exact"] is False
    assert all(s["new_type"] == "identity" for s in report["sites"])
    assert all(s["calib_rel_error"] > 0 for s in report["sites"])
    assert normalisation_modules(normswap.load(out)) == []
    code, _, err = run_cli(["convert", str(src), "--to", "none", "--low-memory", "--out", str(tmp_path / "o2")], monkeypatch, capsys)
    refused(code, err, "--to none")
