"""Scale benchmark: wall time and peak memory of converting a ~1.5B-parameter bf16 checkpoint,
calibrated DyT in memory against calibrated DyT block-wise (`--low-memory`), with exact RMSNorm
streaming beside them; and the same on a small model of each shape, whose in-memory and
block-wise outputs are compared tensor by tensor.

Checkpoints are synthetic (`synthetic_checkpoint.py`: Llama-shaped with RMSNorm, GQA and SwiGLU;
GPT-2-XL-shaped with LayerNorm), written in bf16 under --workdir. Each case is one `normswap
convert` as a user types it, run in a fresh interpreter that imports normswap, torch and the
model code first and then reads its own /proc/self/status: the peak it reports is VmHWM minus
VmRSS after those imports, so it is the conversion's memory, not the libraries'. Ratios are
taken within this run; the load average is recorded before and after each case.

    HF_HUB_OFFLINE=1 python scripts/bench_scale.py                                  # both 1.5B shapes and both small ones
    HF_HUB_OFFLINE=1 python scripts/bench_scale.py --shapes llama-small,gpt2-small  # the quick equality check alone

Writes docs/results/scale/bench_scale.json (or --out). The checkpoints and outputs are deleted at
the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

CASES = {
    "dyt-memory": ["--to", "dyt"],
    "dyt-blockwise": ["--to", "dyt", "--low-memory"],
    "rmsnorm-stream": ["--to", "rmsnorm", "--low-memory"],
}

# The child: imports first, then its RSS, then the CLI exactly as `normswap convert ...` runs it.
CHILD = r"""
import json, os, sys, time

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

import torch, transformers, safetensors
import transformers.models.llama.modeling_llama, transformers.models.gpt2.modeling_gpt2
import normswap, normswap.cli, normswap.conversion, normswap.streaming, normswap.blockwise, normswap.calibration, normswap.verification
base = status("VmRSS")
sys.argv = ["normswap", "convert", *ARGS]
t0 = time.perf_counter()
code = 0
try:
    normswap.cli.main()
except SystemExit as e:
    code = e.code or 0
report = {"seconds": time.perf_counter() - t0, "rss_after_imports": base, "vm_hwm": status("VmHWM"), "code": code}
with open(REPORT, "w") as f:
    json.dump(report, f)
"""


def run_case(src: Path, out: Path, args: list[str], timeout: float) -> dict[str, Any]:
    report = out.parent / f"{out.name}.report.json"
    argv = [str(src), "--out", str(out), "--format", "json", *args]
    code = f"ARGS, REPORT = {argv!r}, {str(report)!r}\n" + CHILD
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "load_before": load_before}
    wall = time.perf_counter() - t0
    res: dict[str, Any] = {"args": args, "wall_s": round(wall, 1), "load_before": [round(x, 2) for x in load_before],
                           "load_after": [round(x, 2) for x in os.getloadavg()], "returncode": proc.returncode}
    if report.exists():
        r = json.loads(report.read_text())
        res.update(convert_s=round(r["seconds"], 1), rss_after_imports_bytes=r["rss_after_imports"], peak_rss_bytes=r["vm_hwm"],
                   peak_increase_bytes=r["vm_hwm"] - r["rss_after_imports"])
    if proc.returncode != 0:
        res["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:500]
        return res
    data = json.loads(proc.stdout)
    res.update(exact=data.get("exact"), max_rel_diff=data.get("max_rel_diff"), low_memory=data.get("low_memory"),
               dtype=data.get("dtype"), warnings=data.get("warnings", []),
               output_bytes=sum(f.stat().st_size for f in out.glob("*.safetensors")))
    return res


def compare(a: Path, b: Path) -> dict[str, Any]:
    """`bench_convert.compare_outputs` (every tensor, one pair in memory at a time) and the largest
    relative difference of the two records' DyT alphas."""
    from bench_convert import compare_outputs

    tensors = compare_outputs(a, b, "all")
    alphas = []
    for folder in (a, b):
        record = json.loads((folder / "config.json").read_text())["normswap"]
        alphas.append({s["path"]: s.get("alpha") for s in record["sites"]})
    d_alpha = max((abs(alphas[0][p] - alphas[1][p]) / abs(alphas[0][p]) for p in alphas[0] if alphas[0][p] is not None), default=0.0)
    return {**tensors, "max_rel_alpha_diff": d_alpha, "sites": len(alphas[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-small,gpt2-small,llama-1p5b,gpt2-xl")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("docs/results/scale/bench_scale.json"))
    args = ap.parse_args()

    from _measure_common import write_json
    from synthetic_checkpoint import generate

    work = args.workdir or Path(tempfile.mkdtemp(prefix="normswap-bench-scale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "scale", "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(),
                              "mem_total_gib": _meminfo("MemTotal"), "shapes": {}}
    try:
        for shape in args.shapes.split(","):
            src = work / shape
            if not src.exists():
                checkpoint = generate(src, shape, args.dtype)
            else:
                checkpoint = {"shape": shape, "bytes_on_disk": sum(f.stat().st_size for f in src.glob("*.safetensors"))}
            print(json.dumps(checkpoint), file=sys.stderr)
            size = checkpoint["bytes_on_disk"]
            cases = {}
            for name in args.cases.split(","):
                out = work / f"{shape}-{name}"
                shutil.rmtree(out, ignore_errors=True)
                r = run_case(src, out, CASES[name], args.timeout)
                if "peak_increase_bytes" in r:
                    r["peak_increase_over_checkpoint"] = round(r["peak_increase_bytes"] / size, 4)
                cases[name] = r
                print(shape, name, json.dumps(r), file=sys.stderr)
            entry: dict[str, Any] = {"checkpoint": checkpoint, "cases": cases}
            mem, blk = cases.get("dyt-memory", {}), cases.get("dyt-blockwise", {})
            if mem.get("returncode") == 0 and blk.get("returncode") == 0:
                entry["blockwise_over_memory"] = {"peak_increase": round(blk["peak_increase_bytes"] / mem["peak_increase_bytes"], 4),
                                                  "wall": round(blk["wall_s"] / mem["wall_s"], 4)}
                entry["blockwise_vs_memory"] = compare(work / f"{shape}-dyt-memory", work / f"{shape}-dyt-blockwise")
            if blk.get("returncode") == 0:
                entry["blockwise_peak_at_most_quarter"] = blk["peak_increase_bytes"] <= size / 4
            report["shapes"][shape] = entry
            for name in cases:
                shutil.rmtree(work / f"{shape}-{name}", ignore_errors=True)
            if not args.keep:
                shutil.rmtree(src, ignore_errors=True)
            write_json(args.out, {**report, "load_avg_end": os.getloadavg()})  # each shape as it finishes
        report["load_avg_end"] = os.getloadavg()
        write_json(args.out, report)
        print(_table(report))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _table(report: dict[str, Any]) -> str:
    gb = 1e9
    lines = ["| shape | checkpoint | case | wall s | peak RSS over imports | / checkpoint | max rel diff |", "|---|---|---|---|---|---|---|"]
    for shape, entry in report["shapes"].items():
        size = entry["checkpoint"]["bytes_on_disk"]
        for name, r in entry["cases"].items():
            if "error" in r:
                lines.append(f"| {shape} | {size / gb:.2f} GB | {name} | - | - | - | {r['error']} |")
                continue
            lines.append(f"| {shape} | {size / gb:.2f} GB | {name} | {r['wall_s']:.0f} | {r['peak_increase_bytes'] / gb:.2f} GB | "
                         f"{r['peak_increase_over_checkpoint']:.3f} | {r['max_rel_diff'] if r['max_rel_diff'] is not None else '-'} |")
    return "\n".join(lines)


def _meminfo(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024**2, 2)
    return float("nan")


if __name__ == "__main__":
    main()
