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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from normswap.archs.plan import ModelPlan, Site, build_plan
from normswap.blockfit import BLOCK_STEPS
from normswap.calibration import capture as _capture, dyt_error, fit_in_forward, fitted_variant, one_batch
from normswap.devices import device_name
from normswap.errors import NormswapError
from normswap.log import logger
from normswap.modules import VARIANTS, DyT, ElementwiseNorm, FixedNorm, RMSNorm, center_input
from normswap.record import ConversionRecord, SiteRecord
from normswap.audio import subset_names
from normswap.samples import AUDIO_OPTIONS, is_speech, model_inputs
from normswap.surgery.centre import centre_output, writer_target
from normswap.surgery.fold import fold_into_reader
from normswap.surgery.paths import get_module, set_module

Target = Literal["rmsnorm", "dyt", "none"]
TiedHead = Literal["auto", "center-embed", "untie"]
TARGETS = ("rmsnorm", "dyt", "none")
TIED_HEAD_CHOICES = ("auto", "center-embed", "untie")
# How approximate targets are calibrated: "site" fits each norm to the original's output at that
# site (least squares); "e2e" then fits every norm's parameters at once against the original
# model's output (normswap.e2e: KL on logits, hidden states for encoders); "block" instead fits
# each block's norms to the original block's output, one block at a time (normswap.blockfit).
# Nothing but the norms' parameters moves.
CALIBRATIONS = ("site", "e2e", "block")
# `--variant`: the elementwise function a DyT conversion fits at each site ("dyt": tanh, scalar alpha)
VARIANT_CHOICES = ("dyt", *VARIANTS)
# Output dtypes (`--dtype`); "auto" (the default) is the source checkpoint's own floating dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
# The bound `--verify` holds an exact conversion's relative logit deviation to, by output dtype. In
# float32 rounding stays far below 1e-4. In half precision every rewritten (centred, folded) weight
# is rounded once more, to unit roundoff u = 2^-9 (bfloat16) or 2^-11 (float16): measured 0.26-0.7 u
# on GPT-2 models (tests/test_dtype.py, the gpt2 stand-in cast to half); the bound is 8 u.
EXACT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2.0 ** -6, "float16": 2.0 ** -8}


@dataclass
class ConversionResult:
    """What a conversion did and how close the result is to the original."""

    record: ConversionRecord
    seconds: float
    warnings: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> fit errors
    end_to_end: dict[str, Any] | None = None  # `calibrate="e2e"`: the fit's summary (normswap.e2e)
    tokenizer: Any = None
    source: str | None = None
    device: str | None = None  # where calibration and verification ran

    def to_json(self) -> dict[str, Any]:
        """The `--format json` object of `normswap convert`."""
        v = self.verification or {}
        return {
            "source": self.source,
            "target": self.record.target,
            "family": self.record.family,
            "plan": self.record.plan,
            "style": self.record.style,
            "exact": self.record.exact,
            "dtype": self.record.dtype,
            "device": self.device,
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
            "centered_inputs": self.record.centered_inputs,
            "max_abs_diff": v.get("max_abs_diff"),
            "max_rel_diff": v.get("max_rel_diff"),
            "verification": self.verification,
            "end_to_end": self.end_to_end,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def check_options(to: str, *, tied_head: str = "auto", dtype: Any = "auto", alpha_init: float | None = None,
                  calib_tokens: int | None = None, calibrate: str = "site", e2e_steps: int | None = None,
                  e2e_seconds: float | None = None, variant: str = "dyt") -> None:
    """The conversion settings that can be wrong before anything is loaded: one line each."""
    import math

    if to not in TARGETS:
        raise NormswapError(f"unknown target {to!r}: choose one of {', '.join(TARGETS)}")
    if tied_head not in TIED_HEAD_CHOICES:
        raise NormswapError(f"unknown --tied-head {tied_head!r}: choose one of {', '.join(TIED_HEAD_CHOICES)}")
    parse_dtype(dtype)
    # alpha <= 0 makes DyT constant (0) or flips its sign: never a norm's stand-in
    if alpha_init is not None and not (math.isfinite(alpha_init) and alpha_init > 0):
        raise NormswapError(f"--alpha-init must be a positive number, got {alpha_init}")
    if calib_tokens is not None and calib_tokens < 1:
        raise NormswapError(f"--calib-tokens must be positive, got {calib_tokens}")
    if calibrate not in CALIBRATIONS:
        raise NormswapError(f"unknown --calibrate {calibrate!r}: choose one of {', '.join(CALIBRATIONS)}")
    if calibrate != "site" and to == "rmsnorm":
        raise NormswapError(f"--calibrate {calibrate} fits approximate norms (--to dyt or none); --to rmsnorm has nothing to fit")
    if e2e_steps is not None and e2e_steps < 1:
        raise NormswapError(f"--e2e-steps must be positive, got {e2e_steps}")
    if e2e_seconds is not None and not (math.isfinite(e2e_seconds) and e2e_seconds > 0):
        raise NormswapError(f"--e2e-seconds must be a positive number, got {e2e_seconds}")
    if variant not in VARIANT_CHOICES:
        raise NormswapError(f"unknown --variant {variant!r}: choose one of {', '.join(VARIANT_CHOICES)}")
    if variant != "dyt" and to != "dyt":
        raise NormswapError(f"--variant {variant} is an elementwise stand-in for a norm: it goes with --to dyt")
    if variant != "dyt" and alpha_init is not None:
        raise NormswapError(f"--alpha-init sets DyT's constant alpha; --variant {variant} is fitted by least squares: give one of them")


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
    dtype: str | torch.dtype | None = "auto",
    drop_mean: bool = False,
    calib_audio: str | Path | None = None,
    verify_audio: str | Path | None = None,
    calib_audio_subsets: str | list[str] | None = None,
    processor: Any = None,
    plan: str = "auto",
    calibrate: str = "site",
    e2e_steps: int | None = None,
    e2e_seconds: float | None = None,
    device: Any = "auto",
    variant: str = "dyt",
) -> tuple[nn.Module, ConversionResult]:
    """Convert every norm of `model` (a loaded model, a local folder or a Hub id) to `to`.

    The input model object is modified in place and returned (load it again to keep the original);
    a path is loaded fresh and never written to. Original and converted outputs are always compared
    on sample inputs: 1024 tokens for approximate conversions and with `verify`, 256 for a
    conversion exact by construction, whose check this is.

    `dtype` is the output's floating dtype: "auto" (the source's own: the dominant floating dtype
    of its stored tensors, or of a given model's parameters), "float32", "bfloat16" or "float16".
    The surgery works on the source's values exactly (see `resolve_dtypes`), does its maths in
    float64 and rounds each result once to the output dtype; DyT calibration and verification of
    a half-precision model on CPU run in float32 arithmetic.

    `calibrate="e2e"` (DyT and none) follows the per-site start (or `alpha_init`) with a fit of
    every norm parameter against the original's outputs on the calibration data
    (`normswap.e2e.fit_end_to_end`): `e2e_steps` Adam steps at most (default `E2E_STEPS`), within
    `e2e_seconds` if given. `calibrate="block"` follows it instead with block-local fits
    (`normswap.blockfit.fit_blocks`): `e2e_steps` steps per block (default `BLOCK_STEPS`), all
    within `e2e_seconds` if given. Nothing but the norms' parameters changes.

    `variant` (with `to="dyt"`) picks the elementwise function each site is fitted with, by the
    same least squares: "dyt" (g * tanh(alpha x) + b), or a key of `normswap.modules.VARIANTS`
    ("dyisru": g * u / sqrt(1 + u^2) with u = alpha x, the best measured start on SmolLM2;
    per-channel alphas; Derf's erf). The record names each site's variant, so it loads back.

    `device` is where the model runs for calibration and verification ("auto": the first
    accelerator, else the CPU; `normswap.devices`); the surgery's float64 maths runs on whichever
    device holds each tensor. The converted model is returned on that device.

    `plan` is where the norm sites come from (`archs.plan.build_plan`): "auto" (the family table,
    cross-checked by discovery; discovery where there is no table), "table" or "discover".

    The result is always compared with the original (`verification`); a conversion that claims to
    be exact and is not within `EXACT_TOLERANCE` is an error, so nothing approximate passes as exact.

    Calibration or verification text needs a tokenizer: text with none is an error. Without text
    and without a tokenizer (tiny test models), seeded random token ids stand in, with a warning.

    Where a Pre-LN stream cannot be centred (or nothing is known of the model), `--to rmsnorm`
    keeps LayerNorm's function at the sites reading it (an RMSNorm of the mean-subtracted input,
    exact); `drop_mean` swaps in plain RMSNorm there instead, which is approximate and measured.

    Speech models (Whisper) take audio instead of text: `calib_audio` / `verify_audio` are folders
    of audio files (`normswap.audio`), turned into features by the checkpoint's processor, with
    decoder inputs teacher-forced from their transcripts (`normswap.samples.speech_batches`). DyT
    calibration of a speech model with a processor needs `calib_audio`; verification without
    audio runs on seeded random features, with a warning.
    """
    from normswap import __version__
    from normswap.loading import check_source, load_config, load_pretrained, load_tokenizer

    from normswap.devices import resolve_device

    t0 = time.perf_counter()
    check_options(to, tied_head=tied_head, dtype=dtype, alpha_init=alpha_init, calib_tokens=calib_tokens, calibrate=calibrate,
                  e2e_steps=e2e_steps, e2e_seconds=e2e_seconds, variant=variant)
    device = resolve_device(device)
    calib_audio_subsets = subset_names(calib_audio_subsets, "--calib-audio-subsets")
    if calib_text is not None and not calib_text.strip():
        raise NormswapError("calibration text is empty")
    source = None
    if isinstance(model, (str, Path)):
        source = str(model)
        local = check_source(source)
        config = load_config(source, revision=revision, trust_remote_code=trust_remote_code) if local is None else None
        out_dtype, work_dtype, dtype_warnings = resolve_dtypes(dtype, source=local, config=config)
        if tokenizer is None:
            tokenizer = load_tokenizer(source, revision=revision, trust_remote_code=trust_remote_code)
        _check_texts(source, tokenizer, calib_text, verify_text)  # before the weights are loaded
        model = load_pretrained(source, revision=revision, trust_remote_code=trust_remote_code, dtype=work_dtype)
        if processor is None and is_speech(model):
            processor = _speech_processor(source, required=calib_audio is not None or verify_audio is not None)
    else:
        out_dtype, work_dtype, dtype_warnings = resolve_dtypes(dtype, model=model)
        _check_texts(type(model).__name__, tokenizer, calib_text, verify_text)
    # one working dtype for every stored tensor (from_pretrained keeps some modules in float32)
    cast_floats(model, work_dtype)
    model.to(device)
    model.eval()
    plan_source = plan
    plan, sites, warnings, centre = plan_conversion(model, to, drop_mean, plan_source)
    warnings = dtype_warnings + warnings
    # A second copy of the model only where the conversion needs the original itself: end-to-end
    # calibration's teacher, and the float32 re-check of an exact half-precision RMSNorm conversion.
    # Verification compares with the original's outputs, computed below before anything changes.
    keep_original = calibrate != "site" or (to == "rmsnorm" and out_dtype != torch.float32)
    original = copy.deepcopy(model) if keep_original else None
    # An exact-by-construction conversion (centred LayerNorm, or an RMSNorm kept or folded) is
    # checked on a short sample (256 tokens, one utterance); an approximate one, or any with
    # `verify`, is measured on 1024 tokens (four utterances), the figure the user reads.
    by_construction = to == "rmsnorm" and all(rmsnorm_verdict(s, False, keeps_mean(plan, s, drop_mean))[0] for s in sites)
    verify_tokens = 256 if by_construction and not verify else 1024
    record = ConversionRecord(
        target=to, base_model_type=plan.model_type, architecture=type(model).__name__,
        family=plan.family_name, style=plan.style, exact=False, plan=plan.source,
        source=getattr(model.config, "_normswap_source", None) or {"model": source, "revision": revision},
        version=__version__, dtype=dtype_name(out_dtype),
    )
    # every conversion is measured on inputs the model accepts, against the original's outputs on
    # them, computed now (kept on disk), before anything changes
    from normswap.verification import Reference

    audio = verify_audio if verify_audio is not None else calib_audio
    verify_batches = model_inputs(model, tokenizer=tokenizer, processor=processor, text=verify_text, audio=audio, n_tokens=verify_tokens,
                                  block=256, batch_size=2, seed=1, what="verification", teacher=model,
                                  audio_subsets=calib_audio_subsets if verify_audio is None else None)
    reference = Reference(model, verify_batches)
    with torch.no_grad():
        if centre:
            record.tied_head = _centre_stream(model, plan, tied_head, record)
        elif keeps_rmsnorm(plan, to):
            record.tied_head = _untie_for_fold(model, plan, tied_head, fold, warnings)
        calib_batches = None
        if to == "none" or to == "dyt" and (alpha_init is None or calibrate != "site"):
            if is_speech(model) and processor is not None and calib_audio is None:
                raise NormswapError(f"DyT calibration of {type(model).__name__} needs speech to fit on: give --calib-audio DIR "
                                    "(audio files, with a transcripts.tsv for teacher-forced decoder inputs)")
            # the centred model computes the original's function: it decodes folders without transcripts
            calib_batches = model_inputs(model, tokenizer=tokenizer, processor=processor, text=calib_text, audio=calib_audio,
                                         n_tokens=calib_tokens, what="calibration", teacher=model, audio_subsets=calib_audio_subsets)
            warnings += _stand_in_warnings(model, tokenizer, calib_batches, calib_audio, "calibration")
        result = ConversionResult(record, 0.0, warnings, tokenizer=tokenizer, source=source, device=device_name(device))
        from normswap.verification import float32_compute

        # Calibration runs the model: half precision on CPU runs it upcast to float32 (exactly; the
        # sites' new parameters are then rounded once, to the output dtype, below).
        with float32_compute(model, *([original] if calibrate != "site" else []), enabled=calib_batches is not None):
            e2e = None
            if calibrate != "site" and calib_batches is not None:
                from normswap.e2e import e2e_batches, long_blocks

                # the fit's own batches: long blocks for causal LMs (attention over a long context is part of the fit)
                fit_batches = (e2e_batches(model, tokenizer=tokenizer, text=calib_text, n_tokens=calib_tokens) if long_blocks(model)
                               else calib_batches)
                e2e = {"mode": calibrate, "original": original, "batches": fit_batches, "seconds": e2e_seconds,
                       "steps": e2e_steps or (E2E_STEPS if calibrate == "e2e" else BLOCK_STEPS)}
            _convert_sites(model, plan, sites, to, centre, calib_batches, sequential, alpha_init, fold, record, result, drop_mean, e2e,
                           variant)
    cast_floats(model, out_dtype)
    model.config.dtype = out_dtype
    for s in record.sites:  # the values as saved
        if s.alpha is not None:
            s.alpha = float(get_module(model, s.path).alpha.detach())  # a scalar alpha (per-channel ones: the weights file)
        if s.type == "none":  # an unfolded fixed scale, as rounded to the output dtype
            s.scale = float(get_module(model, s.path).scale.detach())
    record.exact = to == "rmsnorm" and bool(record.sites) and all(s.exact for s in record.sites)
    if record.tied_head and "untie" == record.tied_head:
        model.config.tie_word_embeddings = False
    warnings += _stand_in_warnings(model, tokenizer, verify_batches, audio, "verification")
    if verify_audio is None and calib_audio is not None:
        warnings.append("verification ran on the calibration audio (another seeded draw of it): give --verify-audio for held-out speech")
    try:
        result.verification = reference.compare(model)
    finally:
        reference.close()
    tolerance = EXACT_TOLERANCE[dtype_name(out_dtype)]
    result.verification["exact_tolerance"] = tolerance
    deviation = result.verification["max_rel_diff"]
    if record.exact and deviation > tolerance and out_dtype != torch.float32:
        # Half-precision weights round every rewritten value once; on stand-in inputs (random
        # features) that rounding can exceed the bound measured on text. The claim is about the
        # maths, so it is checked on the same conversion in float32 (which raises if it fails).
        source_f32 = original  # kept for this check (see keep_original)
        cast_floats(source_f32, torch.float32)
        _, exact32 = convert_model(source_f32, to, fold=fold, tied_head=tied_head, tokenizer=tokenizer, verify_text=verify_text,
                                   dtype="float32", drop_mean=drop_mean, verify_audio=audio, processor=processor, plan=plan_source,
                                   device=device)
        result.verification["float32_max_rel_diff"] = exact32.verification["max_rel_diff"]
        warnings.append(half_rounding_note(out_dtype, deviation, tolerance, exact32.verification["max_rel_diff"]))
        deviation = 0.0
    del original
    # the verdict `--verify` reports: half-precision rounding explained above counts as within
    result.verification["within_bound"] = deviation <= tolerance
    if record.exact and deviation > tolerance:
        raise NormswapError(
            f"the conversion claims to be exact, but its {result.verification['output']} differ from the original's by "
            f"{result.verification['max_rel_diff']:.3g} (relative; the bound is {tolerance:g} in {dtype_name(out_dtype)}): nothing "
            f"is saved. The plan ({plan.source}) is wrong for this model: `normswap inspect` shows it; --plan discover or "
            f"--drop-mean are the ways round it")
    result.seconds = time.perf_counter() - t0
    from normswap.carry import attach

    # The model carries its record (every save path writes a normswap checkpoint) and is known by
    # no folder until it is saved: never by the original's name, which would rebuild LayerNorm.
    local = source is not None and Path(source).is_dir()
    attach(model, record, name_or_path="", tokenizer=tokenizer, processor=processor, aux_from=source if local else None)
    return model, result


# ------------------------------------------------------------------------------------------ dtypes


def half_rounding_note(out_dtype: torch.dtype, deviation: float, tolerance: float, float32_deviation: float) -> str:
    """What an exact half-precision conversion over its bound says, once the same conversion in
    float32 has shown the maths exact."""
    return (f"the {dtype_name(out_dtype)} output differs from the original by {deviation:.3g} on these inputs, above the {tolerance:g} "
            f"bound measured on text: that is the rounding of the rewritten weights to {dtype_name(out_dtype)}; the same conversion "
            f"in float32 differs by {float32_deviation:.2g} (--dtype float32 keeps it)")


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a dtype: "bfloat16" for torch.bfloat16."""
    return str(dtype).replace("torch.", "")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """An output dtype choice: None for "auto" (or None), else one of DTYPES' values."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise NormswapError(f"unknown --dtype {str(dtype)[:40]!r}: choose one of {', '.join(DTYPE_CHOICES)}")


def stored_float_dtypes(folder: str | Path) -> dict[torch.dtype, int]:
    """Element counts of a local checkpoint folder's floating tensors by dtype, from the
    (validated) safetensors headers alone."""
    from normswap.integrity import read_checkpoint, weight_files

    folder = Path(folder)
    files, weight_map = weight_files(folder, any_name=True)
    counts: dict[torch.dtype, int] = {}
    for h in read_checkpoint(files, weight_map, folder / "model.safetensors.index.json"):
        for t in h.tensors.values():
            if t.torch_dtype.is_floating_point:
                counts[t.torch_dtype] = counts.get(t.torch_dtype, 0) + math.prod(t.shape)
    return counts


def _model_float_dtypes(model: nn.Module) -> dict[torch.dtype, int]:
    counts: dict[torch.dtype, int] = {}
    seen: set[int] = set()
    for t in model.state_dict(keep_vars=True).values():
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return counts


def dominant_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype most of a model's weights are in (by element count; float32 if none)."""
    counts = _model_float_dtypes(model)
    return max(counts, key=counts.get) if counts else torch.float32


def _config_dtype(config: Any) -> torch.dtype | None:
    v = getattr(config, "dtype", None)
    if v is None and "torch_dtype" in getattr(config, "__dict__", {}):
        v = config.__dict__["torch_dtype"]
    if isinstance(v, str):
        v = getattr(torch, v.removeprefix("torch."), None)
    return v if isinstance(v, torch.dtype) and v.is_floating_point else None


def resolve_dtypes(dtype: str | torch.dtype | None, *, source: str | Path | None = None, model: nn.Module | None = None,
                   config: Any = None) -> tuple[torch.dtype, torch.dtype, list[str]]:
    """(output dtype, working dtype, warnings) of a conversion.

    The source's dtypes are those of its stored tensors (a local folder's safetensors headers, or
    a loaded `model`'s parameters), else its config's `dtype` / `torch_dtype` (a Hub id), else
    unknown (float32). "auto" picks the dominant one (by element count); a dtype outside DTYPES
    (float64...) gives float32 with a warning. A source that mixes dtypes is saved all in the
    dominant one, with a warning naming the share that is rounded.

    The working dtype, in which the model is loaded and the surgery rounds its float64 results,
    holds every source value exactly: the output dtype where every stored floating tensor already
    has it (each result is then rounded once), float32 otherwise (then cast to the output dtype
    at the end). The in-memory and streaming paths both follow it, so they give the same bits.
    """
    want = parse_dtype(dtype)
    counts = _model_float_dtypes(model) if model is not None else stored_float_dtypes(source) if source is not None else {}
    if not counts and config is not None and _config_dtype(config) is not None:
        counts = {_config_dtype(config): 1}
    warnings: list[str] = []
    stored = max(counts, key=counts.get) if counts else None
    out = want
    if out is None:
        out = stored if stored in DTYPES.values() else torch.float32
        if stored is not None and stored not in DTYPES.values():
            warnings.append(f"the source's weights are {dtype_name(stored)}: the output is float32 (choose with --dtype)")
        lossy = [d for d in counts if d != out and not (out == torch.float32 and d in (torch.bfloat16, torch.float16))]
        if stored in DTYPES.values() and lossy:
            total = sum(counts.values())
            parts = ", ".join(f"{100 * counts[d] / total:.2g}% {dtype_name(d)}" for d in lossy)
            warnings.append(f"the source mixes floating dtypes: its {parts} weights are rounded to {dtype_name(out)} "
                            f"(--dtype float32 keeps every value)")
    work = out if counts and set(counts) == {out} else torch.float32
    return out, work, warnings


def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter and persistent buffer (what is saved) to `dtype` in place,
    keeping tied parameters tied; non-persistent buffers (RoPE frequencies...) are left as built."""
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype and name not in m._non_persistent_buffers_set:
                m._buffers[name] = b.to(dtype)


def _check_texts(where: str, tokenizer: Any, calib_text: str | None, verify_text: str | None) -> None:
    """Text given for a model without a tokenizer is an error, not random token ids."""
    if tokenizer is None and (calib_text is not None or verify_text is not None):
        what = "calibration text (--calib-text)" if calib_text is not None else "verification text (--verify-text)"
        raise NormswapError(f"{where} has no tokenizer (no tokenizer.json, vocab or tokenizer_config.json file): cannot "
                            f"tokenise the {what}; add the tokenizer files to the model folder")


def _stand_in_warnings(model: nn.Module, tokenizer: Any, batches: list[dict[str, torch.Tensor]], audio: Any, what: str) -> list[str]:
    """What the user must know when seeded random inputs stood in for real data."""
    if is_speech(model) and audio is None:
        return [f"{what} used random features and decoder ids (no {AUDIO_OPTIONS[what]} given): the deviation is measured on noise, "
                "not speech"]
    if bool(batches) and "pixel_values" in batches[0]:
        return [f"{what} used seeded random images (normswap reads no image data yet): the deviation is measured on noise, not images"]
    if tokenizer is None and bool(batches) and "input_ids" in batches[0]:
        if what == "calibration":
            return ["calibration used random token ids: the model has no tokenizer (give its folder tokenizer files for a fit on real text)"]
        return ["verification used random token ids: the model has no tokenizer (the deviation is not measured on real text)"]
    return []


def _speech_processor(source: str, *, required: bool) -> Any:
    """The checkpoint's speech processor; None where it has none (tiny test models) unless audio
    was given, which needs it (then the reason it cannot be loaded is the error)."""
    from normswap.evaluation.asr import load_processor

    try:
        return load_processor(source)
    except NormswapError:
        if required:
            raise
        return None


def plan_conversion(model: nn.Module, to: str, drop_mean: bool = False, source: str = "auto") -> tuple[ModelPlan, list[Site], list[str], bool]:
    """The sites to convert, warnings for the user, and whether the stream gets centred (exact
    Pre-LN treatment); shared by the in-memory and streaming paths."""
    plan = build_plan(model, source)
    sites = _sites_to_convert(model, plan, to)
    warnings: list[str] = []
    if plan.source == "generic":
        warnings += plan.notes  # why discovery could not run
        if to == "rmsnorm" and not drop_mean:
            warnings.append(f"unknown architecture {plan.model_type!r}: normswap cannot centre its stream, so each LayerNorm becomes "
                            f"an RMSNorm of the mean-subtracted input (LayerNorm's own function: exact, but no cheaper) and nothing "
                            f"is folded; --drop-mean swaps in plain RMSNorm instead (approximate, measured)")
        else:
            warnings.append(f"unknown architecture {plan.model_type!r}: every nn.LayerNorm is swapped, nothing is folded and "
                            f"nothing is exact (the deviation is measured)")
    elif to == "rmsnorm":
        kept: dict[str, list[str]] = {}
        for s in sites:
            if s.keep_mean:
                kept.setdefault(s.note, []).append(s.path)
        for why, paths in kept.items():
            how = "become plain RMSNorms (--drop-mean: approximate, measured)" if drop_mean else \
                "keep LayerNorm's mean subtraction (exact, not cheaper)"
            warnings.append(f"{len(paths)} site(s) {how}, e.g. {paths[0]}: {why}")
    if plan.other_norms:
        listed = "; ".join(f"{p} ({why})" for p, why in list(plan.other_norms.items())[:4])
        more = f"; and {len(plan.other_norms) - 4} more" if len(plan.other_norms) > 4 else ""
        warnings.append(f"norms left unchanged: {listed}{more}")
    centre = centres_stream(plan)
    return plan, sites, warnings, centre


def centres_stream(plan: ModelPlan) -> bool:
    """Whether conversion centres the residual writers: some LayerNorm reads a centrable Pre-LN stream."""
    return any(s.centred for s in plan.sites)


def fold_blockers(model: nn.Module, plan: ModelPlan, tied_head: str = "auto") -> dict[str, str | None]:
    """Per site, why `--to rmsnorm --fold` with this `--tied-head` would keep its affine (None: it
    folds), without changing the model (for `normswap inspect`)."""
    mode = None
    if centres_stream(plan):
        mode = tied_mode(model, plan, tied_head)
    elif keeps_rmsnorm(plan, "rmsnorm") and plan.tied_embedding is not None and tied_head == "untie":
        mode = "untie"
    return {s.path: _fold_blocker(s, plan, model, mode) for s in plan.sites}


def _sites_to_convert(model: nn.Module, plan: ModelPlan, to: str) -> list[Site]:
    if not plan.sites:
        raise NormswapError(f"{type(model).__name__} has no LayerNorm: nothing to convert")
    if to == "rmsnorm":
        sites = [s for s in plan.sites if s.kind == "layernorm"]
        if not sites and keeps_rmsnorm(plan, to):
            # Llama, Gemma...: each norm becomes normswap's RMSNorm (the same function), whose gain
            # --fold moves into the readers (design notes 2.5)
            sites = [s for s in plan.sites if s.kind == "rmsnorm"]
        if not sites:
            raise NormswapError(f"{type(model).__name__} already uses RMSNorm: nothing to convert to rmsnorm (try --to dyt)")
        return sites
    return list(plan.sites)


def keeps_rmsnorm(plan: ModelPlan, to: str) -> bool:
    """`--to rmsnorm` on a model whose norms already are RMSNorm (Llama...): no centring, the gains fold."""
    return to == "rmsnorm" and plan.known and plan.norm_kind == "rmsnorm"


def keeps_mean(plan: ModelPlan, site: Site, drop_mean: bool) -> bool:
    """Whether the site's RMSNorm subtracts its input's mean (LayerNorm semantics): a LayerNorm on a
    Pre-LN stream that cannot be centred, or of a model nothing is known of (`Site.keep_mean`),
    unless `drop_mean`."""
    return site.keep_mean and site.kind == "layernorm" and not drop_mean


def rmsnorm_verdict(site: Site, folded: bool, center_input: bool = False) -> tuple[bool, str]:
    """(exact, method) of a site converted to normswap's RMSNorm; shared with the streaming path
    and `normswap inspect`.

    A LayerNorm is exact where the stream it reads is centred (`Site.centred`, Pre-LN). An RMSNorm
    (Llama, Gemma...) keeps its function whatever happens to its gain: kept in the norm
    ("keep-gain"), or moved into the reader linears ("fold-gain", W <- W diag(g), design notes 2.5).
    An RMSNorm that subtracts its input's mean (`center_input`, see `keeps_mean`) is LayerNorm
    itself ("layernorm-semantics")."""
    if site.kind == "rmsnorm":
        return True, "fold-gain" if folded else "keep-gain"
    if center_input:
        return True, "layernorm-semantics"
    exact = site.centred
    return exact, "exact" if exact else "approximate"


def _untie_for_fold(model: nn.Module, plan: ModelPlan, tied_head: str, fold: bool, warnings: list[str]) -> str | None:
    """RMSNorm families (nothing is centred): a head tied to the token embedding keeps the tie, and
    the final norm its gain (the shared table cannot absorb it), unless `--tied-head untie` gives
    the head its own copy (+ vocab x d parameters) for the gain to fold into. Returns the record's
    tied_head."""
    if plan.tied_embedding is None:
        return None
    if tied_head == "center-embed":
        warnings.append(f"--tied-head center-embed centres embedding lookups of LayerNorm models; {plan.model_type} needs no "
                        f"centring: the head stays tied and the final norm keeps its gain (--tied-head untie folds it)")
    if tied_head != "untie":
        return None
    if not fold:
        warnings.append("--tied-head untie without --fold: nothing would fold into the copy, so the head stays tied")
        return None
    head = get_module(model, plan.head)
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return "untie"


def tied_writers(model: nn.Module, plan: ModelPlan) -> list[str]:
    """The stream writers whose weight is the LM head's (the token lookups of a tied head; BART's
    encoder and decoder lookups share it too)."""
    if plan.head is None or plan.tied_embedding is None:
        return []
    weight = getattr(get_module(model, plan.head), "weight", None)
    return [p for p in plan.embed_writers + plan.writers
            if isinstance(t := writer_target(model, p), nn.Module) and getattr(t, "weight", None) is weight]


def tied_mode(model: nn.Module, plan: ModelPlan, tied_head: str) -> str | None:
    """How a centring conversion treats a tied head: "center-embed" or "untie" where a tied lookup
    writes the stream; "untie" on request otherwise, so the final norm can fold; None: untouched."""
    if plan.tied_embedding is None:
        return None
    if tied_writers(model, plan):
        return "center-embed" if tied_head == "auto" else tied_head
    return "untie" if tied_head == "untie" else None


def _centre_stream(model: nn.Module, plan: ModelPlan, tied_head: str, record: ConversionRecord) -> str | None:
    """Centre every residual writer; return how a tied head was handled (None if not tied)."""
    from normswap.modules import centre_lookups

    mode = tied_mode(model, plan, tied_head)
    tied = tied_writers(model, plan)
    if mode == "untie":
        # Centring the shared table would change the logits by a per-token term: the head gets its
        # own copy (+ vocab x d parameters) ...
        head = get_module(model, plan.head)
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    elif mode == "center-embed":
        # ... or the lookups are centred on the fly, and the table stays as it is
        for path in tied:
            centre_lookups(get_module(model, path))
            record.centered_embeddings.append(path)
    for path in plan.embed_writers + plan.writers:
        if path not in record.centered_embeddings:
            centre_output(writer_target(model, path))
    for path in plan.centred_inputs:  # a stream start no weight change can centre (Whisper's encoder)
        center_input(get_module(model, path))
        record.centered_inputs.append(path)
    return mode


def _fold_blocker(site: Site, plan: ModelPlan, model: nn.Module, tied_mode: str | None) -> str | None:
    """Why this site's affine cannot move into its readers (None if it can): the plan's structural
    reason, else a head tied to the token embedding that `tied_mode` leaves shared."""
    if site.blocker is not None:
        return site.blocker
    if plan.head in site.readers and plan.tied_embedding is not None and tied_mode != "untie":
        return "the LM head shares its weight with the token embedding (--tied-head untie folds it)"
    return None


def _convert_sites(model, plan, sites, to, centre, calib_batches, sequential, alpha_init, fold, record, result, drop_mean=False,
                   e2e: dict[str, Any] | None = None, variant: str = "dyt") -> None:
    """Swap every site's norm for its replacement (calibrated on `calib_batches` where the target
    is approximate), fit them end to end if asked (`e2e`), then fold the affines into the readers
    where that is exact. Folding is exact, so the later sites of a sequential calibration see the
    same inputs either way; it comes last so that every calibrated parameter is still on its norm
    until then."""
    targets_y = inputs_x = None
    if calib_batches is not None:
        # Targets: the original norms' outputs (centring is exact, so the centred model gives them).
        targets_y = _capture(model, [s.path for s in sites], calib_batches, "output")
        if not sequential:
            inputs_x = _capture(model, [s.path for s in sites], calib_batches, "input")
    from normswap.evaluation.progress import progress_bar

    # Calibrating Whisper's 34 sites on 8k tokens takes minutes: say how far it is.
    bar = progress_bar(len(sites), f"calibrating {TARGET_NAMES[to]}", unit="sites") if calib_batches is not None else None

    def build(site: Site, old: nn.Module, x: torch.Tensor | None) -> tuple:
        """One site's replacement (cast to the norm's dtype and device), from its input `x`."""
        g, b = _affine(old, site)
        center = keeps_mean(plan, site, drop_mean) if to == "rmsnorm" else to == "none" and _uncentred(site)
        y = targets_y[site.path] if targets_y is not None else None
        new, method = _replacement(site, to, g, b, center, x, y, alpha_init, sequential, result, variant)
        ref = next(old.parameters(), None)
        # the affine as built (float32, holding the source's values exactly, Gemma's 1 + w too):
        # folding rounds its float64 product once, to the reader's dtype, as the streaming path does
        affine = _foldable_affine(new, to, ref)
        if ref is not None:
            new = new.to(dtype=ref.dtype, device=ref.device)
        if bar is not None:
            bar.update(1)
        return new, method, center, affine

    by_path = {s.path: s for s in sites}
    stacked = one_batch(calib_batches) if calib_batches is not None and sequential else None
    if stacked is not None:
        # Sequential calibration in one pass: each site is fitted as the pass reaches it (see
        # `calibration.fit_in_forward`), on the inputs the converted prefix gives it.
        made: dict[str, tuple] = {}

        def make(path: str, old: nn.Module, x: torch.Tensor) -> nn.Module:
            made[path] = build(by_path[path], old, x)
            return made[path][0]

        fit_in_forward(model, list(by_path), stacked, make)
        built = [(site, *made[site.path]) for site in sites]
        for site, new, *_ in built:
            set_module(model, site.path, new)
    else:
        built = []
        for site in sites:
            x = None
            if calib_batches is not None:
                x = inputs_x[site.path] if inputs_x is not None else _capture(model, [site.path], calib_batches, "input")[site.path]
            entry = build(site, get_module(model, site.path), x)
            set_module(model, site.path, entry[0])
            built.append((site, *entry))
    if bar is not None:
        bar.close()
    if e2e is not None:
        fitted = _fit_norms(model, e2e, result)
        # the fitted values are what folds now
        built = [(site, new, f"{method}+{e2e['mode']}", center, _foldable_affine(new, to, next(new.parameters(), None)))
                 if site.path in fitted else (site, new, method, center, affine) for site, new, method, center, affine in built]
    for site, new, method, center, affine in built:
        _fold_site(model, plan, site, new, method, center, affine, to, fold, record)


def _fit_norms(model: nn.Module, e2e: dict[str, Any], result: ConversionResult) -> set[str]:
    """The fit after the per-site start (`e2e["mode"]`: "e2e" or "block"); its summary goes to
    `result.end_to_end`. Returns the paths of the sites whose values it changed (none where a fit
    was reverted)."""
    if e2e["mode"] == "e2e":
        from normswap.e2e import fit_end_to_end

        with torch.enable_grad():
            summary = fit_end_to_end(model, e2e["original"], e2e["batches"], steps=e2e["steps"], time_budget_s=e2e["seconds"])
        logger.info("end-to-end calibration: %s %.4g -> %.4g in %d steps (%.0f s)%s", summary["objective"], summary["loss_before"],
                    summary["loss_after"], summary["steps"], summary["seconds"], ", reverted: it did not improve" if summary["reverted"] else "")
    else:
        from normswap.blockfit import fit_blocks

        summary = fit_blocks(model, e2e["original"], e2e["batches"], steps=e2e["steps"], time_budget_s=e2e["seconds"])
        logger.info("block calibration: mean unit loss %.4g -> %.4g over %d units (%.0f s), %d kept their start", summary["loss_before"],
                    summary["loss_after"], summary["units"], summary["seconds"], len(summary["reverted"]))
    result.end_to_end = summary
    return set(summary["fitted_sites"])


# End-to-end calibration's default step budget (`calibrate="e2e"`): see docs/results/calibration-ablation.
E2E_STEPS = 200

# The targets' names in progress lines and messages.
TARGET_NAMES = {"rmsnorm": "RMSNorm", "dyt": "DyT", "none": "fixed scales"}


def _uncentred(site: Site) -> bool:
    """A LayerNorm whose input keeps its mean (Post-LN, or a stream that cannot be centred): its
    fixed-scale replacement subtracts the mean itself, a linear map that stays exact."""
    return site.kind == "layernorm" and not site.centred


def _replacement(site: Site, to: str, g, b, center: bool, x, y, alpha_init, sequential, result,
                 variant: str = "dyt") -> tuple[nn.Module, str]:
    """The new module for one site, with its values (unfolded), and how they were obtained."""
    dim = site.dim
    if to == "rmsnorm":
        new: nn.Module = RMSNorm(dim, site.eps if site.eps is not None else 1e-5, weight=g is not None, bias=b is not None,
                                 recenter=site.recenter, center=center)
        if g is not None:
            new.weight.data.copy_(g)
        if b is not None:
            new.bias.data.copy_(b)
        return new, ""
    g0 = g if g is not None else torch.ones(dim)
    b0 = b if b is not None else torch.zeros(dim)
    if to == "none":
        # The norm's own scale, frozen: y = g * x / s + b with s the average RMS it divided by.
        scale = average_rms(x, site.eps if site.eps is not None else 1e-5, center=site.kind == "layernorm")
        new = FixedNorm(dim, scale, recenter=site.recenter, center=center)
        new.weight.data.copy_(g0)
        new.bias.data.copy_(b0)
        result.calibration[site.path] = {"scale": scale, "rel_error": fixed_scale_error(scale, center, g0, b0, x, y)}
        return new, "average-rms"
    new = DyT(dim, recenter=site.recenter)
    if alpha_init is not None:
        # The DyT paper's constant alpha, keeping the pretrained affine (g=1, b=0 would
        # throw the checkpoint's scale and shift away).
        new.alpha.data.fill_(alpha_init)
        new.weight.data.copy_(g0)
        new.bias.data.copy_(b0)
        return new, "alpha-init"
    # DyT, or the elementwise `variant` (normswap.modules.VARIANTS), fitted by least squares
    new, fit = fitted_variant(variant, x, y, dim, recenter=site.recenter)
    result.calibration[site.path] = {"rel_error": fit.rel_error, "rel_error_alpha_0.5": dyt_error(0.5, g0, b0, x, y)}
    return new, "calibrated-sequential" if sequential else "calibrated"


def average_rms(x: torch.Tensor, eps: float, *, center: bool) -> float:
    """The scale a norm divides by, averaged over the tokens of `x` [N, d]: mean_t sqrt(var_t + eps),
    var_t taken about the token's mean (`center`, LayerNorm) or about zero (RMSNorm). On a centred
    Pre-LN stream the two agree."""
    x = x.double()
    if center:
        x = x - x.mean(-1, keepdim=True)
    return float(torch.sqrt(x.pow(2).mean(-1) + eps).mean())


def fixed_scale_error(scale: float, center: bool, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative RMS error of the fixed-scale map g * x / s + b against the norm's outputs `y`."""
    x = x.double()
    if center:
        x = x - x.mean(-1, keepdim=True)
    pred = x / scale * weight.double() + bias.double()
    return math.sqrt(float(((pred - y.double()) ** 2).mean()) / max(float(y.double().pow(2).mean()), 1e-30))


def _foldable_affine(new: nn.Module, to: str, ref: torch.Tensor | None) -> list[torch.Tensor | None]:
    """(weight, bias) that folding moves into the readers, on the readers' device. A fixed scale is
    part of the weight (g / s, in float64 so that it rounds once when folded)."""
    if to == "none":
        affine = [new.weight.detach().double() / new.scale.detach().double(), new.bias.detach()]
    else:
        affine = [None if p is None else p.detach() for p in (new.weight, new.bias)]
    return [None if p is None else p.to(device=ref.device if ref is not None else p.device) for p in affine]


def _fold_site(model, plan, site: Site, new: nn.Module, method: str, center: bool, affine, to: str, fold: bool, record) -> None:
    """Move the site's affine into its readers where that is exact and record the site as built.
    A folded `none` site leaves nothing (nn.Identity)."""
    built_scale = float(new.scale.detach()) if to == "none" else None
    folded = False
    exact = False
    if fold:
        blocker = _fold_blocker(site, plan, model, record.tied_head)
        if blocker is None and to == "none" and (new.center or new.recenter):
            blocker = "its mean subtraction sits between the norm and its readers"  # never reached: such sites are the stream
        if blocker is None:
            for reader in site.readers:
                if fold_into_reader(get_module(model, reader), *affine):
                    record.new_biases.append(reader)
            if to == "none":
                new = nn.Identity()
                set_module(model, site.path, new)
            else:
                new.weight = None
                new.bias = None
            folded = True
        else:
            record.unfolded[site.path] = blocker
    if to == "rmsnorm":
        exact, method = rmsnorm_verdict(site, folded, center)
    alpha = float(new.alpha) if isinstance(new, (DyT, ElementwiseNorm)) and new.alpha.dim() == 0 else None
    scale = float(built_scale) if to == "none" else None
    kind = "identity" if isinstance(new, nn.Identity) else new.variant if isinstance(new, ElementwiseNorm) else to
    record.sites.append(SiteRecord(
        path=site.path, placement=site.placement, type=kind, dim=site.dim, eps=site.eps if to == "rmsnorm" else None,
        weight=getattr(new, "weight", None) is not None, bias=getattr(new, "bias", None) is not None, recenter=site.recenter,
        center=center, folded=folded, exact=exact, method=method, alpha=alpha, scale=scale,
    ))
    logger.debug("%s -> %s (%s%s)", site.path, kind, method, ", folded" if folded else "")


def _affine(module: nn.Module, site: Site) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The norm's (weight, bias) as an explicit scale: Gemma-style norms (the family table's
    `gain_offset`) scale by (1 + w)."""
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    w = None if w is None else w.detach().clone()
    if w is not None and site.gain_offset:
        w = site.gain_offset + w.float()  # in float32 as Gemma computes it (and as the streaming path does)
    return w, (None if b is None else b.detach().clone())

