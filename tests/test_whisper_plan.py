"""Whisper as a known family: two residual streams, cross-attention readers, the explicit centring
of the encoder's input, the tied proj_out; exact RMSNorm folding in memory, streaming and after
loading back (tiny random Whisper from tests/tiny_models.py; the real whisper-tiny.en is `slow`)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import normswap
from normswap.archs.plan import build_plan, check_readers
from normswap.assets import asset
from normswap.conversion import EXACT_TOLERANCE, convert_model
from normswap.loading import save
from normswap.modules import RMSNorm
from normswap.surgery.paths import get_module
from tiny_models import tiny_inputs, tiny_model

ENC, DEC = "model.encoder", "model.decoder"


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def whisper():
    return tiny_model("whisper")


def test_plan_has_both_stacks_cross_attention_and_the_explicit_centring(whisper):
    plan = build_plan(whisper)
    paths = [s.path for s in plan.sites]
    # 2 norms per encoder block, 3 per decoder block, a final norm per stack, in forward order
    assert len(paths) == 2 * 2 + 1 + 3 * 2 + 1
    assert paths.index(f"{ENC}.layer_norm") < paths.index(f"{DEC}.layers.0.self_attn_layer_norm")
    enc_final = plan.sites[paths.index(f"{ENC}.layer_norm")]
    assert sorted(enc_final.readers) == sorted(f"{DEC}.layers.{i}.encoder_attn.{p}_proj" for i in range(2) for p in "kv")
    cross_q = plan.sites[paths.index(f"{DEC}.layers.1.encoder_attn_layer_norm")]
    assert cross_q.readers == [f"{DEC}.layers.1.encoder_attn.q_proj"]
    assert plan.sites[-1].path == f"{DEC}.layer_norm" and plan.sites[-1].readers == ["proj_out"]
    assert plan.centred_inputs == [f"{ENC}.layers.0"]
    assert plan.embed_writers == [f"{DEC}.embed_tokens", f"{DEC}.embed_positions"]  # the encoder's start is centred explicitly
    assert f"{DEC}.layers.0.encoder_attn.out_proj" in plan.writers and f"{ENC}.layers.1.fc2" in plan.writers
    assert plan.head == "proj_out" and plan.tied_embedding == f"{DEC}.embed_tokens"
    assert plan.style == "pre" and plan.other_norms == {}
    # the table matches what the model really feeds each reader
    assert check_readers(whisper, plan, tiny_inputs(whisper)) == {}


def _norm_inputs(model, x):
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach()))
               for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, RMSNorm))]
    try:
        _logits(model, x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("tied_head", ["auto", "untie"])
def test_rmsnorm_fold_is_exact_and_every_norm_reads_a_zero_mean_stream(whisper, tied_head):
    x = tiny_inputs(whisper)
    original = copy.deepcopy(whisper)
    model, result = convert_model(copy.deepcopy(whisper), "rmsnorm", fold=True, tied_head=tied_head, dtype="float32")
    assert result.record.exact and _rel(_logits(original, x), _logits(model, x)) <= 1e-5
    assert result.record.centered_inputs == [f"{ENC}.layers.0"]
    # the original's encoder stream is far from zero-mean; every converted norm's input is zero-mean
    before = _norm_inputs(original, x)[f"{ENC}.layers.0.self_attn_layer_norm"]
    assert float(before.mean(-1).abs().max()) > 0.05
    for path, inp in _norm_inputs(model, x).items():
        assert float(inp.mean(-1).abs().max() / inp.pow(2).mean(-1).sqrt().max()) < 1e-5, path
    folded = {s.path: s.folded for s in result.record.sites}
    assert folded[f"{ENC}.layer_norm"]  # into the 4 cross-attention k/v projections
    assert folded[f"{DEC}.layer_norm"] == (tied_head == "untie")  # a tied proj_out cannot take the gain
    if tied_head == "auto":
        assert result.record.centered_embeddings == [f"{DEC}.embed_tokens"]
        assert model.proj_out.weight is model.model.decoder.embed_tokens.weight


def test_cross_attention_projections_carry_the_encoder_final_norm(whisper):
    model, _ = convert_model(copy.deepcopy(whisper), "rmsnorm", fold=True, dtype="float32")
    ln = get_module(whisper, f"{ENC}.layer_norm")
    new = get_module(model, f"{ENC}.layer_norm")
    assert isinstance(new, RMSNorm) and new.weight is None and new.bias is None
    for i in range(2):
        for p in "kv":
            old = get_module(whisper, f"{DEC}.layers.{i}.encoder_attn.{p}_proj")
            lin = get_module(model, f"{DEC}.layers.{i}.encoder_attn.{p}_proj")
            # W' = W diag(g); b' = b + W beta (k_proj had no bias: it gains one)
            torch.testing.assert_close(lin.weight, old.weight * ln.weight, rtol=1e-6, atol=1e-7)
            b0 = old.bias if old.bias is not None else torch.zeros(old.out_features)
            torch.testing.assert_close(lin.bias, b0 + old.weight @ ln.bias, rtol=1e-5, atol=1e-6)


def test_without_the_explicit_centring_rmsnorm_is_not_exact(whisper):
    """The control: the same conversion with the encoder's input left as it starts is off."""
    x = tiny_inputs(whisper)
    model, _ = convert_model(copy.deepcopy(whisper), "rmsnorm", fold=True, dtype="float32")
    block = get_module(model, f"{ENC}.layers.0")
    block.__class__ = type(block).__mro__[2]  # drop the _CenteredInput mixin
    assert type(block).__name__ == "WhisperEncoderLayer"
    assert _rel(_logits(whisper, x), _logits(model, x)) > 1e-3


def test_converted_whisper_loads_back_and_decodes_the_same(tmp_path, whisper):
    import transformers

    x = tiny_inputs(whisper)
    model, result = convert_model(copy.deepcopy(whisper), "rmsnorm", fold=True, dtype="float32")
    save(model, tmp_path / "conv", result.record)
    record = json.loads((tmp_path / "conv" / "config.json").read_text())["normswap"]
    assert record["centered_inputs"] == [f"{ENC}.layers.0"]
    for loaded in (normswap.load(tmp_path / "conv"), transformers.AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "conv")):
        assert type(loaded.model.encoder.layers[0]).__name__ == "CenteredInputWhisperEncoderLayer"
        assert torch.equal(_logits(loaded, x), _logits(model, x))
    start = torch.full((2, 1), whisper.config.decoder_start_token_id)
    with torch.no_grad():
        a = whisper.generate(input_features=x["input_features"], decoder_input_ids=start, max_new_tokens=8, do_sample=False)
        b = normswap.load(tmp_path / "conv").generate(input_features=x["input_features"], decoder_input_ids=start,
                                                      max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_half_precision_source_comes_out_half_and_streaming_gives_the_same_bits(tmp_path, whisper):
    from safetensors.torch import load_file

    from normswap.streaming import stream_convert

    src = tmp_path / "src"
    copy.deepcopy(whisper).half().save_pretrained(src)
    model, result = convert_model(str(src), "rmsnorm", fold=True)
    assert result.record.dtype == "float16" and all(p.dtype == torch.float16 for p in model.parameters())
    save(model, tmp_path / "mem", result.record)
    stream_convert(src, tmp_path / "stream", "rmsnorm", fold=True)
    a, b = load_file(str(tmp_path / "mem" / "model.safetensors")), load_file(str(tmp_path / "stream" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a)
    x = tiny_inputs(whisper)
    ref = _logits(whisper.half().float(), x)  # the fp16 values, computed in fp32
    got = _logits(normswap.load(tmp_path / "stream").float(), x)
    assert _rel(ref, got) <= EXACT_TOLERANCE["float16"]


WHISPER = asset("whisper-tiny.en")


@pytest.mark.slow
@pytest.mark.skipif(not WHISPER.is_dir(), reason="whisper-tiny.en asset missing")
def test_real_whisper_tiny_rmsnorm_fold_is_exact_on_real_speech(tmp_path):
    from normswap.audio import load_audio, read_audio_folder
    from normswap.evaluation.asr import load_processor

    speech = asset("librispeech-subset")
    utts = read_audio_folder(speech).utterances[:3]
    proc = load_processor(str(WHISPER))
    rate = proc.feature_extractor.sampling_rate
    feats = proc.feature_extractor([load_audio(u, rate) for u in utts], sampling_rate=rate, return_tensors="pt").input_features
    x = {"input_features": feats, "decoder_input_ids": proc.tokenizer(["<|startoftranscript|><|notimestamps|> Hello there, how are you?"] * 3,
                                                                        add_special_tokens=False, return_tensors="pt").input_ids}
    original = normswap.loading.load_pretrained(str(WHISPER), dtype=torch.float32)
    model, result = convert_model(str(WHISPER), "rmsnorm", fold=True, dtype="float32")
    assert result.record.exact
    assert _rel(_logits(original, x), _logits(model, x)) <= 1e-5


def test_inspect_promises_what_convert_delivers(tmp_path, whisper, monkeypatch, capsys):
    from cli_util import run_cli

    src = tmp_path / "src"
    whisper.save_pretrained(src)
    code, stdout, err = run_cli(["inspect", str(src), "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["family"] == "whisper" and report["reader_check_passed"] and report["centred_inputs"] == [f"{ENC}.layers.0"]
    _, result = convert_model(str(src), "rmsnorm", fold=True)
    delivered = {s.path: (s.exact, s.folded) for s in result.record.sites}
    promised = {s["path"]: (s["rmsnorm"] == "exact", s["fold"] == "yes") for s in report["sites"]}
    assert promised == delivered


def test_approximate_conversions_say_when_noise_stood_in_for_data():
    """ViT (no image-data option) and a speech model without --verify-audio are measured on seeded
    noise: the result says so instead of passing the figure off as measured on data."""
    for name, needle in (("vit", "random images"), ("whisper", "random features")):
        _, result = convert_model(tiny_model(name), "dyt", alpha_init=0.5)
        assert result.verification is not None and any(needle in w for w in result.warnings), (name, result.warnings)
