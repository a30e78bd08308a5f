"""Must-show figure: recovery of the DyT-converted gpt2 stand-in by `distill` vs `lm` fine-tuning.

    python scripts/measure_gpt2_recovery.py --out results/gpt2_recovery.json --budget-s 600

1. Convert the stand-in to DyT (calibrated on WikiText-2 test), unless --student is given.
2. Perplexity on the first 20,481 tokens of WikiText-2 *valid* (256-token blocks) of the original
   and of the untrained conversion.
3. For each objective, fine-tune on WikiText-2 *test* within the same wall-clock budget: a 2-step
   probe measures throughput, the step count is set to fill ~90% of the budget (so the cosine
   schedule ends), and --time-limit stops the run at the budget in any case.
4. Perplexity after each fine-tune, and the share of the conversion's gap it closes:
   (ppl_converted - ppl_after) / (ppl_converted - ppl_original).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure_common import Timer, wikitext_ppl, write_json  # noqa: E402

from normswap.assets import asset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--work", help="folder for the converted and fine-tuned models (default: a temp folder)")
    ap.add_argument("--student", help="an existing DyT conversion of the stand-in")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget of each fine-tune")
    ap.add_argument("--objectives", default="distill,lm")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train", default="all")
    args = ap.parse_args()

    import normswap
    from normswap.loading import load_tokenizer
    from normswap.training import finetune

    teacher = str(asset("gpt2-standin-wt2"))
    data = str(asset("wikitext2-tokenized", "test.txt"))
    work = Path(args.work or tempfile.mkdtemp(prefix="gpt2-recovery-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"teacher": teacher, "data": data, "ppl_protocol": "WikiText-2 valid, first 20,481 tokens, 256-token blocks",
                     "budget_s": args.budget_s, "settings": vars(args)}
    student = args.student
    if student is None:
        with Timer() as t:
            model, conv = normswap.convert(teacher, to="dyt", calib_text=Path(data).read_text())
            student = str(work / "gpt2-dyt")
            normswap.save(model, student, conv.record, tokenizer=load_tokenizer(teacher), copy_from=teacher, overwrite=True)
        results["conversion_s"] = t.seconds
    results["student"] = student
    results["ppl_original"] = wikitext_ppl(teacher)
    results["ppl_converted"] = wikitext_ppl(student)
    print(f"ppl original {results['ppl_original']['ppl']:.1f}, converted {results['ppl_converted']['ppl']:.1f}", file=sys.stderr)
    write_json(args.out, results)

    common = dict(batch_size=args.batch_size, block_size=256, lr=args.lr, temperature=args.temperature, train=args.train,
                  warmup=0.1, val_examples=8)
    for objective in args.objectives.split(","):
        probe = finetune(student, teacher=teacher, data=data, out=work / "probe", overwrite=True, objective=objective,
                         steps=2, eval_every=10**9, save_every=10**9, **common)
        step_s = probe.train_seconds / probe.step
        steps = max(1, int(0.9 * args.budget_s / (step_s * 1.08)))  # ~8% for validation and checkpoints
        shutil.rmtree(work / "probe", ignore_errors=True)
        out = work / f"gpt2-dyt-{objective}"
        with Timer() as t:
            res = finetune(student, teacher=teacher, data=data, out=out, overwrite=True, objective=objective, steps=steps,
                           eval_every=max(1, steps // 4), save_every=max(1, steps // 2), max_seconds=args.budget_s, **common)
        ppl = wikitext_ppl(out)
        gap = results["ppl_converted"]["ppl"] - results["ppl_original"]["ppl"]
        closed = (results["ppl_converted"]["ppl"] - ppl["ppl"]) / gap if gap else float("nan")
        results[objective] = {"status": res.status, "steps": res.step, "planned_steps": steps, "tokens": res.tokens,
                              "finetune_wall_s": t.seconds, "train_s": res.train_seconds, "tokens_per_s": res.tokens_per_second,
                              "val": res.val, "ppl_after": ppl, "gap_closed": closed, "out": str(out)}
        print(f"{objective}: {res.step} steps, {res.tokens} tokens in {t.seconds:.0f} s -> ppl {ppl['ppl']:.1f} "
              f"(closes {100 * closed:.0f}% of the gap)", file=sys.stderr)
        write_json(args.out, results)


if __name__ == "__main__":
    main()
