"""Where and in which precision an evaluation runs: `--device` and `--dtype` of `normswap eval`.

Every model of a run (the converted one and its baseline) is loaded in the same way:

* `device`: auto (the first accelerator, else the CPU), cpu, cuda, cuda:N or mps
  (`normswap.devices`); a device that is named but absent is an error, never a silent fall-back.
* `dtype`: the dtype of the weights. "auto" keeps each checkpoint's own (its stored tensors'
  dominant floating dtype); float32, bfloat16 or float16 cast every model to that dtype (rounding
  wider weights once, as a user of the model in that dtype would).

The compute dtype, which every result states beside the weights' dtype:

* an explicit `dtype` is also the compute dtype, on every device: `--dtype bfloat16` measures the
  model in bfloat16 arithmetic, on the CPU too (slower there than float32, but it is the figure
  asked for);
* with "auto", half-precision weights run in their own dtype on an accelerator, and on the CPU are
  upcast (exactly) to float32 for the passes (`normswap.verification.float32_compute`), as
  evaluation always did there: CPU half arithmetic is slow and adds rounding of its own, so "auto"
  figures on a CPU are those of the stored weights, computed in float32.

GLUE fine-tuning trains float32 master weights (a half-precision AdamW state loses the updates):
with an explicit half dtype they start from the weights rounded to it, and forward and backward
passes run under autocast in that dtype.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from normswap.errors import NormswapError

HALF = (torch.float16, torch.bfloat16)


def check(device: Any, dtype: Any) -> tuple[str, str]:
    """(device spec, dtype name) validated for their form, without touching any model: one
    NormswapError line naming --device or --dtype otherwise."""
    from normswap.conversion import dtype_name, parse_dtype
    from normswap.devices import check_device

    if device is not None and not isinstance(device, (str, torch.device)):
        raise NormswapError(f"unknown --device {str(device)[:40]!r}: choose auto, cpu, cuda, cuda:N or mps")
    spec = check_device(str(device) if isinstance(device, torch.device) else device)
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        from normswap.conversion import DTYPE_CHOICES

        raise NormswapError(f"unknown --dtype {str(dtype)[:40]!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    want = parse_dtype(dtype.strip().lower() if isinstance(dtype, str) else dtype)
    return spec, "auto" if want is None else dtype_name(want)


@dataclass(frozen=True)
class Placement:
    """A resolved (device, dtype) choice for the models of one evaluation."""

    device: torch.device
    dtype: str  # "auto" or a dtype name ("bfloat16")

    @property
    def weights(self) -> torch.dtype | None:
        """The explicit weights dtype (None for "auto")."""
        return None if self.dtype == "auto" else getattr(torch, self.dtype)

    @property
    def load_dtype(self) -> torch.dtype | str:
        """What `normswap.loading.load_pretrained(dtype=...)` takes for this choice."""
        return "auto" if self.weights is None else self.weights

    def compute_dtype(self, weights: torch.dtype) -> torch.dtype:
        """The arithmetic dtype of a model whose weights are `weights` (see the module docstring)."""
        if self.weights is None and weights in HALF and self.device.type == "cpu":
            return torch.float32
        return weights

    def describe(self) -> dict[str, Any]:
        from normswap.devices import device_name

        return {"device": device_name(self.device), "dtype": self.dtype}


def resolve(device: Any = "auto", dtype: Any = "auto") -> Placement:
    """The placement for `device` and `dtype`; an absent device is an error naming the reason."""
    from normswap.devices import resolve_device

    spec, name = check(device, dtype)
    return Placement(resolve_device(spec), name)


@contextlib.contextmanager
def placed(model: nn.Module, place: Placement, info: dict[str, Any] | None = None) -> Iterator[nn.Module]:
    """`model` on the placement's device, in its weights dtype, for inference; on the CPU with
    dtype "auto", half-precision weights are upcast to float32 (exactly) for the duration. `info`,
    if given, receives {"dtype": weights, "compute_dtype": arithmetic} (dtype names)."""
    from normswap.verification import float32_compute

    if place.weights is not None:
        model = model.to(place.weights)
    model = model.to(place.device)
    from normswap.conversion import dominant_dtype, dtype_name

    weights = dominant_dtype(model)
    compute = place.compute_dtype(weights)
    if info is not None:
        info.update(dtype=dtype_name(weights), compute_dtype=dtype_name(compute))
    with float32_compute(model, enabled=compute != weights):
        yield model


def summary(per_role: dict[str, dict[str, Any]], place: Placement) -> dict[str, Any]:
    """The results' statement of where and how the models ran: `device`, `dtype` (the weights'),
    `compute_dtype` (one name when every model agrees, else "mixed"; the dtype asked for when no
    model was loaded here), and `placement` (the dtype asked for and each model's dtypes)."""
    def one(key: str) -> str:
        values = {v[key] for v in per_role.values() if v.get(key)}
        return place.dtype if not values else values.pop() if len(values) == 1 else "mixed"

    return {**place.describe(), "dtype": one("dtype"), "compute_dtype": one("compute_dtype"),
            "placement": {"requested_dtype": place.dtype, "models": per_role}}


def autocast(place: Placement) -> Any:
    """Autocast for training float32 master weights in an explicit half dtype (else a no-op)."""
    if place.weights in HALF:
        return torch.autocast(device_type=place.device.type, dtype=place.weights)
    return contextlib.nullcontext()
