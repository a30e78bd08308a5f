"""Forward kernels of the replacement norms: the defining formula for training, faster equivalent
forms for inference.

DyT on CPU costs almost nothing but its tanh, and ATen's vectorised tanh is about 3x slower than
its sigmoid (`scripts/bench_norms.py`). Inference therefore uses the identity
tanh(z) = 2 * sigmoid(2z) - 1, which turns

    w * tanh(a x) + b    into    (2w) * sigmoid(2a x) + (b - w),

the same function with one transcendental and one fused multiply-add per element. Its result differs
from the tanh form by rounding only: at most a few float32 ulps of the output's scale |w| + |b|
(`tests/test_kernels.py` bounds it against a float64 reference).

Which inference kernel runs is a process-wide choice, `set_dyt_kernel` or the `NORMSWAP_DYT_KERNEL`
environment variable:
- "auto" (default): the torch.compile'd single-pass kernel for tensors of at least
  `COMPILE_MIN_NUMEL` elements, the eager form below that (where the compiled call's fixed overhead
  is larger than what it saves) and wherever compilation fails (one warning, then eager for the rest
  of the process);
- "compiled": the compiled kernel at every size (still falling back to eager on failure);
- "eager": never compile.
Autograd (training, or any input that requires grad) always runs the defining tanh formula, and so
does tracing by an outer torch.compile, which fuses the sigmoid form itself.

RMSNorm takes its statistic through `torch.linalg.vector_norm` in eager mode (one fused reduction
instead of squaring into a temporary and then averaging it: faster than LayerNorm's kernel) and as a
plain sum of squares under torch.compile (which inductor fuses better than its vector_norm).
"""
from __future__ import annotations

import os
import warnings

import torch

KERNELS = ("auto", "compiled", "eager")
# Below this many elements the compiled call's fixed cost (guards and dispatch, about 25 us on CPU)
# outweighs the passes it saves, because the eager form's three passes stay in cache; the measured
# break-even on a 1-thread CPU is about 0.8M elements (docs/results/norms-cpu.json, "dyt_crossover_d768").
COMPILE_MIN_NUMEL = 1 << 20

_state: dict = {"kernel": os.environ.get("NORMSWAP_DYT_KERNEL", "auto"), "compiled": None, "failed": False}


def set_dyt_kernel(kernel: str) -> None:
    """Choose how DyT layers run at inference: "auto", "compiled" or "eager" (see the module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown DyT kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    _state["kernel"] = kernel


def dyt_kernel() -> str:
    """The DyT inference kernel in force ("auto", "compiled" or "eager")."""
    kernel = _state["kernel"]
    if kernel not in KERNELS:
        raise ValueError(f"NORMSWAP_DYT_KERNEL={kernel!r} is not one of {', '.join(KERNELS)}")
    return kernel


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension, the statistic in float32 (as LayerNorm's is)."""
    x32 = x.float()
    if torch.compiler.is_compiling():
        # inductor fuses the square into its reduction loop; its vector_norm lowering is ~1.5x slower
        sum_sq = (x32 * x32).sum(-1, keepdim=True)
    else:
        # eager: one fused reduction kernel instead of materialising x^2 and then averaging it
        sum_sq = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square()
    return (x32 * torch.rsqrt(sum_sq / x.shape[-1] + eps)).to(x.dtype)


def dyt_reference(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """The defining formula w * tanh(alpha x) + b; used wherever gradients flow."""
    y = torch.tanh(alpha.to(x.dtype) * x)
    if weight is not None and bias is not None:
        return torch.addcmul(bias, y, weight)
    if weight is not None:
        return y * weight
    return y + bias if bias is not None else y


def _sigmoid_coefficients(weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(2w, b - w) of the sigmoid form, with w = 1 and b = 0 where the layer has none.

    Missing parameters become Python numbers rather than 0-d tensors: ATen's broadcast of a 0-d
    tensor operand is several times slower than its scalar path.
    """
    scale = 2 * weight if weight is not None else 2.0
    if bias is None:
        shift = -weight if weight is not None else -1.0
    else:
        shift = bias - weight if weight is not None else bias - 1.0
    return scale, shift


def dyt_sigmoid_form(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """(2w) * sigmoid(2 alpha x) + (b - w), out of place: the form a compiler fuses into one pass."""
    scale, shift = _sigmoid_coefficients(weight, bias)
    return torch.sigmoid((2 * alpha.to(x.dtype)) * x) * scale + shift


def dyt_eager(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """The sigmoid form in one buffer: scale, sigmoid in place, then one multiply-add into the same buffer."""
    scale, shift = _sigmoid_coefficients(weight, bias)
    y = torch.mul(x, 2 * alpha.to(x.dtype))
    y.sigmoid_()
    if isinstance(scale, torch.Tensor):
        return torch.addcmul(shift, y, scale, out=y)
    if isinstance(shift, torch.Tensor):
        return torch.add(shift, y, alpha=scale, out=y)
    return y.mul_(scale).add_(shift)


def _compiled_kernel():
    """The compiled sigmoid form, built on first use; None once compilation has failed in this process."""
    if _state["failed"]:
        return None
    if _state["compiled"] is None:
        _state["compiled"] = torch.compile(dyt_sigmoid_form, dynamic=True)
    return _state["compiled"]


def dyt_inference(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """DyT without autograd: the compiled kernel or the eager sigmoid form, per `dyt_kernel()`."""
    if torch.compiler.is_compiling():  # an outer torch.compile is tracing: give it the fusable form
        return dyt_sigmoid_form(x, alpha, weight, bias)
    kernel = dyt_kernel()
    if kernel == "compiled" or (kernel == "auto" and x.numel() >= COMPILE_MIN_NUMEL):
        fn = _compiled_kernel()
        if fn is not None:
            try:
                return fn(x, alpha, weight, bias)
            except Exception as exc:  # noqa: BLE001 - no compiler, unsupported device...: eager is equivalent
                _state["failed"] = True
                reason = (str(exc).splitlines() or [""])[0]
                warnings.warn(f"normswap: the compiled DyT kernel is unavailable ({type(exc).__name__}: {reason}); using the eager form",
                              RuntimeWarning, stacklevel=2)
    return dyt_eager(x, alpha, weight, bias)


def dyt_forward(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """DyT: the defining formula where autograd needs it, the fastest equivalent form otherwise."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, alpha, weight, bias))
    if needs_grad:
        return dyt_reference(x, alpha, weight, bias)
    return dyt_inference(x, alpha, weight, bias)
