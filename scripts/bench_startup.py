"""Start-up time of the command line and of `import normswap`, each in fresh subprocesses.

    python scripts/bench_startup.py [--runs 5] [--out docs/results/startup/bench.json]
    python scripts/bench_startup.py --tree /tmp/old --out docs/results/startup/bench-before.json

Times `normswap --help`, `normswap archs`, `normswap --version`, `normswap eval --help` (the
console script beside this interpreter) and `python -c "import normswap"` (a library import, which
registers the Auto classes and so imports torch and transformers). Each figure is the median wall
time of --runs fresh processes after one untimed warm-up (which fills the OS file cache); every run
is kept in the JSON, with the load average before and after (on a shared machine it says how much
of the CPU the benchmark had). `--tree DIR` times the normswap package found in DIR instead of the
installed one (PYTHONPATH=DIR; for a before/after comparison with `git archive HEAD normswap | tar
-x -C DIR`). Each command also reports whether torch was imported, from `python -X importtime`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "normswap --help": ["--help"],
    "normswap archs": ["archs"],
    "normswap --version": ["--version"],
    "normswap eval --help": ["eval", "--help"],
}


def cli_prefix() -> list[str]:
    """The console script installed beside this interpreter, else `python -m normswap`."""
    script = Path(sys.executable).parent / "normswap"
    return [str(script)] if script.exists() else [sys.executable, "-m", "normswap"]


def timed_runs(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Wall seconds of `runs` fresh processes of `cmd` (after one untimed warm-up); each must exit 0."""
    subprocess.run(cmd, env=env, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return times


def imports_torch(cmd: list[str], env: dict[str, str]) -> bool:
    """Whether the process imports torch, from its `-X importtime` report on stderr."""
    proc = subprocess.run(cmd, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True, check=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return "torch" in names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tree", type=Path, default=None, help="time the normswap package in this folder instead of the installed one")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "startup" / "bench.json")
    args = ap.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.tree is not None:
        env["PYTHONPATH"] = str(args.tree.resolve())
    cli = cli_prefix()
    cases = {name: cli + argv for name, argv in COMMANDS.items()}
    cases['python -c "import normswap"'] = [sys.executable, "-c", "import normswap"]
    load_before = os.getloadavg()
    results = {}
    for name, cmd in cases.items():
        times = timed_runs(cmd, args.runs, env)
        results[name] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "max_s": round(max(times), 3),
                         "runs_s": [round(t, 3) for t in times], "imports_torch": imports_torch(cmd, env)}
        print(f"{name:32s} median {results[name]['median_s']:.3f} s  (min {results[name]['min_s']:.3f}, max {results[name]['max_s']:.3f})"
              f"  torch imported: {'yes' if results[name]['imports_torch'] else 'no'}", flush=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {
        "benchmark": "normswap start-up", "runs": args.runs, "statistic": "median wall seconds of fresh processes after one warm-up",
        "tree": str(args.tree) if args.tree is not None else "installed", "cli": cli, "results": results,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(), "git": git.stdout.strip() or None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")  # complete, then moved into place
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
