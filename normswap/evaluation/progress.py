"""Progress bars for long evaluation work: on stderr, and off when stderr is not a terminal."""
from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, desc: str, enabled: bool | None = None, unit: str = "it") -> Any:
    """A tqdm bar on stderr; `enabled=None` shows it only when stderr is a TTY (so logs stay clean)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)
