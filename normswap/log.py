"""Logging to stderr, so that stdout carries only results (tables or JSON)."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("normswap")


def setup_logging(verbose: bool = False) -> None:
    """Send normswap's log records to stderr, once."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("normswap: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
