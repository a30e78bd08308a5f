# Modeling code for a normswap checkpoint, for people without normswap:
#
#     from transformers import AutoModelForCausalLM   # or AutoModel, AutoModelForMaskedLM, ...
#     model = AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True)
#
# normswap (https://github.com/, Apache-2.0) replaced this model's LayerNorms with RMSNorm or DyT
# and recorded every structural change in config.json's "normswap" section. This file rebuilds the
# base transformers architecture from that config, re-applies the changes (replacement norms,
# centred embedding lookups and block inputs, biases gained from folding) and loads the weights strictly: a missing
# or unexpected tensor is an error, never a silent re-initialisation. What `from_pretrained` returns
# is the plain transformers model class (e.g. GPT2LMHeadModel) with the new norm modules inside.
#
# This file is self-contained (torch, transformers, safetensors) and must not import normswap. It is
# generated from normswap/export/template_modeling.py, whose norm maths is tested against
# normswap.modules so that the two cannot drift apart.
from __future__ import annotations

import hashlib
import json
import os
import shutil
import types

import torch
from torch import nn
from transformers import PretrainedConfig

NORMSWAP_VERSION = "dev"  # set at export time


# ------------------------------------------------------------------------------ replacement norms


class _AffineNorm(nn.Module):
    """Optional per-channel weight and bias, optional re-centring of the output."""

    def __init__(self, dim: int, weight: bool, bias: bool, recenter: bool):
        super().__init__()
        self.dim, self.recenter = dim, recenter
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.bias is not None:
            y = torch.addcmul(self.bias, y, self.weight)  # one pass over y instead of two
        elif self.weight is not None:
            y = y * self.weight
        elif self.bias is not None:
            y = y + self.bias
        if self.recenter:
            y = y - y.mean(-1, keepdim=True)
        return y


class RMSNorm(_AffineNorm):
    """y = w * x / sqrt(mean(x^2) + eps) + b (statistic in float32, as LayerNorm does); `center`
    subtracts the input's mean first (LayerNorm's own function)."""

    def __init__(self, dim: int, eps: float, weight: bool = True, bias: bool = False, recenter: bool = False,
                 center: bool = False):
        super().__init__(dim, weight, bias, recenter)
        self.eps = float(eps)
        self.center = center

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        x32 = x.float()
        sum_sq = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square()  # one fused reduction
        return self._affine((x32 * torch.rsqrt(sum_sq / x.shape[-1] + self.eps)).to(x.dtype))


class DyT(_AffineNorm):
    """Dynamic Tanh: y = w * tanh(alpha * x) + b, alpha a learnable scalar."""

    def __init__(self, dim: int, alpha: float = 0.5, weight: bool = True, bias: bool = True, recenter: bool = False):
        super().__init__(dim, weight, bias, recenter)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (x, self.alpha, self.weight, self.bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
            return self._affine(torch.tanh(self.alpha.to(x.dtype) * x))
        # inference: tanh(z) = 2 sigmoid(2z) - 1, so w tanh(a x) + b = 2w sigmoid(2a x) + (b - w), and
        # sigmoid is the cheaper kernel (normswap's eager inference form, equal to rounding)
        w, b = self.weight, self.bias
        scale = 2 * w if w is not None else 2.0
        shift = (b if b is not None else 0.0) - (w if w is not None else 1.0)
        y = torch.mul(x, 2 * self.alpha.to(x.dtype))
        y.sigmoid_()
        if isinstance(scale, torch.Tensor):
            y = torch.addcmul(shift, y, scale, out=y)
        elif isinstance(shift, torch.Tensor):
            y = torch.add(shift, y, alpha=scale, out=y)
        else:
            y = y.mul_(scale).add_(shift)
        return y - y.mean(-1, keepdim=True) if self.recenter else y


class FixedNorm(_AffineNorm):
    """No normalisation: y = w * x / s + b, s a fixed per-site scale (mean-subtracted first if `center`)."""

    def __init__(self, dim: int, scale: float = 1.0, weight: bool = True, bias: bool = True, recenter: bool = False,
                 center: bool = False):
        super().__init__(dim, weight, bias, recenter)
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.center = center

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return self._affine(x / self.scale.to(x.dtype))


class ElementwiseNorm(_AffineNorm):
    """DyT's relatives: y = w * f(alpha * x [+ s]) + b, f tanh, isru (u / sqrt(1 + u^2)) or erf (with
    a shift s); alpha (and s) a scalar or one per channel."""

    def __init__(self, dim: int, fn: str = "tanh", alpha: float = 0.5, per_channel: bool = False, weight: bool = True,
                 bias: bool = True, recenter: bool = False):
        super().__init__(dim, weight, bias, recenter)
        self.fn, self.per_channel = fn, bool(per_channel)
        shape = (dim,) if per_channel else ()
        self.alpha = nn.Parameter(torch.full(shape, float(alpha)))
        self.shift = nn.Parameter(torch.zeros(shape)) if fn == "erf" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.alpha.to(x.dtype) * x
        if self.fn == "tanh":
            y = torch.tanh(u)
        elif self.fn == "isru":
            y = u * torch.rsqrt(1 + u * u)
        else:
            y = torch.erf(u + self.shift.to(x.dtype))
        return self._affine(y)


# site type -> (function, per-channel alpha), as config.json's "normswap" section names them
VARIANTS = {"dyt-channel": ("tanh", True), "dyisru": ("isru", False), "dyisru-channel": ("isru", True), "derf": ("erf", False),
            "derf-channel": ("erf", True)}


class CenteredEmbedding(nn.Embedding):
    """Embedding lookups with their mean over the hidden dimension removed (a tied embedding)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        e = super().forward(input)
        return e - e.mean(-1, keepdim=True)


class _CenteredInput:
    """Mixin: a block whose input (hidden_states) is mean-subtracted before it runs."""

    def forward(self, *args, **kwargs):
        if args:
            args = (args[0] - args[0].mean(-1, keepdim=True), *args[1:])
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"] - kwargs["hidden_states"].mean(-1, keepdim=True)
        return super().forward(*args, **kwargs)


def center_input(module: nn.Module) -> None:
    module.__class__ = type(f"CenteredInput{type(module).__name__}", (_CenteredInput, type(module)), {})


def new_norm(spec: dict) -> nn.Module:
    if spec["type"] == "rmsnorm":
        return RMSNorm(spec["dim"], spec["eps"], weight=spec["weight"], bias=spec["bias"], recenter=spec.get("recenter", False),
                       center=spec.get("center", False))
    if spec["type"] == "dyt":
        return DyT(spec["dim"], weight=spec["weight"], bias=spec["bias"], recenter=spec.get("recenter", False))
    if spec["type"] == "none":
        return FixedNorm(spec["dim"], weight=spec["weight"], bias=spec["bias"], recenter=spec.get("recenter", False),
                         center=spec.get("center", False))
    if spec["type"] in VARIANTS:
        fn, per_channel = VARIANTS[spec["type"]]
        return ElementwiseNorm(spec["dim"], fn, per_channel=per_channel, weight=spec["weight"], bias=spec["bias"],
                               recenter=spec.get("recenter", False))
    if spec["type"] == "identity":
        return nn.Identity()
    raise ValueError(f"unknown norm type {spec['type']!r}")


# --------------------------------------------------------------------------------- structure


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, new)


def _path_mapper(model: nn.Module, paths: list):
    """Recorded paths onto `model`, which may be the bare body of the recorded model or carry a head."""
    prefix = getattr(model, "base_model_prefix", "")
    body_attr = bool(prefix) and getattr(model, prefix, None) is not None
    recorded_with_prefix = bool(prefix) and any(p.startswith(prefix + ".") for p in paths)

    def map_path(path: str):
        if not prefix or body_attr == recorded_with_prefix:
            return path
        if body_attr:
            return f"{prefix}.{path}"
        return path[len(prefix) + 1:] if path.startswith(prefix + ".") else None

    return map_path


def apply_structure(model: nn.Module, record: dict) -> None:
    """Turn a freshly built base model into the converted architecture (values are loaded later)."""
    sites = record.get("sites", [])
    map_path = _path_mapper(model, [s["path"] for s in sites] + record.get("new_biases", []) + record.get("centered_embeddings", [])
                            + record.get("centered_inputs", []))
    for path in filter(None, map(map_path, record.get("centered_embeddings", []))):
        _get(model, path).__class__ = CenteredEmbedding
    for path in filter(None, map(map_path, record.get("centered_inputs", []))):
        center_input(_get(model, path))
    for path in filter(None, map(map_path, record.get("new_biases", []))):
        lin = _get(model, path)
        lin.bias = nn.Parameter(torch.zeros(lin.weight.shape[0], dtype=lin.weight.dtype, device=lin.weight.device))
    for site in sites:
        path = map_path(site["path"])
        if path is None:
            continue
        old = _get(model, path)
        ref = next(old.parameters(), None)
        new = new_norm(site)
        if ref is not None:
            new = new.to(dtype=ref.dtype, device=ref.device)
        _set(model, path, new)


# ------------------------------------------------------------------------------------- loading


class NormswapConfig(PretrainedConfig):
    """The base model's config fields plus the `normswap` record of the conversion."""

    model_type = "normswap"


def _file(repo: str, name: str, **hub) -> str:
    if os.path.isdir(repo):
        path = os.path.join(repo, name)
        if not os.path.isfile(path):
            raise OSError(f"{repo} has no {name}")
        return path
    from huggingface_hub import hf_hub_download

    keep = {k: v for k, v in hub.items() if k in ("revision", "token", "cache_dir", "force_download", "local_files_only", "proxies", "subfolder")}
    return hf_hub_download(repo, name, **keep)


def _match_prefix(model: nn.Module, state: dict) -> dict:
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return state
    has_body_attr = getattr(model, prefix, None) is not None
    file_prefixed = any(k.startswith(prefix + ".") for k in state)
    if has_body_attr and not file_prefixed:
        return {f"{prefix}.{k}": v for k, v in state.items()}
    if not has_body_attr and file_prefixed:
        return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return state


def _is_head_key(model: nn.Module, key: str) -> bool:
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and getattr(model, prefix, None) is not None and not key.startswith(prefix + ".")


def _default_class(auto_name: str, config) -> str | None:
    """The class name that `auto_name` builds for this config (e.g. GPT2LMHeadModel)."""
    import transformers

    try:
        return getattr(transformers, auto_name)._model_mapping[type(config)].__name__
    except (KeyError, AttributeError):
        return None


def load_normswap(repo: str, auto_name: str | None = None, dtype=None, **hub) -> nn.Module:
    """Rebuild the converted model of `repo` (a folder or a Hub id) and load its weights strictly.
    `auto_name` picks another head for the same body (e.g. AutoModelForSequenceClassification); the
    parameters of a head that the checkpoint lacks keep their fresh initialisation."""
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig

    with open(_file(repo, "config.json", **hub), encoding="utf-8") as f:
        cfg = json.load(f)
    record = cfg.pop("normswap", None)
    if record is None:
        raise ValueError(f"{repo} is not a normswap checkpoint (config.json has no 'normswap' section)")
    auto_map = cfg.get("auto_map") or {}
    for key in ("model_type", "transformers_version", "auto_map", "architectures", "_name_or_path"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(record["base_model_type"], **cfg)
    own = auto_name is None or _default_class(auto_name, config) == record["architecture"]
    if own:
        cls = getattr(transformers, record["architecture"], None)
        if cls is None:
            raise ValueError(f"architecture {record['architecture']} is not in transformers {transformers.__version__}")
        model = cls(config)
    else:
        model = getattr(transformers, auto_name).from_config(config)
    apply_structure(model, record)
    state = _match_prefix(model, load_file(_file(repo, "model.safetensors", **hub)))
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    result = model.load_state_dict(state, strict=False)
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if id(params.get(k)) not in loaded]
    if not own:
        missing = [k for k in missing if not _is_head_key(model, k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{repo}: weights do not match the recorded architecture: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.eval()
    # Saved again (SentenceTransformer.save, a Trainer checkpoint...), it stays a normswap checkpoint.
    model.__dict__["_normswap_record"] = record
    model.__dict__["_normswap_auto_map"] = auto_map
    model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)
    model.config._name_or_path = model.name_or_path = str(repo)
    return model


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _save_pretrained(self, save_directory, *args, **kwargs):
    """transformers' own save_pretrained, then config.json made a normswap config again (the
    record, its integrity digest over the written tensors, `auto_map`) and this file copied beside
    it: the folder loads with `trust_remote_code=True` and with `normswap.load`, never as the plain
    base model."""
    from safetensors import safe_open

    kwargs["push_to_hub"] = False  # an upload would send the plain config: save, then push the folder
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    tensors, counts = [], {}
    for name in sorted(os.listdir(save_directory)):
        if name.startswith("model") and name.endswith(".safetensors"):
            with safe_open(os.path.join(save_directory, name), "pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    tensors.append([key, part.get_dtype(), list(part.get_shape())])
    for t in self.state_dict().values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    record = {k: v for k, v in self._normswap_record.items() if k != "digest"}
    if counts:
        record["dtype"] = str(max(counts, key=counts.get)).replace("torch.", "")
    payload = json.dumps({"normswap-digest": 1, "record": record, "tensors": sorted(tensors)},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    cfg = self.config.to_dict()
    cfg.update({"model_type": "normswap", "architectures": [record["architecture"]], "auto_map": self._normswap_auto_map,
                "normswap": {**record, "digest": "sha256:" + hashlib.sha256(payload.encode()).hexdigest()}})
    with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    shutil.copyfile(__file__, os.path.join(save_directory, "modeling_normswap.py"))


class _NormswapAuto:
    """Entry point for one Auto class: `from_pretrained` returns the rebuilt transformers model."""

    config_class = NormswapConfig
    _auto_name: str | None = None

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        return load_normswap(str(pretrained_model_name_or_path), cls._auto_name, dtype=dtype, **kwargs)


class NormswapModel(_NormswapAuto):
    _auto_name = "AutoModel"


class NormswapForCausalLM(_NormswapAuto):
    _auto_name = "AutoModelForCausalLM"


class NormswapForMaskedLM(_NormswapAuto):
    _auto_name = "AutoModelForMaskedLM"


class NormswapForSequenceClassification(_NormswapAuto):
    _auto_name = "AutoModelForSequenceClassification"


class NormswapForTokenClassification(_NormswapAuto):
    _auto_name = "AutoModelForTokenClassification"


class NormswapForImageClassification(_NormswapAuto):
    _auto_name = "AutoModelForImageClassification"
