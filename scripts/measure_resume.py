"""Must-show figure: an interrupted run resumed with --resume ends with the same weights as an
uninterrupted one.

    python scripts/measure_resume.py --out results/resume.json

Both runs fine-tune the DyT stand-in (distill + lm mix, dropout 0.1 so the RNG state matters,
gradient accumulation 2) for --steps steps. The second is interrupted by a real SIGINT after
--stop-at steps, which saves a checkpoint and returns; a third call with resume=True finishes it.
Reports the largest absolute and relative weight differences between the two final models.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure_common import Timer, write_json  # noqa: E402

from normswap.assets import asset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--student", required=True, help="a converted stand-in (normswap convert ... --to dyt)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stop-at", type=int, default=3)
    ap.add_argument("--work", help="reuse the runs in this folder (from an earlier call) instead of training")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from normswap.training import finetune

    teacher, data = str(asset("gpt2-standin-wt2")), str(asset("wikitext2-tokenized", "test.txt"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="resume-"))
    settings = dict(objective="lm=0.5,distill=0.5", steps=args.steps, batch_size=2, grad_accum=2, block_size=128,
                    dropout=0.1, lr=1e-4, save_every=2, eval_every=10**9, val_examples=2, log_every=1)

    def interrupt(step: int, info: dict, model) -> None:
        if step == args.stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    print(f"working in {work}", file=sys.stderr)
    from normswap.training.api import RESULT_FILE

    import json

    with Timer() as t:
        if args.work and (work / "resumed" / "model.safetensors").is_file():  # reuse finished runs
            full, done = (json.loads((work / n / RESULT_FILE).read_text()) for n in ("full", "resumed"))
            part = {"status": "interrupted", "step": args.stop_at}
        else:
            full = finetune(args.student, teacher=teacher, data=data, out=work / "full", **settings).to_dict()
            part = finetune(args.student, teacher=teacher, data=data, out=work / "resumed", on_step=interrupt, **settings).to_dict()
            done = finetune(args.student, teacher=teacher, data=data, out=work / "resumed", resume=True, **settings).to_dict()
    wa, wb = load_file(str(work / "full" / "model.safetensors")), load_file(str(work / "resumed" / "model.safetensors"))
    w0 = load_file(str(Path(args.student) / "model.safetensors"))
    max_abs = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    max_rel = max(float((wa[k] - wb[k]).norm() / wa[k].norm().clamp_min(1e-12)) for k in wa)
    moved = max(float((wa[k] - w0[k]).abs().max()) for k in wa if k in w0)  # tied weights may be stored under another name
    res = {"student": args.student, "settings": settings, "work": str(work),
           "interrupted": {"status": part["status"], "step": part["step"]},
           "resumed": {"status": done["status"], "step": done["step"], "tokens": done["tokens"]},
           "uninterrupted": {"step": full["step"], "tokens": full["tokens"]}, "max_abs_weight_diff": max_abs,
           "max_rel_weight_diff": max_rel, "max_abs_weight_change_by_training": moved, "keys": len(wa),
           "same_keys": wa.keys() == wb.keys(), "seconds": t.seconds,
           "equal_to_tolerance": bool(wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa))}
    print(f"max |diff| {max_abs:.3g} (training moved weights by up to {moved:.3g})", file=sys.stderr)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
