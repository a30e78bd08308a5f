"""Must-show figure: zero-shot STS-B of all-MiniLM-L6-v2 converted to DyT and to RMSNorm (Post-LN,
approximate), before and after `distill` on unlabelled sentences.

    python scripts/measure_minilm_recovery.py --out results/minilm_recovery.json --budget-s 600

Data: the sentences of GLUE train sets (SST-2, CoLA, and both columns of STS-B *train*), labels
dropped, one per line, deduplicated, shuffled with a fixed seed. STS-B dev (the evaluation) is never
used for training. The bare encoder has no logits, so distillation is the relative MSE of every
hidden state plus that of the mean-pooled sentence embedding.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure_common import Timer, sts_spearman, write_json  # noqa: E402

from normswap.assets import asset  # noqa: E402


def glue_sentences(seed: int = 0) -> list[str]:
    """Unlabelled training sentences from GLUE train splits (never STS-B dev)."""
    csv.field_size_limit(10**7)
    out: list[str] = []
    with open(asset("glue", "SST-2", "train.tsv"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        out += [r[0] for r in rows[1:] if r]
    with open(asset("glue", "CoLA", "train.tsv"), newline="", encoding="utf-8") as f:
        out += [r[3] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 4]
    with open(asset("glue", "STS-B", "train.tsv"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        out += [s for r in rows[1:] if len(r) >= 10 for s in (r[7], r[8])]
    seen, uniq = set(), []
    for s in (x.strip() for x in out):
        if len(s.split()) >= 3 and s not in seen:
            seen.add(s)
            uniq.append(s)
    random.Random(seed).shuffle(uniq)
    return uniq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", help="folder for models and data (default: a temp folder)")
    ap.add_argument("--targets", default="dyt,rmsnorm")
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--students", default="", help="existing conversions, target=path,... (skips converting)")
    args = ap.parse_args()

    import normswap
    from normswap.loading import load_tokenizer
    from normswap.training import finetune

    teacher = str(asset("all-MiniLM-L6-v2"))
    work = Path(args.work or tempfile.mkdtemp(prefix="minilm-recovery-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "glue_train_sentences.txt"
    sentences = glue_sentences()
    data.write_text("\n".join(sentences) + "\n")
    given = dict(kv.split("=", 1) for kv in args.students.split(",") if kv)
    results: dict = {"teacher": teacher, "data": f"{len(sentences)} GLUE train sentences (SST-2, CoLA, STS-B train)",
                     "budget_s": args.budget_s, "settings": vars(args), "sts_original": sts_spearman(teacher)}
    print(f"original STS-B spearman {results['sts_original']['spearman']:.4f}", file=sys.stderr)
    write_json(args.out, results)
    common = dict(batch_size=args.batch_size, block_size=128, packing="lines", lr=args.lr, warmup=0.1, val_examples=64)
    for target in args.targets.split(","):
        student = given.get(target)
        if student is None:
            model, conv = normswap.convert(teacher, to=target)
            student = str(work / f"minilm-{target}")
            normswap.save(model, student, conv.record, tokenizer=load_tokenizer(teacher), copy_from=teacher, overwrite=True)
        before = sts_spearman(student)
        probe = finetune(student, teacher=teacher, data=data, out=work / "probe", overwrite=True, objective="distill",
                         steps=3, eval_every=10**9, save_every=10**9, **common)
        steps = max(1, int(0.9 * args.budget_s / (probe.train_seconds / probe.step * 1.08)))
        out = work / f"minilm-{target}-distill"
        with Timer() as t:
            res = finetune(student, teacher=teacher, data=data, out=out, overwrite=True, objective="distill", steps=steps,
                           eval_every=max(1, steps // 4), save_every=max(1, steps // 2), max_seconds=args.budget_s, **common)
        after = sts_spearman(out)
        results[target] = {"student": student, "sts_converted": before, "sts_after": after, "status": res.status,
                           "steps": res.step, "planned_steps": steps, "tokens": res.tokens, "finetune_wall_s": t.seconds,
                           "tokens_per_s": res.tokens_per_second, "val": res.val, "out": str(out),
                           "delta_vs_original": after["spearman"] - results["sts_original"]["spearman"]}
        print(f"{target}: STS {before['spearman']:.4f} -> {after['spearman']:.4f} after {res.step} steps "
              f"({res.tokens} tokens, {t.seconds:.0f} s)", file=sys.stderr)
        write_json(args.out, results)


if __name__ == "__main__":
    main()
