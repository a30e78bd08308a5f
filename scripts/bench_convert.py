"""Conversion benchmark: wall time and peak RSS of the streaming conversion, the in-memory path
(`normswap.convert` + `normswap.save`) and the naive one (transformers `from_pretrained`, convert,
`save_pretrained`), on a synthetic GPT-2-XL-shaped checkpoint (1.5B parameters, fp32, sharded
safetensors, random weights) generated on disk by this script.

Each path runs alone in a fresh subprocess (peak RSS from os.wait4's rusage of that child, so the
figures of one path never include another's); ratios are taken within this one run. The streaming
output is then compared with the in-memory output tensor by tensor (all tensors, or a sample with
--check sample), and the streamed model's logits with the original's on a few tokens.

    HF_HUB_OFFLINE=1 python scripts/bench_convert.py                      # GPT-2-XL shape, ~6.2 GB under /tmp
    HF_HUB_OFFLINE=1 python scripts/bench_convert.py --shape small        # quick dry run (gpt2-small shape)

Writes bench-results/convert.json (or --out). The checkpoint and outputs live under --workdir
(default a fresh folder in /tmp) and are deleted at the end unless --keep.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

# --shape -> synthetic_checkpoint.SHAPES
SHAPES = {"xl": "gpt2-xl", "medium": "gpt2-medium", "small": "gpt2-base"}


def generate(folder: Path, shape: str, shard_bytes: int, seed: int = 0) -> dict:
    """A random GPT-2-shaped fp32 checkpoint (config.json + sharded safetensors), tensor by tensor."""
    from synthetic_checkpoint import generate as write_checkpoint

    return write_checkpoint(folder, SHAPES[shape], "float32", shard_bytes, seed)


PATHS = {
    "streaming": """
from normswap.streaming import stream_convert
stream_convert(SRC, OUT, "rmsnorm", fold=True)
""",
    "in_memory": """
import normswap
model, result = normswap.convert(SRC, "rmsnorm", fold=True)
normswap.save(model, OUT, result.record)
""",
    "naive": """
import torch
from transformers import GPT2LMHeadModel
from normswap.conversion import convert_model
model = GPT2LMHeadModel.from_pretrained(SRC, dtype=torch.float32)
model, result = convert_model(model, "rmsnorm", fold=True)
model.save_pretrained(OUT)
""",
}


def run_path(name: str, src: Path, out: Path, timeout: float) -> dict:
    """One conversion path in a fresh interpreter: wall seconds (import included) and peak RSS."""
    code = f"SRC, OUT = {str(src)!r}, {str(out)!r}\n" + PATHS[name]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over all children)
    deadline = t0 + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read()
    rc = os.waitstatus_to_exitcode(status)
    res = {"wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_rss_gib": round(usage.ru_maxrss / 1024**2, 3),
           "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1), "returncode": rc}
    if rc != 0:
        res["error"] = stderr.strip().splitlines()[-1][:500] if stderr.strip() else f"exit {rc}"
        if rc in (-9, 137):
            res["error"] += " (killed: out of memory or timeout)"
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.is_dir() else 0
    res["output_bytes"] = out_bytes
    return res


def compare_outputs(a: Path, b: Path, mode: str, b_names_hf: bool = False) -> dict:
    """Tensor-by-tensor equality of two converted folders (one tensor of each in memory at a time)."""
    import random

    import torch

    from normswap.streaming import SafetensorsReader, checkpoint_files

    ra, rb = SafetensorsReader(checkpoint_files(a)), SafetensorsReader(checkpoint_files(b))
    ka, kb = set(ra.keys()), set(rb.keys())
    keys = sorted(ka & kb)
    if mode == "sample":
        rnd = random.Random(0)
        big = [k for k in keys if len(ra.shape(k)) > 1]
        keys = sorted({k for k in keys if len(ra.shape(k)) == 1} | set(rnd.sample(big, min(24, len(big)))) | {k for k in keys if "wte" in k})
    unequal, max_abs = [], 0.0
    for k in keys:
        ta, tb = ra.get(k), rb.get(k)
        if ta.shape != tb.shape or ta.dtype != tb.dtype or not torch.equal(ta, tb):
            unequal.append(k)
            if ta.shape == tb.shape:
                max_abs = max(max_abs, float((ta.double() - tb.double()).abs().max()))
    return {"same_key_set": ka == kb, "only_in_first": sorted(ka - kb)[:5], "only_in_second": sorted(kb - ka)[:5],
            "tensors_compared": len(keys), "tensors_total": len(ka), "bytes_compared": sum(ra.nbytes(k) for k in keys),
            "unequal": unequal[:10], "n_unequal": len(unequal), "max_abs_diff_unequal": max_abs, "equal": not unequal and ka == kb}


EXACTNESS = """
import json, torch, normswap
from transformers import GPT2LMHeadModel
torch.manual_seed(0)
ids = torch.randint(0, 50257, (1, 64))
m = GPT2LMHeadModel.from_pretrained(SRC, dtype=torch.float32).eval()
with torch.no_grad():
    a = m(input_ids=ids).logits.double()
del m
m = normswap.load(OUT).eval()
with torch.no_grad():
    b = m(input_ids=ids).logits.double()
print(json.dumps({"tokens": 64, "max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
                  "max_rel_diff": float((a - b).abs().max() / a.abs().max())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="xl")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the generated checkpoint")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--paths", default="streaming,in_memory,naive")
    ap.add_argument("--check", choices=["all", "sample"], default="all")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-results/convert.json"))
    args = ap.parse_args()

    from _measure_common import write_json

    work = args.workdir or Path(tempfile.mkdtemp(prefix="normswap-bench-convert-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    report: dict = {"benchmark": "convert", "load_avg_start": os.getloadavg(), "mem_available_start_gib": _mem_available_gib()}
    try:
        t0 = time.perf_counter()
        if not src.exists():
            report["checkpoint"] = generate(src, args.shape, int(args.shard_gb * 1e9))
        else:
            report["checkpoint"] = {"shape": args.shape, "bytes_on_disk": sum(f.stat().st_size for f in src.glob("*.safetensors"))}
        report["checkpoint"]["generate_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(report["checkpoint"]), file=sys.stderr)
        results = {}
        for name in args.paths.split(","):
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            _drop_page_cache_hint(src)
            results[name] = run_path(name, src, out, args.timeout)
            results[name]["mem_available_before_gib"] = _mem_available_gib()
            print(name, json.dumps(results[name]), file=sys.stderr)
        report["paths"] = results
        size = report["checkpoint"]["bytes_on_disk"]
        for name, r in results.items():
            r["peak_rss_over_checkpoint"] = round(r["peak_rss_bytes"] / size, 4)
        s = results.get("streaming")
        if s:
            for other in ("in_memory", "naive"):
                if other in results and results[other]["returncode"] == 0:
                    report[f"streaming_over_{other}"] = {
                        "peak_rss": round(s["peak_rss_bytes"] / results[other]["peak_rss_bytes"], 4),
                        "wall": round(s["wall_s"] / results[other]["wall_s"], 4)}
        checks = {}
        if s and s["returncode"] == 0 and results.get("in_memory", {}).get("returncode") == 0:
            checks["streaming_vs_in_memory"] = compare_outputs(work / "out-streaming", work / "out-in_memory", args.check)
            print(json.dumps(checks["streaming_vs_in_memory"]), file=sys.stderr)
        if s and s["returncode"] == 0 and results.get("naive", {}).get("returncode") == 0:
            checks["streaming_vs_naive"] = compare_outputs(work / "out-streaming", work / "out-naive", "sample")
        shutil.rmtree(work / "out-naive", ignore_errors=True)
        shutil.rmtree(work / "out-in_memory", ignore_errors=True)
        if s and s["returncode"] == 0:
            code = f"SRC, OUT = {str(src)!r}, {str(work / 'out-streaming')!r}\n" + EXACTNESS
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            checks["streamed_logits_vs_original"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-500:]}
        report["checks"] = checks
        report["peak_rss_at_most_quarter_of_checkpoint"] = bool(s and s["returncode"] == 0 and s["peak_rss_bytes"] <= size / 4)
        report["load_avg_end"] = os.getloadavg()
        report["cpu_count"] = os.cpu_count()
        write_json(args.out, report)
        print(json.dumps({k: v for k, v in report.items() if k != "checkpoint"}, indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _mem_available_gib() -> float:
    from normswap.streaming import available_memory

    return round(available_memory() / 1024**3, 2)


def _drop_page_cache_hint(src: Path) -> None:
    """Ask the kernel to drop the checkpoint from the page cache so each path reads it cold-ish."""
    for f in src.glob("*.safetensors"):
        try:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except (OSError, AttributeError):
            pass


if __name__ == "__main__":
    main()
