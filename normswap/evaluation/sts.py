"""Encoders without an LM head: pooled sentence embeddings, zero-shot STS and fidelity to the baseline.

Zero-shot STS: embed both sentences of each pair, score the pair by the cosine of the pooled
embeddings, and correlate the cosines with the gold scores (Spearman, as the sentence-transformers
benchmark reports, and Pearson). Fidelity: the mean cosine between the baseline's and the converted
model's pooled embedding of the same sentence (1.0 means the conversion changed nothing).

Pooling follows the model's sentence-transformers config (`1_Pooling/config.json`) when present,
mean pooling over non-padding tokens otherwise.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap import textfiles as readers
from normswap.evaluation.metrics import compute_glue_metrics
from normswap.evaluation.progress import progress_bar


@dataclass
class StsPair:
    """One STS pair with its gold similarity (0-5 in STS-B)."""

    sentence1: str
    sentence2: str
    score: float


def pooling_mode(model_path: str | os.PathLike) -> str:
    """"mean", "cls" or "max", read from a sentence-transformers pooling config; "mean" by default."""
    cfg = Path(model_path) / "1_Pooling" / "config.json"
    if cfg.is_file():
        try:
            c = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON: the default
            return "mean"
        if not isinstance(c, dict):
            return "mean"
        if c.get("pooling_mode_cls_token"):
            return "cls"
        if c.get("pooling_mode_max_tokens"):
            return "max"
    return "mean"


def read_sts(path: str | os.PathLike) -> list[StsPair]:
    """Pairs from a file in the GLUE STS-B layout (tab-separated, header with sentence1, sentence2, score).

    Without a header the last three columns are taken as sentence1, sentence2, score. Every problem
    (missing file, not UTF-8, an over-long line, a short or over-long row, a score that is not a
    finite number, too few pairs or constant scores for a correlation) is one error naming the file
    and, where there is one, the line.
    """
    lines = readers.read_tsv(path, "STS file")
    lines = [(n, row) for n, row in lines if row and not all(not c.strip() for c in row)]
    if not lines:
        raise NormswapError(f"{path} is empty")
    header = [h.strip() for h in lines[0][1]]
    width = None
    if {"sentence1", "sentence2", "score"} <= set(header):
        i1, i2, iscore = header.index("sentence1"), header.index("sentence2"), header.index("score")
        width = len(header)
        lines = lines[1:]
    else:
        i1, i2, iscore = -3, -2, -1
    pairs = []
    for line, row in lines:
        if width is not None and len(row) > width:
            raise NormswapError(f"{path}:{line}: {len(row)} columns but the header has {width} (a tab inside a sentence?)")
        try:
            score = float(row[iscore])
            pairs.append(StsPair(row[i1], row[i2], score))
        except (IndexError, ValueError):
            raise NormswapError(f"{path}:{line}: not an STS-B row (need sentence1, sentence2 and a numeric score)") from None
        if not math.isfinite(score):
            raise NormswapError(f"{path}:{line}: score {readers.shown(row[iscore].strip())} is not a finite number")
    if not pairs:
        raise NormswapError(f"{path} has no STS pairs")
    if len(pairs) < 2:
        raise NormswapError(f"{path} has only 1 STS pair: a correlation needs at least 2")
    if len({p.score for p in pairs}) == 1:
        raise NormswapError(f"{path}: all {len(pairs)} gold scores are {pairs[0].score:g}, so a correlation with them is undefined")
    return pairs


def _pool(hidden: torch.Tensor, attention: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    mask = attention.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    pooling: str = "mean",
    batch_size: int = 64,
    max_seq_length: int = 256,
    progress: bool | None = None,
) -> torch.Tensor:
    """Pooled last-layer embeddings [n, hidden] of `sentences` (batched by length for speed)."""
    device = next(model.parameters()).device
    order = sorted(range(len(sentences)), key=lambda k: len(sentences[k]))
    chunks: list[tuple[list[int], torch.Tensor]] = []
    bar = progress_bar(len(sentences), "embedding", progress, unit="sentences")
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")
        enc = {key: v.to(device) for key, v in enc.items() if key in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = getattr(model(**enc), "last_hidden_state", None)
        if hidden is None:
            raise NormswapError(f"{type(model).__name__} returns no hidden states to pool")
        chunks.append((idx, _pool(hidden.float(), enc["attention_mask"], pooling).cpu()))
        bar.update(len(idx))
    bar.close()
    dim = chunks[0][1].shape[-1]
    out = torch.empty(len(sentences), dim)
    for idx, emb in chunks:
        out[idx] = emb
    return out


def sts_scores(emb1: torch.Tensor, emb2: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair of rows."""
    return nn.functional.cosine_similarity(emb1.double(), emb2.double(), dim=-1)


def sts_correlations(cosines: torch.Tensor, pairs: Sequence[StsPair]) -> dict[str, float]:
    """Spearman and Pearson of cosines against gold scores, through the project's `evaluate` metric."""
    m = compute_glue_metrics("stsb", cosines.tolist(), [p.score for p in pairs])
    return {"spearman": m["spearmanr"], "pearson": m["pearson"]}


def fidelity(emb_baseline: torch.Tensor, emb_converted: torch.Tensor) -> float:
    """Mean cosine between the two models' pooled embeddings of the same sentences."""
    return float(nn.functional.cosine_similarity(emb_baseline.double(), emb_converted.double(), dim=-1).mean())


def evaluate_sts(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[StsPair],
    *,
    pooling: str = "mean",
    batch_size: int = 64,
    max_seq_length: int = 256,
    progress: bool | None = None,
    name: str = "the model",
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Zero-shot STS of one model: (correlations, per-pair cosines, embeddings of all 2n sentences).

    Non-finite embeddings, and correlations that come out undefined (NaN: constant cosines), are
    an error naming `name`, never a NaN result.
    """
    sentences = [p.sentence1 for p in pairs] + [p.sentence2 for p in pairs]
    emb = embed(model, tokenizer, sentences, pooling=pooling, batch_size=batch_size, max_seq_length=max_seq_length, progress=progress)
    bad = int((~torch.isfinite(emb)).any(dim=-1).sum())
    if bad:
        raise NormswapError(f"{name} produces non-finite (NaN or infinite) embeddings for {bad} of {len(sentences)} STS sentences")
    n = len(pairs)
    cos = sts_scores(emb[:n], emb[n:])
    corr = sts_correlations(cos, pairs)
    for key, value in corr.items():
        if not math.isfinite(value):
            raise NormswapError(f"the STS {key} correlation of {name} is undefined ({value}): its {n} cosines are "
                                f"{'all equal' if bool((cos == cos[0]).all()) else 'degenerate'}")
    return corr, cos, emb
