"""Sharing converted checkpoints: the Hub export with remote code, the model card, the upload.

    from normswap.export import push
    push("runs/quickstart/gpt2-dyt/finetune", "me/gpt2-dyt", dry_run=True)   # writes ...-hub/ and says where

`remote` (export folder, modeling_normswap.py from `template_modeling.py`, auto_map), `card`
(README.md with metadata and model-index results), `push` (huggingface_hub upload).
"""
from __future__ import annotations

from normswap.export.push import prepare, push
from normswap.export.remote import check_checkpoint, export_for_hub

__all__ = ["check_checkpoint", "export_for_hub", "prepare", "push"]
