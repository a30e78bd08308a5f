"""Resolve a family table against an instantiated model: concrete paths for every norm site,
its readers and the residual writers, checked against the modules that really exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normswap.archs import get_family
from normswap.archs.spec import Family
from normswap.errors import NormswapError
from normswap.surgery.paths import get_module, has_module, join


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, or one of the RMSNorm classes of modern decoders (LlamaRMSNorm, ...)."""
    return isinstance(module, nn.LayerNorm) or isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (and subclasses such as FalconLinear) or GPT-2's transposed Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


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
    other_norms: list[str] = field(default_factory=list)  # norms the table does not cover
    # blocks whose input (the stream as it starts) gets one explicit mean subtraction (Stack.centre_input)
    centred_inputs: list[str] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return self.family is not None


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


def build_plan(model: nn.Module) -> ModelPlan:
    """Find every norm of `model` through its family table (or generically for unknown families)."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    family = get_family(model_type)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = _module_path(model, out_emb) if isinstance(out_emb, nn.Module) else None
    tied = None
    if head is not None and in_emb is not None and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", 1):
        tied = _module_path(model, in_emb)
    all_norms = [n for n, m in model.named_modules() if is_norm(m)]

    if family is None:
        sites = [_norm_site(model, p, "unknown", []) for p in all_norms if isinstance(get_module(model, p), nn.LayerNorm)]
        return ModelPlan(model_type, None, "unknown", sites, [], [], head, tied)

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
    covered = {s.path for s in sites}
    other = [p for p in all_norms if p not in covered]
    return ModelPlan(model_type, family, family.style, sites, writers, embed_writers, head, tied, other, centred_inputs)


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


def describe_family(family: Family) -> dict[str, Any]:
    """A JSON-able summary of a family table (for `normswap archs`)."""
    return {
        "model_type": family.model_type,
        "style": family.style,
        "norm_kind": family.norm_kind,
        "norms": [f"{st.name}: {n.name}" if st.name else n.name for st in family.stacks for n in st.block_norms + st.model_norms]
        + [n.name for n in family.head_norms],
        "flag_dependent": family.variant is not None,
        "notes": family.notes,
    }
