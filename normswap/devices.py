"""Where a command runs: `--device auto|cpu|cuda[:N]|mps`, one parser for every command.

`auto` is the first accelerator present (CUDA, else Apple's MPS), else the CPU. A device that is
named but absent is a user error (one line), never a silent fall-back to the CPU.

The dtype side (`--dtype auto|float32|bfloat16|float16`) lives in `normswap.conversion`
(`DTYPE_CHOICES`, `parse_dtype`, `resolve_dtypes`): "auto" there is the checkpoint's own dtype.
"""
from __future__ import annotations

import re
from typing import Any

from normswap.errors import NormswapError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(spec: str | None) -> str:
    """The device spec, validated for its form only (no torch import: the CLI checks options
    before loading anything). None means "auto"."""
    spec = "auto" if spec is None else str(spec).strip().lower()
    if not _SPEC.match(spec):
        raise NormswapError(f"unknown --device {spec[:40]!r}: choose {DEVICE_CHOICES}")
    return spec


def resolve_device(spec: Any = "auto") -> Any:
    """A torch.device for `spec` (a string, a torch.device or None), checked to exist here."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = check_device(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NormswapError(f"--device {spec}: no CUDA device is available on this machine (use --device cpu or auto)")
        index = int(spec.partition(":")[2] or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise NormswapError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
                                f"cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    if spec == "mps" and not _mps_available():
        raise NormswapError("--device mps: Apple's MPS backend is not available on this machine (use --device cpu or auto)")
    return torch.device(spec)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def device_name(device: Any) -> str:
    """A device as the results and records state it: "cpu", "cuda:0", "mps"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)
