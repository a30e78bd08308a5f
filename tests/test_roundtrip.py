"""Converted checkpoints load back bit-identically, strictly, and never silently as plain models."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import normswap
from normswap.loading import save
from tiny_models import RMS_MODELS, TINY, tiny_inputs, tiny_model


def _out(model, x):
    with torch.no_grad():
        o = model(**x)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _convert_and_save(tmp_path, name="gpt2", to="rmsnorm", **kw):
    model, result = normswap.convert(tiny_model(name), to, calib_tokens=512, **kw)
    out = tmp_path / f"{name}-{to}"
    save(model, out, result.record)
    return model, out


CASES = [(n, t) for n in TINY for t in ("rmsnorm", "dyt") if not (n in RMS_MODELS and t == "rmsnorm")]


@pytest.mark.parametrize("name,to", CASES)
def test_load_round_trip_is_bit_identical(tmp_path, name, to):
    model, out = _convert_and_save(tmp_path, name, to)
    loaded = normswap.load(out)
    x = tiny_inputs(model)
    assert torch.equal(_out(model, x), _out(loaded, x))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}


def test_untied_round_trip(tmp_path):
    model, out = _convert_and_save(tmp_path, "gpt2", tied_head="untie")
    loaded = normswap.load(out)
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    x = tiny_inputs(model)
    assert torch.equal(_out(model, x), _out(loaded, x))


def test_auto_classes_after_import(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    model, out = _convert_and_save(tmp_path, "gpt2")
    x = tiny_inputs(model)
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_out(model, x), _out(lm, x))
    body = AutoModel.from_pretrained(out)  # the headless body of the same checkpoint
    with torch.no_grad():
        assert torch.equal(body(**x).last_hidden_state, model.transformer(**x).last_hidden_state)


def test_plain_transformers_refuses_instead_of_silently_rebuilding(tmp_path):
    import subprocess
    import sys

    _, out = _convert_and_save(tmp_path, "gpt2")
    assert json.loads((out / "config.json").read_text())["model_type"] == "normswap"
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode != 0
    assert "normswap" in proc.stderr


def test_record_in_config(tmp_path):
    _, out = _convert_and_save(tmp_path, "gptj")
    cfg = json.loads((out / "config.json").read_text())["normswap"]
    assert cfg["target"] == "rmsnorm" and cfg["exact"] is True and cfg["base_model_type"] == "gptj"
    assert cfg["version"] == normswap.__version__
    assert {s["path"] for s in cfg["sites"]} >= {"transformer.h.0.ln_1", "transformer.ln_f"}
    assert "transformer.h.0.attn.q_proj" in cfg["new_biases"]


def test_missing_key_is_an_error(tmp_path):
    _, out = _convert_and_save(tmp_path, "gpt2")
    state = load_file(str(out / "model.safetensors"))
    state.pop(next(k for k in state if k.endswith("attn.c_attn.bias")))
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(normswap.NormswapError, match="missing"):
        normswap.load(out)


def test_unexpected_key_is_an_error(tmp_path):
    _, out = _convert_and_save(tmp_path, "gpt2")
    state = load_file(str(out / "model.safetensors"))
    state["transformer.h.0.ln_1.weight"] = torch.ones(32)  # a LayerNorm weight the folded norm lacks
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(normswap.NormswapError, match="unexpected"):
        normswap.load(out)


def test_truncated_weights_are_an_error(tmp_path):
    _, out = _convert_and_save(tmp_path, "gpt2")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(normswap.NormswapError, match="corrupt or truncated"):
        normswap.load(out)


def test_save_refuses_existing_folder_and_is_atomic(tmp_path):
    model, out = _convert_and_save(tmp_path, "gpt2")
    before = sorted(p.name for p in out.iterdir())
    _, result = normswap.convert(tiny_model("gpt2"), "rmsnorm")
    with pytest.raises(normswap.NormswapError, match="exists"):
        save(model, out, result.record)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    save(model, out, result.record, overwrite=True)
    assert (out / "model.safetensors").is_file()
