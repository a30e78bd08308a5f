"""Centring the residual stream's writers (design notes 2.1).

If every writer's output has zero mean over the hidden dimension, so does the stream, and then
LayerNorm(x) equals RMSNorm(x) with the same eps and affine. Arithmetic in float64, cast back.
"""
from __future__ import annotations

import torch
from torch import nn

from normswap.surgery.paths import get_module


@torch.no_grad()
def centre_output(target: nn.Module | nn.Parameter) -> None:
    """Make a writer's output mean-free over the hidden dimension, for every input.

    - nn.Linear y = W h + c (weight [out, in]): W <- C W, c <- c - mean(c), i.e. subtract the mean
      over the output dimension (dim 0).
    - GPT-2's Conv1D stores its weight [in, out]: the same, over the last dimension.
    - nn.Embedding (and position tables), bare parameters such as ViT's CLS token: rows over the
      last dimension.
    - Conv2d patch embeddings: over output channels (dim 0) and the bias.
    """
    if isinstance(target, nn.Parameter):
        _sub_mean(target, -1)
        return
    kind = type(target).__name__
    if isinstance(target, nn.Linear):
        _sub_mean(target.weight, 0)
    elif kind == "Conv1D":
        _sub_mean(target.weight, -1)
    elif isinstance(target, nn.Embedding):
        _sub_mean(target.weight, -1)
    elif isinstance(target, nn.Conv2d):
        _sub_mean(target.weight, 0)
    else:
        raise TypeError(f"don't know how to centre a {kind}")
    bias = getattr(target, "bias", None)
    if bias is not None:
        _sub_mean(bias, -1)


def _sub_mean(p: torch.Tensor, dim: int) -> None:
    p64 = p.data.double()
    p.data.copy_((p64 - p64.mean(dim, keepdim=True)).to(p.dtype))


def writer_target(model: nn.Module, path: str) -> nn.Module | nn.Parameter:
    """The module or bare parameter at `path`."""
    parent, _, name = path.rpartition(".")
    owner = get_module(model, parent)
    attr = getattr(owner, name)
    return attr
