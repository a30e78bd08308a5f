"""Folding a norm's affine into the linears that read it (design notes 2.1, last step).

A reader y = W z + c of z = g * n + b computes y = (W diag(g)) n + (c + W b): the norm can drop
g and b and the reader absorbs them. A reader without a bias gains one.

`fold_tensors` is the plain-tensor maths, shared by the in-memory path (`fold_into_reader`) and
the streaming path (`normswap.streaming`) so both give bit-identical results.
"""
from __future__ import annotations

import torch
from torch import nn

from normswap.archs.trace import is_conv1d
from normswap.surgery.centre import row_blocks


@torch.no_grad()
def fold_tensors(weight: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor | None, b: torch.Tensor | None,
                 conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reader (weight, bias) after absorbing the norm's (g, b); `weight` is updated in place.

    nn.Linear weight is [out, in] (y = W z + c); GPT-2's Conv1D is [in, out] (y = z @ W + c). A
    reader without a bias gets a new one (in weight's dtype) when b is given. Arithmetic in float64,
    in row blocks of the stored weight.
    """
    shift = None
    b64 = None if b is None else b.double()
    g64 = None if g is None else g.double()
    if b64 is not None:
        shift = torch.zeros(weight.shape[1] if conv1d else weight.shape[0], dtype=torch.float64, device=weight.device)
    # In row blocks of ~BLOCK_ELEMS float64 values: a whole GPT-2-XL c_fc in float64 is 82 MB,
    # twice over with its scaled copy. Linear: each output row is independent. Conv1D: a row is
    # one input feature, scaled by its g; the shift b @ W sums over the blocks (in float64).
    for rows in row_blocks(weight.shape[0], weight[0].numel() if weight.dim() else 1):
        W = weight[rows].double()
        if b64 is not None:
            if conv1d:
                shift += b64[rows] @ W
            else:
                shift[rows] = W @ b64
        if g64 is not None:
            weight[rows] = (W * (g64[rows, None] if conv1d else g64[None, :])).to(weight.dtype)
    if shift is not None:
        if bias is None:
            bias = torch.zeros(shift.shape[0], dtype=weight.dtype, device=weight.device)
        bias = (bias.double() + shift).to(bias.dtype)
    return weight, bias


@torch.no_grad()
def fold_into_reader(reader: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Absorb `weight` (g) and `bias` (b) into `reader`; return True if a bias had to be created."""
    conv1d = is_conv1d(reader)  # weight [in, out], y = z @ W + c
    old_bias = reader.bias
    _, new_bias = fold_tensors(reader.weight.data, None if old_bias is None else old_bias.data, weight, bias, conv1d)
    created = False
    if new_bias is not None:
        if old_bias is None:
            reader.bias = nn.Parameter(new_bias)
            created = True
        else:
            old_bias.data.copy_(new_bias)
    return created
