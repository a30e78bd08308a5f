"""Per-architecture knowledge, keyed by `config.model_type`.

The built-in tables live in `decoders.py`, `encoders.py`, `rmsnorm_models.py` and `seq2seq.py`. Users add a
family with `register_family(Family(...))`, or from another package through the entry point group
"normswap.families" (each entry point resolves to a `Family`).

This package is torch-free (the tables are plain data), so `normswap archs` lists the families
without importing torch; the plan built from a table (`normswap.archs.plan`) is where torch comes in.
"""
from __future__ import annotations

from typing import Any

from normswap.archs import decoders, encoders, rmsnorm_models, seq2seq
from normswap.archs.spec import Family, NormSpec, Stack

_REGISTRY: dict[str, Family] = {}
_entry_points_loaded = False


def register_family(family: Family, *, overwrite: bool = False) -> None:
    """Make `family` known for its `model_type` (replacing a built-in one only with `overwrite`)."""
    if family.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"family {family.model_type!r} is already registered (pass overwrite=True)")
    _REGISTRY[family.model_type] = family


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="normswap.families"):
        family = ep.load()
        register_family(family, overwrite=True)


def get_family(model_type: str) -> Family | None:
    """The table for a model type, or None for an unknown architecture."""
    _load_entry_points()
    return _REGISTRY.get(model_type)


def families() -> list[Family]:
    """Every known family, built-in and registered."""
    _load_entry_points()
    return list(_REGISTRY.values())


def describe_family(family: Family) -> dict[str, Any]:
    """A JSON-able summary of a family table (for `normswap archs`)."""
    return {
        "model_type": family.model_type,
        "style": family.style,
        "norm_kind": family.norm_kind,
        "norms": [f"{st.name}: {n.name}" if st.name else n.name for st in family.stacks for n in st.block_norms + st.model_norms]
        + [n.name for n in family.head_norms],
        "flag_dependent": family.variant is not None,
        "notes": family.notes,
    }


for _family in (*decoders.FAMILIES, *encoders.FAMILIES, *rmsnorm_models.FAMILIES, *seq2seq.FAMILIES):
    register_family(_family)

__all__ = ["Family", "NormSpec", "Stack", "describe_family", "families", "get_family", "register_family"]
