"""The replacement norm layers, written as plain tensor code.

All of them can drop their affine parameters (after folding them into the linears that read the
norm) and can re-centre their output (needed where a norm's output starts the residual stream of a
Pre-LN model, e.g. BLOOM's embedding norm, so that every later norm still sees a zero-mean input).
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import dyt_forward, rms_normalize


class _AffineNorm(nn.Module):
    """Shared tail of the replacement norms: optional per-channel weight and bias, optional re-centring."""

    def __init__(self, dim: int, weight: bool, bias: bool, recenter: bool):
        super().__init__()
        self.dim, self.recenter = dim, recenter
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        """Apply weight, bias and re-centring to `y`, a tensor the caller has just created."""
        # Inference writes into y's own buffer: a fresh output would cost a page-faulting allocation
        # as large as the pass itself. Same arithmetic either way, bit for bit; only where the
        # parameters share y's dtype, so that type promotion would not have widened the result.
        in_place = not torch.is_grad_enabled() and all(p is None or p.dtype == y.dtype for p in (self.weight, self.bias))
        out = y if in_place else None
        if self.weight is not None and self.bias is not None:
            y = torch.addcmul(self.bias, y, self.weight, out=out)  # one pass over y instead of two
        elif self.weight is not None:
            y = torch.mul(y, self.weight, out=out)
        elif self.bias is not None:
            y = torch.add(y, self.bias, out=out)
        if self.recenter:
            y = torch.sub(y, y.mean(-1, keepdim=True), out=out)
        return y

    def extra_repr(self) -> str:
        return f"{self.dim}, weight={self.weight is not None}, bias={self.bias is not None}, recenter={self.recenter}"


class RMSNorm(_AffineNorm):
    """y = w * x / sqrt(mean(x^2) + eps) + b, with optional w and b.

    On a zero-mean input this equals LayerNorm with the same eps, which is what makes the Pre-LN
    conversion exact. The statistic is taken in float32 whatever the input dtype, as LayerNorm does.

    `center` subtracts the input's mean first, which is LayerNorm's own function: the honest
    replacement in an architecture normswap has no table for, whose stream it cannot centre.
    """

    def __init__(self, dim: int, eps: float, weight: bool = True, bias: bool = False, recenter: bool = False,
                 center: bool = False):
        super().__init__(dim, weight, bias, recenter)
        self.eps = float(eps)
        self.center = center

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return self._affine(rms_normalize(x, self.eps))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}" + (", center=True" if self.center else "")


class DyT(_AffineNorm):
    """Dynamic Tanh: y = w * tanh(alpha * x) + b, alpha a learnable scalar; w and b optional.

    No reduction over the hidden dimension at all: each element is transformed on its own.
    """

    def __init__(self, dim: int, alpha: float = 0.5, weight: bool = True, bias: bool = True, recenter: bool = False):
        super().__init__(dim, weight, bias, recenter)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the defining tanh formula under autograd, an equivalent faster kernel for inference (see normswap.kernels)
        y = dyt_forward(x, self.alpha, self.weight, self.bias)
        return y - y.mean(-1, keepdim=True) if self.recenter else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={float(self.alpha):.4g}"


class FixedNorm(_AffineNorm):
    """No normalisation: y = w * x / s + b, with s a fixed per-site scale (`--to none`).

    s is the site's average RMS on calibration data (the "FakeLN" of published LayerNorm removal):
    the map is linear in x, so it and the affine fold into the readers, leaving nothing at all.
    `center` subtracts the input's mean first (a linear projection, not a statistic that divides):
    LayerNorm's mean at a site whose stream cannot be centred (Post-LN, where the norm's output is
    the stream itself). `scale` is a parameter so that end-to-end calibration and fine-tuning can
    move it; it has no gradient otherwise.
    """

    def __init__(self, dim: int, scale: float = 1.0, weight: bool = True, bias: bool = True, recenter: bool = False,
                 center: bool = False):
        super().__init__(dim, weight, bias, recenter)
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.center = center

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return self._affine(x / self.scale.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={float(self.scale):.4g}" + (", center=True" if self.center else "")



class CenteredEmbedding(nn.Embedding):
    """An embedding whose lookups are mean-subtracted over the hidden dimension.

    Used for a token embedding tied to the LM head: centring the shared table itself would change
    the logits, so the centring happens on the way into the residual stream instead. The parameter
    is still called `weight`, so the tie and the checkpoint keys are unchanged.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding's name
        return self.after_lookup(super().forward(input))

    @staticmethod
    def after_lookup(e: torch.Tensor) -> torch.Tensor:
        """What follows the plain lookup (row-wise: `normswap.blockwise` runs it on rows looked up
        in the checkpoint's dtype and cast, not on a cast table)."""
        return e - e.mean(-1, keepdim=True)


class _CenteredOutput:
    """Mixin: the module's output is mean-subtracted over the hidden dimension (CenteredEmbedding
    for embedding classes of their own, such as BART's scaled lookups)."""

    def forward(self, *args, **kwargs):
        e = super().forward(*args, **kwargs)
        return e - e.mean(-1, keepdim=True)


def centre_lookups(module: nn.Module) -> None:
    """Make an embedding centre its lookups from now on, by a class swap that keeps its identity,
    parameters and checkpoint keys: CenteredEmbedding for a plain nn.Embedding, a centring
    subclass of its own class otherwise (which keeps what that class does, e.g. a scale)."""
    cls = type(module)
    if cls is nn.Embedding:
        module.__class__ = CenteredEmbedding
    elif not issubclass(cls, (CenteredEmbedding, _CenteredOutput)):
        module.__class__ = _swapped(cls, _CenteredOutput, "CenteredOutput")


def _swapped(cls: type, mixin: type, prefix: str) -> type:
    """The class `mixin` + `cls` (made once per pair)."""
    key = (cls, mixin)
    if key not in _CENTERED_CLASSES:
        _CENTERED_CLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CENTERED_CLASSES[key]


class _CenteredInput:
    """Mixin: the block's input (its first argument, `hidden_states`) is mean-subtracted over the
    hidden dimension before the block runs. Used where a stream starts at a sum that no weight
    change can centre (Whisper's encoder: gelu(conv2(x)) + positions): the one subtraction at the
    first block gives every later norm a zero-mean input. The block's parameters and checkpoint
    keys are unchanged."""

    def forward(self, *args, **kwargs):
        if args:
            x = args[0]
            args = (x - x.mean(-1, keepdim=True), *args[1:])
        else:
            x = kwargs["hidden_states"]
            kwargs["hidden_states"] = x - x.mean(-1, keepdim=True)
        return super().forward(*args, **kwargs)


_CENTERED_CLASSES: dict[tuple[type, type], type] = {}


def center_input(module: nn.Module) -> None:
    """Make `module` centre its input from now on (see `_CenteredInput`), by a class swap as
    CenteredEmbedding does: the module keeps its identity, parameters and hooks."""
    cls = type(module)
    if not issubclass(cls, _CenteredInput):
        module.__class__ = _swapped(cls, _CenteredInput, "CenteredInput")


class ElementwiseNorm(_AffineNorm):
    """Elementwise stand-ins for a norm beyond DyT: y = w * f(alpha * x [+ s]) + b.

    `fn` is the squashing function:
    - "tanh": DyT's own (arXiv 2503.10622);
    - "isru": the inverse square root unit u / sqrt(1 + u^2), DyISRU (arXiv 2503.21708). With
      alpha = 1 / sqrt(beta) it is the paper's x / sqrt(beta + x^2) up to the output scale, which w
      carries: RMSNorm's x_i / sqrt(x_i^2 + sum of the other squares) with that sum frozen to a
      constant, exact where the other channels' energy does not vary between tokens. It saturates
      more slowly than tanh (like x / |x|, not exponentially), so outliers keep more of their size;
    - "erf": Derf (arXiv 2512.10938), erf(alpha x + s) with a learnable shift s.

    `per_channel` makes alpha (and Derf's s) a [dim] vector instead of a scalar: each channel gets
    its own input scale, which an outlier channel (a massive activation) needs. Like DyT, nothing
    is reduced over the hidden dimension; w and b fold into the readers exactly as DyT's do.
    The variant is named by `VARIANTS` (the record's site type).
    """

    FUNCTIONS = ("tanh", "isru", "erf")

    def __init__(self, dim: int, fn: str = "tanh", alpha: float = 0.5, per_channel: bool = False, weight: bool = True,
                 bias: bool = True, recenter: bool = False):
        if fn not in self.FUNCTIONS:
            raise ValueError(f"unknown elementwise function {fn!r}; choose one of {', '.join(self.FUNCTIONS)}")
        super().__init__(dim, weight, bias, recenter)
        self.fn, self.per_channel = fn, bool(per_channel)
        shape = (dim,) if per_channel else ()
        self.alpha = nn.Parameter(torch.full(shape, float(alpha)))
        self.shift = nn.Parameter(torch.zeros(shape)) if fn == "erf" else None

    @property
    def variant(self) -> str:
        """The variant's name (a key of `VARIANTS`), as the conversion record writes it."""
        return next(k for k, v in VARIANTS.items() if v == (self.fn, self.per_channel))

    def squash(self, x: torch.Tensor) -> torch.Tensor:
        """f(alpha * x [+ s]) before the affine."""
        u = self.alpha.to(x.dtype) * x
        if self.fn == "tanh":
            return torch.tanh(u)
        if self.fn == "isru":
            return u * torch.rsqrt(1 + u * u)
        return torch.erf(u + self.shift.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._affine(self.squash(x))

    def extra_repr(self) -> str:
        a = self.alpha.detach()
        shown = f"{float(a):.4g}" if a.dim() == 0 else f"[{a.numel()}] median {float(a.median()):.4g}"
        return f"{super().extra_repr()}, fn={self.fn}, alpha={shown}"


# Site types of the elementwise variants: type -> (function, per-channel alpha). Scalar-alpha tanh
# is "dyt" (the DyT class); a spec of any of these needs only dim, weight, bias and recenter.
VARIANTS = {
    "dyt-channel": ("tanh", True),
    "dyisru": ("isru", False),
    "dyisru-channel": ("isru", True),
    "derf": ("erf", False),
    "derf-channel": ("erf", True),
}


def new_variant(variant: str, dim: int, *, weight: bool = True, bias: bool = True, recenter: bool = False) -> ElementwiseNorm:
    """An empty elementwise norm of the named variant (a key of `VARIANTS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown elementwise variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    fn, per_channel = VARIANTS[variant]
    return ElementwiseNorm(dim, fn, per_channel=per_channel, weight=weight, bias=bias, recenter=recenter)


def new_norm(spec: dict) -> nn.Module:
    """Build an empty replacement norm from its saved description (see `normswap.record`)."""
    if spec["type"] == "rmsnorm":
        return RMSNorm(spec["dim"], spec["eps"], weight=spec["weight"], bias=spec["bias"], recenter=spec.get("recenter", False),
                       center=spec.get("center", False))
    if spec["type"] == "dyt":
        return DyT(spec["dim"], weight=spec["weight"], bias=spec["bias"], recenter=spec.get("recenter", False))
    if spec["type"] == "none":
        return FixedNorm(spec["dim"], weight=spec["weight"], bias=spec["bias"], recenter=spec.get("recenter", False),
                         center=spec.get("center", False))
    if spec["type"] in VARIANTS:
        return new_variant(spec["type"], spec["dim"], weight=spec["weight"], bias=spec["bias"], recenter=spec.get("recenter", False))
    if spec["type"] == "identity":
        return nn.Identity()
    raise ValueError(f"unknown norm type {spec['type']!r}")
