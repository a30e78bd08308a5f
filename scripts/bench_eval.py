"""Evaluation throughput on this machine: the GPT-2 stand-in (perplexity) and MiniLM (STS embeddings).

    python scripts/bench_eval.py --out results/bench_eval.json [--repeats 3]

Stand-in: sliding-window perplexity on the first --tokens tokens of WikiText-2 valid, at
max_length 256 with stride 256 and 128; reported as scored tokens/s and as processed (fed) tokens/s.
MiniLM: pooled embeddings of the STS-B dev sentences (3,000), as real (non-padding) tokens/s and
sentences/s. Each figure is the median of --repeats timed runs after one warm-up. The load average
is recorded before and after: on a shared machine it says how much of the CPU the benchmark had.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from normswap.assets import asset  # noqa: E402
from normswap.evaluation import perplexity, results, sts  # noqa: E402
from normswap.loading import load_pretrained, load_tokenizer  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_standin(n_tokens: int, repeats: int) -> dict:
    path = str(asset("gpt2-standin-wt2"))
    model, tok = load_pretrained(path), load_tokenizer(path)
    ids = perplexity.tokenize_text(tok, perplexity.read_text(asset("wikitext2-tokenized", "valid.txt")), n_tokens)
    out = {}
    for stride in (256, 128):
        sec, res = timed(lambda: perplexity.causal_perplexity(model, ids, max_length=256, stride=stride, progress=False), repeats)
        fed = sum(e - b for b, e, _ in perplexity.causal_windows(len(ids), 256, stride))
        out[f"max_length256_stride{stride}"] = {
            "seconds": sec, "tokens_scored": res.tokens, "tokens_fed": fed, "ppl": res.value,
            "scored_tokens_per_s": res.tokens / sec, "fed_tokens_per_s": fed / sec,
        }
    return out


def bench_minilm(repeats: int) -> dict:
    path = str(asset("all-MiniLM-L6-v2"))
    model, tok = load_pretrained(path, auto_class=transformers.AutoModel), load_tokenizer(path)
    pairs = sts.read_sts(asset("glue", "STS-B", "dev.tsv"))
    sentences = [p.sentence1 for p in pairs] + [p.sentence2 for p in pairs]
    real_tokens = sum(len(x) for x in tok(sentences, truncation=True, max_length=256)["input_ids"])
    sec, _ = timed(lambda: sts.embed(model, tok, sentences, batch_size=64, progress=False), repeats)
    return {"seconds": sec, "sentences": len(sentences), "tokens": real_tokens,
            "tokens_per_s": real_tokens / sec, "sentences_per_s": len(sentences) / sec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_eval.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=20_481, help="stand-in: score the first N tokens of valid.txt")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; 1 avoids OpenMP spin-waiting when other jobs share the cores (10x less CPU time per step measured here)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    report = {
        "benchmark": "normswap eval throughput", **results.provenance(), "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats, "loadavg_before": load_before,
        "standin": bench_standin(args.tokens, args.repeats), "minilm_sts_embed": bench_minilm(args.repeats),
        "loadavg_after": os.getloadavg(),
    }
    results.write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("standin", "minilm_sts_embed", "loadavg_before", "loadavg_after")}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
