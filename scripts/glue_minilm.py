"""GLUE on a CPU budget: all-MiniLM-L6-v2 against its conversions, the baseline run once and shared.

    A=../shared/assets
    normswap convert $A/all-MiniLM-L6-v2 --to rmsnorm --out minilm-rmsnorm
    normswap convert $A/all-MiniLM-L6-v2 --to dyt --out minilm-dyt
    normswap finetune minilm-dyt --teacher $A/all-MiniLM-L6-v2 --objective distill ... --out minilm-dyt-distill
    python scripts/glue_minilm.py --mode probe --models minilm-rmsnorm minilm-rmsnorm-distill minilm-dyt minilm-dyt-distill \
        --out docs/results/glue-minilm-probe
    python scripts/glue_minilm.py --mode finetune --protocol reference --models --out docs/results/glue-minilm-reference

The same code as `normswap eval --glue` (`normswap.evaluation.runner.glue_settings_for` picks each
task's settings: `--mode probe` is `glue_probe.PROBE_PROTOCOL`, `--protocol reference` is
`glue.REFERENCE_PROTOCOL`, otherwise the command-line settings), but the baseline is run once and
compared with every model (probe features are cached per model across seeds). Every finished
(model, task, seed) run is appended to runs.jsonl at once, so `--resume` continues an interrupted
measurement. Writes summary.json (config, versions, git hash, date, per-task settings and cost,
each model's deltas with paired bootstrap intervals and the baseline's noise floor),
predictions/<task>_seed<k>.tsv, deltas_<name>.png, and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from normswap.assets import asset  # noqa: E402
from normswap.evaluation import glue, glue_data, glue_probe, results  # noqa: E402
from normswap.evaluation.runner import DEV_SEED, EvalRequest, glue_settings_for, write_glue_predictions  # noqa: E402
from normswap.loading import load_tokenizer  # noqa: E402
from normswap.log import setup_logging  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=str(asset("all-MiniLM-L6-v2")))
    ap.add_argument("--models", nargs="*", default=[], help="converted (or recovered) model folders to compare with the baseline")
    ap.add_argument("--glue-data", default=str(asset("glue")))
    ap.add_argument("--tasks", default="sst2,cola,rte,stsb")
    ap.add_argument("--mode", choices=("finetune", "probe"), default="probe")
    ap.add_argument("--protocol", choices=("reference",), default=None, help="fine-tuning: the documented per-task settings")
    for name, kind in (("seeds", int), ("train-samples", int), ("epochs", float), ("lr", float), ("batch-size", int),
                       ("max-seq-length", int)):
        ap.add_argument(f"--{name}", type=kind, default=None, help="overrides the protocol's value")
    ap.add_argument("--dev-samples", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true", help="skip runs already in runs.jsonl")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; 1 avoids OpenMP spin-waiting when other jobs share the cores")
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
    given = {k: v for k in ("seeds", "train_samples", "epochs", "lr", "batch_size", "max_seq_length") if (v := getattr(args, k)) is not None}
    req = EvalRequest(model=args.baseline, glue=args.tasks, glue_data=args.glue_data, glue_mode=args.mode, glue_protocol=args.protocol,
                      glue_given=given, glue_settings=glue.GlueSettings(**given), dev_samples=args.dev_samples)
    tok = load_tokenizer(args.baseline)
    models = {"baseline": args.baseline} | {Path(p).name: p for p in args.models}
    tasks = glue_data.parse_tasks(args.tasks)
    t_start = time.perf_counter()
    runs: dict[tuple[str, str], list[glue.GlueRun]] = {}
    info: dict[str, dict] = {}
    for task in tasks:
        s = glue_settings_for(req, task)
        s.validate()
        train_rows = glue_data.read_split(args.glue_data, task, "train")
        dev_rows = glue_data.subsample(glue_data.read_split(args.glue_data, task, "dev"), args.dev_samples, DEV_SEED)
        if args.mode == "finetune":
            train_enc = glue.encode(tok, glue_data.subsample(train_rows, s.train_samples, s.data_seed), s.max_seq_length)
            dev_enc = glue.encode(tok, dev_rows, s.max_seq_length)
        cache: dict = {}
        t_task = time.perf_counter()
        for seed in range(s.seeds):
            for name, path in models.items():
                key = (name, task.name, seed)
                if key in done:
                    r = done[key]
                    run = glue.GlueRun(task.name, seed, r["metrics"], r["predictions"], r["train_examples"], r["steps"], r["train_tokens"],
                                       r["seconds"], references=r.get("references"), fit=r.get("fit"))
                elif args.mode == "probe":
                    run = glue_probe.run_probe_task_seed(path, tok, task, train_rows, dev_rows, s, seed, cache=cache)
                else:
                    run = glue.run_task_seed(path, tok, task, train_enc, dev_enc, s, seed)
                if key not in done:
                    with log_path.open("a") as f:
                        f.write(json.dumps({"model": name, "path": path, **run.__dict__}) + "\n")
                runs.setdefault((name, task.name), []).append(run)
            write_glue_predictions(out, task, seed, dev_rows, {m: runs[(m, task.name)] for m in models})
        info[task.name] = {"settings": dataclasses.asdict(s),
                           "train_examples": runs[("baseline", task.name)][0].train_examples, "dev_examples": len(dev_rows),
                           "seconds": time.perf_counter() - t_task,
                           "baseline_seconds": sum(r.seconds for r in runs[("baseline", task.name)])}
    wall = time.perf_counter() - t_start
    protocol = "probe" if args.mode == "probe" else (args.protocol or "custom")
    summary: dict[str, dict] = {}
    for name in models:
        if name == "baseline":
            continue
        per_task = {t.name: glue.summarise(runs[(name, t.name)], runs[("baseline", t.name)]) for t in tasks}
        per_task["average"] = {"score": glue.glue_average(per_task)}
        summary[name] = per_task
        results.delta_chart(out / f"deltas_{name}.png", {"glue": per_task}, f"GLUE ({protocol}): {name} - all-MiniLM-L6-v2")
    payload = {
        "config": {**vars(args), "models": models, "protocol": protocol}, **results.provenance(),
        "tasks": info, "wall_seconds": wall, "glue": summary,
        "baseline": {t.name: glue.summarise(runs[("baseline", t.name)], None) for t in tasks},
    }
    results.write_json(out / "summary.json", payload)
    print(render(payload))


def render(payload: dict) -> str:
    """Markdown: the baseline per task and metric (mean ± std over seeds), each model's delta with its
    paired 95% interval (`~` inside the noise, `*` outside it), then settings and cost."""
    names = list(payload["glue"])
    head = "| task | metric | baseline | " + " | ".join(f"Δ {n}" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for task, metrics in payload["baseline"].items():
        for metric, b in metrics.items():
            cells = []
            for n in names:
                c = payload["glue"][n][task][metric]
                ci = c.get("delta_ci95")
                mark = "" if c.get("within_noise") is None else (" ~" if c["within_noise"] else " *")
                cells.append(f"{c['delta']:+.4f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + mark)
            lines.append(f"| {task} | {metric} | {b['mean']:.4f} ± {b['std']:.4f} | " + " | ".join(cells) + " |")
    how = []
    for task, d in payload["tasks"].items():
        s = d["settings"]
        extra = (f"{s.get('cv_folds')}-fold CV" if payload["config"]["protocol"] == "probe"
                 else f"{s['epochs']} epoch(s), lr {s['lr']}, batch {s['batch_size']}")
        how.append(f"{task}: {d['train_examples']} train / {d['dev_examples']} dev rows, {s['seeds']} seed(s), {extra}, "
                   f"max_seq_length {s['max_seq_length']}; baseline {d['baseline_seconds']:.0f} s")
    return ("\n".join(lines) + f"\n\nprotocol: {payload['config']['protocol']}; Δ = model - baseline (metric mean over seeds) "
            "[paired bootstrap 95% interval over dev items]; ~ = within the noise (interval contains 0 or |Δ| <= 2 x the "
            "baseline's seed std), * = outside it\n" + "\n".join(how) + f"\nwall {payload['wall_seconds'] / 60:.1f} min on "
            f"{os.cpu_count()} CPU cores")


if __name__ == "__main__":
    sys.exit(main())
