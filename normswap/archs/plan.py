"""The plan a conversion reads: every norm site of one model, its readers and the residual writers.

It comes from one of two sources, and is the same object either way:
- a family table (`normswap.archs`), resolved against the instantiated model: concrete paths,
  checked against the modules that really exist; or
- discovery (`normswap.archs.discover`): what the model computes on a probe batch.
`build_plan` takes the table where there is one and cross-checks it by discovery (a mismatch is an
error naming the site), or discovers the plan where there is none.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from normswap.archs import describe_family, get_family  # noqa: F401  (describe_family: re-exported, it lives there torch-free)
from normswap.archs.spec import Family
from normswap.archs.trace import is_linear
from normswap.errors import NormswapError
from normswap.surgery.paths import get_module, has_module, join


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, or one of the RMSNorm classes of modern decoders (LlamaRMSNorm, ...)."""
    return isinstance(module, nn.LayerNorm) or isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


PLAN_SOURCES = ("auto", "table", "discover")
POST_LN_BLOCKER = "Post-LN: the norm's output is the residual stream itself"


@dataclass
class Site:
    """One norm in one model."""

    path: str
    placement: str
    readers: list[str]
    kind: str  # "layernorm" | "rmsnorm"
    dim: int
    eps: float | None
    has_weight: bool
    has_bias: bool
    foldable: bool = True
    gain_offset: float = 0.0  # the norm scales by (gain_offset + weight): Family.gain_offset (Gemma: 1)
    # A LayerNorm whose input is zero-mean once the plan's writers are centred: RMSNorm is exact there.
    centred: bool = False
    # A LayerNorm of a Pre-LN stream that cannot be centred: its RMSNorm subtracts the mean itself
    # (LayerNorm's own function, still exact); `note` says why.
    keep_mean: bool = False
    note: str = ""
    # Why the affine cannot move into the readers, whatever --tied-head says (None: it can).
    blocker: str | None = None
    # An embedding norm whose output starts a centred stream: its replacement re-centres its output.
    recenter: bool = False
    # the modules and parameters writing the stream it reads, as discovery found them
    writers: list[str] = field(default_factory=list)


@dataclass
class ModelPlan:
    """Where the norms are, who reads them, who writes the residual stream."""

    model_type: str
    family: Family | None
    style: str  # "pre" | "post" | "unknown"
    sites: list[Site]
    writers: list[str]  # residual writers (sublayer output projections)
    embed_writers: list[str]  # embeddings (modules or parameters) that start the stream
    head: str | None  # path of the output embeddings, if any
    tied_embedding: str | None  # path of the input embedding the head shares its weight with
    other_norms: dict[str, str] = field(default_factory=dict)  # norms left as they are -> why
    # modules whose input (a stream as it starts) gets one explicit mean subtraction (Stack.centre_input)
    centred_inputs: list[str] = field(default_factory=list)
    source: str = "table"  # "table" | "discovery" | "generic" (neither: every LayerNorm, nothing known)
    norm_kind: str = "layernorm"  # "rmsnorm" where every site is one (Llama...): gains fold, nothing is centred
    checked: bool = False  # a table plan that discovery confirmed
    notes: list[str] = field(default_factory=list)  # what the user should know about how the plan was made
    token_wise: list[str] = field(default_factory=list)  # modules that act on each token alone (Family.token_wise)

    @property
    def known(self) -> bool:
        """Whether normswap knows the model's structure (a table or discovery)."""
        return self.source != "generic"

    @property
    def family_name(self) -> str | None:
        return self.family.model_type if self.family is not None else None


def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    return _module_path(model, base) or ""


def _norm_site(model: nn.Module, path: str, placement: str, readers: list[str], foldable: bool = True) -> Site:
    mod = get_module(model, path)
    weight = getattr(mod, "weight", None)
    bias = getattr(mod, "bias", None)
    eps = getattr(mod, "eps", None)
    if eps is None:
        eps = getattr(mod, "variance_epsilon", None)
    dim = weight.shape[0] if weight is not None else int(getattr(mod, "normalized_shape", [0])[-1])
    kind = "layernorm" if isinstance(mod, nn.LayerNorm) else "rmsnorm"
    return Site(path, placement, readers, kind, dim, None if eps is None else float(eps), weight is not None, bias is not None, foldable)


def _resolve(model: nn.Module, scope: str, name: str, *, base: str, block_paths: list[str], block_index: int | None,
             head: str | None) -> str | None:
    """A reader/writer name (see spec.py notation) to a full path, None if optional and absent."""
    optional = name.endswith("?")
    name = name.rstrip("?")
    if name == "@head":
        path = head
    elif name.startswith(">"):
        if block_index is None or block_index + 1 >= len(block_paths):
            return None  # the last block's output goes to the final norm or the head instead
        path = join(block_paths[block_index + 1], name[1:])
    elif name.startswith("^"):
        if block_index is not None and block_index != len(block_paths) - 1:
            return None  # a block norm's base-level reader sees only the last block's output
        path = join(base, name[1:])
    elif name.startswith("/"):
        path = name[1:]
    else:
        path = join(scope, name)
    if path is None:
        return None
    if not has_module(model, path) and not _has_param(model, path):
        if optional or name.startswith(("^", "/")) or name == "@head":
            return None
        raise NormswapError(f"architecture table for {type(model).__name__} names {path}, which the model lacks")
    if has_module(model, path) and get_module(model, path) is None:
        return None
    return path


def _has_param(model: nn.Module, path: str) -> bool:
    parent, _, name = path.rpartition(".")
    try:
        return isinstance(getattr(get_module(model, parent), name, None), nn.Parameter)
    except AttributeError:
        return False


def check_plan_source(source: str) -> None:
    if source not in PLAN_SOURCES:
        raise NormswapError(f"unknown --plan {source!r}: choose one of {', '.join(PLAN_SOURCES)}")


def build_plan(model: nn.Module, source: str = "auto", probe: dict[str, torch.Tensor] | None = None) -> ModelPlan:
    """The plan of `model`: from its family table, cross-checked by discovery ("auto", where a table
    exists); from the table alone ("table": the fast path, no probe pass); or discovered from the
    model ("discover", or "auto" without a table). `probe` is the batch discovery runs (default: a
    short one from `normswap.samples.model_inputs`). Where discovery cannot run, "auto" without a
    table gives the generic plan (every LayerNorm, nothing known), saying why in `notes`."""
    check_plan_source(source)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    family = get_family(model_type)
    if source == "table":
        if family is None:
            raise NormswapError(f"no family table for {model_type!r} (see `normswap archs`): use --plan auto or discover")
        return table_plan(model, family)
    if source == "discover" or family is None:
        try:
            return discover(model, probe)
        except NormswapError as err:
            if source == "discover" or _on_meta(model):
                raise
            plan = generic_plan(model)
            plan.notes.append(f"discovery could not run: {err}")
            return plan
    plan = table_plan(model, family)
    if _on_meta(model):
        return plan  # the streaming path: nothing to run
    found = discover(model, probe)
    problems = cross_check(plan, found)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise NormswapError(f"the {model_type} family table and the model disagree at {problems[0]}{more}: "
                            f"--plan discover converts by what the model computes, --plan table trusts the table")
    plan.checked = True
    found_writers = {s.path: s.writers for s in found.sites}
    for s in plan.sites:
        s.writers = found_writers.get(s.path, [])
    return plan


def discover(model: nn.Module, probe: dict[str, torch.Tensor] | None = None) -> ModelPlan:
    """The plan found from what `model` computes on `probe` (`normswap.archs.discover`)."""
    from normswap.archs.discover import discovered_plan

    if _on_meta(model):
        raise NormswapError(f"{type(model).__name__} is on the meta device: discovery needs to run it")
    if probe is None:
        from normswap.samples import model_inputs

        probe = model_inputs(model, n_tokens=16, block=16, batch_size=1, what="probe", n_utterances=1)[0]
    return discovered_plan(model, probe)


def _on_meta(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "meta"


def head_and_tie(model: nn.Module) -> tuple[str | None, str | None]:
    """The path of the output embeddings (LM head) and of the input embedding it shares its weight
    with (None, None where there is no head or no tie)."""
    out_emb, in_emb = _call_or_none(model, "get_output_embeddings"), _call_or_none(model, "get_input_embeddings")
    head = _module_path(model, out_emb) if isinstance(out_emb, nn.Module) else None
    tied = None
    if head is not None and in_emb is not None and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", 1):
        tied = _module_path(model, in_emb)
    return head, tied


def _call_or_none(model: nn.Module, method: str):
    """model.<method>(), None where the model lacks it or transformers leaves it unimplemented (wav2vec2)."""
    try:
        return getattr(model, method)() if hasattr(model, method) else None
    except (NotImplementedError, AttributeError):
        return None


def generic_plan(model: nn.Module) -> ModelPlan:
    """Neither table nor discovery: every nn.LayerNorm, placement unknown, nothing folded; each
    RMSNorm keeps LayerNorm's function (`keep_mean`)."""
    head, tied = head_and_tie(model)
    model_type = getattr(model.config, "model_type", type(model).__name__)
    sites = [_norm_site(model, p, "unknown", []) for p, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    for s in sites:
        s.keep_mean, s.blocker, s.note = True, "normswap knows nothing of this model's structure", "the structure is unknown"
    return ModelPlan(model_type, None, "unknown", sites, [], [], head, tied, source="generic")


def table_plan(model: nn.Module, family: Family) -> ModelPlan:
    """Resolve a family table against the instantiated model."""
    config = model.config
    model_type = getattr(config, "model_type", family.model_type)
    head, tied = head_and_tie(model)
    all_norms = [n for n, m in model.named_modules() if is_norm(m)]
    family = family.for_config(config)
    base = _base_prefix(model)
    # every stack's blocks first: readers may name another stack's blocks ("*decoder:...")
    stacks = [(st, _block_paths(model, join(base, st.blocks))) for st in family.stacks]
    stack_blocks = {st.name: paths for st, paths in stacks if paths is not None}
    if not stack_blocks:
        raise NormswapError(f"architecture table for {model_type!r} expects blocks at "
                            f"{' or '.join(repr(join(base, st.blocks)) for st in family.stacks)}, which {type(model).__name__} lacks")
    sites: list[Site] = []
    writers: list[str] = []
    embed_writers: list[str] = []
    centred_inputs: list[str] = []
    token_wise: list[str] = []

    for stack, block_paths in stacks:
        if block_paths is None:
            continue  # an encoder-only or decoder-only head class of an encoder-decoder family

        def resolve_all(names: tuple[str, ...], scope: str, index: int | None, block_paths=block_paths) -> list[str]:
            found: list[str | None] = []
            for n in names:
                if n.startswith("*"):
                    found += _in_every_block(model, n, stack_blocks)
                else:
                    found.append(_resolve(model, scope, n, base=base, block_paths=block_paths, block_index=index, head=head))
            return [p for p in found if p is not None]

        for spec in stack.model_norms:
            if spec.placement == "embed":
                sites.append(_site_if_present(model, join(base, spec.name), spec.placement, resolve_all(spec.readers, base, None)))
        for i, block in enumerate(block_paths):
            for spec in stack.block_norms:
                sites.append(_site_if_present(model, join(block, spec.name), spec.placement, resolve_all(spec.readers, block, i)))
            writers += resolve_all(stack.block_writers, block, i)
            token_wise += [join(block, n) for n in stack.token_wise if has_module(model, join(block, n))]
        for spec in stack.model_norms:
            if spec.placement != "embed":
                sites.append(_site_if_present(model, join(base, spec.name), spec.placement, resolve_all(spec.readers, base, None), spec.foldable))
        embed_writers += resolve_all(stack.embed_writers, base, None)
        if stack.centre_input and block_paths:
            centred_inputs.append(block_paths[0])
    for spec in family.head_norms:
        if has_module(model, spec.name):
            sites.append(_site_if_present(model, spec.name, spec.placement, _resolve_head_readers(model, spec.readers, head, base)))
    sites = [s for s in sites if s is not None]
    for s in sites:
        s.gain_offset = family.gain_offset
        s.centred = family.style == "pre" and family.norm_kind == "layernorm" and s.kind == "layernorm"
        s.recenter = s.centred and s.placement == "embed"
        s.blocker = _table_blocker(model, family, s)
    covered = {s.path for s in sites}
    other = {p: f"not in the {model_type} family table" for p in all_norms if p not in covered}
    return ModelPlan(model_type, family, family.style, sites, writers, embed_writers, head, tied, other, centred_inputs,
                     source="table", norm_kind=family.norm_kind, token_wise=token_wise)


def _table_blocker(model: nn.Module, family: Family, site: Site) -> str | None:
    """Why a table's site keeps its affine under --fold, tied heads aside (`conversion._fold_blocker`)."""
    linear = all(is_linear(get_module(model, r)) for r in site.readers)
    return fold_blocker(site, post_ln=family.style != "pre", other_use=None if linear else "a reader that is not a linear layer")


def fold_blocker(site: Site, *, post_ln: bool, other_use: str | None = None) -> str | None:
    """Why a site's affine cannot move into its readers, whichever source the plan came from
    (tied heads aside: `conversion._fold_blocker`): `other_use` names anything but a linear that
    reads its output; `site.foldable` False means its output is the model's own."""
    if post_ln or site.placement == "post":
        return POST_LN_BLOCKER
    if site.placement == "embed":
        return "its output starts the residual stream"
    if site.placement == "head":
        return "norm inside a task head"
    if not site.foldable:
        return "its output is the model's output (last_hidden_state)"
    if other_use is not None:
        return f"its output also goes to {other_use}, which is not a linear layer"
    if not site.readers:
        return "no linear layer reads it"
    return None


def _block_paths(model: nn.Module, blocks_path: str) -> list[str] | None:
    """The paths of the blocks in the ModuleList at `blocks_path`, None if the model lacks it."""
    if not has_module(model, blocks_path) or get_module(model, blocks_path) is None:
        return None
    return [join(blocks_path, str(i)) for i in range(len(get_module(model, blocks_path)))]


def _in_every_block(model: nn.Module, name: str, stack_blocks: dict[str, list[str]]) -> list[str | None]:
    """"*stack:path[?]": `path` in every block of that stack (nothing if the model lacks the stack)."""
    stack, sep, rel = name[1:].partition(":")
    if not sep:
        raise NormswapError(f"architecture table reader {name!r} must read '*stack:path'")
    optional = rel.endswith("?")
    rel = rel.rstrip("?")
    paths = [join(b, rel) for b in stack_blocks.get(stack, [])]
    for p in paths:
        if not has_module(model, p) and not optional:
            raise NormswapError(f"architecture table for {type(model).__name__} names {p}, which the model lacks")
    return [p for p in paths if has_module(model, p)]


def _resolve_head_readers(model: nn.Module, names: tuple[str, ...], head: str | None, base: str) -> list[str]:
    """Readers of a norm inside a task head (names relative to the root model)."""
    found = [_resolve(model, "", n, base=base, block_paths=[], block_index=None, head=head) for n in names]
    return [p for p in found if p is not None]


def _site_if_present(model: nn.Module, path: str, placement: str, readers: list[str], foldable: bool = True) -> Site | None:
    if not has_module(model, path) or get_module(model, path) is None:
        # Optional norms: OPT without a final norm, heads that a config leaves out.
        return None
    if not is_norm(get_module(model, path)):
        raise NormswapError(f"architecture table names {path} as a norm, but it is a {type(get_module(model, path)).__name__}")
    return _norm_site(model, path, placement, readers, foldable)


def cross_check(table: ModelPlan, found: ModelPlan) -> list[str]:
    """Where a table's plan and the discovered one disagree in anything a conversion acts on, one
    line per site or list, naming it (empty: they agree). Readers are compared where the table would
    fold (a reader the table misses would read an unscaled output); a table may be more cautious
    than discovery (ViT keeps its final affine), never less."""
    problems = []
    found_sites = {s.path: s for s in found.sites}
    for t in table.sites:
        f = found_sites.get(t.path)
        if f is None:
            why = found.other_norms.get(t.path, "it computes no LayerNorm or RMSNorm on the probe")
            problems.append(f"{t.path}: the table lists a {t.placement} norm, discovery leaves it alone ({why})")
            continue
        if (t.placement, t.kind) != (f.placement, f.kind):
            problems.append(f"{t.path}: the table says a {t.placement} {t.kind}, discovery a {f.placement} {f.kind}")
        if t.blocker is None:
            if f.blocker is not None:
                problems.append(f"{t.path}: the table folds it, but {f.blocker}")
            elif set(t.readers) != set(f.readers):
                problems.append(f"{t.path}: readers {_diff(t.readers, f.readers)}")
    for f in found.sites:
        if f.path not in {t.path for t in table.sites}:
            problems.append(f"{f.path}: discovery finds a {f.placement} norm the table does not list")
    if any(t.centred for t in table.sites):
        for label, a, b in (("residual writers", table.writers, found.writers), ("embedding writers", table.embed_writers, found.embed_writers),
                            ("explicitly centred inputs", table.centred_inputs, found.centred_inputs)):
            if set(a) != set(b):
                problems.append(f"{label}: {_diff(a, b)}")
    return problems


def _diff(table: list[str], found: list[str]) -> str:
    """"table has X; discovery has Y" for two path lists."""
    only_t = [p for p in table if p not in found]
    only_f = [p for p in found if p not in table]
    parts = ([f"only the table has {', '.join(only_t[:3])}"] if only_t else []) + ([f"only discovery has {', '.join(only_f[:3])}"] if only_f else [])
    return "; ".join(parts)


def check_readers(model: nn.Module, plan: ModelPlan, inputs: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Run one forward pass with hooks and return, per site, the listed readers whose input was
    *not* the norm's output (an empty dict means the table matches the model)."""
    outputs: dict[str, torch.Tensor] = {}
    reader_inputs: dict[str, torch.Tensor] = {}
    handles = []
    for site in plan.sites:
        mod = get_module(model, site.path)
        handles.append(mod.register_forward_hook(lambda m, a, o, p=site.path: outputs.setdefault(p, o.detach())))
        for r in site.readers:
            rmod = get_module(model, r)
            handles.append(rmod.register_forward_pre_hook(lambda m, a, p=r: reader_inputs.setdefault(p, a[0].detach())))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    bad: dict[str, list[str]] = {}
    for site in plan.sites:
        out = outputs.get(site.path)
        for r in site.readers:
            got = reader_inputs.get(r)
            if out is None or got is None or got.shape[-1] != out.shape[-1]:
                ok = False
            else:
                # Readers of the CLS row or a projection may see a slice; compare on what they saw.
                ok = _is_slice_of(got, out)
            if not ok:
                bad.setdefault(site.path, []).append(r)
    return bad


def _is_slice_of(got: torch.Tensor, out: torch.Tensor) -> bool:
    if got.shape == out.shape:
        return torch.allclose(got, out, atol=1e-6, rtol=1e-5)
    if got.numel() == out.numel():  # OPT's MLP reads a flattened [batch * seq, d] view
        return torch.allclose(got.reshape(out.shape), out, atol=1e-6, rtol=1e-5)
    if got.dim() == 2 and out.dim() == 3 and got.shape[0] == out.shape[0]:  # pooler / classifier on token 0
        return torch.allclose(got, out[:, 0], atol=1e-6, rtol=1e-5)
    return False
