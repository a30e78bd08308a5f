"""Perplexity: sliding windows against independent loops, masked-LM loss and pseudo-perplexity."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from normswap.assets import asset
from normswap.errors import NormswapError
from normswap.evaluation.perplexity import (
    causal_perplexity,
    causal_windows,
    masked_lm_perplexity,
    pseudo_perplexity,
    read_text,
    tokenize_text,
)
from normswap.loading import load_pretrained, load_tokenizer

WT2_FIRST = 20_481  # the stand-in's published 432 figure: first 20,481 tokens, 256-token blocks
FAST_TOKENS = 8 * 256 + 1  # the fast tests score a prefix; the full 432 check is marked slow


@pytest.fixture(scope="module")
def standin(standin_path):
    return load_pretrained(str(standin_path)), load_tokenizer(str(standin_path))


@pytest.fixture(scope="module")
def wt2_ids(standin):
    path = asset("wikitext2-tokenized", "valid.txt")
    if not path.is_file():
        pytest.skip("wikitext2 asset missing")
    return tokenize_text(standin[1], read_text(path), WT2_FIRST)


def _block_loop_ppl(model, ids, block):
    """Independent reference: a plain loop over non-overlapping blocks x = ids[i:i+L], y = ids[i+1:i+L+1]."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, block):
            y = ids[i + 1:i + block + 1]
            x = ids[i:i + len(y)]
            logp = torch.log_softmax(model(x[None]).logits[0], -1)
            nll -= logp[torch.arange(len(y)), y].double().sum().item()
            count += len(y)
    return math.exp(nll / count), count


@pytest.mark.parametrize("n,length,stride", [(10, 4, 4), (10, 4, 2), (11, 4, 3), (3, 8, 8), (100, 16, 1), (257, 256, 128)])
def test_windows_score_every_token_but_the_first_exactly_once(n, length, stride):
    seen = []
    for begin, end, first_new in causal_windows(n, length, stride):
        assert 0 < end - begin <= length
        assert 0 <= first_new < end - begin
        seen += list(range(begin + 1 + first_new, end + 1))  # targets scored by this window
    assert seen == list(range(1, n))


def test_stride_outside_range_is_an_error():
    with pytest.raises(NormswapError, match="--stride"):
        causal_windows(100, 16, 17)
    with pytest.raises(NormswapError, match="--stride"):
        causal_windows(100, 16, 0)


def test_standin_matches_a_plain_block_loop(standin, wt2_ids):
    """max_length == stride == 256 is exactly a loop over non-overlapping blocks."""
    model, _ = standin
    ids = wt2_ids[:FAST_TOKENS]
    res = causal_perplexity(model, ids, max_length=256, stride=256, batch_size=8)
    expected, count = _block_loop_ppl(model, ids, 256)
    assert res.tokens == count == FAST_TOKENS - 1
    assert (res.max_length, res.stride, res.windows) == (256, 256, 8)
    assert f"{res.value:.4g}" == f"{expected:.4g}"
    assert res.value == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_standin_432_figure_matches_the_block_loop(standin, wt2_ids):
    """The README figure: valid ppl 432 on the first 20,481 tokens in 256-token blocks."""
    model, _ = standin
    res = causal_perplexity(model, wt2_ids, max_length=256, stride=256)
    expected, count = _block_loop_ppl(model, wt2_ids, 256)
    assert res.tokens == count == WT2_FIRST - 1 and res.windows == 80
    assert f"{res.value:.4g}" == f"{expected:.4g}"
    assert res.value == pytest.approx(432.35, abs=0.05)


def test_small_stride_gives_each_token_its_full_window_of_context(standin, wt2_ids):
    """stride 1: every target is predicted from exactly the max_length tokens before it (or all, early on)."""
    model, _ = standin
    ids = wt2_ids[:60]
    res = causal_perplexity(model, ids, max_length=24, stride=1, batch_size=16)
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = ids[max(0, t - 24):t]
            nll -= torch.log_softmax(model(ctx[None]).logits[0, -1].double(), -1)[ids[t]].item()
    assert res.tokens == len(ids) - 1
    assert res.value == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_batching_does_not_change_the_result(standin, wt2_ids):
    model, _ = standin
    ids = wt2_ids[:400]
    a = causal_perplexity(model, ids, max_length=64, stride=24, batch_size=1)
    b = causal_perplexity(model, ids, max_length=64, stride=24, batch_size=7)
    assert a.tokens == b.tokens == 399
    assert a.value == pytest.approx(b.value, rel=1e-5)


@pytest.mark.slow
def test_standin_stride_128_figure(standin, wt2_ids):
    model, _ = standin
    res = causal_perplexity(model, wt2_ids, max_length=256, stride=128)
    assert res.tokens == WT2_FIRST - 1 and res.windows == 159
    assert 300 < res.value < 600


# ------------------------------------------------------------------------------------------ masked LMs


@pytest.fixture(scope="module")
def tiny_mlm(minilm_path):
    tok = load_tokenizer(str(minilm_path))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval(), tok


TEXT = ("The European lobster is a species of clawed lobster from the eastern Atlantic Ocean, "
        "Mediterranean Sea and parts of the Black Sea. It may grow to a length of 60 cm. ") * 3


def _independent_mlm_nll(model, tok, ids, max_length, p, seed):
    """Mask, chunk and score one chunk at a time, written out separately from the library."""
    masked = torch.rand(len(ids), generator=torch.Generator().manual_seed(seed)) < p
    body = max_length - 2  # [CLS] ... [SEP]
    nlls = []
    with torch.no_grad():
        for s in range(0, len(ids), body):
            chunk, m = ids[s:s + body].clone(), masked[s:s + body]
            inp = chunk.clone()
            inp[m] = tok.mask_token_id
            x = torch.cat([torch.tensor([tok.cls_token_id]), inp, torch.tensor([tok.sep_token_id])])
            logits = model(x[None]).logits[0, 1:-1]
            nlls += torch.nn.functional.cross_entropy(logits[m], chunk[m], reduction="none").tolist()
    return nlls


def test_masked_lm_loss_matches_an_independent_loop(tiny_mlm):
    model, tok = tiny_mlm
    ids = tokenize_text(tok, TEXT)
    res = masked_lm_perplexity(model, tok, ids, max_length=24, mask_probability=0.15, seed=3, batch_size=4)
    nlls = _independent_mlm_nll(model, tok, ids, 24, 0.15, 3)
    assert res.kind == "masked" and res.tokens == len(nlls) > 0
    assert res.nll == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert res.value == pytest.approx(math.exp(res.nll))
    assert res.extra == {"mask_probability": 0.15, "seed": 3}


def test_mask_is_fixed_by_the_seed(tiny_mlm):
    model, tok = tiny_mlm
    ids = tokenize_text(tok, TEXT)
    a = masked_lm_perplexity(model, tok, ids, max_length=24, seed=1)
    b = masked_lm_perplexity(model, tok, ids, max_length=40, seed=1, batch_size=1)  # other chunking, same mask
    c = masked_lm_perplexity(model, tok, ids, max_length=24, seed=2)
    assert a.tokens == b.tokens
    assert (a.tokens, a.nll) != (c.tokens, c.nll)


def test_pseudo_perplexity_matches_an_independent_loop(tiny_mlm):
    model, tok = tiny_mlm
    ids = tokenize_text(tok, "A man with a hard hat is dancing. A child is riding a horse.")
    res = pseudo_perplexity(model, tok, ids, max_length=12, batch_size=5)
    nll = []
    with torch.no_grad():
        for s in range(0, len(ids), 10):
            chunk = ids[s:s + 10]
            for j in range(len(chunk)):
                inp = chunk.clone()
                inp[j] = tok.mask_token_id
                x = torch.cat([torch.tensor([tok.cls_token_id]), inp, torch.tensor([tok.sep_token_id])])
                nll.append(-torch.log_softmax(model(x[None]).logits[0, j + 1], -1)[chunk[j]].item())
    assert res.kind == "pseudo" and res.tokens == len(ids)
    assert res.nll == pytest.approx(sum(nll) / len(nll), rel=1e-5)


# ------------------------------------------------------------------------------------------------ text


def test_empty_or_missing_text_is_an_error(tmp_path, standin):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(NormswapError, match="empty"):
        read_text(empty)
    with pytest.raises(NormswapError, match="not found"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(NormswapError, match="fewer than 2 tokens"):
        tokenize_text(standin[1], "Hello", max_tokens=1)


def test_text_is_tokenised_as_read(standin, tmp_path):
    """CRLF files read with universal newlines: the same tokens as the LF file."""
    (tmp_path / "lf.txt").write_bytes(b" = A = \n\n some text .\n")
    (tmp_path / "crlf.txt").write_bytes(b" = A = \r\n\r\n some text .\r\n")
    a = tokenize_text(standin[1], read_text(tmp_path / "lf.txt"))
    b = tokenize_text(standin[1], read_text(tmp_path / "crlf.txt"))
    assert torch.equal(a, b)
    assert torch.equal(a, torch.tensor(standin[1](" = A = \n\n some text .\n")["input_ids"]))
