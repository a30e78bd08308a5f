"""What a model computes on one probe batch: which values every operation and module call reads
and writes. `normswap.archs.discover` reads this record to find norms, readers and writers.

One forward pass runs under a TorchFunctionMode, which sees every torch call made from Python
(`x + y`, `F.dropout`, `t.view(...)`, `torch.cat`...). The modules discovery reasons about as
units ("units": linears, embeddings, convolutions and norm candidates) are recorded as one node
per call and their insides are not. Every other module call (blocks, attention, whole stacks) is
recorded as a span: the nodes that ran inside it and the value it was given, so that a block's
input can be named as a place to centre the stream.

Values are identified by a serial number stored on the tensor object. An in-place op gives its
tensor a new serial, so that a serial always names one value; parameters and buffers are numbered
before the pass, and any other tensor on first sight (constants made inside forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_TAG = "_normswap_serial"

# Ops whose output is produced by mixing tokens (attention) or by a norm: values downstream of one
# are "deep" (inside the network), values that are not are computed from the inputs alone (the
# embedding side: lookups, positions, patch convolutions, input projections).
MIXING_OPS = frozenset({"scaled_dot_product_attention", "softmax", "_softmax", "flex_attention"})
INPLACE_DUNDERS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"})
DUNDER_NAMES = {"__add__": "add", "__radd__": "add", "__iadd__": "add_", "__sub__": "sub", "__rsub__": "rsub",
                "__isub__": "sub_", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul_", "__truediv__": "div",
                "__itruediv__": "div_", "__getitem__": "getitem", "__setitem__": "setitem", "__matmul__": "matmul"}


def is_linear_class(cls: type) -> bool:
    """nn.Linear (and subclasses such as FalconLinear) or GPT-2's transposed Conv1D."""
    return issubclass(cls, nn.Linear) or cls.__name__ == "Conv1D"


def is_writer_class(cls: type) -> bool:
    """Modules whose output can be centred through their own weights (`surgery.centre.writer_dims`)."""
    return is_linear_class(cls) or issubclass(cls, (nn.Embedding, nn.Conv1d, nn.Conv2d))


def is_linear(module: nn.Module) -> bool:
    return is_linear_class(type(module))


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored [in, out] (y = x @ W + b), the
    transpose of nn.Linear's. Matched by name: transformers defines it in more than one module."""
    return type(module).__name__ == "Conv1D"


def is_writer_module(module: nn.Module) -> bool:
    return is_writer_class(type(module))


def is_norm_candidate(module: nn.Module) -> bool:
    """A leaf module that could be a norm: no children, no buffers (rotary tables...), and no
    parameters but 1-D `weight` / `bias`. Activations and dropout pass this test too: the probe
    decides by behaviour (`norm_fit`)."""
    if next(module.children(), None) is not None or is_writer_module(module) or isinstance(module, nn.modules.conv._ConvNd):
        return False
    if next(module.buffers(recurse=False), None) is not None:
        return False
    params = dict(module.named_parameters(recurse=False))
    return set(params) <= {"weight", "bias"} and all(p.dim() == 1 for p in params.values())


@dataclass
class NormFit:
    """How a module's output matched a norm formula on the probe: y = (offset + w) * n(x) + b."""

    kind: str  # "layernorm" (n = (x - mean) / std) | "rmsnorm" (n = x / rms)
    gain_offset: float  # 1 for Gemma-style (1 + w) gains
    eps: float
    rel_error: float


@dataclass
class Node:
    """One recorded call: a torch op, or a unit module as a whole."""

    index: int
    kind: str  # "op" | "module"
    name: str  # op: normalised function name ("add", "view", "getitem"...); module: its path
    inputs: list[int]  # serials of the tensors it read, in argument order
    outputs: list[int]
    scalar: bool = False  # an op with a Python number or 0-d tensor among its operands
    args: tuple = ()  # an op's non-tensor positional arguments (dims, indices)
    kwargs: dict = field(default_factory=dict)  # and its non-tensor keyword arguments
    module_type: str = ""
    fit: NormFit | None = None  # a unit module that computes a norm on the probe
    identity: bool = False  # a unit module that returned its input unchanged (dropout in eval)


@dataclass
class Span:
    """One call of a non-unit module: the value it was given and the nodes that ran inside it."""

    path: str
    first_input: int | None  # serial of args[0] (or kwargs["hidden_states"])
    start: int  # first node index inside
    end: int = -1  # one past the last node index inside


@dataclass
class Value:
    """What is known of one serial: shape, and where it came from when not from a node."""

    shape: tuple[int, ...]
    origin: str = "activation"  # "activation" | "param" | "buffer" | "input" | "const"
    name: str = ""  # a parameter's or buffer's path, an input's key


@dataclass
class Trace:
    nodes: list[Node] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    values: dict[int, Value] = field(default_factory=dict)
    producer: dict[int, int] = field(default_factory=dict)  # serial -> node index
    consumers: dict[int, list[int]] = field(default_factory=dict)  # serial -> node indices
    primary_output: int | None = None  # serial of the logits (or last_hidden_state)
    module_types: dict[str, type] = field(default_factory=dict)  # unit path -> class

    def consumer_nodes(self, serial: int) -> list[Node]:
        return [self.nodes[i] for i in self.consumers.get(serial, [])]

    def produced_by(self, serial: int) -> Node | None:
        i = self.producer.get(serial)
        return None if i is None else self.nodes[i]


class _Recorder(TorchFunctionMode):
    """Numbers tensors and records nodes; ignores calls inside unit modules and inside its own hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.trace = Trace()
        self.next_serial = 0
        self.depth = 0  # > 0 while a unit module runs
        self.paused = False
        self.unit_inputs: list[tuple[int, list[int]]] = []
        self.span_stack: list[Span] = []

    # -- numbering ---------------------------------------------------------------------------------
    def serial(self, t: torch.Tensor, origin: str = "const", name: str = "") -> int:
        s = getattr(t, _TAG, None)
        if s is None:
            s = self.new_serial(t, origin, name)
        return s

    def new_serial(self, t: torch.Tensor, origin: str = "activation", name: str = "") -> int:
        s = self.next_serial
        self.next_serial += 1
        setattr(t, _TAG, s)
        self.trace.values[s] = Value(tuple(t.shape), origin, name)
        return s

    def add_node(self, node: Node) -> None:
        self.trace.nodes.append(node)
        for s in node.inputs:
            self.trace.consumers.setdefault(s, []).append(node.index)
        for s in node.outputs:
            self.trace.producer[s] = node.index

    # -- torch ops ---------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or self.depth:
            return out
        raw = getattr(func, "__name__", str(func))
        inputs = [t for t in _tensors((args, kwargs))]
        if not inputs:
            return out
        inplace = raw in INPLACE_DUNDERS or (raw.endswith("_") and not raw.endswith("__"))
        outs = list(_tensors(out)) if out is not None else []
        if inplace and not outs:
            outs = [args[0]] if args and isinstance(args[0], torch.Tensor) else []
        if not outs:
            return out
        in_serials = [self.serial(t) for t in inputs]
        in_ids = {id(t) for t in inputs}
        out_serials = []
        for t in outs:
            if id(t) in in_ids and not inplace:
                # an alias returned as is (contiguous() of a contiguous tensor, eval dropout...): the same value
                out_serials.append(None)
                continue
            if getattr(t, _TAG, None) is not None and id(t) not in in_ids:
                out_serials.append(None)  # a cached tensor handed back (rotary tables...): keeps its own history
                continue
            out_serials.append(self.new_serial(t))
        kept = [s for s in out_serials if s is not None]
        if not kept:
            return out
        name = DUNDER_NAMES.get(raw, raw)
        scalar = any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args[:2]) or any(t.dim() == 0 for t in inputs)
        plain = tuple(a for a in args if not isinstance(a, torch.Tensor) and not isinstance(a, (list, tuple)) or
                      isinstance(a, (list, tuple)) and not any(isinstance(x, torch.Tensor) for x in a))
        named = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and not isinstance(v, (list, tuple, dict))}
        self.add_node(Node(len(self.trace.nodes), "op", name, in_serials, kept, scalar=scalar, args=plain, kwargs=named))
        return out

    # -- modules -----------------------------------------------------------------------------------
    def unit_pre(self, path: str):
        def hook(module, args, kwargs):
            if self.depth == 0 and not self.paused:
                self.paused = True
                try:
                    self.unit_inputs.append((len(self.trace.nodes), [self.serial(t) for t in _tensors((args, kwargs))]))
                finally:
                    self.paused = False
            self.depth += 1
        return hook

    def unit_post(self, path: str):
        def hook(module, args, kwargs, output):
            self.depth -= 1
            if self.depth or self.paused:
                return
            self.paused = True
            try:
                _, in_serials = self.unit_inputs.pop()
                outs = list(_tensors(output))
                x = next(iter(_tensors((args, kwargs))), None)
                self.trace.module_types[path] = type(module)
                if len(outs) == 1 and outs[0] is x:
                    return  # handed back as is (nn.Identity): the value keeps its serial
                fit, identity = None, False
                if len(outs) == 1 and x is not None and is_norm_candidate(module):
                    fit = norm_fit(module, x, outs[0])
                    identity = fit is None and outs[0].shape == x.shape and torch.equal(outs[0], x)
                self.add_node(Node(len(self.trace.nodes), "module", path, in_serials, [self.new_serial(t) for t in outs],
                                   module_type=type(module).__name__, fit=fit, identity=identity))
            finally:
                self.paused = False
        return hook

    def span_pre(self, path: str):
        def hook(module, args, kwargs):
            if self.depth or self.paused:
                return
            self.paused = True
            try:
                first = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
                span = Span(path, self.serial(first) if isinstance(first, torch.Tensor) else None, len(self.trace.nodes))
                self.span_stack.append(span)
                self.trace.spans.append(span)
            finally:
                self.paused = False
        return hook

    def span_post(self, path: str):
        def hook(module, args, kwargs, output):
            if self.depth or self.paused or not self.span_stack:
                return
            self.span_stack.pop().end = len(self.trace.nodes)
        return hook


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (ModelOutput is a dict), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def norm_fit(module: nn.Module, x: torch.Tensor, y: torch.Tensor, tol: float = 1e-4) -> NormFit | None:
    """Whether `module` computed a LayerNorm or RMSNorm of `x` over the last dimension, with its
    own `weight` / `bias` as the affine: each formula is evaluated in float64 and compared with the
    module's output `y`. A norm is known by what it computes, whatever its class is called.

    On a zero-mean input (a centred stream, or a freshly initialised model) the two formulas agree;
    then the module is run once more on the input shifted by a constant per row, which LayerNorm
    ignores and RMSNorm does not."""
    if not (x.is_floating_point() and y.is_floating_point()) or y.shape != x.shape or x.dim() < 2 or x.shape[-1] < 2:
        return None
    d = x.shape[-1]
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    if any(p is not None and (not isinstance(p, torch.Tensor) or p.shape != (d,)) for p in (w, b)):
        return None
    eps_attr = next((getattr(module, a) for a in ("eps", "variance_epsilon", "epsilon") if isinstance(getattr(module, a, None), float)), None)
    eps_choices = [eps_attr] if eps_attr is not None else [1e-5, 1e-6, 1e-12, 1e-8]
    fits = [f for kind in ("layernorm", "rmsnorm") if (f := _fit(kind, x, y, w, b, eps_choices, tol)) is not None]
    if len(fits) == 2:
        shifted = x + (x.abs().mean() + 1.0)
        with torch.no_grad():
            again = module(shifted)
        if isinstance(again, torch.Tensor) and again.shape == x.shape:
            fits = [f for f in fits if _fit(f.kind, shifted, again, w, b, [f.eps], tol) is not None]
    return fits[0] if len(fits) == 1 else None


def _fit(kind: str, x: torch.Tensor, y: torch.Tensor, w, b, eps_choices: list[float], tol: float) -> NormFit | None:
    """The best (eps, gain offset) for which `kind`'s formula gives `y` within `tol`, if any."""
    x64, y64 = x.double(), y.double()
    scale = float(y64.abs().max()) or 1.0
    centred = x64 - x64.mean(-1, keepdim=True) if kind == "layernorm" else x64
    best: NormFit | None = None
    for eps in eps_choices:
        n = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
        for offset in ((0.0, 1.0) if w is not None else (0.0,)):
            pred = n * (offset + w.double()) if w is not None else n
            if b is not None:
                pred = pred + b.double()
            err = float((pred - y64).abs().max()) / scale
            if err < tol and (best is None or err < best.rel_error):
                best = NormFit(kind, offset, float(eps), err)
    return best


@torch.no_grad()
def record(model: nn.Module, batch: dict[str, torch.Tensor]) -> Trace:
    """Run `model` on `batch` once and return what it computed (see the module docstring)."""
    rec = _Recorder(model)
    handles = []
    named = list(model.named_modules())
    for path, module in named:
        if not path:
            continue
        if is_writer_module(module) or is_norm_candidate(module):
            handles.append(module.register_forward_pre_hook(rec.unit_pre(path), with_kwargs=True))
            handles.append(module.register_forward_hook(rec.unit_post(path), with_kwargs=True))
        else:
            handles.append(module.register_forward_pre_hook(rec.span_pre(path), with_kwargs=True))
            handles.append(module.register_forward_hook(rec.span_post(path), with_kwargs=True))
    tagged: list[torch.Tensor] = []
    seen: set[int] = set()
    for kind, items in (("param", model.named_parameters(remove_duplicate=False)), ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            if id(t) not in seen:
                seen.add(id(t))
                rec.new_serial(t, kind, name)
                tagged.append(t)
    for key, t in batch.items():
        if isinstance(t, torch.Tensor):
            rec.new_serial(t, "input", key)
            tagged.append(t)
    try:
        with rec:
            out = model(**batch)
        main = getattr(out, "logits", None)
        if main is None:
            main = getattr(out, "last_hidden_state", None)
        if main is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            main = out[0]
        rec.trace.primary_output = getattr(main, _TAG, None) if isinstance(main, torch.Tensor) else None
    finally:
        for h in handles:
            h.remove()
        for t in tagged:
            if hasattr(t, _TAG):
                delattr(t, _TAG)
    return rec.trace
