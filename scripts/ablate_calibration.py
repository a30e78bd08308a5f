"""Issue 16: how much each calibration step buys, per model, zero training.

Rows (each a fresh conversion with `convert_model(path, TO, fold=False, ...)`, so the affines stay
on the norms, then optionally a least-squares refit to another elementwise variant and end-to-end
calibration, `normswap.e2e.fit_end_to_end`, against the original):

- `alpha-0.5`: DyT with the paper's constant alpha 0.5 and the pretrained affine (`alpha_init=0.5`);
- `ls-parallel`: per-site least squares, each site on the original's inputs (`sequential=False`);
- `ls-sequential`: the same on the converted prefix's inputs (the default);
- `e2e`: `ls-sequential`, then end-to-end calibration;
- `VARIANT:ls` / `VARIANT:e2e` (VARIANT a key of `normswap.modules.VARIANTS`, e.g. `dyt-channel`):
  the converted sites refitted by least squares to that variant (`calibrate_variant`, sequential),
  then optionally end-to-end;
- `e2e-from-alpha-0.5`: end-to-end from the constant-alpha start;
- `e2e-channel`: `ls-sequential` with each scalar alpha copied into a per-channel alpha (the same
  function, `normswap.calibration.widen_alpha`), then end-to-end: per-channel alphas without a per-channel refit;
- `block`, `block+e2e`, `VARIANT:block`: the start (`ls-sequential`, or the VARIANT refit), then
  block-local calibration (`normswap.blockfit.fit_blocks`, `--block-steps` per unit), then optionally
  end-to-end.
For `--to none` the rows are `none` (the conversion's average-RMS scales) and `none:e2e`.

Measures (the project's protocols, see docs/results/README.md and assets/README.md):
- `minilm`: zero-shot STS-B dev Spearman (1,500 pairs, mean pooling, cosine); calibration text
  WikiText-2 raw test;
- `standin`: WikiText-2 tokenized valid perplexity, first 20,481 tokens, 256-token windows, stride
  256 (the original scores 432.3); calibration text the stand-in's own training split (tokenized test);
- `smollm2`: WikiText-2 raw test perplexity, first 16,384 tokens, non-overlapping 1,024-token
  windows (the original scores 22.55); calibration text the second half of the same file, which
  the scored tokens never reach.
`--max-eval-tokens` shortens the perplexity text (original and converted always on the same tokens).

Each row records the conversion's and the e2e fit's wall time, the load average before and after,
and the e2e summary. Results are merged into OUT_DIR/results.json (one entry per model, target and
row), and OUT_DIR/README.md is rewritten from it.

    python scripts/ablate_calibration.py --model standin --rows alpha-0.5,ls-parallel,ls-sequential,e2e
    python scripts/ablate_calibration.py --model minilm --rows e2e --e2e-steps 150 --e2e-time 300
    python scripts/ablate_calibration.py --report        # README.md from results.json only
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from normswap.assets import asset  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "results" / "calibration-ablation"
SMOLLM2 = Path(os.environ.get("NORMSWAP_CACHE", Path.home() / ".cache" / "normswap-assets")) / "smollm2-135m-instruct"

CONVERSIONS: dict[str, Any] = {}  # conversion settings -> (calibrated norm modules, timing), within one run

MODELS = {
    "minilm": {"path": lambda: str(asset("all-MiniLM-L6-v2")), "metric": "sts_spearman"},
    "standin": {"path": lambda: str(asset("gpt2-standin-wt2")), "metric": "ppl", "ppl_text": ("wikitext2-tokenized", "valid.txt"),
                "ppl_tokens": 20_481, "window": 256},
    "smollm2": {"path": lambda: str(SMOLLM2), "metric": "ppl", "ppl_text": ("wikitext2-raw-test", "wiki.test.raw"),
                "ppl_tokens": 16_384, "window": 1024},
}


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def calib_text(model: str) -> tuple[str, str]:
    """(text, description) the model is calibrated on."""
    from normswap.textfiles import read_text

    if model == "minilm":
        return read_text(asset("wikitext2-raw-test", "wiki.test.raw")), "WikiText-2 raw test"
    if model == "standin":
        return read_text(asset("wikitext2-tokenized", "test.txt")), "WikiText-2 tokenized test (the stand-in's training split)"
    text = read_text(asset("wikitext2-raw-test", "wiki.test.raw"))
    return text[len(text) // 2:], "WikiText-2 raw test, second half of the file (disjoint from the scored tokens)"


class Evaluator:
    """The model's metric, with the original's figure computed once."""

    def __init__(self, model: str, path: str, tokenizer: Any, max_eval_tokens: int | None):
        self.model, self.path, self.tok = model, path, tokenizer
        spec = MODELS[model]
        self.metric = spec["metric"]
        if self.metric == "ppl":
            from normswap.evaluation.perplexity import tokenize_text
            from normswap.textfiles import read_text

            n = spec["ppl_tokens"] if max_eval_tokens is None else min(spec["ppl_tokens"], max_eval_tokens)
            self.ids = tokenize_text(tokenizer, read_text(asset(*spec["ppl_text"])), max_tokens=n)
            self.window = spec["window"]
            self.protocol = {"text": "/".join(spec["ppl_text"]), "tokens": int(self.ids.numel()), "max_length": self.window, "stride": self.window}
        else:
            from normswap.evaluation.sts import pooling_mode, read_sts

            self.pairs = read_sts(asset("glue", "STS-B", "dev.tsv"))
            self.pooling = pooling_mode(path)
            self.protocol = {"data": "glue/STS-B/dev.tsv", "pairs": len(self.pairs), "pooling": self.pooling}

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        if self.metric == "ppl":
            from normswap.evaluation.perplexity import causal_perplexity

            r = causal_perplexity(model, self.ids, max_length=self.window, stride=self.window, batch_size=4, progress=False)
            return {"ppl": r.value, "nll": r.nll, "nll_median": r.nll_median, "nll_p99": r.nll_p99, "scored_tokens": r.tokens}
        from normswap.evaluation.sts import evaluate_sts

        from normswap.errors import NormswapError

        try:
            corr, _, _ = evaluate_sts(model, self.tok, self.pairs, pooling=self.pooling, progress=False)
        except NormswapError as e:  # degenerate embeddings (all cosines equal): no correlation to report
            return {"spearman": None, "pearson": None, "error": str(e)}
        return {"spearman": corr["spearman"], "pearson": corr["pearson"]}


def parse_row(row: str, to: str) -> dict[str, Any]:
    """A row name -> how to build it."""
    from normswap.modules import VARIANTS

    if to == "none":
        if row not in ("none", "none:e2e"):
            raise SystemExit(f"--to none rows are none and none:e2e, not {row!r}")
        return {"convert": {}, "variant": None, "e2e": row.endswith(":e2e"), "widen": False, "block": False}
    fixed = {
        "alpha-0.5": ({"alpha_init": 0.5}, None, False),
        "ls-parallel": ({"sequential": False}, None, False),
        "ls-sequential": ({}, None, False),
        "e2e": ({}, None, True),
        "e2e-from-alpha-0.5": ({"alpha_init": 0.5}, None, True),
        "e2e-from-parallel": ({"sequential": False}, None, True),
        "e2e-channel": ({}, None, True),
    }
    if row in fixed:
        conv, variant, e2e = fixed[row]
        return {"convert": conv, "variant": variant, "e2e": e2e, "widen": row == "e2e-channel", "block": False}
    if row in ("block", "block+e2e"):
        return {"convert": {}, "variant": None, "e2e": row == "block+e2e", "widen": False, "block": True}
    variant, _, stage = row.partition(":")
    if variant in VARIANTS and stage in ("ls", "e2e", "block"):
        return {"convert": {}, "variant": variant, "e2e": stage == "e2e", "widen": False, "block": stage == "block"}
    raise SystemExit(f"unknown row {row!r}: {', '.join(fixed)}, block, block+e2e, or VARIANT:ls / VARIANT:e2e / VARIANT:block "
                     f"with VARIANT in {', '.join(VARIANTS)}")


def run_row(args, name: str, row: str, evaluator: Evaluator, original: torch.nn.Module, text: str) -> dict[str, Any]:
    from normswap.calibration import calibrate_variant
    from normswap.conversion import convert_model
    from normswap.e2e import e2e_batches, fit_end_to_end, norm_types
    from normswap.samples import model_inputs
    from normswap.surgery.paths import get_module, set_module

    how = parse_row(row, args.to)
    path = MODELS[name]["path"]()
    load0 = loadavg()
    key = json.dumps(how["convert"], sort_keys=True)
    t0, c0 = time.perf_counter(), time.process_time()
    if key in CONVERSIONS:
        # the same conversion as an earlier row of this run: rebuilt from its norms (a conversion
        # without calibration, then the calibrated modules put back); its first timing is reported
        mods, timing = CONVERSIONS[key]
        model, result = convert_model(path, args.to, fold=False, alpha_init=0.5 if args.to == "dyt" else None, calib_text=text,
                                      calib_tokens=args.calib_tokens, verify=False)
        for p, m in mods.items():
            set_module(model, p, copy.deepcopy(m))
    else:
        model, result = convert_model(path, args.to, fold=False, calib_text=text, calib_tokens=args.calib_tokens, verify=False,
                                      **how["convert"])
        timing = {"convert_s": time.perf_counter() - t0, "convert_cpu_s": time.process_time() - c0, "convert_record_s": result.seconds}
        CONVERSIONS[key] = ({p: copy.deepcopy(get_module(model, p)) for p, m in model.named_modules() if isinstance(m, norm_types())},
                            timing)
    out: dict[str, Any] = {"row": row, "to": args.to, "calib_tokens": args.calib_tokens, **timing, "load_before": load0}
    if args.e2e_tokens:
        out["e2e_tokens"] = args.e2e_tokens
    batches = None
    if how["e2e"] or how["block"]:
        if args.e2e_block is None:
            batches = e2e_batches(model, tokenizer=evaluator.tok, text=text, n_tokens=args.e2e_tokens or args.calib_tokens)
        else:
            batches = model_inputs(model, tokenizer=evaluator.tok, text=text, n_tokens=args.e2e_tokens or args.calib_tokens,
                                   block=args.e2e_block,
                                   batch_size=args.e2e_batch, what="calibration")
    if how["variant"] is not None:
        vkey = key + how["variant"]
        if vkey in CONVERSIONS:  # this run refitted the variant already: its modules and first timing
            mods, vtiming = CONVERSIONS[vkey]
            for p, m in mods.items():
                set_module(model, p, copy.deepcopy(m))
        else:
            t1, c1 = time.perf_counter(), time.process_time()
            ls_batches = model_inputs(model, tokenizer=evaluator.tok, text=text, n_tokens=args.calib_tokens, what="calibration")
            rep = calibrate_variant(model, original, ls_batches, how["variant"], sequential=True)
            errs = sorted(v["rel_error"] for v in rep.values())
            vtiming = {"variant_ls_s": time.perf_counter() - t1, "variant_ls_cpu_s": time.process_time() - c1,
                       "variant_rel_error_median": errs[len(errs) // 2]}
            CONVERSIONS[vkey] = ({p: copy.deepcopy(m) for p, m in model.named_modules() if isinstance(m, norm_types())}, vtiming)
        out.update(variant=how["variant"], **vtiming)
    if how["widen"]:
        from normswap.calibration import widen_alpha

        out["widened"] = len(widen_alpha(model))
    if how["block"]:
        from normswap.blockfit import fit_blocks

        fit = fit_blocks(model, original, batches, steps=args.block_steps, lr=args.e2e_lr, progress=True)
        out["block"] = {k: v for k, v in fit.items() if k != "per_unit"}
        out["block_per_unit"] = fit["per_unit"]
        out["block_s"], out["block_cpu_s"] = fit["seconds"], fit["cpu_seconds"]
        out["e2e_batches"] = [list(next(iter(b.values())).shape) for b in batches[:1]] + [len(batches)]
    if how["e2e"]:
        e2e = fit_end_to_end(model, original, batches, steps=args.e2e_steps, lr=args.e2e_lr, objective=args.objective,
                             time_budget_s=args.e2e_time, rows_per_step=args.rows_per_step, progress=True,
                             clock=time.process_time if args.budget_clock == "cpu" else None)
        out["e2e"] = e2e
        out["e2e_s"], out["e2e_cpu_s"] = e2e["seconds"], e2e["cpu_seconds"]
        out["e2e_batches"] = [list(next(iter(b.values())).shape) for b in batches[:1]] + [len(batches)]
    out["calibration_s"] = out["convert_s"] + out.get("variant_ls_s", 0.0) + out.get("block_s", 0.0) + out.get("e2e_s", 0.0)
    out["calibration_cpu_s"] = (out["convert_cpu_s"] + out.get("variant_ls_cpu_s", 0.0) + out.get("block_cpu_s", 0.0)
                                + out.get("e2e_cpu_s", 0.0))
    out["metrics"] = evaluator(model)
    out["load_after"] = loadavg()
    out["threads"] = torch.get_num_threads()
    return out


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge(out_dir: Path, key: tuple[str, str], entry: dict[str, Any], header: dict[str, Any]) -> None:
    results = out_dir / "results.json"
    with locked(results):
        data = json.loads(results.read_text()) if results.exists() else {"models": {}}
        model = data["models"].setdefault(f"{key[0]}:{key[1]}", {"rows": {}})
        model.update(header)
        model["rows"][entry["row"]] = entry
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(results)


def report(out_dir: Path) -> str:
    data = json.loads((out_dir / "results.json").read_text())
    lines = ["# Calibration ablation (issue 16)", "",
             "Zero training: every figure is a conversion calibrated on text, then scored. Made by",
             "`scripts/ablate_calibration.py` (its docstring has the protocols and rows); raw figures, settings",
             "and each e2e fit's summary in `results.json`. Wall times are on a shared 2-core CPU machine with",
             "1 torch thread; the load average (1-minute) before each row is given. What the tables say (targets,",
             "the default and why, what limits SmolLM2, whisper-tiny.en): [findings.md](findings.md).", ""]
    for key, model in data["models"].items():
        orig = model.get("original", {})
        metric = "spearman" if "spearman" in orig else "ppl"
        lines += [f"## {key}", "", f"Original: {metric} {orig.get(metric, float('nan')):.4g}. Protocol: `{json.dumps(model.get('protocol'))}`. "
                  f"Calibration text: {model.get('calib_text')}.", "",
                  f"| row | {metric} | calibration CPU s (convert + refit + block + e2e) | wall s | e2e steps | "
                  "block / e2e loss before -> after | load |",
                  "|---|---|---|---|---|---|---|"]
        for row, r in model["rows"].items():
            m = r["metrics"].get(metric)
            e = r.get("e2e")
            secs = (f"{r['calibration_cpu_s']:.0f} ({r['convert_cpu_s']:.0f} + {r.get('variant_ls_cpu_s', 0):.0f} + "
                    f"{r.get('block_cpu_s', 0):.0f} + {r.get('e2e_cpu_s', 0):.0f})")
            blk = r.get("block")
            losses = ([f"block {blk['loss_before']:.3g} -> {blk['loss_after']:.3g} ({blk['units']} units x {blk['steps_per_unit']})"]
                      if blk else []) + ([f"{e['loss_before']:.4g} -> {e['loss_after']:.4g}" + (" (reverted: it rose)" if e.get("reverted") else "")] if e else [])
            loss = "; ".join(losses)
            on = f", {r['e2e_tokens']:,} tokens" if r.get("e2e_tokens") else ""
            steps = f"{e['steps']} ({e['stopped']}, lr {e['lr']:g}, {e['objective']}{on})" if e else ""
            shown = "undefined (degenerate embeddings)" if m is None else f"{m:.4g}"
            lines.append(f"| `{row}` | {shown} | {secs} | {r['calibration_s']:.0f} | {steps} | {loss} | "
                         f"{r['load_before'][0] if r.get('load_before') else ''} |")
        lines.append("")
    text = "\n".join(lines)
    (out_dir / "README.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS))
    ap.add_argument("--to", default="dyt", choices=["dyt", "none"])
    ap.add_argument("--rows", default="alpha-0.5,ls-parallel,ls-sequential,e2e")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--e2e-tokens", type=int, default=None,
                    help="calibration tokens of the e2e and block fits (default: --calib-tokens, as the per-site fit)")
    ap.add_argument("--e2e-steps", type=int, default=200)
    ap.add_argument("--e2e-lr", type=float, default=1e-2)
    ap.add_argument("--e2e-time", type=float, default=300.0, help="time budget of each e2e fit, seconds (see --budget-clock)")
    ap.add_argument("--budget-clock", choices=["cpu", "wall"], default="cpu",
                    help="what --e2e-time counts: this process's CPU time (default: the machine is shared) or wall time")
    ap.add_argument("--e2e-block", type=int, default=None,
                    help="tokens per calibration block for the e2e fit (default: normswap.e2e.e2e_batches' choice)")
    ap.add_argument("--e2e-batch", type=int, default=8, help="blocks per calibration batch with --e2e-block")
    ap.add_argument("--rows-per-step", type=int, default=None)
    ap.add_argument("--block-steps", type=int, default=20, help="Adam steps per unit of the block rows")
    ap.add_argument("--objective", default="auto")
    ap.add_argument("--max-eval-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="suffix for the row names in results.json (a settings sweep)")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--report", action="store_true", help="only rewrite README.md from results.json")
    args = ap.parse_args()
    if args.report:
        print(report(args.out_dir))
        return
    if args.model is None:
        ap.error("--model is required")
    torch.set_num_threads(args.threads)
    from normswap.loading import load_pretrained, load_tokenizer

    path = MODELS[args.model]["path"]()
    tok = load_tokenizer(path)
    evaluator = Evaluator(args.model, path, tok, args.max_eval_tokens)
    text, text_desc = calib_text(args.model)
    original = load_pretrained(path).eval()
    results = args.out_dir / "results.json"
    key = f"{args.model}:{args.to}"
    cached = json.loads(results.read_text())["models"].get(key, {}) if results.exists() else {}
    if cached.get("protocol") == evaluator.protocol and "original" in cached:
        orig_metrics = cached["original"]
    else:
        orig_metrics = evaluator(original)
    header = {"original": orig_metrics, "protocol": evaluator.protocol, "calib_text": text_desc, "path": path}
    print(f"original: {orig_metrics}", file=sys.stderr)
    for row in args.rows.split(","):
        entry = run_row(args, args.model, row, evaluator, original, text)
        entry["row"] = row + args.tag
        entry["argv"] = sys.argv
        merge(args.out_dir, (args.model, args.to), entry, header)
        print(json.dumps({k: v for k, v in entry.items() if k != "e2e"}, default=str), file=sys.stderr)
        if "e2e" in entry:
            print("  e2e:", json.dumps(entry["e2e"], default=str), file=sys.stderr)
    report(args.out_dir)


if __name__ == "__main__":
    main()
