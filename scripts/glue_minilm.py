"""GLUE measurement on a CPU budget: all-MiniLM-L6-v2 against its RMSNorm and DyT conversions.

    normswap convert $ASSETS/all-MiniLM-L6-v2 --to rmsnorm --out /tmp/minilm-rmsnorm
    normswap convert $ASSETS/all-MiniLM-L6-v2 --to dyt --out /tmp/minilm-dyt
    python scripts/glue_minilm.py --converted /tmp/minilm-rmsnorm /tmp/minilm-dyt --out results/glue-minilm

The same code path as `normswap eval --glue` (normswap.evaluation.glue), but the baseline is
fine-tuned once and shared by both conversions instead of once per `normswap eval` call. Every
finished (model, task, seed) run is appended to runs.jsonl at once, so an interrupted measurement
keeps what it has and `--resume` continues it. Writes summary.json (with config, versions, git
hash, date), predictions/<task>_seed<k>.tsv, deltas_<name>.png, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from normswap.assets import asset  # noqa: E402
from normswap.evaluation import glue, glue_data, results  # noqa: E402
from normswap.loading import load_tokenizer  # noqa: E402
from normswap.log import setup_logging  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=str(asset("all-MiniLM-L6-v2")))
    ap.add_argument("--converted", nargs="+", required=True, help="converted model folders")
    ap.add_argument("--glue-data", default=str(asset("glue")))
    ap.add_argument("--tasks", default="sst2,cola,rte,stsb")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-samples", type=int, default=500)
    ap.add_argument("--dev-samples", type=int, default=500)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true", help="skip runs already in runs.jsonl")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; 1 avoids OpenMP spin-waiting when other jobs share the cores (10x less CPU time per step measured here)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging()

    out = results.prepare_out(args.out)
    log_path = out / "runs.jsonl"
    done = {}
    if args.resume and log_path.is_file():
        for line in log_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["task"], r["seed"])] = r
    elif log_path.exists():
        log_path.unlink()
    settings = glue.GlueSettings(train_samples=args.train_samples, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 max_seq_length=args.max_seq_length, seeds=args.seeds)
    settings.validate()
    tok = load_tokenizer(args.baseline)
    models = {"baseline": args.baseline} | {Path(p).name: p for p in args.converted}
    tasks = glue_data.parse_tasks(args.tasks)
    t_start = time.perf_counter()
    runs: dict[tuple[str, str], list[glue.GlueRun]] = {}
    sizes = {}
    for task in tasks:
        train_rows = glue_data.subsample(glue_data.read_split(args.glue_data, task, "train"), settings.train_samples, settings.data_seed)
        dev_rows = glue_data.subsample(glue_data.read_split(args.glue_data, task, "dev"), args.dev_samples, settings.data_seed)
        train_enc, dev_enc = glue.encode(tok, train_rows, settings.max_seq_length), glue.encode(tok, dev_rows, settings.max_seq_length)
        sizes[task.name] = {"train_examples": len(train_rows), "dev_examples": len(dev_rows),
                            "train_tokens": sum(map(len, train_enc.input_ids)), "dev_tokens": sum(map(len, dev_enc.input_ids))}
        for seed in range(settings.seeds):
            for name, path in models.items():
                key = (name, task.name, seed)
                if key in done:
                    r = done[key]
                    run = glue.GlueRun(task.name, seed, r["metrics"], r["predictions"], r["train_examples"], r["steps"], r["train_tokens"], r["seconds"])
                else:
                    run = glue.run_task_seed(path, tok, task, train_enc, dev_enc, settings, seed)
                    with log_path.open("a") as f:
                        f.write(json.dumps({"model": name, "path": path, **run.__dict__}) + "\n")
                runs.setdefault((name, task.name), []).append(run)
            header = ["row", "label", *models]
            rows = []
            for i, ex in enumerate(dev_rows):
                preds = [runs[(m, task.name)][-1].predictions[i] for m in models]
                if task.labels is not None:
                    preds = [task.labels[int(p)] for p in preds]
                rows.append([ex.row, ex.label if task.labels is None else task.labels[int(ex.label)], *preds])
            results.write_tsv(out / "predictions" / f"{task.name}_seed{seed}.tsv", header, rows)
    wall = time.perf_counter() - t_start

    summary: dict[str, dict] = {}
    for name in models:
        if name == "baseline":
            continue
        per_task = {t.name: glue.summarise(runs[(name, t.name)], runs[("baseline", t.name)]) for t in tasks}
        per_task["average"] = {"score": glue.glue_average(per_task)}
        summary[name] = per_task
        results.delta_chart(out / f"deltas_{name}.png", {"glue": per_task}, f"GLUE: {name} - baseline (MiniLM, {settings.seeds} seeds)")
    train_seconds = sum(r.seconds for rs in runs.values() for r in rs)
    payload = {
        "config": {**vars(args), "settings": settings.to_dict(), "models": models}, **results.provenance(),
        "data": sizes, "wall_seconds": wall, "run_seconds_total": train_seconds, "glue": summary,
        "baseline": {t.name: glue.summarise(runs[("baseline", t.name)], None) for t in tasks},
    }
    results.write_json(out / "summary.json", payload)
    print(render(summary, settings, sizes, wall))


def render(summary: dict, settings: glue.GlueSettings, sizes: dict, wall: float) -> str:
    """A markdown table: per task and metric, baseline and each conversion as mean ± std, and deltas."""
    names = list(summary)
    first = summary[names[0]]
    head = "| task | metric | baseline | " + " | ".join(f"{n} | Δ {n}" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names) + 1)]
    for task, metrics in first.items():
        for metric, r in metrics.items():
            base = f"{r['baseline_mean']:.4f}" + (f" ± {r['baseline_std']:.4f}" if "baseline_std" in r else "")
            cells = []
            for n in names:
                c = summary[n][task][metric]
                cells += [f"{c['mean']:.4f}" + (f" ± {c['std']:.4f}" if "std" in c else ""), f"{c['delta']:+.4f}"]
            lines.append(f"| {task} | {metric} | {base} | " + " | ".join(cells) + " |")
    budget = (f"budget: {settings.seeds} seeds; train rows {settings.train_samples} (fixed subset), {settings.epochs} epoch(s), "
              f"batch {settings.batch_size}, lr {settings.lr}, max_seq_length {settings.max_seq_length}; "
              + ", ".join(f"{t}: {d['train_examples']} train / {d['dev_examples']} dev" for t, d in sizes.items())
              + f"; wall {wall / 60:.1f} min on {os.cpu_count()} CPU cores")
    return "\n".join(lines) + "\n\n" + budget


if __name__ == "__main__":
    sys.exit(main())
