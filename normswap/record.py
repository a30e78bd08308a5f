"""The conversion record: what was changed, stored as the `normswap` section of config.json.

It is enough to rebuild the converted architecture from the base one (`apply_structure`), so that a
checkpoint loads back strictly: every key in the file has a home and every parameter gets a value.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.modules import VARIANTS, center_input, centre_lookups, new_norm
from normswap.surgery.paths import get_module, set_module


TYPES = ("rmsnorm", "dyt", "none", "identity", *VARIANTS)  # what `normswap.modules.new_norm` builds
TARGETS = ("rmsnorm", "dyt", "none")
STYLES = ("pre", "post", "unknown")
PLACEMENTS = ("pre", "post", "final", "embed", "head", "unknown")
TIED_HEADS = (None, "center-embed", "untie")
MAX_DIM = 1 << 20
PLAN_KINDS = ("table", "discovery", "generic")
_SEGMENT = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)$")
_FAMILY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class SiteRecord:
    """One converted norm site, as saved."""

    path: str
    placement: str
    type: str  # "rmsnorm" | "dyt" | "none" (a fixed scale) | "identity" (a folded fixed scale: nothing left) | a DyT variant (VARIANTS)
    dim: int
    eps: float | None
    weight: bool
    bias: bool
    recenter: bool = False
    center: bool = False  # RMSNorm of the mean-subtracted input (LayerNorm semantics, unknown architectures)
    folded: bool = False
    exact: bool = False
    method: str = ""  # how it was obtained: "exact", "approximate", "calibrated", "alpha-init", ...
    note: str = ""
    alpha: float | None = None
    # `--to none`: the fixed scale s the site divides by (folded into the readers with the affine
    # where `folded`): progressive fine-tuning rebuilds the original norm's output from it
    scale: float | None = None


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
    plan: str = "table"  # where the norm sites came from: "table", "discovery" or "generic"
    tied_head: str | None = None  # None, "center-embed", "untie"
    sites: list[SiteRecord] = field(default_factory=list)
    new_biases: list[str] = field(default_factory=list)
    centered_embeddings: list[str] = field(default_factory=list)
    # blocks whose input is mean-subtracted on the fly (normswap.modules.center_input)
    centered_inputs: list[str] = field(default_factory=list)
    unfolded: dict[str, str] = field(default_factory=dict)  # site path -> why it kept its affine
    version: str = ""
    dtype: str | None = None  # floating dtype of the saved weights ("float32", "bfloat16", "float16")
    # sha256 over this record (without the digest) and the saved tensors' names, dtypes and shapes
    # (normswap.integrity.record_digest); written by `write_config`, checked by `normswap.load`
    digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str | os.PathLike | None = None) -> "ConversionRecord":
        """A validated record: any unknown, missing or ill-typed field is one NormswapError naming
        the field and `where` (the config.json it came from)."""
        return _RecordValidator(where).record(d)


class _RecordValidator:
    """Schema checks of a conversion record as read from JSON (types, known values, paths)."""

    def __init__(self, where: str | os.PathLike | None):
        self.where = where

    def fail(self, msg: str) -> NormswapError:
        return NormswapError(f"invalid conversion record{f' in {self.where}' if self.where else ''}: {msg}")

    def keys(self, d: Any, cls: type, label: str) -> None:
        if not isinstance(d, dict):
            raise self.fail(f"{label or 'the normswap section'} is not an object")
        names = [f.name for f in fields(cls)]
        for k in d:
            if k not in names:
                raise self.fail(f"unknown key {_short(k)}{' in ' + label if label else ''}")
        for f in fields(cls):
            if f.name not in d and f.default is MISSING and f.default_factory is MISSING:
                raise self.fail(f"missing key {f.name!r}{' in ' + label if label else ''}")

    def str_(self, v: Any, key: str, choices: tuple | None = None, optional: bool = False, limit: int = 100_000) -> str | None:
        if v is None and optional:
            return None
        if not isinstance(v, str) or len(v) > limit:
            raise self.fail(f"{key} must be a string{' or null' if optional else ''}, got {_short(v)}")
        if choices is not None and v not in choices:
            raise self.fail(f"{key} {v!r} is not one of {', '.join(repr(c) for c in choices if c is not None)}")
        return v

    def bool_(self, v: Any, key: str) -> bool:
        if type(v) is not bool:
            raise self.fail(f"{key} must be true or false, got {_short(v)}")
        return v

    def number(self, v: Any, key: str, *, positive: bool = False) -> float | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise self.fail(f"{key} must be a {'positive ' if positive else ''}finite number or null, got {_short(v)}")
        return float(v)

    def path(self, v: Any, key: str) -> str:
        if not isinstance(v, str) or not v or len(v) > 1000:
            raise self.fail(f"{key} must be a dotted module path, got {_short(v)}")
        for seg in v.split("."):
            if not _SEGMENT.match(seg) or (seg.startswith("__") and seg.endswith("__")):
                raise self.fail(f"{key} {_short(v)} is not a dotted module path (bad segment {_short(seg)})")
        return v

    def paths(self, v: Any, key: str) -> list[str]:
        if not isinstance(v, list):
            raise self.fail(f"{key} must be a list of module paths, got {_short(v)}")
        out = [self.path(p, f"{key}[{i}]") for i, p in enumerate(v)]
        dup = next((p for i, p in enumerate(out) if p in out[:i]), None)
        if dup is not None:
            raise self.fail(f"{key} lists {dup!r} twice")
        return out

    def site(self, d: Any, i: int) -> SiteRecord:
        label = f"sites[{i}]"
        self.keys(d, SiteRecord, label)
        kind = self.str_(d["type"], f"{label}.type", TYPES)
        dim = d["dim"]
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
            raise self.fail(f"{label}.dim must be an integer from 1 to {MAX_DIM}, got {_short(dim)}")
        eps = self.number(d["eps"], f"{label}.eps", positive=True)
        if kind == "rmsnorm" and eps is None:
            raise self.fail(f"{label}.eps must be a positive finite number for an rmsnorm site, got null")
        return SiteRecord(
            path=self.path(d["path"], f"{label}.path"), placement=self.str_(d["placement"], f"{label}.placement", PLACEMENTS),
            type=kind, dim=dim, eps=eps, weight=self.bool_(d["weight"], f"{label}.weight"), bias=self.bool_(d["bias"], f"{label}.bias"),
            recenter=self.bool_(d.get("recenter", False), f"{label}.recenter"),
            center=self.bool_(d.get("center", False), f"{label}.center"), folded=self.bool_(d.get("folded", False), f"{label}.folded"),
            exact=self.bool_(d.get("exact", False), f"{label}.exact"), method=self.str_(d.get("method", ""), f"{label}.method", limit=1000),
            note=self.str_(d.get("note", ""), f"{label}.note"), alpha=self.number(d.get("alpha"), f"{label}.alpha"),
            scale=self.number(d.get("scale"), f"{label}.scale", positive=True),
        )

    def record(self, d: Any) -> ConversionRecord:
        self.keys(d, ConversionRecord, "")
        from normswap.integrity import DIGEST_RE

        sites_raw = d.get("sites", [])
        if not isinstance(sites_raw, list):
            raise self.fail(f"sites must be a list, got {_short(sites_raw)}")
        sites = [self.site(s, i) for i, s in enumerate(sites_raw)]
        seen: set[str] = set()
        for s in sites:
            if s.path in seen:
                raise self.fail(f"site {s.path!r} is listed twice")
            seen.add(s.path)
        unfolded = d.get("unfolded", {})
        if not isinstance(unfolded, dict):
            raise self.fail(f"unfolded must be an object, got {_short(unfolded)}")
        for k, v in unfolded.items():
            self.path(k, "unfolded key")
            if k not in seen:
                raise self.fail(f"unfolded names {k!r}, which is not a recorded site")
            self.str_(v, f"unfolded[{k!r}]", limit=10_000)
        source = d.get("source", {})
        if not isinstance(source, dict):
            raise self.fail(f"source must be an object, got {_short(source)}")
        family = self.str_(d["family"], "family", optional=True, limit=200)
        if family is not None and not _FAMILY.match(family):
            raise self.fail(f"family {_short(family)} is not a model type name")
        digest = self.str_(d.get("digest"), "digest", optional=True, limit=200)
        if digest is not None and not DIGEST_RE.match(digest):
            raise self.fail(f"digest {_short(digest)} is not 'sha256:' and 64 hex digits")
        base = self.str_(d["base_model_type"], "base_model_type", limit=200)
        arch = self.str_(d["architecture"], "architecture", limit=200)
        _check_model_class(base, arch, self.fail)
        return ConversionRecord(
            target=self.str_(d["target"], "target", TARGETS), base_model_type=base, architecture=arch, family=family,
            style=self.str_(d["style"], "style", STYLES), exact=self.bool_(d["exact"], "exact"), source=source,
            plan=self.str_(d.get("plan", "table"), "plan", PLAN_KINDS),
            tied_head=self.str_(d.get("tied_head"), "tied_head", TIED_HEADS, optional=True), sites=sites,
            new_biases=self.paths(d.get("new_biases", []), "new_biases"),
            centered_embeddings=self.paths(d.get("centered_embeddings", []), "centered_embeddings"),
            centered_inputs=self.paths(d.get("centered_inputs", []), "centered_inputs"),
            unfolded=dict(unfolded), version=self.str_(d.get("version", ""), "version", limit=200), digest=digest,
            dtype=self.str_(d.get("dtype"), "dtype", ("float32", "bfloat16", "float16"), optional=True),
        )


def _check_model_class(base_model_type: str, architecture: str, fail: Any) -> None:
    """base_model_type is a model type transformers knows; architecture a model class for it."""
    import transformers
    from transformers import PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if base_model_type == "normswap" or base_model_type not in CONFIG_MAPPING:
        raise fail(f"base_model_type {_short(base_model_type)} is not a model type of transformers {transformers.__version__}")
    if not _SEGMENT.match(architecture) or architecture.startswith("_"):
        raise fail(f"architecture {_short(architecture)} is not a transformers model class name")
    try:
        cls = getattr(transformers, architecture, None)
    except Exception:  # noqa: BLE001 - a lazy import of an optional backend failing
        cls = None
    if cls is None:
        raise fail(f"architecture {architecture!r} is not in transformers {transformers.__version__}")
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)) or cls is PreTrainedModel:
        raise fail(f"architecture {architecture!r} is not a transformers model class")
    config_class = getattr(cls, "config_class", None)
    if isinstance(config_class, type) and not issubclass(CONFIG_MAPPING[base_model_type], config_class):
        raise fail(f"architecture {architecture!r} does not take a {base_model_type!r} config")


def _short(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


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


def check_structure(model: nn.Module, record: ConversionRecord, where: str | os.PathLike | None = None) -> None:
    """Every path of `record` names a module of `model` (the freshly built base architecture) of the
    kind the record says: a norm of the recorded dim for each site, a bias-free linear for each new
    bias, an embedding for each centred lookup. Raises one NormswapError naming the path."""
    from normswap.archs.plan import is_linear, is_norm

    arch = type(model).__name__

    def fail(msg: str) -> NormswapError:
        return NormswapError(f"invalid conversion record{f' in {where}' if where else ''}: {msg}")

    def module(path: str, key: str) -> nn.Module:
        try:
            mod = get_module(model, path)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Module):
            raise fail(f"{key} {path!r} names no module of {arch}")
        return mod

    map_path = _path_mapper(model, _recorded_paths(record))
    targets: dict[str, str] = {}
    for key, paths in (("centered_embeddings", record.centered_embeddings), ("new_biases", record.new_biases),
                       ("site", [s.path for s in record.sites])):
        for p in paths:
            mapped = map_path(p)
            if mapped is not None and mapped in targets and targets[mapped] != key:
                raise fail(f"{p!r} is listed both as {targets[mapped]} and as {key}")
            if mapped is not None:
                targets[mapped] = key
    for p in record.centered_embeddings:
        mapped = map_path(p)
        if mapped is not None and not isinstance(module(mapped, "centered_embeddings"), nn.Embedding):
            raise fail(f"centered_embeddings {p!r} is a {type(module(mapped, '')).__name__}, not an embedding")
    for p in record.centered_inputs:
        mapped = map_path(p)
        if mapped is not None and (is_norm(module(mapped, "centered_inputs")) or is_linear(module(mapped, ""))):
            raise fail(f"centered_inputs {p!r} is a {type(module(mapped, '')).__name__}, not a transformer block")
    for p in record.new_biases:
        mapped = map_path(p)
        if mapped is None:
            continue
        mod = module(mapped, "new_biases")
        if not is_linear(mod) or not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.dim() != 2:
            raise fail(f"new_biases {p!r} is a {type(mod).__name__}, not a linear layer")
        if getattr(mod, "bias", None) is not None:
            raise fail(f"new_biases {p!r} already has a bias in {arch}")
    for site in record.sites:
        mapped = map_path(site.path)
        if mapped is None:
            continue
        mod = module(mapped, "site")
        if not is_norm(mod):
            raise fail(f"site {site.path!r} is a {type(mod).__name__} in {arch}, not a norm")
        weight = getattr(mod, "weight", None)
        shape = getattr(mod, "normalized_shape", None)
        dim = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 1 else (
            int(shape[-1]) if isinstance(shape, (tuple, list)) and shape else None)
        if dim is not None and dim != site.dim:
            raise fail(f"site {site.path!r} has dim {site.dim}, but the {type(mod).__name__} it replaces has {dim}")


def _recorded_paths(record: ConversionRecord) -> list[str]:
    return [s.path for s in record.sites] + record.new_biases + record.centered_embeddings + record.centered_inputs


def apply_structure(model: nn.Module, record: ConversionRecord, where: str | os.PathLike | None = None) -> None:
    """Turn a freshly built base model into the converted architecture (values are loaded later).

    The record is checked against the model first (`check_structure`): nothing is changed unless
    every recorded path names the right kind of module."""
    check_structure(model, record, where)
    map_path = _path_mapper(model, _recorded_paths(record))
    for path in filter(None, map(map_path, record.centered_embeddings)):
        centre_lookups(get_module(model, path))
    for path in filter(None, map(map_path, record.centered_inputs)):
        center_input(get_module(model, path))
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
