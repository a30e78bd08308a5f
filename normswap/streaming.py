"""Streaming conversion: a (sharded) safetensors checkpoint converted tensor by tensor, without
instantiating the model, so that peak memory is a small multiple of the largest tensor.

Only conversions that need no calibration stream: `--to rmsnorm` (exact for Pre-LN LayerNorm
families and for RMSNorm families such as Llama and Gemma, with or without folding; approximate
elsewhere) and `--to dyt --alpha-init X`.

How:
1. the model is built on the meta device (no memory) from the saved config, and the same plan as
   the in-memory path is made on it (`archs.plan.build_plan`), including the structural decisions
   (tied head, which sites fold, which readers gain a bias): the conversion record is computed on
   the meta model by the same code as `normswap.convert`;
2. the converted structure is applied to the meta model; its state dict lists the output tensors
   (names, shapes, dtypes) in the order `normswap.save` writes them;
3. each output tensor is computed from the source tensors it depends on (a writer's own weight, a
   reader's weight and bias plus its norms' small g and b vectors), read with plain file reads
   (no mmap: mapped pages would count towards the process's resident memory), with the float64
   maths of `surgery.centre` / `surgery.fold` (the same functions as the in-memory path, so the
   result is bit-identical), and written straight into its output shard, whose safetensors header
   is known in advance.

The output folder is what `normswap.save` writes for the in-memory conversion (same tensors, same
config.json and record), except that checkpoints above `max_shard_size` are split into
`model-0000i-of-0000n.safetensors` shards with a `model.safetensors.index.json`.
"""
from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.log import logger

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
DEFAULT_SHARD_BYTES = 2 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------ safetensors I/O


class SafetensorsReader:
    """Tensors of one or more safetensors files, read one at a time with plain reads.

    Every header is validated up front (`normswap.integrity.read_header`: as strict as the
    safetensors library), and a tensor in two files is refused, so a corrupt file is one error
    before anything is computed, never a wrong or NaN tensor later.
    """

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None = None, index: Path | None = None):
        from normswap.integrity import read_checkpoint

        self.entries: dict[str, tuple[Path, int, Any]] = {}  # key -> (file, data start, TensorInfo)
        for h in read_checkpoint(list(files), weight_map, index):
            for key, info in h.tensors.items():
                self.entries[key] = (h.file, h.data_start, info)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][2].torch_dtype

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key][2].shape)

    def nbytes(self, key: str) -> int:
        return self.entries[key][2].nbytes

    def get(self, key: str) -> torch.Tensor:
        from normswap.integrity import corrupt

        f, base, info = self.entries[key]
        t = torch.empty(info.shape, dtype=info.torch_dtype)
        if info.nbytes:
            buf = t.reshape(-1).view(torch.uint8).numpy()
            try:
                with open(f, "rb", buffering=0) as fh:
                    fh.seek(base + info.start)
                    got = fh.readinto(memoryview(buf))
            except OSError as err:
                raise NormswapError(f"cannot read weights {f}: {err.strerror or err}") from None
            if got != info.nbytes:
                raise corrupt(f, f"tensor {key} is cut short (the file changed while it was read?)")
        return t


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: `model.safetensors`, else the shards named by
    a (validated) index, else every `*.safetensors` file (see `normswap.integrity.weight_files`)."""
    from normswap.integrity import weight_files

    return weight_files(folder, any_name=True)[0]


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Size on disk of a checkpoint folder's weights (0 if it has none)."""
    try:
        return sum(f.stat().st_size for f in checkpoint_files(Path(folder)))
    except (NormswapError, OSError):
        return 0


def available_memory() -> int:
    """MemAvailable in bytes (Linux); a large number where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes a planned list of tensors into safetensors shards, tensor by tensor, in plan order."""

    def __init__(self, folder: Path, plan: list[tuple[str, list[int], torch.dtype]], max_shard_bytes: int, metadata: dict[str, str]):
        self.folder, self.metadata = folder, metadata
        shards: list[list[tuple[str, list[int], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            n = _numel(item[1]) * _itemsize(item[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += n
        self.shards = shards
        count = len(shards)
        self.names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.total = sum(_numel(s) * _itemsize(d) for _, s, d in plan)
        self._shard = -1
        self._pos = 0
        self._fh = None

    def __iter__(self) -> Iterator[tuple[str, list[int], torch.dtype]]:
        for i, shard in enumerate(self.shards):
            self._open(i)
            for item in shard:
                yield item
            self._close()

    def _open(self, i: int) -> None:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for key, shape, dtype in self.shards[i]:
            n = _numel(shape) * _itemsize(dtype)
            header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.folder / self.names[i], "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._shard, self._pos = i, 0

    def write(self, key: str, t: torch.Tensor) -> None:
        want_key, shape, dtype = self.shards[self._shard][self._pos]
        if key != want_key or list(t.shape) != list(shape) or t.dtype != dtype:
            raise RuntimeError(f"streaming writer: got {key} {tuple(t.shape)} {t.dtype}, planned {want_key} {tuple(shape)} {dtype}")
        if t.numel():
            self._fh.write(_tensor_bytes(t))
        self._pos += 1

    def _close(self) -> None:
        if self._fh is not None:
            if self._pos != len(self.shards[self._shard]):
                raise RuntimeError("streaming writer: shard closed before all its tensors were written")
            self._fh.close()
            self._fh = None

    def write_index(self) -> None:
        if len(self.names) > 1:
            weight_map = {key: self.names[i] for i, shard in enumerate(self.shards) for key, _, _ in shard}
            (self.folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2) + "\n")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------ planning


class NotStreamable(NormswapError):
    """The conversion would be approximate: streaming cannot run the model to measure it."""


def streamable(to: str, alpha_init: float | None = None, approximate_ok: bool = False, calibrate: str = "site",
               variant: str = "dyt") -> str | None:
    """Why a conversion cannot stream (None if it can).

    Streaming runs the model one block at a time (`normswap.blockwise`): DyT is calibrated that
    way and every approximate result is measured that way before it is saved. What needs both
    whole models at once, or fixed scales of a centred stream, does not stream. (`approximate_ok`
    is kept for library callers that measure the output themselves: it skips the measurement.)"""
    if to == "none":
        return "--to none is calibrated on a centred stream, which the streaming path does not run yet"
    if calibrate != "site":
        return f"--calibrate {calibrate} fits the norms against the original model, which needs both models in memory"
    if variant != "dyt":
        return f"--variant {variant}: the block-wise path fits DyT only"
    return None


@dataclass
class _Plan:
    """Everything needed to compute the output tensors from the source tensors."""

    source_key: dict[str, str]  # original model parameter name (any alias) -> key in the source files
    centre: dict[str, dict[str, int]] = field(default_factory=dict)  # writer path -> {attr: dim}
    folds: dict[str, list[str]] = field(default_factory=dict)  # reader path -> site paths folded into it, in order
    conv1d: set[str] = field(default_factory=set)
    sites: dict[str, Any] = field(default_factory=dict)  # site path -> (Site, SiteRecord, old class name, has g, has b)
    # the working dtype (`normswap.conversion.resolve_dtypes`): source tensors are read in it and
    # each result is rounded to it, then cast to the planned output dtype
    float_dtype: torch.dtype = torch.float32
    # calibrated DyT sites: path -> {"alpha", "weight", "bias"} (float32, unfolded), from `_calibrate`
    fitted: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    token_wise: list[str] = field(default_factory=list)  # `ModelPlan.token_wise`: run by row slices in block-wise passes


def _meta_model(config: Any, cls: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture with its parameters on the meta device; buffers are real (small, and
    runnable: the block-wise passes need the non-persistent ones), made as a model loaded in
    `dtype` has them."""
    from normswap.blockwise import empty_model

    return empty_model(config, cls, dtype)


def _key_renamer(model: nn.Module):
    """Checkpoint key -> model parameter name, as transformers' from_pretrained renames on loading
    (legacy names such as GPT-NeoX's `embed_out`, a missing or extra base-model prefix)."""
    state = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # another transformers version: names as stored
        renamings = converters = None

    def rename(key: str) -> str:
        if renamings is None:
            if key in state or not prefix:
                return key
            if key.startswith(prefix + ".") and key[len(prefix) + 1:] in state:
                return key[len(prefix) + 1:]
            return f"{prefix}.{key}" if f"{prefix}.{key}" in state else key
        new, converter = rename_source_key(key, renamings, converters, prefix, state)
        if converter is not None:
            raise NormswapError(f"checkpoint tensor {key} needs transformers' weight conversion on loading (cannot stream it)")
        return new

    return rename


def _match_source_keys(model: nn.Module, reader: SafetensorsReader) -> dict[str, str]:
    """Original parameter names -> source keys; tied parameters map all their names to the one stored."""
    names_by_param: dict[int, list[str]] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names_by_param.setdefault(id(p), []).append(name)
    persistent = set(model.state_dict(keep_vars=True))
    rename = _key_renamer(model)
    stored: dict[str, str] = {}  # model name -> file key
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = []
    from normswap.integrity import tensor_mismatch

    state = model.state_dict(keep_vars=True)
    # a model's own non-persistent buffers, stored by older versions (BERT's embeddings.position_ids
    # in all-MiniLM-L6-v2): from_pretrained skips them, the constructor computes them
    computed = {n for n, _ in model.named_buffers(remove_duplicate=False)} - persistent
    for key in reader.keys():
        name = rename(key)
        if name in persistent:
            why = tensor_mismatch(reader.dtype(key), reader.shape(key), state[name])
            if why:  # from_pretrained would cast an integer tensor into a float parameter silently
                raise NormswapError(f"checkpoint tensor {key} {why}")
            stored[name] = key
        elif name not in computed and not any(r.search(key) for r in ignore):
            unexpected.append(key)
    if unexpected:
        raise NormswapError(f"checkpoint has {len(unexpected)} tensor(s) {type(model).__name__} does not, e.g. {sorted(unexpected)[0]} (cannot stream it)")
    mapping: dict[str, str] = {}
    missing = []
    for names in names_by_param.values():
        names = [n for n in names if n in persistent]
        if not names:
            continue
        found = next((stored[n] for n in names if n in stored), None)
        if found is None:
            missing.append(names[0])
            continue
        for n in names:
            mapping[n] = found
    if missing:
        raise NormswapError(f"checkpoint lacks {len(missing)} tensor(s) of {type(model).__name__}, e.g. {missing[0]} (cannot stream it)")
    return mapping


# ------------------------------------------------------------------------------------------ conversion


def stream_convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    to: str = "rmsnorm",
    *,
    fold: bool = True,
    tied_head: str = "auto",
    alpha_init: float | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_SHARD_BYTES,
    copy_aux: bool = True,
    save_tokenizer: bool = True,
    dtype: str | torch.dtype | None = "auto",
    approximate_ok: bool = False,
    drop_mean: bool = False,
    calib_text: str | None = None,
    calib_tokens: int = 4096,
    verify: bool = False,
    verify_text: str | None = None,
    device: Any = "cpu",
) -> Any:
    """Convert the checkpoint folder `source` into `out` without loading it; returns a ConversionResult.

    Same tensors and conversion record as `normswap.convert(source, to, fold=..., tied_head=...,
    dtype=...)` followed by `normswap.save` (see `streamable` for what streams). `dtype` is the
    output's floating dtype ("auto": the source's own, see `normswap.conversion.resolve_dtypes`,
    which also gives the working dtype the maths rounds to).

    DyT without `alpha_init` is calibrated block by block (`_calibrate`): the same sequential
    least-squares fits as the in-memory path, on `calib_tokens` tokens of `calib_text`, with one
    block of weights in memory at a time. An approximate result, or any with `verify`, is then
    measured block by block against the source on the output as written (`_verify`), before the
    output is moved into place; `approximate_ok` (a caller that measures the result itself) skips
    that measurement for an approximate result. `device` is where the passes run.
    """
    from normswap import __version__
    from normswap.conversion import (ConversionResult, EXACT_TOLERANCE, _centre_stream, _check_texts, _fold_blocker, _stand_in_warnings,
                                     _untie_for_fold, check_options, dtype_name, half_rounding_note, keeps_rmsnorm, plan_conversion, resolve_dtypes)
    from normswap.devices import resolve_device
    from normswap.loading import _architecture_class, atomic_output, check_source, _copy_aux_files, is_converted, load_config, load_tokenizer, write_config
    from normswap.outputs import check_output
    from normswap.record import ConversionRecord

    t0 = time.perf_counter()
    check_options(to, tied_head=tied_head, dtype=dtype, alpha_init=alpha_init, calib_tokens=calib_tokens)
    why = streamable(to, alpha_init, approximate_ok)
    if why:
        raise NotStreamable(f"cannot convert with low memory: {why}")
    device = resolve_device(device)
    src = check_source(str(source))
    if src is None:
        raise NormswapError(f"low-memory conversion needs a local model folder, not a Hub id ({source})")
    if is_converted(src):
        raise NormswapError(f"{source} is already a normswap checkpoint: streaming converts plain checkpoints only")
    out = check_output(out, overwrite=overwrite, inputs={"source model": src})
    calibrated = to == "dyt" and alpha_init is None
    from normswap.samples import is_speech

    out_dtype, work_dtype, dtype_warnings = resolve_dtypes(dtype, source=src)
    config = load_config(str(source))
    config.dtype = out_dtype  # as the in-memory path leaves it
    cls = _architecture_class(config)
    model = _meta_model(config, cls, work_dtype)
    reader = SafetensorsReader(checkpoint_files(src))
    source_key = _match_source_keys(model, reader)
    if calibrated and is_speech(model):
        raise NotStreamable(f"{type(model).__name__} calibrates on speech, one utterance a batch, which the block-wise passes do not "
                            "run: convert it without --low-memory (with --calib-audio)")
    tokenizer = load_tokenizer(str(src)) if save_tokenizer or calibrated or verify or to != "rmsnorm" else None
    _check_texts(str(source), tokenizer, calib_text, verify_text)

    # -- the decisions, by the in-memory code on the meta model ------------------------------------
    from normswap.archs import get_family

    if get_family(config.model_type) is None:
        # discovery runs the model, which the low-memory path never holds
        raise NotStreamable(f"{config.model_type!r} has no family table, so its plan must be discovered by running the model")
    plan, sites, warnings, centre = plan_conversion(model, to, drop_mean, "table")
    record = ConversionRecord(
        target=to, base_model_type=plan.model_type, architecture=type(model).__name__,
        family=plan.family_name, style=plan.style, exact=False, plan=plan.source,
        source={"model": str(source), "revision": None}, version=__version__, dtype=dtype_name(out_dtype),
    )
    warnings = dtype_warnings + warnings
    sp = _Plan(source_key, float_dtype=work_dtype, token_wise=plan.token_wise)
    calib_model = None
    with torch.no_grad():
        if centre:
            from normswap.surgery.centre import writer_dims, writer_target

            # On meta tensors this only changes structure: untie the head, mark centred lookups.
            record.tied_head = _centre_stream(model, plan, tied_head, record)
            for path in plan.embed_writers + plan.writers:
                if path in record.centered_embeddings:
                    continue
                target = writer_target(model, path)
                if isinstance(target, nn.Parameter):
                    sp.centre[path] = {"": -1}
                else:
                    sp.centre[path] = writer_dims(target)
        elif keeps_rmsnorm(plan, to):
            # on meta tensors: the head gets its own (meta) weight, read from the shared source tensor
            record.tied_head = _untie_for_fold(model, plan, tied_head, fold, warnings)
        if calibrated:  # the centred model with its norms as they are: what calibration runs
            import copy

            calib_model = copy.deepcopy(model)
        _plan_sites(model, plan, sites, to, centre, alpha_init, fold, record, sp, _fold_blocker, drop_mean)
    from normswap.devices import device_name

    result = ConversionResult(record, 0.0, warnings, tokenizer=tokenizer, source=str(source), device=device_name(device))
    compute = _Computer(model, reader, sp)
    if calibrated:
        from normswap.blockwise import compute_dtype
        from normswap.samples import model_inputs

        batches = model_inputs(calib_model, tokenizer=tokenizer, text=calib_text, n_tokens=calib_tokens, what="calibration")
        warnings += _stand_in_warnings(calib_model, tokenizer, batches, None, "calibration")
        _calibrate(calib_model, compute.centred, sites, batches, sp, result, device, compute_dtype(work_dtype, device))
        del calib_model
    for rec in record.sites:  # alpha as the in-memory path saves it: float32, then the working and output dtypes
        if rec.path in sp.fitted:
            rec.alpha, rec.method = float(sp.fitted[rec.path]["alpha"]), "calibrated-sequential"
        if rec.alpha is not None:
            rec.alpha = float(torch.tensor(rec.alpha, dtype=torch.float32).to(work_dtype).to(out_dtype))
    record.exact = to == "rmsnorm" and bool(record.sites) and all(s.exact for s in record.sites)
    measure = verify or (not record.exact and not approximate_ok)
    if record.tied_head == "untie":
        model.config.tie_word_embeddings = False

    # -- output tensors: the converted meta model's state dict, each tensor once; floating ones in
    # the output dtype ------------------------------------------------------------------------------
    out_plan: list[tuple[str, list[int], torch.dtype]] = []
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out_plan.append((name, list(t.shape), out_dtype if t.is_floating_point() else t.dtype))

    with atomic_output(out, overwrite=overwrite, inputs={"source model": src}) as tmp:
        if copy_aux:
            _copy_aux_files(src, tmp)
        if tokenizer is not None and save_tokenizer:
            tokenizer.save_pretrained(str(tmp))
        writer = ShardWriter(tmp, out_plan, max_shard_size, {"format": "pt", "normswap": record.version})
        for key, _, dtype_ in writer:
            writer.write(key, compute(key, dtype_))
        writer.write_index()
        write_config(tmp, model.config, record)
        if measure:  # what was written, against the source, before it moves into place
            result.verification, stand_in = _verify(config, cls, model, compute, tmp, tokenizer, verify_text, record.exact, device,
                                                    work_dtype, out_dtype)
            warnings += stand_in
            tolerance = EXACT_TOLERANCE[dtype_name(out_dtype)]
            result.verification["exact_tolerance"] = tolerance
            deviation = result.verification["max_rel_diff"]
            if record.exact and deviation > tolerance and out_dtype != torch.float32:
                # As the in-memory path: rounding to half precision can exceed the bound on stand-in
                # inputs; the claim is about the maths, so the same conversion is checked in float32
                # (the tensors as computed from the float32 source, never rounded).
                exact32 = _Computer(model, reader, replace(sp, float_dtype=torch.float32))
                check32, _ = _verify(config, cls, model, exact32, None, tokenizer, verify_text, True, device, torch.float32, torch.float32)
                result.verification["float32_max_rel_diff"] = check32["max_rel_diff"]
                if check32["max_rel_diff"] <= EXACT_TOLERANCE["float32"]:
                    warnings.append(half_rounding_note(out_dtype, deviation, tolerance, check32["max_rel_diff"]))
                    deviation = 0.0
            result.verification["within_bound"] = deviation <= tolerance  # as the in-memory path
            if record.exact and deviation > tolerance:
                raise NormswapError(
                    f"the conversion claims to be exact, but its {result.verification['output']} differ from the original's by "
                    f"{result.verification['max_rel_diff']:.3g} (relative; the bound is {tolerance:g}): nothing is saved")
    result.seconds = time.perf_counter() - t0
    logger.info("streamed %s -> %s: %d tensors in %d shard(s)", source, out, len(out_plan), len(writer.names))
    return result


def _calibrate(calib_model: nn.Module, fetch, sites, batches, sp: _Plan, result, device, compute: torch.dtype) -> None:
    """Block-wise sequential DyT calibration: the same fits as the in-memory path
    (`conversion._replacement` on each site's input and the original norm's output), from two
    passes over `calib_model` (the centred source, its norms unchanged) with one block of weights
    in memory at a time: the first stores every norm's output (the targets) on disk, the second
    fits each site as the pass reaches it, on the inputs the already fitted prefix gives it."""
    from normswap.blockwise import LazyWeights, SpillStore, block_paths, capture_outputs
    from normswap.calibration import fit_in_forward, one_batch
    from normswap.conversion import _affine, _replacement
    from normswap.evaluation.progress import progress_bar

    batch = one_batch(batches)
    if batch is None:
        raise NotStreamable("block-wise calibration runs all calibration inputs as one batch; these differ in shape "
                            "(one utterance a batch): convert without --low-memory")
    by_path = {s.path: s for s in sites}
    paths = list(by_path)
    targets = SpillStore()
    bar = progress_bar(len(sites), "calibrating DyT (block-wise)", unit="sites")

    def make(path: str, old: nn.Module, x: torch.Tensor) -> nn.Module:
        site = by_path[path]
        g, b = _affine(old, site)
        new, _ = _replacement(site, "dyt", g, b, False, x, targets.get(path), None, True, result)
        sp.fitted[path] = {"alpha": new.alpha.detach().clone(), "weight": new.weight.detach().clone(), "bias": new.bias.detach().clone()}
        bar.update(1)
        return new

    try:
        with LazyWeights(calib_model, fetch, block_paths(calib_model, paths), device=device, compute=compute, token_wise=sp.token_wise):
            capture_outputs(calib_model, paths, batch, targets)
            fit_in_forward(calib_model, paths, batch, make)
    finally:
        bar.close()
        targets.close()


def _verify(config, cls, converted: nn.Module, compute: "_Computer", folder: Path | None, tokenizer, verify_text, exact: bool, device,
            work_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[dict[str, Any], list[str]]:
    """`normswap.verification.compare` of the source and the output as written in `folder`, block
    by block: the source's outputs on the verification batches go to disk, then the output's are
    compared with them (`folder` None: with the output tensors as `compute` makes them, unwritten).
    Same inputs and figures as the in-memory path's check; also returns what
    the user must know about those inputs (random stand-ins, `conversion._stand_in_warnings`)."""
    from normswap.conversion import _stand_in_warnings, dtype_name
    from normswap.blockwise import LazyWeights, SpillStore, block_paths, compute_dtype
    from normswap.samples import model_inputs
    from normswap.verification import Deviation, _causal, main_output

    original = _meta_model(config, cls, work_dtype)
    sites = list(compute.sp.sites)
    batches = model_inputs(original, tokenizer=tokenizer, text=verify_text, n_tokens=256 if exact else 1024, block=256, batch_size=2,
                           seed=1, what="verification")
    calc = compute_dtype(work_dtype, device)
    written = SafetensorsReader(checkpoint_files(folder)) if folder is not None else None
    written_key = _match_source_keys(converted, written) if written is not None else {}
    outputs = SpillStore()
    try:
        with torch.no_grad():
            with LazyWeights(original, compute.load, block_paths(original, sites), device=device, compute=calc,
                             token_wise=compute.sp.token_wise):
                what = ""
                for i, batch in enumerate(batches):
                    a, what = main_output(original, batch)
                    outputs.put(i, a)
                    del a  # a batch's logits (2 x 256 x 32000 float32 is 66 MB): not held into the next pass
            deviation = Deviation(causal=_causal(original) and "input_ids" in batches[0])

            def fetch(name: str) -> torch.Tensor:
                if written is None:  # the output tensors as computed, in the working dtype
                    return compute(name, work_dtype)
                t = written.get(written_key[name])
                return t.to(work_dtype) if t.is_floating_point() else t

            with LazyWeights(converted, fetch, block_paths(converted, sites), device=device, compute=calc,
                             token_wise=compute.sp.token_wise):
                for i, batch in enumerate(batches):
                    b, _ = main_output(converted, batch)
                    deviation.add(outputs.get(i).to(b.device), b, batch, what)
                    del b  # before the next batch's are computed
    finally:
        outputs.close()
    result = deviation.result()
    result.update(original_dtype=dtype_name(work_dtype), converted_dtype=dtype_name(out_dtype), compute_dtype=dtype_name(calc),
                  blockwise=True)
    return result, _stand_in_warnings(original, tokenizer, batches, None, "verification")


def _plan_sites(model, plan, sites, to, centre, alpha_init, fold, record, sp: _Plan, fold_blocker, drop_mean=False) -> None:
    """The in-memory `_convert_sites` decisions for calibration-free targets, applied to the meta model."""
    from normswap.archs.trace import is_conv1d
    from normswap.conversion import keeps_mean, rmsnorm_verdict
    from normswap.modules import DyT, RMSNorm
    from normswap.record import SiteRecord
    from normswap.surgery.paths import get_module, set_module

    for site in sites:
        old = get_module(model, site.path)
        has_g = getattr(old, "weight", None) is not None
        has_b = getattr(old, "bias", None) is not None
        recenter = site.recenter
        center = to == "rmsnorm" and keeps_mean(plan, site, drop_mean)
        if to == "rmsnorm":
            w, b = has_g, has_b
        else:
            exact, method = False, "alpha-init" if alpha_init is not None else "calibrated-sequential"
            w = b = True
        folded = False
        if fold:
            blocker = fold_blocker(site, plan, model, record.tied_head)
            if blocker is None:
                for r in site.readers:
                    mod = get_module(model, r)
                    if is_conv1d(mod):
                        sp.conv1d.add(r)
                    sp.folds.setdefault(r, []).append(site.path)
                    if b and mod.bias is None:
                        mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype, device="meta"))
                        record.new_biases.append(r)
                folded = True
                w = b = False
            else:
                record.unfolded[site.path] = blocker
        if to == "rmsnorm":
            exact, method = rmsnorm_verdict(site, folded, center)
        with torch.device("meta"):
            if to == "rmsnorm":
                new: nn.Module = RMSNorm(site.dim, site.eps if site.eps is not None else 1e-5, weight=w, bias=b, recenter=recenter,
                                         center=center)
            else:
                new = DyT(site.dim, alpha=alpha_init or 0.5, weight=w, bias=b, recenter=recenter)
        set_module(model, site.path, new)
        # a calibrated alpha is filled in by `_calibrate`
        alpha = float(torch.tensor(float(alpha_init), dtype=torch.float32)) if to == "dyt" and alpha_init is not None else None
        rec = SiteRecord(
            path=site.path, placement=site.placement, type=to, dim=site.dim, eps=site.eps if to == "rmsnorm" else None,
            weight=w, bias=b, recenter=recenter, center=center, folded=folded, exact=exact, method=method, alpha=alpha,
        )
        record.sites.append(rec)
        sp.sites[site.path] = (site, rec, type(old).__name__, has_g, has_b)


class _Computer:
    """Computes each output tensor from the source tensors: in the working dtype (`_Plan.float_dtype`,
    the dtype the in-memory path loads the model in), then cast to the planned output dtype."""

    def __init__(self, model: nn.Module, reader: SafetensorsReader, sp: _Plan):
        self.reader, self.sp = reader, sp
        self.pending: dict[str, torch.Tensor] = {}  # second tensor of a group computed together (a bias)
        self.affines: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.had_bias = {n for n in sp.source_key if n.endswith(".bias")}

    def load(self, name: str) -> torch.Tensor:
        from normswap.integrity import check_values

        key = self.sp.source_key[name]
        t = self.reader.get(key)
        check_values(key, t, self.reader.entries[key][0])  # a conversion of NaN weights is garbage
        if t.is_floating_point() and self.sp.float_dtype != t.dtype:
            t = t.to(self.sp.float_dtype)
        return t

    def centred(self, name: str) -> torch.Tensor:
        """A source tensor as the centred model holds it (before any norm is swapped or folded):
        residual writers centred (`surgery.centre`, as `_group` does), everything else as stored."""
        from normswap.surgery.centre import centre_tensor_

        t = self.load(name)
        path, _, attr = name.rpartition(".")
        if "" in self.sp.centre.get(name, {}):  # a bare parameter writer (ViT's CLS token)
            centre_tensor_(t, -1)
        elif attr in self.sp.centre.get(path, {}):
            centre_tensor_(t, self.sp.centre[path][attr])
        return t

    def affine(self, site: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The site's (g, b): calibrated values where it was fitted, else the norm's own, as an
        explicit scale (Gemma-style norms store w with scale 1 + w)."""
        if site in self.sp.fitted:
            return self.sp.fitted[site]["weight"], self.sp.fitted[site]["bias"]
        if site not in self.affines:
            spec, _, _, has_g, has_b = self.sp.sites[site]
            g = self.load(site + ".weight") if has_g else None
            if g is not None and spec.gain_offset:
                g = spec.gain_offset + g.float()  # as `conversion._affine`
            b = self.load(site + ".bias") if has_b else None
            self.affines[site] = (g, b)
        return self.affines[site]

    def __call__(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        t = self._compute(key, dtype)
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # working -> output dtype, as the in-memory path's final cast
        return t

    def _compute(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        if key in self.pending:
            return self.pending.pop(key)
        path, _, attr = key.rpartition(".")
        sp = self.sp
        if path in sp.sites:
            site, rec, *_ = sp.sites[path]
            g, b = self.affine(path)
            if attr == "alpha":
                return torch.tensor(rec.alpha, dtype=dtype)  # recorded as saved
            if attr == "weight":
                return (g if g is not None else torch.ones(site.dim)).clone()
            return (b if b is not None else torch.zeros(site.dim)).clone()
        if key in sp.centre and "" in sp.centre[key]:  # a bare parameter writer (ViT's CLS token)
            from normswap.surgery.centre import centre_tensor_

            t = self.load(key)
            centre_tensor_(t, -1)
            return t
        if attr in ("weight", "bias") and (path in sp.centre or path in sp.folds):
            weight, bias = self._group(path)
            if attr == "weight":
                if bias is not None:
                    self.pending[path + ".bias"] = bias
                return weight
            return bias
        return self.load(key)

    def _group(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A writer and/or reader linear: centred first (all writers are centred before any fold),
        then each of its norms folded in, in site order (as `normswap.convert` does)."""
        from normswap.surgery.centre import centre_tensor_
        from normswap.surgery.fold import fold_tensors

        sp = self.sp
        weight = self.load(path + ".weight")
        bias = self.load(path + ".bias") if path + ".bias" in self.had_bias else None
        for attr, dim in sp.centre.get(path, {}).items():
            centre_tensor_(weight if attr == "weight" else bias, dim)
        for site in sp.folds.get(path, []):
            g, b = self.affine(site)
            _, rec, *_ = sp.sites[site]
            if rec.type == "dyt" and site not in sp.fitted:  # DyT's affine defaults to (1, 0) where the norm had none
                _, _, _, has_g, has_b = sp.sites[site]
                g = g if has_g else torch.ones(rec.dim)
                b = b if has_b else torch.zeros(rec.dim)
            weight, bias = fold_tensors(weight, bias, g, b, path in sp.conv1d)
        return weight, bias
