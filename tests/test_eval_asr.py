"""`normswap eval --asr`: the audio folder reader, WER and its S/D/I against an independent edit
distance, Whisper's English normaliser, the paired bootstrap against an independent numpy loop,
one-line refusals for bad folders and non-speech models, and a tiny random Whisper end to end on
three real LibriSpeech FLAC files (plus, marked slow, the real whisper-tiny.en on all 130).

The tiny Whisper has the real vocabulary (51,864 tokens) so that the real processor, tokenizer
and normalizer files of the whisper-tiny.en asset can be copied beside it.
"""
from __future__ import annotations

import csv
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_util import refused, run_cli, tree_digest
from normswap.assets import asset
from normswap.errors import NormswapError

WHISPER = asset("whisper-tiny.en")
SPEECH = asset("librispeech-subset")
IDS = {"2136-5147-0012": "train-clean-100 (mini train-clean-5)", "1089-134691-0000": "test-clean",
       "1867-154075-0014": "train-clean-100 (mini train-clean-5)"}
AUX = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "normalizer.json")

pytestmark = pytest.mark.skipif(not (WHISPER.is_dir() and SPEECH.is_dir()), reason="whisper-tiny.en / librispeech-subset assets missing")


# ---------------------------------------------------------------------------------- independent maths


def edit_ops(ref: list[str], hyp: list[str]) -> tuple[int, int, int, int]:
    """(distance, substitutions, deletions, insertions) of a minimum word edit alignment, by the
    textbook dynamic programme with a backtrace (ties: substitution/match, then deletion)."""
    n, m = len(ref), len(hyp)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]), d[i - 1][j] + 1, d[i][j - 1] + 1)
    i, j, s, de, ins = n, m, 0, 0, 0
    while i or j:
        if i and j and d[i][j] == d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            s += ref[i - 1] != hyp[j - 1]
            i, j = i - 1, j - 1
        elif i and d[i][j] == d[i - 1][j] + 1:
            de, i = de + 1, i - 1
        else:
            ins, j = ins + 1, j - 1
    assert s + de + ins == d[n][m]
    return d[n][m], s, de, ins


def bootstrap_loop(ea, eb, words, resamples, seed):
    """The paired bootstrap written plainly: one resample at a time."""
    rng = np.random.default_rng(seed)
    ea, eb, words = map(np.asarray, (ea, eb, words))
    d = []
    for _ in range(resamples):
        idx = rng.integers(0, len(words), len(words))
        if words[idx].sum() > 0:
            d.append(ea[idx].sum() / words[idx].sum() - eb[idx].sum() / words[idx].sum())
    return np.percentile(d, 2.5), np.percentile(d, 97.5)


def test_word_errors_match_an_independent_edit_distance():
    from normswap.evaluation.asr import corpus_wer, word_errors

    rng = random.Random(0)
    vocab = "a b c d e f".split()
    refs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9))) for _ in range(300)]
    hyps = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9))) for _ in range(300)]
    rows = word_errors(refs, hyps)
    for r, h, row in zip(refs, hyps, rows):
        dist, *_ = edit_ops(r.split(), h.split())
        assert row.errors == dist, (r, h, row)
        assert row.words == len(r.split())
        assert row.hits + row.substitutions + row.deletions == row.words  # every reference word accounted for
        assert row.hits + row.substitutions + row.insertions == len(h.split())  # and every hypothesis word
    nonempty = [(r, h) for r, h in zip(refs, hyps) if r]
    expected = sum(edit_ops(r.split(), h.split())[0] for r, h in zip(refs, hyps)) / sum(len(r.split()) for r in refs)
    assert corpus_wer(rows) == pytest.approx(expected, rel=1e-12)
    assert len(nonempty) < len(refs)  # empty references were in the mix: their hypothesis words count as insertions


@pytest.mark.parametrize("ref,hyp,sdi", [
    ("the cat sat", "the cat sat", (0, 0, 0)),
    ("the cat sat", "the dog sat", (1, 0, 0)),
    ("the cat sat", "the sat", (0, 1, 0)),
    ("the cat sat", "the cat sat down", (0, 0, 1)),
    ("the cat sat on the mat", "a cat on the mat today", (1, 1, 1)),
    ("one two", "", (0, 2, 0)),
    ("", "extra words", (0, 0, 2)),
])
def test_substitutions_deletions_insertions_on_hand_made_pairs(ref, hyp, sdi):
    import jiwer

    from normswap.evaluation.asr import word_errors

    (row,) = word_errors([ref], [hyp])
    assert (row.substitutions, row.deletions, row.insertions) == sdi == edit_ops(ref.split(), hyp.split())[1:]
    if ref:
        j = jiwer.process_words(ref, hyp)
        assert (j.substitutions, j.deletions, j.insertions) == sdi


def test_corpus_wer_is_summed_not_averaged():
    from normswap.evaluation.asr import summary, word_errors

    rows = word_errors(["a b c d e f g h i j", "x"], ["a b c d e f g h i j", "y"])
    s = summary(rows)
    assert s["wer"] == pytest.approx(1 / 11)  # the mean of per-utterance rates would be 0.5
    assert (s["words"], s["utterances"], s["errors"], s["substitutions"]) == (11, 2, 1, 1)


def test_whisper_english_normaliser_from_the_model_folder():
    from normswap.evaluation.asr import load_normalizer, word_errors

    n = load_normalizer(str(WHISPER))
    assert n("Mr. Smith's colour, uh, is twenty-five percent!") == "mister smith is color is 25%"
    assert n("He hoped there'd be STEW.") == "he hoped there would be stew"
    assert n("hmm, the realise [NOISE] (laughs) organisation") == "the realize organization"
    # upper-case LibriSpeech references and punctuated, British-spelt hypotheses meet in the middle
    refs = ["HE COULD WAIT NO LONGER", "THE COLOR OF THE ORGANIZATION"]
    hyps = ["He could wait no longer.", "The colour of the organisation!"]
    assert sum(r.errors for r in word_errors([n(r) for r in refs], [n(h) for h in hyps])) == 0
    assert sum(r.errors for r in word_errors(refs, hyps)) > 0  # unnormalised they differ


def test_paired_bootstrap_matches_an_independent_numpy_loop():
    from normswap.evaluation.asr import paired_bootstrap

    rng = np.random.default_rng(123)
    words = rng.integers(0, 30, 57)
    ea = rng.binomial(words, 0.08) + rng.integers(0, 2, 57)
    eb = rng.binomial(words, 0.05)
    for resamples, seed in ((1000, 0), (333, 7)):
        lo, hi = paired_bootstrap(ea, eb, words, resamples=resamples, seed=seed)
        elo, ehi = bootstrap_loop(ea, eb, words, resamples, seed)
        assert lo == pytest.approx(elo, abs=1e-12) and hi == pytest.approx(ehi, abs=1e-12)
    point = ea.sum() / words.sum() - eb.sum() / words.sum()
    assert lo < point < hi
    # a difference that is the same on every utterance has an interval of width zero
    assert paired_bootstrap(eb, eb, words) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------ fixtures


def tiny_whisper(folder: Path, seed: int = 0, max_length: int = 20) -> Path:
    """A random 1+1-layer Whisper (d_model 16) with the real vocabulary, processor, tokenizer,
    normalizer and generation config (max_length cut so random decodes stay short)."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    real = json.loads((WHISPER / "config.json").read_text())
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=real["vocab_size"], d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=1500,
                        max_target_positions=64, num_mel_bins=80, suppress_tokens=real["suppress_tokens"],
                        begin_suppress_tokens=real["begin_suppress_tokens"], bos_token_id=50257, eos_token_id=50256,
                        pad_token_id=50256, decoder_start_token_id=50257, architectures=["WhisperForConditionalGeneration"])
    WhisperForConditionalGeneration(cfg).eval().save_pretrained(folder, safe_serialization=True)
    gen = GenerationConfig.from_pretrained(str(WHISPER))
    gen.max_length = max_length
    gen.save_pretrained(folder)
    for name in AUX:
        shutil.copy(WHISPER / name, folder / name)
    return folder


def speech_folder(folder: Path, ids=IDS, *, manifest: bool = True, layout: str = "audio") -> Path:
    """A copy of some real utterances: audio/<id>.flac, transcripts.tsv and manifest.tsv."""
    texts = dict(line.split("\t", 1) for line in (SPEECH / "transcripts.tsv").read_text().splitlines())
    (folder / layout).mkdir(parents=True)
    for uid in ids:
        shutil.copy(SPEECH / "audio" / f"{uid}.flac", folder / layout / f"{uid}.flac")
    (folder / "transcripts.tsv").write_text("".join(f"{uid}\t{texts[uid]}\n" for uid in ids))
    if manifest:
        (folder / "manifest.tsv").write_text("id\tsubset\n" + "".join(f"{uid}\t{s}\n" for uid, s in ids.items()))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    return {"root": root, "model": tiny_whisper(root / "tiny-whisper", seed=0), "other": tiny_whisper(root / "tiny-whisper-b", seed=1),
            "data": speech_folder(root / "speech")}


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


# ------------------------------------------------------------------------------------------- reader


def test_reader_reads_transcripts_manifest_and_headers(env):
    from normswap.audio import load_audio, read_audio_folder

    data = read_audio_folder(env["data"])
    assert [u.id for u in data.utterances] == sorted(IDS)
    assert {u.id: u.subset for u in data.utterances} == IDS
    assert data.subsets == ["test-clean", "train-clean-100 (mini train-clean-5)"]
    assert all(u.sample_rate == 16000 and u.channels == 1 and u.text.isupper() for u in data.utterances)
    u = data.utterances[0]
    x = load_audio(u, 16000)
    assert x.dtype == np.float32 and x.shape == (u.frames,) and np.isfinite(x).all()
    only = read_audio_folder(env["data"], subsets=["test-clean"])
    assert [v.id for v in only.utterances] == ["1089-134691-0000"]


def test_librispeech_layout_with_trans_txt(tmp_path):
    """LibriSpeech's own speaker/chapter/*.flac + *.trans.txt layout, without transcripts.tsv."""
    import soundfile as sf

    from normswap.audio import read_audio_folder

    chapter = tmp_path / "ls" / "1089" / "134691"
    chapter.mkdir(parents=True)
    shutil.copy(SPEECH / "audio" / "1089-134691-0000.flac", chapter)
    sf.write(chapter / "1089-134691-0001.flac", np.zeros(1600, dtype=np.float32), 16000)
    (chapter / "1089-134691.trans.txt").write_text("1089-134691-0000 HE COULD WAIT NO LONGER\n1089-134691-0001 SILENCE\n")
    data = read_audio_folder(tmp_path / "ls")
    assert [(u.id, u.text, u.subset) for u in data.utterances] == [
        ("1089-134691-0000", "HE COULD WAIT NO LONGER", None), ("1089-134691-0001", "SILENCE", None)]


def test_other_sample_rates_are_resampled(tmp_path):
    import soundfile as sf

    from normswap.audio import load_audio, read_audio_folder, resample

    x, rate = sf.read(SPEECH / "audio" / "1089-134691-0000.flac", dtype="float32")
    (tmp_path / "d").mkdir()
    up = resample(x, rate, 44100)
    sf.write(tmp_path / "d" / "u.wav", np.stack([up, up], axis=1), 44100, subtype="FLOAT")  # stereo: mixed down
    (tmp_path / "d" / "transcripts.tsv").write_text("id\ttext\nu\tHE COULD WAIT NO LONGER\n")
    (u,) = read_audio_folder(tmp_path / "d").utterances
    assert (u.sample_rate, u.channels) == (44100, 2)
    y = load_audio(u, 16000)
    assert abs(len(y) - len(x)) <= 1
    k = min(len(x), len(y))
    assert np.corrcoef(x[:k], y[:k])[0, 1] > 0.999  # 16 -> 44.1 -> 16 kHz keeps the speech band


# ----------------------------------------------------------------------------------- hostile readers


def _bad_folder(case: str, root: Path) -> tuple[Path, str]:
    """A broken copy of the tiny speech folder for `case`; returns (folder, needle of its error line)."""
    import soundfile as sf

    d = root / case
    if case == "missing_folder":
        return d, "not found"
    if case == "empty_folder":
        d.mkdir()
        return d, "has no audio files"
    speech_folder(d)
    audio = d / "audio"
    first = sorted(IDS)[0]
    if case == "no_transcripts":
        (d / "transcripts.tsv").unlink()
        return d, "has no transcripts"
    if case == "missing_transcript":
        lines = (d / "transcripts.tsv").read_text().splitlines()
        (d / "transcripts.tsv").write_text("\n".join(lines[1:]) + "\n")
        return d, f"no transcript for utterance {list(IDS)[0]}"
    if case == "transcript_without_tab":
        (d / "transcripts.tsv").write_text((d / "transcripts.tsv").read_text() + "stray line without a tab\n")
        return d, f"{d / 'transcripts.tsv'}:4: expected id<TAB>text"
    if case == "transcript_twice":
        lines = (d / "transcripts.tsv").read_text().splitlines()
        (d / "transcripts.tsv").write_text("\n".join(lines + [lines[0]]) + "\n")
        return d, f"{d / 'transcripts.tsv'}:4: utterance {list(IDS)[0]} is listed twice"
    if case == "transcripts_not_utf8":
        (d / "transcripts.tsv").write_bytes((d / "transcripts.tsv").read_bytes() + b"x\tCAF\xe9\n")
        return d, f"{d / 'transcripts.tsv'}:4: not UTF-8"
    if case == "empty_transcript":
        (d / "transcripts.tsv").write_text((d / "transcripts.tsv").read_text() + "u9\t  \n")
        return d, f"{d / 'transcripts.tsv'}:4: empty transcript for utterance u9"
    if case == "unreadable_audio":
        (audio / f"{first}.flac").write_bytes(b"this is not a FLAC file at all" * 10)
        return d, f"cannot read audio file {audio / (first + '.flac')}"
    if case == "truncated_audio":
        raw = (audio / f"{first}.flac").read_bytes()
        (audio / f"{first}.flac").write_bytes(raw[:len(raw) // 2])
        return d, f"{audio / (first + '.flac')}"
    if case == "empty_audio":
        sf.write(audio / f"{first}.wav", np.zeros(0, dtype=np.float32), 16000)
        (audio / f"{first}.flac").unlink()
        return d, f"audio file {audio / (first + '.wav')} is empty"
    if case == "nan_samples":
        x = np.zeros(1600, dtype=np.float32)
        x[100] = np.nan
        (audio / f"{first}.flac").unlink()
        sf.write(audio / f"{first}.wav", x, 16000, subtype="FLOAT")
        return d, "holds NaN or infinite samples"
    if case == "too_long":
        (audio / f"{first}.flac").unlink()
        sf.write(audio / f"{first}.flac", np.zeros(16000 * 31, dtype=np.float32), 16000)
        return d, "is 31.0 s long"
    if case == "two_files_one_id":
        shutil.copy(audio / f"{first}.flac", d / f"{first}.flac")
        return d, f"two audio files for utterance {first}"
    if case == "manifest_row_missing":
        lines = (d / "manifest.tsv").read_text().splitlines()
        (d / "manifest.tsv").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
        return d, f"{d / 'manifest.tsv'} has no row for utterance {list(IDS)[0]}"
    if case == "manifest_without_subset":
        (d / "manifest.tsv").write_text("id\tsplit\n" + "".join(f"{u}\tx\n" for u in IDS))
        return d, "the header has no 'subset' column"
    if case == "fifo_audio":
        import os

        (audio / f"{first}.flac").unlink()
        os.mkfifo(audio / f"{first}.flac")
        return d, "is not a regular file"
    raise AssertionError(case)


READER_CASES = ["missing_folder", "empty_folder", "no_transcripts", "missing_transcript", "transcript_without_tab",
                "transcript_twice", "transcripts_not_utf8", "empty_transcript", "unreadable_audio", "truncated_audio",
                "empty_audio", "nan_samples", "too_long", "two_files_one_id", "manifest_row_missing", "manifest_without_subset",
                "fifo_audio"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model weights are loaded (the refusals must come before)."""
    import normswap.loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(normswap.loading, "load_pretrained", boom)
    monkeypatch.setattr(normswap.loading, "load", boom)


@pytest.mark.hostile("readers")
@pytest.mark.parametrize("case", READER_CASES)
def test_bad_audio_folders_are_one_line_before_any_model_loads(case, env, tmp_path, monkeypatch, capsys, no_model_load):
    folder, needle = _bad_folder(case, tmp_path)
    before = tree_digest(folder) if folder.exists() and case != "fifo_audio" else None
    code, out, err = run_cli(["eval", env["model"], "--asr", folder, "--out", tmp_path / "out"], monkeypatch, capsys)
    line = refused(code, err, needle, exit_code=2)
    assert out == "" and len(line) < 400, line
    assert not (tmp_path / "out").exists()
    if before is not None:
        assert tree_digest(folder) == before


@pytest.mark.hostile("readers")
def test_asr_with_a_model_that_is_not_speech_seq2seq(env, tmp_path, monkeypatch, capsys, no_model_load):
    from test_eval_support import tiny_gpt2_folder

    gpt2 = tiny_gpt2_folder(tmp_path)
    code, _, err = run_cli(["eval", gpt2, "--asr", env["data"]], monkeypatch, capsys)
    refused(code, err, "--asr needs a speech-recognition encoder-decoder", exit_code=2)
    assert "GPT2LMHeadModel" in err
    code, _, err = run_cli(["eval", env["model"], "--baseline", gpt2, "--asr", env["data"]], monkeypatch, capsys)
    refused(code, err, "different tokenizers", exit_code=2)


@pytest.mark.hostile("readers")
def test_missing_normalizer_and_processor_are_one_line(env, tmp_path, monkeypatch, capsys, no_model_load):
    m = tmp_path / "m"
    shutil.copytree(env["model"], m)
    (m / "normalizer.json").unlink()
    code, _, err = run_cli(["eval", m, "--asr", env["data"]], monkeypatch, capsys)
    refused(code, err, "has no normalizer.json", exit_code=2)
    (m / "normalizer.json").write_text("[1, 2]")
    code, _, err = run_cli(["eval", m, "--asr", env["data"]], monkeypatch, capsys)
    refused(code, err, "normalizer", exit_code=2)
    shutil.copy(env["model"] / "normalizer.json", m / "normalizer.json")
    (m / "processor_config.json").unlink()
    code, _, err = run_cli(["eval", m, "--asr", env["data"]], monkeypatch, capsys)
    refused(code, err, "processor", exit_code=2)


@pytest.mark.hostile("readers")
def test_asr_options_are_checked(env, tmp_path, monkeypatch, capsys, no_model_load):
    code, _, err = run_cli(["eval", env["model"], "--asr", env["data"], "--asr-subsets", "test-other"], monkeypatch, capsys)
    refused(code, err, "has no subset 'test-other'", exit_code=2)
    code, _, err = run_cli(["eval", env["model"], "--asr", env["data"], "--asr-batch-size", "0"], monkeypatch, capsys)
    refused(code, err, "--asr-batch-size must be positive", exit_code=2)
    code, _, err = run_cli(["eval", env["model"], "--asr-subsets", "test-clean", "--ppl", env["data"] / "transcripts.tsv"], monkeypatch, capsys)
    refused(code, err, "--asr-subsets needs --asr", exit_code=2)
    code, _, err = run_cli(["eval", env["model"], "--asr", env["data"], "--out", env["data"] / "results"], monkeypatch, capsys)
    refused(code, err, None, exit_code=2)  # an output folder inside the input folder
    assert not (env["data"] / "results").exists()


# --------------------------------------------------------------------------------------- end to end


def test_transcribe_batches_agree_with_one_at_a_time(env, one_thread):
    """Sorting by duration and batching must not change any transcription, nor their order."""
    from normswap.audio import load_audio, read_audio_folder
    from normswap.evaluation.asr import load_processor, transcribe
    from normswap.loading import load_pretrained

    data = read_audio_folder(env["data"])
    model, proc = load_pretrained(str(env["model"])), load_processor(str(env["model"]))
    batched = transcribe(model, proc, data.utterances, batch_size=2)
    single = []
    for u in data.utterances:
        feats = proc.feature_extractor([load_audio(u, 16000)], sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(input_features=feats, do_sample=False, num_beams=1, return_timestamps=False)
        single.append(proc.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
    assert batched == single


def test_eval_asr_end_to_end_with_baseline(env, tmp_path, monkeypatch, capsys, one_thread):
    from normswap.evaluation.asr import load_normalizer

    out = tmp_path / "res"
    t0 = time.perf_counter()
    code, stdout, err = run_cli(["eval", env["model"], "--baseline", env["other"], "--asr", env["data"], "--asr-batch-size", "2",
                                 "--out", out, "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    assert time.perf_counter() - t0 < 60
    res = json.loads(stdout)["asr"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["asr"]["wer"] == res["wer"] and saved["config"]["asr"] == str(env["data"])
    assert saved["versions"]["jiwer"] and saved["versions"]["soundfile"]
    assert res["utterances"] == 3 and set(res["subsets"]) == set(IDS.values())
    rows = _read_tsv(out / "predictions" / "asr.tsv")
    assert [r["id"] for r in rows] == sorted(IDS)
    n = load_normalizer(str(WHISPER))
    texts = dict(line.split("\t", 1) for line in (env["data"] / "transcripts.tsv").read_text().splitlines())
    # every figure again, from the TSV's texts, with the independent edit distance
    for prefix, wer_key in (("", "wer"), ("baseline_", "baseline")):
        errs, words = [], []
        for r in rows:
            assert r["reference"] == texts[r["id"]] and r["reference_normalised"] == n(r["reference"])
            assert r[f"{prefix}hypothesis_normalised"] == n(r[f"{prefix}hypothesis"])
            dist, s, d, i = edit_ops(r["reference_normalised"].split(), r[f"{prefix}hypothesis_normalised"].split())
            assert int(r[f"{prefix}errors"]) == dist
            assert int(r[f"{prefix}substitutions"]) + int(r[f"{prefix}deletions"]) + int(r[f"{prefix}insertions"]) == dist
            errs.append(dist)
            words.append(len(r["reference_normalised"].split()))
        assert res[wer_key] == pytest.approx(sum(errs) / sum(words))
        if prefix == "":
            conv_errs = errs
            assert res["words"] == sum(words) and res["errors"] == sum(errs)
            assert res["substitutions"] + res["deletions"] + res["insertions"] == sum(errs)
            tc = [e for e, r in zip(errs, rows) if r["subset"] == "test-clean"]
            tw = [w for w, r in zip(words, rows) if r["subset"] == "test-clean"]
            assert res["subsets"]["test-clean"]["wer"] == pytest.approx(sum(tc) / sum(tw))
    assert res["delta"] == pytest.approx(res["wer"] - res["baseline"])
    assert res["identical_transcripts"] == sum(r["hypothesis"] == r["baseline_hypothesis"] for r in rows)
    lo, hi = bootstrap_loop(conv_errs, errs, words, 1000, 0)
    assert res["delta_ci95"] == pytest.approx([lo, hi], abs=1e-12)
    assert res["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95}
    assert (out / "deltas.png").is_file()


def test_eval_asr_human_table(env, monkeypatch, capsys, one_thread):
    code, stdout, err = run_cli(["eval", env["model"], "--asr", env["data"], "--asr-subsets", "test-clean"], monkeypatch, capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert any(ln.split()[:3] == ["asr", "all", "WER"] for ln in lines), stdout
    assert any(ln.split()[:3] == ["asr", "test-clean", "WER"] for ln in lines), stdout
    assert "1 utt / 5 words" in stdout and "greedy, no timestamps" in stdout
    assert "transcribed" in err  # progress lines on stderr


def test_recipe_eval_asr_section(env, tmp_path):
    from normswap.recipes import load_recipe
    from normswap.recipes.report import metrics_of
    from normswap.recipes.runner import eval_request

    f = tmp_path / "r.yaml"
    f.write_text(f"name: w\nmodel: {env['model']}\neval:\n  asr: {{data: {env['data']}, subsets: test-clean, batch_size: 4}}\n")
    job = load_recipe(f).jobs[0]
    req = eval_request(job, job.model, tmp_path / "o")
    assert (req.asr, req.asr_subsets, req.asr_batch_size) == (str(env["data"]), ["test-clean"], 4)
    f.write_text(f"name: w\nmodel: {env['model']}\neval:\n  asr: {{data: {tmp_path / 'nowhere'}}}\n")
    with pytest.raises(Exception, match="eval.asr.data: no such folder"):
        load_recipe(f)
    m = metrics_of({"asr": {"wer": 0.05, "utterances": 3, "words": 40, "subsets": {"a": {"wer": 0.1, "utterances": 1, "words": 10},
                                                                                      "b": {"wer": 0.04, "utterances": 2, "words": 30}}}})
    assert m["asr_wer"]["value"] == 0.05 and m["asr_wer"]["better"] == "lower" and m["asr_wer_b"]["value"] == 0.04


# --------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_real_whisper_tiny_en_on_all_130_utterances(tmp_path, monkeypatch, capsys):
    """The real whisper-tiny.en (fp32, greedy): WER near the asset README's ~3.4% and the published 5.6% test-clean."""
    code, stdout, err = run_cli(["eval", WHISPER, "--asr", SPEECH, "--out", tmp_path / "o", "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(stdout)["asr"]
    assert res["utterances"] == 130 and res["words"] >= 4100
    assert 0.02 < res["wer"] < 0.07, res["wer"]
    assert set(res["subsets"]) == {"test-clean", "dev-clean", "train-clean-100 (mini train-clean-5)"}


def test_asr_groups_report_unions_of_subsets_and_refuse_unknown_members(env, monkeypatch, capsys, one_thread):
    train = "train-clean-100 (mini train-clean-5)"
    code, stdout, err = run_cli(["eval", env["model"], "--asr", env["data"], "--asr-groups", f"test-clean+{train}",
                                 "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(stdout)["asr"]
    group = res["subsets"][f"test-clean+{train}"]
    # the union of the folder's two subsets is every utterance: the group's row is the overall one
    assert group["errors"] == res["errors"] and group["words"] == res["words"] and group["utterances"] == 3
    code, _, err = run_cli(["eval", env["model"], "--asr", env["data"], "--asr-groups", "test-clean+dev-clean"], monkeypatch, capsys)
    refused(code, err, "no subset 'dev-clean'")
