"""LayerNorm -> RMSNorm / DyT conversion of a loaded model (the library behind `normswap convert`).

Order of work, each step in its own module:
1. find the norm sites through the family table (`archs.plan`);
2. Pre-LN LayerNorm families: centre every residual writer (`surgery.centre`), so each norm reads a
   zero-mean stream and LayerNorm == RMSNorm exactly; tied heads get the chosen treatment;
3. build the replacement for every site: RMSNorm keeping the affine, or DyT calibrated on data
   (`calibration`), in forward order so each site can be fitted on the converted prefix's output;
4. optionally fold the affine into the reader linears (`surgery.fold`) where that is exact;
5. measure the deviation from the original (`verification`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from normswap.archs.plan import ModelPlan, Site, build_plan, is_linear
from normswap.calibration import dyt_error, fit_dyt
from normswap.errors import NormswapError
from normswap.log import logger
from normswap.modules import DyT, RMSNorm
from normswap.record import ConversionRecord, SiteRecord
from normswap.samples import token_blocks
from normswap.surgery.centre import centre_output, writer_target
from normswap.surgery.fold import fold_into_reader
from normswap.surgery.paths import get_module, set_module

Target = Literal["rmsnorm", "dyt"]
TiedHead = Literal["auto", "center-embed", "untie"]
TARGETS = ("rmsnorm", "dyt")
TIED_HEAD_CHOICES = ("auto", "center-embed", "untie")


@dataclass
class ConversionResult:
    """What a conversion did and how close the result is to the original."""

    record: ConversionRecord
    seconds: float
    warnings: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> fit errors
    tokenizer: Any = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The `--format json` object of `normswap convert`."""
        v = self.verification or {}
        return {
            "source": self.source,
            "target": self.record.target,
            "family": self.record.family,
            "style": self.record.style,
            "exact": self.record.exact,
            "tied_head": self.record.tied_head,
            "sites": [
                {"path": s.path, "placement": s.placement, "new_type": s.type, "folded": s.folded, "exact": s.exact,
                 "method": s.method, **({"alpha": s.alpha} if s.alpha is not None else {}),
                 **({"calib_rel_error": self.calibration[s.path]["rel_error"]} if s.path in self.calibration else {})}
                for s in self.record.sites
            ],
            "unfolded": self.record.unfolded,
            "new_biases": self.record.new_biases,
            "centered_embeddings": self.record.centered_embeddings,
            "max_abs_diff": v.get("max_abs_diff"),
            "max_rel_diff": v.get("max_rel_diff"),
            "verification": self.verification,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def convert_model(
    model: nn.Module | str | Path,
    to: Target = "rmsnorm",
    *,
    fold: bool = True,
    tied_head: TiedHead = "auto",
    calib_text: str | None = None,
    calib_tokens: int = 4096,
    sequential: bool = True,
    alpha_init: float | None = None,
    tokenizer: Any = None,
    verify: bool = False,
    verify_text: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, ConversionResult]:
    """Convert every norm of `model` (a loaded model, a local folder or a Hub id) to `to`.

    The input model object is modified in place and returned (load it again to keep the original);
    a path is loaded fresh and never written to. With `verify`, original and converted outputs are
    compared on sample text; approximate conversions are always measured.
    """
    from normswap import __version__
    from normswap.loading import load_pretrained, load_tokenizer

    t0 = time.perf_counter()
    if to not in TARGETS:
        raise NormswapError(f"unknown target {to!r}: choose one of {', '.join(TARGETS)}")
    if tied_head not in TIED_HEAD_CHOICES:
        raise NormswapError(f"unknown --tied-head {tied_head!r}: choose one of {', '.join(TIED_HEAD_CHOICES)}")
    if calib_text is not None and not calib_text.strip():
        raise NormswapError("calibration text is empty")
    source = None
    if isinstance(model, (str, Path)):
        source = str(model)
        model = load_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            tokenizer = load_tokenizer(source, revision=revision, trust_remote_code=trust_remote_code)
    model.eval()
    plan, sites, warnings, centre = plan_conversion(model, to)
    measure = verify or not (to == "rmsnorm" and centre)
    original = copy.deepcopy(model) if measure else None
    record = ConversionRecord(
        target=to, base_model_type=plan.model_type, architecture=type(model).__name__,
        family=plan.family.model_type if plan.family else None, style=plan.style, exact=False,
        source=getattr(model.config, "_normswap_source", None) or {"model": source, "revision": revision},
        version=__version__,
    )
    with torch.no_grad():
        if centre:
            record.tied_head = _centre_stream(model, plan, tied_head, record)
        calib_batches = None
        if to == "dyt" and alpha_init is None:
            calib_batches = token_blocks(model, tokenizer, calib_text, n_tokens=calib_tokens)
        result = ConversionResult(record, 0.0, warnings, tokenizer=tokenizer, source=source)
        _convert_sites(model, plan, sites, to, centre, calib_batches, sequential, alpha_init, fold, record, result)
    record.exact = to == "rmsnorm" and bool(record.sites) and all(s.exact for s in record.sites)
    if record.tied_head and "untie" == record.tied_head:
        model.config.tie_word_embeddings = False
    if measure:
        from normswap.verification import compare

        batches = token_blocks(model, tokenizer, verify_text, n_tokens=1024, block=256, batch_size=2, seed=1)
        result.verification = compare(original, model, batches)
        del original
    result.seconds = time.perf_counter() - t0
    return model, result


def plan_conversion(model: nn.Module, to: str) -> tuple[ModelPlan, list[Site], list[str], bool]:
    """The sites to convert, warnings for the user, and whether the stream gets centred (exact
    Pre-LN treatment); shared by the in-memory and streaming paths."""
    plan = build_plan(model)
    sites = _sites_to_convert(model, plan, to)
    warnings: list[str] = []
    if plan.family is None:
        warnings.append(f"unknown architecture {plan.model_type!r}: every nn.LayerNorm is swapped, nothing is folded and nothing is exact")
    if plan.other_norms:
        warnings.append(f"norms outside the {plan.model_type} table left unchanged: {', '.join(plan.other_norms)}")
    centre = plan.family is not None and plan.style == "pre" and plan.family.norm_kind == "layernorm"
    return plan, sites, warnings, centre


def _sites_to_convert(model: nn.Module, plan: ModelPlan, to: str) -> list[Site]:
    if not plan.sites:
        raise NormswapError(f"{type(model).__name__} has no LayerNorm: nothing to convert")
    if to == "rmsnorm":
        sites = [s for s in plan.sites if s.kind == "layernorm"]
        if not sites:
            raise NormswapError(f"{type(model).__name__} already uses RMSNorm: nothing to convert to rmsnorm (try --to dyt)")
        return sites
    return list(plan.sites)


def _centre_stream(model: nn.Module, plan: ModelPlan, tied_head: str, record: ConversionRecord) -> str | None:
    """Centre every residual writer; return how a tied head was handled (None if not tied)."""
    mode = None
    if plan.tied_embedding is not None and plan.tied_embedding in plan.embed_writers:
        # Centring the shared table would change the logits by a per-token term, so either give the
        # head its own copy (untie: + vocab x d parameters) or centre lookups on the fly instead.
        mode = "center-embed" if tied_head == "auto" else tied_head
        if mode == "untie":
            head = get_module(model, plan.head)
            head.weight = nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        else:
            from normswap.modules import CenteredEmbedding

            get_module(model, plan.tied_embedding).__class__ = CenteredEmbedding
            record.centered_embeddings.append(plan.tied_embedding)
    for path in plan.embed_writers + plan.writers:
        if mode == "center-embed" and path == plan.tied_embedding:
            continue
        centre_output(writer_target(model, path))
    return mode


def _fold_blocker(site: Site, plan: ModelPlan, model: nn.Module, tied_mode: str | None) -> str | None:
    """Why this site's affine cannot move into its readers (None if it can)."""
    if plan.family is None:
        return "unknown architecture"
    if plan.style != "pre" or site.placement == "post":
        return "Post-LN: the norm's output is the residual stream itself"
    if site.placement == "embed":
        return "its output starts the residual stream"
    if site.placement == "head":
        return "norm inside a task head"
    if not site.foldable:
        return "its output is the model's output (last_hidden_state)"
    if not site.readers:
        return "no linear layer reads it"
    if tied_mode == "center-embed" and plan.head in site.readers:
        return "the LM head shares its weight with the token embedding (--tied-head untie folds it)"
    if plan.head in site.readers and plan.tied_embedding is not None and tied_mode is None:
        return "the LM head shares its weight with the token embedding"
    if not all(is_linear(get_module(model, r)) for r in site.readers):
        return "a reader is not a linear layer"
    return None


def _convert_sites(model, plan, sites, to, centre, calib_batches, sequential, alpha_init, fold, record, result) -> None:
    targets_y = inputs_x = None
    if calib_batches is not None:
        # Targets: the original norms' outputs (centring is exact, so the centred model gives them).
        targets_y = _capture(model, [s.path for s in sites], calib_batches, "output")
        if not sequential:
            inputs_x = _capture(model, [s.path for s in sites], calib_batches, "input")
    for site in sites:
        old = get_module(model, site.path)
        g, b = _affine(old, site)
        recenter = centre and site.placement == "embed"
        if to == "rmsnorm":
            new: nn.Module = RMSNorm(site.dim, site.eps if site.eps is not None else 1e-5, weight=g is not None, bias=b is not None, recenter=recenter)
            if g is not None:
                new.weight.data.copy_(g)
            if b is not None:
                new.bias.data.copy_(b)
            exact = centre and site.kind == "layernorm"
            method = "exact" if exact else "approximate"
        else:
            new = DyT(site.dim, recenter=recenter)
            exact = False
            if alpha_init is not None:
                # The DyT paper's constant alpha, keeping the pretrained affine (g=1, b=0 would
                # throw the checkpoint's scale and shift away).
                new.alpha.data.fill_(alpha_init)
                new.weight.data.copy_(g if g is not None else torch.ones(site.dim))
                new.bias.data.copy_(b if b is not None else torch.zeros(site.dim))
                method = "alpha-init"
            else:
                x = inputs_x[site.path] if inputs_x is not None else _capture(model, [site.path], calib_batches, "input")[site.path]
                y = targets_y[site.path]
                fitted = fit_dyt(x, y)
                new.alpha.data.fill_(fitted.alpha)
                new.weight.data.copy_(fitted.weight)
                new.bias.data.copy_(fitted.bias)
                g0 = g if g is not None else torch.ones(site.dim)
                b0 = b if b is not None else torch.zeros(site.dim)
                result.calibration[site.path] = {"rel_error": fitted.rel_error, "rel_error_alpha_0.5": dyt_error(0.5, g0, b0, x, y)}
                method = "calibrated-sequential" if sequential else "calibrated"
        ref = next(old.parameters(), None)
        if ref is not None:
            new = new.to(dtype=ref.dtype, device=ref.device)
        folded = False
        if fold:
            blocker = _fold_blocker(site, plan, model, record.tied_head)
            if blocker is None:
                for reader in site.readers:
                    if fold_into_reader(get_module(model, reader), new.weight, new.bias):
                        record.new_biases.append(reader)
                new.weight = None
                new.bias = None
                folded = True
            else:
                record.unfolded[site.path] = blocker
        set_module(model, site.path, new)
        alpha = float(new.alpha) if isinstance(new, DyT) else None
        record.sites.append(SiteRecord(
            path=site.path, placement=site.placement, type=to, dim=site.dim, eps=site.eps if to == "rmsnorm" else None,
            weight=new.weight is not None, bias=new.bias is not None, recenter=recenter, folded=folded, exact=exact,
            method=method, alpha=alpha,
        ))
        logger.debug("%s -> %s (%s%s)", site.path, to, method, ", folded" if folded else "")


def _affine(module: nn.Module, site: Site) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The norm's (weight, bias) as an explicit scale: Gemma-style norms use (1 + w)."""
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    w = None if w is None else w.detach().clone()
    if w is not None and type(module).__name__.startswith("Gemma"):
        w = 1.0 + w
    return w, (None if b is None else b.detach().clone())


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs, to skip the rest of the forward pass."""


def _capture(model: nn.Module, paths: list[str], batches: list[dict[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """Inputs or outputs of the modules at `paths` over all batches, as [tokens, d] tensors.

    Each forward pass stops as soon as every requested module has fired, so capturing early sites
    (or targets, skipping a large LM head) costs only the prefix of the model.
    """
    store: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    fired: set[str] = set()
    handles = []
    for p in paths:
        mod = get_module(model, p)

        def hook(m, args, out=None, p=p):
            t = args[0] if what == "input" else out
            store[p].append(t.detach().reshape(-1, t.shape[-1]).float())
            fired.add(p)
            if len(fired) == len(paths):
                raise _Stop

        if what == "input":
            handles.append(mod.register_forward_pre_hook(hook))
        else:
            handles.append(mod.register_forward_hook(hook))
    try:
        for batch in batches:
            fired.clear()
            try:
                model(**batch)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(v) for p, v in store.items()}
