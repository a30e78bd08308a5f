"""Block-wise conversion (normswap.blockwise, streaming DyT calibration and verification): the same
result as the in-memory path, with one block of weights in memory at a time."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from safetensors.torch import load_file

import normswap
from normswap.blockwise import LazyWeights, SpillStore
from normswap.loading import save
from normswap.streaming import NotStreamable, checkpoint_files, stream_convert
from tiny_models import TINY, tiny_inputs, tiny_model

TEXT_FAMILIES = [n for n in TINY if n != "whisper"]


def _tensors(folder):
    state = {}
    for f in checkpoint_files(folder):
        state.update(load_file(str(f)))
    return state


def _source(tmp_path, name, dtype=None, **overrides):
    src = tmp_path / f"src-{name}"
    model = tiny_model(name, **overrides)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(src)
    return src


@pytest.mark.parametrize("name,fold", [(n, True) for n in TEXT_FAMILIES] + [(n, False) for n in ("gpt2", "bert", "llama", "gemma")])
def test_blockwise_dyt_equals_in_memory(tmp_path, name, fold):
    """Same alphas, affines and folded readers, bit for bit, and the same measured deviation."""
    src = _source(tmp_path, name)
    model, mem = normswap.convert(str(src), "dyt", fold=fold)
    save(model, tmp_path / "mem", mem.record)
    result = stream_convert(src, tmp_path / "blk", "dyt", fold=fold, copy_aux=False, save_tokenizer=False)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "blk")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert [s.alpha for s in result.record.sites] == [s.alpha for s in mem.record.sites]
    assert all(s.method == "calibrated-sequential" for s in result.record.sites)
    assert {p: v["rel_error"] for p, v in result.calibration.items()} == {p: v["rel_error"] for p, v in mem.calibration.items()}
    v, w = result.verification, mem.verification
    assert v["blockwise"] and v["tokens"] == w["tokens"]
    assert v["max_rel_diff"] == pytest.approx(w["max_rel_diff"], rel=1e-6)


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_bf16_source_keeps_its_dtype(tmp_path, name):
    """A bfloat16 checkpoint converts to bfloat16 (dtype auto), block-wise as in memory: weights held
    in bf16 and cast to float32 one module at a time give the in-memory float32 path's values."""
    src = _source(tmp_path, name, dtype=torch.bfloat16)
    model, mem = normswap.convert(str(src), "dyt")
    save(model, tmp_path / "mem", mem.record)
    result = stream_convert(src, tmp_path / "blk", "dyt", copy_aux=False, save_tokenizer=False)
    assert result.record.dtype == "bfloat16"
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "blk")
    for k in a:
        assert b[k].dtype == torch.bfloat16
        assert torch.equal(a[k], b[k]), k
    assert result.verification["converted_dtype"] == "bfloat16" and result.verification["compute_dtype"] == "float32"


def test_one_block_of_weights_at_a_time(tmp_path, monkeypatch):
    src = _source(tmp_path, "gpt2", n_layer=4)
    live: list[int] = []
    enter = LazyWeights._enter

    def probe(self, block, args):
        enter(self, block, args)
        blocks = [self.model.get_submodule(p) for p in self.blocks]
        live.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))

    monkeypatch.setattr(LazyWeights, "_enter", probe)
    stream_convert(src, tmp_path / "blk", "dyt", copy_aux=False, save_tokenizer=False)
    # 4 blocks x (targets pass, fitting pass, original and converted verification passes)
    assert len(live) >= 16 and max(live) == 1


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_token_wise_modules_run_by_row_slices_with_the_same_outputs(name):
    """The feed-forward runs a few tokens at a time in block-wise passes: same outputs as the whole
    model in memory, more calls, and each module's own forward back afterwards."""
    from normswap.archs.plan import build_plan
    from normswap.blockwise import block_paths, empty_model

    model = tiny_model(name).eval()
    plan = build_plan(model)
    assert plan.token_wise and all(p.endswith(("mlp", "intermediate")) for p in plan.token_wise)
    batch = tiny_inputs(model, batch=3, length=10)
    with torch.no_grad():
        want = model(**batch)[0]
    state = model.state_dict()
    lazy = empty_model(model.config, type(model))
    seen: list[int] = []
    first_linear = next(m for m in lazy.get_submodule(plan.token_wise[0]).modules() if hasattr(m, "weight"))
    handle = first_linear.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    blocks = block_paths(lazy, [s.path for s in plan.sites])
    with LazyWeights(lazy, lambda n: state[n].clone(), blocks, token_wise=plan.token_wise, rows=7):
        with torch.no_grad():
            got = lazy(**batch)[0]
        assert seen == [7, 7, 7, 7, 2]  # 30 tokens, 7 rows at a time
    handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert all("forward" not in lazy.get_submodule(p).__dict__ for p in plan.token_wise)
    assert all(p.device.type == "meta" for p in lazy.parameters())


@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "conv1d"])
def test_a_large_linear_casts_its_weight_a_slice_at_a_time_with_the_same_outputs(kind):
    """A linear whose weight stays in bf16 computes its output by slices of output features, each
    weight slice cast to float32 on its own: the output of casting the whole weight."""
    from transformers.pytorch_utils import Conv1D

    from normswap.blockwise import _by_output_slices

    torch.manual_seed(0)
    mod = Conv1D(37, 24) if kind == "conv1d" else nn.Linear(24, 37, bias=kind == "linear")
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_()
    mod = mod.to(torch.bfloat16)
    x = torch.randn(3, 5, 24)
    want = copy.deepcopy(mod).float()(x)
    calls: list[int] = []
    real_linear, real_addmm = torch.nn.functional.linear, torch.addmm
    forward = _by_output_slices(mod, torch.float32, slice_bytes=10 * 24 * 4)  # 10 output features a slice
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", lambda x, w, b=None: (calls.append(w.shape[0]), real_linear(x, w, b))[1])
        mp.setattr(torch, "addmm", lambda b, x, w: (calls.append(w.shape[1]), real_addmm(b, x, w))[1])
        got = forward(x)
    assert calls == [10, 10, 10, 7]
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,centred", [("llama", False), ("gpt2", False), ("gpt2", True)])
def test_a_bf16_model_with_every_linear_cast_per_call_gives_the_in_memory_outputs(name, centred, monkeypatch):
    """With every linear and embedding large enough to be cast per call (the threshold lowered to
    zero), a block-wise pass of a bf16 model gives the logits of the whole model upcast in memory;
    embeddings (centred ones too, as after `--to rmsnorm` on GPT-2) look their rows up in bf16 and
    never cast their whole table."""
    import normswap.blockwise as bw
    from normswap.archs.plan import build_plan
    from normswap.modules import centre_lookups
    from normswap.verification import float32_compute

    model = tiny_model(name).eval().to(torch.bfloat16)
    if centred:
        centre_lookups(model.get_input_embeddings())
    plan = build_plan(model)
    batch = tiny_inputs(model, batch=2, length=9)
    with torch.no_grad(), float32_compute(model):
        want = model(**batch).logits
    state = model.state_dict()
    monkeypatch.setattr(bw, "_SMALL_BYTES", 0)
    monkeypatch.setattr(bw, "WEIGHT_SLICE_BYTES", 64 * 4 * 3)  # a few output features a slice
    lazy = bw.empty_model(model.config, type(model), torch.bfloat16)
    if centred:
        centre_lookups(lazy.get_input_embeddings())
    upcast: list[str] = []
    real_upcast = bw.LazyWeights._upcast
    monkeypatch.setattr(bw.LazyWeights, "_upcast", lambda self, mod, args: (upcast.append(type(mod).__name__), real_upcast(self, mod, args))[1])
    with bw.LazyWeights(lazy, lambda n: state[n].clone(), bw.block_paths(lazy, [s.path for s in plan.sites])):
        assert any("forward" in m.__dict__ for m in lazy.modules() if type(m).__name__ in ("Linear", "Conv1D"))
        assert "forward" in lazy.get_input_embeddings().__dict__
        with torch.no_grad():
            got = lazy(**batch).logits
    assert not [n for n in upcast if "Embedding" in n]
    assert not any("forward" in m.__dict__ for m in lazy.modules())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_spill_store_round_trip():
    store = SpillStore()
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2, 2).to(torch.bfloat16), "empty": torch.zeros(0, 4)}
    for k, t in tensors.items():
        store.put(k, t)
    for k in reversed(list(tensors)):
        got = store.get(k)
        assert got.dtype == tensors[k].dtype and torch.equal(got, tensors[k])
    assert store.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    store.close()


def test_speech_calibration_is_refused(tmp_path):
    src = _source(tmp_path, "whisper")
    with pytest.raises(NotStreamable, match="speech"):
        stream_convert(src, tmp_path / "o", "dyt")
    assert not (tmp_path / "o").exists()


def test_cli_low_memory_dyt(tmp_path):
    src = _source(tmp_path, "llama", n_layer=2)
    out = tmp_path / "low"
    r = subprocess.run([sys.executable, "-m", "normswap", "convert", str(src), "--to", "dyt", "--out", str(out), "--low-memory",
                        "--calib-tokens", "512", "--device", "cpu", "--format", "json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["low_memory"] and data["device"] == "cpu" and data["verification"]["blockwise"]
    assert all(s["method"] == "calibrated-sequential" and "calib_rel_error" in s for s in data["sites"])
    model, mem = normswap.convert(str(src), "dyt", calib_tokens=512)
    loaded = normswap.load(out)
    x = tiny_inputs(loaded)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, loaded(**x).logits)
    assert data["max_rel_diff"] == pytest.approx(mem.verification["max_rel_diff"], rel=1e-6)


def test_cli_bad_device(tmp_path):
    src = _source(tmp_path, "gpt2")
    for device, why in (("tpu", "unknown --device"), ("cuda:7", "cuda")):
        r = subprocess.run([sys.executable, "-m", "normswap", "convert", str(src), "--to", "dyt", "--out", str(tmp_path / "o"),
                            "--device", device], capture_output=True, text=True, timeout=300)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(errors) == 1 and why in errors[0], r.stderr
        assert not (tmp_path / "o").exists()


def test_deviation_figures_match_a_direct_computation_whatever_the_token_step(monkeypatch):
    """`verification.Deviation` works a few tokens at a time (bounded memory at large
    vocabularies): its max differences and both perplexities are those of whole-batch formulas."""
    import math

    from normswap.verification import Deviation

    torch.manual_seed(0)
    a = torch.randn(3, 150, 97) * 3
    b = a + torch.randn_like(a) * 0.1
    ids = torch.randint(0, 97, (3, 150))
    ce = torch.nn.functional.cross_entropy
    want_ppl = [math.exp(float(ce(x[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)))) for x in (a, b)]
    for step in (7, 64, 1000):
        monkeypatch.setattr(Deviation, "TOKENS", step)
        dev = Deviation(causal=True)
        dev.add(a[:2], b[:2], {"input_ids": ids[:2]}, "logits")
        dev.add(a[2:], b[2:], {"input_ids": ids[2:]}, "logits")
        r = dev.result()
        assert r["max_abs_diff"] == float((a - b).abs().max())
        assert r["max_rel_diff"] == pytest.approx(float((a - b).abs().max() / a.abs().max()), rel=1e-6)
        assert r["tokens"] == 450
        assert r["ppl_original"] == pytest.approx(want_ppl[0], rel=1e-5)
        assert r["ppl_converted"] == pytest.approx(want_ppl[1], rel=1e-5)
