"""Where the shared test and benchmark assets live (checkpoints, WikiText-2, GLUE).

Tests, benchmarks and the quickstart find them through ``NORMSWAP_ASSETS``; by default
``../shared/assets`` beside the project checkout.
"""
from __future__ import annotations

import os
from pathlib import Path

_DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"


def assets_dir() -> Path:
    """The assets folder: ``$NORMSWAP_ASSETS`` if set, else ``../shared/assets`` beside the checkout."""
    env = os.environ.get("NORMSWAP_ASSETS")
    return Path(env) if env else _DEFAULT


def asset(*parts: str) -> Path:
    """Path of one asset, e.g. ``asset("gpt2-standin-wt2")``."""
    return assets_dir().joinpath(*parts)
