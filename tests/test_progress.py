"""Progress of long loops: plain lines on stderr off a terminal (counts, tokens, rate, ETA), a bar on
one, nothing on stdout; the evaluation loops and `normswap eval` use it."""
from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from normswap.evaluation import progress
from normswap.evaluation.progress import Progress, format_count, format_duration, short_name
from normswap.log import setup_logging

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("normswap: ")]


@pytest.fixture
def logs():
    setup_logging()


@pytest.fixture
def every_update(monkeypatch):
    """A line at every update (the loops below finish in well under the real 10 s / 30 s)."""
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    monkeypatch.setattr(progress, "FIRST_S", 0.0)


@pytest.mark.parametrize("seconds, text", [(0.42, "0.4s"), (45, "45s"), (63, "1m03s"), (3599, "59m59s"), (7500, "2h05m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("n, text", [(7, "7"), (2.5, "2.5"), (980, "980"), (24_100, "24.1k"), (3_200_000, "3.2M")])
def test_format_count(n, text):
    assert format_count(n) == text


@pytest.mark.parametrize("name, short", [("gpt2-rms", "gpt2-rms"), ("runs/quickstart/gpt2-dyt/convert", "gpt2-dyt/convert"),
                                         ("/work/shared/assets/gpt2-standin-wt2/", "assets/gpt2-standin-wt2"),
                                         ("openai-community/gpt2", "openai-community/gpt2"), ("./m", "m")])
def test_short_name(name, short):
    assert short_name(name) == short


def test_lines_off_a_terminal_first_soon_then_every_interval(logs, capsys):
    clock = FakeClock()
    bar = Progress(100, "perplexity (m)", enabled=False, unit="windows", every_s=30, first_s=10, clock=clock)
    clock.t += 5
    bar.update(5, tokens=500)  # before the first line is due
    assert _lines(capsys.readouterr().err) == []
    clock.t += 5
    bar.update(5, tokens=500)
    assert _lines(capsys.readouterr().err) == ["normswap: perplexity (m): 10/100 windows (10%), 1.0k tok, 100 tok/s, eta 1m30s"]
    clock.t += 20
    bar.update(10, tokens=1000)  # 20 s after the first line: not yet
    assert _lines(capsys.readouterr().err) == []
    clock.t += 10
    bar.update(20, tokens=2000)
    assert _lines(capsys.readouterr().err) == ["normswap: perplexity (m): 40/100 windows (40%), 4.0k tok, 100 tok/s, eta 1m00s"]
    clock.t += 60
    bar.update(60, tokens=6000)  # the last update: the closing line says it instead
    assert _lines(capsys.readouterr().err) == []
    bar.close()
    bar.close()  # once only
    cap = capsys.readouterr()
    assert _lines(cap.err) == ["normswap: perplexity (m): 100/100 windows done in 1m40s, 10.0k tok, 100 tok/s"]
    assert cap.out == ""


def test_lines_without_tokens_give_the_unit_rate_and_the_postfix(logs, capsys):
    clock = FakeClock()
    bar = Progress(8, "GLUE sst2 train (m, seed 0)", enabled=False, unit="steps", every_s=1, first_s=1, clock=clock)
    clock.t += 4
    bar.set_postfix(loss="0.693")
    bar.update(2)
    assert _lines(capsys.readouterr().err) == ["normswap: GLUE sst2 train (m, seed 0): 2/8 steps (25%), 0.5 steps/s, eta 12s, loss 0.693"]


def test_a_loop_cut_short_ends_without_a_closing_line(logs, capsys):
    clock = FakeClock()
    bar = Progress(10, "embedding", enabled=False, unit="sentences", clock=clock)
    bar.update(3)
    bar.close()
    assert _lines(capsys.readouterr().err) == []


def test_a_growing_total_and_a_restarted_clock(logs, capsys):
    """Zero-shot learns its total task by task, and counts time from the first request."""
    clock = FakeClock()
    bar = Progress(0, "zero-shot", enabled=False, unit="requests", every_s=0, clock=clock)
    clock.t += 100  # building tasks: not part of the rate
    bar.restart()
    bar.total = 40
    clock.t += 10
    bar.update(10)
    assert _lines(capsys.readouterr().err) == ["normswap: zero-shot: 10/40 requests (25%), 1 requests/s, eta 30s"]


def test_a_terminal_gets_a_bar_and_no_log_lines(logs, capsys):
    bar = Progress(4, "perplexity (m)", enabled=True, unit="windows", every_s=0, first_s=0)
    assert not bar.disable
    for _ in range(4):
        bar.update(1, tokens=10)
    bar.close()
    err = capsys.readouterr().err
    assert "perplexity (m)" in err and _lines(err) == []


def test_default_follows_whether_stderr_is_a_terminal(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert Progress(1, "x").disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = Progress(1, "x")
    assert not bar.disable
    bar.close()


def test_causal_perplexity_lines_count_windows_and_scored_tokens(logs, every_update, capsys):
    from tiny_models import tiny_model

    from normswap.evaluation.perplexity import causal_perplexity, causal_windows

    model = tiny_model("gpt2")
    ids = torch.randint(3, model.config.vocab_size, (161,), generator=torch.Generator().manual_seed(0))
    res = causal_perplexity(model, ids, max_length=16, stride=16, batch_size=2, progress=False, name="/x/y/tiny-gpt2")
    windows = len(causal_windows(161, 16, 16))
    cap = capsys.readouterr()
    lines = _lines(cap.err)
    assert cap.out == "" and windows == 10
    assert len(lines) == 5  # one per batch of 2 windows but the last, then the closing line
    assert lines[0].startswith("normswap: perplexity (y/tiny-gpt2): 2/10 windows (20%), 32 tok, ") and "eta " in lines[0]
    assert lines[-1].startswith(f"normswap: perplexity (y/tiny-gpt2): {windows}/{windows} windows done in ")
    assert f", {res.tokens} tok, " in lines[-1] and res.tokens == 160  # every token but the first is scored


def test_sts_embedding_lines(logs, every_update, capsys):
    from transformers import BertConfig, BertModel

    from normswap.evaluation.sts import embed
    from normswap.loading import load_tokenizer
    from normswap.assets import asset

    tok_path = asset("all-MiniLM-L6-v2")
    if not tok_path.exists():
        pytest.skip("all-MiniLM-L6-v2 asset missing")
    tok = load_tokenizer(str(tok_path))
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64)).eval()
    embed(model, tok, [f"sentence number {i}" for i in range(10)], batch_size=4, progress=False)
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 3  # after the batches of 4 and 8 sentences, then the closing line
    assert lines[0].startswith("normswap: embedding: 4/10 sentences (40%), ") and "sentences/s, eta " in lines[0]
    assert lines[1].startswith("normswap: embedding: 8/10 sentences (80%), ")
    assert re.match(r"normswap: embedding: 10/10 sentences done in [0-9.]+s, [0-9.k]+ sentences/s$", lines[-1])


def test_eval_cli_progress_goes_to_stderr_and_results_to_stdout(logs, every_update, tmp_path, monkeypatch, capsys):
    """`normswap eval --ppl` off a terminal (as under pytest): periodic lines on stderr for each
    model, the JSON alone on stdout."""
    from cli_util import run_cli
    from test_eval_support import tiny_gpt2_folder

    from normswap.assets import asset

    valid = asset("wikitext2-tokenized", "valid.txt")
    if not valid.is_file():
        pytest.skip("wikitext2 asset missing")
    model = tiny_gpt2_folder(tmp_path)
    text = tmp_path / "valid.txt"
    text.write_text(valid.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    code, out, err = run_cli(["eval", model, "--baseline", model, "--ppl", text, "--max-length", 32, "--stride", 32,
                              "--format", "json"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out)  # nothing but the result on stdout
    windows = res["ppl"]["windows"]
    progress_lines = [ln for ln in _lines(err) if ln.startswith(f"normswap: perplexity ({tmp_path.name}/tiny-gpt2): ")]
    periodic = [ln for ln in progress_lines if "eta " in ln]
    closing = [ln for ln in progress_lines if " done in " in ln]
    assert len(closing) == 2  # the model and its baseline
    assert all(f"{windows}/{windows} windows done in " in ln and f", {format_count(res['ppl']['tokens'])} tok, " in ln for ln in closing)
    assert periodic and all("tok, " in ln and "tok/s" in ln for ln in periodic)
