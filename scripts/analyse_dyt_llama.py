"""Issue 12, item 5: where DyT calibration loses SmolLM2-135M-Instruct (a 30-layer Llama).

Measures, on the fetch.sh folder of SmolLM2-135M-Instruct (../shared/assets/smollm2-135m-instruct):

- `stats`: per-token residual RMS by layer on the evaluation text (first / attention-sink token
  and the largest other tokens against the median, the channel that carries them);
- `sites`: per-site DyT fit error by depth, sequential vs parallel calibration, and where it comes
  from: the sink token (position 0 of each block) against the other tokens, in the fit and on
  held-out evaluation text; the error a site passes on to its sub-layer (attention, SwiGLU MLP);
  the floor left if the per-token scale were known (fit on x / rms(x)); per-channel alpha;
- `ppl`, `ppl-parts`, `ppl-fits`: WikiText-2 raw test perplexity (first `--max-tokens` tokens,
  non-overlapping 1,024-token blocks, as in assets/README.md) of DyT variants: all sites, the sink
  token handled by the exact RMSNorm, the final norm kept, only attention / only MLP norms,
  groups of layers, per-channel alpha, other calibration text;
- `library`: `normswap.convert(..., "dyt")` with its defaults, to check that this script's
  layer-by-layer calibration reproduces the library's (alphas, fit errors, perplexity).

The calibration here is the library's own fit (`normswap.calibration.fit_dyt`) driven layer by
layer: the original and the converted model are stepped through the decoder side by side, so a
sequential calibration costs two forward passes instead of one per site (the library's
`_capture` reruns the converted prefix for each of the 61 sites). Sequential: each site is fitted
on the converted prefix's output, targets are the original norm's outputs on the original's
input, exactly as `normswap.conversion._convert_sites`.

    python scripts/analyse_dyt_llama.py [--sections stats,sites,ppl,ppl-parts,ppl-fits,library]
        [--threads 1] [--max-tokens 16384] [--out bench-results/dyt_llama_analysis.json]

Each section adds its key to the JSON file (results already there from other sections are kept),
so the sections can be run one at a time. On 2 shared cores with 1 thread: stats ~0.5 min, sites
~4 min, library ~5 min, each perplexity ~80 s at 16,384 tokens (ppl 6 of them, ppl-parts 8,
ppl-fits 5).
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

SECTIONS = ("stats", "sites", "ppl", "ppl-sink", "ppl-parts", "ppl-layers", "ppl-fits", "ppl-noise", "ppl-calib", "library")
DEFAULT_MODEL = Path(os.environ.get("NORMSWAP_CACHE", Path.home() / ".cache" / "normswap-assets")) / "smollm2-135m-instruct"
BLOCK = 1024  # evaluation block (assets/README.md protocol)


# ------------------------------------------------------------------------------------ DyT probes


class Probe(nn.Module):
    """A replacement for one norm site: DyT `g * tanh(alpha x) + b` (alpha a scalar or per channel),
    with the original norm kept for the first `exact_first` positions of each sequence
    (`mode="fallback"`), or DyT applied to those positions only (`mode="sink-only"`)."""

    def __init__(self, orig: nn.Module, alpha: torch.Tensor, g: torch.Tensor, b: torch.Tensor, exact_first: int = 0,
                 mode: str = "fallback"):
        super().__init__()
        self.orig, self.exact_first, self.mode = orig, exact_first, mode
        self.register_buffer("alpha", alpha.float().clone())
        self.register_buffer("g", g.float().clone())
        self.register_buffer("b", b.float().clone())

    def dyt(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x) * self.g + self.b

    def with_mode(self, exact_first: int, mode: str = "fallback") -> "Probe":
        return Probe(self.orig, self.alpha, self.g, self.b, exact_first, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.exact_first
        if self.mode == "sink-only":
            y = self.orig(x).clone()
            y[..., :k, :] = self.dyt(x[..., :k, :])
            return y
        y = self.dyt(x)
        if k:
            y[..., :k, :] = self.orig(x[..., :k, :])
        return y


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
        if convert(path, i, kind):
            x_in = h_c if sequential else h_o
            x_fit = x_in.reshape(-1, d)
            yr = (norm(h_c) if target == "local" else y_o).reshape(-1, d)
            sel = ~fm if rows == "rest" else torch.ones_like(fm)
            alpha, g, b = FITS[fit](x_fit[sel], yr[sel])
            probe = Probe(norm, alpha, g, b, exact_first)
            probes[path] = probe
            y_f = probe(x_in).reshape(-1, d)
            y_c = probe(h_c) if not sequential else y_f.reshape(h_c.shape)
            yc_flat = y_c.reshape(-1, d)
            rest_c = (y_f[~fm] - y_f[~fm].mean(0))
            rest_o = (yr[~fm] - yr[~fm].mean(0))
            rec = {"path": path, "layer": i, "kind": kind,
                   "alpha": float(alpha) if alpha.numel() == 1 else {"median": float(alpha.median()), "min": float(alpha.min()), "max": float(alpha.max())},
                   "fit_error": rel(y_f, yr), "fit_error_rest": rel(y_f[~fm], yr[~fm]), "fit_error_sink": rel(y_f[fm], yr[fm]),
                   "fit_sink_share_of_sq_error": float((y_f[fm] - yr[fm]).double().pow(2).sum() / (y_f - yr).double().pow(2).sum().clamp_min(1e-300)),
                   # < 1: the fitted output varies less than the target (least squares on a noisy input shrinks the gain)
                   "output_spread_ratio_rest": math.sqrt(float(rest_c.double().pow(2).sum() / rest_o.double().pow(2).sum())),
                   "in_situ_error_rest": rel(yc_flat[~fm], yr[~fm]), "in_situ_error_sink": rel(yc_flat[fm], yr[fm])}
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
            y_c = norm(h_c)
        if kind == "final":
            break
        layer = st.body.layers[i]
        if kind == "attn":
            if detail and path in probes:
                records[-1].update(_transfer_attn(st, layer, norm, probes[path], x_in, ctx, sink))
            h_o = h_o + st.attn(layer, y_o, ctx)
            h_c = h_c + st.attn(layer, y_c, ctx)
        else:
            if detail and path in probes:
                records[-1].update(_transfer_mlp(layer, norm, probes[path], x_in, sink))
            h_o = h_o + layer.mlp(y_o)
            h_c = h_c + layer.mlp(y_c)
    return probes, records


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
                        "residual_deviation_rest": rel(h_c.reshape(-1, d)[~fm], h_o.reshape(-1, d)[~fm])})
        if kind == "final":
            break
        layer = st.body.layers[i]
        if kind == "attn":
            h_o, h_c = h_o + st.attn(layer, y_o, ctx), h_c + st.attn(layer, y_c, ctx)
        else:
            h_o, h_c = h_o + layer.mlp(y_o), h_c + layer.mlp(y_c)
    return out


# ------------------------------------------------------------------------------------- helpers


def machine(threads: int) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def ppl(model: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    from normswap.evaluation.perplexity import causal_perplexity

    t0 = time.perf_counter()
    r = causal_perplexity(model, ids, max_length=BLOCK, stride=BLOCK, batch_size=2, progress=False)
    return {"ppl": r.value, "nll": r.nll, "nll_median": r.nll_median, "nll_p99": r.nll_p99, "scored_tokens": r.tokens,
            "seconds": round(time.perf_counter() - t0, 1)}


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
        self.eval_ids = all_ids[: args.max_tokens]
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

    def fitted(self, name: str, calib: str = "sample", **kw) -> tuple[dict[str, Probe], list[dict[str, Any]], float]:
        """The probes of one calibration, computed once per process (`detail` changes the records only)."""
        if name not in self._cache:
            t0 = time.perf_counter()
            probes, recs = calibrate(self.st, self.calib[calib], **kw)
            self._cache[name] = (probes, recs, time.perf_counter() - t0)
            print(f"  calibrated {name}: {len(probes)} sites in {self._cache[name][2]:.0f} s", file=sys.stderr)
        return self._cache[name]

    def variant_ppl(self, probes: dict[str, nn.Module]) -> dict[str, Any]:
        with self.st.install(probes):
            return ppl(self.model, self.eval_ids)


@torch.no_grad()
def section_stats(c: Ctx) -> dict[str, Any]:
    """Per-token RMS of every norm's input on the diagnostic evaluation blocks, original model."""
    st, ids = c.st, c.diag_ids
    ctx = st.ctx(ids)
    h = st.body.embed_tokens(ids).float()
    rows = []
    for path, i, kind in st.sites():
        r = h.pow(2).mean(-1).sqrt()  # [B, T]
        rest = r[:, 1:].reshape(-1)
        med = float(rest.median())
        ch = h[:, 0].abs().argmax(-1)
        big = int(h[:, 0].abs().amax(-1).median())
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
                     "top_channel_share_of_rest_sq_norm": share})
        if kind == "final":
            break
        layer = st.body.layers[i]
        y = st.norm(path)(h)
        h = h + (st.attn(layer, y, ctx) if kind == "attn" else layer.mlp(y))
    # which tokens are the large non-sink ones in the early layers
    return {"tokens": int(ids.numel()), "blocks": list(ids.shape), "sites": rows}


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
    for name, kw in (("sequential", dict(sequential=True, detail=True)), ("parallel", dict(sequential=False, detail=True)),
                     ("sequential_rest_fallback", dict(sequential=True, rows="rest", exact_first=1))):
        probes, recs, secs = c.fitted(name, **kw)
        ho = held_out(c.st, c.diag_ids, probes)
        out[name] = {"calibration_seconds": round(secs, 1), "fit": recs, "held_out": ho,
                     "fit_median_by_kind": summarize(recs, keys_fit), "held_out_median_by_kind": summarize(ho, keys_ho)}
        print(f"  sites {name}: done", file=sys.stderr)
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
    ("ppl", "dyt_sequential", "sequential", SEQ, None),
    ("ppl", "dyt_parallel", "parallel", dict(sequential=False), None),
    ("ppl-sink", "dyt_sequential_sink_exact_at_eval", "sequential", SEQ, lambda p: _with_mode(p, 1)),
    ("ppl-sink", "dyt_sequential_sink_only", "sequential", SEQ, lambda p: _with_mode(p, 1, "sink-only")),
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


def section_ppl_variants(c: Ctx, section: str) -> dict[str, Any]:
    """The perplexity of each variant of `section` (or only those named by --variants)."""
    out: dict[str, Any] = {"eval_tokens": int(c.eval_ids.numel()), "block": BLOCK}
    for sec, name, calib_name, kw, transform in VARIANTS:
        if sec != section or (c.args.variants and name not in c.args.variants):
            continue
        if calib_name is None:
            probes, info = {}, {}
        else:
            probes, recs, secs = c.fitted(calib_name, **kw)
            probes = transform(probes) if transform else probes
            info = {"calibration": calib_name, "calibration_seconds": round(secs, 1), "sites": len(probes),
                    "median_fit_error_rest": float(torch.tensor([r["fit_error_rest"] for r in recs]).median())}
        out[name] = {**info, **c.variant_ppl(probes)}
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
        rows = [[r["layer"] if r["layer"] is not None else "final", r["kind"], r["median_rms"], r["sink_rms_over_median"],
                 r["max_other_rms_over_median"], r["other_tokens_over_4x"], f"{r['p05_rms_over_median']:.2f} / {r['p95_rms_over_median']:.2f}",
                 r.get("rms_cv_rest"),
                 r["sink_top_channel"], r["sink_top_channel_value"], r["top_channel_share_of_rest_sq_norm"]]
                for r in results["stats"]["sites"] if r["layer"] in REPORT_LAYERS and r["kind"] != "mlp" or r["kind"] == "final"]
        out.append("### Residual stream entering each norm (original model, %d evaluation tokens)\n\n" % results["stats"]["tokens"] + _table(
            ["layer", "site", "median RMS", "sink / median", "max other / median", "other tokens > 4x", "p05 / p95 of RMS / median",
             "CV of RMS (rest)",
             "sink's top channel", "its value", "that channel's share of other tokens' squared norm"], rows))
    if "sites" in results:
        S = results["sites"]
        seq, par = _by_site(S["sequential"]["fit"]), _by_site(S["parallel"]["fit"])
        hs, hp = _by_site(S["sequential"]["held_out"]), _by_site(S["parallel"]["held_out"])
        hf = _by_site(S["sequential_rest_fallback"]["held_out"])
        ff = _by_site(S["sequential_rest_fallback"]["fit"])
        for kind, title in (("attn", "input_layernorm (read by q, k, v)"), ("mlp", "post_attention_layernorm (read by SwiGLU gate, up)")):
            rows = []
            for i in REPORT_LAYERS:
                q, p_ = seq[(i, kind)], par[(i, kind)]
                rows.append([i, p_["fit_error_rest"], p_["fit_error_sink"], p_["fit_sink_share_of_sq_error"], q["fit_error_rest"], q["fit_error_sink"],
                             q["output_spread_ratio_rest"], hp[(i, kind)]["residual_deviation_rest"], hs[(i, kind)]["residual_deviation_rest"],
                             hf[(i, kind)]["residual_deviation_rest"]])
            out.append(f"### Fit error by depth: {title}\n\n" + _table(
                ["layer", "parallel: rest", "parallel: sink", "sink share of sq. error", "sequential: rest", "sequential: sink",
                 "sequential output spread / target's", "held-out residual deviation, parallel", "sequential", "sequential, sink exact"], rows))
        fin = [("parallel", par[(None, "final")], hp[(None, "final")]), ("sequential", seq[(None, "final")], hs[(None, "final")]),
               ("sequential, fit without sink, sink exact", ff[(None, "final")], hf[(None, "final")])]
        out.append("### Final norm\n\n" + _table(["calibration", "fit error rest", "fit error sink", "alpha x std(rest)",
                                                  "held-out site error rest", "held-out deviation rest"],
                                                 [[n, r and r["fit_error_rest"], r and r["fit_error_sink"], r and r.get("alpha_x_rest_std"),
                                                   h["site_error_rest"], h["deviation_rest"]] for n, r, h in fin]))
        rows = []
        for i in REPORT_LAYERS:
            p_ = par[(i, "attn")]
            rows.append([i, p_["alpha_x_rest_std"], p_["fit_error_rest"], p_["fit_without_sink_alpha_x_rest_std"], p_["fit_without_sink_error_rest"],
                         p_["channel_alpha_fit_without_sink_error_rest"], p_["linear_fit_without_sink_error_rest"], p_["known_scale_fit_error_rest"],
                         p_["attn_out_error_rest_all"], p_["attn_out_error_rest_sink_exact"], p_["attn_out_error_rest_sink_only"]])
        out.append("### input_layernorm on the original's input (parallel fits): fits, and the attention output of the other tokens\n\n" + _table(
            ["layer", "alpha x std(rest)", "rest error", "without sink: alpha x std", "rest error", "per-channel alpha", "linear (alpha -> 0)",
             "known per-token scale", "attn out error: DyT all", "sink exact", "DyT on sink only"], rows))
        rows = []
        for i in REPORT_LAYERS:
            p_ = par[(i, "mlp")]
            rows.append([i, p_["fit_error_rest"], p_["fit_without_sink_error_rest"], p_["channel_alpha_fit_without_sink_error_rest"],
                         p_["linear_fit_without_sink_error_rest"], p_["local_norm_error_rest"], p_["mlp_out_error_rest"],
                         p_["mlp_out_error_rest"] / max(p_["local_norm_error_rest"], 1e-30), p_["scale_part_of_norm_error_rest"],
                         p_["mlp_out_error_rest_scale_part_only"]])
        out.append("### post_attention_layernorm on the original's input (parallel fits): fits, and the SwiGLU output\n\n" + _table(
            ["layer", "rest error", "without sink", "per-channel alpha", "linear", "norm out error", "MLP out error", "ratio",
             "per-token scale part of norm error", "MLP out error of that part alone"], rows))
        med = {n: S[n]["fit_median_by_kind"] for n in ("sequential", "parallel")}
        out.append("### Medians over sites\n\n```json\n" + json.dumps(med, indent=1, default=float) + "\n```")
    ppl_rows = []
    for sec in PPL_SECTIONS:
        for name, v in results.get(sec, {}).items():
            if isinstance(v, dict) and "ppl" in v:
                ppl_rows.append([sec, name, v.get("sites", ""), v["ppl"], v["nll"], v["nll_median"], v.get("median_fit_error_rest")])
    if ppl_rows:
        first = next(results[s] for s in PPL_SECTIONS if s in results)
        out.append(f"### Perplexity (WikiText-2 raw test, first {first['eval_tokens']:,} tokens, {first['block']}-token blocks)\n\n" + _table(
            ["section", "variant", "DyT sites", "ppl", "nll", "median token nll", "median fit error (rest)"], ppl_rows))
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


RUNNERS: dict[str, Callable] = {"stats": section_stats, "sites": section_sites, "library": section_library,
                                **{s: (lambda c, s=s: section_ppl_variants(c, s)) for s in PPL_SECTIONS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the fetch.sh folder of SmolLM2-135M-Instruct")
    ap.add_argument("--text", type=Path, default=asset("wikitext2-raw-test", "wiki.test.raw"))
    ap.add_argument("--sections", default=",".join(s for s in SECTIONS if s != "library"),
                    help=f"comma-separated, from {', '.join(SECTIONS)} (default: all but library)")
    ap.add_argument("--variants", default="", help="comma-separated perplexity variant names: run only these (see VARIANTS)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens (perplexity)")
    ap.add_argument("--diag-tokens", type=int, default=4096, help="evaluation tokens for per-site held-out errors and stats")
    ap.add_argument("--calib-blocks", type=int, default=0, help="use only this many calibration blocks (smoke tests; 0: all)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/dyt_llama_analysis.json"))
    ap.add_argument("--report", action="store_true", help="print the markdown tables from --out and exit (runs nothing)")
    args = ap.parse_args(argv)
    if args.report:
        sys.stdout.write(report(json.loads(args.out.read_text())))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
