"""GLUE metrics through `evaluate`, from the project's own metric module loaded by path.

`evaluate.load("glue")` would fetch a script from the Hub; offline machines cannot, so normswap
ships `normswap/metrics/glue_metric.py` and loads that file instead.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from normswap.errors import NormswapError

METRIC_PATH = Path(__file__).resolve().parent.parent / "metrics" / "glue_metric.py"


@lru_cache(maxsize=None)
def glue_metric(task: str) -> Any:
    """The `evaluate` metric object of one GLUE task (cached per task)."""
    import evaluate

    try:
        return evaluate.load(str(METRIC_PATH), config_name=task)
    except KeyError as err:
        raise NormswapError(str(err).strip("\"'")) from None


def compute_glue_metrics(task: str, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """GLUE metrics of `predictions` against `references` for `task` (e.g. "cola", "stsb")."""
    result = glue_metric(task).compute(predictions=list(predictions), references=list(references))
    return {k: float(v) for k, v in result.items()}
