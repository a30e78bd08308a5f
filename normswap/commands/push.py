"""`normswap push DIR REPO_ID`: upload a converted checkpoint to the Hub with a model card."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `push` command to the CLI (filled in below)."""
