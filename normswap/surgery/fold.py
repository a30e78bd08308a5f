"""Folding a norm's affine into the linears that read it (design notes 2.1, last step).

A reader y = W z + c of z = g * n + b computes y = (W diag(g)) n + (c + W b): the norm can drop
g and b and the reader absorbs them. A reader without a bias gains one.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_into_reader(reader: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Absorb `weight` (g) and `bias` (b) into `reader`; return True if a bias had to be created."""
    conv1d = type(reader).__name__ == "Conv1D"  # weight [in, out], y = z @ W + c
    W = reader.weight.data.double()
    created = False
    if bias is not None:
        b = bias.double()
        shift = b @ W if conv1d else W @ b
        if reader.bias is None:
            reader.bias = nn.Parameter(torch.zeros(shift.shape[0], dtype=reader.weight.dtype, device=reader.weight.device))
            created = True
        reader.bias.data.copy_((reader.bias.data.double() + shift).to(reader.bias.dtype))
    if weight is not None:
        g = weight.double()
        W = W * g[:, None] if conv1d else W * g[None, :]
        reader.weight.data.copy_(W.to(reader.weight.dtype))
    return created
