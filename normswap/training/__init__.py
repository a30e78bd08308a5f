"""Recovery fine-tuning of converted models: LM loss, distillation from the original, mixtures.

    from normswap.training import finetune
    result = finetune("gpt2-dyt", teacher="gpt2", data="corpus.txt", out="gpt2-dyt-ft",
                      objective="distill", tokens=2_000_000)

Pieces, one job each: `data` (read, tokenize, pack, split), `objectives` (losses), `params` (which
parameters train), `progressive` (swap norms in one at a time), `checkpoint` (atomic save/resume),
`loop` (the Accelerate loop), `sharding` (what FSDP under `accelerate launch` needs: 0-dim parameters,
full state dicts, CPU processes), `report` (train_log.jsonl and the loss plot), `api` (`finetune`).
"""
from __future__ import annotations

from typing import Any

# Resolved on first use: `normswap.training.config` (which recipe validation reads) needs no torch,
# and `normswap recipe ls / validate` should not pay for importing it.
_LAZY = {"FinetuneResult": "api", "finetune": "api", "TrainConfig": "config", "parse_count": "config",
         "TrainingDiverged": "loop"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'normswap.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"normswap.training.{_LAZY[name]}"), name)


__all__ = ["FinetuneResult", "TrainConfig", "TrainingDiverged", "finetune", "parse_count"]
