"""Dotted-path access to submodules and parameters."""
from __future__ import annotations

from torch import nn


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path ("" is the root)."""
    return root.get_submodule(path) if path else root


def has_module(root: nn.Module, path: str) -> bool:
    try:
        get_module(root, path)
        return True
    except AttributeError:
        return False


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted path."""
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, new)


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)
