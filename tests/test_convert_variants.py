"""`convert --to dyt --variant V` (issue 16): each site fitted with one of DyT's relatives (DyISRU,
per-channel alphas, Derf), recorded under the variant's name, folded exactly, saved and loaded back,
exported, refused where it cannot run."""
from __future__ import annotations

import json
import math

import pytest
import torch

import normswap
from normswap.conversion import VARIANT_CHOICES, convert_model
from normswap.errors import NormswapError
from normswap.loading import save
from normswap.modules import VARIANTS, ElementwiseNorm
from cli_util import refused, run_cli
from tiny_models import model_output, tiny_inputs, tiny_model

torch.set_num_threads(1)

# the squashing functions, written out independently of normswap.modules
SQUASH = {"tanh": torch.tanh, "isru": lambda u: u / torch.sqrt(1 + u * u), "erf": torch.erf}


def test_every_variant_is_a_choice_and_the_record_takes_it():
    from normswap.record import TYPES

    assert set(VARIANT_CHOICES) == {"dyt", *VARIANTS} and set(VARIANTS) <= set(TYPES)


@pytest.mark.parametrize("name,variant", [("gpt2", "dyisru"), ("llama", "dyt-channel"), ("bert", "derf"), ("llama", "dyisru-channel")])
def test_variant_sites_compute_their_function_fold_and_load_back(name, variant, tmp_path):
    fn, per_channel = VARIANTS[variant]
    unfolded, r0 = convert_model(tiny_model(name), "dyt", calib_tokens=256, fold=False, variant=variant)
    sites = r0.record.sites
    assert sites and all(s.type == variant and s.method == "calibrated-sequential" for s in sites)
    for s in sites:
        mod = unfolded.get_submodule(s.path)
        assert isinstance(mod, ElementwiseNorm) and (mod.fn, mod.per_channel) == (fn, per_channel)
        assert tuple(mod.alpha.shape) == ((s.dim,) if per_channel else ())
        assert (s.alpha is None) == per_channel  # a scalar alpha is recorded; per-channel ones live in the weights
        x = torch.randn(3, s.dim, dtype=torch.float64) * 2
        u = mod.alpha.double() * x + (mod.shift.double() if mod.shift is not None else 0)
        want = mod.weight.double() * SQUASH[fn](u) + mod.bias.double()
        if mod.recenter:
            want = want - want.mean(-1, keepdim=True)
        got = mod.double()(x)
        mod.float()
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        assert math.isfinite(r0.calibration[s.path]["rel_error"])
    from normswap.training.params import norm_paths  # `finetune --train norms` finds them

    assert {s.path for s in sites} <= set(norm_paths(unfolded))
    model, result = convert_model(tiny_model(name), "dyt", calib_tokens=256, variant=variant)
    assert [s.type for s in result.record.sites] == [variant] * len(sites)
    x = tiny_inputs(model)
    ref = model_output(unfolded, x)
    assert float((model_output(model, x) - ref).abs().max() / ref.abs().max()) < 1e-5  # folding is exact
    save(model, tmp_path / "m", result.record)
    back = normswap.load(tmp_path / "m")
    assert torch.equal(model_output(back, x), model_output(model, x))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["normswap"]["sites"][0]["type"] == variant


def test_end_to_end_calibration_fits_a_variant_and_only_its_norms():
    from test_convert_e2e import _source  # a GPT-2 whose next-token distributions are not uniform

    kw = dict(calib_tokens=512, fold=False, variant="dyisru")
    site, _ = convert_model(_source("gpt2"), "dyt", **kw)
    fitted, r = convert_model(_source("gpt2"), "dyt", calibrate="e2e", e2e_steps=40, **kw)
    a, b = site.state_dict(), fitted.state_dict()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    sites = {s.path for s in r.record.sites}
    assert moved and all(k.rpartition(".")[0] in sites for k in moved), moved
    assert r.end_to_end["loss_after"] < r.end_to_end["loss_before"] and not r.end_to_end["reverted"]
    assert all(s.type == "dyisru" and s.method.endswith("+e2e") for s in r.record.sites)


def test_the_export_template_computes_every_variant_as_normswap_does():
    from test_export_remote import _template

    t = _template()
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16) * 3
    for variant in VARIANTS:
        spec = {"type": variant, "dim": 16, "weight": True, "bias": True, "recenter": variant == "derf"}
        ours, theirs = normswap.modules.new_norm(spec), t.new_norm(spec)
        with torch.no_grad():
            for p in ours.parameters():
                p.copy_(torch.rand_like(p) + 0.1)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x)), variant


def test_a_variant_has_no_stock_export():
    from normswap.export.stock import record_blockers

    _, result = convert_model(tiny_model("gpt2"), "dyt", calib_tokens=256, variant="dyisru")
    assert any("DyT site" in r for r in record_blockers(result.record))


def test_variant_options_are_checked(tmp_path, monkeypatch, capsys):
    for kwargs, needle in ((dict(to="dyt", variant="sigmoid"), "unknown --variant"), (dict(to="rmsnorm", variant="dyisru"), "--to dyt"),
                           (dict(to="none", variant="derf"), "--to dyt"), (dict(to="dyt", variant="dyisru", alpha_init=0.5), "--alpha-init")):
        with pytest.raises(NormswapError, match=needle):
            convert_model(tiny_model("gpt2"), **kwargs)
    src = tmp_path / "src"
    tiny_model("gpt2").save_pretrained(src)
    out = tmp_path / "o"
    code, _, err = run_cli(["convert", str(src), "--to", "dyt", "--variant", "tanh2", "--out", str(out)], monkeypatch, capsys)
    refused(code, err, "unknown --variant", exit_code=2)
    code, _, err = run_cli(["convert", str(src), "--to", "dyt", "--variant", "dyisru", "--low-memory", "--out", str(out)], monkeypatch, capsys)
    refused(code, err, "--variant dyisru")
    assert not out.exists()
    code, stdout, err = run_cli(["convert", str(src), "--to", "dyt", "--variant", "derf-channel", "--calib-tokens", "256", "--out", str(out),
                                 "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    assert {s["new_type"] for s in json.loads(stdout)["sites"]} == {"derf-channel"}
    from normswap.loading import read_record

    assert {s.type for s in read_record(out)[0].sites} == {"derf-channel"}
    normswap.load(out)
