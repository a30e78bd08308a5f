"""Inference latency: the original LayerNorm model against folded RMSNorm and folded DyT, eager and
torch.compile, over a small grid of batch x sequence sizes, for the gpt2 stand-in and a
gpt2-small-shaped model (random weights, 768 x 12 layers, vocabulary 50257).

Variants (all from the same original weights):
- original: the transformers model with nn.LayerNorm;
- rmsnorm: `normswap.convert(..., "rmsnorm", fold=True)` (exact; weightless RMSNorms, the tied head
  keeps the final norm's affine and the embedding lookups are centred on the fly);
- dyt: `normswap.convert(..., "dyt", fold=True, alpha_init=0.5)` (the latency of the DyT
  architecture; alpha's value does not change the cost, so no calibration is run).

Forward passes under torch.inference_mode, logits included. Measurements are interleaved in rounds
(each variant once per round, same shape, the order reversed every other round) and reported as
medians; the ratios to the original are medians of per-round ratios, so load from other processes
affects every variant alike, with a 95% bootstrap interval of that median.

    HF_HUB_OFFLINE=1 python scripts/bench_inference.py
    python scripts/bench_inference.py --models small --grid 1x512,8x512 --modes compiled

Writes bench-results/inference-<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GRIDS = {"standin": "1x128,1x256,8x256", "small": "1x128,1x512,8x512"}


def build(name: str):
    import normswap
    from transformers import GPT2Config, GPT2LMHeadModel

    if name == "standin":
        from normswap.assets import asset
        from normswap.loading import load_pretrained

        path = asset("gpt2-standin-wt2")
        make = lambda: load_pretrained(str(path))  # noqa: E731
    else:
        config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)

        def make():
            torch.manual_seed(0)
            m = GPT2LMHeadModel(config)
            with torch.no_grad():  # non-trivial norm affines so that folding really changes weights
                for n, p in m.named_parameters():
                    if ".ln_" in n or "ln_f" in n:
                        p.add_(torch.randn_like(p) * 0.1)
            return m.eval()
    original = make()
    rms, _ = normswap.convert(make(), "rmsnorm", fold=True)
    dyt, _ = normswap.convert(make(), "dyt", fold=True, alpha_init=0.5)
    return {"original": original, "rmsnorm": rms.eval(), "dyt": dyt.eval()}


def time_call(fn, device: str, min_time: float, max_iters: int = 50) -> float:
    times = []
    t_end = time.perf_counter() + min_time
    while (time.perf_counter() < t_end or not times) and len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bootstrap_ci(ratios: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the median per-round ratio: how far the headline ratio can be trusted."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return [round(medians[int(0.025 * n)], 4), round(medians[int(0.975 * n) - 1], 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="standin,small")
    ap.add_argument("--grid", default=None, help="batch x seq list (default per model)")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per variant per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids OpenMP spin-waiting on shared cores)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from _measure_common import write_json

    device = args.device
    # every variant and shape is a separate graph of the same transformers code: without a higher
    # limit dynamo silently falls back to eager after 8 of them
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 256
    if hasattr(dynamo.config, "recompile_limit"):
        dynamo.config.recompile_limit = 256
    out = args.out or Path(f"bench-results/inference-{device}.json")
    report: dict = {"benchmark": "inference", "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
                    "load_avg_start": os.getloadavg(), "rounds": args.rounds, "results": []}
    for model_name in args.models.split(","):
        dynamo.reset()
        variants = {k: m.to(device) for k, m in build(model_name).items()}
        ref_out = {}
        for mode in args.modes.split(","):
            runners = {k: (m if mode == "eager" else torch.compile(m, dynamic=False)) for k, m in variants.items()}
            for cell in (args.grid or GRIDS[model_name]).split(","):
                b, s = map(int, cell.split("x"))
                ids = torch.randint(0, 50257, (b, s), generator=torch.Generator().manual_seed(0)).to(device)
                fns = {k: (lambda r=r: r(input_ids=ids).logits) for k, r in runners.items()}
                t0 = time.perf_counter()
                with torch.inference_mode():
                    outs = {k: fn() for k, fn in fns.items()}  # warm-up (compiles)
                    outs = {k: fn().float() for k, fn in fns.items()}
                    warm_s = time.perf_counter() - t0
                    base = outs["original"]
                    dev = {k: float((o - base).abs().max() / base.abs().max()) for k, o in outs.items()}
                    ref_out.setdefault(cell, base)
                    per_round = {k: [] for k in fns}
                    order = list(fns)
                    for r in range(args.rounds):  # alternate the order so that no variant always runs first
                        for k in (order if r % 2 == 0 else order[::-1]):
                            per_round[k].append(time_call(fns[k], device, args.min_time))
                orig = per_round["original"]
                for k, ts in per_round.items():
                    report["results"].append({
                        "model": model_name, "mode": mode, "batch": b, "seq": s, "variant": k,
                        "median_ms": round(statistics.median(ts) * 1e3, 3),
                        "ratio_to_original": round(statistics.median([t / o for t, o in zip(ts, orig)]), 4),
                        "ratio_ci95": bootstrap_ci([t / o for t, o in zip(ts, orig)]),
                        "ratio_per_round": [round(t / o, 4) for t, o in zip(ts, orig)],
                        "max_rel_logit_diff_vs_original": dev[k], "warmup_s": round(warm_s, 1),
                    })
                print(f"{model_name} {mode} {cell}: " + ", ".join(
                    f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in per_round.items()), file=sys.stderr)
    report["load_avg_end"] = os.getloadavg()
    write_json(out, report)
    print(f"{'model':>8} {'mode':>9} {'b x s':>7} {'variant':>8} {'ms':>9} {'/orig':>6} {'95% CI':>15}")
    for r in report["results"]:
        print(f"{r['model']:>8} {r['mode']:>9} {str(r['batch']) + 'x' + str(r['seq']):>7} {r['variant']:>8} {r['median_ms']:>9.2f} {r['ratio_to_original']:>6.3f} {r['ratio_ci95'][0]:>7.3f}-{r['ratio_ci95'][1]:.3f}")


if __name__ == "__main__":
    main()
