"""Encoders without an LM head: pooled sentence embeddings, zero-shot STS and fidelity to the baseline.

Zero-shot STS: embed both sentences of each pair, score the pair by the cosine of the pooled
embeddings, and correlate the cosines with the gold scores (Spearman, as the sentence-transformers
benchmark reports, and Pearson). Fidelity: the mean cosine between the baseline's and the converted
model's pooled embedding of the same sentence (1.0 means the conversion changed nothing).

Pooling follows the model's sentence-transformers config (`1_Pooling/config.json`) when present,
mean pooling over non-padding tokens otherwise.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from normswap.errors import NormswapError
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
            c = json.loads(cfg.read_text())
        except ValueError:
            return "mean"
        if c.get("pooling_mode_cls_token"):
            return "cls"
        if c.get("pooling_mode_max_tokens"):
            return "max"
    return "mean"


def read_sts(path: str | os.PathLike) -> list[StsPair]:
    """Pairs from a file in the GLUE STS-B layout (tab-separated, header with sentence1, sentence2, score).

    Without a header the last three columns are taken as sentence1, sentence2, score.
    """
    p = Path(path)
    if not p.is_file():
        raise NormswapError(f"STS file {path} not found")
    with p.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise NormswapError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    if {"sentence1", "sentence2", "score"} <= set(header):
        i1, i2, iscore = header.index("sentence1"), header.index("sentence2"), header.index("score")
        rows = rows[1:]
    else:
        i1, i2, iscore = -3, -2, -1
    pairs = []
    for line, row in enumerate(rows, start=2 if i1 >= 0 else 1):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            pairs.append(StsPair(row[i1], row[i2], float(row[iscore])))
        except (IndexError, ValueError):
            raise NormswapError(f"{path}:{line}: not an STS-B row (need sentence1, sentence2 and a numeric score)") from None
    if not pairs:
        raise NormswapError(f"{path} has no STS pairs")
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
    bar = progress_bar(len(sentences), "embedding", progress, unit="sent")
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
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Zero-shot STS of one model: (correlations, per-pair cosines, embeddings of all 2n sentences)."""
    sentences = [p.sentence1 for p in pairs] + [p.sentence2 for p in pairs]
    emb = embed(model, tokenizer, sentences, pooling=pooling, batch_size=batch_size, max_seq_length=max_seq_length, progress=progress)
    n = len(pairs)
    cos = sts_scores(emb[:n], emb[n:])
    return sts_correlations(cos, pairs), cos, emb
