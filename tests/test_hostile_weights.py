"""Hostile cases for weights and conversion records: corrupt safetensors files, tampered records,
ill-typed config.json and index files, architectures that name no class.

Every refusal is one `error:` line (exit 2, no traceback) or one NormswapError from the API, with
the inputs byte-identical (`tree_digest`) and no output folder or hidden debris (`debris`).
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import normswap
from cli_util import debris, refused, run_cli, tree_digest
from normswap.errors import NormswapError
from normswap.training.tiny import make_tiny_pair, tiny_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
CORRUPT = pytest.mark.hostile("corrupt-weights")
RECORD = pytest.mark.hostile("record")
READERS = pytest.mark.hostile("readers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny GPT-2 with a tokenizer (plain, and sharded), and its normswap RMSNorm conversion."""
    root = tmp_path_factory.mktemp("hostile-weights")
    teacher, _ = make_tiny_pair(root, "causal")
    model, result = normswap.convert(str(teacher), "rmsnorm")
    conv = root / "conv"
    normswap.save(model, conv, result.record, tokenizer=result.tokenizer, copy_from=teacher)
    sharded = root / "sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(teacher)).save_pretrained(str(sharded), max_shard_size="20KB")
    for f in teacher.iterdir():  # the tokenizer files
        if f.is_file() and f.name != "model.safetensors" and not (sharded / f.name).exists():
            shutil.copy2(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").is_file()
    text = root / "corpus.txt"
    text.write_text(tiny_corpus(20))
    return {"src": teacher, "conv": conv, "sharded": sharded, "text": text}


@pytest.fixture
def work(assets, tmp_path):
    """Private copies: the cases below damage them."""
    w = {"root": tmp_path, "out": tmp_path / "out"}
    for name in ("src", "conv", "sharded"):
        shutil.copytree(assets[name], tmp_path / name)
        w[name] = tmp_path / name
    shutil.copy(assets["text"], tmp_path / "corpus.txt")
    w["text"] = tmp_path / "corpus.txt"
    return w


def _inputs(w) -> dict[str, str]:
    return {n: tree_digest(w[n]) for n in ("src", "conv", "sharded", "text")}


def _untouched(w, before) -> None:
    assert _inputs(w) == before
    assert not w["out"].exists()
    for p in (w["root"], w["src"], w["conv"], w["sharded"]):
        assert debris(p) == [], debris(p)


def cli_refused(w, args: list, needle: str, monkeypatch, capsys) -> str:
    before = _inputs(w)
    code, _, err = run_cli(args, monkeypatch, capsys)
    line = refused(code, err, needle, exit_code=2)
    _untouched(w, before)
    return line


def api_refused(w, fn: Callable[[], Any], needle: str) -> str:
    before = _inputs(w)
    with pytest.raises(NormswapError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and needle.lower() in msg.lower(), msg
    _untouched(w, before)
    return msg


# --------------------------------------------------------------------- safetensors file surgery


def _parts(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(f: Path, header: dict | bytes, data: bytes) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _reversed(f):
    h, d = _parts(f)
    k = next(k for k in _by_offset(h) if h[k]["data_offsets"][1] > h[k]["data_offsets"][0])
    h[k]["data_offsets"] = h[k]["data_offsets"][::-1]
    _write(f, h, d)


def _overlap(f):
    h, d = _parts(f)
    keys = _by_offset(h)
    size = lambda k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0]  # noqa: E731
    a, b = next((a, b) for i, a in enumerate(keys) for b in keys[i + 1:] if size(a) == size(b) > 0)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])  # b's bytes now alias a's: a wrong model, silently
    _write(f, h, d)


def _gap(f):
    h, d = _parts(f)
    last = _by_offset(h)[-1]
    s, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [s + 8, e + 8]
    _write(f, h, d[:s] + b"\0" * 8 + d[s:])


def _trailing(f):
    f.write_bytes(f.read_bytes() + b"\0" * 16)


def _short(f):
    f.write_bytes(f.read_bytes()[:-64])


def _huge_header(f):
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])


def _header_past_end(f):
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) + 100) + raw[8:])


def _not_json(f):
    h, d = _parts(f)
    n = len(json.dumps(h))
    _write(f, b"{" + b"x" * (n - 1), d)


def _header_list(f):
    _, d = _parts(f)
    _write(f, b"[1, 2, 3]", d)


def _unknown_dtype(f):
    h, d = _parts(f)
    h[_by_offset(h)[0]]["dtype"] = "F19"
    _write(f, h, d)


def _shape_mismatch(f):
    h, d = _parts(f)
    k = next(k for k in _by_offset(h) if h[k]["shape"] and h[k]["shape"][0] > 1)
    h[k]["shape"][0] -= 1
    _write(f, h, d)


def _negative_shape(f):
    h, d = _parts(f)
    k = next(k for k in _by_offset(h) if h[k]["shape"])
    h[k]["shape"][0] = -h[k]["shape"][0]
    _write(f, h, d)


def _duplicate_key(f):
    h, d = _parts(f)
    k = _by_offset(h)[0]
    text = json.dumps(h)
    _write(f, ("{" + json.dumps(k) + ": " + json.dumps(h[k]) + ", " + text[1:]).encode(), d)


def _tiny_file(f):
    f.write_bytes(b"\x01\x02\x03")


def _bad_metadata(f):
    h, d = _parts(f)
    h["__metadata__"] = {"format": 5}
    _write(f, h, d)


CORRUPT_CASES = {
    "reversed-offsets": (_reversed, "data_offsets"),
    "overlapping-offsets": (_overlap, "overlaps"),
    "gap": (_gap, "unused bytes"),
    "trailing-bytes": (_trailing, "trailing bytes"),
    "short-file": (_short, "runs past the end"),
    "huge-header-length": (_huge_header, "exceeds"),
    "header-past-end": (_header_past_end, "runs past the end"),
    "header-not-json": (_not_json, "not valid JSON"),
    "header-not-object": (_header_list, "not a JSON object"),
    "unknown-dtype": (_unknown_dtype, "unknown dtype"),
    "shape-size-mismatch": (_shape_mismatch, "needs"),
    "negative-shape": (_negative_shape, "non-negative"),
    "duplicate-key": (_duplicate_key, "duplicate"),
    "three-byte-file": (_tiny_file, "shorter than its 8-byte"),
    "metadata-not-strings": (_bad_metadata, "__metadata__"),
}


@CORRUPT
@pytest.mark.parametrize("path", ["convert", "low-memory", "load", "inspect-converted"])
@pytest.mark.parametrize("case", list(CORRUPT_CASES))
def test_corrupt_weights_refused_on_every_path(case, path, work, monkeypatch, capsys):
    damage, needle = CORRUPT_CASES[case]
    folder = work["conv"] if path in ("load", "inspect-converted") else work["src"]
    damage(folder / "model.safetensors")
    needle = "corrupt or truncated weights in " + str(folder / "model.safetensors")
    if path == "load":
        msg = api_refused(work, lambda: normswap.load(folder), needle)
    else:
        args = {"convert": ["convert", folder, "--to", "rmsnorm", "--out", work["out"]],
                "low-memory": ["convert", folder, "--to", "rmsnorm", "--out", work["out"], "--low-memory"],
                "inspect-converted": ["inspect", folder]}[path]
        msg = cli_refused(work, args, needle, monkeypatch, capsys)
    assert CORRUPT_CASES[case][1].lower() in msg.lower(), msg


@CORRUPT
def test_streaming_reader_refuses_overlap_directly(work):
    """The reader itself (not only check_source) refuses aliased tensors: they gave a wrong model."""
    from normswap.streaming import SafetensorsReader

    f = work["src"] / "model.safetensors"
    _overlap(f)
    with pytest.raises(NormswapError, match="overlaps"):
        SafetensorsReader([f])


@CORRUPT
def test_sharded_converted_checkpoint_with_a_corrupt_shard(work):
    from normswap.streaming import stream_convert

    out = work["root"] / "stream"
    stream_convert(work["src"], out, "rmsnorm", max_shard_size=30_000)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    _reversed(shard)
    with pytest.raises(NormswapError, match=f"corrupt or truncated weights in {shard}"):
        normswap.load(out)


# -------------------------------------------------------------------------- conversion records


def _site(i: int):
    return lambda r: r["sites"][i]


def _set_site(i: int, **kw):
    return lambda r: r["sites"][i].update(kw)


def _setr(**kw):
    return lambda r: r.update(kw)


def _delr(key):
    return lambda r: r.pop(key)


RECORD_CASES = {
    "path-__class__": (_set_site(0, path="__class__"), "not a dotted module path"),
    "path-dunder-segment": (_set_site(0, path="transformer.h.0.ln_1.__dict__"), "not a dotted module path"),
    "path-dotdot": (_set_site(0, path="transformer..h.0.ln_1"), "not a dotted module path"),
    "path-empty-segment": (_set_site(0, path="transformer.h.0.ln_1."), "not a dotted module path"),
    "path-empty": (_set_site(0, path=""), "dotted module path"),
    "path-not-identifier": (_set_site(0, path="transformer.h.0.ln-1"), "not a dotted module path"),
    "path-not-a-string": (_set_site(0, path=["transformer"]), "dotted module path"),
    "path-no-such-module": (_set_site(0, path="transformer.h.9.ln_1"), "names no module"),
    "path-not-a-norm": (_set_site(0, path="transformer.h.0.attn"), "not a norm"),
    "path-duplicate-site": (lambda r: r["sites"].append(dict(r["sites"][0])), "twice"),
    "new-bias-__class__": (_setr(new_biases=["transformer.h.0.__class__"]), "not a dotted module path"),
    "new-bias-has-bias": (_setr(new_biases=["transformer.h.0.attn.c_attn"]), "already has a bias"),
    "new-bias-not-linear": (_setr(new_biases=["transformer.h.0.attn"]), "not a linear"),
    "centered-embedding-dotdot": (_setr(centered_embeddings=["transformer..wte"]), "not a dotted module path"),
    "centered-embedding-not-embedding": (_setr(centered_embeddings=["transformer.h.0.mlp.c_fc"]), "not an embedding"),
    "unfolded-dunder": (_setr(unfolded={"__dict__": "x"}), "not a dotted module path"),
    "unfolded-not-a-site": (_setr(unfolded={"transformer.h.0.attn": "x"}), "not a recorded site"),
    "type-unknown": (_set_site(0, type="batchnorm"), "type 'batchnorm' is not one of"),
    "dim-negative": (_set_site(0, dim=-32), "dim must be an integer"),
    "dim-zero": (_set_site(0, dim=0), "dim must be an integer"),
    "dim-huge": (_set_site(0, dim=10**12), "dim must be an integer"),
    "dim-string": (_set_site(0, dim="32"), "dim must be an integer"),
    "dim-bool": (_set_site(0, dim=True), "dim must be an integer"),
    "dim-mismatch": (_set_site(0, dim=31), "has dim 31, but the LayerNorm it replaces has 32"),
    "eps-negative": (_set_site(0, eps=-1e-5), "eps must be a positive finite number"),
    "eps-nan": (_set_site(0, eps=math.nan), "eps must be a positive finite number"),
    "eps-string": (_set_site(0, eps="1e-5"), "eps must be a positive finite number"),
    "eps-null-for-rmsnorm": (_set_site(0, eps=None), "eps must be a positive finite number"),
    "alpha-inf": (_set_site(0, alpha=math.inf), "alpha must be a finite number"),
    "weight-not-bool": (_set_site(0, weight=1), "weight must be true or false"),
    "placement-unknown": (_set_site(0, placement="sideways"), "placement"),
    "target-unknown": (_setr(target="batchnorm"), "target 'batchnorm'"),
    "style-unknown": (_setr(style="mid"), "style 'mid'"),
    "tied-head-unknown": (_setr(tied_head="both"), "tied_head 'both'"),
    "exact-not-bool": (_setr(exact="yes"), "exact must be true or false"),
    "architecture-pipeline": (_setr(architecture="pipeline"), "not a transformers model class"),
    "architecture-auto-class": (_setr(architecture="AutoModel"), "not a transformers model class"),
    "architecture-dunder": (_setr(architecture="__class__"), "not a transformers model class"),
    "architecture-unknown": (_setr(architecture="GPT7LMHeadModel"), "not in transformers"),
    "architecture-other-config": (_setr(architecture="BertModel"), "does not take a 'gpt2' config"),
    "base-model-type-unknown": (_setr(base_model_type="gpt7"), "not a model type"),
    "base-model-type-normswap": (_setr(base_model_type="normswap"), "not a model type"),
    "missing-key": (_delr("target"), "missing key 'target'"),
    "missing-site-key": (lambda r: r["sites"][0].pop("dim"), "missing key 'dim' in sites[0]"),
    "unknown-key": (_setr(evil=1), "unknown key 'evil'"),
    "unknown-site-key": (_set_site(0, __init__=1), "unknown key '__init__' in sites[0]"),
    "record-not-object": (lambda r: [], "not an object"),
    "sites-not-list": (_setr(sites={"a": 1}), "sites must be a list"),
    "source-not-object": (_setr(source="x"), "source must be an object"),
    "digest-malformed": (_setr(digest="md5:abc"), "digest"),
    "digest-wrong": (_setr(digest="sha256:" + "0" * 64), "modified"),
    "tampered-eps": (_set_site(0, eps=0.5), "modified"),
    "tampered-type-identity": (_set_site(0, type="identity"), "modified"),
    "tampered-type-dyt": (_set_site(0, type="dyt"), "modified"),
    "tampered-recenter": (_set_site(0, recenter=True), "modified"),
    "tampered-unfolded-note": (lambda r: r["unfolded"].update({k: "ok" for k in r["unfolded"]}), "modified"),
}


def _tamper_record(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    new = fn(cfg["normswap"])
    if isinstance(new, list):  # the case that replaces the whole section
        cfg["normswap"] = new
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


@RECORD
@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_tampered_record_refused(case, work, monkeypatch, capsys):
    fn, needle = RECORD_CASES[case]
    _tamper_record(work["conv"], fn)
    line = cli_refused(work, ["convert", work["conv"], "--to", "dyt", "--alpha-init", "0.5", "--out", work["out"]],
                       needle, monkeypatch, capsys)
    assert str(work["conv"]) in line, line  # names the folder / file
    api_refused(work, lambda: normswap.load(work["conv"]), needle)


@RECORD
def test_record_errors_name_the_file_and_the_key(work):
    _tamper_record(work["conv"], _setr(evil=1))
    msg = api_refused(work, lambda: normswap.load(work["conv"]), "unknown key 'evil'")
    assert str(work["conv"] / "config.json") in msg


@RECORD
def test_architecture_pipeline_never_calls_transformers_pipeline(work, monkeypatch):
    import transformers

    called = []
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: called.append(a))
    _tamper_record(work["conv"], _setr(architecture="pipeline"))
    api_refused(work, lambda: normswap.load(work["conv"]), "not a transformers model class")
    assert called == []


def _replace_tensor(folder: Path, fn) -> None:
    f = folder / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt"})


def _int64_weight(state):
    k = "transformer.wte.weight"
    state[k] = (state[k] * 100).to(torch.int64)


def _nan_weight(state):
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")


def _inf_weight(state):
    state["transformer.h.1.attn.c_proj.bias"][3] = float("-inf")


def _bool_weight(state):
    state["transformer.ln_f.weight"] = state["transformer.ln_f.weight"] > 0


def _wrong_shape(state):
    state["transformer.ln_f.bias"] = torch.zeros(33)


WEIGHT_CASES = {
    "int64-weight": (_int64_weight, "has dtype int64"),
    "bool-weight": (_bool_weight, "has dtype bool"),
    "nan-weight": (_nan_weight, "non-finite"),
    "inf-weight": (_inf_weight, "non-finite"),
    "wrong-shape-consistent-header": (_wrong_shape, "has shape [33]"),
}


@RECORD
@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weight_values_checked_on_load(case, work, monkeypatch, capsys):
    fn, needle = WEIGHT_CASES[case]
    _replace_tensor(work["conv"], fn)
    cli_refused(work, ["inspect", work["conv"]], needle, monkeypatch, capsys)
    api_refused(work, lambda: normswap.load(work["conv"]), needle)


@RECORD
def test_nan_error_names_the_tensor(work):
    _replace_tensor(work["conv"], _nan_weight)
    api_refused(work, lambda: normswap.load(work["conv"]), "tensor transformer.h.0.mlp.c_fc.weight holds non-finite")


@RECORD
def test_record_without_digest_loads_with_a_warning(work, monkeypatch, capsys):
    _tamper_record(work["conv"], _delr("digest"))
    code, out, err = run_cli(["inspect", work["conv"], "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    assert "no integrity digest" in err and json.loads(out)["architecture"] == "GPT2LMHeadModel"


@RECORD
def test_digest_covers_record_and_tensors_and_both_save_paths_agree(work):
    from normswap.streaming import stream_convert

    mem, low = work["root"] / "mem", work["root"] / "low"
    model, result = normswap.convert(str(work["src"]), "rmsnorm")
    normswap.save(model, mem, result.record)
    stream_convert(work["src"], low, "rmsnorm", copy_aux=False, save_tokenizer=False)
    d_mem = json.loads((mem / "config.json").read_text())["normswap"]["digest"]
    d_low = json.loads((low / "config.json").read_text())["normswap"]["digest"]
    assert d_mem == d_low and d_mem.startswith("sha256:") and result.record.digest == d_mem
    # the digest changes with any tensor name/shape/dtype change, even with the record left alone
    _replace_tensor(mem, lambda s: s.update({"transformer.ln_f.bias": s["transformer.ln_f.bias"].double()}))
    with pytest.raises(NormswapError, match="modified"):
        normswap.load(mem)


@RECORD
def test_checkpoint_saved_before_a_record_field_was_added_still_loads(work):
    """A record field added later with a default (sites' `center`, `centered_inputs`) must not make
    every older checkpoint read as modified: the digest is checked over the record as stored."""
    from normswap.integrity import read_checkpoint, record_digest, tensor_list, weight_files

    def older(rec):
        rec.pop("centered_inputs")
        for site in rec["sites"]:
            site.pop("center")
        files, weight_map = weight_files(work["conv"])
        body = {k: v for k, v in rec.items() if k != "digest"}
        rec["digest"] = record_digest(body, tensor_list(read_checkpoint(files, weight_map, work["conv"] / "model.safetensors.index.json")))

    _tamper_record(work["conv"], older)
    normswap.load(work["conv"])  # no "modified" refusal
    _tamper_record(work["conv"], lambda rec: rec["sites"][0].update(center=True))  # a real change still is one
    with pytest.raises(NormswapError, match="modified"):
        normswap.load(work["conv"])


@RECORD
def test_exported_checkpoint_with_digest_still_loads_without_normswap(work):
    """The Hub template reads the record as a dict: the digest key must not disturb it."""
    import importlib.util

    from normswap.export.remote import export_for_hub

    exp = work["root"] / "export"
    export_for_hub(work["conv"], exp)
    spec = importlib.util.spec_from_file_location("modeling_normswap_test", exp / "modeling_normswap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.load_normswap(str(exp))
    b = normswap.load(exp)
    x = torch.randint(0, b.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)


# ------------------------------------------------------------------------------------- readers


CONFIG_CASES = {
    "not-json": b'{"model_type": "gpt2",',
    "empty": b"",
    "json-list": b'["gpt2"]',
    "json-string": b'"gpt2"',
    "not-utf8": b'{"model_type": "\xff\xfe"}',
    "nested-too-deep": b"[" * 100_000 + b"]" * 100_000,
    "duplicate-key": None,  # built from the real config
    "model-type-not-string": None,
    "architectures-not-list": None,
}
CONFIG_NEEDLES = {"duplicate-key": "duplicate key", "model-type-not-string": "model_type must be a string",
                  "architectures-not-list": "architectures must be a list", "nested-too-deep": "nested too deeply",
                  "json-list": "expected a JSON object", "json-string": "expected a JSON object", "not-utf8": "UTF-8"}


def _bad_config(folder: Path, case: str) -> None:
    f = folder / "config.json"
    raw = CONFIG_CASES[case]
    if raw is None:
        cfg = json.loads(f.read_text())
        if case == "duplicate-key":
            text = json.dumps(cfg)
            raw = ('{"model_type": "bert", ' + text[1:]).encode()
        elif case == "model-type-not-string":
            raw = json.dumps({**cfg, "model_type": 5}).encode()
        else:
            raw = json.dumps({**cfg, "architectures": "GPT2LMHeadModel"}).encode()
    f.write_bytes(raw)


READER_PATHS = {
    "convert": lambda w, m: ["convert", m, "--to", "rmsnorm", "--out", w["out"]],
    "low-memory": lambda w, m: ["convert", m, "--to", "rmsnorm", "--out", w["out"], "--low-memory"],
    "inspect": lambda w, m: ["inspect", m],
    "eval": lambda w, m: ["eval", m, "--ppl", w["text"], "--out", w["out"]],
}


@READERS
@pytest.mark.parametrize("path", list(READER_PATHS))
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_invalid_source_config_is_one_line_naming_the_file(case, path, work, monkeypatch, capsys):
    _bad_config(work["src"], case)
    line = cli_refused(work, READER_PATHS[path](work, work["src"]), str(work["src"] / "config.json"), monkeypatch, capsys)
    assert CONFIG_NEEDLES.get(case, "not JSON").lower() in line.lower(), line
    assert "tokenizer" not in line and "not a normswap" not in line and "no weights" not in line, line


@READERS
@pytest.mark.parametrize("path", ["eval", "convert", "load", "load_tokenizer", "read_record"])
@pytest.mark.parametrize("case", ["not-json", "json-list", "model-type-not-string", "duplicate-key"])
def test_invalid_converted_config_is_not_called_something_else(case, path, work, monkeypatch, capsys):
    from normswap.loading import load_tokenizer, read_record

    _bad_config(work["conv"], case)
    needle = str(work["conv"] / "config.json")
    api = {"load": lambda: normswap.load(work["conv"]), "load_tokenizer": lambda: load_tokenizer(str(work["conv"])),
           "read_record": lambda: read_record(work["conv"])}
    if path in api:
        line = api_refused(work, api[path], needle)
    else:
        line = cli_refused(work, READER_PATHS[path](work, work["conv"]), needle, monkeypatch, capsys)
    assert "tokenizer" not in line and "not a normswap" not in line, line


@READERS
def test_is_converted_does_not_swallow_an_invalid_config(work):
    from normswap.loading import is_converted

    _bad_config(work["conv"], "not-json")
    api_refused(work, lambda: is_converted(work["conv"]), "not JSON")


@READERS
def test_damaged_tokenizer_files_are_not_no_tokenizer(work, monkeypatch, capsys):
    (work["conv"] / "tokenizer.json").write_text("{broken")
    line = cli_refused(work, READER_PATHS["eval"](work, work["conv"]), "tokenizer files of", monkeypatch, capsys)
    assert "has no tokenizer" not in line


def _index(folder: Path) -> Path:
    return folder / "model.safetensors.index.json"


def _edit_index(fn):
    def edit(folder: Path) -> None:
        data = json.loads(_index(folder).read_text())
        fn(data["weight_map"])
        _index(folder).write_text(json.dumps(data))
    return edit


def _first(wm):
    return next(iter(wm))


INDEX_CASES = {
    "index-not-json": (lambda d: _index(d).write_text("{\"weight_map\": "), "not JSON"),
    "index-not-object": (lambda d: _index(d).write_text("[]"), "expected a JSON object"),
    "index-no-weight-map": (lambda d: _index(d).write_text("{\"metadata\": {}}"), "no 'weight_map'"),
    "index-path-traversal": (_edit_index(lambda wm: wm.update({_first(wm): "../../etc/evil.safetensors"})), "not a .safetensors file name"),
    "index-missing-shard": (_edit_index(lambda wm: wm.update({_first(wm): "model-00009-of-00009.safetensors"})), "does not exist"),
    "index-wrong-shard": (_edit_index(lambda wm: wm.update({_first(wm): sorted(set(wm.values()))[-1]})), "but the index says"),
    "index-extra-tensor": (_edit_index(lambda wm: wm.update({"transformer.ghost": sorted(set(wm.values()))[0]})), "does not hold it"),
    "shard-corrupt": (lambda d: _reversed(sorted(d.glob("model-*.safetensors"))[0]), "corrupt or truncated weights in"),
}


@READERS
@pytest.mark.parametrize("path", ["convert", "low-memory"])
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_damaged_index_is_one_line_naming_the_file(case, path, work, monkeypatch, capsys):
    damage, needle = INDEX_CASES[case]
    damage(work["sharded"])
    line = cli_refused(work, READER_PATHS[path](work, work["sharded"]), needle, monkeypatch, capsys)
    assert str(work["sharded"]) in line, line


ARCH_CASES = {
    "no-such-class": ["GPT2LMHeadModelX"],
    "pipeline": ["pipeline"],
    "auto-class": ["AutoModelForCausalLM"],
    "config-class": ["GPT2Config"],
    "second-entry-unknown": ["GPT2LMHeadModel", "NoSuchModel"],
}


@READERS
@pytest.mark.parametrize("path", ["convert", "low-memory", "inspect"])
@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_architectures_naming_no_class_is_an_error(case, path, work, monkeypatch, capsys):
    f = work["src"] / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "architectures": ARCH_CASES[case]}))
    line = cli_refused(work, READER_PATHS[path](work, work["src"]), "names no transformers model class", monkeypatch, capsys)
    assert str(work["src"]) in line


@READERS
def test_missing_architectures_still_falls_back_to_automodel(work, monkeypatch, capsys):
    f = work["src"] / "config.json"
    cfg = json.loads(f.read_text())
    cfg.pop("architectures", None)
    f.write_text(json.dumps(cfg))
    code, _, err = run_cli(["convert", work["src"], "--to", "rmsnorm", "--out", work["out"], "--low-memory"], monkeypatch, capsys)
    assert code == 0, err
    assert normswap.load(work["out"]).__class__.__name__ == "GPT2Model"
