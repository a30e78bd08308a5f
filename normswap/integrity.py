"""Integrity of checkpoint files read from disk: the one place that decides whether a safetensors
file, a weights index or a JSON file can be trusted, and the digest that ties a conversion record
to the weights it was saved with.

Everything here treats its input as hostile. A file that fails a check raises one NormswapError
naming the file and what is wrong, never a traceback and never a half-read model:

- `read_header` validates a safetensors header at least as strictly as the safetensors library
  (header length within the file, a JSON object, known dtypes, shapes of non-negative ints,
  [start, end] offsets whose span is exactly numel * itemsize, sorted, non-overlapping and covering
  the data section exactly, no duplicate keys). Both the streaming reader and the in-memory loader
  go through it, so a corrupt file is refused on every path with the same message.
- `read_index` validates a `model.safetensors.index.json` (shard names are plain file names in
  the folder) and `read_checkpoint` checks it against the shards' headers.
- `read_json_object` reads a JSON object (config.json, an index) with one-line errors.
- `record_digest` is the sha256 over the canonical JSON of a conversion record (without its digest)
  and the sorted tensor names, dtypes and shapes of the weights saved with it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normswap.errors import NormswapError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DIGEST_PREFIX = "sha256:"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

# safetensors dtype name -> (torch dtype, bytes per element); names the library writes for torch
_DTYPE_NAMES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    name: (getattr(torch, t), size) for name, (t, size) in _DTYPE_NAMES.items() if hasattr(torch, t)
}


def corrupt(file: str | os.PathLike, what: str) -> NormswapError:
    return NormswapError(f"corrupt or truncated weights in {file}: {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _short(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


# ------------------------------------------------------------------------------------------- JSON


def parse_json(text: str | bytes, file: str | os.PathLike, what: str = "") -> Any:
    """JSON with one-line errors naming `file`; duplicate keys are refused."""
    label = f"invalid {what + ' ' if what else ''}{file}"
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as d:
        raise NormswapError(f"{label}: duplicate key {d.key!r}") from None
    except RecursionError:
        raise NormswapError(f"{label}: nested too deeply") from None
    except UnicodeDecodeError:
        raise NormswapError(f"{label}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise NormswapError(f"{label}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except ValueError as err:
        raise NormswapError(f"{label}: not JSON ({str(err).splitlines()[0][:120]})") from None


def read_json_object(file: str | os.PathLike, what: str = "") -> dict[str, Any]:
    """The JSON object in `file` (a config.json, an index...), or one NormswapError naming the file."""
    file = Path(file)
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise NormswapError(f"cannot read {file}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NormswapError(f"invalid {what + ' ' if what else ''}{file}: not UTF-8 text") from None
    obj = parse_json(text, file, what)
    if not isinstance(obj, dict):
        raise NormswapError(f"invalid {what + ' ' if what else ''}{file}: expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(x), type(x).__name__)


# ------------------------------------------------------------------------------------ safetensors


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a validated safetensors header; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    file: Path
    data_start: int  # absolute offset of the data section (8 + header length)
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(file: str | os.PathLike) -> SafetensorsHeader:
    """The validated header of a safetensors file; NormswapError("corrupt or truncated weights in
    FILE: WHAT") on anything the safetensors library would refuse (and duplicate keys)."""
    file = Path(file)
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise corrupt(file, f"the file is {len(head)} bytes, shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise corrupt(file, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise corrupt(file, f"header length {n} runs past the end of the {size}-byte file")
            raw = fh.read(n)
    except OSError as err:
        raise NormswapError(f"cannot read weights {file}: {err.strerror or err}") from None
    if len(raw) != n:
        raise corrupt(file, "the file changed while it was read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise corrupt(file, "the header is not UTF-8 text") from None
    if not text.startswith("{"):
        raise corrupt(file, "the header is not a JSON object")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as d:
        raise corrupt(file, f"duplicate key {d.key!r} in the header") from None
    except RecursionError:
        raise corrupt(file, "the header is nested too deeply") from None
    except ValueError as err:
        msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err).splitlines()[0][:120]
        raise corrupt(file, f"the header is not valid JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise corrupt(file, "the header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(file, "__metadata__ is not an object of strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        tensors[name] = _tensor_entry(file, name, entry)
    data_len = size - 8 - n
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start < pos:
            raise corrupt(file, f"tensor {t.name!r} (data_offsets [{t.start}, {t.end}]) overlaps the tensor before it")
        if t.start > pos:
            raise corrupt(file, f"{t.start - pos} unused bytes before tensor {t.name!r} (data_offsets [{t.start}, {t.end}])")
        if t.end > data_len:
            raise corrupt(file, f"tensor {t.name!r} (data_offsets [{t.start}, {t.end}]) runs past the end of the data ({data_len} bytes)")
        pos = t.end
    if pos != data_len:
        raise corrupt(file, f"{data_len - pos} trailing bytes after the last tensor")
    return SafetensorsHeader(file, 8 + n, tensors, metadata)


def _tensor_entry(file: Path, name: str, entry: Any) -> TensorInfo:
    where = f"tensor {_short(name)}"
    if not name:
        raise corrupt(file, "a tensor has an empty name")
    if not isinstance(entry, dict):
        raise corrupt(file, f"{where}: the entry is not an object")
    fields = {"dtype", "shape", "data_offsets"}
    missing = sorted(fields - set(entry))
    if missing:
        raise corrupt(file, f"{where}: no {missing[0]!r}")
    extra = sorted(set(entry) - fields)
    if extra:
        raise corrupt(file, f"{where}: unknown field {_short(extra[0])}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise corrupt(file, f"{where}: unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise corrupt(file, f"{where}: shape {_short(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise corrupt(file, f"{where}: data_offsets {_short(offsets)} are not [start, end] with 0 <= start <= end")
    start, end = offsets
    need = math.prod(shape) * DTYPES[dtype][1]
    if end - start != need:
        raise corrupt(file, f"{where}: data_offsets [{start}, {end}] hold {end - start} bytes, but shape {shape} of {dtype} needs {need}")
    return TensorInfo(name, dtype, tuple(shape), start, end)


def read_index(index: str | os.PathLike) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index: tensor name -> shard file name (a plain name
    of a .safetensors file beside the index)."""
    index = Path(index)
    data = read_json_object(index, "weights index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise NormswapError(f"invalid weights index {index}: no 'weight_map' object")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_shard_name(shard):
            raise NormswapError(f"invalid weights index {index}: tensor {_short(key)} maps to {_short(shard)}, "
                                "which is not a .safetensors file name in the folder")
    return weight_map


def _plain_shard_name(name: str) -> bool:
    return (name.endswith(".safetensors") and not name.startswith(".") and "/" not in name and "\\" not in name
            and "\0" not in name and os.path.basename(name) == name)


def weight_files(folder: str | os.PathLike, *, any_name: bool = False) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and its index's weight_map (None when not sharded).

    As transformers: `model.safetensors` first, then the index. With `any_name` (source folders),
    a folder with neither gives its `*.safetensors` files in name order.
    """
    folder = Path(folder)
    single = folder / WEIGHTS_NAME
    index = folder / INDEX_NAME
    if single.is_file():
        return [single], None
    if index.is_file():
        weight_map = read_index(index)
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise NormswapError(f"invalid weights index {index}: shard {f.name} does not exist")
        return files, weight_map
    if any_name:
        files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if files:
            return files, None
    raise NormswapError(f"{folder} has no weights (no {WEIGHTS_NAME}" + (" or other *.safetensors file)" if any_name else ")"))


def read_checkpoint(files: list[Path], weight_map: dict[str, str] | None = None,
                    index: str | os.PathLike | None = None) -> list[SafetensorsHeader]:
    """Validated headers of every file of a checkpoint; a tensor in two files, or an index that
    does not match the shards, is an error."""
    headers = [read_header(f) for f in files]
    where: dict[str, Path] = {}
    for h in headers:
        for name in h.tensors:
            if name in where:
                raise corrupt(h.file, f"tensor {_short(name)} is also in {where[name].name}")
            where[name] = h.file
    if weight_map is not None:
        label = f"invalid weights index {index}" if index is not None else "invalid weights index"
        for name, f in where.items():
            if weight_map.get(name) != f.name:
                raise NormswapError(f"{label}: tensor {_short(name)} is in {f.name}, but the index says {_short(weight_map.get(name))}")
        for name, shard in weight_map.items():
            if name not in where:
                raise NormswapError(f"{label}: it lists tensor {_short(name)} in {shard}, which does not hold it")
    return headers


def tensor_list(headers: list[SafetensorsHeader]) -> list[list[Any]]:
    """[name, dtype, shape] of every tensor, sorted by name (what the digest covers)."""
    return sorted([t.name, t.dtype, list(t.shape)] for h in headers for t in h.tensors.values())


def state_tensor_list(state: dict[str, torch.Tensor]) -> list[list[Any]]:
    """`tensor_list` of a state dict before it is written: the same entries safetensors' headers
    will hold, so a config can carry the digest of weights written beside it by another tool."""
    names = {t: name for name, (t, _) in DTYPES.items()}
    return sorted([name, names[t.dtype], list(t.shape)] for name, t in state.items())


# ---------------------------------------------------------------------------------------- digest


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def record_digest(record: dict[str, Any], tensors: list[list[Any]]) -> str:
    """sha256 over the canonical JSON of a conversion record (its `digest` left out) and the
    sorted tensor names, dtypes and shapes of the weights saved with it."""
    body = {k: v for k, v in record.items() if k != "digest"}
    payload = canonical_json({"normswap-digest": 1, "record": body, "tensors": tensors})
    return DIGEST_PREFIX + hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------- tensor values


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_mismatch(dtype: torch.dtype, shape: Any, want: torch.Tensor) -> str | None:
    """Why a stored tensor of `dtype` and `shape` cannot load into `want` (a parameter or buffer,
    meta tensors too), or None: shapes must be equal, a floating tensor needs a floating one (any
    width: values are cast as load_state_dict does), any other dtype needs exactly that dtype."""
    if tuple(shape) != tuple(want.shape):
        return f"has shape {list(shape)}, but the model needs {list(want.shape)}"
    if dtype.is_floating_point != want.dtype.is_floating_point or (not want.dtype.is_floating_point and dtype != want.dtype):
        return f"has dtype {_dtype_name(dtype)}, but the model's tensor is {_dtype_name(want.dtype)}"
    return None


def check_values(name: str, t: torch.Tensor, file: str | os.PathLike, chunk: int = 1 << 22) -> None:
    """A floating-point tensor must hold only finite values (checked in chunks: bounded memory;
    `isfinite` on a bfloat16 chunk allocates about five bytes an element)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        if part.element_size() == 1:  # float8: isfinite has no kernel for it
            part = part.float()
        if not bool(torch.isfinite(part).all()):
            raise NormswapError(f"{file}: tensor {name} holds non-finite values (NaN or inf)")
