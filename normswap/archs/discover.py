"""Finding a model's norms, their readers and the residual writers from what the model computes
(a `trace.Trace` of one probe batch), without a family table.

For every module call that computes a norm on the probe (`trace.norm_fit`):
- **readers**: walking forward from its output through pure data movement (views, reshapes,
  row slices, eval dropout), the linears that take it as input. Anything else that takes it (an
  attention kernel, a residual add, a concatenation) is named: it forbids folding.
- **stream**: walking back from its input through additions, data movement and scalar scales,
  the addends' sources ("leaves"): writer modules (linears, embeddings, convolutions, whose
  weights can centre their output), bare parameters (position tables, CLS tokens), other norms,
  or anything else (a GELU, a buffer, a constant), which no weight change can centre.
- **placement**: a norm whose output is itself an addend of the stream is Post-LN ("post"), or
  "embed" when its input comes from the embedding side alone; a norm reading the stream is "pre"
  when the stream goes on past it, "final" when it ends there; a norm off the stream is a task
  head's ("head": read by a linear) or left alone (a QK norm inside attention, with the reason).

A Pre-LN LayerNorm's stream is centred when every leaf is centrable and the stream is read by
nothing but norms and additions. A leaf that cannot be centred is covered by one explicit mean
subtraction where the stream it joins enters a module (Whisper's encoder: gelu(conv2(x)) +
positions enters layer 0); where there is no such module, the norms reading that stream keep
LayerNorm's own function (an RMSNorm of the mean-subtracted input, still exact), each with the
reason. Post-LN models are never centred (the norms' outputs are the stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from normswap.archs.trace import MIXING_OPS, Node, Trace, is_linear_class, is_writer_class, record
from normswap.surgery.paths import get_module

ADDS = frozenset({"add", "add_", "sub", "sub_", "rsub"})
SCALES = frozenset({"mul", "mul_", "div", "div_", "neg"})
# pure data movement: the values of the input, rearranged (rows kept whole where `_keeps_rows` says so)
MOVES = frozenset({"view", "reshape", "contiguous", "clone", "detach", "expand", "expand_as", "flatten", "unflatten", "squeeze",
                   "unsqueeze", "transpose", "permute", "getitem", "narrow", "select", "dropout", "to", "float", "type_as",
                   "alias", "split", "chunk", "unbind", "view_as", "reshape_as", "alpha_dropout", "feature_alpha_dropout"})


@dataclass
class Leaf:
    """One source of a stream: what produced an addend, and the values between it and the norm."""

    kind: str  # "writer" (module) | "param" | "norm" | "other"
    path: str  # module or parameter path ("" for other)
    what: str  # a short description for messages
    serial: int  # the value it produced
    chain: tuple[int, ...]  # serials from the norm's input down to (excluding) `serial`


@dataclass
class NormCall:
    """What one norm module does on the probe (all its calls together)."""

    path: str
    node: Node
    readers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # what else takes its output (forbids folding)
    addend: bool = False  # its output is added into a stream
    visible: bool = False  # its output is the model's primary output
    leaves: list[Leaf] = field(default_factory=list)
    on_stream: bool = False  # its input is a residual stream
    stream_goes_on: bool = False  # its input is also added to (the stream continues past it)


def _ndim(trace: Trace, serial: int) -> int:
    return len(trace.values[serial].shape)


def _keeps_rows(trace: Trace, node: Node, src: int) -> bool:
    """Whether a data-movement op keeps each row over the last dimension whole (so a linear that
    reads its output still reads the norm's rows): the last dimension is not indexed, split or moved."""
    nd = _ndim(trace, src)
    last = {-1, nd - 1}
    d = trace.values[src].shape[-1] if nd else 0
    if any(trace.values[o].shape[-1:] != (d,) for o in node.outputs):
        return False
    a, kw = node.args, node.kwargs
    if node.name == "transpose":
        return not (set(a[:2]) & last)
    if node.name == "permute":
        dims = a[0] if a and isinstance(a[0], (list, tuple)) else a
        return bool(dims) and dims[-1] in last
    if node.name in ("select", "narrow"):
        return (a[0] if a else kw.get("dim", 0)) not in last
    if node.name in ("split", "chunk", "unbind"):
        return (a[1] if len(a) > 1 else kw.get("dim", 0)) not in last
    if node.name == "getitem":
        index = a[0] if a else None
        items = index if isinstance(index, tuple) else (index,)
        if Ellipsis in items:
            after = items[items.index(Ellipsis) + 1:]
            return all(i is None or i == slice(None) for i in after)
        real = [i for i in items if i is not None]
        return len(real) < nd or real[-1] == slice(None)
    return True


def forward_uses(trace: Trace, call: NormCall) -> None:
    """Fill `call.readers` / `consumers` / `addend` / `visible` from the norm's output."""
    seen: set[int] = set()

    def visit(serial: int) -> None:
        if serial in seen:
            return
        seen.add(serial)
        if serial == trace.primary_output:
            call.visible = True
        for node in trace.consumer_nodes(serial):
            if node.kind == "module":
                cls = trace.module_types.get(node.name)
                if node.identity:
                    visit(node.outputs[0])
                elif node.fit is not None:
                    call.consumers.append(f"the norm {node.name}")
                elif cls is not None and is_linear_class(cls) and node.inputs[:1] == [serial]:
                    if node.name not in call.readers:
                        call.readers.append(node.name)
                else:
                    call.consumers.append(f"{node.name} ({node.module_type})")
            elif node.name in ADDS and len(node.inputs) >= 2:
                call.addend = True
            elif node.name in MOVES and node.inputs[:1] == [serial] and _keeps_rows(trace, node, serial):
                for o in node.outputs:
                    visit(o)
            else:
                call.consumers.append(f"a {node.name} op")

    visit(call.node.outputs[0])


def stream_leaves(trace: Trace, start: int, memo: dict[int, list[Leaf]]) -> list[Leaf]:
    """The sources of the value `start` (see the module docstring), with the chain of values
    between; memoised per value, since every norm of a stream walks back the same adds."""
    if start in memo:
        return memo[start]
    node = trace.produced_by(start)
    leaves: list[Leaf]
    if node is None:
        v = trace.values[start]
        kind = "param" if v.origin == "param" else "other"
        leaves = [Leaf(kind, v.name if kind == "param" else "", f"the {v.origin} {v.name}".strip(), start, ())]
    elif node.kind == "module":
        cls = trace.module_types.get(node.name)
        if node.identity:
            leaves = _through(trace, node.inputs[0], start, memo)
        elif node.fit is not None:
            leaves = [Leaf("norm", node.name, f"the norm {node.name}", start, ())]
        elif cls is not None and is_writer_class(cls):
            leaves = [Leaf("writer", node.name, f"{node.name} ({node.module_type})", start, ())]
        else:
            leaves = [Leaf("other", "", f"{node.name} ({node.module_type})", start, ())]
    elif node.name in ADDS and len(node.inputs) >= 2 and not node.scalar:
        leaves = [leaf for s in node.inputs for leaf in _through(trace, s, start, memo)]
    elif node.name in SCALES and _scales_rows(trace, node):
        # the scaled value: the operand that is not the number, 0-d tensor or per-row factor
        scaled = next((s for s in node.inputs if trace.values[s].shape[-1:] not in ((1,), ())), node.inputs[0])
        leaves = _through(trace, scaled, start, memo)
    elif node.name in MOVES and node.inputs:
        leaves = _through(trace, node.inputs[0], start, memo)
    elif node.name == "cat" and _cat_dim(trace, node) not in (-1, _ndim(trace, start) - 1):
        leaves = [leaf for s in node.inputs for leaf in _through(trace, s, start, memo)]
    else:
        what = {"gelu": "a GELU", "silu": "a SiLU", "relu": "a ReLU", "tanh": "a tanh"}.get(node.name, f"a {node.name} op") + _of(trace, node)
        if node.name in ADDS:
            what = "the addition of a constant"
        elif node.name in SCALES and (p := next((trace.values[s].name for s in node.inputs if trace.values[s].origin == "param"), "")):
            what = f"the output{_of(trace, node)} scaled per channel by {p} (a layer scale)"
        leaves = [Leaf("other", "", what, start, ())]
    memo[start] = leaves
    return leaves


def _of(trace: Trace, node: Node) -> str:
    """" of <module>" for an op applied to a module's output (the GELU of encoder.conv2)."""
    for s in node.inputs:
        p = trace.produced_by(s)
        if p is not None and p.kind == "module":
            return f" of {p.name}"
    return ""


def _through(trace: Trace, serial: int, via: int, memo: dict[int, list[Leaf]]) -> list[Leaf]:
    return [Leaf(lf.kind, lf.path, lf.what, lf.serial, (via, *lf.chain)) for lf in stream_leaves(trace, serial, memo)]


def _scales_rows(trace: Trace, node: Node) -> bool:
    """A multiplication or division by a number, a 0-d tensor or a per-row factor (last dim 1):
    it keeps a zero-mean row zero-mean."""
    if node.name == "neg" or node.scalar:
        return True
    shapes = [trace.values[s].shape for s in node.inputs]
    return len(shapes) == 2 and any(s[-1:] == (1,) or len(s) == 0 for s in shapes)


def _cat_dim(trace: Trace, node: Node) -> int:
    return node.args[0] if node.args and isinstance(node.args[0], int) else node.kwargs.get("dim", 0)


def deep_values(trace: Trace) -> set[int]:
    """Values computed downstream of a norm or of attention (token mixing): everything that is
    not the embedding side."""
    deep: set[int] = set()
    for node in trace.nodes:
        if node.fit is not None or (node.kind == "op" and node.name in MIXING_OPS) or any(s in deep for s in node.inputs):
            deep.update(node.outputs)
    return deep


def feeds_add(trace: Trace, serial: int) -> bool:
    """Whether the value (or a rearrangement of it) is added to: the stream goes on."""
    stack, seen = [serial], set()
    while stack:
        s = stack.pop()
        if s in seen:
            continue
        seen.add(s)
        for node in trace.consumer_nodes(s):
            if node.kind == "op" and node.name in ADDS and len(node.inputs) >= 2:
                return True
            if (node.kind == "op" and node.name in MOVES) or node.identity:
                stack.extend(node.outputs)
    return False


def norm_calls(trace: Trace) -> list[NormCall]:
    """Every call of a module that computed a norm on the probe, analysed, in forward order."""
    memo: dict[int, list[Leaf]] = {}
    calls = []
    for node in trace.nodes:
        if node.kind != "module" or node.fit is None:
            continue
        call = NormCall(node.name, node)
        forward_uses(trace, call)
        x = node.inputs[0]
        call.leaves = stream_leaves(trace, x, memo)
        walked_add = any(lf.chain for lf in call.leaves) and _has_add(trace, call.leaves)
        call.stream_goes_on = feeds_add(trace, x)
        call.on_stream = walked_add or call.stream_goes_on
        calls.append(call)
    return calls


def _has_add(trace: Trace, leaves: list[Leaf]) -> bool:
    for lf in leaves:
        for s in lf.chain:
            node = trace.produced_by(s)
            if node is not None and node.kind == "op" and node.name in ADDS:
                return True
    return False


def centring_point(trace: Trace, leaf: Leaf) -> tuple[str, int] | None:
    """Where an uncentrable addend's stream can be centred explicitly: the innermost module that
    is given the sum it joins (or that sum rearranged) and contains every use of it. Returns the
    module's path and the value it centres."""
    chain = list(leaf.chain)  # from the norm's input down to the leaf
    j = next((i for i in range(len(chain) - 1, -1, -1)
              if (n := trace.produced_by(chain[i])) is not None and n.kind == "op" and n.name in ADDS), None)
    if j is None:
        return None
    for i in range(j, -1, -1):
        value = chain[i]
        if i < j:
            n = trace.produced_by(value)
            if n is None or not (n.identity or (n.kind == "op" and n.name in MOVES)):
                break
        users = trace.consumers.get(value, [])
        spans = [sp for sp in trace.spans if sp.first_input == value and users and all(sp.start <= u < sp.end for u in users)]
        if spans:
            best = min(spans, key=lambda sp: sp.end - sp.start)
            return best.path, value
    return None


def stream_values(calls: list[NormCall]) -> set[int]:
    return {s for c in calls for lf in c.leaves for s in lf.chain}


def foreign_users(trace: Trace, values: set[int], leaf_values: set[int]) -> dict[int, str]:
    """Stream values (and leaf outputs) used by anything but the stream's own additions and
    rearrangements and the norms: centring them would change what that user computes."""
    bad: dict[int, str] = {}
    for s in values | leaf_values:
        for node in trace.consumer_nodes(s):
            if node.fit is not None or any(o in values for o in node.outputs) or _shape_only(trace, node):
                continue
            if trace.primary_output in node.outputs:
                bad[s] = "the model's output (the stream itself, with no final norm)"
            else:
                bad[s] = f"{node.name} ({node.module_type})" if node.kind == "module" else f"a {node.name} op outside the stream"
        if s == trace.primary_output:
            bad[s] = "the model's output"
    return bad


def _shape_only(trace: Trace, node: Node) -> bool:
    """A use that reads only a value's shape: an embedding given a float tensor (position tables
    sized from the token embeddings: MBart's `embed_positions(inputs_embeds[:, :, -1])`), or data
    movement feeding only such uses."""
    if node.kind == "module":
        cls = trace.module_types.get(node.name)
        return cls is not None and issubclass(cls, nn.Embedding)
    if node.name in MOVES:
        users = [n for o in node.outputs for n in trace.consumer_nodes(o)]
        return bool(users) and all(_shape_only(trace, n) for n in users)
    return False


def trace_model(model: nn.Module, batch: dict[str, torch.Tensor]) -> Trace:
    """One traced forward pass of `model` on `batch` (float32 arithmetic for half weights on CPU)."""
    from normswap.verification import float32_compute

    was_training = model.training
    model.eval()
    try:
        with float32_compute(model):
            return record(model, batch)
    finally:
        model.train(was_training)


def placement(call: NormCall, deep: set[int]) -> str | None:
    """pre / final / post / embed / head, or None for a norm off the stream (see the module docstring)."""
    if call.addend:
        embedding_side = all(lf.kind != "norm" and lf.serial not in deep for lf in call.leaves)
        return "embed" if embedding_side else "post"
    if call.on_stream:
        return "pre" if call.stream_goes_on else "final"
    if call.readers and not call.consumers:
        return "head"
    return None


def _merge(calls: list[NormCall]) -> NormCall:
    """One module called several times (shared weights): its uses together."""
    first = calls[0]
    for c in calls[1:]:
        first.readers += [r for r in c.readers if r not in first.readers]
        first.consumers += c.consumers
        first.addend |= c.addend
        first.visible |= c.visible
        first.leaves = first.leaves + c.leaves
        first.on_stream |= c.on_stream
        first.stream_goes_on |= c.stream_goes_on
    return first


def discovered_plan(model: nn.Module, probe: dict[str, torch.Tensor]):
    """The `ModelPlan` of `model` from one traced pass on `probe`."""
    from normswap.archs.plan import ModelPlan, Site, fold_blocker, head_and_tie, is_norm

    trace = trace_model(model, probe)
    deep = deep_values(trace)
    grouped: dict[str, list[NormCall]] = {}
    for call in norm_calls(trace):
        grouped.setdefault(call.path, []).append(call)
    calls = {path: _merge(cs) for path, cs in grouped.items()}
    places = {path: placement(c, deep) for path, c in calls.items()}
    for path, c in calls.items():
        # Post-LN's last norm: its output ends the stream, but what it reads is made of post norms' outputs
        if places[path] in ("pre", "final") and any(lf.kind == "norm" and places.get(lf.path) == "post" for lf in c.leaves):
            places[path] = "post"
    other: dict[str, str] = {}
    for path, c in calls.items():
        if places[path] is None and not c.consumers and not c.readers:
            other[path] = "normalises a value off the residual stream that nothing in the model reads (an output of its own): left as it is"
        elif places[path] is None:
            uses = ", ".join(dict.fromkeys(c.consumers))
            other[path] = (f"normalises a value off the residual stream whose output goes to {uses}, not to linears alone "
                           f"(a QK norm inside attention, or similar): left as it is")
    for path, m in model.named_modules():
        if path not in calls and (is_norm(m) or type(m).__name__.lower().endswith("norm")):
            other[path] = ("did not run on the probe" if path not in trace.module_types
                           else "does not compute a LayerNorm or RMSNorm of its input (by its output on the probe)")
    style = "post" if "post" in places.values() else "pre"
    stream = {p: c for p, c in calls.items() if places[p] in ("pre", "final", "embed")}
    verdicts, points, recentred = _stream_verdicts(trace, stream, places, deep)
    notes = [f"{p}: its input is centred explicitly (one mean subtraction): {what} adds into the stream there, "
             f"which no weight change centres" for p, what in points.items()]

    sites: list[Site] = []
    writers: list[str] = []
    embed_writers: list[str] = []
    for path, c in calls.items():
        if places[path] is None:
            continue
        fit = c.node.fit
        module = get_module(model, path)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        site = Site(path, places[path], list(c.readers), fit.kind, trace.values[c.node.inputs[0]].shape[-1], fit.eps,
                    isinstance(weight, torch.Tensor), isinstance(bias, torch.Tensor), gain_offset=fit.gain_offset)
        site.foldable = not c.visible
        site.blocker = fold_blocker(site, post_ln=style == "post", other_use=c.consumers[0] if c.consumers else None)
        ok, why, found_writers = verdicts.get(path, (False, "", []))
        site.writers = [w for _, w in found_writers]
        if site.kind == "layernorm" and style == "pre" and site.placement != "head":
            site.centred, site.keep_mean, site.note = ok, not ok, why
            site.recenter = site.placement == "embed" and path in recentred
        for kind, w in (found_writers if ok else []):
            (writers if kind == "deep" else embed_writers).append(w)
        sites.append(site)
    head, tied = head_and_tie(model)
    return ModelPlan(getattr(model.config, "model_type", type(model).__name__), None, style, sites, list(dict.fromkeys(writers)),
                     list(dict.fromkeys(embed_writers)), head, tied, other, list(points) if any(s.centred for s in sites) else [],
                     source="discovery", norm_kind="rmsnorm" if sites and all(s.kind == "rmsnorm" for s in sites) else "layernorm",
                     notes=notes if any(s.centred for s in sites) else [])


def _stream_verdicts(trace: Trace, stream: dict[str, NormCall], places: dict[str, str | None], deep: set[int]):
    """Per stream norm: (centrable, why not, [(deep|embed, writer path)]), and the modules whose
    input is centred explicitly.

    Centring a writer, or a module's input, shifts every stream value downstream of it by a
    per-row constant, to which only norms and the stream's own additions are blind; so a writer or
    centring point with any other user downstream (`foreign_users`) is not centred, and neither is
    any norm whose stream it writes."""
    values = stream_values(list(stream.values()))
    leaves = [lf for c in stream.values() for lf in c.leaves]
    foreign = foreign_users(trace, values, {lf.serial for lf in leaves})

    def foreign_below(chain: tuple[int, ...], stop: int | None) -> int | None:
        """The first value with another user, from the norm's input down to index `stop` (inclusive)."""
        return next((s for s in (chain if stop is None else chain[:stop + 1]) if s in foreign), None)

    points: dict[int, str] = {}  # centred value -> module path
    because: dict[str, str] = {}  # module path -> the addend that made it necessary
    for lf in leaves:
        if not _centrable_leaf(lf, places) and not any(s in points for s in lf.chain):
            found = centring_point(trace, lf)
            if found is not None:
                points[found[1]] = found[0]
                because[found[0]] = lf.what
    for lf in leaves:  # a point with another user downstream is no good
        for i, s in enumerate(lf.chain):
            if s in points and foreign_below(lf.chain, i) is not None:
                del points[s]
    blocked: dict[int, str] = {}  # uncovered leaf -> why it cannot be centred
    for lf in leaves:
        cut = next((i for i, s in enumerate(lf.chain) if s in points), None)
        if cut is not None:
            continue
        bad = foreign_below(lf.chain, None)
        if bad is not None:
            blocked[lf.serial] = f"the stream it reads goes on to {foreign[bad]}, which centring would change"
        elif lf.serial in foreign:
            blocked[lf.serial] = f"{lf.what}'s output is also used by {foreign[lf.serial]}, which centring would change"
        elif not _centrable_leaf(lf, places):
            blocked[lf.serial] = (f"its stream starts at the output of {lf.what}, which is not centred" if lf.kind == "norm" else
                                  f"{lf.what} adds into the stream it reads: no weight change centres it, and no module is "
                                  f"given that sum to centre it explicitly")
    verdicts = {}
    for path, c in stream.items():
        why, found = "", []
        for lf in c.leaves:
            if any(s in points for s in lf.chain):
                continue
            if lf.serial in blocked:
                why = why or blocked[lf.serial]
            elif lf.kind in ("writer", "param"):
                found.append(("deep" if lf.serial in deep else "embed", lf.path))
        verdicts[path] = (not why, why, list(dict.fromkeys(found)))
    # an embedding norm re-centres its output where nothing downstream but norms and additions sees it
    recentred = {lf.path for lf in leaves if lf.kind == "norm" and lf.serial not in blocked}
    return verdicts, {p: because[p] for p in dict.fromkeys(points.values())}, recentred


def _centrable_leaf(leaf: Leaf, places: dict[str, str | None]) -> bool:
    """Writers and bare parameters centre through their own weights; an embedding norm re-centres
    its output (`recenter`)."""
    if leaf.kind in ("writer", "param"):
        return True
    return leaf.kind == "norm" and places.get(leaf.path) == "embed"


__all__ = ["Leaf", "NormCall", "centring_point", "deep_values", "discovered_plan", "foreign_users", "norm_calls", "placement",
           "stream_values", "trace_model"]
