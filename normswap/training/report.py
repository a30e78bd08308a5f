"""The training log (`train_log.jsonl`, one JSON object per logged step or evaluation) and its plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from normswap.log import logger

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss_curve.png"


class TrainLog:
    """Append-only JSONL log. On resume, entries past the resumed step are dropped first, so the
    log of an interrupted-and-resumed run reads like one run."""

    def __init__(self, out: Path, *, enabled: bool = True):
        self.path = out / LOG_NAME
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = [e for e in self.read() if isinstance(e.get("step", 0), int) and e.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The log's entries. A damaged line (a run killed mid-write, a stray edit) is skipped
        with a warning: the log is a record of the run, not an input to it."""
        if not self.path.is_file():
            return []
        entries, bad = [], 0
        for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not ln.strip():
                continue
            try:
                entry = json.loads(ln)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                bad += 1
        if bad:
            logger.warning("%s: skipped %d damaged line(s)", self.path, bad)
        return entries


def plot_losses(log: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Training and validation loss against step, as a PNG (None when there is nothing to plot)."""
    train = [(e["step"], e["loss"]) for e in log if e.get("kind") == "train" and e.get("loss") is not None]
    val = [(e["step"], e["val_loss"]) for e in log if e.get("kind") == "val" and e.get("val_loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
