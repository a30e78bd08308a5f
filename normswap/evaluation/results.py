"""Writing evaluation results: the results JSON, per-example prediction files and a chart of the deltas.

A results file must let someone rerun and trust the numbers, so besides the figures it records the
command's configuration, library versions, the git commit of the normswap checkout and the date.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from normswap.errors import NormswapError

_LIBRARIES = ("normswap", "torch", "transformers", "evaluate", "tokenizers", "safetensors", "numpy", "scipy", "scikit-learn",
              "jiwer", "soundfile", "lm-eval", "datasets")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the numbers (None when missing)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_hash() -> str | None:
    """The commit of the normswap source tree (with "-dirty" if it has local changes); None outside git."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """Versions, git hash, date (UTC, ISO 8601) and host facts for a results file."""
    return {
        "versions": library_versions(),
        "git": git_hash(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def prepare_out(out: str | os.PathLike) -> Path:
    """Create the output folder (and its predictions/ subfolder); a clear error if that is impossible."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NormswapError(f"--out {out} is a file, not a folder")
    try:
        (path / "predictions").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NormswapError(f"cannot create --out folder {out}: {err.strerror}") from None
    return path


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (temporary file then rename), non-finite floats as null."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_tsv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A tab-separated file with a header row (floats written with full precision)."""
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow([repr(v) if isinstance(v, float) else v for v in r])
    return path


Spread = float | tuple[float, float] | None  # symmetric half-width, (below, above) an interval, or none


def delta_rows(results: dict[str, Any]) -> list[tuple[str, float, Spread]]:
    """(label, delta, spread) for every compared figure in a results dict, for the chart."""
    rows: list[tuple[str, float, Spread]] = []
    ppl = results.get("ppl")
    if ppl and ppl.get("delta") is not None and math.isfinite(ppl["baseline"]):
        rows.append((f"{ppl.get('kind', 'causal')} ppl (rel. %)", 100.0 * ppl["delta"] / ppl["baseline"], None))
    sts = results.get("sts")
    if sts and sts.get("baseline_spearman") is not None:
        rows.append(("STS spearman", sts["spearman"] - sts["baseline_spearman"], None))
        if sts.get("fidelity") is not None:
            rows.append(("fidelity - 1", sts["fidelity"] - 1.0, None))
    for task, metrics in (results.get("glue") or {}).items():
        for metric, r in metrics.items():
            if r.get("delta") is not None:
                spread = math.hypot(r.get("std") or 0.0, r.get("baseline_std") or 0.0) if "std" in r else None
                rows.append((f"{task} {metric}", r["delta"], spread))
    asr = results.get("asr")
    if asr and asr.get("delta") is not None:
        ci = asr.get("delta_ci95")  # the bar's error is half the paired-bootstrap interval's width
        rows.append(("ASR WER (points)", 100.0 * asr["delta"], 50.0 * (ci[1] - ci[0]) if ci else None))
    for task, metrics in (results.get("tasks") or {}).items():
        for metric, cell in metrics.items():
            if not isinstance(cell, dict) or cell.get("delta") is None:
                continue
            ci = cell.get("ci95")
            spread = (cell["delta"] - ci[0], ci[1] - cell["delta"]) if ci else None
            if metric == "perplexity" and cell.get("baseline"):  # like text perplexity: relative, in %
                scale = 100.0 / cell["baseline"]
                rows.append((f"{task} ppl (rel. %)", scale * cell["delta"], (scale * spread[0], scale * spread[1]) if spread else None))
            else:
                rows.append((f"{task} {metric}", cell["delta"], spread))
    # an overflowed (inf) perplexity has no finite bar: the chart leaves it out rather than plot NaN
    return [r for r in rows if math.isfinite(r[1]) and all(math.isfinite(e) for e in _spread_pair(r[2]))]


def _spread_pair(spread: Spread) -> tuple[float, float]:
    if spread is None:
        return 0.0, 0.0
    return (spread, spread) if isinstance(spread, (int, float)) else (float(spread[0]), float(spread[1]))


def _unit(label: str) -> str:
    """Which axis a chart row belongs on: figures in different units never share a scale."""
    if "(rel. %)" in label:
        return "relative change, % (lower is better)"
    if "(points)" in label:
        return "WER points (lower is better)"
    return "converted - baseline"


def delta_chart(path: str | os.PathLike, results: dict[str, Any], title: str) -> Path | None:
    """Horizontal bars of converted - baseline per figure (error bars: the seed spread, or the paired
    bootstrap interval where there is one), one panel per unit (relative perplexity change, WER
    points, metric differences); None if nothing to plot."""
    rows = delta_rows(results)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = list(dict.fromkeys(_unit(r[0]) for r in rows))
    panels = [[r for r in rows if _unit(r[0]) == u] for u in units]
    fig, axes = plt.subplots(len(units), 1, squeeze=False, figsize=(7, 0.45 * len(rows) + 1.4 * len(units)),
                             gridspec_kw={"height_ratios": [len(p) + 1 for p in panels]})
    for ax, unit, panel in zip(axes[:, 0], units, panels):
        labels = [r[0] for r in panel]
        deltas = [r[1] for r in panel]
        errs = [[_spread_pair(r[2])[0] for r in panel], [_spread_pair(r[2])[1] for r in panel]]
        lower_better = ["WER" in label or "ppl" in label for label in labels]
        colors = ["tab:green" if (d <= 0 if low else d >= 0) else "tab:red" for d, low in zip(deltas, lower_better)]
        ax.barh(range(len(panel)), deltas, xerr=errs, color=colors, capsize=3)
        ax.set_yticks(range(len(panel)), labels)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(unit)
    axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
