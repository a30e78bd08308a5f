"""What `normswap inspect` reports: each norm site and what each target would be there."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from normswap.archs.plan import ModelPlan, Site, build_plan, check_readers
from normswap.samples import model_inputs


@dataclass
class SiteReport:
    path: str
    placement: str
    kind: str
    readers: list[str]
    rmsnorm: str  # "exact" | "exact (LayerNorm semantics)" | "approximate"
    dyt: str  # "calibrated"
    # with `--to rmsnorm --fold` (default --tied-head): "yes", or "no: <why the affine stays in the norm>"
    fold: str = ""
    writers: list[str] = field(default_factory=list)  # who writes the stream it reads (discovery)
    note: str = ""  # why the stream it reads is not centred, where it is not


@dataclass
class InspectReport:
    model: str
    architecture: str
    model_type: str
    family: str | None
    plan: str  # "table" | "discovery" | "generic"
    checked: bool  # a table plan that discovery confirmed
    style: str
    tied_head: str | None
    parameters: int
    sites: list[SiteReport]
    writers: list[str]
    embed_writers: list[str]
    other_norms: dict[str, str]  # norms left as they are -> why
    reader_check: dict[str, list[str]] = field(default_factory=dict)  # site -> readers that did not match
    centred_inputs: list[str] = field(default_factory=list)  # blocks whose input convert centres explicitly
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # planning time (a table and its cross-check, or discovery)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["reader_check_passed"] = not self.reader_check
        return d


def _rms_verdict(plan: ModelPlan, site: Site) -> str:
    """What `convert --to rmsnorm` delivers for the site (the conversion's own verdict)."""
    from normswap.conversion import keeps_mean, rmsnorm_verdict

    exact, method = rmsnorm_verdict(site, False, keeps_mean(plan, site, False))
    return ("exact (LayerNorm semantics)" if method == "layernorm-semantics" else "exact") if exact else "approximate"


def inspect_model(model: nn.Module | str | Path, *, trust_remote_code: bool = False, check: bool = True,
                  plan: str = "auto") -> InspectReport:
    """Describe where the norms of `model` are, who reads them, and what each conversion would be;
    `plan` as in `archs.plan.build_plan`."""
    import time

    from normswap.loading import load_pretrained

    name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model = load_pretrained(str(model), trust_remote_code=trust_remote_code)
    model.eval()
    t0 = time.perf_counter()
    source = plan
    plan = build_plan(model, source)
    seconds = time.perf_counter() - t0
    bad: dict[str, list[str]] = {}
    if check and plan.family is not None and not plan.checked:  # a checked table was confirmed by discovery's own pass
        bad = check_readers(model, plan, model_inputs(model, n_tokens=16, block=16, batch_size=1, what="probe", n_utterances=1)[0])
    from normswap.conversion import fold_blockers

    blockers = fold_blockers(model, plan)
    sites = [SiteReport(s.path, s.placement, s.kind, s.readers, _rms_verdict(plan, s), "calibrated",
                        "yes" if blockers[s.path] is None else f"no: {blockers[s.path]}", s.writers, s.note) for s in plan.sites]
    return InspectReport(
        model=name, architecture=type(model).__name__, model_type=plan.model_type,
        family=plan.family_name, plan=plan.source, checked=plan.checked, style=plan.style,
        tied_head=plan.tied_embedding, parameters=sum(p.numel() for p in model.parameters()),
        sites=sites, writers=plan.writers, embed_writers=plan.embed_writers, other_norms=plan.other_norms, reader_check=bad,
        centred_inputs=plan.centred_inputs, notes=plan.notes, seconds=round(seconds, 4),
    )
