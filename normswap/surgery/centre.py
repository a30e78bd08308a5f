"""Centring the residual stream's writers (design notes 2.1).

If every writer's output has zero mean over the hidden dimension, so does the stream, and then
LayerNorm(x) equals RMSNorm(x) with the same eps and affine. Arithmetic in float64, cast back.

The maths works on plain tensors (`centre_tensor_`, `writer_dims`) so that the in-memory path
(`centre_output` on a module) and the streaming path (`normswap.streaming`, one tensor at a time)
share it and give bit-identical results. Large tensors are processed in row blocks to bound the
float64 temporaries.
"""
from __future__ import annotations

import torch
from torch import nn

from normswap.archs.trace import is_conv1d
from normswap.surgery.paths import get_module

# float64 temporaries are bounded to about this many elements per block (rows are never split)
BLOCK_ELEMS = 1 << 22


def row_blocks(rows: int, row_len: int):
    """Slices of at most ~BLOCK_ELEMS elements over the first dimension."""
    step = max(1, BLOCK_ELEMS // max(1, row_len))
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def writer_dims(target: nn.Module | nn.Parameter) -> dict[str, int]:
    """Which tensors of a writer to centre, and over which dimension ("" names a bare parameter).

    - nn.Linear y = W h + c (weight [out, in]): W <- C W, c <- c - mean(c), i.e. subtract the mean
      over the output dimension (dim 0).
    - GPT-2's Conv1D stores its weight [in, out]: the same, over the last dimension.
    - nn.Embedding (and position tables), bare parameters such as ViT's CLS token: rows over the
      last dimension.
    - Conv1d / Conv2d (patch embeddings): over output channels (dim 0) and the bias.
    """
    if isinstance(target, nn.Parameter):
        return {"": -1}
    kind = type(target).__name__
    if isinstance(target, nn.Linear):
        dims = {"weight": 0}
    elif is_conv1d(target) or isinstance(target, nn.Embedding):
        dims = {"weight": -1}
    elif isinstance(target, (nn.Conv1d, nn.Conv2d)):
        dims = {"weight": 0}
    else:
        raise TypeError(f"don't know how to centre a {kind}")
    if getattr(target, "bias", None) is not None:
        dims["bias"] = -1
    return dims


@torch.no_grad()
def centre_tensor_(t: torch.Tensor, dim: int) -> None:
    """Subtract the mean over `dim` in place (float64 arithmetic, cast back to t's dtype)."""
    if t.dim() >= 2 and dim in (-1, t.dim() - 1) and t.is_contiguous():
        flat = t.view(-1, t.shape[-1])
        for rows in row_blocks(flat.shape[0], flat.shape[1]):
            block = flat[rows]
            b64 = block.double()
            block.copy_((b64 - b64.mean(-1, keepdim=True)).to(t.dtype))
        return
    t64 = t.double()
    t.copy_((t64 - t64.mean(dim, keepdim=True)).to(t.dtype))


@torch.no_grad()
def centre_output(target: nn.Module | nn.Parameter) -> None:
    """Make a writer's output mean-free over the hidden dimension, for every input (see `writer_dims`)."""
    for name, dim in writer_dims(target).items():
        p = target if name == "" else getattr(target, name)
        centre_tensor_(p.data, dim)


def writer_target(model: nn.Module, path: str) -> nn.Module | nn.Parameter:
    """The module or bare parameter at `path`."""
    parent, _, name = path.rpartition(".")
    owner = get_module(model, parent)
    attr = getattr(owner, name)
    return attr
