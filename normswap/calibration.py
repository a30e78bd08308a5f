"""Fitting DyT to a pretrained norm's behaviour on calibration data (design notes 2.3).

For a candidate alpha, u = tanh(alpha x); the best per-channel weight and bias are the least-squares
fit of y_j on u_j (closed form). The remaining squared error is a 1-D function of alpha, searched on
a log-spaced grid and refined by golden-section search on log(alpha).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn


def isru(u: torch.Tensor) -> torch.Tensor:
    """The inverse square root unit u / sqrt(1 + u^2) (DyISRU's squashing function)."""
    return u * torch.rsqrt(1 + u * u)


# The squashing functions of the elementwise norms (normswap.modules.ElementwiseNorm.FUNCTIONS).
SQUASH = {"tanh": torch.tanh, "isru": isru, "erf": torch.erf}


# Rows per float64 chunk of the final fits: they read every calibration token, and a float64 copy
# of 4096 tokens x 2048 channels is 67 MB, of which the fit would otherwise hold half a dozen.
_FIT_ROWS = 512


def _chunks(*ts: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Row chunks of same-length 2-D tensors, in float64."""
    for i in range(0, ts[0].shape[0], _FIT_ROWS):
        yield tuple(t[i:i + _FIT_ROWS].double() for t in ts)


def _affine_fit64(x: torch.Tensor, y: torch.Tensor, alpha: float | torch.Tensor, fn=torch.tanh) -> tuple[torch.Tensor, torch.Tensor]:
    """`_Objective.fit_channels`'s (weight, bias) for y ~ weight * fn(alpha x) + bias on all rows, in
    float64, from sums over row chunks (y centred first, as there, for the variances' sake)."""
    a = alpha.double() if torch.is_tensor(alpha) else alpha
    n = x.shape[0]
    y_mean = sum(yc.sum(0) for (yc,) in _chunks(y)) / n
    sums = torch.zeros(4, x.shape[1], dtype=torch.float64)  # u, u^2, (y - mean)^2, u (y - mean)
    for xc, yc in _chunks(x, y):
        u, yc = fn(a * xc), yc - y_mean
        sums += torch.stack([u.sum(0), u.pow(2).sum(0), yc.pow(2).sum(0), (u * yc).sum(0)])
    u_mean, u_sq, y_var, cov = sums / n
    var_u = u_sq - u_mean.pow(2)
    safe = var_u > 1e-12 * y_var.clamp_min(1e-30)
    g = torch.where(safe, cov / var_u.clamp_min(1e-30), torch.zeros_like(cov))
    return g, y_mean - g * u_mean


def _fit_error(predict, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mse, relative RMS error sqrt(mse / mean(y^2))) of `predict` (float64 rows -> rows), by chunks."""
    sse = sq = 0.0
    for xc, yc in _chunks(x, y):
        sse += float((predict(xc) - yc).pow(2).sum())
        sq += float(yc.pow(2).sum())
    mse = sse / max(y.numel(), 1)
    return mse, math.sqrt(mse / max(sq / max(y.numel(), 1), 1e-30))


@dataclass
class DytFit:
    alpha: float
    weight: torch.Tensor  # [d]
    bias: torch.Tensor  # [d]
    mse: float  # mean squared error of the fit
    rel_error: float  # sqrt(mse / mean(y^2)): error relative to the target's scale


class _Objective:
    """Least-squares error of the best per-channel affine fit on tanh(alpha x), as a function of alpha.

    With yc = y - mean(y): cov_j = mean(u_j yc_j), var_j = mean(u_j^2) - mean(u_j)^2, and the
    residual variance is var(y_j) - cov_j^2 / var_j; three reductions per evaluation.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, fn=torch.tanh):
        self.x, self.fn = x, fn
        self.y_mean = y.mean(0)
        self.yc = y - self.y_mean
        self.y_var = self.yc.pow(2).mean(0)

    def fit_channels(self, alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight, bias, residual variance), each [d], for a scalar or per-channel [d] alpha."""
        u = self.fn(alpha * self.x)
        u_mean = u.mean(0)
        var_u = u.pow(2).mean(0) - u_mean.pow(2)
        cov = (u * self.yc).mean(0)
        safe = var_u > 1e-12 * self.y_var.clamp_min(1e-30)
        g = torch.where(safe, cov / var_u.clamp_min(1e-30), torch.zeros_like(cov))
        b = self.y_mean - g * u_mean
        resid = torch.where(safe, self.y_var - cov.pow(2) / var_u.clamp_min(1e-30), self.y_var)
        return g, b, resid.clamp_min(0)

    def fit(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        g, b, resid = self.fit_channels(alpha)
        return g, b, float(resid.mean())

    def __call__(self, alpha: float) -> float:
        return self.fit(alpha)[2]


def fit_dyt(x: torch.Tensor, y: torch.Tensor, *, grid_size: int = 17, refine_steps: int = 18,
            search_rows: int = 2048, seed: int = 0) -> DytFit:
    """Best DyT (alpha, weight, bias) mapping inputs `x` [N, d] to target outputs `y` [N, d].

    alpha is searched in float32 on at most `search_rows` sampled tokens (the error curve is smooth
    and a few thousand tokens pin it down); weight and bias are then fitted in float64 on all tokens.
    """
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:search_rows]
    search = _Objective(x[rows].float(), y[rows].float())
    scale = float(x.float().std().clamp_min(1e-12))
    # Candidates from a nearly linear regime (alpha*x << 1) to a nearly saturated one.
    grid = [10 ** e / scale for e in torch.linspace(-2.5, 1.5, grid_size).tolist()]
    errors = [search(a) for a in grid]
    k = min(range(len(grid)), key=errors.__getitem__)
    lo, hi = math.log(grid[max(k - 1, 0)]), math.log(grid[min(k + 1, len(grid) - 1)])
    phi = (math.sqrt(5) - 1) / 2
    c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fc, fd = search(math.exp(c)), search(math.exp(d))
    for _ in range(refine_steps):  # golden-section search on log(alpha)
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - phi * (hi - lo)
            fc = search(math.exp(c))
        else:
            lo, c, fc = c, d, fd
            d = lo + phi * (hi - lo)
            fd = search(math.exp(d))
    alpha = min([(errors[k], grid[k]), (fc, math.exp(c)), (fd, math.exp(d))])[1]
    del search  # its float32 row sample (2 x 16 MB at 2048 channels) is not held through the final fits
    g, b = _affine_fit64(x, y, alpha)
    mse, rel = _fit_error(lambda xc: torch.tanh(alpha * xc) * g + b, x, y)
    return DytFit(alpha, g.float(), b.float(), mse, rel)


def dyt_error(alpha: float, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative RMS error of a given DyT on (x, y), for comparing against a constant-alpha init."""
    g, b = weight.double(), bias.double()
    return _fit_error(lambda xc: torch.tanh(alpha * xc) * g + b, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))[1]


# ----------------------------------------------------------------------------- elementwise variants


@dataclass
class ElementwiseFit:
    """A least-squares fit of y = w * f(alpha x) + b (normswap.modules.ElementwiseNorm, shift 0)."""

    fn: str
    alpha: torch.Tensor  # 0-d, or [d] for a per-channel fit
    weight: torch.Tensor  # [d]
    bias: torch.Tensor  # [d]
    mse: float
    rel_error: float


def _golden(lo: torch.Tensor, hi: torch.Tensor, f, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Golden-section search of each element's 1-D function on [lo, hi] (log alpha), all at once:
    `f(t)` maps a tensor of points to a tensor of values of the same shape. Returns (best point,
    its value) per element."""
    phi = (math.sqrt(5) - 1) / 2
    c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        left = fc < fd  # the minimum lies in [lo, d]: shrink from the right
        hi = torch.where(left, d, hi)
        lo = torch.where(left, lo, c)
        new_c, new_d = hi - phi * (hi - lo), lo + phi * (hi - lo)
        # the kept interior point is reused; only the new one is evaluated (both, elementwise, then picked)
        c_next = torch.where(left, new_c, d)
        d_next = torch.where(left, c, new_d)
        f_new = f(torch.where(left, c_next, d_next))
        fc, fd = torch.where(left, f_new, fd), torch.where(left, fc, f_new)
        c, d = c_next, d_next
    best = torch.where(fc < fd, c, d)
    return best, torch.minimum(fc, fd)


def fit_elementwise(x: torch.Tensor, y: torch.Tensor, *, fn: str = "tanh", per_channel: bool = False, grid_size: int = 17,
                    refine_steps: int = 18, search_rows: int = 2048, seed: int = 0) -> ElementwiseFit:
    """Best y ~ w * f(alpha x) + b for `fn` in SQUASH, alpha a scalar or (`per_channel`) one per channel.

    The same method as `fit_dyt`: per-channel weight and bias in closed form for a given alpha; alpha
    by a log-spaced grid then golden-section search on log(alpha), on at most `search_rows` sampled
    tokens in float32; the affine refitted in float64 on all tokens. Channels are independent given
    their alpha, so the per-channel search runs every channel's 1-D search at once. Derf's shift is
    left at 0 here (on a centred stream it has nothing to fit; end-to-end calibration moves it).
    """
    if fn not in SQUASH:
        raise ValueError(f"unknown elementwise function {fn!r}; choose one of {', '.join(SQUASH)}")
    f = SQUASH[fn]
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    if not per_channel:
        if fn == "tanh":
            d = fit_dyt(x, y, grid_size=grid_size, refine_steps=refine_steps, search_rows=search_rows, seed=seed)
            return ElementwiseFit(fn, torch.tensor(d.alpha), d.weight, d.bias, d.mse, d.rel_error)
        alpha = _scalar_search(x, y, f, grid_size, refine_steps, search_rows, seed)
        alpha_t = torch.tensor(alpha, dtype=torch.float64)
    else:
        rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:search_rows]
        xs, ys = x[rows].float(), y[rows].float()
        search = _Objective(xs, ys, f)
        scale = xs.std(0).clamp_min(1e-12)
        exps = torch.linspace(-2.5, 1.5, grid_size)
        log_grid = exps[:, None] * math.log(10) - scale.log()[None, :]  # [G, d] log alpha
        errors = torch.stack([search.fit_channels(g.exp())[2] for g in log_grid])  # [G, d]
        k = errors.argmin(0)
        cols = torch.arange(x.shape[1])
        lo = log_grid[(k - 1).clamp_min(0), cols]
        hi = log_grid[(k + 1).clamp_max(grid_size - 1), cols]
        best, best_err = _golden(lo, hi, lambda t: search.fit_channels(t.exp())[2], refine_steps)
        alpha_t = torch.where(best_err < errors[k, cols], best, log_grid[k, cols]).exp().double()
    g, b = _affine_fit64(x, y, alpha_t, f)
    mse, rel = _fit_error(lambda xc: f(alpha_t * xc) * g + b, x, y)
    return ElementwiseFit(fn, alpha_t.float(), g.float(), b.float(), mse, rel)


def _scalar_search(x, y, f, grid_size, refine_steps, search_rows, seed) -> float:
    """fit_dyt's scalar alpha search for another squashing function."""
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:search_rows]
    search = _Objective(x[rows].float(), y[rows].float(), f)
    scale = float(x.float().std().clamp_min(1e-12))
    log_grid = torch.linspace(-2.5, 1.5, grid_size, dtype=torch.float64) * math.log(10) - math.log(scale)
    errors = torch.tensor([search(math.exp(a)) for a in log_grid.tolist()], dtype=torch.float64)
    k = int(errors.argmin())
    lo, hi = log_grid[max(k - 1, 0)].reshape(1), log_grid[min(k + 1, grid_size - 1)].reshape(1)
    best, err = _golden(lo, hi, lambda t: torch.tensor([search(math.exp(float(t)))], dtype=torch.float64), refine_steps)
    return math.exp(float(best)) if float(err) < float(errors[k]) else math.exp(float(log_grid[k]))


def elementwise_error(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative RMS error of any elementwise norm module on (x, y), in float64."""
    import copy

    m = copy.deepcopy(module).double()
    with torch.no_grad():
        return _fit_error(m, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))[1]


# --------------------------------------------------------------------------- whole-model refitting


def _norm_types() -> tuple[type, ...]:
    from normswap.modules import DyT, ElementwiseNorm

    return (DyT, ElementwiseNorm)


def elementwise_sites(model: nn.Module) -> list[str]:
    """Paths of the model's DyT and ElementwiseNorm modules, in module (forward) order."""
    return [name for name, m in model.named_modules() if isinstance(m, _norm_types())]


class _Stop(Exception):
    pass


def capture(model: nn.Module, paths: list[str], batches: list[dict[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """Inputs ("input") or outputs ("output") of the modules at `paths` over all batches, as float32
    [tokens, d] tensors; each pass stops once every module has fired (only the prefix runs)."""
    from normswap.surgery.paths import get_module

    store: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    fired: set[str] = set()
    handles = []
    for p in paths:
        def hook(m, args, out=None, p=p):
            t = args[0] if what == "input" else out
            store[p].append(t.detach().reshape(-1, t.shape[-1]).float().cpu())
            fired.add(p)
            if len(fired) == len(paths):
                raise _Stop

        mod = get_module(model, p)
        handles.append(mod.register_forward_pre_hook(hook) if what == "input" else mod.register_forward_hook(hook))
    device = input_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                fired.clear()
                try:
                    model(**{k: v.to(device) for k, v in batch.items()}, **no_cache(model))
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(v) for p, v in store.items()}


def one_batch(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """The batches stacked into one (along the batch dimension), or None where they cannot be
    (different keys or lengths: one utterance a batch). Rows keep their order, so a capture of the
    stacked batch lists the same tokens in the same order as `capture` over the list."""
    if len(batches) == 1:
        return batches[0]
    keys = set(batches[0])
    if any(set(b) != keys for b in batches) or any(b[k].shape[1:] != batches[0][k].shape[1:] for b in batches for k in keys):
        return None
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


class _PassDone(Exception):
    """Raised by `hooked_forward` once every path has fired: what the model computes after its
    last site (a language model's logits, tokens x vocabulary floats: 0.5 GB for 4096 tokens of a
    32k vocabulary) feeds no site, so the pass stops there."""


def hooked_forward(model: nn.Module, paths: list[str], batch: dict[str, torch.Tensor],
                   hook: Callable[[str, nn.Module, tuple, Any], Any], what: str) -> None:
    """One no-grad forward pass over `batch` with `hook(path, module, args, output)` as a forward
    hook of the module at each path (a non-None return replaces the output, as in torch). The pass
    ends as soon as every path has fired once; a path that never fires is an error."""
    from normswap.surgery.paths import get_module

    fired: set[str] = set()
    handles = []
    for p in paths:
        def on_output(m, args, out, p=p):
            res = hook(p, m, args, out)
            fired.add(p)
            if len(fired) == len(paths):
                raise _PassDone
            return res

        handles.append(get_module(model, p).register_forward_hook(on_output))
    device = input_device(model)
    try:
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in batch.items()}, **no_cache(model))
    except _PassDone:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in fired]
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} site(s) never ran in the forward pass, e.g. {missing[0]}")


def fit_in_forward(model: nn.Module, paths: list[str], batch: dict[str, torch.Tensor],
                   make: Callable[[str, nn.Module, torch.Tensor], nn.Module]) -> dict[str, nn.Module]:
    """Sequential calibration in a single forward pass: when the pass reaches the module at a path,
    `make(path, module, x)` builds its replacement from the module's input `x` (float32 [tokens,
    d], on the CPU) and the replacement's output goes on in the module's place. Each site therefore
    sees the inputs that the already replaced prefix gives it, as a per-site `capture` after each
    swap would, but the model runs once instead of once per site, and nothing in it needs to be
    resident before the pass reaches it (`normswap.blockwise` loads blocks as they run).

    The replacements are returned (path -> module, cast to the module's dtype and device), not set
    into the model: the caller swaps them. A path that fires again in the same pass (a shared
    module) reuses its replacement; a path that never fires is an error."""
    built: dict[str, nn.Module] = {}

    def replace(p: str, m: nn.Module, args: tuple, out: Any) -> torch.Tensor:
        x = args[0]
        if p not in built:
            new = make(p, m, x.detach().reshape(-1, x.shape[-1]).float().cpu())
            ref = next(m.parameters(), None)
            ref = ref if ref is not None and ref.device.type != "meta" else x
            built[p] = new.to(dtype=ref.dtype, device=ref.device)
        return built[p](x)

    hooked_forward(model, paths, batch, replace, "calibration")
    return built


def no_cache(model: nn.Module) -> dict[str, Any]:
    """`use_cache=False` where the model's forward takes it. A pass that only reads activations
    must not keep a key/value cache: it grows with depth (on a 24-layer Llama-shaped 1.5B model,
    4,096 calibration tokens of float32 keys and values are 0.4 GB by the last block)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its first parameter that is not on the meta device."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def fitted_variant(variant: str, x: torch.Tensor, y: torch.Tensor, dim: int, *, recenter: bool = False, **fit_kwargs) -> tuple[nn.Module, Any]:
    """A new norm of `variant` ("dyt": DyT; or a key of normswap.modules.VARIANTS) whose alpha,
    weight and bias are the least-squares fit of y ~ w * f(alpha x) + b on a site's inputs `x` and
    the original norm's outputs `y`; with the fit (its `rel_error`)."""
    from normswap.modules import VARIANTS, DyT, new_variant

    if variant == "dyt":
        fit = fit_dyt(x, y, **fit_kwargs)
        new: nn.Module = DyT(dim, fit.alpha, recenter=recenter)
        alpha = torch.tensor(fit.alpha)
    else:
        fn, per_channel = VARIANTS[variant]
        fit = fit_elementwise(x, y, fn=fn, per_channel=per_channel, **fit_kwargs)
        new = new_variant(variant, dim, recenter=recenter)
        alpha = fit.alpha
    with torch.no_grad():
        new.alpha.copy_(alpha)
        new.weight.copy_(fit.weight)
        new.bias.copy_(fit.bias)
    return new, fit


def calibrate_variant(model: nn.Module, original: nn.Module, batches: list[dict[str, torch.Tensor]], variant: str, *,
                      sequential: bool = True, paths: list[str] | None = None, **fit_kwargs) -> dict[str, dict[str, float]]:
    """Replace each elementwise site of a converted, unfolded `model` (its DyT modules, or `paths`)
    by a least-squares fit of `variant` ("dyt" or a key of normswap.modules.VARIANTS) to the
    `original` model's norm outputs at the same paths, on `batches`.

    `sequential`: each site is fitted on the inputs the already refitted prefix gives it (as
    `convert_model` does); otherwise on the converted model's inputs as they were. The targets
    come from `original`, whose module at each path is the norm the site replaced (conversion
    keeps the paths; centring a Pre-LN stream leaves a LayerNorm's output unchanged).
    Returns {path: {"rel_error": ...}}. Each site keeps its `recenter`.
    """
    from normswap.modules import VARIANTS
    from normswap.surgery.paths import get_module, set_module

    if variant != "dyt" and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose dyt or one of {', '.join(VARIANTS)}")
    paths = elementwise_sites(model) if paths is None else list(paths)
    targets = capture(original, paths, batches, "output")
    inputs = None if sequential else capture(model, paths, batches, "input")
    report = {}
    for path in paths:
        old = get_module(model, path)
        x = capture(model, [path], batches, "input")[path] if sequential else inputs[path]
        y = targets[path]
        ref = next(old.parameters())
        new, fit = fitted_variant(variant, x, y, old.dim, recenter=old.recenter, **fit_kwargs)
        set_module(model, path, new.to(dtype=ref.dtype, device=ref.device))
        report[path] = {"rel_error": fit.rel_error}
    return report


def widen_alpha(model: nn.Module, paths: list[str] | None = None) -> list[str]:
    """Replace each scalar-alpha DyT (at `paths`, default all) by the same function as a
    "dyt-channel" ElementwiseNorm (its alpha copied into every channel), so that end-to-end
    calibration can move each channel's alpha on its own; no refit, nothing else changes.
    Returns the paths replaced."""
    from normswap.modules import DyT, new_variant
    from normswap.surgery.paths import get_module, set_module

    done = []
    for path in (elementwise_sites(model) if paths is None else paths):
        old = get_module(model, path)
        if type(old) is not DyT:
            continue
        new = new_variant("dyt-channel", old.dim, weight=old.weight is not None, bias=old.bias is not None, recenter=old.recenter)
        with torch.no_grad():
            new.alpha.copy_(old.alpha.detach().expand(old.dim))
            if old.weight is not None:
                new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        ref = old.alpha
        set_module(model, path, new.to(dtype=ref.dtype, device=ref.device))
        done.append(path)
    return done
