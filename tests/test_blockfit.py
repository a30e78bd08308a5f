"""Block-local calibration (`--calibrate block`, normswap.blockfit): each unit's norms fitted to the
original unit's output; nothing else moves; the loss is the per-token relative error, computed here
independently."""
from __future__ import annotations

import copy

import pytest
import torch

import normswap
from normswap.blockfit import fit_blocks, fit_units, token_relative_error
from normswap.conversion import convert_model
from normswap.loading import save
from cli_util import refused, run_cli
from tiny_models import model_output, tiny_inputs, tiny_model

torch.set_num_threads(1)

NORM_PARAMS = ("alpha", "weight", "bias", "scale", "shift")


def test_units_are_the_blocks_and_the_norms_outside_them_in_module_order():
    model, result = convert_model(tiny_model("bert"), "dyt", calib_tokens=256, fold=False)
    sites = [s.path for s in result.record.sites]
    units = fit_units(model, sites)
    layers = [n for n, _ in model.named_modules() if n.startswith("bert.encoder.layer.") and n.count(".") == 3]
    # BERT's embedding norm, each layer (its Post-LN norms inside), the masked-LM head's norm
    assert len(layers) >= 2 and units == ["bert.embeddings.LayerNorm", *layers, "cls.predictions.transform.LayerNorm"]
    model, result = convert_model(tiny_model("llama"), "dyt", calib_tokens=256, fold=False)
    units = fit_units(model, [s.path for s in result.record.sites])
    assert units[-1] == "model.norm" and all(u.startswith("model.layers.") for u in units[:-1])


def test_token_relative_error_against_a_loop():
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g) * torch.arange(1, 6)[None, :, None]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    terms = [float(((out[b, t] - target[b, t]) ** 2).sum() / (target[b, t] ** 2).sum()) for b in range(2) for t in range(5) if mask[b, t]]
    assert abs(float(token_relative_error(out, target, mask)) - sum(terms) / len(terms)) < 1e-6
    every = [float(((out[b, t] - target[b, t]) ** 2).sum() / (target[b, t] ** 2).sum()) for b in range(2) for t in range(5)]
    assert abs(float(token_relative_error(out, target, None)) - sum(every) / len(every)) < 1e-6


@pytest.mark.parametrize("name,to", [("gpt2", "dyt"), ("llama", "dyt"), ("bert", "dyt"), ("whisper", "dyt"), ("gpt2", "none")])
def test_only_norm_parameters_move_and_each_unit_improves(name, to):
    kw = {"tied_head": "untie"} if to == "none" else {}
    site, _ = convert_model(tiny_model(name), to, calib_tokens=512, fold=False, **kw)
    block, r = convert_model(tiny_model(name), to, calib_tokens=512, fold=False, calibrate="block", e2e_steps=15, **kw)
    sites = {s.path for s in r.record.sites}
    a, b = site.state_dict(), block.state_dict()
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    owner = lambda k: k.rpartition(".")[0]  # noqa: E731
    assert moved and all(owner(k) in sites and k.rpartition(".")[2] in NORM_PARAMS for k in moved), moved
    summary = r.end_to_end
    assert summary["mode"] == "block" and summary["units"] == len(summary["per_unit"])
    assert all(u["loss_after"] <= u["loss_before"] for u in summary["per_unit"])
    assert summary["loss_after"] < summary["loss_before"]
    kept = set(summary["reverted"])
    for s in r.record.sites:
        in_kept = any(s.path == u or s.path.startswith(u + ".") for u in kept)
        assert s.method.endswith("+block") != in_kept, (s.path, s.method)


def test_the_fit_restores_flags_and_modes_and_touches_nothing_else():
    original = tiny_model("gpt2")
    model, _ = convert_model(copy.deepcopy(original), "dyt", calib_tokens=256, fold=False)
    model.train()
    original.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    orig_state = {k: v.clone() for k, v in original.state_dict().items()}
    from normswap.samples import model_inputs

    fit_blocks(model, original, model_inputs(model, n_tokens=256), steps=5, progress=False)
    assert model.training and original.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(orig_state[k], v) for k, v in original.state_dict().items())


# units whose inputs are the previous unit's output: Llama's second layer and final norm; BERT's
# first layer (the embedding norm's output, dropout off) and second; Whisper's second encoder
# layer, encoder norm, second decoder layer and decoder norm
CARRIED = {"llama": 2, "bert": 2, "whisper": 4}


@pytest.mark.parametrize("name", sorted(CARRIED))
def test_carried_inputs_give_the_fit_a_forward_pass_per_batch_gives(name, monkeypatch):
    import normswap.blockfit as blockfit
    from normswap.samples import model_inputs

    original = tiny_model(name)
    model, _ = convert_model(copy.deepcopy(original), "dyt", calib_tokens=512, fold=False, alpha_init=0.5)
    batches = model_inputs(model, n_tokens=512, what="calibration", batch_size=2)
    assert len(batches) >= 2
    again = copy.deepcopy(model)
    carried = fit_blocks(model, original, batches, steps=8, progress=False)
    monkeypatch.setattr(blockfit, "_carry", lambda *a: None)  # every unit's inputs from a forward pass on every batch
    captured = fit_blocks(again, original, batches, steps=8, progress=False)
    assert carried["carried_units"] == CARRIED[name] and captured["carried_units"] == 0
    assert not carried["reverted"] and carried["loss_after"] < carried["loss_before"]
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert carried["per_unit"] == captured["per_unit"]


def test_block_fitted_values_fold_and_load_back(tmp_path):
    kw = dict(calib_tokens=256, calibrate="block", e2e_steps=10, tied_head="untie")
    model, result = convert_model(tiny_model("gpt2"), "dyt", **kw)
    unfolded, _ = convert_model(tiny_model("gpt2"), "dyt", fold=False, **kw)
    x = tiny_inputs(model)
    ref = model_output(unfolded, x)
    assert float((model_output(model, x) - ref).abs().max() / ref.abs().max()) < 1e-5
    save(model, tmp_path / "m", result.record)
    assert torch.equal(model_output(normswap.load(tmp_path / "m"), x), model_output(model, x))


def test_block_options_are_checked(tmp_path, monkeypatch, capsys):
    from normswap.errors import NormswapError

    with pytest.raises(NormswapError, match="nothing to fit"):
        convert_model(tiny_model("gpt2"), "rmsnorm", calibrate="block")
    src = tmp_path / "src"
    tiny_model("gpt2").save_pretrained(src)
    code, _, err = run_cli(["convert", str(src), "--to", "dyt", "--calibrate", "block", "--low-memory", "--out", str(tmp_path / "o")],
                           monkeypatch, capsys)
    refused(code, err, "--calibrate block")
    assert not (tmp_path / "o").exists()
