"""Sharing converted checkpoints: the Hub export with remote code, the stock export, the model
card, the upload.

    from normswap.export import push, export_stock
    push("runs/quickstart/gpt2-dyt/finetune", "me/gpt2-dyt", dry_run=True)   # writes ...-hub/ and says where
    export_stock("gpt2-rms", "gpt2-rms-stock")   # a plain GPT2LMHeadModel checkpoint, verified

`remote` (export folder, modeling_normswap.py from `template_modeling.py`, auto_map), `stock`
(a plain checkpoint of the original class, where one can hold the conversion), `card` (README.md
with metadata and model-index results), `push` (huggingface_hub upload).
"""
from __future__ import annotations

from normswap.export.push import prepare, push
from normswap.export.remote import check_checkpoint, export_for_hub
from normswap.export.stock import export_stock, stock_blockers

__all__ = ["check_checkpoint", "export_for_hub", "export_stock", "prepare", "push", "stock_blockers"]
