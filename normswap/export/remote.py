"""The Hub export of a converted checkpoint: model files, custom modeling code and `auto_map`.

The folder loads three ways:
- `transformers.AutoModel...from_pretrained(folder_or_repo, trust_remote_code=True)` without
  normswap installed: `modeling_normswap.py` (generated from `template_modeling.py`) rebuilds the
  base architecture, re-applies the recorded changes and loads strictly;
- `normswap.load(folder)` (the `normswap` section of config.json is kept as is);
- plain transformers without `trust_remote_code` refuses the unknown model type instead of
  silently rebuilding LayerNorm.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from normswap.errors import NormswapError
from normswap.outputs import atomic_output, check_disjoint

MODELING_FILE = "modeling_normswap.py"
TEMPLATE = Path(__file__).with_name("template_modeling.py")
AUTO_MAP = {
    "AutoConfig": "modeling_normswap.NormswapConfig",
    "AutoModel": "modeling_normswap.NormswapModel",
    "AutoModelForCausalLM": "modeling_normswap.NormswapForCausalLM",
    "AutoModelForMaskedLM": "modeling_normswap.NormswapForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_normswap.NormswapForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_normswap.NormswapForTokenClassification",
    "AutoModelForImageClassification": "modeling_normswap.NormswapForImageClassification",
}
# training artefacts that live beside a fine-tuned model and must not be uploaded
_SKIP = {"checkpoints", "train_log.jsonl", "loss_curve.png", "finetune_config.json", "finetune_result.json", "README.md",
         "config.json", "model.safetensors", "results.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".index.json")


def check_checkpoint(folder: str | os.PathLike) -> Path:
    """A folder written by normswap (config.json with a `normswap` section and model.safetensors)."""
    from normswap.loading import is_converted

    p = Path(folder)
    if not p.is_dir():
        raise NormswapError(f"{folder} is not a folder")
    if not (p / "config.json").is_file():
        raise NormswapError(f"{folder} is not a model folder (no config.json)")
    if not is_converted(p):
        raise NormswapError(f"{folder} is not a converted checkpoint (config.json has no 'normswap' section); convert it with normswap first")
    if not (p / "model.safetensors").is_file():
        raise NormswapError(f"{folder} has no model.safetensors")
    return p


def modeling_source() -> str:
    """The text of modeling_normswap.py: the template with this version stamped in."""
    from normswap import __version__

    text = TEMPLATE.read_text(encoding="utf-8")
    stamped = text.replace('NORMSWAP_VERSION = "dev"  # set at export time', f'NORMSWAP_VERSION = "{__version__}"')
    if re.search(r"^\s*(import|from)\s+normswap\b", stamped, re.M):  # the whole point of the file
        raise AssertionError("template_modeling.py must not import normswap")
    return stamped


def export_for_hub(folder: str | os.PathLike, out: str | os.PathLike, *, card: str | None = None) -> list[str]:
    """Write the upload folder for the converted checkpoint `folder` into `out` (replaced if it is
    an earlier export); returns the relative paths of the files written."""
    src = check_checkpoint(folder)
    out = Path(out)
    check_disjoint(out, {"checkpoint": src}, flag="--export-dir")
    if out.exists() and not (out / MODELING_FILE).is_file():
        raise NormswapError(f"export folder {out} exists and is not an earlier normswap export; choose another")
    # An earlier export is replaced only once the new one is complete.
    with atomic_output(out, overwrite=True, inputs={"checkpoint": src}, flag="--export-dir") as tmp:
        (tmp / MODELING_FILE).write_text(modeling_source(), encoding="utf-8")  # marks the folder as an export
        shutil.copy2(src / "model.safetensors", tmp / "model.safetensors")
        for item in src.iterdir():
            if item.name in _SKIP or item.name.startswith(".") or item.name.endswith(_WEIGHT_SUFFIXES) or item.name.startswith("checkpoint"):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            elif item.is_file():
                shutil.copy2(item, tmp / item.name)
        cfg: dict[str, Any] = json.loads((src / "config.json").read_text())
        cfg["auto_map"] = dict(AUTO_MAP)
        _public_provenance(cfg["normswap"], tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _public_provenance(record: dict[str, Any], folder: Path) -> None:
    """The record's provenance as the public may read it: a source, student, teacher or data file
    that is not a Hub id is named "a local checkpoint" / "a local file" (a path on the converting
    machine means nothing to a reader, and may tell too much). The digest is recomputed over the
    record so changed and the weights in `folder`, so the export still verifies."""
    from normswap.export.card import looks_like_hub_id
    from normswap.integrity import read_checkpoint, record_digest, tensor_list, weight_files

    def public(value: Any, what: str) -> Any:
        return value if not isinstance(value, str) or looks_like_hub_id(value) else what

    source = record.get("source") or {}
    for key, what in (("model", "a local checkpoint"),):
        if key in source:
            source[key] = public(source[key], what)
    finetune = source.get("finetune")
    if isinstance(finetune, dict):
        for key, what in (("from", "a local checkpoint"), ("teacher", "a local checkpoint"), ("data", "a local file")):
            if key in finetune:
                finetune[key] = public(finetune[key], what)
    if record.get("digest") is not None:
        files, weight_map = weight_files(folder)
        headers = read_checkpoint(files, weight_map, folder / "model.safetensors.index.json")
        record["digest"] = record_digest(record, tensor_list(headers))
