"""Running a model whose weights stay on disk: one transformer block in memory at a time.

Calibrating DyT and verifying a conversion both need forward passes, of the original and of the
converted model. Holding both (or even one) in memory limits a machine to models of half its
memory; here a model is built with its parameters on the meta device (`empty_model`) and
`LazyWeights` gives each block its weights from the checkpoint when a forward pass enters the
block and takes them back when it leaves; the input and output embeddings are fetched the same way,
each time they run. The rest (norms, position tables, small heads) stays resident. Large linears and
embeddings keep the checkpoint's dtype and are cast to the compute dtype one at a time, only while
they run, and the feed-forward runs a slice of tokens at a time. Peak memory is then one block in
the checkpoint's dtype, one weight in the compute dtype and one slice's activations, whatever the depth.

Values are those of the in-memory path: each tensor is read exactly as `from_pretrained` would give
it (through the caller's `fetch`: the source's tensors, centred where the conversion centres the
stream), in the working dtype, then cast to the compute dtype (float32 for half-precision weights
on the CPU, as `normswap.verification.float32_compute` does; the working dtype elsewhere).

Tensors the passes keep (the original norms' outputs, the original logits) go to a `SpillStore`
on disk, read back one at a time.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
from torch import nn

from normswap.archs.trace import is_conv1d, is_linear
from normswap.modules import CenteredEmbedding

# a resident module holding fewer bytes than this keeps its parameters in the compute dtype for
# good (norms, biases, position tables): only embeddings and heads are cast per call
_SMALL_BYTES = 1 << 20


def empty_model(config: Any, cls: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture with every parameter on the meta device (no memory) and its buffers real:
    non-persistent buffers (rotary frequencies, causal masks) are computed by the constructor and
    are not in the checkpoint. With `dtype`, each floating buffer has the dtype it has in a model
    loaded in `dtype` (values computed in float32, then cast), as `from_pretrained` gives them:
    Gemma's embedding scale sqrt(d) is 5.6562 in a bf16 model, not 5.6569, while GPT-J's sinusoid
    table stays float32."""
    from accelerate import init_empty_weights

    def build(default: torch.dtype) -> nn.Module:
        before = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            with init_empty_weights(include_buffers=False):
                return cls.from_config(config) if hasattr(cls, "from_config") and not hasattr(cls, "config_class") else cls(config)
        finally:
            torch.set_default_dtype(before)

    model = build(torch.float32)
    if dtype is not None and dtype.is_floating_point and dtype != torch.float32:
        typed = dict(build(dtype).named_buffers())
        for name, buf in list(model.named_buffers()):
            like = typed.get(name)
            if buf.is_floating_point() and like is not None and like.dtype != buf.dtype:
                mod_name, _, attr = name.rpartition(".")
                model.get_submodule(mod_name)._buffers[attr] = buf.to(like.dtype)
    if hasattr(model, "tie_weights"):  # the context re-registers each assigned parameter, which unties a tied head
        model.tie_weights()
    return model.eval()


def block_paths(model: nn.Module, site_paths: list[str]) -> list[str]:
    """The blocks: children of the model's ModuleLists that hold norm sites (GPT-2's `h.3`, Llama's
    `model.layers.3`, Whisper's `model.encoder.layers.3` and `model.decoder.layers.3`), in order."""
    blocks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            for i in range(len(mod)):
                path = f"{name}.{i}" if name else str(i)
                if any(s.startswith(path + ".") for s in site_paths):
                    blocks.append(path)
    return blocks


class SpillStore:
    """Tensors written to one temporary file and read back on demand, so that what a pass keeps
    for later costs disk, not memory (plain reads: mapped pages would count as resident)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self._fh = tempfile.TemporaryFile(dir=folder)
        self._where: dict[Any, tuple[int, torch.Size, torch.dtype]] = {}
        self._end = 0

    def put(self, key: Any, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        self._fh.seek(self._end)
        if t.numel():
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._where[key] = (self._end, t.shape, t.dtype)
        self._end += t.numel() * t.element_size()

    def get(self, key: Any) -> torch.Tensor:
        start, shape, dtype = self._where[key]
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            self._fh.seek(start)
            self._fh.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return t

    def __contains__(self, key: Any) -> bool:
        return key in self._where

    @property
    def nbytes(self) -> int:
        return self._end

    def close(self) -> None:
        self._fh.close()


def compute_dtype(work_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a pass computes in: float32 for half-precision weights on the CPU (slow half
    arithmetic, and the in-memory path's `float32_compute` does the same), else the weights' own."""
    if torch.device(device).type == "cpu" and work_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return work_dtype


def _direct_bytes(mod: nn.Module) -> int:
    """Bytes of a module's own parameters (not its children's)."""
    return sum(p.numel() * p.element_size() for p in mod._parameters.values() if p is not None)


def _glibc() -> Any:
    """The C library if it is glibc (malloc_trim and mallopt), else None."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC: Any = None


def _return_freed_memory() -> None:
    """Give the heap's freed pages back to the OS (glibc's malloc_trim; a no-op elsewhere). A block's
    weights and activations are freed when the pass leaves it, but glibc keeps much of that memory
    in its arenas, fragmented: on a 0.86 GB Llama-shaped checkpoint the block-wise conversion's peak
    was 1.35 GB without this and 0.84 GB with it."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


# Allocations of at least this many bytes get pages of their own from the OS (glibc's
# M_MMAP_THRESHOLD), returned when freed, for the rest of the process once a block-wise pass runs:
# glibc's initial threshold, held there.
MMAP_THRESHOLD = 128 << 10


def _allocate_large_tensors_apart() -> None:
    """Stop freed tensors from piling up in the heap. glibc raises its threshold with each large
    free (up to 32 MB), so a block's activations and weight slices come to live in arenas that
    fragment pass after pass. Measured on the block-wise DyT conversion of a 48-block
    GPT-2-XL-shaped bf16 checkpoint (3.12 GB), peak over the imports: 0.93 GB with the rising
    threshold (about 8 MB more per block), 0.78 GB held at 1 MB, 0.40 GB held at 128 kB
    (docs/results/scale). A no-op where glibc is not the allocator."""
    lib = _glibc()
    if lib is not None:
        lib.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


# token-wise modules (`ModelPlan.token_wise`, the feed-forward) run this many tokens at a time
TOKEN_ROWS = 512
# a large linear casts at most this many bytes of its weight to the compute dtype at a time
WEIGHT_SLICE_BYTES = 16 << 20


def _by_rows(forward: Callable[..., Any], rows: int) -> Callable[..., Any]:
    """`forward` of a token-wise module on a [..., d] input, `rows` tokens at a time: the same values
    (each token's output depends on that token alone; row slices of a matmul reduce in the same
    order), with intermediates of `rows` tokens instead of the whole batch's. At 4,096 calibration
    tokens a 2048-wide SwiGLU MLP holds about 0.5 GB of float32 intermediates; by 1,024 rows, 0.13 GB."""

    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2 or x[..., 0].numel() <= rows:
            return forward(x, *args, **kwargs)
        parts = [forward(part) for part in x.reshape(-1, x.shape[-1]).split(rows)]
        out = torch.cat(parts)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return run


def _by_output_slices(linear: nn.Module, compute: torch.dtype, slice_bytes: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear`'s forward (an nn.Linear, or GPT-2's Conv1D with its weight stored [in, out]) for a
    weight kept in the checkpoint's dtype: the output is computed a slice of output features at a
    time, each slice of the weight cast to `compute` only for its product. The cast copy held is
    then `slice_bytes` (default `WEIGHT_SLICE_BYTES`), not the whole weight: a tied 32000 x 2048
    head is 262 MB in float32. Each output is the same dot product as with the whole weight cast
    (on the CPUs tried, the same bits). A weight already in `compute` runs the module's own forward."""
    own = linear.forward
    conv1d = is_conv1d(linear)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = linear.weight, linear.bias
        if w.dtype == compute:
            return own(x)
        n_in, n_out = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        step = max(1, (slice_bytes or WEIGHT_SLICE_BYTES) // (n_in * compute.itemsize))
        flat = x.reshape(-1, n_in)
        out = flat.new_empty(flat.shape[0], n_out, dtype=compute)
        for i in range(0, n_out, step):
            bi = None if b is None else b[i:i + step].to(compute)
            if conv1d:  # as Conv1D.forward: addmm(bias, x, weight)
                out[:, i:i + step] = torch.addmm(bi, flat, w[:, i:i + step].to(compute))
            else:
                out[:, i:i + step] = nn.functional.linear(flat, w[i:i + step].to(compute), bi)
        return out.reshape(*x.shape[:-1], n_out)

    return forward


def _lookup_then_cast(emb: nn.Embedding, compute: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """`emb`'s forward for a table kept in the checkpoint's dtype: the rows are looked up there and
    cast, then the class's own row-wise step (`_LOOKUPS`) runs in `compute`. The same values as a
    lookup in a cast table, without the cast table: GPT-2's 50257 x 1600 embedding is 322 MB in
    float32, and a centred one (CenteredEmbedding, after `--to rmsnorm` or DyT centring) was the
    peak of a block-wise GPT-2-XL conversion."""
    finish = _LOOKUPS[type(emb)]

    def forward(ids: torch.Tensor) -> torch.Tensor:
        e = nn.functional.embedding(ids, emb.weight, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse)
        return finish(e.to(compute))

    return forward


# Embedding classes whose forward is a plain lookup then a row-wise step; others (a scaled lookup
# in a class of its own) are cast whole while they run.
_LOOKUPS: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {nn.Embedding: lambda e: e, CenteredEmbedding: CenteredEmbedding.after_lookup}


class LazyWeights:
    """Gives an `empty_model` its weights, block by block, while forward passes run (a context
    manager: on exit every hook is removed and every weight it gave is dropped, the model's
    parameters back on the meta device).

    `fetch(name)` returns the tensor of parameter or persistent buffer `name` (a state-dict name)
    in the working dtype. Block parameters are fetched when a pass enters their block and dropped
    when it leaves; the rest are fetched once. Tied parameters stay tied (one fetch, one tensor).
    The modules at `token_wise` paths (`ModelPlan.token_wise`) run `rows` tokens at a time."""

    def __init__(self, model: nn.Module, fetch: Callable[[str], torch.Tensor], blocks: list[str], *, device: Any = "cpu",
                 compute: torch.dtype = torch.float32, token_wise: list[str] = (), rows: int = TOKEN_ROWS):
        self.model, self.fetch, self.device, self.compute = model, fetch, torch.device(device), compute
        _allocate_large_tensors_apart()
        self.blocks = blocks
        self._handles: list[Any] = []
        self._forwards: list[tuple[nn.Module, Any]] = []  # (token-wise module, its own instance forward or None)
        for path in token_wise:
            mod = model.get_submodule(path)
            self._forwards.append((mod, mod.__dict__.get("forward")))
            mod.forward = _by_rows(mod.forward, rows)
        self._meta: dict[tuple[int, str], tuple[nn.Module, nn.Parameter]] = {}  # (module id, attr) -> (module, its meta parameter)
        # The units fetched when a pass enters them and dropped when it leaves: the blocks, and the
        # input and output embeddings outside them (a 32000 x 2048 table is 131 MB in bf16).
        units = [model.get_submodule(path) for path in blocks]
        in_unit = {id(m) for u in units for m in u.modules()}
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            try:
                emb = getattr(model, getter)()
            except (AttributeError, NotImplementedError):
                emb = None
            if isinstance(emb, nn.Module) and id(emb) not in in_unit and _direct_bytes(emb) >= _SMALL_BYTES:
                units.append(emb)
                in_unit.update(id(m) for m in emb.modules())
        # Large linears and embeddings in a unit keep their weights in the working dtype and are cast
        # only while they run: one [8192, 2048] float32 weight at a time, not a whole float32 block.
        self._per_call: set[int] = set()
        for unit in units:
            self._handles.append(unit.register_forward_pre_hook(self._enter))
            for mod in unit.modules():
                if _direct_bytes(mod) >= _SMALL_BYTES and (is_linear(mod) or isinstance(mod, nn.Embedding)):
                    self._per_call.add(id(mod))
                    self._cast_while_running(mod)
            self._handles.append(unit.register_forward_hook(self._leave))  # after the unit's own cast-back hook
        # names of every parameter object (tied ones have several): the first is fetched
        self._names: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), name)
        resident: dict[int, nn.Parameter] = {}  # meta parameter id -> its resident (working dtype) value
        self._residents: list[tuple[nn.Module, str, nn.Parameter]] = []  # (module, attr, its meta parameter)
        for mod_name, mod in model.named_modules():
            if id(mod) in in_unit or not mod._parameters:
                continue
            small = _direct_bytes(mod) < _SMALL_BYTES
            for attr, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if id(p) not in resident:
                    t = self.fetch(self._names[id(p)]).to(self.device)
                    resident[id(p)] = nn.Parameter(t.to(compute) if small else t, requires_grad=False)
                self._residents.append((mod, attr, p))
                mod._parameters[attr] = resident[id(p)]
            if not small:
                self._cast_while_running(mod)
        self._stored: dict[tuple[int, str], nn.Parameter] = {}
        persistent = set(model.state_dict(keep_vars=True))
        for name, buf in list(model.named_buffers()):
            if name in persistent:
                mod_name, _, attr = name.rpartition(".")
                mod = model.get_submodule(mod_name)
                t = self.fetch(name).to(self.device)
                mod._buffers[attr] = t.to(compute) if t.is_floating_point() else t
            elif buf.device != self.device or (buf.is_floating_point() and buf.dtype != compute and buf.dtype != torch.float32):
                mod_name, _, attr = name.rpartition(".")
                model.get_submodule(mod_name)._buffers[attr] = buf.to(self.device)

    def _cast_while_running(self, mod: nn.Module) -> None:
        if type(mod) in _LOOKUPS:  # a lookup, then the cast: the same values as a cast table, without one
            self._forwards.append((mod, mod.__dict__.get("forward")))
            mod.forward = _lookup_then_cast(mod, self.compute)
        elif type(mod) is nn.Linear or is_conv1d(mod):  # a slice of the weight cast at a time
            self._forwards.append((mod, mod.__dict__.get("forward")))
            mod.forward = _by_output_slices(mod, self.compute)
        else:  # cast to the compute dtype while the module runs
            self._handles.append(mod.register_forward_pre_hook(self._upcast))
            self._handles.append(mod.register_forward_hook(self._downcast))

    def __enter__(self) -> "LazyWeights":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod, own in self._forwards:
            if own is None:
                del mod.forward
            else:
                mod.forward = own
        self._forwards.clear()
        for (_, attr), (mod, p) in self._meta.items():  # a block a pass left early (`calibration.hooked_forward`)
            mod._parameters[attr] = p
        self._meta.clear()
        # the resident weights too (an embedding table is 131 MB at 1.5B parameters in bf16): a
        # model outlives its pass (verification builds the next one while the last is in scope)
        for mod, attr, p in self._residents:
            mod._parameters[attr] = p
        self._residents.clear()
        _return_freed_memory()

    # -- blocks
    def _enter(self, block: nn.Module, args: Any) -> None:
        cache: dict[int, nn.Parameter] = {}
        for mod in block.modules():
            for attr, p in list(mod._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                if id(p) not in cache:
                    t = self.fetch(self._names[id(p)]).to(self.device)
                    if t.is_floating_point() and id(mod) not in self._per_call:
                        t = t.to(self.compute)
                    cache[id(p)] = nn.Parameter(t, requires_grad=False)
                self._meta[(id(mod), attr)] = (mod, p)
                mod._parameters[attr] = cache[id(p)]

    def _leave(self, block: nn.Module, args: Any, out: Any) -> None:
        for mod in block.modules():
            for attr in list(mod._parameters):
                held = self._meta.pop((id(mod), attr), None)
                if held is not None:
                    mod._parameters[attr] = held[1]
        _return_freed_memory()

    # -- large resident modules
    def _upcast(self, mod: nn.Module, args: Any) -> None:
        for attr, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != self.compute:
                self._stored[(id(mod), attr)] = p
                mod._parameters[attr] = nn.Parameter(p.detach().to(self.compute), requires_grad=False)

    def _downcast(self, mod: nn.Module, args: Any, out: Any) -> None:
        for attr in list(mod._parameters):
            p = self._stored.pop((id(mod), attr), None)
            if p is not None:
                mod._parameters[attr] = p


def capture_outputs(model: nn.Module, paths: list[str], batch: dict[str, torch.Tensor], store: SpillStore,
                    inputs: SpillStore | None = None) -> None:
    """One forward pass; the outputs of the modules at `paths` (and their inputs, into `inputs`)
    go to `store` as float32 [tokens, d] tensors, as `normswap.calibration.capture` returns them."""
    from normswap.calibration import hooked_forward

    def keep(p: str, m: nn.Module, args: tuple, out: Any) -> None:
        if p not in store:
            store.put(p, out.detach().reshape(-1, out.shape[-1]).float())
        if inputs is not None and p not in inputs:
            x = args[0]
            inputs.put(p, x.detach().reshape(-1, x.shape[-1]).float())

    hooked_forward(model, paths, batch, keep, "block-wise capture")
