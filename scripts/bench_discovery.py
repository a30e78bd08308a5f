"""What discovery costs on the real checkpoints, and whether it agrees with their family tables.

For each checkpoint in the shared assets (whisper-tiny.en, all-MiniLM-L6-v2, the GPT-2 stand-in,
SmolLM2-135M-Instruct where its fetch.sh has built it), in this one process:
- load it (`normswap.load_pretrained`), then time, best of --repeat runs each:
  the table plan alone (`--plan table`), discovery alone (`--plan discover`: the probe batch is
  built and one traced forward pass runs; also with the batch given, to separate the two) and the
  default (`--plan auto`: table + cross-check);
- the cross-check's findings (an empty list: the table and the model agree);
- `--to rmsnorm --fold` with the discovered plan next to the table's: exactness and the measured
  relative deviation of each (the library's own verification).
Discovery's cost is also given as a ratio to one plain forward pass on the same probe batch.

    HF_HUB_OFFLINE=1 python scripts/bench_discovery.py            # writes bench-results/discovery.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import normswap  # noqa: E402
from normswap.archs.plan import build_plan, cross_check, discover, table_plan  # noqa: E402
from normswap.archs import get_family  # noqa: E402
from normswap.assets import asset  # noqa: E402
from normswap.samples import model_inputs  # noqa: E402


def checkpoints() -> dict[str, Path]:
    found = {"whisper-tiny.en": asset("whisper-tiny.en"), "all-MiniLM-L6-v2": asset("all-MiniLM-L6-v2"),
             "gpt2-standin": asset("gpt2-standin-wt2")}
    smol = Path(os.environ.get("NORMSWAP_SMOLLM2", Path.home() / ".cache/normswap-assets/smollm2-135m-instruct"))
    if (smol / "config.json").exists():
        found["smollm2-135m-instruct"] = smol
    return {k: v for k, v in found.items() if (v / "config.json").exists()}


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(name: str, folder: Path, repeat: int) -> dict:
    model = normswap.load_pretrained(str(folder)).eval()
    probe = model_inputs(model, n_tokens=16, block=16, batch_size=1, what="probe", n_utterances=1)[0]
    with torch.no_grad():
        forward_s, _ = best_of(lambda: model(**probe), repeat)
    family = get_family(model.config.model_type)
    table_s, tplan = best_of(lambda: table_plan(model, family), repeat)
    discover_s, dplan = best_of(lambda: discover(model), repeat)
    traced_s, _ = best_of(lambda: discover(model, probe), repeat)  # the same, the probe batch given
    auto_s, _ = best_of(lambda: build_plan(model, "auto"), repeat)
    problems = cross_check(tplan, dplan)
    conversions = {}
    for source in ("table", "discover"):
        fresh = normswap.load_pretrained(str(folder)).eval()
        try:
            _, result = normswap.convert(fresh, "rmsnorm", fold=True, plan=source)
            v = result.verification
            conversions[source] = {"exact": result.record.exact, "max_rel_diff": v["max_rel_diff"], "output": v["output"],
                                   "seconds": round(result.seconds, 3),
                                   "methods": sorted({s.method for s in result.record.sites})}
        except normswap.NormswapError as err:
            conversions[source] = {"error": str(err)}
        del fresh
    probe_shape = {k: list(v.shape) for k, v in probe.items()}
    return {
        "checkpoint": name, "model_type": model.config.model_type, "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()), "probe": probe_shape,
        "sites": len(dplan.sites), "left_alone": dplan.other_norms, "centred_inputs": dplan.centred_inputs,
        "seconds": {"forward": round(forward_s, 4), "table": round(table_s, 4), "discover": round(discover_s, 4),
                    "discover_given_probe": round(traced_s, 4), "auto": round(auto_s, 4)},
        "discover_over_forward": round(discover_s / forward_s, 2),
        "traced_over_forward": round(traced_s / forward_s, 2),
        "cross_check": problems, "conversion": conversions,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/discovery.json")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, folder in checkpoints().items():
        print(f"{name}: measuring ...", file=sys.stderr, flush=True)
        rows.append(measure(name, folder, args.repeat))
        r = rows[-1]
        print(f"{name:24s} forward {r['seconds']['forward']:.3f}s  table {r['seconds']['table']:.4f}s  discover "
              f"{r['seconds']['discover']:.3f}s ({r['discover_over_forward']}x forward; traced pass alone {r['traced_over_forward']}x)  auto {r['seconds']['auto']:.3f}s  "
              f"cross-check {'agrees' if not r['cross_check'] else r['cross_check']}", flush=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "repeat": args.repeat, "checkpoints": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
