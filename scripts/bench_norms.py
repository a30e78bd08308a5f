"""Norm layers alone: LayerNorm, RMSNorm and DyT (normswap's, with and without affine), eager and
torch.compile, with achieved memory bandwidth against a plain copy measured in the same run.

Bandwidth counts the bytes a layer must move at least: read x, write y (2 x numel x itemsize; the
per-channel affine vectors are negligible). The copy reference is `out.copy_(x)`, eager and compiled.
Measurements are interleaved in rounds (every variant once per round) and each figure is the
median over rounds, so that load from other processes hits all variants alike; ratios (fraction of
copy bandwidth, time relative to LayerNorm) are medians of per-round ratios.

    HF_HUB_OFFLINE=1 python scripts/bench_norms.py            # CPU; on a GPU when one is present
    python scripts/bench_norms.py --shapes 4096x768 --rounds 5 --device cpu

Writes bench-results/norms.json (or --out).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from normswap import kernels  # noqa: E402
from normswap.modules import DyT, RMSNorm  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, min_time: float = 0.2, max_iters: int = 200) -> float:
    """Median seconds per call over a short burst (after one warm-up call)."""
    fn()
    _sync(device)
    times = []
    t_end = time.perf_counter() + min_time
    while (time.perf_counter() < t_end or len(times) < 5) and len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layers(d: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    ln = nn.LayerNorm(d, eps=1e-5)
    rms = RMSNorm(d, 1e-5, weight=True, bias=True)
    rms_folded = RMSNorm(d, 1e-5, weight=False, bias=False)
    dyt = DyT(d, alpha=0.5)
    dyt_folded = DyT(d, alpha=0.5, weight=False, bias=False)
    for m in (ln, rms, dyt):
        with torch.no_grad():
            m.weight.normal_(1.0, 0.1)
            m.bias.normal_(0.0, 0.1)
    return {"layernorm": ln, "rmsnorm": rms, "rmsnorm_folded": rms_folded, "dyt": dyt, "dyt_folded": dyt_folded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="512x768,4096x768,4096x1600", help="tokens x hidden")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids OpenMP spin-waiting on shared cores)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from _measure_common import write_json

    device, dtype = args.device, getattr(torch, args.dtype)
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 256  # one graph per layer variant and shape; never fall back to eager
    if hasattr(dynamo.config, "recompile_limit"):
        dynamo.config.recompile_limit = 256
    out = args.out or Path(f"bench-results/norms-{device}.json")
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    report: dict = {"benchmark": "norms", "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
                    "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_avg_start": os.getloadavg(), "rounds": args.rounds, "results": []}
    for shape in args.shapes.split(","):
        n, d = map(int, shape.split("x"))
        x = torch.randn(n, d, device=device, dtype=dtype)
        buf = torch.empty_like(x)
        mods = {k: m.to(device=device, dtype=dtype).eval() for k, m in layers(d).items()}
        fns: dict[tuple[str, str], object] = {}
        t0 = time.perf_counter()
        for mode in modes:
            fns[("copy", mode)] = (lambda: buf.copy_(x)) if mode == "eager" else _compiled_copy(buf, x)
            for k, m in mods.items():
                f = m if mode == "eager" else torch.compile(m, dynamic=False)
                fns[(k, mode)] = (lambda f=f: f(x))
        # DyT's inference kernels one by one (the layer above runs whichever normswap.kernels picks):
        # the tanh formula in one buffer (normswap's inference path before the sigmoid form), the
        # eager sigmoid form, and the compiled sigmoid form called from eager code
        dyt = mods["dyt"]
        p = (dyt.alpha, dyt.weight, dyt.bias)
        fns[("dyt_tanh_inplace", "eager")] = lambda: _dyt_tanh_inplace(x, *p)
        fns[("dyt_sigmoid_eager", "eager")] = lambda: kernels.dyt_eager(x, *p)
        if not args.no_compile:
            compiled_kernel = torch.compile(kernels.dyt_sigmoid_form, dynamic=True)
            fns[("dyt_sigmoid_compiled", "eager")] = lambda: compiled_kernel(x, *p)
        compile_s = time.perf_counter() - t0
        with torch.inference_mode():
            for fn in fns.values():  # warm-up (compiles)
                fn()
            per_round: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
            for _ in range(args.rounds):
                for key, fn in fns.items():
                    per_round[key].append(time_call(fn, device))
        nbytes = 2 * x.numel() * x.element_size()
        for (name, mode), ts in per_round.items():
            if name.startswith("dyt_"):
                eager_ts = per_round[("dyt_tanh_inplace", "eager")]  # time_vs_eager: against the tanh formula
            else:
                eager_ts = per_round[(name, "eager")]
            copy_ts = per_round[("copy", mode)]
            ln_ts = per_round[("layernorm", mode)]
            report["results"].append({
                "shape": [n, d], "layer": name, "mode": mode,
                "median_us": round(statistics.median(ts) * 1e6, 2),
                "bandwidth_gbs": round(nbytes / statistics.median(ts) / 1e9, 2),
                "fraction_of_copy_bw": round(statistics.median([c / t for c, t in zip(copy_ts, ts)]), 4),
                "time_vs_layernorm_same_mode": round(statistics.median([t / l for t, l in zip(ts, ln_ts)]), 4),
                "time_vs_eager": round(statistics.median([t / e for t, e in zip(ts, eager_ts)]), 4),
            })
        report.setdefault("setup_s", {})[shape] = round(compile_s, 2)
        print(f"{shape}: done", file=sys.stderr)
    if not args.no_compile:
        report["dyt_crossover_d768"] = crossover(768, device, dtype, args.rounds)
        report["dyt_compile_min_numel"] = kernels.COMPILE_MIN_NUMEL
    report["load_avg_end"] = os.getloadavg()
    write_json(out, report)
    rows = report["results"]
    print(f"{'shape':>10} {'layer':>15} {'mode':>9} {'us':>9} {'GB/s':>7} {'/copy':>6} {'/LN':>6}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>10} {r['layer']:>15} {r['mode']:>9} {r['median_us']:>9.1f} {r['bandwidth_gbs']:>7.2f} "
              f"{r['fraction_of_copy_bw']:>6.3f} {r['time_vs_layernorm_same_mode']:>6.3f}")
    for r in report.get("dyt_crossover_d768", []):
        print(f"DyT {r['numel']:>8} elements: eager {r['eager_us']:>8.1f} us, compiled {r['compiled_us']:>8.1f} us ({r['compiled_vs_eager']:.2f}x)")


def _dyt_tanh_inplace(x, alpha, weight, bias):
    y = x * alpha
    y.tanh_()
    return y.mul_(weight).add_(bias)


def crossover(d: int, device: str, dtype, rounds: int) -> list[dict]:
    """Eager sigmoid form against the compiled kernel from 1 token up: where compiling starts to pay."""
    alpha, w, b = torch.tensor(0.5, device=device, dtype=dtype), torch.randn(d, device=device, dtype=dtype), torch.randn(d, device=device, dtype=dtype)
    compiled_kernel = torch.compile(kernels.dyt_sigmoid_form, dynamic=True)
    rows = []
    with torch.inference_mode():
        for n in (1, 8, 32, 64, 85, 128, 256, 512, 1024):
            x = torch.randn(n, d, device=device, dtype=dtype)
            eager, comp = [], []
            compiled_kernel(x, alpha, w, b)
            for _ in range(rounds):
                eager.append(time_call(lambda: kernels.dyt_eager(x, alpha, w, b), device, 0.05))
                comp.append(time_call(lambda: compiled_kernel(x, alpha, w, b), device, 0.05))
            rows.append({"numel": n * d, "eager_us": round(statistics.median(eager) * 1e6, 2), "compiled_us": round(statistics.median(comp) * 1e6, 2),
                         "compiled_vs_eager": round(statistics.median([c / e for c, e in zip(comp, eager)]), 4)})
    return rows


def _compiled_copy(buf: torch.Tensor, x: torch.Tensor):
    f = torch.compile(lambda a: a.clone(), dynamic=False)  # an out-of-place copy: read x, write a new tensor
    return lambda: f(x)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
