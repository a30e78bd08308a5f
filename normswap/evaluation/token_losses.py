"""The distribution of a causal LM's per-token loss: mean, median and tails, and the worst tokens.

A mean cross-entropy hides what LayerNorm-free models are known for (design notes 3): rare tokens
with a huge loss (the LN-free GPT-2 XL reaches CE 130 on some Pile text). `token_loss_stats`
scores every next-token prediction of a text or of batches and reports

    tokens, mean, median, p90, p99, p999 (the 99.9th percentile), max
    worst: the N highest-loss tokens, each with its decoded token, the text before it, its loss

Percentiles interpolate linearly between order statistics (numpy's default, `np.percentile`).
A text is cut into non-overlapping blocks of `block_size` tokens, each scored on its own (the first
token of a block has no context and is not scored); batches are dicts of input_ids and
attention_mask (right padding), and a target counts where its attention mask is 1, as in training.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import NormswapError

QUANTILES = (("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))


@dataclass
class WorstToken:
    """One high-loss prediction: the token it failed on and what came before it."""

    loss: float
    token: str  # the decoded target token
    token_id: int
    context: str  # the decoded tokens before it (at most `context` of them)
    example: int  # which example (block) of the input
    position: int  # the target's index in that example


@dataclass
class TokenLossStats:
    """The per-token cross-entropy distribution (nats)."""

    tokens: int
    mean: float
    median: float
    p90: float
    p99: float
    p999: float
    max: float
    worst: list[WorstToken] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: torch.Tensor, q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ascending values, linear between order statistics."""
    n = int(sorted_values.numel())
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = float(sorted_values[lo]), float(sorted_values[hi])
    return a + frac * (b - a)


def text_batches(tokenizer: Any, text: str, *, block_size: int, batch_size: int = 8,
                 max_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The text's tokens (no special tokens) as non-overlapping blocks of `block_size`, batched;
    a shorter last block is its own batch."""
    if block_size < 2:
        raise NormswapError(f"token losses need blocks of at least 2 tokens, got {block_size}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise NormswapError("the text has fewer than 2 tokens: nothing to score")
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    if len(blocks) > 1 and len(blocks[-1]) < 2:
        blocks.pop()
    full = [b for b in blocks if len(b) == block_size]
    batches = []
    for i in range(0, len(full), batch_size):
        x = torch.tensor(full[i:i + batch_size], dtype=torch.long)
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    if len(blocks[-1]) < block_size:
        x = torch.tensor([blocks[-1]], dtype=torch.long)
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    return batches


@torch.no_grad()
def token_losses(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor]]:
    """Every scored next-token loss of `model` over `batches`, in order.

    Returns (losses: 1-D float64, where: (example, target position) per loss, ids: each example's
    input ids). Non-finite losses are an error: the model produces NaN or infinite logits.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    where: list[tuple[int, int]] = []
    rows: list[torch.Tensor] = []
    try:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(device), reduction="none")
            nll = nll.view(ids.shape[0], -1).double().cpu()
            keep = mask[:, 1:].bool()
            for r in range(ids.shape[0]):
                pos = keep[r].nonzero().flatten()
                out.append(nll[r, pos])
                where.extend((len(rows), int(p) + 1) for p in pos)
                rows.append(ids[r].cpu())
    finally:
        model.train(was_training)
    losses = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    bad = int((~torch.isfinite(losses)).sum())
    if bad:
        raise NormswapError(f"{bad} of {losses.numel()} token losses are NaN or infinite: the model produces non-finite logits")
    return losses, where, rows


def summarise(losses: torch.Tensor, where: list[tuple[int, int]] | None = None, rows: list[torch.Tensor] | None = None,
              tokenizer: Any = None, *, worst: int = 10, context: int = 12) -> TokenLossStats:
    """Mean, percentiles and max of `losses`, and the `worst` highest with their tokens."""
    if losses.numel() == 0:
        raise NormswapError("no token was scored")
    values = losses.double()
    s = torch.sort(values).values
    q = {name: percentile(s, p) for name, p in QUANTILES}
    stats = TokenLossStats(tokens=int(values.numel()), mean=float(values.mean()), max=float(s[-1]), **q)
    if worst > 0 and where is not None and rows is not None:
        top = torch.topk(values, min(worst, int(values.numel()))).indices.tolist()
        for i in top:
            ex, pos = where[i]
            ids = rows[ex]
            tid = int(ids[pos])
            stats.worst.append(WorstToken(loss=float(values[i]), token=_decode(tokenizer, [tid]), token_id=tid,
                                          context=_decode(tokenizer, ids[max(0, pos - context):pos].tolist()), example=ex, position=pos))
    return stats


def token_loss_stats(model: nn.Module, data: str | Iterable[dict[str, torch.Tensor]], tokenizer: Any = None, *,
                     block_size: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
                     worst: int = 10, context: int = 12) -> TokenLossStats:
    """The per-token cross-entropy distribution of the causal LM `model` on `data`.

    `data` is a text (tokenised with `tokenizer`, cut into blocks of `block_size` tokens, by
    default the model's positions up to 1024, scoring at most `max_tokens` tokens of it) or an
    iterable of batches (dicts of input_ids and attention_mask). `worst` highest-loss tokens are
    reported with up to `context` tokens before each, decoded with `tokenizer` when given.
    """
    if isinstance(data, str):
        if tokenizer is None:
            raise NormswapError("scoring a text needs its tokenizer")
        if block_size is None:
            block_size = min(_positions(model) or 1024, 1024)
        data = text_batches(tokenizer, data, block_size=block_size, batch_size=batch_size, max_tokens=max_tokens)
    losses, where, rows = token_losses(model, data)
    return summarise(losses, where, rows, tokenizer, worst=worst, context=context)


def _positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    try:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except TypeError:
        return tokenizer.decode(ids)


def compare_rows(stats: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows of a side-by-side table (one column per entry of `stats`, each a TokenLossStats dict):
    tokens, mean, median, p90, p99, p999, max."""
    names = ("tokens", "mean", *(n for n, _ in QUANTILES), "max")
    return [[n] + [(s[n] if n == "tokens" else round(s[n], 4)) if s else "" for s in stats.values()] for n in names]
