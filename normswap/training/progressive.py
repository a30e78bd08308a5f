"""Progressive mode: swap the new norms in one at a time during training instead of all at once.

The published removal of LayerNorm from GPT-2 replaced norms one by one with a few training steps
between removals, so that the rest of the network adapts to each change before the next. Here every
converted site starts as a `FadeNorm` holding both the original LayerNorm (rebuilt from the
teacher) and the converted module; a schedule moves each site's mix from 0 (original) to 1 (new)
at its turn, either in one step or linearly over `fade_steps` (gradual fading). The structure never
changes during training, so the optimizer, checkpoints and DDP see one fixed set of parameters;
after training every FadeNorm is replaced by its new module.

The original LayerNorm must produce what the site's readers now expect: where the conversion folded
the affine into the readers, the restored norm is weightless; otherwise it keeps the teacher's g, b.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.record import ConversionRecord
from normswap.surgery.paths import get_module, has_module, set_module


class FadeNorm(nn.Module):
    """y = (1 - mix) * old(x) + mix * new(x); only the needed branch runs when mix is 0 or 1."""

    def __init__(self, old: nn.Module, new: nn.Module):
        super().__init__()
        self.old, self.new = old, new
        self.register_buffer("mix", torch.zeros(()))
        for p in old.parameters():  # the original norm is scaffolding: it is thrown away at the end
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = float(self.mix)
        if m <= 0.0:
            return self.old(x)
        if m >= 1.0:
            return self.new(x)
        return (1.0 - m) * self.old(x) + m * self.new(x)


@dataclass
class Schedule:
    """Site k (0-based) starts its swap at step (k + 1) * every and is fully swapped `fade` steps later."""

    every: int
    fade: int = 0

    def mix(self, k: int, step: int) -> float:
        start = (k + 1) * self.every
        if step < start:
            return 0.0
        return 1.0 if self.fade <= 0 else min(1.0, (step - start + 1) / self.fade)


def default_every(total_steps: int, n_sites: int) -> int:
    """Spread the swaps over the first half of training, leaving the second half to recover."""
    return max(1, total_steps // (2 * (n_sites + 1)))


def _original_norm(site_path: str, folded: bool, dim: int, teacher: nn.Module | None, fallback_eps: float) -> nn.Module:
    src = get_module(teacher, site_path) if teacher is not None and has_module(teacher, site_path) else None
    eps = float(getattr(src, "eps", None) or getattr(src, "variance_epsilon", None) or fallback_eps)
    if folded:
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    ln = nn.LayerNorm(dim, eps=eps)
    if src is None or getattr(src, "weight", None) is None:
        raise NormswapError(f"progressive mode: site {site_path} kept its affine, so it needs the teacher's norm at the same path")
    with torch.no_grad():
        ln.weight.copy_(src.weight)
        if getattr(src, "bias", None) is not None:
            ln.bias.copy_(src.bias)
        else:
            ln.bias.zero_()
    return ln


def wrap_sites(model: nn.Module, record: ConversionRecord, teacher: nn.Module | None, fallback_eps: float = 1e-5) -> list[str]:
    """Wrap every converted site of `model` in a FadeNorm (mix 0); returns the site paths in swap order."""
    paths = []
    for site in record.sites:
        new = get_module(model, site.path)
        ref = next(new.parameters(), None)
        old = _original_norm(site.path, site.folded, site.dim, teacher, fallback_eps)
        if ref is not None:
            old = old.to(dtype=ref.dtype, device=ref.device)
        set_module(model, site.path, FadeNorm(old, new))
        paths.append(site.path)
    if not paths:
        raise NormswapError("progressive mode: the student's record lists no converted sites")
    return paths


def apply_schedule(model: nn.Module, paths: list[str], schedule: Schedule, step: int) -> int:
    """Set every site's mix for `step`; returns how many sites are fully swapped."""
    done = 0
    for k, path in enumerate(paths):
        m = schedule.mix(k, step)
        get_module(model, path).mix.fill_(m)
        done += m >= 1.0
    return done


def unwrap_sites(model: nn.Module, paths: list[str]) -> None:
    """Replace every FadeNorm by its new module (the final, converted architecture)."""
    for path in paths:
        fade = get_module(model, path)
        if isinstance(fade, FadeNorm):
            set_module(model, path, fade.new)
