"""How far a converted model is from the original on the same inputs."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _main_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    out = model(**batch)
    if getattr(out, "logits", None) is not None:
        return out.logits, "logits"
    return out.last_hidden_state, "last_hidden_state"


def _causal(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) and not getattr(model.config, "is_encoder_decoder", False)


@torch.no_grad()
def compare(original: nn.Module, converted: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Max absolute and relative (to max |original output|) difference of logits, or of the last
    hidden state for models without a head; for causal LMs also both perplexities on the batches."""
    max_abs = 0.0
    max_ref = 0.0
    nll = {"original": 0.0, "converted": 0.0}
    n_tok = 0
    what = ""
    causal = _causal(original) and "input_ids" in batches[0]
    for batch in batches:
        a, what = _main_output(original, batch)
        b, _ = _main_output(converted, batch)
        # float32 is enough: the difference of two fp32 logits is exact to ~1e-7 of their size.
        max_abs = max(max_abs, float((a - b).abs().max()))
        max_ref = max(max_ref, float(a.abs().max()))
        if causal:
            ids = batch["input_ids"]
            for key, logits in (("original", a), ("converted", b)):
                nll[key] += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            n_tok += ids[:, 1:].numel()
    tokens = sum(int(b["input_ids"].numel()) for b in batches) if "input_ids" in batches[0] else None
    result: dict[str, Any] = {"output": what, "max_abs_diff": max_abs, "max_rel_diff": max_abs / max(max_ref, 1e-30), "tokens": tokens}
    if causal and n_tok:
        result["ppl_original"] = math.exp(nll["original"] / n_tok)
        result["ppl_converted"] = math.exp(nll["converted"] / n_tok)
    return result
