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
    tokenize_text_bytes,
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


# -------------------------------------------------------------------------------------- bits per byte

MULTIBYTE = "Héllo 😀 wörld 日本語 ok. Ça coûte 5 €, 東京タワー 🗼!\nThe naïve café: 北京 and 🍣 sushi.\n"


@pytest.fixture(scope="module")
def tiny_gpt2(standin_path):
    """A tiny random GPT-2 on the GPT-2 tokenizer (50257 tokens), built from a config: fast, any weights do."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(str(standin_path))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(cfg).eval(), tok


def _gpt2_token_bytes(tok, ids):
    """Exact UTF-8 bytes of each GPT-2 token, from the byte-level alphabet (one character per byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    decoder = {chr(c): b for b, c in zip(bs, cs)}
    return [bytes(decoder[ch] for ch in piece) for piece in tok.convert_ids_to_tokens([int(i) for i in ids])]


def _whole_chars(text, n_bytes):
    """UTF-8 bytes of the longest prefix of whole characters of `text` within its first `n_bytes` bytes."""
    total = 0
    for ch in text:
        if total + len(ch.encode("utf-8")) > n_bytes:
            break
        total += len(ch.encode("utf-8"))
    return total


def _scored_span_bytes(tok, text, ids):
    """Independent byte count of the scored span (tokens 1..n-1): each character goes to the token that completes it."""
    pieces = _gpt2_token_bytes(tok, ids)
    assert b"".join(pieces) == text.encode("utf-8")[:sum(map(len, pieces))]  # byte-level: the tokens are the text's bytes
    return _whole_chars(text, sum(map(len, pieces))) - _whole_chars(text, len(pieces[0]))


def _loop_nll_sum(model, ids, context):
    """Sum of NLL (nats) of tokens 1..n-1, one token at a time, each from up to `context` tokens before it
    (context=None: the non-overlapping blocks of `block` tokens that stride == max_length gives)."""
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            ctx = ids[max(0, t - context):t]
            nll -= torch.log_softmax(model(ctx[None]).logits[0, -1].double(), -1)[ids[t]].item()
    return nll


def _block_nll_sum(model, ids, block):
    nll = 0.0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, block):
            y = ids[i + 1:i + block + 1]
            logp = torch.log_softmax(model(ids[i:i + len(y)][None]).logits[0].double(), -1)
            nll -= logp[torch.arange(len(y)), y].sum().item()
    return nll


def test_bits_per_byte_matches_an_independent_loop_on_multibyte_text(tiny_gpt2):
    model, tok = tiny_gpt2
    t = tokenize_text_bytes(tok, MULTIBYTE)
    assert torch.equal(t.ids, tokenize_text(tok, MULTIBYTE)) and t.bytes_from == "offsets"
    scored_text = MULTIBYTE[len(tok.decode(t.ids[:1])):]  # all but the first token "H"
    assert t.causal_bytes == len(scored_text.encode("utf-8")) == _scored_span_bytes(tok, MULTIBYTE, t.ids)
    assert t.causal_bytes > len(scored_text) + 30  # multi-byte characters: bytes != chars
    assert t.all_bytes == len(MULTIBYTE.encode("utf-8"))
    res = causal_perplexity(model, t.ids, max_length=16, stride=16, batch_size=3, text=t)
    nll = _block_nll_sum(model, t.ids, 16)
    assert res.tokens == len(t.ids) - 1 and res.bytes == t.causal_bytes and res.extra == {"bytes_from": "offsets"}
    assert res.nll_sum == pytest.approx(nll, rel=1e-5)
    assert res.bits_per_byte == pytest.approx(nll / (len(scored_text.encode("utf-8")) * math.log(2)), rel=1e-5)
    assert res.nll == pytest.approx(res.nll_sum / res.tokens, rel=1e-12)  # the token figures are unchanged
    plain = causal_perplexity(model, t.ids, max_length=16, stride=16, batch_size=3)
    assert (plain.value, plain.nll, plain.tokens) == (res.value, res.nll, res.tokens)
    assert plain.bits_per_byte is None and plain.bytes is None and plain.extra == {}


@pytest.mark.parametrize("max_tokens,splits", [(2, False), (8, False), (10, True), (19, False), (24, False), (35, True), (50, True)])
def test_max_tokens_counts_only_the_kept_tokens_bytes(tiny_gpt2, max_tokens, splits):
    """Cut anywhere, also inside a character split over tokens (10: inside 日, 35: inside 🗼, 50: inside 🍣),
    which goes whole to the token that completes it, so not to the kept tokens."""
    model, tok = tiny_gpt2
    t = tokenize_text_bytes(tok, MULTIBYTE, max_tokens=max_tokens)
    assert torch.equal(t.ids, tokenize_text(tok, MULTIBYTE, max_tokens)) and len(t.ids) == max_tokens
    expected_bytes = _scored_span_bytes(tok, MULTIBYTE, t.ids)
    assert t.causal_bytes == expected_bytes == len(MULTIBYTE[slice(*t.causal_chars)].encode("utf-8"))
    exact = sum(map(len, _gpt2_token_bytes(tok, t.ids[1:])))  # the token's own bytes: off by a split character only
    assert (exact - t.causal_bytes > 0) == splits and exact - t.causal_bytes <= 3
    res = causal_perplexity(model, t.ids, max_length=16, stride=16, text=t)
    nll = _block_nll_sum(model, t.ids, 16)
    assert res.tokens == max_tokens - 1 and res.bytes == expected_bytes
    assert res.bits_per_byte == pytest.approx(nll / (expected_bytes * math.log(2)), rel=1e-5)


def test_char_aligned_cut_is_the_text_prefix(tiny_gpt2):
    _, tok = tiny_gpt2
    t = tokenize_text_bytes(tok, MULTIBYTE, max_tokens=8)  # "H" + "éllo 😀 wörld"
    assert t.causal_chars == (1, 13) and t.causal_bytes == len("éllo 😀 wörld".encode("utf-8")) == 17


def test_a_first_token_inside_a_character_gives_it_to_the_scored_span(tiny_gpt2):
    """😀 is two GPT-2 tokens: the first is unscored, the second completes the character, which is counted."""
    _, tok = tiny_gpt2
    text = "😀 and 日本"
    t = tokenize_text_bytes(tok, text)
    assert tok.convert_ids_to_tokens(t.ids[:2].tolist()) == ["ðŁĺ", "Ģ"]
    assert t.causal_bytes == t.all_bytes == len(text.encode("utf-8")) == _scored_span_bytes(tok, text, t.ids)


@pytest.mark.parametrize("max_length", [16, 100])
def test_bytes_do_not_depend_on_the_stride(tiny_gpt2, max_length):
    """Every token but the first is scored once whatever the stride, so tokens and bytes are the same; the
    NLL changes only with the context each token gets (none when one window holds the whole text)."""
    model, tok = tiny_gpt2
    t = tokenize_text_bytes(tok, MULTIBYTE)
    assert len(t.ids) == 55  # 3+ windows of 16 tokens, or one of 100
    runs = {s: causal_perplexity(model, t.ids, max_length=max_length, stride=s, batch_size=4, text=t) for s in (1, 5, max_length)}
    assert {(r.tokens, r.bytes) for r in runs.values()} == {(len(t.ids) - 1, t.causal_bytes)}
    nll = _loop_nll_sum(model, t.ids, max_length)  # stride 1: each token from the max_length tokens before it
    assert runs[1].bits_per_byte == pytest.approx(nll / (t.causal_bytes * math.log(2)), rel=1e-5)
    if max_length >= len(t.ids) - 1:  # one window: every stride is the same computation
        assert runs[1].bits_per_byte == pytest.approx(runs[5].bits_per_byte, rel=1e-6)
        assert runs[1].bits_per_byte == pytest.approx(runs[max_length].bits_per_byte, rel=1e-6)
        assert len({r.windows for r in runs.values()}) == 1
    else:
        block = _block_nll_sum(model, t.ids, max_length)
        assert runs[max_length].bits_per_byte == pytest.approx(block / (t.causal_bytes * math.log(2)), rel=1e-5)


class _NoOffsets:
    """A tokenizer without offsets (a Python tokenizer): only ids and decode."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._tok(text, **kw)

    def decode(self, ids, **kw):
        return self._tok.decode(ids, **kw)


@pytest.mark.parametrize("max_tokens", [None, 8, 24])
def test_without_offsets_bytes_come_from_decoding(tiny_gpt2, max_tokens):
    model, tok = tiny_gpt2
    a = tokenize_text_bytes(tok, MULTIBYTE, max_tokens)
    b = tokenize_text_bytes(_NoOffsets(tok), MULTIBYTE, max_tokens)
    assert (a.bytes_from, b.bytes_from) == ("offsets", "decode") and b.causal_chars is None
    assert torch.equal(a.ids, b.ids)
    assert (b.causal_bytes, b.all_bytes) == (a.causal_bytes, a.all_bytes)  # cut on whole characters: the same
    res = causal_perplexity(model, b.ids, max_length=16, text=b)
    assert res.extra["bytes_from"] == "decode" and res.bytes == a.causal_bytes


def test_bits_per_byte_needs_the_same_ids(tiny_gpt2):
    model, tok = tiny_gpt2
    t = tokenize_text_bytes(tok, MULTIBYTE, max_tokens=20)
    with pytest.raises(NormswapError, match="not those of the tokenised text"):
        causal_perplexity(model, t.ids[:10], max_length=16, text=t)


def test_masked_lms_have_no_bits_per_byte_but_pseudo_perplexity_does(tiny_mlm):
    """Offsets count the original text (WordPiece lower-cases, drops accents and spaces); pseudo-perplexity
    scores every token, so its bytes are all the text's; the 15% masked loss has none."""
    model, tok = tiny_mlm
    text = "  Héllo wörld, the café in 東京 is naïve."
    t = tokenize_text_bytes(tok, text)
    assert t.bytes_from == "offsets" and t.all_bytes == len(text.encode("utf-8"))
    assert t.causal_bytes == len(text.encode("utf-8")) - len("  Héllo".encode("utf-8"))
    masked = masked_lm_perplexity(model, tok, t.ids, max_length=12, mask_probability=0.5, seed=0)
    assert masked.bits_per_byte is None and masked.bytes is None
    res = pseudo_perplexity(model, tok, t.ids, max_length=12, batch_size=8, text=t)
    assert res.tokens == len(t.ids) and res.bytes == t.all_bytes
    assert res.bits_per_byte == pytest.approx(res.nll * res.tokens / (t.all_bytes * math.log(2)), rel=1e-9)
