"""A run's figures: per-job metric rows (original, converted, recovered and deltas), the run's
`results.json`, `report.md` with its tables, and two PNGs (loss curves, deltas)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from normswap.recipes.schema import ROLES, Job, Recipe

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def metrics_of(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flatten one model's eval results into {key: {label, value, std, better}}."""
    out: dict[str, dict[str, Any]] = {}
    p = res.get("ppl")
    if p:
        label = {"causal": "perplexity", "masked": "MLM perplexity", "pseudo": "pseudo-perplexity"}.get(p.get("kind"), "perplexity")
        out["ppl"] = {"label": label, "value": p["value"], "better": "lower", "group": "ppl",
                      "note": f"{p['tokens']} tokens, max_length {p['max_length']}" + (f", stride {p['stride']}" if p.get("kind") == "causal" else "")}
        if p.get("kind") == "causal" and p.get("bits_per_byte") is not None:
            out["ppl_bpb"] = {"label": "bits per byte", "value": p["bits_per_byte"], "better": "lower", "group": "ppl",
                              "note": f"{p['bytes']} UTF-8 bytes scored (comparable across tokenizers)"}
    s = res.get("sts")
    if s:
        out["sts_spearman"] = {"label": "STS-B spearman", "value": s["spearman"], "better": "higher", "group": "sts",
                               "note": f"zero-shot, {s['pairs']} pairs, {s['pooling']} pooling"}
    a = res.get("asr")
    if a:
        out["asr_wer"] = {"label": "ASR WER", "value": a["wer"], "better": "lower", "group": "asr",
                          "note": f"greedy, Whisper English normaliser, {a['utterances']} utterances, {a['words']} words"}
        for name, r in (a.get("subsets") or {}).items():
            if len(a["subsets"]) > 1:
                out[f"asr_wer_{name}"] = {"label": f"ASR WER {name}", "value": r["wer"], "better": "lower", "group": "asr",
                                          "note": f"{r['utterances']} utterances, {r['words']} words"}
    g = res.get("glue")
    if g:
        st = res.get("glue_settings") or {}
        for task, metrics in g.items():
            if task == "average":
                continue
            for metric, r in metrics.items():
                sizes = (st.get("data") or {}).get(task, {})
                out[f"glue_{task}_{metric}"] = {
                    "label": f"GLUE {task} {metric}", "value": r["mean"], "std": r.get("std"), "better": "higher", "group": "glue",
                    "note": f"{st.get('seeds', 1)} seed(s), train/dev {sizes.get('train_examples', '?')}/{sizes.get('dev_examples', '?')}"}
        avg = (g.get("average") or {}).get("score", {})
        if avg.get("mean") is not None and len([t for t in g if t != "average"]) > 1:
            out["glue_average"] = {"label": "GLUE average", "value": avg["mean"], "better": "higher", "group": "glue", "note": ""}
    t = res.get("tasks")
    if t:
        st = res.get("tasks_settings") or {}
        docs = f"first {st['limit']} docs" if st.get("limit") else "all docs"
        for task, row in t.items():
            for metric, cell in row.items():
                if isinstance(cell, dict):
                    out[f"tasks_{task}_{metric}"] = {
                        "label": f"{task} {metric}", "value": cell.get("value"), "std": cell.get("stderr"),
                        "better": "lower" if metric == "perplexity" else "higher", "group": "tasks", "task": task, "metric": metric,
                        "note": f"lm-eval {st.get('lm_eval')}, {row.get('num_fewshot', 0)}-shot, {docs} ({row.get('documents')}), ± stderr"}
    return out


def job_results(job: Job, job_dir: Path, models: dict[str, str], summaries: dict[str, Any], timings: dict[str, float],
                skipped: list[str]) -> dict[str, Any]:
    """The job's figures side by side, with deltas against the original; written to <job>/results.json."""
    evals = summaries.get("eval") or {}
    per_role = {role: metrics_of(res) for role, res in evals.items()}
    keys: list[str] = []
    for role in ROLES:
        for k in per_role.get(role, {}):
            if k not in keys:
                keys.append(k)
    rows: dict[str, dict[str, Any]] = {}
    for k in keys:
        first = next(per_role[r][k] for r in ROLES if k in per_role.get(r, {}))
        row: dict[str, Any] = {"label": first["label"], "better": first["better"], "note": first.get("note", "")}
        for role in ROLES:
            m = per_role.get(role, {}).get(k)
            row[role] = None if m is None else m["value"]
            if m is not None and m.get("std") is not None:
                row[f"{role}_std"] = m["std"]
        for role in ("converted", "recovered"):
            if row.get(role) is not None and row.get("original") is not None:
                row[f"delta_{role}"] = row[role] - row["original"]
                if first.get("group") == "tasks":  # the paired interval from lm-eval's per-sample logs
                    cell = ((summaries.get("paired") or {}).get(role) or {}).get(first["task"], {}).get(first["metric"]) or {}
                    if cell.get("ci95"):
                        row[f"ci95_{role}"], row[f"excludes_zero_{role}"] = cell["ci95"], cell["excludes_zero"]
                if first["better"] == "lower" and row["original"]:
                    row[f"rel_delta_{role}"] = row[f"delta_{role}"] / row["original"]
        rows[k] = row
    out = {
        "name": job.name, "model": job.model, "target": job.convert.to if job.convert else None,
        "stages": job.stages, "models": models, "config": job.model_dump(mode="json"),
        "convert": summaries.get("convert"), "finetune": summaries.get("finetune"),
        "metrics": rows, "seconds": timings, "skipped": skipped,
        "placement": {role: {k: res.get(k) for k in ("device", "dtype", "compute_dtype")} for role, res in evals.items()
                      if isinstance(res, dict) and res.get("device")},
    }
    _write_json(job_dir / RESULTS_FILE, out)
    return out


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    from normswap.evaluation.results import write_json

    return write_json(path, payload)


def write_results(recipe: Recipe, run_dir: Path, jobs: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    from normswap.evaluation.results import provenance

    payload = {"recipe": str(recipe.path), "name": recipe.name, "description": recipe.description,
               "run_dir": str(run_dir), "overrides": recipe.overrides, "config": recipe.resolved(),
               **provenance(), "wall_seconds": round(wall, 1), "jobs": jobs}
    _write_json(run_dir / RESULTS_FILE, payload)
    return payload


# ------------------------------------------------------------------------------------------ report


def _num(x: Any, std: Any = None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    def fmt(v: float) -> str:
        return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}" if abs(v) >= 10 else f"{v:.4f}"

    return fmt(x) + (f" ± {fmt(std)}" if std else "")


def _delta(row: dict[str, Any], role: str) -> str:
    d = row.get(f"delta_{role}")
    if d is None:
        return ""
    s = f"{d:+.4g}" if abs(d) >= 10 else f"{d:+.4f}"
    rel = row.get(f"rel_delta_{role}")
    ci = row.get(f"ci95_{role}")  # zero-shot tasks: the paired bootstrap interval, * when it excludes 0
    return (s + (f" ({100 * rel:+.1f}%)" if rel is not None else "")
            + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]{'*' if row.get(f'excludes_zero_{role}') else ''}" if ci else ""))


def summary_table(results: dict[str, Any]) -> str:
    """The main Markdown table: one row per job and metric."""
    head = "| job | target | metric | original | converted | recovered | Δ converted | Δ recovered |\n|---|---|---|---:|---:|---:|---:|---:|"
    lines = [head]
    for j in results["jobs"]:
        for row in j["metrics"].values():
            arrow = "↓" if row["better"] == "lower" else "↑"
            lines.append(f"| {j['name']} | {j['target'] or '-'} | {row['label']} {arrow} | {_num(row.get('original'), row.get('original_std'))} | "
                         f"{_num(row.get('converted'), row.get('converted_std'))} | {_num(row.get('recovered'), row.get('recovered_std'))} | "
                         f"{_delta(row, 'converted')} | {_delta(row, 'recovered')} |")
    if len(lines) == 1:
        lines.append("| (no evaluation in this recipe) | | | | | | | |")
    return "\n".join(lines)


def write_report(recipe: Recipe, run_dir: Path, results: dict[str, Any]) -> Path:
    """report.md with the summary table, per-job details and the plots."""
    loss_png = plot_loss_curves(results, run_dir / "loss_curves.png")
    delta_png = plot_deltas(results, run_dir / "deltas.png")
    md: list[str] = [f"# normswap recipe `{recipe.name}`", ""]
    if recipe.description:
        md += [recipe.description, ""]
    md += [f"- recipe: `{recipe.path}`" + (f", overrides: `{' '.join(recipe.overrides)}`" if recipe.overrides else ""),
           f"- date: {results.get('date')}, git {results.get('git')}, normswap {results['versions'].get('normswap')}, "
           f"torch {results['versions'].get('torch')}, transformers {results['versions'].get('transformers')}",
           f"- wall time of this invocation: {results['wall_seconds']:.1f} s" + (
               " (some stages were already complete and skipped)" if any(j["skipped"] for j in results["jobs"]) else ""),
           "", "## Results", "",
           "original = the source model, converted = after `convert`, recovered = after `finetune`; "
           "Δ = model - original (relative for perplexity). ↓ lower is better, ↑ higher is better. "
           "Zero-shot Δ carry a paired bootstrap 95% interval over the same documents; * marks one that excludes 0.", "",
           summary_table(results), ""]
    notes = sorted({f"- {row['label']}: {row['note']}" for j in results["jobs"] for row in j["metrics"].values() if row.get("note")})
    if notes:
        md += ["Evaluation settings:", "", *notes, ""]
    if delta_png:
        md += [f"![deltas]({delta_png.name})", ""]
    if loss_png:
        md += [f"![loss curves]({loss_png.name})", ""]
    md += ["## Jobs", ""]
    for j in results["jobs"]:
        md += [f"### {j['name']}", "", f"- model: `{j['model']}`; stages: {', '.join(j['stages'])}"]
        c = j.get("convert")
        if c:
            dev = f", max relative logit deviation {c['max_rel_diff']:.3g}" if c.get("max_rel_diff") is not None else ""
            cal = f", mean calibration error {c['calib_rel_error_mean']:.3g}" if c.get("calib_rel_error_mean") is not None else ""
            where = f", {c['dtype']} weights" if c.get("dtype") else ""
            where += f", run on {c['device']}" if c.get("device") else ""
            md.append(f"- convert: {c['target']}, {'exact' if c['exact'] else 'approximate'}, {c['sites']} sites "
                      f"({c['folded']} folded){dev}{cal}{where}; {c['seconds']:.1f} s → `{j['models'].get('converted')}`")
            for w in c.get("warnings") or []:
                md.append(f"  - warning: {w}")
        f = j.get("finetune")
        if f:
            val = f.get("val") or {}
            vl = f", validation loss {val['val_loss']:.4g}" if val.get("val_loss") is not None else ""
            md.append(f"- finetune: {f['objective']}" + (f" from `{f['teacher']}`" if f.get("teacher") else "") +
                      f", {f['steps']}/{f['total_steps']} steps, {f['tokens']} tokens"
                      + (f", {f['audio_seconds']} s of audio" if f.get("audio_seconds") is not None else "")
                      + f", {f['train_seconds']} s "
                      f"({f['tokens_per_second']} tokens/s), last loss {_num(f.get('last_loss'))}{vl} ({f['status']}) → `{j['models'].get('recovered')}`")
            if f.get("loss_curve"):
                rel = Path(f["loss_curve"]).resolve()
                try:
                    rel = rel.relative_to(run_dir.resolve())
                except ValueError:
                    pass
                md.append(f"- loss curve: [{rel}]({rel})")
        if j.get("placement"):
            md.append("- evaluated: " + "; ".join(f"{role} on {p['device']}, {p['dtype']} weights, {p['compute_dtype']} compute"
                                                  for role, p in j["placement"].items()))
        secs = ", ".join(f"{k} {v:.1f} s" for k, v in j["seconds"].items())
        md.append(f"- time: {secs}" + (f"; skipped (already complete): {', '.join(j['skipped'])}" if j["skipped"] else ""))
        md.append("")
    md += ["## Files", "", f"- `{RESULTS_FILE}`: every figure, the resolved config, versions, git hash and date",
           "- `resolved.yaml`: the recipe after overrides and path resolution; `recipe.yaml`: the file as given",
           "- `run.log`: the log; `<job>/eval/<role>/`: per-model results and predictions", ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(md))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(results: dict[str, Any], path: Path) -> Path | None:
    """Training (and validation) loss of every fine-tuned job, one panel each."""
    from normswap.training.report import TrainLog

    logs = []
    for j in results["jobs"]:
        rec = j["models"].get("recovered")
        if rec and j.get("finetune"):
            log = TrainLog(Path(rec)).read()
            if log:
                logs.append((j["name"], log))
    if not logs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.6), squeeze=False)
    for ax, (name, log) in zip(axes[0], logs):
        train = [(e["step"], e["loss"]) for e in log if e.get("kind") == "train" and e.get("loss") is not None]
        val = [(e["step"], e["val_loss"]) for e in log if e.get("kind") == "val" and e.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), lw=1, label="train")
        if val:
            ax.plot(*zip(*val), "o-", ms=3, lw=1.5, label="validation")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_deltas(results: dict[str, Any], path: Path) -> Path | None:
    """Per job and metric, the change from the original: converted and recovered side by side.
    Perplexities are shown as relative change (%), other metrics as points (x100); error bars are the
    paired intervals where there are some (zero-shot tasks)."""
    rows = []
    for j in results["jobs"]:
        for row in j["metrics"].values():
            vals, errs = [], []
            for role in ("converted", "recovered"):
                d, ci = row.get(f"delta_{role}"), row.get(f"ci95_{role}")
                # scale so that right = better for every metric: -% for lower-is-better, points x100 otherwise
                scale = (-100 / row["original"] if row.get("original") else None) if row["better"] == "lower" else 100
                vals.append(None if d is None or scale is None else scale * d)
                if ci and vals[-1] is not None:  # a negative scale (lower is better) swaps the interval's ends
                    lo, hi = scale * (ci[0] - d), scale * (ci[1] - d)
                    errs.append((abs(min(lo, hi)), abs(max(lo, hi))))
                else:
                    errs.append((0.0, 0.0))
            if any(v is not None for v in vals):
                rows.append((f"{j['name']}: {row['label']}", vals, errs))
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.6))
    h = 0.38
    for k, (role, color) in enumerate((("converted", "tab:orange"), ("recovered", "tab:blue"))):
        ys = [i + (k - 0.5) * h for i in range(len(rows))]
        xs = [r[1][k] if r[1][k] is not None else 0.0 for r in rows]
        xerr = [[r[2][k][0] for r in rows], [r[2][k][1] for r in rows]]
        ax.barh(ys, xs, height=h, color=color, label=role, xerr=xerr if any(map(any, xerr)) else None, capsize=2)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("change vs original (right = better): perplexity -%, other metrics points x100")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
