"""Issue 12, item 5: where DyT calibration loses SmolLM2-135M-Instruct (a 30-layer Llama).

Results and their reading: docs/dyt-on-llama.md. Measures, on the fetch.sh folder of
SmolLM2-135M-Instruct (../shared/assets/smollm2-135m-instruct):

- `stats`: per-token residual RMS entering every norm on evaluation text (the first /
  attention-sink token and the largest other tokens against the median, the channel that carries
  them, which tokens are massive);
- `sites`: per-site DyT fit error by depth and site kind, sequential vs parallel calibration, and
  where it comes from: the sink token (position 0 of each block), other massive tokens and the
  ordinary ones (their error and share of the squared error); the floor left if the per-token
  scale were known (fit on x / rms(x)); the error a site passes on to its sub-layer (attention,
  SwiGLU MLP); and on held-out evaluation text, how the converted model's residual stream drifts
  from the original's, layer by layer (and whether it still builds the sink's massive activation);
- `ppl` (on `--max-tokens`) and `ppl-sink`, `ppl-parts`, `ppl-massive`, ... (on
  `--ablation-tokens`, each with the original and the default DyT on the same tokens as
  references): WikiText-2 raw test perplexity (non-overlapping 1,024-token blocks, as in
  assets/README.md), top-1 accuracy and the perplexity at the best of a few logit temperatures,
  of DyT variants (`VARIANTS`; the default `--variants core` is the documented set, `CORE`);
- `library` (not in the default run, ~7 min): `normswap.convert(..., "dyt")` with its defaults,
  to check that this script's layer-by-layer calibration reproduces the library's (alphas, fit
  errors, perplexity).

The calibration here is the library's own fit (`normswap.calibration.fit_dyt`) driven layer by
layer: the original and the converted model are stepped through the decoder side by side, so a
sequential calibration costs two forward passes instead of one per site (the library's
`_capture` reruns the converted prefix for each of the 61 sites). Sequential: each site is fitted
on the converted prefix's output, targets are the original norm's outputs on the original's
input, exactly as `normswap.conversion._convert_sites`. "Sink exact" probes send position 0
(and, for `massive_tokens_exact`, tokens whose top channel is > 8x its ordinary size) through
the original RMSNorm: diagnostics, not a deployable DyT.

    python scripts/analyse_dyt_llama.py            # the documented run, ~16-20 min on one core
    python scripts/analyse_dyt_llama.py --sections library
    python scripts/analyse_dyt_llama.py --report   # the markdown tables, and the PNG again

Writes bench-results/dyt_llama_analysis.json (each section adds its key; results already there
from other sections are kept) and the plot bench-results/dyt_llama_analysis.png beside it. On 2
shared cores with 1 thread: stats ~10 s, sites ~5 min, a perplexity ~95 s at 16,384 tokens and
~50 s at 8,192, a calibration ~35 s (parallel with its detail ~3 min).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from normswap.assets import asset  # noqa: E402
from normswap.calibration import fit_dyt  # noqa: E402

SECTIONS = ("stats", "sites", "ppl", "ppl-sink", "ppl-parts", "ppl-layers", "ppl-massive", "ppl-fits", "ppl-noise", "ppl-calib",
            "library")
DEFAULT_MODEL = Path(os.environ.get("NORMSWAP_CACHE", Path.home() / ".cache" / "normswap-assets")) / "smollm2-135m-instruct"
BLOCK = 1024  # evaluation block (assets/README.md protocol)


# ------------------------------------------------------------------------------------ DyT probes


class Probe(nn.Module):
    """A replacement for one norm site: DyT `g * tanh(alpha x) + b` (alpha a scalar or per channel),
    with the original norm kept for the first `exact_first` positions of each sequence
    (`mode="fallback"`), or DyT applied to those positions only (`mode="sink-only"`). With a
    `massive` (channel, threshold) pair, tokens whose |x[channel]| exceeds the threshold also go
    through the original norm: a test on one channel, no reduction over the hidden dimension."""

    def __init__(self, orig: nn.Module, alpha: torch.Tensor, g: torch.Tensor, b: torch.Tensor, exact_first: int = 0,
                 mode: str = "fallback", massive: tuple[int, float] | None = None):
        super().__init__()
        self.orig, self.exact_first, self.mode, self.massive = orig, exact_first, mode, massive
        self.register_buffer("alpha", alpha.float().clone())
        self.register_buffer("g", g.float().clone())
        self.register_buffer("b", b.float().clone())

    def dyt(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x) * self.g + self.b

    def with_mode(self, exact_first: int, mode: str = "fallback") -> "Probe":
        return Probe(self.orig, self.alpha, self.g, self.b, exact_first, mode, self.massive)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.exact_first
        if self.mode == "sink-only":
            y = self.orig(x).clone()
            y[..., :k, :] = self.dyt(x[..., :k, :])
            return y
        y = self.dyt(x)
        if k:
            y[..., :k, :] = self.orig(x[..., :k, :])
        if self.massive is not None:
            big = x[..., self.massive[0]].abs() > self.massive[1]
            if bool(big.any()):
                y[big] = self.orig(x[big])
        return y


def massive_rule(x: torch.Tensor, not_sink: torch.Tensor, factor: float = 8.0) -> tuple[int, float]:
    """(channel, threshold) that flags massive tokens at a site: the channel with the largest
    magnitude over the input, and `factor` times its median magnitude on ordinary tokens."""
    ch = int(x.abs().amax(0).argmax())
    return ch, factor * float(x[not_sink, ch].abs().median().clamp_min(1e-6))


def fit_scalar(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The library's fit (scalar alpha, per-channel weight and bias by least squares)."""
    f = fit_dyt(x, y)
    return torch.tensor(f.alpha), f.weight, f.bias


def _channel_resid(x: torch.Tensor, yc: torch.Tensor, y_var: torch.Tensor, a: torch.Tensor):
    """Per-channel residual variance of the best affine fit of y on tanh(a x) (a: [d]); two-pass
    (centred) variance, since mean(u^2) - mean(u)^2 cancels where a channel's mean dwarfs its spread."""
    u = torch.tanh(x * a)
    um = u.mean(0)
    uc = u - um
    var_u = uc.pow(2).mean(0).clamp_min(1e-300)
    cov = (uc * yc).mean(0)
    return (y_var - cov.pow(2) / var_u).clamp_min(0), cov / var_u, um


def fit_channel(x: torch.Tensor, y: torch.Tensor, grid_size: int = 41, refine_steps: int = 24,
                candidates: tuple[float, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel alpha: the library's objective separates by channel once alpha is a vector, so each
    channel gets its own grid search (relative to its own spread, 10^-3.5..10^1.5) and golden-section
    refinement, in float64; scalar `candidates` (the scalar fit's alpha) are tried too, so the result is
    never worse than a scalar fit on the same data."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    ym = y.mean(0)
    yc = y - ym
    y_var = yc.pow(2).mean(0)
    scale = x.std(0).clamp_min(1e-12)
    exps = torch.linspace(-3.5, 1.5, grid_size, dtype=torch.float64)
    errs = torch.stack([_channel_resid(x, yc, y_var, 10 ** e / scale)[0] for e in exps])  # [grid, d]
    k = errs.argmin(0)
    best_a, best_e = 10 ** exps[k] / scale, errs.min(0).values
    lo = torch.log(10 ** exps[(k - 1).clamp_min(0)] / scale)
    hi = torch.log(10 ** exps[(k + 1).clamp_max(grid_size - 1)] / scale)
    phi = (math.sqrt(5) - 1) / 2
    c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fc, fd = _channel_resid(x, yc, y_var, c.exp())[0], _channel_resid(x, yc, y_var, d.exp())[0]
    for _ in range(refine_steps):
        left = fc < fd
        hi = torch.where(left, d, hi)
        lo = torch.where(left, lo, c)
        nc = torch.where(left, hi - phi * (hi - lo), d)
        nd = torch.where(left, c, lo + phi * (hi - lo))
        c, d = nc, nd
        fc_new = _channel_resid(x, yc, y_var, c.exp())[0]
        fd_new = _channel_resid(x, yc, y_var, d.exp())[0]
        fc, fd = torch.where(left, fc_new, fd), torch.where(left, fc, fd_new)
    for a_try, e_try in ((c.exp(), fc), (d.exp(), fd), *[(torch.full_like(scale, v), None) for v in candidates]):
        if e_try is None:
            e_try = _channel_resid(x, yc, y_var, a_try)[0]
        better = e_try < best_e
        best_a, best_e = torch.where(better, a_try, best_a), torch.where(better, e_try, best_e)
    _, g, um = _channel_resid(x, yc, y_var, best_a)
    return best_a.float(), g.float(), (ym - g * um).float()


def fit_channel_scalar_init(x: torch.Tensor, y: torch.Tensor):
    return fit_channel(x, y, candidates=(fit_dyt(x, y).alpha,))


def fit_linear(x: torch.Tensor, y: torch.Tensor):
    """DyT in its linear regime (alpha * |x| <= 1e-4): a per-channel affine map of x, i.e. a norm frozen
    to a fixed per-channel scale (the 'FakeLN' start of published LN removal)."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    a = 1e-4 / float(x.abs().max())
    ym = y.mean(0)
    _, g, um = _channel_resid(x, y - ym, (y - ym).pow(2).mean(0), torch.full((x.shape[-1],), a, dtype=torch.float64))
    return torch.tensor(a), g.float(), (ym - g * um).float()


def _scalar_with(**kw) -> Callable:
    def fit(x: torch.Tensor, y: torch.Tensor):
        f = fit_dyt(x, y, **kw)
        return torch.tensor(f.alpha), f.weight, f.bias
    return fit


FITS: dict[str, Callable] = {"scalar": fit_scalar, "channel": fit_channel_scalar_init, "linear": fit_linear,
                             # the library's fit with other row samples for the alpha search, or all rows
                             "scalar_seed1": _scalar_with(seed=1), "scalar_seed2": _scalar_with(seed=2),
                             "scalar_all_rows": _scalar_with(search_rows=1 << 30)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements (float64 sums)."""
    return math.sqrt(float((a.double() - b.double()).pow(2).sum()) / max(float(b.double().pow(2).sum()), 1e-300))


# --------------------------------------------------------------------------- the layer stepper


class Stepper:
    """Runs the Llama decoder layer by layer (embedding, per layer: norm, attention, residual, norm,
    SwiGLU MLP, residual; final norm), so that two models that differ only in their norms can be
    stepped side by side on the same tokens."""

    def __init__(self, model: nn.Module):
        self.model, self.body = model, model.model
        self._ctx: dict[tuple[int, int], dict[str, Any]] = {}

    def ctx(self, ids: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments the decoder gives its layers (RoPE, causal mask) for this shape."""
        key = tuple(ids.shape)
        if key not in self._ctx:
            got: dict[str, Any] = {}

            class _Stop(Exception):
                pass

            def hook(mod, args, kwargs):
                got.update(kwargs)
                raise _Stop

            h = self.body.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                self.body(input_ids=ids)
            except _Stop:
                pass
            finally:
                h.remove()
            self._ctx[key] = {k: got.get(k) for k in ("attention_mask", "position_embeddings", "position_ids")}
        return self._ctx[key]

    def attn(self, layer: nn.Module, y: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return layer.self_attn(hidden_states=y, **ctx)[0]

    def sites(self) -> list[tuple[str, int | None, str]]:
        """(path, layer index, kind) in forward order; kind in {"attn", "mlp", "final"}."""
        out = []
        for i in range(len(self.body.layers)):
            out.append((f"model.layers.{i}.input_layernorm", i, "attn"))
            out.append((f"model.layers.{i}.post_attention_layernorm", i, "mlp"))
        out.append(("model.norm", None, "final"))
        return out

    def norm(self, path: str) -> nn.Module:
        if path == "model.norm":
            return self.body.norm
        i, name = path.split(".")[2], path.split(".")[3]
        return getattr(self.body.layers[int(i)], name)

    def install(self, probes: dict[str, nn.Module]) -> contextlib.AbstractContextManager:
        """Put the probes in the model in place of the norms (restored on exit)."""
        @contextlib.contextmanager
        def cm():
            old = {}
            for path, p in probes.items():
                parent, name = (self.body, "norm") if path == "model.norm" else (self.body.layers[int(path.split(".")[2])], path.split(".")[3])
                old[path] = (parent, name, getattr(parent, name))
                setattr(parent, name, p)
            try:
                yield
            finally:
                for parent, name, mod in old.values():
                    setattr(parent, name, mod)
        return cm()


def first_mask(shape: tuple[int, ...], k: int) -> torch.Tensor:
    """[B*T] bool: the first k positions of each sequence."""
    m = torch.zeros(shape[:2], dtype=torch.bool)
    m[:, :k] = True
    return m.reshape(-1)


@torch.no_grad()
def calibrate(st: Stepper, ids: torch.Tensor, *, sequential: bool = True, fit: str = "scalar", rows: str = "all",
              exact_first: int = 0, sink: int = 1, convert: Callable[[str, int | None, str], bool] = lambda *a: True,
              detail: bool = False, target: str = "original") -> tuple[dict[str, Probe], list[dict[str, Any]]]:
    """Fit a DyT probe for every site `convert` selects, layer by layer; the other sites keep the
    original norm. Sequential: fitted on the converted prefix's output; parallel: on the original's.
    The targets are always the original norm's outputs on the original's input. `rows`: "all" tokens
    in the fit, or "rest" (without the first `sink` positions of each block). `exact_first`: the
    probes keep the original norm for the first positions (in the converted prefix too).
    `target="local"` (sequential only): fit each site to the original norm applied to the converted
    prefix's output instead (imitate the norm where it is, rather than undo the upstream error).

    Per-site records: `fit_*`, the error on the input the fit saw (the converted prefix's output for
    sequential, the original's for parallel), for all tokens, the rest and the sink; `in_situ_*`, on
    the converted model's input (the same as fit_* for sequential); with `detail`, what the same
    input would give with other fits (without the sink, per-channel alpha, linear, known per-token
    scale) and how the site's error reaches its sub-layer's output."""
    ctx = st.ctx(ids)
    h_o = st.body.embed_tokens(ids).float()
    h_c = h_o.clone()
    d = h_o.shape[-1]
    fm = first_mask(tuple(ids.shape), sink)
    probes: dict[str, Probe] = {}
    records = []
    for path, i, kind in st.sites():
        norm = st.norm(path)
        y_o = norm(h_o)
        same = not probes  # no site converted yet: the two streams are the same tensor
        if convert(path, i, kind):
            x_in = h_c if sequential else h_o
            x_fit = x_in.reshape(-1, d)
            yr = (norm(h_c) if target == "local" else y_o).reshape(-1, d)
            sel = ~fm if rows in ("rest", "normal") else torch.ones_like(fm)
            massive = None
            if rows == "normal":  # massive tokens out of the fit, and through the original norm
                massive = massive_rule(x_fit, ~fm)
                sel = sel & ~(x_fit[:, massive[0]].abs() > massive[1])
            alpha, g, b = FITS[fit](x_fit[sel], yr[sel])
            probe = Probe(norm, alpha, g, b, exact_first, massive=massive)
            probes[path] = probe
            y_f = probe(x_in).reshape(-1, d)
            y_c = probe(h_c) if not sequential else y_f.reshape(h_c.shape)
            yc_flat = y_c.reshape(-1, d)
            rest_c = (y_f[~fm] - y_f[~fm].mean(0))
            rest_o = (yr[~fm] - yr[~fm].mean(0))
            rec = {"path": path, "layer": i, "kind": kind, "fit_rows": int(sel.sum()),
                   **({"massive_channel": massive[0], "massive_threshold": massive[1]} if massive else {}),
                   "alpha": float(alpha) if alpha.numel() == 1 else {"median": float(alpha.median()), "min": float(alpha.min()), "max": float(alpha.max())},
                   "fit_error": rel(y_f, yr), "fit_error_rest": rel(y_f[~fm], yr[~fm]), "fit_error_sink": rel(y_f[fm], yr[fm]),
                   "fit_sink_share_of_sq_error": float((y_f[fm] - yr[fm]).double().pow(2).sum() / (y_f - yr).double().pow(2).sum().clamp_min(1e-300)),
                   # < 1: the fitted output varies less than the target (least squares on a noisy input shrinks the gain)
                   "output_spread_ratio_rest": math.sqrt(float(rest_c.double().pow(2).sum() / rest_o.double().pow(2).sum())),
                   "in_situ_error_rest": rel(yc_flat[~fm], yr[~fm]), "in_situ_error_sink": rel(yc_flat[fm], yr[fm]),
                   **_massive_share(x_fit, y_f, yr, fm)}
            if alpha.numel() == 1:
                rest_std = float(x_fit[~fm].std())
                rec["alpha_x_rest_std"] = float(alpha) * rest_std
            if detail:
                xr, yrr = x_fit[~fm], yr[~fm]
                f_rest = fit_dyt(xr, yrr)
                rec["fit_without_sink_error_rest"] = f_rest.rel_error
                rec["fit_without_sink_alpha_x_rest_std"] = f_rest.alpha * float(xr.std())
                a_c, g_c, b_c = fit_channel(xr, yrr, candidates=(f_rest.alpha,))
                rec["channel_alpha_fit_without_sink_error_rest"] = rel(Probe(norm, a_c, g_c, b_c).dyt(xr), yrr)
                a_l, g_l, b_l = fit_linear(xr, yrr)
                rec["linear_fit_without_sink_error_rest"] = rel(Probe(norm, a_l, g_l, b_l).dyt(xr), yrr)
                # the floor if each token's scale were known: the same fit on x / rms(x)
                xn = xr / xr.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt()
                rec["known_scale_fit_error_rest"] = fit_dyt(xn, yrr).rel_error
            records.append(rec)
        else:
            y_c = y_o if same else norm(h_c)
        if kind == "final":
            break
        layer = st.body.layers[i]
        same = same and path not in probes
        if kind == "attn":
            if detail and path in probes:
                records[-1].update(_transfer_attn(st, layer, norm, probes[path], x_in, ctx, sink))
            h_o = h_o + st.attn(layer, y_o, ctx)
            h_c = h_o if same else h_c + st.attn(layer, y_c, ctx)
        else:
            if detail and path in probes:
                records[-1].update(_transfer_mlp(layer, norm, probes[path], x_in, sink))
            h_o = h_o + layer.mlp(y_o)
            h_c = h_o if same else h_c + layer.mlp(y_c)
    return probes, records


def _massive_share(x: torch.Tensor, y_f: torch.Tensor, y: torch.Tensor, fm: torch.Tensor) -> dict[str, Any]:
    """The massive-activation tokens at a site (`massive_rule` on the site's input: the sink, and
    the other tokens whose top channel exceeds 8x its ordinary size), their share of the rows and
    of the fit's squared error, and the fit error on them and on the ordinary tokens."""
    ch, thr = massive_rule(x, ~fm)
    big = (x[:, ch].abs() > thr) & ~fm
    e2 = (y_f - y).double().pow(2).sum(-1)
    ordinary = ~big & ~fm
    return {"massive_channel": ch, "massive_other_rows": int(big.sum()), "massive_other_row_share": float(big.float().mean()),
            "massive_other_share_of_sq_error": float(e2[big].sum() / e2.sum().clamp_min(1e-300)),
            "sink_and_massive_share_of_sq_error": float(e2[big | fm].sum() / e2.sum().clamp_min(1e-300)),
            "fit_error_massive_other": rel(y_f[big], y[big]) if bool(big.any()) else None,
            "fit_error_ordinary": rel(y_f[ordinary], y[ordinary])}


def _transfer_attn(st, layer, norm, probe, x, ctx, sink) -> dict[str, float]:
    """This site alone, on its converted-model input x: the error of the norm output and of the
    attention output of the non-sink tokens, with DyT on every token, with the sink token exact,
    and with DyT on the sink token only."""
    ref_n = norm(x)
    ref = st.attn(layer, ref_n, ctx)[:, sink:]
    out = {"local_norm_error_rest": rel(probe.with_mode(sink)(x)[:, sink:], ref_n[:, sink:])}
    for name, p in (("all", probe.with_mode(0)), ("sink_exact", probe.with_mode(sink)), ("sink_only", probe.with_mode(sink, "sink-only"))):
        out[f"attn_out_error_rest_{name}"] = rel(st.attn(layer, p(x), ctx)[:, sink:], ref)
    return out


def _transfer_mlp(layer, norm, probe, x, sink) -> dict[str, float]:
    """This site alone: norm output error and SwiGLU MLP output error of the non-sink tokens (the MLP
    is per token, so the sink does not reach them), and the same for a pure per-token scale error
    of the same size (how SwiGLU amplifies a scale error)."""
    ref_n = norm(x)[:, sink:]
    got = probe.with_mode(0)(x)[:, sink:]
    ref = layer.mlp(ref_n)
    e_n = rel(got, ref_n)
    # a per-token scale error with the fit's own per-token size: c_t = <got, ref> / |ref|^2
    c = (got * ref_n).sum(-1, keepdim=True) / ref_n.pow(2).sum(-1, keepdim=True)
    return {"local_norm_error_rest": e_n, "mlp_out_error_rest": rel(layer.mlp(got), ref),
            "scale_part_of_norm_error_rest": rel(c * ref_n, ref_n), "mlp_out_error_rest_scale_part_only": rel(layer.mlp(c * ref_n), ref)}


@torch.no_grad()
def held_out(st: Stepper, ids: torch.Tensor, probes: dict[str, Probe], sink: int = 1) -> list[dict[str, Any]]:
    """Per-site deviation on evaluation tokens with the probes installed: the site's own error
    (probe vs the original norm on the same converted-model input) and the total deviation from the
    original model's norm output (upstream error included), each for the sink and the rest."""
    ctx = st.ctx(ids)
    h_o = st.body.embed_tokens(ids).float()
    h_c = h_o.clone()
    d = h_o.shape[-1]
    fm = first_mask(tuple(ids.shape), sink)
    out = []
    for path, i, kind in st.sites():
        norm = st.norm(path)
        y_o = norm(h_o)
        p = probes.get(path, norm)
        y_c = p(h_c)
        if path in probes:
            own = norm(h_c).reshape(-1, d)
            yc, yo = y_c.reshape(-1, d), y_o.reshape(-1, d)
            out.append({"path": path, "layer": i, "kind": kind,
                        "site_error": rel(yc, own), "site_error_rest": rel(yc[~fm], own[~fm]), "site_error_sink": rel(yc[fm], own[fm]),
                        "sink_share_of_sq_site_error": float((yc[fm] - own[fm]).double().pow(2).sum() / (yc - own).double().pow(2).sum().clamp_min(1e-300)),
                        "deviation_rest": rel(yc[~fm], yo[~fm]), "deviation_sink": rel(yc[fm], yo[fm]),
                        "residual_deviation_rest": rel(h_c.reshape(-1, d)[~fm], h_o.reshape(-1, d)[~fm]),
                        **_stream_figures(h_o.reshape(-1, d), h_c.reshape(-1, d), fm)})
        if kind == "final":
            break
        layer = st.body.layers[i]
        if kind == "attn":
            h_o, h_c = h_o + st.attn(layer, y_o, ctx), h_c + st.attn(layer, y_c, ctx)
        else:
            h_o, h_c = h_o + layer.mlp(y_o), h_c + layer.mlp(y_c)
    return out


def _stream_figures(h_o: torch.Tensor, h_c: torch.Tensor, fm: torch.Tensor) -> dict[str, float]:
    """Per-token figures of the residual stream entering a site, converted (h_c) against original:
    the median and largest relative deviation of the non-sink tokens, and the sink's RMS in both
    (does the converted model still build the sink's massive activation?)."""
    dev = (h_c - h_o).norm(dim=-1) / h_o.norm(dim=-1).clamp_min(1e-30)
    rms_o, rms_c = h_o.pow(2).mean(-1).sqrt(), h_c.pow(2).mean(-1).sqrt()
    return {"token_deviation_rest_median": float(dev[~fm].median()), "token_deviation_rest_max": float(dev[~fm].max()),
            "sink_rms_original": float(rms_o[fm].mean()), "sink_rms_converted": float(rms_c[fm].mean()),
            "rest_rms_ratio_median": float((rms_c[~fm] / rms_o[~fm]).median())}


# ------------------------------------------------------------------------------------- helpers


def machine(threads: int) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # each costs a log-softmax over [1024, 49152] per block


@torch.no_grad()
def ppl(model: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Perplexity as `normswap.evaluation.perplexity.causal_perplexity` computes it (the same windows
    and targets; with stride == max_length every token but the first is scored once), plus two
    figures that a badly calibrated (over- or under-confident) model cannot game: top-1 accuracy and
    the perplexity at the best of a few logit temperatures (an oracle of one parameter)."""
    from normswap.evaluation.perplexity import causal_windows, safe_exp

    t0 = time.perf_counter()
    nll_t = torch.zeros(len(TEMPERATURES), dtype=torch.float64)
    nlls, correct = [], 0
    for b, e, first_new in causal_windows(int(ids.numel()), BLOCK, BLOCK):
        x, y = ids[b:e][None], ids[b + 1:e + 1]
        logits = model(input_ids=x).logits.float()[0, first_new:]
        y = y[first_new:]
        nlls.append(nn.functional.cross_entropy(logits, y, reduction="none").double())
        correct += int((logits.argmax(-1) == y).sum())
        for j, t in enumerate(TEMPERATURES):
            nll_t[j] += nn.functional.cross_entropy(logits / t, y, reduction="sum").double()
    nll = torch.cat(nlls)
    n = nll.numel()
    if not torch.isfinite(nll).all():
        raise RuntimeError("non-finite token loss")
    j = int(nll_t.argmin())
    return {"ppl": safe_exp(float(nll.mean())), "nll": float(nll.mean()), "nll_median": float(nll.median()),
            "nll_p99": float(torch.quantile(nll.float(), 0.99)), "scored_tokens": n, "top1": correct / n,
            "best_temperature": TEMPERATURES[j], "ppl_best_temperature": safe_exp(float(nll_t[j]) / n),
            "seconds": round(time.perf_counter() - t0, 1)}


def unigram_ppl(all_ids: torch.Tensor, eval_ids: torch.Tensor) -> dict[str, Any]:
    """A context-free reference: the unigram distribution of the text outside the evaluation range
    (add-0.5 smoothing over the vocabulary), scored on the evaluation targets."""
    vocab = int(max(all_ids.max(), eval_ids.max())) + 1
    counts = torch.bincount(all_ids[eval_ids.numel() + 1:], minlength=vocab).double() + 0.5
    logp = (counts / counts.sum()).log()
    nll = -logp[eval_ids[1:]]
    return {"ppl": math.exp(float(nll.mean())), "nll": float(nll.mean()), "scored_tokens": int(nll.numel()),
            "count_tokens": int(all_ids.numel() - eval_ids.numel() - 1)}


def summarize(records: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Medians of `keys` by site kind and by depth third."""
    out: dict[str, Any] = {}
    groups = {"attn": lambda r: r["kind"] == "attn", "mlp": lambda r: r["kind"] == "mlp", "final": lambda r: r["kind"] == "final"}
    for name, f in groups.items():
        sel = [r for r in records if f(r)]
        if sel:
            out[name] = {k: float(torch.tensor([r[k] for r in sel if k in r]).median()) for k in keys if any(k in r for r in sel)}
    return out


# ------------------------------------------------------------------------------------- sections


class Ctx:
    def __init__(self, args: argparse.Namespace):
        from normswap.evaluation.perplexity import read_text, tokenize_text
        from normswap.loading import load_pretrained, load_tokenizer
        from normswap.samples import token_blocks

        self.args = args
        self.path = str(args.model)
        self.tok = load_tokenizer(self.path)
        self.model = load_pretrained(self.path).float().eval()
        self.st = Stepper(self.model)
        text = read_text(args.text)
        all_ids = tokenize_text(self.tok, text)
        self.all_ids = all_ids
        self.eval_ids = all_ids[: args.max_tokens]
        self.ablation_ids = all_ids[: min(args.ablation_tokens, args.max_tokens)]  # the ppl-* sections but `ppl`
        n_blocks = max(1, min(args.diag_tokens, self.eval_ids.numel() - 1) // BLOCK)
        self.diag_ids = self.eval_ids[: n_blocks * BLOCK].reshape(n_blocks, BLOCK)  # evaluation blocks, for held-out errors
        # the library's default calibration: the built-in sample, 128-token blocks, --calib-tokens 4096
        self.calib = {"sample": torch.cat([b["input_ids"] for b in token_blocks(self.model, self.tok, None, n_tokens=4096)])}
        # WikiText-2 raw test text after the evaluation range (disjoint from it), 4,096 tokens
        start = max(args.max_tokens, 16384) + BLOCK
        wiki = all_ids[start:start + 4096]
        self.calib["wiki128"] = wiki[: (wiki.numel() // 128) * 128].reshape(-1, 128)
        self.calib["wiki1024"] = wiki[: (wiki.numel() // BLOCK) * BLOCK].reshape(-1, BLOCK)
        if args.calib_blocks:  # smoke tests
            self.calib = {k: v[: args.calib_blocks] for k, v in self.calib.items()}
        self._cache: dict[str, tuple[dict[str, Probe], list[dict[str, Any]], float]] = {}
        self._ppl: dict[tuple, dict[str, Any]] = {}

    def fitted(self, name: str, calib: str = "sample", **kw) -> tuple[dict[str, Probe], list[dict[str, Any]], float]:
        """The probes of one calibration, computed once per process (`detail` changes the records only)."""
        if name not in self._cache:
            t0 = time.perf_counter()
            probes, recs = calibrate(self.st, self.calib[calib], **kw)
            self._cache[name] = (probes, recs, time.perf_counter() - t0)
            print(f"  calibrated {name}: {len(probes)} sites in {self._cache[name][2]:.0f} s", file=sys.stderr)
        return self._cache[name]

    def variant_ppl(self, probes: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, Any]:
        """Perplexity with these probes installed; the same probes (object identity) on the same
        number of tokens are measured once per process (the references of the ablation sections)."""
        key = (tuple(sorted((k, id(v)) for k, v in probes.items())), int(ids.numel()))
        if key not in self._ppl:
            with self.st.install(probes):
                self._ppl[key] = ppl(self.model, ids)
        return self._ppl[key]


@torch.no_grad()
def section_stats(c: Ctx) -> dict[str, Any]:
    """Per-token RMS of every norm's input on the diagnostic evaluation blocks, original model."""
    st, ids = c.st, c.diag_ids
    ctx = st.ctx(ids)
    h = st.body.embed_tokens(ids).float()
    rows, massive = [], {}
    for path, i, kind in st.sites():
        r = h.pow(2).mean(-1).sqrt()  # [B, T]
        rest = r[:, 1:].reshape(-1)
        med = float(rest.median())
        ch = h[:, 0].abs().argmax(-1)
        big = float(h[:, 0].abs().amax(-1).median())
        chan = int(torch.mode(ch).values)
        c507 = h[:, 1:, chan].reshape(-1)
        share = float((h[:, 1:, chan].pow(2) / h[:, 1:].pow(2).sum(-1)).median())
        rows.append({"path": path, "layer": i, "kind": kind, "median_rms": med,
                     "sink_rms_over_median": float((r[:, 0] / med).median()),
                     "max_other_rms_over_median": float(rest.max() / med),
                     "p01_rms_over_median": float(torch.quantile(rest, 0.01) / med), "p05_rms_over_median": float(torch.quantile(rest, 0.05) / med),
                     "p95_rms_over_median": float(torch.quantile(rest, 0.95) / med), "p99_rms_over_median": float(torch.quantile(rest, 0.99) / med),
                     "other_tokens_over_4x": int((rest > 4 * med).sum()),
                     # the spread of the per-token scale that DyT cannot divide out (sink excluded)
                     "rms_cv_rest": float(rest.std() / rest.mean()),
                     "sink_top_channel": chan, "sink_top_channel_value": big,
                     "top_channel_rest_mean": float(c507.mean()), "top_channel_rest_std": float(c507.std()),
                     "top_channel_share_of_rest_sq_norm": share,
                     "sink_share_of_sq_norm": float(h[:, 0].pow(2).sum() / h.pow(2).sum())})
        if kind == "attn" and i in MASSIVE_LAYERS:
            massive[str(i)] = _massive_tokens(c.tok, ids, h, r, med)
        if kind == "final":
            break
        layer = st.body.layers[i]
        y = st.norm(path)(h)
        h = h + (st.attn(layer, y, ctx) if kind == "attn" else layer.mlp(y))
    return {"tokens": int(ids.numel()), "blocks": list(ids.shape), "sites": rows, "massive_tokens_at_input_layernorm": massive}


MASSIVE_LAYERS = (3, 12, 20, 29)


def _massive_tokens(tok, ids: torch.Tensor, h: torch.Tensor, r: torch.Tensor, med: float, factor: float = 4.0) -> dict[str, Any]:
    """The tokens whose residual RMS exceeds `factor` x the median of the non-sink tokens: how many,
    at which positions, which token strings, which channel carries them and its value."""
    big = r > factor * med
    big_rest = big.clone()
    big_rest[:, 0] = False
    b_idx, t_idx = big_rest.nonzero(as_tuple=True)
    order = r[b_idx, t_idx].argsort(descending=True)
    tops = []
    for k in order[:12].tolist():
        b, t = int(b_idx[k]), int(t_idx[k])
        v = h[b, t]
        ch = int(v.abs().argmax())
        tops.append({"block": b, "position": t, "token": tok.decode([int(ids[b, t])]), "previous": tok.decode([int(ids[b, t - 1])]),
                     "rms_over_median": float(r[b, t] / med), "top_channel": ch, "top_channel_value": float(v[ch])})
    strings: dict[str, int] = {}
    for b, t in zip(b_idx.tolist(), t_idx.tolist()):
        w = tok.decode([int(ids[b, t])])
        strings[w] = strings.get(w, 0) + 1
    return {"threshold_factor": factor, "sink_blocks_over": int(big[:, 0].sum()), "blocks": int(ids.shape[0]),
            "other_tokens_over": int(big_rest.sum()), "other_tokens": int(ids[:, 1:].numel()),
            "token_strings": dict(sorted(strings.items(), key=lambda kv: -kv[1])[:10]), "largest": tops}


def section_sites(c: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"calibration": "built-in sample, 128-token blocks (library default)",
                           "calib_tokens": int(c.calib["sample"].numel()), "held_out_tokens": int(c.diag_ids.numel())}
    keys_fit = ["fit_error", "fit_error_rest", "fit_error_sink", "fit_sink_share_of_sq_error", "output_spread_ratio_rest",
                "in_situ_error_rest", "in_situ_error_sink", "alpha_x_rest_std", "fit_without_sink_error_rest",
                "fit_without_sink_alpha_x_rest_std", "channel_alpha_fit_without_sink_error_rest", "linear_fit_without_sink_error_rest",
                "known_scale_fit_error_rest", "attn_out_error_rest_all", "attn_out_error_rest_sink_exact", "attn_out_error_rest_sink_only",
                "local_norm_error_rest", "mlp_out_error_rest", "scale_part_of_norm_error_rest", "mlp_out_error_rest_scale_part_only"]
    keys_ho = ["site_error", "site_error_rest", "site_error_sink", "sink_share_of_sq_site_error", "deviation_rest", "deviation_sink",
               "residual_deviation_rest"]
    # detail (other fits, the error a site passes to its sub-layer) on the parallel fits only: there
    # each site's input is the original model's, so the figures are the site's own
    for name, kw in (("sequential", SEQ), ("parallel", dict(sequential=False, detail=True)), ("sequential_rest_fallback", REST_FB)):
        probes, recs, secs = c.fitted(name, **kw)
        out[name] = {"calibration_seconds": round(secs, 1), "fit": recs, "fit_median_by_kind": summarize(recs, keys_fit)}
        if name != "parallel":  # the parallel fits' own errors are the point; their model is far off (see ppl)
            ho = held_out(c.st, c.diag_ids, probes)
            out[name].update(held_out=ho, held_out_median_by_kind=summarize(ho, keys_ho))
        print(f"  sites {name}: done", file=sys.stderr)
    # the sequential probes with the sink through the exact norm at evaluation only (ppl-sink)
    ho = held_out(c.st, c.diag_ids, _with_mode(c.fitted("sequential", **SEQ)[0], 1))
    out["sequential_sink_exact_at_eval"] = {"held_out": ho, "held_out_median_by_kind": summarize(ho, keys_ho)}
    return out


def _keep_final(probes: dict[str, Probe]) -> dict[str, Probe]:
    return {k: v for k, v in probes.items() if k != "model.norm"}


def _with_mode(probes: dict[str, Probe], k: int, mode: str = "fallback") -> dict[str, Probe]:
    return {p: v.with_mode(k, mode) for p, v in probes.items()}


def _final(p, i, k):
    return k == "final"


def _attn(p, i, k):
    return k == "attn"


def _mlp(p, i, k):
    return k == "mlp"


def _layers(lo: int, hi: int) -> Callable:
    return lambda p, i, k: i is not None and lo <= i <= hi


SEQ = dict(sequential=True)
REST_FB = dict(sequential=True, rows="rest", exact_first=1)  # position 0 out of the fit, and through the original norm
# Perplexity variants: (section, name, calibration name, calibration keywords, transform of the probes).
# A calibration is computed once per process under its name; the transform makes the evaluated model
# from its probes (None: as fitted). Calibration text: the built-in sample unless `calib` says otherwise.
VARIANTS: list[tuple[str, str, str | None, dict[str, Any], Callable | None]] = [
    ("ppl", "original", None, {}, None),
    ("ppl", "unigram", None, {}, None),  # no model: the unigram distribution of the rest of the text
    ("ppl", "dyt_sequential", "sequential", SEQ, None),
    ("ppl-sink", "dyt_parallel", "parallel", dict(sequential=False), None),
    ("ppl-sink", "dyt_sequential_sink_exact_at_eval", "sequential", SEQ, lambda p: _with_mode(p, 1)),
    ("ppl-sink", "dyt_sequential_sink_only", "sequential", SEQ, lambda p: _with_mode(p, 1, "sink-only")),
    ("ppl-sink", "dyt_parallel_sink_only", "parallel", dict(sequential=False), lambda p: _with_mode(p, 1, "sink-only")),
    ("ppl-sink", "dyt_parallel_sink_exact_at_eval", "parallel", dict(sequential=False), lambda p: _with_mode(p, 1)),
    ("ppl-sink", "dyt_fit_without_sink", "sequential_rest", dict(sequential=True, rows="rest"), None),
    ("ppl-sink", "dyt_fit_without_sink_sink_exact", "sequential_rest_fallback", REST_FB, None),
    ("ppl-parts", "keep_final", "sequential", SEQ, _keep_final),
    ("ppl-parts", "keep_final_fit_without_sink_sink_exact", "sequential_rest_fallback", REST_FB, _keep_final),
    ("ppl-parts", "final_only", "final_only", dict(convert=_final), None),
    ("ppl-parts", "attn_norms_only", "attn_only", dict(convert=_attn), None),
    ("ppl-parts", "mlp_norms_only", "mlp_only", dict(convert=_mlp), None),
    ("ppl-parts", "attn_norms_only_fit_without_sink_sink_exact", "attn_only_rest_fb", dict(REST_FB, convert=_attn), None),
    ("ppl-parts", "mlp_norms_only_fit_without_sink_sink_exact", "mlp_only_rest_fb", dict(REST_FB, convert=_mlp), None),
    ("ppl-layers", "layers_0_9", "layers_0_9", dict(convert=_layers(0, 9)), None),
    ("ppl-layers", "layers_10_19", "layers_10_19", dict(convert=_layers(10, 19)), None),
    ("ppl-layers", "layers_20_29", "layers_20_29", dict(convert=_layers(20, 29)), None),
    ("ppl-layers", "layers_0_9_fit_without_sink_sink_exact", "layers_0_9_rest_fb", dict(REST_FB, convert=_layers(0, 9)), None),
    ("ppl-layers", "layers_10_19_fit_without_sink_sink_exact", "layers_10_19_rest_fb", dict(REST_FB, convert=_layers(10, 19)), None),
    ("ppl-layers", "layers_20_29_fit_without_sink_sink_exact", "layers_20_29_rest_fb", dict(REST_FB, convert=_layers(20, 29)), None),
    ("ppl-fits", "channel_alpha", "channel", dict(fit="channel"), None),
    ("ppl-fits", "channel_alpha_fit_without_sink_sink_exact", "channel_rest_fb", dict(REST_FB, fit="channel"), None),
    ("ppl-fits", "linear_fit_without_sink_sink_exact", "linear_rest_fb", dict(REST_FB, fit="linear"), None),
    ("ppl-massive", "massive_tokens_exact", "seq_massive_fb", dict(REST_FB, rows="normal"), None),
    ("ppl-massive", "massive_tokens_exact_layers_0_9", "massive_fb_0_9", dict(REST_FB, rows="normal", convert=_layers(0, 9)), None),
    ("ppl-massive", "massive_tokens_exact_layers_12_29", "massive_fb_12_29", dict(REST_FB, rows="normal", convert=_layers(12, 29)), None),
    ("ppl-massive", "massive_tokens_exact_layers_12_29_and_final", "massive_fb_12_29_final",
     dict(REST_FB, rows="normal", convert=lambda p, i, k: k == "final" or (i is not None and i >= 12)), None),
    ("ppl-fits", "local_target", "seq_local", dict(target="local"), None),
    ("ppl-fits", "local_target_fit_without_sink_sink_exact", "seq_local_rest_fb", dict(REST_FB, target="local"), None),
    ("ppl-noise", "dyt_sequential_search_seed1", "seq_seed1", dict(fit="scalar_seed1"), None),
    ("ppl-noise", "dyt_sequential_search_seed2", "seq_seed2", dict(fit="scalar_seed2"), None),
    ("ppl-noise", "dyt_sequential_search_all_rows", "seq_all_rows", dict(fit="scalar_all_rows"), None),
    ("ppl-noise", "dyt_fit_without_sink_sink_exact_search_seed1", "rest_fb_seed1", dict(REST_FB, fit="scalar_seed1"), None),
    ("ppl-calib", "wiki128_calibration", "wiki128", dict(calib="wiki128"), None),
    ("ppl-calib", "wiki1024_calibration", "wiki1024", dict(calib="wiki1024"), None),
    ("ppl-calib", "wiki1024_fit_without_sink_sink_exact", "wiki1024_rest_fb", dict(REST_FB, calib="wiki1024"), None),
]
PPL_SECTIONS = tuple(dict.fromkeys(v[0] for v in VARIANTS))
# the default selection (--variants core): what docs/dyt-on-llama.md reports, in well under 25 min on one core
CORE = {"original", "unigram", "dyt_sequential", "dyt_parallel", "dyt_sequential_sink_exact_at_eval", "dyt_fit_without_sink_sink_exact",
        "keep_final", "final_only", "attn_norms_only", "mlp_norms_only", "massive_tokens_exact"}
DEFAULT_SECTIONS = ("stats", "sites", "ppl", "ppl-sink", "ppl-parts", "ppl-massive")


def section_ppl_variants(c: Ctx, section: str) -> dict[str, Any]:
    """The perplexity of each selected variant of `section` (--variants: "core", "all" or names).
    Section `ppl` is measured on --max-tokens; the others on --ablation-tokens, with the original
    model's perplexity on those tokens as their reference."""
    ids = c.eval_ids if section == "ppl" else c.ablation_ids
    out: dict[str, Any] = {"eval_tokens": int(ids.numel()), "block": BLOCK}
    chosen = [v for v in VARIANTS if v[0] == section and (c.args.variants == ["all"] or v[1] in c.args.variants
                                                           or (c.args.variants == ["core"] and v[1] in CORE))]
    if section != "ppl" and chosen:  # references on the same tokens (measured once, see Ctx.variant_ppl)
        chosen[:0] = [(section, "original", None, {}, None), (section, "dyt_sequential", "sequential", SEQ, None)]
    for sec, name, calib_name, kw, transform in chosen:
        if name == "unigram":
            out[name] = unigram_ppl(c.all_ids, ids)
            print(f"  ppl {name}: {out[name]['ppl']:.2f}", file=sys.stderr)
            continue
        if calib_name is None:
            probes, info = {}, {}
        else:
            probes, recs, secs = c.fitted(calib_name, **kw)
            probes = transform(probes) if transform else probes
            info = {"calibration": calib_name, "calibration_seconds": round(secs, 1), "sites": len(probes),
                    "median_fit_error_rest": float(torch.tensor([r["fit_error_rest"] for r in recs]).median())}
        out[name] = {**info, **c.variant_ppl(probes, ids)}
        print(f"  ppl {name}: {out[name]['ppl']:.2f} ({out[name]['seconds']} s)", file=sys.stderr)
    return out


def section_library(c: Ctx) -> dict[str, Any]:
    """The library's own default conversion, and how this script's calibration compares."""
    import normswap
    from normswap.loading import load_pretrained

    t0 = time.perf_counter()
    model, res = normswap.convert(load_pretrained(c.path), "dyt", tokenizer=c.tok)
    secs = time.perf_counter() - t0
    seq_recs = {r["path"]: r for r in c.fitted("sequential", sequential=True)[1]}
    sites = []
    for s in res.record.sites:
        mine = seq_recs.get(s.path, {})
        sites.append({"path": s.path, "alpha": s.alpha, "rel_error": res.calibration[s.path]["rel_error"],
                      "rel_error_alpha_0.5": res.calibration[s.path]["rel_error_alpha_0.5"],
                      "script_alpha": mine.get("alpha"), "script_rel_error": mine.get("fit_error")})
    rel_alpha = max(abs(s["alpha"] - s["script_alpha"]) / s["alpha"] for s in sites if s["script_alpha"])
    out = {"convert_seconds": round(secs, 1), "max_rel_alpha_difference_vs_script": rel_alpha, "sites": sites,
           **{f"library_{k}": v for k, v in ppl(model, c.eval_ids).items()}}
    print(f"  library: {secs:.0f} s, ppl {out['library_ppl']:.2f}, max alpha difference {rel_alpha:.2e}", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------- report


REPORT_LAYERS = (0, 1, 2, 3, 6, 9, 11, 12, 15, 18, 21, 24, 27, 28, 29)


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, dict):
        return f"{v['median']:.3g} ({v['min']:.2g}-{v['max']:.2g})"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:,.{nd}f}" if abs(v) >= 1 or v == 0 else f"{v:.{nd}g}" if abs(v) < 0.01 else f"{v:.{nd}f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_f(v) if not isinstance(v, str) else v for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _by_site(recs: list[dict[str, Any]]) -> dict[tuple[Any, str], dict[str, Any]]:
    return {(r["layer"], r["kind"]): r for r in recs}


def report(results: dict[str, Any]) -> str:
    """The markdown tables of docs/dyt-on-llama.md, from the JSON of the sections run so far."""
    out = []
    if "stats" in results:
        S = results["stats"]
        rows = [[r["layer"] if r["layer"] is not None else "final", r["median_rms"], r["sink_rms_over_median"], r["sink_top_channel"],
                 r["sink_top_channel_value"], r["sink_share_of_sq_norm"], r["max_other_rms_over_median"], r["other_tokens_over_4x"],
                 r["p99_rms_over_median"], r["rms_cv_rest"]]
                for r in S["sites"] if (r["layer"] in REPORT_LAYERS and r["kind"] == "attn") or r["kind"] == "final"]
        out.append(f"### Residual stream entering input_layernorm (original model, {S['tokens']:,} evaluation tokens, "
                   f"{S['blocks'][0]} blocks of {S['blocks'][1]})\n\n" + _table(
                       ["layer", "median RMS", "sink / median", "sink's top channel", "its median |value|", "sink's share of all sq. norm",
                        "max other / median", "other tokens > 4x", "p99 / median", "CV of RMS (rest)"], rows))
        rows = []
        for layer, m in S.get("massive_tokens_at_input_layernorm", {}).items():
            top = m["largest"][:3]
            rows.append([layer, f"{m['sink_blocks_over']}/{m['blocks']}", f"{m['other_tokens_over']}/{m['other_tokens']}",
                         ", ".join(f"{k!r} x{v}" for k, v in list(m["token_strings"].items())[:5]),
                         "; ".join(f"pos {t['position']} {t['token']!r} {t['rms_over_median']:.0f}x ch {t['top_channel']}" for t in top)])
        if rows:
            out.append("### Massive tokens (RMS > 4x the median) entering input_layernorm\n\n" + _table(
                ["layer", "sink blocks over", "other tokens over", "their token strings", "largest others (position, token, RMS / median, channel)"],
                rows))
    if "sites" in results:
        S = results["sites"]
        seq, par = _by_site(S["sequential"]["fit"]), _by_site(S["parallel"]["fit"])
        hs = _by_site(S["sequential"]["held_out"])
        for kind, title in (("attn", "input_layernorm (read by q, k, v)"), ("mlp", "post_attention_layernorm (read by SwiGLU gate, up)")):
            rows = []
            for i in REPORT_LAYERS:
                q, p_ = seq[(i, kind)], par[(i, kind)]
                rows.append([i, p_["fit_error_ordinary"], p_["fit_error_sink"], p_["fit_error_massive_other"], p_["massive_other_row_share"],
                             p_["fit_sink_share_of_sq_error"], p_["sink_and_massive_share_of_sq_error"], p_["fit_without_sink_error_rest"],
                             p_["known_scale_fit_error_rest"], q["fit_error_rest"], q["fit_error_sink"], q["output_spread_ratio_rest"],
                             hs[(i, kind)]["site_error_rest"], hs[(i, kind)]["residual_deviation_rest"]])
            out.append(f"### Fit error by depth: {title}\n\n" + _table(
                ["layer", "parallel: ordinary tokens", "sink", "other massive", "other massive: share of rows", "sink: share of sq. error",
                 "sink + massive: share of sq. error", "fit without sink: rest", "known per-token scale: rest",
                 "sequential: rest", "sequential: sink", "sequential: output spread / target's", "held-out, sequential: site's own error (rest)",
                 "held-out, sequential: residual deviation (rest)"], rows))
        fin = [("parallel", par[(None, "final")]), ("sequential", seq[(None, "final")])]
        hf = hs[(None, "final")]
        out.append("### Final norm (its output feeds the tied LM head)\n\n" + _table(
            ["calibration", "alpha", "fit error ordinary", "sink", "sink: share of sq. error", "fit without sink", "known per-token scale",
             "output spread / target's"],
            [[n, r["alpha"], r["fit_error_ordinary"], r["fit_error_sink"], r["fit_sink_share_of_sq_error"], r.get("fit_without_sink_error_rest"),
              r.get("known_scale_fit_error_rest"), r["output_spread_ratio_rest"]] for n, r in fin])
            + f"\n\nHeld out (sequential probes): the final site's own error on the rest {_f(hf['site_error_rest'])}, "
              f"deviation from the original's final-norm output {_f(hf['deviation_rest'])}.")
        hv = {n: _by_site(S[n]["held_out"]) for n in HELD_OUT if n in S}
        rows = []
        for i in (*REPORT_LAYERS, None):
            key = (i, "attn") if i is not None else (None, "final")
            row: list[Any] = [i if i is not None else "final", hv["sequential"][key]["sink_rms_original"]]
            for n in hv:
                r = hv[n][key]
                row += [r["token_deviation_rest_median"], r["token_deviation_rest_max"], r["sink_rms_converted"]]
            rows.append(row)
        head = ["entering layer", "sink RMS, original"]
        for n in hv:
            head += [f"{HELD_OUT[n]}: token deviation (rest), median", "max", "sink RMS"]
        out.append(f"### Held out: the converted model's residual stream against the original's ({S['held_out_tokens']:,} evaluation tokens)\n\n"
                   + _table(head, rows))
        rows = []
        for i in REPORT_LAYERS:
            a, m = par[(i, "attn")], par[(i, "mlp")]
            rows.append([i, a["local_norm_error_rest"], a["attn_out_error_rest_all"], a["attn_out_error_rest_sink_exact"],
                         a["attn_out_error_rest_sink_only"], m["local_norm_error_rest"], m["mlp_out_error_rest"],
                         m["mlp_out_error_rest"] / max(m["local_norm_error_rest"], 1e-30), m["scale_part_of_norm_error_rest"],
                         m["mlp_out_error_rest_scale_part_only"]])
        out.append("### What one site's error does to its sub-layer's output (parallel fits, non-sink tokens)\n\n" + _table(
            ["layer", "input_layernorm error", "attention out error: DyT on all", "sink exact", "DyT on sink only",
             "post_attention_layernorm error", "SwiGLU out error", "ratio", "per-token scale part of the norm error",
             "SwiGLU out error of that part alone"], rows))
        med = {n: S[n]["fit_median_by_kind"] for n in ("sequential", "parallel")}
        out.append("### Medians over sites\n\n```json\n" + json.dumps(med, indent=1, default=float) + "\n```")
    ppl_rows = []
    for sec in PPL_SECTIONS:
        R = results.get(sec, {})
        for name, v in R.items():
            if isinstance(v, dict) and "ppl" in v:
                ppl_rows.append([sec, R["eval_tokens"], name, v.get("sites", ""), v["ppl"], v.get("top1"), v.get("ppl_best_temperature"),
                                 v.get("best_temperature"), v.get("calibration_seconds"), v.get("seconds")])
    if ppl_rows:
        out.append(f"### Perplexity (WikiText-2 raw test, first N tokens, {BLOCK}-token blocks)\n\n" + _table(
            ["section", "N", "variant", "DyT sites", "ppl", "top-1", "ppl at best T", "T", "calibration s", "eval s"], ppl_rows))
    if "library" in results:
        L = results["library"]
        out.append(f"### Library default\n\nnormswap.convert(..., 'dyt'): {L['convert_seconds']} s, ppl {L['library_ppl']:.2f}; "
                   f"largest relative alpha difference from this script's sequential calibration {L['max_rel_alpha_difference_vs_script']:.2e}")
    for k in ("machine", "protocol"):
        if k in results:
            out.append(f"### {k}\n\n```json\n" + json.dumps(results[k], indent=1) + "\n```")
    runs = {s: results[s]["_run"] for s in SECTIONS if s in results and "_run" in results[s]}
    out.append("### runs\n\n" + _table(["section", "seconds", "load start", "load end", "date"],
                                        [[s, r["seconds"], str(r["loadavg_start"]), str(r["loadavg_end"]), r["date"]] for s, r in runs.items()]))
    return "\n\n".join(out) + "\n"


HELD_OUT = {"sequential": "sequential", "sequential_sink_exact_at_eval": "same, sink exact at eval",
            "sequential_rest_fallback": "fit without sink, sink exact"}


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Three panels: per-token RMS entering each norm (sink, largest other token, p99, against the
    median); the parallel (own) fit error by depth per site kind, for ordinary tokens and the sink;
    the sequential fit error and the held-out residual deviation by depth."""
    if "stats" not in results or "sites" not in results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8))
    depth = lambda r: 30 if r["layer"] is None else r["layer"] + (0.5 if r["kind"] == "mlp" else 0.0)  # noqa: E731
    st = results["stats"]["sites"]
    x = [depth(r) for r in st]
    for key, label, style in (("sink_rms_over_median", "sink (position 0)", "o-"), ("max_other_rms_over_median", "largest other token", "s-"),
                              ("p99_rms_over_median", "p99 of other tokens", "^-")):
        ax[0].plot(x, [r[key] for r in st], style, ms=3, label=label)
    ax[0].set_yscale("log")
    ax[0].set_title("per-token RMS entering each norm / median (original)")
    S = results["sites"]
    par, seq = S["parallel"]["fit"], S["sequential"]["fit"]
    for kind, colour in (("attn", "C0"), ("mlp", "C1"), ("final", "C3")):
        rs = [r for r in par if r["kind"] == kind]
        name = {"attn": "input_ln", "mlp": "post_attn_ln", "final": "final norm"}[kind]
        ax[1].plot([depth(r) for r in rs], [r["fit_error_ordinary"] for r in rs], "o-", color=colour, ms=3, label=f"{name}: ordinary")
        ax[1].plot([depth(r) for r in rs], [r["fit_error_sink"] for r in rs], "x:", color=colour, ms=4, label=f"{name}: sink")
        if kind != "final":
            ax[1].plot([depth(r) for r in rs], [r["fit_without_sink_error_rest"] for r in rs], "--", color=colour, alpha=0.6,
                       label=f"{name}: rest, fit w/o sink")
        rq = [r for r in seq if r["kind"] == kind]
        ax[2].plot([depth(r) for r in rq], [r["fit_error_rest"] for r in rq], "o-", color=colour, ms=3, label=f"{name}: fit error (rest)")
    for n, style in zip(HELD_OUT, ("k--", "k:", "k-.")):
        if n in S:
            rh = S[n]["held_out"]
            ax[2].plot([depth(r) for r in rh], [r["token_deviation_rest_median"] for r in rh], style,
                       label=f"held-out drift, {HELD_OUT[n]}")
    ax[1].set_yscale("log")
    ax[1].set_ylim(0.04, 3000)  # room for the legend above the curves
    ax[2].set_yscale("log")
    ax[1].set_title("own fit error per site (parallel: original inputs)")
    ax[2].set_title("sequential: fit error per site; residual drift on held-out text")
    for a in ax:
        a.set_xlabel("layer (x.5: post_attention_layernorm; 30: final norm)")
        a.grid(alpha=0.3)
        a.legend(fontsize=6.5, **({"ncol": 3, "loc": "upper left"} if a is ax[1] else {}))
    ax[1].set_ylabel("relative RMS error")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RUNNERS: dict[str, Callable] = {"stats": section_stats, "sites": section_sites, "library": section_library,
                                **{s: (lambda c, s=s: section_ppl_variants(c, s)) for s in PPL_SECTIONS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the fetch.sh folder of SmolLM2-135M-Instruct")
    ap.add_argument("--text", type=Path, default=asset("wikitext2-raw-test", "wiki.test.raw"))
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated, from {', '.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})")
    ap.add_argument("--variants", default="core",
                    help="perplexity variants: 'core' (the documented set, CORE), 'all', or comma-separated names (see VARIANTS)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens (perplexity)")
    ap.add_argument("--ablation-tokens", type=int, default=8192, help="evaluation tokens of the ppl-* sections other than ppl")
    ap.add_argument("--diag-tokens", type=int, default=2048, help="evaluation tokens for per-site held-out errors and stats")
    ap.add_argument("--calib-blocks", type=int, default=0, help="use only this many calibration blocks (smoke tests; 0: all)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/dyt_llama_analysis.json"))
    ap.add_argument("--report", action="store_true", help="print the markdown tables from --out and exit (runs nothing)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="copy the sections of these JSON files (runs of other sections, e.g. in parallel) into --out and exit")
    args = ap.parse_args(argv)
    if args.merge:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        for f in args.merge:
            results.update({k: v for k, v in json.loads(f.read_text()).items() if k in SECTIONS})
        args.out.write_text(json.dumps(results, indent=1, default=float) + "\n")
        return 0
    if args.report:
        results = json.loads(args.out.read_text())
        sys.stdout.write(report(results))
        png = plot(results, args.out.with_suffix(".png"))
        if png:
            print(f"wrote {png}", file=sys.stderr)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}: choose from {SECTIONS}")
    if not (args.model / "config.json").exists():
        ap.error(f"{args.model}: no model folder; build it with PYTHON=$(which python) ../shared/assets/smollm2-135m-instruct/fetch.sh")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    c = Ctx(args)
    results["machine"] = machine(args.threads)
    results["protocol"] = {"model": str(args.model), "text": str(args.text), "eval_tokens": int(c.eval_ids.numel()), "block": BLOCK,
                           "diag_tokens": int(c.diag_ids.numel()), "sink": "position 0 of each block",
                           "calibration": {k: list(v.shape) for k, v in c.calib.items()}}
    for s in sections:
        print(f"section {s} (load {loadavg()})", file=sys.stderr)
        t0 = time.perf_counter()
        load0 = loadavg()
        res = RUNNERS[s](c)
        if s.startswith("ppl") and isinstance(results.get(s), dict) and results[s].get("eval_tokens") == res["eval_tokens"]:
            res = {**results[s], **res}  # variants measured before (same protocol) are kept
        res["_run"] = {"seconds": round(time.perf_counter() - t0, 1), "loadavg_start": load0, "loadavg_end": loadavg(),
                       "max_tokens": args.max_tokens, "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        results[s] = res
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float) + "\n")
        tmp.replace(args.out)
    png = plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
