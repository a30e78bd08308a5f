"""Stock exports: an exact conversion written as a plain checkpoint of its original class.

    from normswap.export import export_stock, stock_blockers
    stock_blockers("gpt2-rms")                 # [] if a stock GPT2LMHeadModel can hold it, else the reasons
    export_stock("gpt2-rms", "gpt2-rms-stock")  # config.json of model_type "gpt2", no normswap code needed

Why a stock class can hold some conversions: in an exact Pre-LN LayerNorm -> RMSNorm conversion
every residual writer is centred, so each norm reads a zero-mean stream, where LayerNorm(x) equals
RMSNorm(x) with the same eps. The stock LayerNorm therefore computes the converted model's function
when it gets the converted weights: weight 1 and bias 0 where the affine was folded, the kept
affine elsewhere. A site that subtracts its input's mean itself (`center`) is LayerNorm outright.
RMSNorm families (Llama, Gemma...) keep their stock RMSNorm, a folded gain being all ones (or zero
in Gemma's `1 + w` form: `_neutral_gain` finds which by running the stock norm).

Folding a LayerNorm bias into a reader without one (GPT-2's `lm_head`) gives it a bias that the
stock class has no slot for. Such a bias moves back into the norm, whose stock LayerNorm has a
bias slot: the folded reader computes W' n + c with c = W' beta for beta = b / g, so the norm gets
bias beta (solved from W' beta = c in float64) and readers that do have a bias give W' beta back.

Refused, with the reason (`stock_blockers`): DyT and removed norms, approximate conversions
(Post-LN), embedding lookups or block inputs centred on the fly (no stock class subtracts a mean
there), norms that re-centre their output, an eps that differs from the stock config's, and new
biases that neither the stock class nor a norm can hold. Every export is loaded back with plain
transformers and compared with `normswap.load(folder)` before it is moved into place.
"""
from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.record import ConversionRecord, SiteRecord

STOCK_TOLERANCE = 1e-5  # max |stock - converted| / max |converted| of the outputs: float32 rounding
VERIFY_TOKENS = 512
_RESIDUAL = 1e-4  # a bias moved back into its norm must reproduce the folded one to this (relative; or the dtype's bound)
STOCK_MARK = "normswap-stock-export"  # a tag in the card, so an earlier export can be recognised


@dataclass
class _Norm:
    """A site as the stock class holds it: its stock parameters and how its gain is stored."""

    site: SiteRecord
    weight: bool  # the stock norm has a weight parameter
    bias: bool  # ... and a bias parameter
    offset: float  # the stock norm scales by (offset + weight): 0, or 1 for Gemma's (1 + w)


@dataclass
class _Plan:
    """How the converted checkpoint maps onto its stock class (`reasons` empty if it does)."""

    record: ConversionRecord
    config: Any = None
    cls: Any = None
    model: nn.Module | None = None  # the stock model on the meta device
    norms: dict[str, _Norm] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)  # new biases without a stock slot
    reasons: list[str] = field(default_factory=list)


def stock_blockers(folder_or_record: str | Path | ConversionRecord) -> list[str]:
    """Why no stock class can hold this conversion (empty if one can). Given a record alone, only
    what the record says is checked; given a converted folder, also its stock class: each norm's
    kind, eps and parameters, and where each new bias can live (the model is loaded for that only
    when some new bias has no stock slot)."""
    if isinstance(folder_or_record, ConversionRecord):
        return record_blockers(folder_or_record)
    from normswap.export.remote import check_checkpoint
    from normswap.loading import read_record

    src = check_checkpoint(folder_or_record)
    record, cfg = read_record(src)
    reasons = record_blockers(record)
    if reasons:
        return reasons
    plan = _plan(record, cfg)
    if not plan.reasons and plan.orphans:
        import normswap

        converted = normswap.load(src)
        _moved_biases(plan, converted.state_dict(), converted)
    return plan.reasons


def record_blockers(record: ConversionRecord) -> list[str]:
    """The reasons found in the conversion record alone."""
    arch = record.architecture
    reasons = []
    from normswap.modules import VARIANTS

    dyt = [s.path for s in record.sites if s.type == "dyt" or s.type in VARIANTS]  # DyT and its variants (--variant)
    gone = [s.path for s in record.sites if s.type in ("identity", "none")]
    approx = [s.path for s in record.sites if s.type == "rmsnorm" and not s.exact]
    if dyt:
        reasons.append(f"{_n(dyt, 'DyT site')} (e.g. {dyt[0]}): no stock {arch} has a DyT layer")
    if gone:
        reasons.append(f"{_n(gone, 'norm')} removed (e.g. {gone[0]}): a stock {arch} applies a norm there")
    if approx or not (record.exact or dyt or gone):
        where = f"e.g. {approx[0]} is an approximation" if approx else "no exactness claim"
        reasons.append(f"the conversion is not exact ({record.style}-LN {record.base_model_type}: {where}): a stock {arch} "
                       "would compute LayerNorm there, not this model's function")
    if record.centered_embeddings:
        reasons.append(f"the lookups of {', '.join(record.centered_embeddings)} are centred on the fly (the tied LM head "
                       f"converted with --tied-head {record.tied_head or 'center-embed'}), which no stock {arch} does: "
                       "convert with --tied-head untie")
    if record.centered_inputs:
        reasons.append(f"{', '.join(record.centered_inputs)} mean-subtract their input on the fly (a stream no weight change "
                       f"can centre), which no stock {arch} does")
    recentre = [s.path for s in record.sites if s.recenter]
    if recentre:
        reasons.append(f"{', '.join(recentre)} re-centre their output (it starts the residual stream), which a stock norm "
                       "does not")
    return reasons


def _n(items: list[str], what: str) -> str:
    return f"{len(items)} {what}{'s' if len(items) != 1 else ''}"


def stock_config(record: ConversionRecord, cfg: dict[str, Any]) -> Any:
    """The transformers config of the stock class: the converted folder's base config (read_record
    gives it without the `normswap` section), its head untied if the conversion untied it."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "auto_map")}
    try:
        config = AutoConfig.for_model(record.base_model_type, **kwargs)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise NormswapError(f"cannot build a {record.base_model_type} config from the checkpoint: {str(err).strip().splitlines()[0][:200]}") from None
    if record.tied_head == "untie":
        config.tie_word_embeddings = False  # the head has its own (folded) copy
    config.architectures = [record.architecture]
    return config


def _plan(record: ConversionRecord, cfg: dict[str, Any]) -> _Plan:
    """Build the stock model on the meta device and check every site and new bias against it."""
    import transformers

    from normswap.archs.plan import is_norm
    from normswap.surgery.paths import get_module

    plan = _Plan(record, config=stock_config(record, cfg), cls=getattr(transformers, record.architecture))
    try:
        with torch.device("meta"):  # structure only: no memory, no initialisation
            plan.model = plan.cls(plan.config)
    except Exception as err:  # noqa: BLE001 - whatever a model's __init__ raises on this config
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise NormswapError(f"cannot build a stock {record.architecture} from the checkpoint's config: {msg}") from None
    arch = record.architecture
    for site in record.sites:
        try:
            mod = get_module(plan.model, site.path)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Module) or not is_norm(mod):
            plan.reasons.append(f"{site.path} is not a norm in a stock {arch}")
            continue
        eps = getattr(mod, "eps", None)
        eps = getattr(mod, "variance_epsilon", None) if eps is None else eps
        if not isinstance(eps, (int, float)) or not math.isclose(float(eps), site.eps, rel_tol=1e-6):
            plan.reasons.append(f"{site.path} has eps {site.eps:g}, but the stock {type(mod).__name__} of this config has {eps}")
            continue
        weight, bias = _param(mod, "weight"), _param(mod, "bias")
        if site.weight and not weight or site.bias and not bias:
            plan.reasons.append(f"{site.path} keeps a {'weight' if site.weight and not weight else 'bias'} that the stock "
                                f"{type(mod).__name__} has no parameter for")
            continue
        offset = _neutral_gain(mod, site)
        if offset is None:
            what = "the mean-subtracted input" if site.center else "a zero-mean input" if site.method == "exact" else "its input"
            plan.reasons.append(f"the stock {type(mod).__name__} at {site.path} does not compute the converted norm "
                                f"(an RMSNorm of {what}, eps {site.eps:g})")
            continue
        plan.norms[site.path] = _Norm(site, weight, bias, offset)
    for path in record.new_biases:
        try:
            mod = get_module(plan.model, path)
        except AttributeError:
            plan.reasons.append(f"{path} (which gained a bias from folding) is not a module of a stock {arch}")
            continue
        if not _param(mod, "bias"):
            plan.orphans.append(path)
    return plan


def _param(mod: nn.Module, name: str) -> bool:
    return isinstance(getattr(mod, name, None), torch.Tensor)


@torch.no_grad()
def _neutral_gain(mod: nn.Module, site: SiteRecord) -> float | None:
    """The stock norm's gain offset (0 for w * x, 1 for Gemma's (1 + w) * x), found by running a
    CPU copy of it with bias 0 and weight 1, then 0, against the site's own RMSNorm on inputs of
    scale 1 and sqrt(eps) (where eps matters); None if neither matches (not this site's function).
    A site that reads a centred stream is probed on zero-mean inputs, the others on inputs with a
    mean (which tells LayerNorm from RMSNorm)."""
    from normswap.modules import new_norm

    probe = copy.deepcopy(mod).to_empty(device="cpu").float()
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0] * 4 + [math.sqrt(site.eps)] * 4)[:, None]
    x = (torch.randn(8, site.dim, generator=g) + 0.5) * scale
    if site.method == "exact":  # the exact Pre-LN case: the stream is centred
        x = x - x.mean(-1, keepdim=True)
    ref = new_norm({**asdict(site), "type": "rmsnorm", "weight": False, "bias": False, "recenter": False})(x)
    for neutral in (1.0, 0.0):
        for name, value in (("weight", neutral), ("bias", 0.0)):
            if _param(probe, name):
                getattr(probe, name).fill_(value)
        try:
            y = probe(x)
        except Exception:  # noqa: BLE001 - a norm class whose forward needs more than one tensor
            return None
        if isinstance(y, torch.Tensor) and y.shape == ref.shape and float((y - ref).abs().max()) <= STOCK_TOLERANCE * float(ref.abs().max()):
            return 1.0 - neutral
        if not _param(probe, "weight"):
            break
    return None


# --------------------------------------------------------------------------------------- new biases


def _reader_matrix(mod: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A reader's weight as [out, in] in float64 (GPT-2's Conv1D stores [in, out])."""
    w = weight.double()
    from normswap.archs.trace import is_conv1d

    return w.t() if is_conv1d(mod) else w


@torch.no_grad()
def _readers(model: nn.Module, sites: list[str]) -> dict[str, list[str]]:
    """The linears whose input is each site's output, on one probe batch of the converted model.

    A reader gets the norm's output tensor itself, or a view of it (OPT's MLP reads it flattened,
    a pooler token 0): the same storage. Values alone cannot decide, since two folded weightless
    norms of the same stream (Falcon's ln_attn and ln_mlp) give equal outputs."""
    from normswap.archs.trace import is_linear
    from normswap.samples import model_inputs
    from normswap.surgery.paths import get_module

    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = [get_module(model, p).register_forward_hook(lambda m, a, o, p=p: outputs.setdefault(p, o)) for p in sites]
    for name, mod in model.named_modules():
        if is_linear(mod):
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: inputs.setdefault(n, a[0]) if a else None))
    try:
        model(**model_inputs(model, n_tokens=16, block=16, batch_size=1, what="probe", n_utterances=1)[0])
    finally:
        for h in handles:
            h.remove()
    found: dict[str, list[str]] = {p: [] for p in sites}
    for p, out in outputs.items():
        storage = out.untyped_storage().data_ptr()
        for name, got in inputs.items():
            if isinstance(got, torch.Tensor) and got.untyped_storage().data_ptr() == storage:
                found[p].append(name)
    return found


@dataclass
class _Move:
    """A folded bias moved back into its norm: the norm's bias `beta`, the readers it came from
    (`orphans`, which lose theirs) and the corrected biases of the norm's other readers."""

    beta: torch.Tensor
    orphans: list[str]
    biases: dict[str, torch.Tensor]


def _moved_biases(plan: _Plan, state: dict[str, torch.Tensor], converted: nn.Module) -> dict[str, _Move]:
    """For each folded site some of whose readers gained a bias the stock class cannot hold: the
    norm bias beta that gives those readers their bias back (W' beta = c, least squares in float64
    over all of them), and the corrected biases of its other readers (c - W' beta). Adds a reason
    to `plan` for an orphan bias that no norm can take."""
    from normswap.surgery.paths import get_module

    readers = _readers(converted, [p for p, n in plan.norms.items() if n.site.folded])
    owner = {r: p for p, rs in readers.items() for r in rs}
    moves: dict[str, _Move] = {}
    arch = plan.record.architecture
    for orphan in plan.orphans:
        site = owner.get(orphan)
        if site is None or not plan.norms[site].bias:
            why = "reads no folded norm" if site is None else f"reads {site}, whose stock norm has no bias either"
            plan.reasons.append(f"{orphan} gained a bias from folding, and a stock {arch} has no bias there ({orphan} {why})")
    if plan.reasons:
        return moves
    for site in sorted({owner[o] for o in plan.orphans}):
        mine = [r for r in readers[site] if r in plan.orphans]
        d = plan.norms[site].site.dim
        gram = torch.zeros(d, d, dtype=torch.float64)
        rhs = torch.zeros(d, dtype=torch.float64)
        mats = {}
        for r in readers[site]:
            bias = state.get(f"{r}.bias")
            if bias is None:
                plan.reasons.append(f"{r} reads the folded norm {site} but has no bias, which folding would have given it")
                return moves
            mats[r] = (_reader_matrix(get_module(plan.model, r), state[f"{r}.weight"]), bias.double())
        for r in mine:
            w, c = mats[r]
            gram += w.t() @ w
            rhs += w.t() @ c
        beta = torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]
        err = max(float((mats[r][0] @ beta - mats[r][1]).abs().max()) for r in mine)
        ref = max(float(mats[r][1].abs().max()) for r in mine)
        # W' and c are rounded to the checkpoint's dtype: in half precision they agree only to its rounding
        if not err <= max(_RESIDUAL, tolerance(state[f"{mine[0]}.weight"].dtype)) * max(ref, 1e-30):
            plan.reasons.append(f"the bias folded into {', '.join(mine)} cannot move back into {site} (residual {err / max(ref, 1e-30):.2g} "
                                f"of its size): a stock {arch} has no bias there")
            return moves
        moves[site] = _Move(beta, mine, {r: c - w @ beta for r, (w, c) in mats.items() if r not in mine})
    return moves


# --------------------------------------------------------------------------------------- the export


def _stock_state(plan: _Plan, converted: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every tensor of the stock model, under its stock name, from the converted model; and, per
    norm that took a folded bias back, the readers it took it from."""
    state = dict(converted.state_dict())
    dtype = _dominant_dtype(state)
    moves = _moved_biases(plan, state, converted) if plan.orphans else {}
    if plan.reasons:
        raise NormswapError(_refusal(plan))
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for path, norm in plan.norms.items():
        s = norm.site
        for name, kept, has, neutral in (("weight", s.weight, norm.weight, 1.0), ("bias", s.bias, norm.bias, 0.0)):
            key = f"{path}.{name}"
            if kept:
                used.add(key)
            if not has:
                continue
            value = state[key].double() if kept else torch.full((s.dim,), neutral, dtype=torch.float64)
            if name == "weight":
                value = value - norm.offset  # Gemma stores g - 1
            elif path in moves:
                value = value + moves[path].beta
            out[key] = value.to(dtype)
    for move in moves.values():
        for reader, bias in move.biases.items():
            out[f"{reader}.bias"] = bias.to(state[f"{reader}.bias"].dtype)
    used.update(f"{o}.bias" for o in plan.orphans)
    expected = plan.model.state_dict()
    for key, ref in expected.items():
        if key not in out:
            if key not in state:
                raise NormswapError(f"a stock {plan.record.architecture} has {key}, which the converted checkpoint lacks")
            out[key] = state[key]
        used.add(key)
        if tuple(out[key].shape) != tuple(ref.shape):
            raise NormswapError(f"{key} has shape {tuple(out[key].shape)} in the checkpoint, {tuple(ref.shape)} in a stock {plan.record.architecture}")
    extra = [k for k in state if k not in used]
    if extra:
        raise NormswapError(f"a stock {plan.record.architecture} has no place for {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return out, {site: move.orphans for site, move in moves.items()}


def _dominant_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def tolerance(dtype: torch.dtype) -> float:
    """The bound on the export's deviation: float32 rounding for float32 weights; for half
    precision, the conversion's own bound for that dtype (`EXACT_TOLERANCE`), since a bias moved
    back into its norm is rounded to that dtype once more."""
    from normswap.conversion import EXACT_TOLERANCE, dtype_name

    return STOCK_TOLERANCE if dtype == torch.float32 else max(STOCK_TOLERANCE, EXACT_TOLERANCE.get(dtype_name(dtype), STOCK_TOLERANCE))


def _refusal(plan_or_record: _Plan | ConversionRecord, reasons: list[str] | None = None) -> str:
    record = plan_or_record.record if isinstance(plan_or_record, _Plan) else plan_or_record
    reasons = reasons if reasons is not None else plan_or_record.reasons
    return f"no stock {record.architecture} can hold this checkpoint: " + "; ".join(reasons)


def export_stock(folder: str | Path, out: str | Path, *, overwrite: bool = False, repo_id: str | None = None) -> dict[str, Any]:
    """Write the converted checkpoint `folder` as a plain checkpoint of its original class into
    `out` (atomically: a staging folder moved into place once complete and verified). The export
    is loaded back with plain transformers and compared with `normswap.load(folder)` on probe
    inputs; a relative deviation above `tolerance` (1e-5 in float32) raises NormswapError and
    nothing is written.
    `repo_id` only names the model in the card. Returns the figures and the files written."""
    import normswap
    from normswap.export.card import build_stock_card
    from normswap.export.remote import check_checkpoint
    from normswap.loading import load_tokenizer, read_record
    from normswap.outputs import atomic_output

    start = time.perf_counter()
    src = check_checkpoint(folder)
    record, cfg = read_record(src)
    reasons = record_blockers(record)
    if reasons:
        raise NormswapError(_refusal(record, reasons))
    plan = _plan(record, cfg)
    if plan.reasons:
        raise NormswapError(_refusal(plan))
    with atomic_output(out, overwrite=overwrite, inputs={"checkpoint": src}, flag="OUT") as tmp:
        converted = normswap.load(src)
        state, moved = _stock_state(plan, converted)
        _write(plan, state, tmp)
        del state
        _copy_aux(src, tmp)
        figures = _verify(tmp, plan, converted, load_tokenizer(str(src)))
        info: dict[str, Any] = {
            "folder": str(out), "model_type": record.base_model_type, "architecture": record.architecture,
            **{k: figures[k] for k in ("max_abs_diff", "max_rel_diff", "tokens", "output")},
            "tolerance": figures["tolerance"], "moved_biases": moved, "transformers_version": _transformers_version(),
        }
        for k in ("ppl_original", "ppl_converted"):  # compare's names: here the checkpoint's and the export's
            if k in figures:
                info["ppl_checkpoint" if k == "ppl_original" else "ppl_stock"] = figures[k]
        (tmp / "README.md").write_text(build_stock_card(src, info, repo_id=repo_id), encoding="utf-8")
        info["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    info["seconds"] = round(time.perf_counter() - start, 2)
    return info


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _write(plan: _Plan, state: dict[str, torch.Tensor], tmp: Path) -> None:
    """config.json, model.safetensors and generation_config.json, written by transformers'
    own save_pretrained from the stock model holding `state`."""
    dtype = _dominant_dtype(state)
    model = plan.model.to_empty(device="cpu").to(dtype)
    model.load_state_dict(state, strict=True)
    model.tie_weights()  # to_empty gives tied parameters separate storage again
    model.config.dtype = dtype
    model.save_pretrained(str(tmp), safe_serialization=True)
    plan.model = None  # materialised now: the meta model is gone


def _copy_aux(src: Path, tmp: Path) -> None:
    """Tokenizer, processor and generation files of the checkpoint (not its weights, config,
    card or training artefacts: the Hub export's own exclusions)."""
    from normswap.export.remote import _SKIP, _WEIGHT_SUFFIXES

    for item in src.iterdir():
        if item.name in _SKIP or item.name.startswith((".", "checkpoint")) or item.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        elif item.is_file():
            shutil.copy2(item, tmp / item.name)  # the source's generation_config.json replaces the one from the config


def _verify(tmp: Path, plan: _Plan, converted: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Load the staged export with plain transformers (the stock class's from_pretrained) and
    compare it with the converted model on probe inputs (`tolerance` of its dtype)."""
    from normswap.samples import model_inputs
    from normswap.verification import compare

    arch = plan.record.architecture
    dtype = _dominant_dtype(converted.state_dict())
    try:
        stock, info = plan.cls.from_pretrained(str(tmp), use_safetensors=True, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise NormswapError(f"stock transformers cannot load the export as {arch}: {str(err).strip().splitlines()[0][:200]}; nothing was written") from None
    wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if wrong:
        what, keys = next(iter(wrong.items()))
        raise NormswapError(f"stock transformers loads the export as {arch} with {what.replace('_', ' ')} {sorted(keys)[:3]}; nothing was written")
    foreign = sorted({type(m).__name__ for m in stock.modules() if type(m).__module__.split(".")[0] == "normswap"})
    if foreign or type(stock.config).__module__.split(".")[0] != "transformers":
        raise NormswapError(f"the export loaded with normswap classes ({', '.join(foreign) or type(stock.config).__name__}); nothing was written")
    stock.eval()
    batches = model_inputs(converted, tokenizer=tokenizer, n_tokens=VERIFY_TOKENS, block=128, batch_size=2, seed=1, what="verification")
    figures = compare(converted, stock, batches)
    figures["tolerance"] = bound = tolerance(dtype)
    if not figures["max_rel_diff"] <= bound:
        raise NormswapError(f"the stock {arch} differs from the converted checkpoint by {figures['max_rel_diff']:.3g} of its "
                            f"{figures['output']} (relative, {figures['tokens']} tokens), above {bound:g}; nothing was written")
    return figures
