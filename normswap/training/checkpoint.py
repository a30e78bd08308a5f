"""Training checkpoints: written atomically, read back for `--resume`.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding the model weights (safetensors), the
optimizer state, each process's RNG state and a `state.json` (step, tokens, scheduler, scaler). It
is assembled in a hidden temporary folder and renamed into place, so a crash or a Ctrl-C mid-write
never leaves a half checkpoint: the newest complete folder is always the last good state.
Optimizer and RNG files hold only tensors and plain containers and are read with
`torch.load(weights_only=True)`: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(out: Path, step: int, *, model: nn.Module, optimizer: Any, state: dict[str, Any],
                    accelerator: Any, keep: int) -> Path:
    """Write checkpoint `step` atomically (all processes call this); prune to the newest `keep`."""
    from safetensors.torch import save_model

    final = checkpoint_dir(out, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: Any, accelerator: Any) -> dict[str, Any]:
    """Restore model, optimizer and this process's RNG from `path`; returns its state.json."""
    from safetensors.torch import load_model

    load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "state.json").read_text())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
