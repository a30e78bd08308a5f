"""Training throughput of `normswap finetune` on this machine, written as JSON.

    python scripts/bench_train.py --out results/bench_train.json            # gpt2 stand-in, DyT student
    python scripts/bench_train.py --tiny --out /tmp/bench.json              # seconds-long smoke run

For each objective (lm, distill) it runs a short fine-tune of the DyT-converted stand-in on
WikiText-2 test (fp32, batch x block tokens per step) and reports training tokens/s (optimizer steps
only: no loading, validation or checkpoint time) and the wall time. The DyT student is converted
first if --student is not given.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure_common import Timer, write_json  # noqa: E402

import torch  # noqa: E402

from normswap.assets import asset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--student", help="converted student folder (default: convert the stand-in to DyT)")
    ap.add_argument("--teacher", default=str(asset("gpt2-standin-wt2")))
    ap.add_argument("--data", default=str(asset("wikitext2-tokenized", "test.txt")))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--objectives", default="lm,distill")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--tiny", action="store_true", help="tiny in-process models instead of the stand-in (smoke test)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from normswap.training import finetune

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.tiny:
        from normswap.training.tiny import make_tiny_pair, tiny_corpus

        teacher, student = make_tiny_pair(work, "causal")
        data = work / "corpus.txt"
        data.write_text(tiny_corpus(400))
        teacher, student, data = str(teacher), str(student), str(data)
        args.block_size = min(args.block_size, 32)
    else:
        teacher, data = args.teacher, args.data
        student = args.student
        if student is None:
            import normswap

            from normswap.loading import load_tokenizer

            with Timer() as t:
                model, result = normswap.convert(teacher, to="dyt")
                normswap.save(model, work / "student", result.record, tokenizer=load_tokenizer(teacher), copy_from=teacher)
            student = str(work / "student")
            print(f"converted the teacher to DyT in {t.seconds:.0f} s", file=sys.stderr)

    runs = []
    for objective in args.objectives.split(","):
        with Timer() as t:
            res = finetune(student, teacher=teacher, data=data, out=work / f"ft-{objective}", objective=objective,
                           steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                           eval_every=10**9, save_every=10**9, val_examples=1, log_every=1)
        runs.append({"objective": objective, "steps": res.step, "tokens": res.tokens, "train_seconds": res.train_seconds,
                     "tokens_per_second": res.tokens_per_second, "wall_seconds": t.seconds})
        print(f"{objective}: {res.tokens_per_second:.0f} tokens/s ({res.tokens} tokens in {res.train_seconds:.1f} s)", file=sys.stderr)
    write_json(args.out, {
        "benchmark": "finetune training throughput", "student": student, "teacher": teacher, "data": data,
        "precision": "fp32", "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "load_average": os.getloadavg(), "batch_size": args.batch_size,
        "block_size": args.block_size, "runs": runs, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })


if __name__ == "__main__":
    main()
