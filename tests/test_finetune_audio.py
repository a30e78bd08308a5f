"""`normswap finetune --audio DIR`: distilling a converted speech encoder-decoder (Whisper) from the
original on teacher-forced transcripts of real LibriSpeech FLAC files.

The objective is checked against an independent loop over each utterance's real positions (no
padding, no batch); a short run on a tiny random Whisper (real vocabulary, processor and
normaliser of the whisper-tiny.en asset, see test_eval_asr) must bring the student closer to the
teacher, save a folder that loads every way and evaluates with `eval --asr`, and resume exactly;
bad input is one `error:` line.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest
import torch
import torch.nn.functional as F

import normswap
from cli_util import refused, run_cli
from normswap.training import finetune
from normswap.training.tiny import dyt_student, make_tiny_pair, tiny_corpus
from test_eval_asr import SPEECH, WHISPER, speech_folder, tiny_whisper
from test_finetune_loop import _interrupt_at

TRAIN = "train-clean-100 (mini train-clean-5)"  # the manifest subset of 2 of the 3 utterances (test-clean is the third)

pytestmark = [pytest.mark.skipif(not (WHISPER.is_dir() and SPEECH.is_dir()), reason="whisper-tiny.en / librispeech-subset assets missing"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-ft")
    teacher = tiny_whisper(root / "whisper", seed=0)
    return {"root": root, "teacher": teacher, "student": dyt_student(teacher, root / "whisper-dyt"),
            "speech": speech_folder(root / "speech")}


def _examples(env):
    from normswap.audio import read_audio_folder
    from normswap.evaluation.asr import load_processor
    from normswap.loading import load_pretrained, load_tokenizer
    from normswap.training.data import build_speech_data

    student = load_pretrained(str(env["student"]))
    data = build_speech_data(read_audio_folder(env["speech"]), student, load_tokenizer(str(env["student"])),
                             load_processor(str(env["student"])), seed=0, val_examples=0, what="student")
    return student, data.train


def _objective(**kw):
    from normswap.training.objectives import Objective

    return Objective(kind="speech", **kw)


# ----------------------------------------------------------------------------------------- objective


def test_teacher_forced_objectives_match_a_loop_over_real_positions(env):
    from normswap.loading import load_pretrained

    student, ex = _examples(env)
    teacher = load_pretrained(str(env["teacher"]))
    with torch.no_grad():  # random logits are ~0.01: scale the (tied) output embedding up so that the KL stands far above float32 rounding
        for m, scale in ((student, 200.0), (teacher, 300.0)):
            m.model.decoder.embed_tokens.weight.mul_(scale)
    batch = ex.batch([0, 1, 2])
    lengths = [len(s) for s in ex.sequences]
    assert len(set(lengths)) > 1 and batch["decoder_input_ids"].shape[1] == max(lengths) - 1  # padded at the end
    assert ex.prompt_len == 2 and all(s[:2] == [50257, 50362] and s[-1] == 50256 for s in ex.sequences)
    T = 2.0
    with torch.no_grad():
        kl = _objective(weights={"distill": 1.0}, temperature=T).loss(student, teacher, batch)[0]
        lm = _objective(weights={"lm": 1.0}).loss(student, None, batch)[0]
        hidden = {c: _objective(weights={"distill": 1.0}, temperature=T, hidden_weight=0.5, center_hidden=c).loss(student, teacher, batch)[0]
                  for c in (False, True)}
        # independently: each utterance alone, unpadded; positions that predict a transcript token or eos
        kl_sum, ce_sum, n = 0.0, 0.0, 0
        for i, seq in enumerate(ex.sequences):
            feats, dec = batch["input_features"][i:i + 1], torch.tensor([seq[:-1]])
            s_logits = student(input_features=feats, decoder_input_ids=dec).logits[0].double()
            t_logits = teacher(input_features=feats, decoder_input_ids=dec).logits[0].double()
            for p in range(ex.prompt_len - 1, len(seq) - 1):
                ls, lt = F.log_softmax(s_logits[p] / T, -1), F.log_softmax(t_logits[p] / T, -1)
                kl_sum += float((lt.exp() * (lt - ls)).sum())
                ce_sum += -float(F.log_softmax(s_logits[p], -1)[seq[p + 1]])
                n += 1
        assert n == ex.n_tokens() == sum(lengths) - 2 * len(lengths)
        assert float(kl) == pytest.approx(T * T * kl_sum / n, rel=1e-5)
        assert float(lm) == pytest.approx(ce_sum / n, rel=1e-5)

        # the encoder term: per-layer relative MSE over every frame; centred (Pre-LN conversions), the
        # final norm's output is left out (its affine may live in the cross-attention now)
        s_h = student.model.encoder(batch["input_features"], output_hidden_states=True).hidden_states
        t_h = teacher.model.encoder(batch["input_features"], output_hidden_states=True).hidden_states
        assert len(s_h) == 2  # the input of the one encoder block, the final norm's output

        def rel(s, t, center):
            s, t = s.double(), t.double()
            if center:
                s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
            return float(((s - t) ** 2).sum() / (t ** 2).sum())

        plain = [rel(s, t, False) for s, t in zip(s_h, t_h)]
        assert plain[0] == 0 and plain[1] > 0.01  # the conv front end is the teacher's; the DyT final norm is not
        assert float(hidden[False]) == pytest.approx(T * T * kl_sum / n + 0.5 * sum(plain) / 2, rel=1e-5)
        assert float(hidden[True]) == pytest.approx(T * T * kl_sum / n + 0.5 * rel(s_h[0], t_h[0], True), rel=1e-5, abs=1e-9)

# -------------------------------------------------------------------------------------------- runs


def test_distillation_on_flac_brings_the_student_to_the_teacher(env, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSpeechSeq2Seq

    from normswap.loading import load_pretrained

    out = tmp_path / "ft"
    code, stdout, err = run_cli(["finetune", env["student"], "--teacher", env["teacher"], "--audio", env["speech"], "--objective", "distill",
                                 "--steps", "8", "--batch-size", "3", "--lr", "1e-2", "--val-examples", "0", "--log-every", "4",
                                 "--out", out, "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(stdout)
    student, ex = _examples(env)
    seconds = ex.seconds([0, 1, 2])
    assert res["status"] == "completed" and res["step"] == 8
    assert res["audio_seconds"] == pytest.approx(8 * seconds) and res["tokens"] == 8 * ex.n_tokens()  # every step sees all 3
    assert "audio s/s" in err and "eta" in err  # progress lines without a TTY

    teacher = load_pretrained(str(env["teacher"]))
    trained = normswap.load(out)  # strict load of the normswap format, record and digest checked
    batch, objective = ex.batch([0, 1, 2]), _objective(weights={"distill": 1.0})
    with torch.no_grad():
        before, after = (float(objective.loss(m, teacher, batch)[0]) for m in (student, trained))
    assert after < 0.8 * before, (before, after)
    record, _ = normswap.loading.read_record(out)
    assert record.source["finetune"]["data"] == str(env["speech"])
    assert record.source["finetune"]["audio_seconds"] == pytest.approx(8 * seconds, abs=1e-3)
    for name in ("generation_config.json", "processor_config.json", "tokenizer.json", "normalizer.json"):
        assert (out / name).is_file(), name
    auto = AutoModelForSpeechSeq2Seq.from_pretrained(str(out))
    assert type(auto).__name__ == "WhisperForConditionalGeneration" and auto.generation_config.max_length == 20
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(auto.state_dict()[k], v, msg=k)

    code, stdout, err = run_cli(["eval", out, "--asr", env["speech"], "--asr-subsets", "test-clean", "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(stdout)["asr"]["utterances"] == 1


def test_interrupted_then_resumed_run_equals_uninterrupted_run(env, tmp_path):
    from safetensors.torch import load_file

    # 2 utterances of one subset, batches of 2 with accumulation, dropout on (RNG restored), lm + distill
    settings = dict(teacher=env["teacher"], audio=env["speech"], audio_subsets=[TRAIN], objective="lm=0.5,distill=0.5",
                    steps=6, batch_size=2, grad_accum=2, save_every=2, dropout=0.1, lr=3e-3, val_examples=0, log_every=1)
    full = finetune(env["student"], out=tmp_path / "a", **settings)
    part = finetune(env["student"], out=tmp_path / "b", on_step=_interrupt_at(3), **settings)
    assert part.status == "interrupted" and part.step == 3
    with pytest.raises(normswap.NormswapError, match="audio_subsets"):  # other utterances would be another run
        finetune(env["student"], out=tmp_path / "b", resume=True, **{**settings, "audio_subsets": None})
    done = finetune(env["student"], out=tmp_path / "b", resume=True, **settings)
    assert done.status == "completed" and done.step == 6 and done.tokens == full.tokens
    assert done.audio_seconds == pytest.approx(full.audio_seconds) and full.audio_seconds > 0
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    log = [json.loads(ln) for ln in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["kind"] == "train"] == list(range(1, 7))
    assert log[-1]["audio_seconds"] == pytest.approx(full.audio_seconds)


def test_lm_objective_on_transcripts_needs_no_teacher(env, tmp_path):
    res = finetune(env["student"], audio=env["speech"], out=tmp_path / "lm", objective="lm", steps=2, batch_size=3, val_examples=0)
    assert res.status == "completed" and res.last_loss > 0 and (tmp_path / "lm" / "processor_config.json").is_file()


# --------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_error_line(env, tmp_path, monkeypatch, capsys):
    text_teacher, text_student = make_tiny_pair(tmp_path, "causal")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_corpus(50))
    bare = tmp_path / "bare"
    (bare / "audio").mkdir(parents=True)
    for f in (env["speech"] / "audio").iterdir():
        (bare / "audio" / f.name).write_bytes(f.read_bytes())
    base = ["finetune", env["student"], "--teacher", env["teacher"], "--objective", "distill", "--steps", "2", "--out", tmp_path / "o"]
    cases = [
        (["--audio", tmp_path / "missing"], "not found"),
        (["--audio", bare], "no transcripts"),
        (["--audio", env["speech"], "--data", corpus], "not both"),
        (["--audio", env["speech"], "--audio-subsets", "train-other-500"], "no subset 'train-other-500'"),
        (["--audio", env["speech"], "--audio-subsets", " , "], "empty"),
        (["--data", corpus, "--audio-subsets", "test-clean"], "--audio-subsets needs --audio"),
        (["--audio", env["speech"], "--tokens", "1k"], "--steps"),
        (["--audio", env["speech"], "--block-size", "16"], "for text data"),
        (["--data", corpus], "train it on speech with --audio"),
        ([], "no training data"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(base + extra, monkeypatch, capsys)
        refused(code, err, needle, exit_code=2)
    code, _, err = run_cli(["finetune", text_student, "--teacher", text_teacher, "--objective", "distill", "--audio", env["speech"],
                            "--steps", "2", "--out", tmp_path / "o"], monkeypatch, capsys)
    refused(code, err, "--audio needs a speech encoder-decoder student", exit_code=2)
    code, _, err = run_cli(base + ["--audio", env["speech"], "--teacher", text_teacher], monkeypatch, capsys)
    refused(code, err, "not a speech encoder-decoder", exit_code=2)
    assert not (tmp_path / "o").exists()
