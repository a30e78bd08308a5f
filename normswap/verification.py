"""How far a converted model is from the original on the same inputs."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

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


HALF = (torch.float16, torch.bfloat16)


def _dtype(model: nn.Module) -> str:
    """The dominant floating dtype of a model's parameters, by element count."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return str(max(counts, key=counts.get)).replace("torch.", "") if counts else "none"


@contextlib.contextmanager
def float32_compute(*models: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run `models` in float32 where they hold float16/bfloat16 tensors on the CPU (whose half
    arithmetic is slow and adds its own rounding): each such parameter and buffer is upcast in
    place, which is exact, and cast back to its own dtype on exit (exact again, for values left
    unchanged). Yields whether anything was upcast. GPU models run as they are."""
    changed: list[tuple[nn.Module, str, str, torch.dtype]] = []
    if enabled:
        for model in models:
            for m in model.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, t in getattr(m, kind).items():
                        if t is not None and t.dtype in HALF and t.device.type == "cpu":
                            changed.append((m, kind, name, t.dtype))
                            if kind == "_parameters":
                                t.data = t.data.float()  # the same Parameter: ties stay tied
                            else:
                                m._buffers[name] = t.float()
    try:
        yield bool(changed)
    finally:
        for m, kind, name, dtype in changed:
            t = getattr(m, kind).get(name)
            if t is None or t.dtype == dtype:
                continue
            if kind == "_parameters":
                t.data = t.data.to(dtype)
            else:
                m._buffers[name] = t.to(dtype)


@torch.no_grad()
def compare(original: nn.Module, converted: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Max absolute and relative (to max |original output|) difference of logits, or of the last
    hidden state for models without a head; for causal LMs also both perplexities on the batches.

    Each model runs with its own weights: the converted one as saved (its output dtype), the
    original in the source's own dtype. On the CPU, half-precision weights are upcast (exactly) to
    float32 for the passes (`float32_compute`), so the figures are the deviation of the converted
    weights from the source's, free of half-precision arithmetic noise; on a GPU both run in their
    own dtype. The result names the dtypes (`original_dtype`, `converted_dtype`, `compute_dtype`).
    """
    dtypes = {"original_dtype": _dtype(original), "converted_dtype": _dtype(converted)}
    with float32_compute(original, converted) as upcast:
        result = _compare(original, converted, batches)
    result.update(dtypes, compute_dtype="float32" if upcast else _dtype(converted))
    return result


def _compare(original: nn.Module, converted: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
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
        a, b = a.float(), b.float()
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
