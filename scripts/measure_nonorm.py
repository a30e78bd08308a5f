"""Measure `--to none` (no normalisation left) on the gpt2 stand-in and all-MiniLM-L6-v2, as converted
and after a short progressive distillation, through the CLI as a user runs it.

    python scripts/measure_nonorm.py --work /tmp/nonorm-work/run --out-dir docs/results/nonorm

For each model:
1. `normswap convert MODEL --to none [--tied-head untie] --calib-text TRAIN_TEXT`: wall time, the
   reported deviation (the conversion's own verification on its built-in sample).
2. Normalisation modules left in `normswap.load(out)` (nn.LayerNorm, nn.GroupNorm, normswap's RMSNorm
   and DyT, any class named *RMSNorm / *LayerNorm; FixedNorm and nn.Identity are not normalisation)
   against the original's count; `normswap.load(out)` twice, and load -> `normswap.save` -> load,
   must give bit-identical outputs on a fixed input.
3. Evaluation of the original and the conversion: the stand-in's WikiText-2 *valid* perplexity
   (first 20,481 tokens, non-overlapping 256-token windows: 20,480 scored tokens, the protocol of
   docs/results/convert_quality.json and scripts/_measure_common.py); MiniLM's zero-shot STS-B dev
   Spearman (`eval --sts`, mean pooling, cosine).
4. `normswap finetune CONVERTED --teacher ORIGINAL --progressive --objective distill`: the norms are
   swapped out one at a time (published order: MLP norms, attention norms, final) while distilling
   from the original. A few-step probe measures the step time; the step count fills --budget-s of
   training (clamped to [--min-steps, --max-steps]); --time-limit stops the run in any case. Then
   the same checks and evaluation, and for the causal LM the per-token loss tails finetune reports
   (finetune_result.json "token_losses": teacher / before / after on the held-out blocks).

Data, as in scripts/measure_gpt2_recovery.py and scripts/measure_minilm_recovery.py: the stand-in
calibrates and trains on WikiText-2 tokenized *test* (its own training text) and is scored on
*valid*; MiniLM calibrates and trains on the unlabelled sentences of GLUE train splits (SST-2, CoLA,
both columns of STS-B train) and is scored on STS-B *dev*, never used for training.
Writes OUT_DIR/results.json and OUT_DIR/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from normswap.assets import asset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PPL_TOKENS = 20_481  # 20,480 scored tokens in 256-token windows
PPL_WINDOW = 256
PROBE_TEXT = ["The quick brown fox jumps over the lazy dog near the river bank .",
              "In 1998 the company moved its headquarters to a small town in the north ."]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def nproc() -> dict[str, str]:
    """`nproc` (without OMP_NUM_THREADS, which GNU nproc obeys) and `nproc --all`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    run = lambda *a: subprocess.run(["nproc", *a], capture_output=True, text=True, env=env).stdout.strip()  # noqa: E731
    return {"nproc_cmd": run(), "nproc_all_cmd": run("--all")}


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    diff = git("diff", "HEAD")
    return {"commit": git("rev-parse", "HEAD").strip(), "status_short": git("status", "--short").splitlines(),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def run_cli(args: list[str], log: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `normswap ARGS --format json`; (parsed stdout, {command, wall_s, rc, log, load before/after})."""
    cmd = ["normswap", *args, "--format", "json"]
    line = shlex.join(cmd)
    print(f"$ {line}", file=sys.stderr, flush=True)
    load0 = loadavg()
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    wall = time.perf_counter() - t0
    info = {"command": line, "wall_s": round(wall, 2), "rc": p.returncode, "stderr_log": str(log),
            "loadavg_before": load0, "loadavg_after": loadavg()}
    print(f"  rc {p.returncode}, {wall:.1f} s", file=sys.stderr, flush=True)
    if p.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        info["error_tail"] = tail
        print("\n".join("  | " + t for t in tail), file=sys.stderr, flush=True)
        return {}, info
    try:
        return json.loads(p.stdout), info
    except json.JSONDecodeError as e:
        info["error_tail"] = [f"stdout is not JSON: {e}", p.stdout[-2000:]]
        return {}, info


# --- step 2: norm modules and reload exactness ---------------------------------------------------

def norm_census(model: Any) -> dict[str, Any]:
    from torch import nn

    from normswap.modules import DyT, FixedNorm, RMSNorm

    norms, fixed, ident = [], [], 0
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, RMSNorm, DyT)) or cls.endswith("RMSNorm") or cls.endswith("LayerNorm"):
            norms.append(f"{name}: {cls}")
        elif isinstance(m, FixedNorm):
            fixed.append({"path": name, "scale": float(m.scale.detach()), "center": bool(m.center),
                          "recenter": bool(getattr(m, "recenter", False))})
        elif isinstance(m, nn.Identity):
            ident += 1
    return {"norm_modules": len(norms), "norms": norms, "fixed_norms": len(fixed), "fixed_norm_sites": fixed,
            "identity_modules": ident}


def _outputs(model: Any, tok: Any) -> Any:
    import torch

    enc = tok(PROBE_TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _tokenizer(path: str) -> Any:
    from normswap.loading import load_tokenizer

    tok = load_tokenizer(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def checks(path: str, original: str) -> dict[str, Any]:
    """Norm census of normswap.load(path) vs the original, and bit-identical reloads."""
    import torch

    import normswap
    from normswap.loading import load_pretrained

    torch.manual_seed(0)
    tok = _tokenizer(path)
    orig = load_pretrained(original).eval()
    first = normswap.load(path).eval()
    second = normswap.load(path).eval()
    out1, out2 = _outputs(first, tok), _outputs(second, tok)
    tmp = Path(tempfile.mkdtemp(prefix="nonorm-roundtrip-")) / "m"
    try:
        normswap.save(first, tmp)
        third = normswap.load(tmp).eval()
        out3 = _outputs(third, tok)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    out0 = _outputs(orig, tok)
    census = norm_census(first)
    return {"original_norm_modules": norm_census(orig)["norm_modules"], **census,
            "reload_bit_identical": bool(torch.equal(out1, out2)),
            "save_load_round_trip_bit_identical": bool(torch.equal(out1, out3)),
            "reload_max_abs_diff": float((out1 - out2).abs().max()),
            "round_trip_max_abs_diff": float((out1 - out3).abs().max()),
            "probe_output": list(out1.shape),
            "probe_vs_original_max_abs_diff": float((out1 - out0).abs().max()),
            "probe_vs_original_rel_diff": float((out1 - out0).norm() / out0.norm())}


# --- the two models ---------------------------------------------------------------------------------

def model_specs(work: Path) -> dict[str, dict[str, Any]]:
    from measure_minilm_recovery import glue_sentences

    glue = work / "glue_train_sentences.txt"
    if not glue.exists():
        glue.write_text("\n".join(glue_sentences()) + "\n")
    wt2_test = str(asset("wikitext2-tokenized", "test.txt"))
    return {
        "gpt2": {
            "name": "gpt2 stand-in (Pre-LN GPT-2, 4 layers, 7.26M params)",
            "original": str(asset("gpt2-standin-wt2")),
            "convert_extra": ["--tied-head", "untie"],
            "train_text": wt2_test, "train_text_about": "WikiText-2 tokenized test (the stand-in's own training text)",
            "eval": ["--ppl", str(asset("wikitext2-tokenized", "valid.txt")), "--max-length", str(PPL_WINDOW),
                     "--stride", str(PPL_WINDOW), "--max-tokens", str(PPL_TOKENS)],
            "metric": "ppl", "metric_about": "WikiText-2 valid perplexity, first 20,481 tokens, 256-token blocks (20,480 scored)",
            "finetune": ["--objective", "distill", "--temperature", "1", "--batch-size", "4", "--block-size", "256",
                         "--lr", "3e-4", "--warmup", "0.1", "--val-examples", "32"],
            "probe_steps": 4,
        },
        "minilm": {
            "name": "all-MiniLM-L6-v2 (Post-LN BERT, 6 layers, 22.7M params)",
            "original": str(asset("all-MiniLM-L6-v2")),
            "convert_extra": [],
            "train_text": str(glue), "train_text_about": "74,754 unlabelled GLUE train sentences (SST-2, CoLA, STS-B train), deduplicated, shuffled (seed 0)",
            "eval": ["--sts", str(asset("glue", "STS-B", "dev.tsv"))],
            "metric": "sts", "metric_about": "zero-shot STS-B dev Spearman, mean pooling, cosine (1,500 pairs)",
            "finetune": ["--objective", "distill", "--batch-size", "32", "--block-size", "128", "--packing", "lines",
                         "--lr", "1e-4", "--warmup", "0.1", "--val-examples", "64"],
            "probe_steps": 3,
        },
    }


def metric_of(ev: dict[str, Any], kind: str, baseline: bool = False) -> dict[str, Any] | None:
    if not ev:
        return None
    if kind == "ppl":
        p = ev["ppl"]
        if baseline:
            return {"ppl": p.get("baseline"), "nll": p.get("baseline_nll"), "nll_median": p.get("baseline_nll_median"),
                    "nll_p99": p.get("baseline_nll_p99"), "tokens": p["tokens"]}
        return {"ppl": p["value"], "nll": p["nll"], "nll_median": p.get("nll_median"), "nll_p99": p.get("nll_p99"),
                "tokens": p["tokens"]}
    s = ev["sts"]
    if baseline:
        return {"spearman": s.get("baseline_spearman"), "pairs": s["pairs"]}
    return {"spearman": s["spearman"], "pearson": s["pearson"], "pairs": s["pairs"], "fidelity": s.get("fidelity")}


def measure(key: str, spec: dict[str, Any], work: Path, args: argparse.Namespace, save: Any, r: dict[str, Any]) -> dict[str, Any]:
    r.update({"model": spec["name"], "original": spec["original"], "train_text": spec["train_text"],
                         "train_text_about": spec["train_text_about"], "metric": spec["metric_about"], "commands": []})
    th = ["--threads", "1"]
    conv = work / f"{key}-none"
    ft = work / f"{key}-none-progressive"

    # 1. convert
    out, info = run_cli(["convert", spec["original"], "--to", "none", *spec["convert_extra"], "--calib-text", spec["train_text"],
                         "--out", str(conv), "--overwrite", *th], work / f"{key}-convert.log")
    r["commands"].append(info)
    r["convert"] = {"wall_s": info["wall_s"], "rc": info["rc"]}
    if not out:
        r["convert"]["error"] = info.get("error_tail")
        return r
    r["convert"].update({"reported_seconds": out.get("seconds"), "exact": out.get("exact"),
                         "max_abs_diff": out.get("max_abs_diff"), "max_rel_diff": out.get("max_rel_diff"),
                         "verification": out.get("verification"), "unfolded": out.get("unfolded"),
                         "new_biases": out.get("new_biases"), "warnings": out.get("warnings"),
                         "sites": [{k: s.get(k) for k in ("path", "placement", "new_type", "folded", "calib_rel_error")}
                                   for s in out.get("sites", [])]})
    save()

    # 2. checks on the conversion
    try:
        r["checks_converted"] = checks(str(conv), spec["original"])
    except Exception as e:  # noqa: BLE001 - report, go on
        r["checks_converted"] = {"error": f"{type(e).__name__}: {e}"}
    save()

    # 3. evaluation of the original and the conversion
    ev, info = run_cli(["eval", str(conv), "--baseline", spec["original"], *spec["eval"], *th], work / f"{key}-eval-converted.log")
    r["commands"].append(info)
    r["eval_converted_wall_s"] = info["wall_s"]
    r["original_metric"] = metric_of(ev, spec["metric"], baseline=True)
    r["converted_metric"] = metric_of(ev, spec["metric"])
    r["eval_converted_raw"] = ev or {"error": info.get("error_tail")}
    save()

    # 4. progressive distillation: probe the step time, then the run
    ftargs = ["finetune", str(conv), "--teacher", spec["original"], "--data", spec["train_text"], "--progressive", *spec["finetune"]]
    probe_dir = work / f"{key}-probe"
    pr, info = run_cli([*ftargs, "--steps", str(spec["probe_steps"]), "--eval-every", "1000000", "--save-every", "1000000",
                        "--out", str(probe_dir), "--overwrite", *th], work / f"{key}-probe.log")
    r["commands"].append(info)
    shutil.rmtree(probe_dir, ignore_errors=True)
    if not pr:
        r["finetune"] = {"error": info.get("error_tail"), "command": info["command"]}
        return r
    step_s = pr["train_seconds"] / max(1, pr["step"])
    steps = int(min(args.max_steps, max(args.min_steps, args.budget_s / (step_s * 1.1))))
    r["finetune_probe"] = {"steps": pr["step"], "train_seconds": pr["train_seconds"], "step_s": step_s,
                           "tokens_per_s": pr.get("tokens_per_second"), "wall_s": info["wall_s"], "chosen_steps": steps}
    save()
    res, info = run_cli([*ftargs, "--steps", str(steps), "--eval-every", str(max(1, steps // 4)), "--save-every",
                         str(max(1, steps // 2)), "--time-limit", str(args.time_limit_min), "--out", str(ft), "--overwrite", *th],
                        work / f"{key}-finetune.log")
    r["commands"].append(info)
    if not res:
        r["finetune"] = {"error": info.get("error_tail"), "command": info["command"], "wall_s": info["wall_s"]}
        return r
    r["finetune"] = {"wall_s": info["wall_s"], "status": res.get("status"), "steps": res.get("step"), "planned_steps": steps,
                     "tokens": res.get("tokens"), "train_seconds": res.get("train_seconds"),
                     "tokens_per_s": res.get("tokens_per_second"), "last_loss": res.get("last_loss"), "val": res.get("val"),
                     "config": res.get("config"), "progressive": res.get("progressive"),
                     "token_losses": res.get("token_losses")}
    save()

    # checks and evaluation after the distillation
    try:
        r["checks_progressive"] = checks(str(ft), spec["original"])
    except Exception as e:  # noqa: BLE001
        r["checks_progressive"] = {"error": f"{type(e).__name__}: {e}"}
    ev, info = run_cli(["eval", str(ft), "--baseline", spec["original"], *spec["eval"], *th], work / f"{key}-eval-progressive.log")
    r["commands"].append(info)
    r["eval_progressive_wall_s"] = info["wall_s"]
    r["progressive_metric"] = metric_of(ev, spec["metric"])
    r["eval_progressive_raw"] = ev or {"error": info.get("error_tail")}
    save()
    return r


# --- report -----------------------------------------------------------------------------------------

def _fmt(m: dict[str, Any] | None, kind: str) -> str:
    if not m:
        return "failed"
    if kind == "ppl":
        return f"ppl {m['ppl']:.1f}" if m.get("ppl") is not None else "n/a"
    return f"Spearman {m['spearman']:.4f}" if m.get("spearman") is not None else "n/a"


def write_readme(path: Path, res: dict[str, Any]) -> None:
    kinds = {"gpt2": "ppl", "minilm": "sts"}
    lines = ["# `--to none`: no normalisation left, as converted and after progressive distillation", "",
             "Measured by `scripts/measure_nonorm.py` (every figure and command line in `results.json`), "
             f"on {res['machine']['nproc']} CPU cores shared with other jobs (load average "
             f"{res['machine']['loadavg_start'][0]:.2f} at the start, {res['machine'].get('loadavg_end', ['?'])[0]} at the end), "
             f"torch {res['machine']['torch']}, one torch thread.", "",
             "| model | original | none, as converted | none + progressive distillation (steps, tokens, wall time) | norm modules left (original -> converted -> distilled) |",
             "|---|---|---|---|---|"]
    for key, r in res["models"].items():
        k = kinds[key]
        f = r.get("finetune", {})
        if "error" in f or not f:
            dist = "failed: " + (" ".join(f.get("error") or [])[-300:] if f else "not run")
        else:
            dist = (f"{_fmt(r.get('progressive_metric'), k)} ({f['steps']} steps, {f['tokens']:,} tokens, "
                    f"{f['wall_s'] / 60:.1f} min{', ' + f['status'] if f['status'] != 'completed' else ''})")
        cc, cp = r.get("checks_converted", {}), r.get("checks_progressive", {})
        left = f"{cc.get('original_norm_modules', '?')} -> {cc.get('norm_modules', '?')} -> {cp.get('norm_modules', '?')}"
        what = ("all sites nn.Identity" if cc.get("fixed_norms") == 0 else f"{cc.get('fixed_norms')} FixedNorm") if cc else ""
        lines.append(f"| {r['model']} | {_fmt(r.get('original_metric'), k)} | {_fmt(r.get('converted_metric'), k)} | {dist} | "
                     f"{left} ({what}) |")
    lines += ["", "Metrics: gpt2 stand-in, " + res["models"].get("gpt2", {}).get("metric", "") + "; MiniLM, "
              + res["models"].get("minilm", {}).get("metric", "") + ".", ""]
    g = res["models"].get("gpt2", {})
    tl = (g.get("finetune") or {}).get("token_losses") or {}
    if tl:
        lines += [f"gpt2 stand-in, per-token loss on the {tl.get('examples')} held-out WikiText-2 test blocks "
                  "(`finetune_result.json` `token_losses`):", "",
                  "| model | tokens | mean | median | p99 | p99.9 | max | worst tokens |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for role, name in (("teacher", "original"), ("before", "none, as converted"), ("after", "none + progressive distillation")):
            s = tl.get(role)
            if s:
                worst = ", ".join(f"`{w['token'].strip() or repr(w['token'])}` {w['loss']:.1f}" for w in s.get("worst", [])[:3])
                lines.append(f"| {name} | {s['tokens']} | {s['mean']:.3f} | {s['median']:.3f} | {s['p99']:.2f} | {s['p999']:.2f} | "
                             f"{s['max']:.2f} | {worst} |")
        lines.append("")
    lines += ["Conversion wall time (the whole CLI call) and its reported deviation (its own check on the built-in sample):", ""]
    for key, r in res["models"].items():
        c = r.get("convert", {})
        cc = r.get("checks_converted", {})
        cp = r.get("checks_progressive", {})
        lines.append(f"- {key}: {c.get('wall_s')} s, max relative deviation {c.get('max_rel_diff')}, max abs {c.get('max_abs_diff')}; "
                     f"reload bit-identical: {cc.get('reload_bit_identical')}, save -> load round trip bit-identical: "
                     f"{cc.get('save_load_round_trip_bit_identical')} (after distillation: {cp.get('reload_bit_identical')}, "
                     f"{cp.get('save_load_round_trip_bit_identical')})")
    peak = max((max(c["loadavg_before"][0], c["loadavg_after"][0]) for r in res["models"].values() for c in r.get("commands", [])),
               default=None)
    lines += ["", f"Highest 1-minute load average seen at a command's start or end: {peak}.", ""]
    lines += ["Commands (each one's wall time and load average are in `results.json`, `models.*.commands`):", "", "```"]
    lines += [f"{c['command']}    # {c['wall_s']} s" for r in res["models"].values() for c in r.get("commands", [])]
    lines += ["```", ""]
    if res.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in res["notes"]] + [""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the models and logs")
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "results" / "nonorm"))
    ap.add_argument("--models", default="gpt2,minilm")
    ap.add_argument("--budget-s", type=float, default=480.0, help="training seconds each distillation aims to fill")
    ap.add_argument("--min-steps", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--time-limit-min", type=float, default=10.0, help="finetune --time-limit (minutes)")
    ap.add_argument("--readme-only", action="store_true", help="rewrite README.md from OUT_DIR/results.json and stop")
    args = ap.parse_args()
    if args.readme_only:
        write_readme(Path(args.out_dir) / "README.md", json.loads((Path(args.out_dir) / "results.json").read_text()))
        return

    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import transformers

    import normswap

    res: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), **nproc(),
                    "loadavg_start": loadavg(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "normswap": getattr(normswap, "__version__", None), "torch_threads": 1,
                    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "NORMSWAP_ASSETS")}},
        "git": git_state(), "argv": sys.argv, "settings": vars(args),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": {}}
    if (out_dir / "results.json").exists():  # keep models measured by an earlier run of other models
        try:
            old = json.loads((out_dir / "results.json").read_text())
            res["models"].update({k: v for k, v in old.get("models", {}).items() if k not in args.models.split(",")})
            res["notes"] = old.get("notes", [])
        except (json.JSONDecodeError, OSError):
            pass

    def save() -> None:
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
        tmp.replace(out_dir / "results.json")

    specs = model_specs(work)
    t0 = time.perf_counter()
    for key in args.models.split(","):
        res["models"][key] = {}
        measure(key, specs[key], work, args, save, res["models"][key])
        save()
    res["machine"]["loadavg_end"] = loadavg()
    res["total_wall_s"] = round(time.perf_counter() - t0, 1)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    write_readme(out_dir / "README.md", res)
    print(f"done in {res['total_wall_s']:.0f} s: {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
