"""Recovery fine-tuning of converted models: LM loss, distillation from the original, mixtures.

    from normswap.training import finetune
    result = finetune("gpt2-dyt", teacher="gpt2", data="corpus.txt", out="gpt2-dyt-ft",
                      objective="distill", tokens=2_000_000)

Pieces, one job each: `data` (read, tokenize, pack, split), `objectives` (losses), `params` (which
parameters train), `progressive` (swap norms in one at a time), `checkpoint` (atomic save/resume),
`loop` (the Accelerate loop), `report` (train_log.jsonl and the loss plot), `api` (`finetune`).
"""
from __future__ import annotations

from normswap.training.api import FinetuneResult, finetune
from normswap.training.config import TrainConfig, parse_count
from normswap.training.loop import TrainingDiverged

__all__ = ["FinetuneResult", "TrainConfig", "TrainingDiverged", "finetune", "parse_count"]
