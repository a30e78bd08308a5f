"""`convert --calibrate e2e`: the per-site start, then every norm parameter fitted against the
original model's output; nothing else changes."""
from __future__ import annotations

import pytest
import torch

import normswap
from normswap.conversion import convert_model
from normswap.errors import NormswapError
from normswap.loading import save
from cli_util import refused, run_cli
from tiny_models import model_output, tiny_inputs, tiny_model

NORM_PARAMS = ("alpha", "weight", "bias", "scale", "shift")


def _is_norm_param(model, key: str, sites: set[str]) -> bool:
    owner, _, name = key.rpartition(".")
    return owner in sites and name in NORM_PARAMS


def _source(name: str):
    """The tiny model; GPT-2's with an untied head scaled up: its random-init next-token
    distributions are nearly uniform, a KL of 1e-5 that 40 steps need not lower (whether they did
    depended on the tests run before)."""
    if name != "gpt2":
        return tiny_model(name)
    model = tiny_model("gpt2", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.mark.parametrize("name,to", [("gpt2", "dyt"), ("llama", "none"), ("bert", "dyt")])
def test_only_norm_parameters_move_and_the_fit_improves(name, to):
    site, r_site = convert_model(_source(name), to, calib_tokens=512, fold=False)
    e2e, r_e2e = convert_model(_source(name), to, calib_tokens=512, fold=False, calibrate="e2e", e2e_steps=40)
    sites = {s.path for s in r_e2e.record.sites}
    a, b = site.state_dict(), e2e.state_dict()
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved and all(_is_norm_param(e2e, k, sites) for k in moved), [k for k in moved if not _is_norm_param(e2e, k, sites)]
    summary = r_e2e.end_to_end
    assert summary["loss_after"] < summary["loss_before"] and not summary["reverted"]
    assert all(s.method.endswith("+e2e") for s in r_e2e.record.sites)
    assert r_site.end_to_end is None


def test_fitted_values_fold_and_load_back(tmp_path):
    model, result = convert_model(tiny_model("gpt2"), "dyt", calib_tokens=512, calibrate="e2e", e2e_steps=20, tied_head="untie")
    unfolded, _ = convert_model(tiny_model("gpt2"), "dyt", calib_tokens=512, calibrate="e2e", e2e_steps=20, tied_head="untie", fold=False)
    x = tiny_inputs(model)
    ref = model_output(unfolded, x)
    assert float((model_output(model, x) - ref).abs().max() / ref.abs().max()) < 1e-5  # the fitted affines folded exactly
    save(model, tmp_path / "m", result.record)
    assert torch.equal(model_output(normswap.load(tmp_path / "m"), x), model_output(model, x))


def test_e2e_options_are_checked(tmp_path, monkeypatch, capsys):
    with pytest.raises(NormswapError, match="nothing to fit"):
        convert_model(tiny_model("gpt2"), "rmsnorm", calibrate="e2e")
    src = tmp_path / "src"
    tiny_model("gpt2").save_pretrained(src)
    for bad, needle in ((["--calibrate", "global"], "unknown --calibrate"), (["--calibrate", "e2e", "--e2e-steps", "0"], "--e2e-steps"),
                        (["--calibrate", "e2e", "--e2e-seconds", "-1"], "--e2e-seconds")):
        code, _, err = run_cli(["convert", str(src), "--to", "dyt", "--out", str(tmp_path / "o"), *bad], monkeypatch, capsys)
        refused(code, err, needle)
    assert not (tmp_path / "o").exists()
