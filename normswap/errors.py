"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""
from __future__ import annotations


class NormswapError(Exception):
    """A mistake in the user's input (bad path, bad option, unsupported model) rather than a bug."""

    exit_code = 2
