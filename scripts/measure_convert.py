"""Issue-2 figures: exactness, DyT calibration against a constant alpha, and convert cost.

Writes JSON (default bench-results/convert.json) with, for the gpt2 stand-in, WikiText-2 valid
perplexity (first 20,481 tokens, 256-token blocks) of the original, the exact RMSNorm conversion and
DyT calibrated / --alpha-init 0.5; for all-MiniLM-L6-v2, fidelity (mean cosine of mean-pooled
embeddings to the original) and zero-shot STS-B dev Spearman for RMSNorm and DyT; and wall time and
peak RSS of the `normswap convert` CLI on both models.

    python scripts/measure_convert.py [--out bench-results/convert.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import normswap  # noqa: E402
from normswap.assets import asset  # noqa: E402
from normswap.evaluation.perplexity import causal_perplexity, read_text, tokenize_text  # noqa: E402
from normswap.evaluation.sts import evaluate_sts, fidelity, read_sts  # noqa: E402
from normswap.loading import load_pretrained, load_tokenizer  # noqa: E402

PPL_TOKENS = 20_481


def standin(results: dict) -> None:
    path = str(asset("gpt2-standin-wt2"))
    tok = load_tokenizer(path)
    ids = tokenize_text(tok, read_text(asset("wikitext2-tokenized", "valid.txt")), max_tokens=PPL_TOKENS)
    calib = read_text(asset("wikitext2-tokenized", "test.txt"))  # the stand-in's own training split
    ppl = lambda m: causal_perplexity(m, ids, max_length=256, stride=256, progress=False).value  # noqa: E731
    out = {"ppl_tokens": int(ids.numel()) - 1, "block": 256}
    out["original"] = ppl(load_pretrained(path))
    variants = {
        "rmsnorm_fold": dict(to="rmsnorm", fold=True),
        "rmsnorm_fold_untie": dict(to="rmsnorm", fold=True, tied_head="untie"),
        "dyt_calibrated_sequential": dict(to="dyt", calib_text=calib),
        "dyt_calibrated_parallel": dict(to="dyt", calib_text=calib, sequential=False),
        "dyt_calibrated_builtin_sample": dict(to="dyt"),
        "dyt_alpha_init_0.5": dict(to="dyt", alpha_init=0.5),
    }
    for name, kw in variants.items():
        model, res = normswap.convert(load_pretrained(path), tokenizer=tok, verify=True, **kw)
        out[name] = {"ppl": ppl(model), "max_rel_diff": res.verification["max_rel_diff"], "max_abs_diff": res.verification["max_abs_diff"],
                     "exact": res.record.exact, "seconds": res.seconds}
        print(name, out[name], file=sys.stderr)
    results["gpt2_standin"] = out


def minilm(results: dict) -> None:
    path = str(asset("all-MiniLM-L6-v2"))
    tok = load_tokenizer(path)
    pairs = read_sts(asset("glue", "STS-B", "dev.tsv"))
    calib = read_text(asset("wikitext2-raw-test", "wiki.test.raw"))
    base_scores, _, base_emb = evaluate_sts(load_pretrained(path), tok, pairs, progress=False)
    out = {"original": {"spearman": base_scores["spearman"], "pearson": base_scores["pearson"]}, "pairs": len(pairs)}
    variants = {
        "rmsnorm": dict(to="rmsnorm"),
        "dyt_calibrated_sequential": dict(to="dyt", calib_text=calib),
        "dyt_calibrated_parallel": dict(to="dyt", calib_text=calib, sequential=False),
        "dyt_alpha_init_0.5": dict(to="dyt", alpha_init=0.5),
    }
    for name, kw in variants.items():
        model, res = normswap.convert(load_pretrained(path), tokenizer=tok, **kw)
        scores, _, emb = evaluate_sts(model, tok, pairs, progress=False)
        out[name] = {"spearman": scores["spearman"], "pearson": scores["pearson"], "fidelity": fidelity(base_emb, emb),
                     "max_rel_diff_last_hidden": res.verification["max_rel_diff"], "seconds": res.seconds}
        print(name, out[name], file=sys.stderr)
    results["minilm"] = out


def cli_cost(results: dict) -> None:
    """Wall time and peak RSS of the CLI, measured by GNU time around a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, to in (("gpt2-standin-wt2", "rmsnorm"), ("gpt2-standin-wt2", "dyt"), ("all-MiniLM-L6-v2", "rmsnorm"), ("all-MiniLM-L6-v2", "dyt")):
            cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "normswap", "convert", str(asset(model)), "--to", to,
                   "--out", os.path.join(tmp, f"{model}-{to}"), "--format", "json"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
            rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
            out[f"{model}:{to}"] = {"wall_s": round(wall, 2), "peak_rss_mib": round(rss, 1), "convert_s": json.loads(proc.stdout)["seconds"]}
            print(model, to, out[f"{model}:{to}"], file=sys.stderr)
    results["cli"] = out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-results/convert.json")
    ap.add_argument("--only", choices=["standin", "minilm", "cli"], nargs="*")
    args = ap.parse_args()
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}}
    for name, fn in (("standin", standin), ("minilm", minilm), ("cli", cli_cost)):
        if not args.only or name in args.only:
            fn(results)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
