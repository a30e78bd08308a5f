"""Shared helpers of the fine-tuning measurement scripts: the perplexity and STS protocols.

Perplexity: the first 20,481 GPT-2 tokens of WikiText-2 valid, non-overlapping 256-token windows
(20,480 scored tokens), as in assets/README.md (the original stand-in scores 432).
STS: zero-shot STS-B dev Spearman of cosine similarities of mean-pooled embeddings (0.8667 for the
original all-MiniLM-L6-v2).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from normswap.assets import asset  # noqa: E402

PPL_TOKENS = 20_481
PPL_WINDOW = 256


def wikitext_ppl(model_path: str | Path) -> dict[str, Any]:
    """Perplexity of a model folder (plain or normswap) on the protocol above."""
    from normswap.evaluation.perplexity import causal_perplexity, tokenize_text
    from normswap.loading import load_pretrained, load_tokenizer

    model = load_pretrained(str(model_path))
    tok = load_tokenizer(str(model_path))
    ids = tokenize_text(tok, asset("wikitext2-tokenized", "valid.txt").read_text(), max_tokens=PPL_TOKENS)
    r = causal_perplexity(model, ids, max_length=PPL_WINDOW, stride=PPL_WINDOW, batch_size=8, progress=False)
    return {"ppl": r.value, "nll": r.nll, "scored_tokens": r.tokens, "nll_median": r.nll_median, "nll_p99": r.nll_p99}


def sts_spearman(model_path: str | Path) -> dict[str, Any]:
    """Zero-shot STS-B dev correlations of an encoder folder (plain or normswap)."""
    from normswap.evaluation.sts import evaluate_sts, pooling_mode, read_sts
    from normswap.loading import load_pretrained, load_tokenizer

    model = load_pretrained(str(model_path))
    tok = load_tokenizer(str(model_path))
    pairs = read_sts(asset("glue", "STS-B", "dev.tsv"))
    corr, _, _ = evaluate_sts(model, tok, pairs, pooling=pooling_mode(model_path), progress=False)
    return {**corr, "pairs": len(pairs)}


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    from normswap.training.api import provenance

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**obj, **provenance(), "argv": sys.argv, "threads": torch.get_num_threads()}, indent=2, default=str) + "\n")
    tmp.replace(path)


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
