"""The conversion record: what was changed, stored as the `normswap` section of config.json.

It is enough to rebuild the converted architecture from the base one (`apply_structure`), so that a
checkpoint loads back strictly: every key in the file has a home and every parameter gets a value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from normswap.modules import CenteredEmbedding, new_norm
from normswap.surgery.paths import get_module, set_module


@dataclass
class SiteRecord:
    """One converted norm site, as saved."""

    path: str
    placement: str
    type: str  # "rmsnorm" | "dyt" | "identity"
    dim: int
    eps: float | None
    weight: bool
    bias: bool
    recenter: bool = False
    folded: bool = False
    exact: bool = False
    method: str = ""  # how it was obtained: "exact", "approximate", "calibrated", "alpha-init", ...
    note: str = ""
    alpha: float | None = None


@dataclass
class ConversionRecord:
    """Everything `normswap.load` needs to rebuild a converted model, plus provenance."""

    target: str
    base_model_type: str
    architecture: str
    family: str | None
    style: str  # "pre" | "post" | "unknown"
    exact: bool
    source: dict[str, Any] = field(default_factory=dict)
    tied_head: str | None = None  # None, "center-embed", "untie"
    sites: list[SiteRecord] = field(default_factory=list)
    new_biases: list[str] = field(default_factory=list)
    centered_embeddings: list[str] = field(default_factory=list)
    unfolded: dict[str, str] = field(default_factory=dict)  # site path -> why it kept its affine
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConversionRecord":
        d = dict(d)
        d["sites"] = [SiteRecord(**s) for s in d.get("sites", [])]
        return cls(**d)


def add_bias(linear: nn.Module) -> None:
    """Give a bias-free linear (nn.Linear or a subclass) a zero bias of the right size."""
    out_features = linear.weight.shape[0]
    linear.bias = nn.Parameter(torch.zeros(out_features, dtype=linear.weight.dtype, device=linear.weight.device))


def _path_mapper(model: nn.Module, paths: list[str]):
    """Map recorded paths onto `model`, which may be the bare body of the recorded model (AutoModel
    on a causal LM checkpoint) or carry a head the record lacks; head-only paths map to None."""
    prefix = getattr(model, "base_model_prefix", "")
    body_attr = bool(prefix) and getattr(model, prefix, None) is not None
    recorded_with_prefix = bool(prefix) and any(p.startswith(prefix + ".") for p in paths)

    def map_path(path: str) -> str | None:
        if not prefix or body_attr == recorded_with_prefix:
            return path
        if body_attr:  # record made on the body, model has a head
            return f"{prefix}.{path}"
        return path[len(prefix) + 1:] if path.startswith(prefix + ".") else None

    return map_path


def apply_structure(model: nn.Module, record: ConversionRecord) -> None:
    """Turn a freshly built base model into the converted architecture (values are loaded later)."""
    map_path = _path_mapper(model, [s.path for s in record.sites] + record.new_biases + record.centered_embeddings)
    for path in filter(None, map(map_path, record.centered_embeddings)):
        get_module(model, path).__class__ = CenteredEmbedding
    for path in filter(None, map(map_path, record.new_biases)):
        add_bias(get_module(model, path))
    for site in record.sites:
        path = map_path(site.path)
        if path is None:
            continue
        old = get_module(model, path)
        ref = next(old.parameters(), None)
        new = new_norm(asdict(site))
        if ref is not None:
            new = new.to(dtype=ref.dtype, device=ref.device)
        set_module(model, path, new)
