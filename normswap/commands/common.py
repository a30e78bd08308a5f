"""Options and output helpers shared by the CLI verbs."""
from __future__ import annotations

import enum
import json
from typing import Any

import typer


class OutputFormat(str, enum.Enum):
    human = "human"
    json = "json"


FORMAT_OPTION = typer.Option(OutputFormat.human, "--format", help="human: tables; json: one JSON object on stdout.")


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
