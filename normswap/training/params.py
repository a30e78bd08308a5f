"""Which parameters train: `all`, `norms` (the norm layers) or `norms+readers` (plus the linears
that read a norm's output, where the norm's affine was folded and most of the mismatch can be
corrected cheaply).

Readers are found by tracing one forward pass: a linear layer whose input shares storage with a
norm's output reads that norm. This needs no per-architecture table and sees through views and
slices (GPT-2 reshapes `ln_f`'s output before `lm_head`).
"""
from __future__ import annotations

import torch
from torch import nn

from normswap.archs.plan import is_linear
from normswap.archs.plan import is_norm as is_source_norm
from normswap.errors import NormswapError
from normswap.modules import DyT, ElementwiseNorm

TRAIN_MODES = ("all", "norms", "norms+readers")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: the norms conversion starts from (`archs.plan.is_norm`, which covers
    normswap's RMSNorm too), DyT and its variants (`--variant`), training's FadeNorm, and custom
    *LayerNorm classes."""
    name = type(module).__name__
    return (is_source_norm(module) or isinstance(module, (DyT, ElementwiseNorm)) or name.endswith("LayerNorm")
            or name == "FadeNorm")


def norm_paths(model: nn.Module) -> list[str]:
    """Paths of the outermost norm modules, in model order."""
    out: list[str] = []
    for path, m in model.named_modules():
        if is_norm(m) and not any(path.startswith(p + ".") for p in out):
            out.append(path)
    return out


def find_readers(model: nn.Module, example: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{norm path: [paths of linear layers that read its output]}, from one traced forward."""
    norms = norm_paths(model)
    outputs: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold outputs alive so their storage is not reused
    readers: dict[str, list[str]] = {p: [] for p in norms}
    handles = []

    def on_norm(path: str):
        def hook(_m, _inp, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                outputs[out.untyped_storage().data_ptr()] = path
        return hook

    def on_linear(path: str):
        def hook(_m, inp):
            if inp and isinstance(inp[0], torch.Tensor):
                src = outputs.get(inp[0].untyped_storage().data_ptr())
                if src is not None and path not in readers[src]:
                    readers[src].append(path)
        return hook

    modules = dict(model.named_modules())
    for p in norms:
        handles.append(modules[p].register_forward_hook(on_norm(p)))
    for p, m in modules.items():
        if is_linear(m):
            handles.append(m.register_forward_pre_hook(on_linear(p)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return readers


def select_trainable(model: nn.Module, mode: str, example: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Set requires_grad by `mode`; returns the names of the trainable parameters."""
    if mode not in TRAIN_MODES:
        raise NormswapError(f"unknown --train {mode!r} (use {', '.join(TRAIN_MODES)})")
    if mode == "all":
        chosen = {n for n, _ in model.named_parameters()}
    else:
        prefixes = norm_paths(model)
        if mode == "norms+readers":
            if example is None:
                raise ValueError("norms+readers needs an example batch to trace the readers")
            prefixes += [r for rs in find_readers(model, example).values() for r in rs]
        # every name of a parameter counts: a tied head (lm_head.weight is wte.weight) trains with its reader
        chosen_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                      if any(n.startswith(q + ".") for q in prefixes)}
        chosen = {n for n, p in model.named_parameters() if id(p) in chosen_ids}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise NormswapError(f"--train {mode}: the model has no such parameters")
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norm parameters and DyT's alpha.

    The order is the model's parameter order, so an optimizer state saved in a checkpoint maps
    back onto the same parameters after a restart.
    """
    norm_prefixes = norm_paths(model)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_norm = any(n.startswith(q + ".") for q in norm_prefixes)
        (decay if p.dim() >= 2 and not in_norm else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
