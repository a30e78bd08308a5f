"""Progressive mode: swap the new norms in one at a time during training instead of all at once.

The published removal of LayerNorm from GPT-2 (design notes 2.6 and 3) replaced the norms one by
one with a few training steps between removals, so that the rest of the network adapts to each
change before the next: first every MLP norm, then every attention norm, then the final norm
(`--swap-order published`, the default; `forward` swaps in model order). Here every converted
site starts as a `FadeNorm` holding both the original norm (rebuilt from the teacher) and the
converted module; a schedule moves each site's mix from 0 (original) to 1 (new) at its turn,
either in one step or linearly over `fade_steps` (gradual fading). The structure never changes
during training, so the optimizer, checkpoints and DDP see one fixed set of parameters; after
training every FadeNorm is replaced by its new module.

The original norm must produce what the site's readers now expect (`original_norm`): the
teacher's own norm module (a LayerNorm, Llama's RMSNorm, Gemma's 1 + w RMSNorm...) where the site
kept its affine; the same norm with a neutral affine where the conversion folded the affine into
the readers; times the site's fixed scale where a `--to none` site folded that scale too (its new
module is then nn.Identity, and the fade mixes s * normalised(x) with x itself); re-centred where
the new module re-centres (a norm whose output starts a centred Pre-LN stream).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.log import logger
from normswap.record import ConversionRecord, SiteRecord
from normswap.surgery.paths import get_module, has_module, set_module
from normswap.training.config import SWAP_ORDERS

GROUPS = ("mlp", "attn", "final")  # the published order of removal

# What reads a norm, from its name (most specific first: a site matches the first entry that is its
# path or a dotted suffix of it). Only block norms (placement "pre" / "post", inside a numbered
# block) are looked up here: "final" and "head" norms, and any other norm outside the blocks, feed
# the output; "embed" norms the first block's attention. Names that match nothing fall back to the
# words in `_WORDS`. Keep this in step with the family tables'
# readers (`normswap.archs`): tests/test_progressive_removal.py checks every registered family.
SITE_ROLES: tuple[tuple[str, str, str], ...] = (
    ("attention.output.LayerNorm", "mlp", "BERT, RoBERTa, ELECTRA, XLM-R: after self-attention, read by `intermediate` (the MLP)"),
    ("output.LayerNorm", "attn", "BERT family: the block's output, read by the next block's attention"),
    ("sa_layer_norm", "mlp", "DistilBERT: after self-attention, read by `ffn`"),
    ("output_layer_norm", "attn", "DistilBERT: the block's output, read by the next block's attention"),
    ("ln_2", "mlp", "GPT-2: read by `mlp.c_fc`"),
    ("ln_1", "attn", "GPT-2: read by `attn`; GPT-J's single ln_1 feeds attention and MLP in parallel: treated as attention"),
    ("post_attention_layernorm", "mlp", "Llama, Mistral, Qwen2, Gemma, GPT-NeoX, BLOOM: read by the MLP"),
    ("input_layernorm", "attn", "Llama & co: read by q/k/v; Phi's and Falcon's parallel blocks feed both from it: treated as attention"),
    ("self_attn_layer_norm", "attn", "OPT, Whisper: read by q/k/v"),
    ("encoder_attn_layer_norm", "attn", "Whisper's decoder: read by the cross-attention's query"),
    ("final_layer_norm", "mlp", "OPT, Whisper: the block's second norm, read by fc1 (despite its name)"),
    ("layernorm_before", "attn", "ViT: read by q/k/v"),
    ("layernorm_after", "mlp", "ViT: read by the MLP"),
)
_EMBED = "embedding norm: starts the stream the first block's attention reads"
_WORDS = (("mlp", ("mlp", "ffn", "feed_forward", "fc", "intermediate", "post_attention")),
          ("attn", ("attn", "attention", "input")))


def site_group(path: str, placement: str) -> tuple[str, str]:
    """(group, why) of a converted site: "mlp", "attn" or "final", from what reads it."""
    if placement in ("final", "head"):
        return "final", f"{placement} norm: read by the output"
    if placement == "embed":
        return "attn", _EMBED
    if not any(seg.isdigit() for seg in path.split(".")):  # outside the numbered blocks
        if "embed" in path.lower():
            return "attn", _EMBED
        return "final", "a norm outside the blocks (not an embedding norm): read by the output"
    for name, group, why in SITE_ROLES:
        if path == name or path.endswith("." + name):
            return group, why
    last = path.rsplit(".", 1)[-1].lower()
    for group, words in _WORDS:
        if any(w in last for w in words):
            return group, f"name {last!r} (no table entry)"
    return "attn", f"unknown name {last!r}: treated as attention"


def swap_order(record: ConversionRecord, order: str = "published") -> list[tuple[SiteRecord, str, str]]:
    """The record's sites in the order they are swapped, with their group and why.

    "published": MLP norms, then attention norms, then the final norm(s), each group in forward
    order (the record lists sites in forward order); "forward": the record's order.
    """
    if order not in SWAP_ORDERS:
        raise NormswapError(f"unknown --swap-order {order!r} (use {' or '.join(SWAP_ORDERS)})")
    rows = [(s, *site_group(s.path, s.placement)) for s in record.sites]
    if order == "published":
        rows.sort(key=lambda r: GROUPS.index(r[1]))  # stable: forward order within a group
    return rows


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


class _Restored(nn.Module):
    """The teacher's norm, then what the conversion did around it: times the site's folded fixed
    scale (`--to none`), re-centred (a norm that starts a centred stream)."""

    def __init__(self, norm: nn.Module, scale: float | None, recenter: bool):
        super().__init__()
        self.norm, self.recenter = norm, recenter
        self.register_buffer("scale", None if scale is None else torch.tensor(float(scale)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self.scale is not None:
            y = y * self.scale.to(y.dtype)
        if self.recenter:
            y = y - y.mean(-1, keepdim=True)
        return y


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

    def start(self, k: int) -> int:
        return (k + 1) * self.every


def default_every(total_steps: int, n_sites: int) -> int:
    """Spread the swaps over the first half of training, leaving the second half to recover."""
    return max(1, total_steps // (2 * (n_sites + 1)))


def gain_offset(record: ConversionRecord, config: Any = None) -> float:
    """What the family's norms add to their stored weight (Gemma: 1, they scale by 1 + w), from the
    family table (`Family.gain_offset`); 0 for families normswap has no table for."""
    from normswap.archs import get_family

    family = get_family(record.base_model_type)
    if family is None:
        return 0.0
    if config is not None:
        family = family.for_config(config)
    return float(family.gain_offset)


def _neutral_affine(norm: nn.Module, offset: float) -> nn.Module:
    """`norm` with weight 1 (1 - offset as stored) and bias 0: the weightless norm of its kind."""
    with torch.no_grad():
        w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if isinstance(w, torch.Tensor):
            w.fill_(1.0 - offset)
        if isinstance(b, torch.Tensor):
            b.zero_()
    return norm


def _weightless(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        from normswap.modules import RMSNorm

        return RMSNorm(dim, eps, weight=False, bias=False)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)


def needs_scale(site: SiteRecord, new: nn.Module) -> bool:
    """A `--to none` site that folded its fixed scale s into its readers along with the affine (its
    new module is nn.Identity): the readers expect x / s, so the restored norm must give
    s * normalised(x)."""
    return site.folded and isinstance(new, nn.Identity)


def original_norm(site: SiteRecord, new: nn.Module, teacher: nn.Module | None, *, offset: float = 0.0,
                  norm_kind: str = "layernorm", fallback_eps: float = 1e-5, scale: float | None = None) -> nn.Module:
    """The teacher's norm at `site`, producing what the site's readers now expect (module docstring).

    A deep copy of the teacher's own module keeps its class, eps and arithmetic (LayerNorm,
    LlamaRMSNorm, GemmaRMSNorm's 1 + w...); a folded site's copy gets a neutral affine
    (`offset`: the family's gain offset). Without the teacher's module at that path, a folded site
    gets a weightless norm of `norm_kind`; a site that kept its affine is an error. `scale` is the
    fixed scale a folded `--to none` site moved into its readers (`needs_scale`).
    """
    src = get_module(teacher, site.path) if teacher is not None and has_module(teacher, site.path) else None
    if src is not None:
        old = copy.deepcopy(src)
        if site.folded:
            _neutral_affine(old, offset)
    elif site.folded:
        old = _weightless(norm_kind, site.dim, site.eps if site.eps is not None else fallback_eps)
    else:
        raise NormswapError(f"progressive mode: site {site.path} kept its affine, so it needs the teacher's norm at the same path")
    if needs_scale(site, new) and scale is None:
        raise NormswapError(f"progressive mode: site {site.path} folded a fixed scale into its readers and its record does not "
                            "keep it (a checkpoint from an older normswap): convert it again")
    if scale is not None or site.recenter:
        old = _Restored(old, scale, site.recenter)
    return old


def wrap_sites(model: nn.Module, record: ConversionRecord, teacher: nn.Module | None, fallback_eps: float = 1e-5,
               order: str = "published") -> list[str]:
    """Wrap every converted site of `model` in a FadeNorm (mix 0); returns the site paths in swap order.
    Folded `--to none` sites restore the teacher's norm times their recorded fixed scale."""
    rows = swap_order(record, order)
    if not rows:
        raise NormswapError("progressive mode: the student's record lists no converted sites")
    offset = gain_offset(record, getattr(teacher, "config", None) or getattr(model, "config", None))
    norm_kind = _family_norm_kind(record)
    news = {site.path: get_module(model, site.path) for site, _, _ in rows}
    scales = {site.path: site.scale for site, _, _ in rows if needs_scale(site, news[site.path])}
    ref = next(model.parameters(), None)
    approximate = []
    for site, _, _ in rows:
        new = news[site.path]
        old = original_norm(site, new, teacher, offset=offset, norm_kind=norm_kind, fallback_eps=fallback_eps,
                            scale=scales.get(site.path))
        if ref is not None:
            old = old.to(dtype=ref.dtype, device=ref.device)
        set_module(model, site.path, FadeNorm(old, new))
        if site.folded and (site.method.startswith("calibrated") or site.method.endswith("+e2e")):
            approximate.append(site.path)
    if approximate:
        logger.warning("progressive: %d site(s) folded a calibrated affine into their readers (e.g. %s): the restored norms "
                       "give the teacher's normalised output through the fitted affine, so the start is close to the teacher, "
                       "not equal (convert with --alpha-init or --no-fold for an exact start)", len(approximate), approximate[0])
    return [site.path for site, _, _ in rows]


def _family_norm_kind(record: ConversionRecord) -> str:
    from normswap.archs import get_family

    family = get_family(record.base_model_type)
    return family.norm_kind if family is not None else "layernorm"


def describe(record: ConversionRecord, order: str, schedule: Schedule) -> list[dict[str, Any]]:
    """The swap plan, for logs and the run's result: per site in swap order, its group and start step."""
    return [{"path": s.path, "group": g, "start": schedule.start(k), "why": why}
            for k, (s, g, why) in enumerate(swap_order(record, order))]


def apply_schedule(model: nn.Module, paths: list[str], schedule: Schedule, step: int) -> int:
    """Set every site's mix for `step`; returns how many sites are fully swapped."""
    done = 0
    for k, path in enumerate(paths):
        m = schedule.mix(k, step)
        get_module(model, path).mix.fill_(m)
        done += m >= 1.0
    return done


def set_mix(model: nn.Module, paths: list[str], mix: float) -> None:
    """Set every site's mix to `mix` (1: the converted model, e.g. to measure it before training)."""
    for path in paths:
        get_module(model, path).mix.fill_(mix)


def unwrap_sites(model: nn.Module, paths: list[str]) -> None:
    """Replace every FadeNorm by its new module (the final, converted architecture)."""
    for path in paths:
        fade = get_module(model, path)
        if isinstance(fade, FadeNorm):
            set_module(model, path, fade.new)
