"""Hostile input to `normswap eval` and its readers (issue 10): never a printed `nan`, never a
traceback; one `error:` line naming the file (and line) or the model, exit 2, inputs untouched.

Tiny plain GPT-2 / BERT folders (real tokenizers) keep every case to a second or so; the models
with non-finite outputs are plain checkpoints (or a patched forward), not normswap folders.
"""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertModel, GPT2LMHeadModel

from cli_util import debris, refused, run_cli, tree_digest
from normswap.errors import NormswapError
from normswap import textfiles as readers
from normswap.evaluation import glue, perplexity, runner, sts
from normswap.textfiles import read_text
from test_eval_support import tiny_bert_folder, tiny_gpt2_folder, write_glue_dir

STS_HEAD = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def _sts_row(i: int, a: str = "A cat sits.", b: str = "A dog runs.", score: str | None = None) -> str:
    return f"{i}\tg\tf\t2012\t{i:04d}\tnone\tnone\t{a}\t{b}\t{score if score is not None else f'{i % 5}.0'}\n"


def _good_sts() -> str:
    return STS_HEAD + "".join(_sts_row(i, f"Sentence number {i}.", f"Another sentence {i % 3}.") for i in range(12))


def _with_nan_weight(folder, cls, param: str, scale: float | None = None):
    model = cls.from_pretrained(folder)
    with torch.no_grad():
        p = dict(model.named_parameters())[param]
        if scale is None:
            p.view(-1)[0] = float("nan")
        else:
            p.mul_(scale)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-eval")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    sts_file = root / "sts.tsv"
    sts_file.write_text(_good_sts(), encoding="utf-8")
    return {
        "root": root, "text": text, "sts": sts_file,
        "gpt2": tiny_gpt2_folder(root),
        "bert": tiny_bert_folder(root),
        "gpt2_nan": _with_nan_weight(tiny_gpt2_folder(root, name="gpt2-nan"), GPT2LMHeadModel, "transformer.ln_f.weight"),
        "gpt2_huge": _with_nan_weight(tiny_gpt2_folder(root, name="gpt2-huge"), GPT2LMHeadModel, "transformer.ln_f.weight", 1e5),
        "bert_nan": _with_nan_weight(tiny_bert_folder(root, name="bert-nan"), BertModel, "embeddings.LayerNorm.weight"),
    }


def _refused_cli(args, monkeypatch, capsys, needle, inputs, *, watch=()) -> str:
    """Run `normswap eval ARGS`; it must be refused with one line holding `needle`, exit 2, nothing
    on stdout, every input byte-identical and no debris beside the inputs or in `watch`."""
    before = {str(p): tree_digest(p) for p in inputs}
    code, out, err = run_cli(["eval", *args], monkeypatch, capsys)
    line = refused(code, err, needle, exit_code=2)
    assert out == "", out
    assert len(line) < 400, line  # one readable line, not a dump of the bad field
    for p in inputs:
        assert tree_digest(p) == before[str(p)], f"{p} changed"
        assert debris(p if p.is_dir() else p.parent) == []
    for folder in watch:
        assert debris(folder) == []
    return line


def _models(env):
    return [env["gpt2"], env["bert"], env["gpt2_nan"], env["bert_nan"]]


# ------------------------------------------------------------------------------------- STS readers


def _sts_case(case: str, f):
    """Write the hostile STS file of `case` to `f`; returns the needle of its error line."""
    good = _good_sts().encode()
    if case == "non_utf8":
        lines = good.split(b"\n")
        lines[3] = lines[3].replace(b"Sentence", b"Sent\xffence")
        f.write_bytes(b"\n".join(lines))
        return f"{f}:4: not UTF-8"
    if case == "latin1_file":
        f.write_bytes(STS_HEAD.encode() + _sts_row(1, "Caf\xe9 au lait.").encode("latin-1") + _sts_row(2).encode())
        return f"{f}:2: not UTF-8"
    if case == "ten_mb_line":
        f.write_text(STS_HEAD + _sts_row(1) + _sts_row(2, "x" * 10_000_000) + _sts_row(3), encoding="utf-8")
        return f"{f}:3: line of 10000"
    if case == "field_over_csv_limit":  # csv's default field_size_limit is 131072: once an _csv.Error traceback
        f.write_text(STS_HEAD + _sts_row(1) + _sts_row(2, "y" * 140_000) + _sts_row(3), encoding="utf-8")
        return f"{f}:3: line of"
    if case == "extra_column":
        f.write_text(STS_HEAD + _sts_row(1) + _sts_row(2, "A cat\tsits.") + _sts_row(3), encoding="utf-8")
        return f"{f}:3: 11 columns but the header has 10"
    if case == "short_row":
        f.write_text(STS_HEAD + _sts_row(1) + "2\tg\tf\t2012\n" + _sts_row(3), encoding="utf-8")
        return f"{f}:3: not an STS-B row"
    if case == "non_numeric_score":
        f.write_text(STS_HEAD + _sts_row(1) + _sts_row(2, score="high") + _sts_row(3), encoding="utf-8")
        return f"{f}:3: not an STS-B row"
    if case == "nan_score":
        f.write_text(STS_HEAD + _sts_row(1) + _sts_row(2) + _sts_row(3, score="nan"), encoding="utf-8")
        return f"{f}:4: score 'nan' is not a finite number"
    if case == "inf_score":
        f.write_text(STS_HEAD + _sts_row(1) + _sts_row(2, score="1e999"), encoding="utf-8")
        return f"{f}:3: score '1e999' is not a finite number"
    if case == "empty":
        f.write_bytes(b"")
        return "is empty"
    if case == "blank_lines_only":
        f.write_bytes(b"\n\r\n \t \n")
        return "is empty"
    if case == "header_only":
        f.write_text(STS_HEAD, encoding="utf-8")
        return "has no STS pairs"
    if case == "one_pair":
        f.write_text(STS_HEAD + _sts_row(1), encoding="utf-8")
        return "only 1 STS pair"
    if case == "constant_scores":
        f.write_text(STS_HEAD + "".join(_sts_row(i, score="3.0") for i in range(6)), encoding="utf-8")
        return "all 6 gold scores are 3"
    if case == "nul_byte":
        f.write_bytes(good.replace(b"Sentence number 4", b"Sentence\0number 4"))
        return f"{f}:6: NUL byte"
    if case == "directory":
        f.mkdir()
        (f / "dev.tsv").write_text(_good_sts())
        return f"STS file {f} is a directory"
    if case == "binary":
        f.write_bytes(bytes(range(256)) * 64)
        return "not UTF-8"
    raise AssertionError(case)


STS_CASES = ["non_utf8", "latin1_file", "ten_mb_line", "field_over_csv_limit", "extra_column", "short_row", "non_numeric_score",
             "nan_score", "inf_score", "empty", "blank_lines_only", "header_only", "one_pair", "constant_scores", "nul_byte",
             "directory", "binary"]


@pytest.mark.hostile("readers")
@pytest.mark.parametrize("case", STS_CASES)
def test_sts_file_is_one_line_through_the_cli(env, tmp_path, monkeypatch, capsys, case):
    f = tmp_path / "sts.tsv"
    needle = _sts_case(case, f)
    _refused_cli([env["bert"], "--sts", f], monkeypatch, capsys, needle, [f, env["bert"]], watch=[tmp_path])


@pytest.mark.hostile("readers")
def test_sts_reader_api_raises_normswap_error_only(tmp_path):
    """The reader itself (no CLI): the over-long field is a NormswapError, never csv's _csv.Error."""
    f = tmp_path / "sts.tsv"
    _sts_case("field_over_csv_limit", f)
    digest = tree_digest(f)
    with pytest.raises(NormswapError, match=r"sts.tsv:3: line of 140\d+ characters, over the 100000-character cap"):
        sts.read_sts(f)
    assert tree_digest(f) == digest
    f.write_bytes(b"\xef\xbb\xbf" + _good_sts().encode())  # a byte-order mark is not part of the header
    assert len(sts.read_sts(f)) == 12


@pytest.mark.hostile("readers")
def test_sts_pooling_config_that_is_not_a_mapping_falls_back_to_mean(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text("[1, 2]")
    assert sts.pooling_mode(tmp_path) == "mean"
    (tmp_path / "1_Pooling" / "config.json").write_bytes(b"\xff\xfe{")
    assert sts.pooling_mode(tmp_path) == "mean"


# ------------------------------------------------------------------------------------ GLUE readers


def _glue_case(case: str, glue_dir):
    """Corrupt one file of a fresh GLUE folder for `case`; returns (args, needle)."""
    sst2, cola, stsb = glue_dir / "SST-2", glue_dir / "CoLA", glue_dir / "STS-B"
    task = "sst2"
    if case == "non_utf8":
        raw = (sst2 / "train.tsv").read_bytes().split(b"\n")
        raw[4] = raw[4] + b" \xc3\x28"
        (sst2 / "train.tsv").write_bytes(b"\n".join(raw))
        needle = f"{sst2 / 'train.tsv'}:5: not UTF-8"
    elif case == "field_over_csv_limit":
        (sst2 / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n" + "w" * 200_000 + "\t0\n")
        needle = f"{sst2 / 'dev.tsv'}:3: line of 200002 characters, over the 100000-character cap"
    elif case == "extra_column":
        (sst2 / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")
        needle = f"{sst2 / 'train.tsv'}:3: 3 columns but the header has 2"
    elif case == "short_row_headerless":
        (cola / "train.tsv").write_text("src\t1\t\ta fine sentence\nsrc\t0\n")
        task, needle = "cola", f"{cola / 'train.tsv'}:2: expected at least 4 columns, got 2"
    elif case == "bad_label":
        (sst2 / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t" + "9" * 5000 + "\n")
        needle = f"{sst2 / 'dev.tsv'}:3: label '9999"
    elif case == "stsb_non_numeric":
        lines = (stsb / "train.tsv").read_text().splitlines(keepends=True)
        lines[2] = lines[2].rsplit("\t", 1)[0] + "\tfive\n"
        (stsb / "train.tsv").write_text("".join(lines))
        task, needle = "stsb", f"{stsb / 'train.tsv'}:3: score 'five' is not a number"
    elif case == "stsb_nan":
        lines = (stsb / "dev.tsv").read_text().splitlines(keepends=True)
        lines[3] = lines[3].rsplit("\t", 1)[0] + "\tNaN\n"
        (stsb / "dev.tsv").write_text("".join(lines))
        task, needle = "stsb", f"{stsb / 'dev.tsv'}:4: score 'NaN' is not a finite number"
    elif case == "stsb_constant_dev":
        lines = (stsb / "dev.tsv").read_text().splitlines(keepends=True)
        (stsb / "dev.tsv").write_text(lines[0] + "".join(ln.rsplit("\t", 1)[0] + "\t2.5\n" for ln in lines[1:]))
        task, needle = "stsb", "dev scores of stsb"
    elif case == "empty_file":
        (sst2 / "train.tsv").write_bytes(b"")
        needle = f"{sst2 / 'train.tsv'} is empty"
    elif case == "header_only":
        (sst2 / "dev.tsv").write_text("sentence\tlabel\n")
        needle = f"{sst2 / 'dev.tsv'} has no examples"
    elif case == "split_is_directory":
        (sst2 / "dev.tsv").unlink()
        (sst2 / "dev.tsv").mkdir()
        needle = f"GLUE dev file {sst2 / 'dev.tsv'} is a directory"
    elif case == "data_is_a_file":
        other = glue_dir.parent / "glue.tsv"
        other.write_text("sentence\tlabel\n")
        return ["--glue", "sst2", "--glue-data", other], f"GLUE data folder {other} is a file"
    elif case == "nul_byte":
        (cola / "dev.tsv").write_bytes((cola / "dev.tsv").read_bytes().replace(b"\n", b"\n\0", 1))
        task, needle = "cola", f"{cola / 'dev.tsv'}:2: NUL byte"
    else:
        raise AssertionError(case)
    return ["--glue", task, "--glue-data", glue_dir], needle


GLUE_CASES = ["non_utf8", "field_over_csv_limit", "extra_column", "short_row_headerless", "bad_label", "stsb_non_numeric",
              "stsb_nan", "stsb_constant_dev", "empty_file", "header_only", "split_is_directory", "data_is_a_file", "nul_byte"]


@pytest.mark.hostile("readers")
@pytest.mark.parametrize("case", GLUE_CASES)
def test_glue_file_is_one_line_through_the_cli(env, tmp_path, monkeypatch, capsys, case):
    glue_dir = write_glue_dir(tmp_path, 8, 6)
    args, needle = _glue_case(case, glue_dir)
    trained = []
    monkeypatch.setattr(glue, "run_task_seed", lambda *a, **k: trained.append(a))  # must never be reached
    _refused_cli([env["bert"], *args], monkeypatch, capsys, needle, [tmp_path, env["bert"]])
    assert trained == []


@pytest.mark.hostile("readers")
def test_glue_bad_row_fails_before_perplexity_runs(env, tmp_path, monkeypatch, capsys):
    """All GLUE data is read in validation: a bad dev row is refused before any model is loaded."""
    glue_dir = write_glue_dir(tmp_path, 8, 6)
    (glue_dir / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tneutral\n")
    loaded = []
    monkeypatch.setattr(runner, "_load_lm", lambda path: loaded.append(path))
    _refused_cli([env["gpt2"], "--ppl", env["text"], "--glue", "sst2", "--glue-data", glue_dir], monkeypatch, capsys,
                 "dev.tsv:3: label 'neutral'", [tmp_path, env["gpt2"], env["text"]])
    assert loaded == []


# ------------------------------------------------------------------------------------ --ppl text


def _text_case(case: str, f):
    if case == "non_utf8":
        f.write_bytes(b"first line\nsecond line\r\nthird \x80 line\n")
        return f"{f}:3: not UTF-8 text (byte 0x80"
    if case == "utf16":
        f.write_bytes("some text in UTF-16\n".encode("utf-16"))
        return f"{f}:1: not UTF-8"
    if case == "nul_byte":
        f.write_bytes(b"line one\nline two\nline\0three\n")
        return f"{f}:3: NUL byte"
    if case == "directory":
        f.mkdir()
        (f / "a.txt").write_text("text")
        return f"text file {f} is a directory"
    if case == "fifo":
        os.mkfifo(f)  # opening it would block forever
        return f"text file {f} is not a regular file"
    if case == "whitespace_only":
        f.write_bytes(b" \r\n\t\n\n")
        return "is empty"
    raise AssertionError(case)


@pytest.mark.hostile("readers")
@pytest.mark.parametrize("case", ["non_utf8", "utf16", "nul_byte", "directory", "fifo", "whitespace_only"])
def test_ppl_text_is_one_line_through_the_cli(env, tmp_path, monkeypatch, capsys, case):
    f = tmp_path / "text.txt"
    needle = _text_case(case, f)
    inputs = [env["gpt2"]] + ([f] if case != "fifo" else [])
    _refused_cli([env["gpt2"], "--ppl", f], monkeypatch, capsys, needle, inputs, watch=[tmp_path])
    if case == "fifo":
        assert f.exists() and not f.is_file()


@pytest.mark.hostile("readers")
def test_text_reader_keeps_long_lines_and_universal_newlines(tmp_path):
    """No line cap on text (the whole text is tokenised at once; text8 is one 100 MB line)."""
    f = tmp_path / "one-line.txt"
    f.write_bytes(b"word " * 2_000_000 + b"\r\nend\r")
    text = read_text(f)
    assert len(text) == 10_000_000 + 5 and text.endswith("\nend\n") and "\r" not in text


# --------------------------------------------------------------------------------- option ranges


OPTION_CASES = {
    "max_tokens_negative": (["--ppl", "{text}", "--max-tokens", "-5"], "--max-tokens must be at least 2, got -5"),
    "max_tokens_one": (["--ppl", "{text}", "--max-tokens", "1"], "--max-tokens must be at least 2, got 1"),
    "max_length_one": (["--ppl", "{text}", "--max-length", "1"], "--max-length must be at least 2"),
    "stride_zero": (["--ppl", "{text}", "--stride", "0"], "--stride must be positive"),
    "stride_over_max_length": (["--ppl", "{text}", "--max-length", "16", "--stride", "32"], "--stride 32 is longer than --max-length 16"),
    "stride_over_default_window": (["--ppl", "{text}", "--stride", "100"], "--stride 100 is longer than the 64-token windows"),
    "mlm_probability_zero": (["--ppl", "{text}", "--mlm-probability", "0"], "--mlm-probability must be in (0, 1), got 0"),
    "mlm_probability_above_one": (["--ppl", "{text}", "--mlm-probability", "1.5"], "--mlm-probability must be in (0, 1)"),
    "mlm_probability_nan": (["--ppl", "{text}", "--mlm-probability", "nan"], "--mlm-probability must be in (0, 1), got nan"),
    "mask_seed_over_64_bits": (["--ppl", "{text}", "--mask-seed", str(2**64)], "--mask-seed must fit in 64 bits"),
    "seeds_zero": (["--glue", "sst2", "--glue-data", "{glue}", "--seeds", "0"], "--seeds must be a positive count, got 0"),
    "seeds_negative": (["--glue", "sst2", "--glue-data", "{glue}", "--seeds", "-2"], "--seeds must be a positive count"),
    "batch_size_zero": (["--glue", "sst2", "--glue-data", "{glue}", "--batch-size", "0"], "--batch-size must be a positive count"),
    "epochs_negative": (["--glue", "sst2", "--glue-data", "{glue}", "--epochs", "-1"], "--epochs must be a positive number"),
    "epochs_nan": (["--glue", "sst2", "--glue-data", "{glue}", "--epochs", "nan"], "--epochs must be a positive number, got nan"),
    "epochs_inf": (["--glue", "sst2", "--glue-data", "{glue}", "--epochs", "inf"], "--epochs must be a positive number, got inf"),
    "lr_nan": (["--glue", "sst2", "--glue-data", "{glue}", "--lr", "nan"], "--lr must be a positive number, got nan"),
    "lr_zero": (["--glue", "sst2", "--glue-data", "{glue}", "--lr", "0"], "--lr must be a positive number"),
    "train_samples_zero": (["--glue", "sst2", "--glue-data", "{glue}", "--train-samples", "0"], "--train-samples must be a positive count"),
    "dev_samples_negative": (["--glue", "sst2", "--glue-data", "{glue}", "--dev-samples", "-3"], "--dev-samples must be positive, got -3"),
    "max_seq_length_zero": (["--glue", "sst2", "--glue-data", "{glue}", "--max-seq-length", "0"], "--max-seq-length must be a positive count"),
    "max_seq_length_one": (["--glue", "sst2", "--glue-data", "{glue}", "--max-seq-length", "1"], "--max-seq-length must be at least 2"),
    "max_seq_length_no_room_for_a_pair": (["--glue", "stsb", "--glue-data", "{glue}", "--max-seq-length", "3"],
                                          "--max-seq-length 3 leaves no room for the 2 text(s) of stsb after 3 special tokens"),
    "max_seq_length_over_positions": (["--glue", "sst2", "--glue-data", "{glue}", "--max-seq-length", "256"],
                                      "--max-seq-length 256 is above the 64 positions of"),
    "seeds_zero_without_glue": (["--ppl", "{text}", "--seeds", "0"], "--seeds must be a positive count"),
}


@pytest.mark.hostile("eval")
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_out_of_range_option_is_refused_before_anything_loads(env, tmp_path, monkeypatch, capsys, case):
    args, needle = OPTION_CASES[case]
    glue_dir = write_glue_dir(tmp_path, 8, 6)
    if case == "max_seq_length_over_positions":  # inputs longer than the tiny BERT's 64 positions
        (glue_dir / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + " ".join(["film"] * 90) + "\t1\nok\t0\n")
    model = env["bert"] if "--glue" in args or "mlm" in case else env["gpt2"]
    if "stride_over_default_window" == case:
        model = env["gpt2"]
    heavy = []
    monkeypatch.setattr(glue, "run_task_seed", lambda *a, **k: heavy.append("glue"))
    monkeypatch.setattr(perplexity, "causal_perplexity", lambda *a, **k: heavy.append("ppl"))
    monkeypatch.setattr(perplexity, "masked_lm_perplexity", lambda *a, **k: heavy.append("mlm"))
    args = [a.format(text=env["text"], glue=glue_dir) for a in args]
    _refused_cli([model, *args], monkeypatch, capsys, needle, [env["text"], glue_dir, model])
    assert heavy == []


@pytest.mark.hostile("eval")
def test_settings_api_refuses_non_finite_and_out_of_range(tmp_path):
    for bad in (dict(epochs=float("nan")), dict(lr=float("inf")), dict(train_samples=0), dict(warmup_ratio=1.5),
                dict(weight_decay=-0.1), dict(eval_batch_size=0), dict(max_seq_length=1)):
        with pytest.raises(NormswapError):
            glue.GlueSettings(**bad).validate()
    glue.GlueSettings().validate()
    with pytest.raises(NormswapError, match="--max-tokens must be positive, got -1"):
        perplexity.tokenize_text(None, "text", max_tokens=-1)


# ------------------------------------------------------------------------------ garbage results


def _ppl_json(env, model, monkeypatch, capsys, *extra):
    code, out, err = run_cli(["eval", model, "--ppl", env["text"], "--max-tokens", 200, "--format", "json", *extra], monkeypatch, capsys)
    return code, out, err


@pytest.mark.hostile("eval")
def test_nan_weights_give_a_perplexity_error_not_nan(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    line = _refused_cli([env["gpt2_nan"], "--baseline", env["gpt2"], "--ppl", env["text"], "--max-tokens", 200, "--out", out],
                        monkeypatch, capsys, str(env["gpt2_nan"]), [env["gpt2_nan"], env["gpt2"], env["text"]], watch=[tmp_path])
    assert "finite" in line.lower() or "nan" in line.lower()
    assert not out.exists()  # a failed run leaves no results folder


@pytest.mark.hostile("eval")
def test_nan_logits_from_a_patched_forward_give_an_error(env, monkeypatch, capsys):
    """The same through a forward hook, independent of whatever the loader checks in weights."""
    real = runner._load_lm

    def nan_lm(path, *args, **kwargs):
        model, kind = real(path, *args, **kwargs)
        model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
        return model, kind

    monkeypatch.setattr(runner, "_load_lm", nan_lm)
    _refused_cli([env["gpt2"], "--ppl", env["text"], "--max-tokens", 100], monkeypatch, capsys,
                 f"perplexity of {env['gpt2']} is not finite", [env["gpt2"], env["text"]])


@pytest.mark.hostile("eval")
def test_infinite_logits_give_an_error_through_the_api(env, monkeypatch):
    real = runner._load_lm

    def inf_lm(path, *args, **kwargs):
        model, kind = real(path, *args, **kwargs)
        model.lm_head.register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([5]), float("inf")))
        return model, kind

    monkeypatch.setattr(runner, "_load_lm", inf_lm)
    req = runner.EvalRequest(model=str(env["gpt2"]), ppl=str(env["text"]), max_tokens=100)
    with pytest.raises(NormswapError, match="token losses are NaN or infinite"):
        runner.run_eval(req)


@pytest.mark.hostile("eval")
def test_huge_finite_loss_is_perplexity_inf_with_the_nll(env, monkeypatch, capsys):
    """exp(nll) overflows: no OverflowError, value inf (null in JSON), the exact nll beside it."""
    code, out, err = _ppl_json(env, env["gpt2_huge"], monkeypatch, capsys, "--baseline", env["gpt2"])
    assert code == 0 and "Traceback" not in err, err
    p = json.loads(out)["ppl"]
    assert p["value"] is None and p["nll"] > 709.78 and math.isfinite(p["nll"])
    assert p["baseline"] > 1 and p["delta"] is None  # inf - finite: JSON has no inf
    assert "overflows" in err
    code, out, err = run_cli(["eval", env["gpt2_huge"], "--baseline", env["gpt2_huge"], "--ppl", env["text"], "--max-tokens", 200],
                             monkeypatch, capsys)
    assert code == 0 and "nan" not in out.lower(), out
    assert "inf" in out and "exp(nll/token) overflows" in out


@pytest.mark.hostile("eval")
def test_perplexity_summary_api():
    r = perplexity._summary("causal", torch.tensor([800.0, 900.0]), "m", max_length=2, stride=2, windows=1, text_tokens=3)
    assert r.value == math.inf and r.nll == pytest.approx(850.0)
    assert perplexity.safe_exp(1.0) == pytest.approx(math.e)
    with pytest.raises(NormswapError, match="masked-LM perplexity of m is not finite: 1 of 2"):
        perplexity._summary("masked", torch.tensor([1.0, float("nan")]), "m", max_length=2, stride=None, windows=1, text_tokens=3)


@pytest.mark.hostile("eval")
def test_nan_weights_give_an_sts_error_not_nan(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    line = _refused_cli([env["bert_nan"], "--baseline", env["bert"], "--sts", env["sts"], "--out", out], monkeypatch, capsys,
                        str(env["bert_nan"]), [env["bert_nan"], env["bert"], env["sts"]], watch=[tmp_path])
    assert "finite" in line.lower() or "nan" in line.lower()
    assert not out.exists()


@pytest.mark.hostile("eval")
def test_constant_embeddings_give_an_undefined_correlation_error(env, monkeypatch, capsys):
    monkeypatch.setattr(sts, "embed", lambda model, tok, sentences, **k: torch.ones(len(sentences), 8))
    _refused_cli([env["bert"], "--sts", env["sts"]], monkeypatch, capsys,
                 f"the STS spearman correlation of {env['bert']} is undefined (nan): its 12 cosines are all equal",
                 [env["bert"], env["sts"]])


@pytest.mark.hostile("eval")
def test_nan_weights_give_a_glue_error_not_nan(env, tmp_path, monkeypatch, capsys):
    glue_dir = write_glue_dir(tmp_path, 8, 6)
    line = _refused_cli([env["bert_nan"], "--glue", "sst2", "--glue-data", glue_dir, "--epochs", 1, "--batch-size", 8,
                         "--max-seq-length", 16], monkeypatch, capsys, str(env["bert_nan"]), [env["bert_nan"], glue_dir])
    assert "finite" in line.lower() or "nan" in line.lower()


@pytest.mark.hostile("eval")
def test_nan_glue_metric_is_an_error(env, tmp_path, monkeypatch, capsys):
    glue_dir = write_glue_dir(tmp_path, 8, 6)
    monkeypatch.setattr(glue, "compute_glue_metrics", lambda task, p, r: {"pearson": float("nan"), "spearmanr": 0.1})
    _refused_cli([env["bert"], "--glue", "stsb", "--glue-data", glue_dir, "--epochs", 1, "--batch-size", 8, "--max-seq-length", 16],
                 monkeypatch, capsys, f"GLUE stsb pearson of {env['bert']} (seed 0) is nan", [env["bert"], glue_dir])


@pytest.mark.hostile("eval")
def test_a_nan_that_slips_through_is_refused(env, tmp_path, monkeypatch, capsys):
    """Backstop in run_eval: a NaN anywhere in the results is an error, never printed or written."""
    monkeypatch.setattr(runner, "run_perplexity", lambda req, tok, text: {"kind": "causal", "value": float("nan")})
    out = tmp_path / "results"
    _refused_cli([env["gpt2"], "--ppl", env["text"], "--out", out], monkeypatch, capsys, "gave NaN for ppl.value",
                 [env["gpt2"], env["text"]], watch=[tmp_path])
    assert not out.exists()


def test_readers_shown_cuts_long_values():
    assert readers.shown("abc") == "'abc'"
    assert len(readers.shown("x" * 10_000)) < 100 and "10000 characters" in readers.shown("x" * 10_000)
