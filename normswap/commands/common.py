"""Options and output helpers shared by the CLI verbs.

This module is imported by `normswap --help`, so it imports nothing heavy at the top: torch and
transformers come in through `setup_runtime`, which every command that loads a model calls first.
"""
from __future__ import annotations

import enum
import json
import logging
from typing import Any, Optional

import typer

from normswap.log import logger


class OutputFormat(str, enum.Enum):
    human = "human"
    json = "json"


FORMAT_OPTION = typer.Option(OutputFormat.human, "--format", help="human: tables; json: one JSON object on stdout.")

THREADS_HELP = ("Torch CPU threads for this run (intra-op, and inter-op where torch still allows it) "
                "[default: torch's own: OMP_NUM_THREADS when set, else all cores]. On shared or oversubscribed cores "
                "OpenMP threads spin-wait for each other, so one or two threads can be faster than all cores.")
# One declaration for every command that computes; click's range check makes 0 or -1 a usage error
# (one `error:` line, exit 2, from normswap.cli.main).
THREADS_OPTION = typer.Option(None, "--threads", min=1, metavar="N", help=THREADS_HELP, show_default=False)


def setup_runtime(threads: Optional[int] = None) -> None:
    """Prepare the process to load and run models, before any work: torch's thread counts
    (`--threads`; None keeps torch's default, which honours OMP_NUM_THREADS), transformers' own
    progress bars and advice off (normswap shows its own progress; `--verbose` keeps the advice),
    and the "normswap" model type registered with transformers' Auto classes (the command line
    skips that at import, see `normswap/__init__.py`)."""
    if threads is not None:
        apply_threads(threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not logger.isEnabledFor(logging.DEBUG):  # `--verbose` (normswap.log.setup_logging)
        transformers.utils.logging.set_verbosity_error()
    from normswap.auto import register

    register()


def apply_threads(threads: int) -> None:
    """torch.set_num_threads(threads), and the inter-op pool too while torch still allows it (once
    per process, before any inter-op work: a second in-process command keeps the first one's)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        logger.debug("inter-op threads already fixed at %d; --threads %d sets the intra-op threads only",
                     torch.get_num_interop_threads(), threads)


def emit_json(obj: Any) -> None:
    """Print one JSON object on stdout (non-finite floats as null)."""
    typer.echo(json.dumps(_finite(obj), indent=2, default=str))


def _finite(obj: Any) -> Any:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    return str(c)
