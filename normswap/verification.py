"""How far a converted model is from the original on the same inputs."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import nn


def main_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    """Logits, or the last hidden state of a model without a head (the batch moved to the model's device)."""
    from normswap.calibration import input_device, no_cache

    device = input_device(model)
    out = model(**{k: v.to(device) for k, v in batch.items()}, **no_cache(model))
    if getattr(out, "logits", None) is not None:
        return out.logits, "logits"
    return out.last_hidden_state, "last_hidden_state"


def _causal(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) and not getattr(model.config, "is_encoder_decoder", False)


HALF = (torch.float16, torch.bfloat16)


def _dtype(model: nn.Module) -> str:
    """The name of the floating dtype most of a model's weights are in."""
    from normswap.conversion import dominant_dtype, dtype_name

    return dtype_name(dominant_dtype(model))


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


class Reference:
    """The original model's outputs on the verification batches, computed before the conversion
    changes anything and kept on disk (`normswap.blockwise.SpillStore`), so that the converted
    model is compared with them without a second copy of the model in memory. `compare` gives the
    figures of `compare(original, converted, batches)`, bit for bit."""

    def __init__(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]):
        from normswap.blockwise import SpillStore

        self.batches, self.store = batches, SpillStore()
        self.causal = _causal(model) and "input_ids" in batches[0]
        self.dtype = _dtype(model)
        self.what = ""
        with float32_compute(model) as upcast, torch.no_grad():
            for i, batch in enumerate(batches):
                out, self.what = main_output(model, batch)
                self.store.put(i, out.float())
        self.upcast = upcast

    def compare(self, converted: nn.Module) -> dict[str, Any]:
        deviation = Deviation(self.causal)
        with float32_compute(converted) as upcast, torch.no_grad():
            for i, batch in enumerate(self.batches):
                b, what = main_output(converted, batch)
                deviation.add(self.store.get(i).to(b.device), b, batch, what)
        result = deviation.result()
        result.update(original_dtype=self.dtype, converted_dtype=_dtype(converted),
                      compute_dtype="float32" if upcast or self.upcast else _dtype(converted))
        return result

    def close(self) -> None:
        self.store.close()


def _compare(original: nn.Module, converted: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    deviation = Deviation(causal=_causal(original) and "input_ids" in batches[0])
    for batch in batches:
        a, what = main_output(original, batch)
        b, _ = main_output(converted, batch)
        deviation.add(a, b, batch, what)
    return deviation.result()


class Deviation:
    """The figures of `compare`, accumulated over batches: max absolute and relative difference of
    the two models' outputs and, for causal LMs, both perplexities."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.max_abs = self.max_ref = 0.0
        self.nll = {"original": 0.0, "converted": 0.0}
        self.n_tok = 0
        self.tokens: int | None = None
        self.what = ""

    # tokens a step: the temporaries are a few [64, vocabulary] float32 tensors (13 MB each at a
    # 50k vocabulary), not a batch's or a row's logits (a row of 256 tokens of a 128k vocabulary is
    # 131 MB, and the difference, its absolute value and each log-softmax would be as much again)
    TOKENS = 64

    def add(self, a: torch.Tensor, b: torch.Tensor, batch: dict[str, torch.Tensor], what: str) -> None:
        # float32 is enough: the difference of two fp32 logits is exact to ~1e-7 of their size.
        self.what = what
        for i in range(a.shape[0]):
            ids = batch["input_ids"][i].to(a.device) if self.causal else None
            for t in range(0, a.shape[1], self.TOKENS):
                ai, bi = a[i, t:t + self.TOKENS].float(), b[i, t:t + self.TOKENS].float()
                self.max_abs = max(self.max_abs, float((ai - bi).abs().max()))
                self.max_ref = max(self.max_ref, float(ai.abs().max()))
                if ids is not None:  # position p predicts token p + 1: the row's last position predicts nothing
                    targets = ids[t + 1:t + 1 + self.TOKENS]
                    for key, logits in (("original", ai), ("converted", bi)):
                        self.nll[key] += float(torch.nn.functional.cross_entropy(logits[:targets.numel()], targets, reduction="sum"))
            if ids is not None:
                self.n_tok += ids[1:].numel()
        if "input_ids" in batch:
            self.tokens = (self.tokens or 0) + int(batch["input_ids"].numel())

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = {"output": self.what, "max_abs_diff": self.max_abs, "max_rel_diff": self.max_abs / max(self.max_ref, 1e-30),
                                  "tokens": self.tokens}
        if self.causal and self.n_tok:
            result["ppl_original"] = math.exp(self.nll["original"] / self.n_tok)
            result["ppl_converted"] = math.exp(self.nll["converted"] / self.n_tok)
        return result
