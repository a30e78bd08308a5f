"""Test setup: never touch the network; find the shared assets."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from normswap.assets import asset  # noqa: E402


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"asset {path} not available (set NORMSWAP_ASSETS)")
    return path


@pytest.fixture(scope="session")
def standin_path() -> Path:
    return _need(asset("gpt2-standin-wt2"))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return _need(asset("all-MiniLM-L6-v2"))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models gain nothing from more, and other jobs share the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
