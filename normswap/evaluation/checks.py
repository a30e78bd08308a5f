"""Checks on models and tokenizers before any evaluation runs, each failing with a one-line reason."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from normswap.errors import NormswapError

_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def max_positions(config: Any) -> int | None:
    """The longest input the model's position embeddings allow (None for models without a limit)."""
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model: nn.Module, max_length: int, name: str) -> None:
    """Refuse a window longer than the model's positions (it would index past the position table)."""
    if max_length < 2:
        raise NormswapError(f"--max-length must be at least 2, got {max_length}")
    limit = max_positions(model.config)
    if limit is not None and max_length > limit:
        raise NormswapError(f"--max-length {max_length} is above the {limit} positions of {name}")


def lm_kind(model: nn.Module) -> str | None:
    """"causal" for a causal LM head, "masked" for a masked LM head, None for a model without one."""
    from transformers.models.auto import modeling_auto as ma

    cls = type(model).__name__
    if cls in set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or cls.endswith(("LMHeadModel", "ForCausalLM")):
        return "causal"
    if cls in set(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()) or cls.endswith("ForMaskedLM"):
        return "masked"
    return None


def require_lm_head(model: nn.Module, name: str) -> str:
    """The LM kind of `model`, or a clear error when it has no LM head to score text with."""
    kind = lm_kind(model)
    if kind is None:
        raise NormswapError(
            f"{name} ({type(model).__name__}) has no language-model head, so it cannot score --ppl text; "
            "for an encoder use --sts (fidelity and zero-shot STS) or --glue"
        )
    return kind


def check_same_tokenizer(tok_a: Any, tok_b: Any, name_a: str, name_b: str) -> None:
    """Baseline and converted must tokenise identically, or their numbers are not comparable."""
    if tok_a is None or tok_b is None:
        missing = name_a if tok_a is None else name_b
        raise NormswapError(f"{missing} has no tokenizer files")
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        raise NormswapError(
            f"{name_a} and {name_b} use different tokenizers (vocabularies of {len(va)} and {len(vb)} tokens differ)"
        )


def refuse_nan(obj: Any, model: str, where: str = "") -> None:
    """Backstop: the evaluation code refuses non-finite results where they arise; should a NaN still
    reach the results, it is an error rather than a reported `nan` (checked before anything is written)."""
    if isinstance(obj, float) and math.isnan(obj):
        raise NormswapError(f"the evaluation of {model} gave NaN for {where or 'a result'}; refusing to report it")
    if isinstance(obj, dict):
        for k, v in obj.items():
            refuse_nan(v, model, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            refuse_nan(v, model, f"{where}[{i}]")
