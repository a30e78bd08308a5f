"""Speech inputs for calibration and verification (normswap.samples): Whisper's forced decoder
prompt against what the real whisper-tiny.en's `generate` feeds its decoder, teacher-forced ids
(sentence case, leading space, eos, truncation), features against the processor called directly,
seeded random stand-ins, batches a tiny random Whisper accepts, a teacher's greedy decode for a
folder without transcripts, and one-line refusals.

The tiny Whisper (real vocabulary, processor and tokenizer) and the speech folder of three real
LibriSpeech utterances are test_eval_asr's.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from normswap.errors import NormswapError
from test_eval_asr import IDS, SPEECH, WHISPER, speech_folder, tiny_whisper

pytestmark = pytest.mark.skipif(not (WHISPER.is_dir() and SPEECH.is_dir()), reason="whisper-tiny.en / librispeech-subset assets missing")

SHORT = "1089-134691-0000"  # 2.1 s, "HE COULD WAIT NO LONGER"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from normswap.evaluation.asr import load_processor
    from normswap.loading import load_pretrained

    root = tmp_path_factory.mktemp("samples-speech")
    folder = tiny_whisper(root / "tiny-whisper", seed=0)
    bare = speech_folder(root / "bare", manifest=False)
    (bare / "transcripts.tsv").unlink()
    return {"root": root, "model": load_pretrained(str(folder)), "teacher": load_pretrained(str(tiny_whisper(root / "teacher", seed=1))),
            "proc": load_processor(str(folder)), "data": speech_folder(root / "speech"), "bare": bare}


def _generate(model, feats, **kw):
    """`generate` as `normswap eval --asr` calls it, returning the full sequences and the decoder
    input ids of its first step (read by a hook on the decoder)."""
    seen = []
    hook = model.model.decoder.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].clone()), with_kwargs=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(input_features=feats, do_sample=False, num_beams=1, return_timestamps=False,
                                 return_dict_in_generate=True, **kw)
    finally:
        hook.remove()
    return out.sequences, seen[0]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_prompt_and_teacher_forcing_match_the_real_whisper_tiny_en(tmp_path, one_thread):
    """On the real checkpoint: the prompt is exactly the decoder's first input in `generate`, and the
    teacher-forced transcript is token for token what the model itself writes (less its final '.')."""
    from transformers import WhisperForConditionalGeneration

    from normswap.audio import read_audio_folder
    from normswap.evaluation.asr import load_processor
    from normswap.samples import decoder_prompt, is_speech, speech_batches, speech_features, teacher_forced_ids

    model = WhisperForConditionalGeneration.from_pretrained(str(WHISPER), dtype=torch.float32).eval()
    proc = load_processor(str(WHISPER))
    tok = proc.tokenizer
    folder = speech_folder(tmp_path / "one", ids={SHORT: "test-clean"}, manifest=False)
    (utt,) = read_audio_folder(folder).utterances
    seqs, first = _generate(model, speech_features(proc, [utt]))
    prompt = decoder_prompt(model, tok)
    assert is_speech(model)
    assert prompt == first[0].tolist() == seqs[0, :len(prompt)].tolist() == tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert decoder_prompt(model, None) == prompt  # from the generation config alone
    greedy = seqs[0].tolist()
    assert tok.convert_ids_to_tokens(greedy[len(prompt)])[0] == "Ġ"  # Whisper's text starts with a space token
    assert tok.decode(greedy, skip_special_tokens=True) == " He could wait no longer."
    assert utt.text == "HE COULD WAIT NO LONGER"
    (forced,) = teacher_forced_ids(model, tok, [utt.text])
    eos = model.generation_config.eos_token_id
    assert greedy[-1] == eos and forced == greedy[:-2] + [eos]  # the same tokens, without the '.'
    (batch,) = speech_batches(model, processor=proc, tokenizer=tok, audio=folder, n_utterances=4)
    assert batch["decoder_input_ids"].tolist() == [forced]
    with torch.no_grad():
        logits = model(**batch).logits
    # teacher-forced, the real model predicts its own transcript at every step
    assert logits[0, len(prompt) - 1:-2].argmax(-1).tolist() == forced[len(prompt):-1]


def test_multilingual_prompt_is_what_generate_feeds(env, one_thread):
    """A multilingual generation config: <|en|> <|transcribe|> between start and no-timestamps."""
    import copy

    from normswap.samples import decoder_prompt

    model = copy.deepcopy(env["model"])
    tok = env["proc"].tokenizer
    gen = model.generation_config
    gen.is_multilingual = True
    gen.lang_to_id = {"<|en|>": tok.convert_tokens_to_ids("<|en|>"), "<|de|>": tok.convert_tokens_to_ids("<|de|>")}
    gen.task_to_id = {"transcribe": tok.convert_tokens_to_ids("<|transcribe|>"), "translate": tok.convert_tokens_to_ids("<|translate|>")}
    gen.max_length = 6
    feats = torch.zeros(1, 80, 3000)
    _, first = _generate(model, feats, language="en", task="transcribe")
    prompt = decoder_prompt(model, tok)
    assert prompt == first[0].tolist()
    assert tok.convert_ids_to_tokens(prompt) == ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    # a legacy English-only config: the prompt forced through forced_decoder_ids, no no_timestamps_token_id
    legacy = copy.deepcopy(env["model"])
    legacy.generation_config.forced_decoder_ids = [[1, tok.convert_tokens_to_ids("<|notimestamps|>")]]
    del legacy.generation_config.no_timestamps_token_id
    legacy.generation_config.max_length = 6
    _, first = _generate(legacy, feats)
    assert decoder_prompt(legacy, tok) == first[0].tolist() == tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])


def test_teacher_forced_ids_sentence_case_eos_and_truncation(env):
    from normswap.samples import decoder_prompt, sentence_case, teacher_forced_ids

    model, tok = env["model"], env["proc"].tokenizer
    assert sentence_case("HE HOPED THERE'D BE STEW") == "He hoped there'd be stew"
    assert sentence_case("  'TWAS  A DARK NIGHT ") == "'Twas a dark night"
    assert sentence_case("Mixed case STAYS as it is") == "Mixed case STAYS as it is"
    assert sentence_case("42 IS 6 X 7") == "42 is 6 x 7"
    texts = ["STUFF IT INTO YOU HIS BELLY COUNSELLED HIM", "Already natural, with punctuation."]
    rows = teacher_forced_ids(model, tok, texts)
    prompt = decoder_prompt(model, tok)
    for row, text in zip(rows, texts):
        assert row[:len(prompt)] == prompt and row[-1] == tok.eos_token_id
        assert tok.decode(row, skip_special_tokens=True) == " " + sentence_case(text)
    assert tok.decode(rows[0], skip_special_tokens=True) == " Stuff it into you his belly counselled him"
    (long,) = teacher_forced_ids(model, tok, ["word " * 200])
    assert len(long) == model.config.max_target_positions == 64 and long[:len(prompt)] == prompt
    with pytest.raises(NormswapError, match="no tokenizer"):
        teacher_forced_ids(model, None, texts)


def test_features_match_the_processor_called_directly(env):
    import soundfile as sf

    from normswap.audio import read_audio_folder
    from normswap.samples import speech_features

    proc = env["proc"]
    utts = read_audio_folder(env["data"]).utterances
    feats = speech_features(proc, utts)
    audio = [sf.read(str(u.path), dtype="float32")[0] for u in utts]  # 16 kHz mono FLAC: no resampling
    direct = proc(audio=audio, sampling_rate=16000, return_tensors="pt").input_features
    assert feats.dtype == torch.float32 and feats.shape == (3, 80, 3000)  # padded to 30 s
    assert torch.equal(feats, direct)


def test_random_stand_ins_are_seeded_and_accepted(env, one_thread):
    from normswap.samples import decoder_prompt, model_inputs, speech_batches

    model = env["model"]
    a = speech_batches(model, processor=None, tokenizer=None, audio=None, n_utterances=3, seed=0)
    b = speech_batches(model, processor=None, tokenizer=None, audio=None, n_utterances=3, seed=0)
    c = speech_batches(model, processor=None, tokenizer=None, audio=None, n_utterances=3, seed=1)
    assert len(a) == 3 and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not torch.equal(a[0]["input_features"], c[0]["input_features"])
    assert not torch.equal(a[0]["decoder_input_ids"], c[0]["decoder_input_ids"])
    prompt = decoder_prompt(model, None)
    for batch in a:
        f, ids = batch["input_features"], batch["decoder_input_ids"]
        assert f.shape == (1, model.config.num_mel_bins, 2 * model.config.max_source_positions) and f.dtype == torch.float32
        assert -1 <= f.min() and f.max() <= 1 and f.std() > 0.3
        assert ids[0, :len(prompt)].tolist() == prompt and ids.shape[1] > len(prompt) and ids.max() < model.config.vocab_size
        with torch.no_grad():
            assert model(**batch).logits.shape == (*ids.shape, model.config.vocab_size)
    # the dispatcher: --calib-tokens 4096 stands for 16 utterances, verification's 1024 for 4
    assert len(model_inputs(model, n_tokens=4096)) == 16 and len(model_inputs(model, n_tokens=1024, what="verification")) == 4
    assert len(model_inputs(model, n_tokens=10)) == 1 and len(model_inputs(model, n_tokens=10**6)) == 32


def test_batches_from_a_folder_are_teacher_forced_and_accepted(env, one_thread):
    from normswap.audio import read_audio_folder
    from normswap.samples import model_inputs, speech_batches, speech_features, teacher_forced_ids

    model, proc = env["model"], env["proc"]
    tok = proc.tokenizer
    utts = {u.id: u for u in read_audio_folder(env["data"]).utterances}
    batches = model_inputs(model, processor=proc, audio=env["data"], n_tokens=4096, seed=3)
    assert len(batches) == 3  # all of the folder's 3 utterances, one a batch
    seen = set()
    for batch in batches:
        ids = batch["decoder_input_ids"][0].tolist()
        (uid,) = [k for k, u in utts.items() if teacher_forced_ids(model, tok, [u.text])[0] == ids]
        seen.add(uid)
        assert torch.equal(batch["input_features"], speech_features(proc, [utts[uid]]))
        with torch.no_grad():
            assert torch.isfinite(model(**batch).logits).all()
    assert seen == set(IDS)
    # a seeded choice: the same seed picks the same utterances in the same order, another seed another
    pick = [[b["decoder_input_ids"].tolist() for b in speech_batches(model, processor=proc, audio=env["data"], n_utterances=2, seed=s)]
            for s in (0, 0, 1, 2, 3, 4)]
    assert pick[0] == pick[1] and any(p != pick[0] for p in pick[2:])
    # batch_size 2: sorted by decoder length, each batch cut to its shortest, no padding
    grouped = speech_batches(model, processor=proc, audio=env["data"], n_utterances=3, batch_size=2)
    lengths = sorted(len(i) for i in teacher_forced_ids(model, tok, [u.text for u in utts.values()]))
    assert [tuple(b["decoder_input_ids"].shape) for b in grouped] == [(2, lengths[0]), (1, lengths[2])]
    assert [tuple(b["input_features"].shape) for b in grouped] == [(2, 80, 3000), (1, 80, 3000)]
    with torch.no_grad():
        model(**grouped[0])


def test_a_folder_without_transcripts_takes_the_teachers_greedy_decode(env, one_thread):
    from normswap.audio import read_audio_folder
    from normswap.samples import decoder_prompt, speech_batches, speech_features

    model, teacher, proc = env["model"], env["teacher"], env["proc"]
    with pytest.raises(NormswapError) as e:
        speech_batches(model, processor=proc, audio=env["bare"], n_utterances=2, what="calibration audio (--calib-audio)")
    assert _one_line(e).startswith("calibration audio (--calib-audio): ") and "no transcripts" in str(e.value)
    batches = speech_batches(model, processor=proc, audio=env["bare"], n_utterances=3, teacher=teacher)
    utts = read_audio_folder(env["bare"], require_transcripts=False).utterances
    assert all(u.text is None for u in utts)
    prompt, eos = decoder_prompt(model, None), model.generation_config.eos_token_id
    expected = {}
    for u in utts:  # the teacher's own greedy decode, one utterance at a time, cut after its eos
        seqs, _ = _generate(teacher, speech_features(proc, [u]))
        row = seqs[0].tolist()
        expected[u.id] = row[:row.index(eos) + 1] if eos in row else row
        assert row[:len(prompt)] == prompt and len(expected[u.id]) > len(prompt)
    got = sorted(b["decoder_input_ids"][0].tolist() for b in batches)
    assert got == sorted(expected.values())
    for b in batches:
        with torch.no_grad():
            model(**b)


def test_wrong_inputs_are_refused_in_one_line(env, tmp_path):
    from tiny_models import tiny_model

    from normswap.samples import model_inputs, speech_batches, token_blocks

    model, proc = env["model"], env["proc"]
    with pytest.raises(NormswapError) as e:
        model_inputs(model, processor=proc, text="some calibration text", n_tokens=512)
    assert "takes audio, not text: use --calib-audio/--verify-audio" in _one_line(e)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(NormswapError) as e:
        model_inputs(gpt2, audio=env["data"], n_tokens=512)
    assert "not audio" in _one_line(e)
    with pytest.raises(NormswapError) as e:
        speech_batches(gpt2, processor=proc, audio=env["data"])
    assert "not audio" in _one_line(e)
    with pytest.raises(NormswapError) as e:
        model_inputs(model, processor=proc, audio=tmp_path / "missing", n_tokens=512, what="verification")
    assert _one_line(e) == f"verification audio (--verify-audio): audio folder {tmp_path / 'missing'} not found"
    with pytest.raises(NormswapError) as e:
        model_inputs(model, processor=None, audio=env["data"], n_tokens=512)
    assert "no speech processor" in _one_line(e)
    # text models are unchanged: the dispatcher is token_blocks
    a = model_inputs(gpt2, n_tokens=64, block=16, batch_size=2)
    b = token_blocks(gpt2, None, None, n_tokens=64, block=16, batch_size=2)
    assert len(a) == len(b) == 2 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
