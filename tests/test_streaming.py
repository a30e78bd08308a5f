"""Streaming conversion (normswap.streaming) gives exactly what the in-memory path gives."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import normswap
from normswap.errors import NormswapError
from normswap.loading import is_converted, save
from normswap.streaming import NotStreamable, SafetensorsReader, checkpoint_files, stream_convert
from tiny_models import tiny_inputs, tiny_model

FAMILIES = ["gpt2", "gpt_neox", "gptj", "opt-proj", "phi", "bloom", "falcon-new", "vit", "bert"]


def _tensors(folder):
    state = {}
    for f in checkpoint_files(folder):
        state.update(load_file(str(f)))
    return state


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def _source(tmp_path, name, shard=None):
    src = tmp_path / f"src-{name}"
    kw = {"max_shard_size": shard} if shard else {}
    tiny_model(name).save_pretrained(src, **kw)
    return src


def _in_memory(src, out, to, **kw):
    model, result = normswap.convert(str(src), to, **kw)
    save(model, out, result.record)
    return model


def _assert_same(a, b):
    sa, sb = _tensors(a), _tensors(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ca, cb = _config(a), _config(b)
    assert ca == cb


def _out(model, x):
    with torch.no_grad():
        o = model(**x)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@pytest.mark.parametrize("name,fold", [(n, True) for n in FAMILIES] + [("gpt2", False), ("bloom", False), ("vit", False)])
def test_streamed_equals_in_memory(tmp_path, name, fold):
    src = _source(tmp_path, name)
    model, mem = normswap.convert(str(src), "rmsnorm", fold=fold)
    save(model, tmp_path / "mem", mem.record)
    exact = name not in ("bert",)
    # an approximate result (Post-LN) is measured block by block before it is saved, on the same
    # inputs as the in-memory check: the same figures
    result = stream_convert(src, tmp_path / "stream", "rmsnorm", fold=fold, copy_aux=False, save_tokenizer=False)
    _assert_same(tmp_path / "mem", tmp_path / "stream")
    assert result.record.exact == exact
    if not exact:
        assert result.verification["blockwise"] and result.verification["tokens"] == mem.verification["tokens"]
        assert result.verification["max_rel_diff"] == pytest.approx(mem.verification["max_rel_diff"], rel=1e-6)
    else:
        assert result.verification is None  # exact by construction and bit-identical to the in-memory path


@pytest.mark.parametrize("tied_head", ["center-embed", "untie"])
@pytest.mark.parametrize("name", ["gpt2", "bloom", "opt"])
def test_tied_heads_and_sharded_input(tmp_path, name, tied_head):
    src = _source(tmp_path, name, shard="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    mem = _in_memory(src, tmp_path / "mem", "rmsnorm", fold=True, tied_head=tied_head)
    stream_convert(src, tmp_path / "stream", "rmsnorm", fold=True, tied_head=tied_head, max_shard_size=30_000)
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    _assert_same(tmp_path / "mem", tmp_path / "stream")
    loaded = normswap.load(tmp_path / "stream")  # sharded normswap checkpoints load back strictly
    x = tiny_inputs(loaded)
    assert torch.equal(_out(mem, x), _out(loaded, x))
    assert is_converted(tmp_path / "stream")


@pytest.mark.parametrize("name", ["gpt2", "gemma"])
def test_dyt_alpha_init_streams(tmp_path, name):
    src = _source(tmp_path, name)
    _in_memory(src, tmp_path / "mem", "dyt", fold=True, alpha_init=0.7)
    result = stream_convert(src, tmp_path / "stream", "dyt", fold=True, alpha_init=0.7)
    _assert_same(tmp_path / "mem", tmp_path / "stream")
    assert result.verification["blockwise"] and result.verification["max_rel_diff"] > 0  # measured, never unmeasured


def test_streamed_model_matches_original(tmp_path):
    original = tiny_model("gpt2")
    src = tmp_path / "src"
    original.save_pretrained(src, max_shard_size="20KB")
    stream_convert(src, tmp_path / "out", "rmsnorm", tied_head="untie")
    loaded = normswap.load(tmp_path / "out")
    x = tiny_inputs(original)
    a, b = _out(original, x), _out(loaded, x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def test_refuses_what_cannot_stream(tmp_path):
    src = _source(tmp_path, "gpt2")
    with pytest.raises(NotStreamable, match="none"):
        stream_convert(src, tmp_path / "o", "none")
    assert not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    with pytest.raises(NormswapError, match="exists"):
        stream_convert(src, tmp_path / "exists", "rmsnorm")
    with pytest.raises(NormswapError, match="not found|Hub"):
        stream_convert(tmp_path / "nope", tmp_path / "o2", "rmsnorm")


def test_reader_round_trip_and_truncation(tmp_path):
    src = _source(tmp_path, "gpt2")
    file = src / "model.safetensors"
    ref = load_file(str(file))
    reader = SafetensorsReader([file])
    for k, v in ref.items():
        assert torch.equal(reader.get(k), v)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(NormswapError, match="truncated"):
        SafetensorsReader([file])


def test_cli_low_memory(tmp_path):
    src = _source(tmp_path, "gpt2", shard="20KB")
    cli = [sys.executable, "-m", "normswap", "convert", str(src)]
    r = subprocess.run([*cli, "--to", "rmsnorm", "--out", str(tmp_path / "low"), "--low-memory", "--format", "json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["exact"] and data["low_memory"] and data["tied_head"] == "center-embed"
    _in_memory(src, tmp_path / "mem", "rmsnorm", fold=True)
    _assert_same(tmp_path / "mem", tmp_path / "low")
    r = subprocess.run([*cli, "--to", "none", "--out", str(tmp_path / "none"), "--low-memory"], capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(errors) == 1 and "--to none" in errors[0]
    assert not (tmp_path / "none").exists()


def test_automatic_switch(tmp_path, monkeypatch):
    from normswap.commands import convert as cmd
    from normswap import streaming

    src = _source(tmp_path, "gpt2")
    size = streaming.checkpoint_bytes(src)
    assert size > 0
    monkeypatch.setattr(streaming, "available_memory", lambda: 10 * size)

    def use(to, low_memory=False, calibrate="site", sequential=True, calib_audio=None):
        return cmd._use_streaming(str(src), to, None, low_memory, calibrate, sequential, calib_audio, None, False)

    assert not use("rmsnorm")
    monkeypatch.setattr(streaming, "available_memory", lambda: size)
    assert use("rmsnorm") and use("dyt")  # DyT calibrates block by block
    assert not use("none") and not use("dyt", calibrate="e2e") and not use("dyt", sequential=False)
    with pytest.raises(NormswapError, match="e2e"):
        use("dyt", low_memory=True, calibrate="e2e")
    with pytest.raises(NormswapError, match="parallel"):
        use("dyt", low_memory=True, sequential=False)


def test_a_stored_non_persistent_buffer_is_skipped_as_from_pretrained_does(tmp_path):
    """all-MiniLM-L6-v2 stores BERT's embeddings.position_ids, which the model computes itself."""
    from safetensors.torch import load_file, save_file

    from tiny_models import tiny_model

    src = tmp_path / "src"
    model = tiny_model("bert")
    model.save_pretrained(src)
    f = src / "model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("word_embeddings.weight")).replace("word_embeddings.weight", "position_ids")
    state[key] = torch.arange(model.config.max_position_embeddings).unsqueeze(0)
    save_file(state, str(f), metadata={"format": "pt"})
    result = stream_convert(src, tmp_path / "out", "rmsnorm", copy_aux=False, save_tokenizer=False, approximate_ok=True)
    assert result.record.sites
    assert not any(k.endswith("position_ids") for k in load_file(str(tmp_path / "out" / "model.safetensors")))
