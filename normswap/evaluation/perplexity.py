"""Perplexity of language models on a text: sliding windows for causal LMs, masked-token loss for MLMs.

Causal LMs. The whole text is tokenised once, exactly as read (no line joining or stripping: on
WikiText-2 this reproduces the stand-in's published 432 figure). Windows of `max_length` input
tokens start every `stride` tokens; each window predicts the token after each of its inputs and
only targets that no earlier window scored are counted. Every token but the first is scored exactly
once, whatever the stride, so with stride == max_length the figure equals a plain loop over
non-overlapping blocks (x = ids[i:i+L], y = ids[i+1:i+L+1]); a smaller stride gives each scored
token more context. Perplexity = exp(sum NLL / tokens scored), accumulated in float64.

Bits per byte (causal LMs), the figure that compares models with different tokenizers: lm-eval's
definition, sum NLL in nats / (UTF-8 bytes scored * ln 2) (lm_eval.api.metrics.bits_per_byte:
-sum(loglikelihood) / sum(bytes) / ln 2, bytes = len(text.encode("utf-8"))). Here the bytes are
those of exactly the text span whose tokens were scored: tokens 1..n-1 of the kept tokens, so the
first (unscored) token's bytes and, under --max-tokens, the dropped tail are left out (see
`tokenize_text_bytes`). Since every token but the first is scored once whatever the stride, the
bytes do not depend on the stride; the NLL, and so the figure, does (more context). lm-eval also
scores the first token (from an EOS/BOS prefix) and counts all the document's bytes, so its figure
differs from this one by the first token; its wikitext task moreover counts the bytes of the
original page while scoring the detokenised one.

Masked LMs. The text is cut into chunks of `max_length` tokens (special tokens included), a fixed
seeded 15% of the content tokens is replaced by the mask token (always the mask token: this is a
measurement, not BERT's 80/10/10 training corruption), and the loss is the mean cross-entropy of the
masked tokens; its exp is reported. Pseudo-perplexity (each token masked in turn) is the slower,
mask-free alternative.

Memory stays bounded on long texts: windows are scored in batches whose logits fit a fixed budget.

Never garbage: a NaN or infinite token loss (a model with non-finite logits) is an error naming the
model; a finite mean NLL above ~709.78 nats, whose exp overflows a float64, gives perplexity inf
with the exact NLL beside it.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.evaluation.progress import progress_bar, short_name
from normswap.textfiles import read_text  # noqa: F401 - the shared text reader, re-exported here

LOGITS_BUDGET_BYTES = 512 * 2**20  # cap on one batch's float32 logits


@dataclass
class PerplexityResult:
    """One perplexity measurement and the settings it depends on."""

    kind: str  # "causal" | "masked" | "pseudo"
    value: float  # perplexity: exp(nll)
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    max_length: int
    stride: int | None  # causal only
    windows: int
    text_tokens: int  # tokens in the (possibly truncated) text
    nll_median: float = float("nan")
    nll_p99: float = float("nan")
    nll_sum: float = float("nan")  # total negative log-likelihood of the scored tokens (nats, float64)
    bits_per_byte: float | None = None  # nll_sum / (bytes * ln 2); None where undefined or the text was not given
    bytes: int | None = None  # UTF-8 bytes of the text the scored tokens cover (extra["bytes_from"]: how counted)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_text(source: str) -> str:
    """Text from a file, or (online only) from a `datasets` name written `name[:config[:split]]`."""
    if Path(source).exists() or os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return read_text(source)
    name, config, split = (source.split(":") + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split or "test")
    except Exception as err:  # no such dataset, no network...
        raise NormswapError(f"--ppl {source}: not a file, and not a loadable dataset ({str(err).splitlines()[0][:200]})") from None
    if "text" not in ds.column_names:
        raise NormswapError(f"dataset {source} has no 'text' column")
    text = "".join(ds["text"])
    if not text.strip():
        raise NormswapError(f"dataset {source} has no text")
    return text


def _check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens < 1:  # a negative slice would score the text minus its tail
        raise NormswapError(f"--max-tokens must be positive, got {max_tokens}")


def _kept(ids: list[int], max_tokens: int | None) -> list[int]:
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise NormswapError("the text has fewer than 2 tokens: nothing to score")
    return ids


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the whole text (no special tokens), truncated to `max_tokens` if given."""
    _check_max_tokens(max_tokens)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(_kept(ids, max_tokens), dtype=torch.long)


@dataclass(frozen=True)
class TokenizedText:
    """Token ids of a text (as `tokenize_text` gives them) and the UTF-8 bytes their tokens cover.

    causal_bytes: bytes of the span of tokens 1..n-1 (what causal perplexity scores);
    all_bytes: bytes of the span of tokens 0..n-1 (what pseudo-perplexity scores);
    bytes_from: "offsets" (the fast tokenizer's offset mapping) or "decode" (decoded token ids);
    causal_chars: (start, end) of the causal span in the text, "offsets" only.
    """

    ids: torch.Tensor
    causal_bytes: int
    all_bytes: int
    bytes_from: str
    causal_chars: tuple[int, int] | None = None


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Ids and char offsets from a fast tokenizer, or None where it has none or they are unusable."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), [tuple(map(int, o)) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a Python tokenizer: no offsets
        return None
    if len(offsets) != len(ids) or any(not 0 <= a <= b <= len(text) for a, b in offsets):
        return None
    if any(offsets[k + 1][1] < offsets[k][1] for k in range(len(offsets) - 1)):  # ends must not go back
        return None
    return ids, offsets


def _decoded(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except TypeError:  # a decode without the keyword
        return tokenizer.decode(ids, skip_special_tokens=False)


def tokenize_text_bytes(tokenizer: Any, text: str, max_tokens: int | None = None) -> TokenizedText:
    """`tokenize_text`'s ids with the UTF-8 bytes of the text their scored tokens cover.

    Offsets (fast tokenizers, bytes_from="offsets"): each character of the text is given to the
    last token whose offsets cover it, and characters no token covers (whitespace a pre-tokenizer
    drops, trimmed offsets) to the next token; the bytes counted are those of the characters of the
    tokens scored, in the original text. So the causal span is text[a:b] with
    a = min(end of token 0, start of token 1) and b = min(end of token n-1, start of token n) (the
    end of token n-1 when nothing was cut off); text after the last token is in no span. A
    character that a byte-level tokenizer splits over two tokens (an emoji, a CJK character) at a
    span boundary goes whole to the token that completes it: up to 3 bytes from the exact byte
    count at that boundary, and exact everywhere else.

    Decode (no offsets: Python tokenizers, bytes_from="decode"): causal bytes =
    len(decode(ids[:n])) - len(decode(ids[:1])) in UTF-8 bytes, the same text where decoding gives
    the text back (byte-level BPE); a lossy tokenizer (lower-casing, accent stripping, unknown
    tokens) gives the bytes of the decoded text instead, and a split character at a boundary decodes
    to U+FFFD (3 bytes).
    """
    _check_max_tokens(max_tokens)
    found = _offsets(tokenizer, text)
    if found is None:
        ids = _kept(tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"], max_tokens)
        first, everything = _utf8_len(_decoded(tokenizer, ids[:1])), _utf8_len(_decoded(tokenizer, ids))
        return TokenizedText(torch.tensor(ids, dtype=torch.long), everything - first, everything, "decode")
    all_ids, offsets = found
    ids = _kept(all_ids, max_tokens)
    n = len(ids)
    a = min(offsets[0][1], offsets[1][0])
    b = offsets[n - 1][1] if n == len(all_ids) else min(offsets[n - 1][1], offsets[n][0])
    a = min(a, b)
    return TokenizedText(torch.tensor(ids, dtype=torch.long), _utf8_len(text[a:b]), _utf8_len(text[:b]), "offsets", (a, b))


def causal_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, first_new) over ids[0:n_tokens].

    A window feeds ids[begin:end] and predicts ids[begin+1:end+1]; the predictions at positions
    first_new.. (relative to begin) are the targets no earlier window scored.
    """
    if not 1 <= stride <= max_length:
        raise NormswapError(f"--stride must be between 1 and --max-length ({max_length}), got {stride}")
    windows, scored_up_to, begin = [], 0, 0  # targets 1..scored_up_to are done
    while True:
        end = min(begin + max_length, n_tokens - 1)
        windows.append((begin, end, scored_up_to - begin))
        scored_up_to = end
        if end >= n_tokens - 1:
            return windows
        begin += stride


def _batch_cap(batch_size: int, length: int, vocab: int) -> int:
    return max(1, min(batch_size, LOGITS_BUDGET_BYTES // max(1, length * vocab * 4)))


_LABELS = {"causal": "perplexity", "masked": "masked-LM perplexity", "pseudo": "pseudo-perplexity"}


def safe_exp(nll: float) -> float:
    """exp(nll), or inf where that overflows a float64 (nll above about 709.78)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def _summary(kind: str, nlls: torch.Tensor, name: str = "the model", scored_bytes: tuple[int, str] | None = None,
             **fields: Any) -> PerplexityResult:
    """Mean NLL and its exp. A NaN or infinite NLL is an error naming `name` (the model produces
    non-finite logits); a finite NLL too large for exp gives perplexity inf, the NLL still exact.
    With `scored_bytes` (bytes, how counted), bits per byte = sum NLL / (bytes * ln 2)."""
    nlls = nlls.double()
    if not nlls.numel():
        raise NormswapError(f"{_LABELS[kind]} of {name}: no token was scored")
    bad = int((~torch.isfinite(nlls)).sum())
    mean = float(nlls.mean())
    if bad or not math.isfinite(mean):
        raise NormswapError(f"{_LABELS[kind]} of {name} is not finite: {bad} of {nlls.numel()} token losses are NaN or infinite "
                            f"(mean negative log-likelihood {mean}), so the model produces non-finite logits")
    res = PerplexityResult(
        kind=kind, value=safe_exp(mean), nll=mean, tokens=int(nlls.numel()),
        nll_median=float(nlls.median()), nll_p99=float(torch.quantile(nlls, 0.99)) if nlls.numel() else float("nan"),
        nll_sum=float(nlls.sum()), **fields,
    )
    if scored_bytes is not None:
        res.bytes, res.extra["bytes_from"] = scored_bytes
        res.bits_per_byte = res.nll_sum / (res.bytes * math.log(2)) if res.bytes > 0 else None
    return res


def _text_for(ids: torch.Tensor, text: TokenizedText | None) -> TokenizedText | None:
    if text is not None and not torch.equal(text.ids.cpu(), ids.cpu()):
        raise NormswapError("the token ids are not those of the tokenised text given for bits per byte")
    return text


@torch.no_grad()
def causal_perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
    name: str = "the model",
    text: TokenizedText | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM on token ids `ids` (1-D); see the module docstring.

    With `text` (the `tokenize_text_bytes` result `ids` came from), the result also has
    bits_per_byte = nll_sum / (bytes * ln 2), bytes = text.causal_bytes (the span of tokens 1..n-1,
    the tokens scored) and extra["bytes_from"] = text.bytes_from; without it those are None.
    """
    text = _text_for(ids, text)
    stride = max_length if stride is None else stride
    device = next(model.parameters()).device
    n = int(ids.numel())
    windows = causal_windows(n, max_length, stride)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else 50_000
    nlls: list[torch.Tensor] = []
    bar = progress_bar(len(windows), f"perplexity ({short_name(name)})", progress, unit="windows")
    i = 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        cap = _batch_cap(batch_size, length, vocab)
        group = [windows[i]]
        while len(group) < cap and i + len(group) < len(windows) and windows[i + len(group)][1] - windows[i + len(group)][0] == length:
            group.append(windows[i + len(group)])
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        y = torch.stack([ids[b + 1:e + 1] for b, e, _ in group]).to(device)
        logits = model(input_ids=x).logits.float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view_as(y)
        for row, (_, _, first_new) in zip(nll, group):
            nlls.append(row[first_new:].cpu())
        i += len(group)
        bar.update(len(group), tokens=sum(e - b - first_new for b, e, first_new in group))  # the tokens scored
    bar.close()
    return _summary("causal", torch.cat(nlls), name, None if text is None else (text.causal_bytes, text.bytes_from),
                    max_length=max_length, stride=stride, windows=len(windows), text_tokens=n)


def _mask_token_id(tokenizer: Any) -> int:
    if getattr(tokenizer, "mask_token_id", None) is None:
        raise NormswapError("the tokenizer has no mask token, so masked-LM perplexity is undefined")
    return int(tokenizer.mask_token_id)


def special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single sequence (e.g. [CLS] / [SEP]).

    Found by encoding a probe with and without special tokens, which works for every tokenizer
    class (transformers 5 dropped `build_inputs_with_special_tokens` from some of them).
    """
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k]), list(full[k + len(plain):])
    raise NormswapError("cannot tell where the tokenizer puts its special tokens")


def _mlm_chunks(tokenizer: Any, ids: torch.Tensor, max_length: int) -> list[tuple[list[int], int, int, int]]:
    """Per chunk: (input ids with specials, offset of the content in them, content start in `ids`, content length)."""
    prefix, suffix = special_wrapping(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise NormswapError(f"--max-length {max_length} leaves no room for text after {len(prefix) + len(suffix)} special tokens")
    out = []
    for start in range(0, int(ids.numel()), body):
        chunk = ids[start:start + body].tolist()
        out.append((prefix + chunk + suffix, len(prefix), start, len(chunk)))
    return out


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        x[k, :len(r)] = torch.tensor(r)
        att[k, :len(r)] = 1
    return x, att


@torch.no_grad()
def masked_lm_perplexity(
    model: nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    *,
    max_length: int,
    mask_probability: float = 0.15,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool | None = None,
    name: str = "the model",
) -> PerplexityResult:
    """Masked-token cross-entropy on a fixed seeded mask of the text's tokens; see the module docstring.

    The mask is drawn once over the text's tokens from `seed` alone, so baseline and converted model
    (and runs with another `max_length`) see the same masked tokens.

    No bits per byte (bits_per_byte and bytes stay None): only a ~15% sample of the tokens is
    scored, each from a context with the other masked tokens hidden, so the NLL is not a code length
    of any span of the text and no byte count goes with it.
    """
    if not 0 < mask_probability < 1:
        raise NormswapError(f"--mlm-probability must be in (0, 1), got {mask_probability}")
    mask_id = _mask_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    masked = torch.rand(int(ids.numel()), generator=gen) < mask_probability
    if not bool(masked.any()):
        raise NormswapError("the text is too short: the 15% mask selected no token")
    chunks = _mlm_chunks(tokenizer, ids, max_length)
    nlls: list[torch.Tensor] = []
    bar = progress_bar(len(chunks), f"masked-LM loss ({short_name(name)})", progress, unit="chunks")
    for k in range(0, len(chunks), batch_size):
        group = chunks[k:k + batch_size]
        rows, targets, where = [], [], []
        for r, (inp, offset, start, length) in enumerate(group):
            inp = list(inp)
            for j in masked[start:start + length].nonzero().flatten().tolist():
                inp[offset + j] = mask_id
                targets.append(int(ids[start + j]))
                where.append((r, offset + j))
            rows.append(inp)
        if not where:
            bar.update(len(group), tokens=sum(c[3] for c in group))
            continue
        x, att = _pad(rows, pad_id)
        logits = model(input_ids=x.to(device), attention_mask=att.to(device)).logits.float()
        picked = logits[[w[0] for w in where], [w[1] for w in where]]
        nlls.append(nn.functional.cross_entropy(picked, torch.tensor(targets, device=device), reduction="none").cpu())
        bar.update(len(group), tokens=sum(c[3] for c in group))  # the text's tokens these chunks cover
    bar.close()
    return _summary(
        "masked", torch.cat(nlls), name, max_length=max_length, stride=None, windows=len(chunks), text_tokens=int(ids.numel()),
        extra={"mask_probability": mask_probability, "seed": seed},
    )


@torch.no_grad()
def pseudo_perplexity(
    model: nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    *,
    max_length: int,
    batch_size: int = 8,
    progress: bool | None = None,
    name: str = "the model",
    text: TokenizedText | None = None,
) -> PerplexityResult:
    """Pseudo-perplexity: every content token masked in turn (one forward pass per token: slow).

    With `text` (the `tokenize_text_bytes` result `ids` came from), bits per byte over all the
    text's tokens: every token is scored once, so bytes = text.all_bytes (token 0 included). It is
    a pseudo-log-likelihood per byte, not a code length: comparable between masked LMs only with the
    usual caveat that pseudo-likelihood favours words split into several tokens.
    """
    text = _text_for(ids, text)
    mask_id = _mask_token_id(tokenizer)
    device = next(model.parameters()).device
    chunks = _mlm_chunks(tokenizer, ids, max_length)
    jobs = [(inp, offset + j, int(ids[start + j])) for inp, offset, start, length in chunks for j in range(length)]
    nlls: list[torch.Tensor] = []
    bar = progress_bar(len(jobs), f"pseudo-perplexity ({short_name(name)})", progress, unit="tokens")
    for k in range(0, len(jobs), batch_size):
        group = jobs[k:k + batch_size]
        rows = []
        for inp, pos, _ in group:
            row = list(inp)
            row[pos] = mask_id
            rows.append(row)
        x, att = _pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        logits = model(input_ids=x.to(device), attention_mask=att.to(device)).logits.float()
        picked = logits[torch.arange(len(group)), torch.tensor([p for _, p, _ in group])]
        nlls.append(nn.functional.cross_entropy(picked, torch.tensor([t for _, _, t in group], device=device), reduction="none").cpu())
        bar.update(len(group))
    bar.close()
    return _summary("pseudo", torch.cat(nlls), name, None if text is None else (text.all_bytes, text.bytes_from),
                    max_length=max_length, stride=None, windows=len(chunks), text_tokens=int(ids.numel()))
