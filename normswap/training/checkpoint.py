"""Training checkpoints: written atomically, read back for `--resume`.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding the model weights (safetensors), the
optimizer state, each process's RNG state and a `state.json` (step, tokens, scheduler, scaler). It
is assembled in a hidden temporary folder and renamed into place, so a crash or a Ctrl-C mid-write
never leaves a half checkpoint: the newest complete folder is always the last good state.
Optimizer and RNG files hold only tensors and plain containers and are read with
`torch.load(weights_only=True)`: nothing is unpickled.

A checkpoint can still be damaged afterwards (a full disk, a copy cut short, a stray edit):
`state.json` records the size and SHA-256 of every file beside it, and loading checks them, the
tensors' names and shapes, and the state's keys before anything is restored. `--resume` takes the
newest checkpoint that passes (`resume_checkpoint`), warning about each damaged one it skips.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.log import logger

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
_NAME = re.compile(r"^step-(\d+)$")


class DamagedCheckpoint(NormswapError):
    """A checkpoint that cannot be restored; `reason` names the file and what is wrong with it."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, _one_line(reason)
        super().__init__(f"checkpoint {path} is damaged: {self.reason}")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _torch_load(path: Path, f: Path, **kwargs: Any) -> Any:
    """torch.load(weights_only=True), its failure put in one line. (torch's own message runs to a
    page, and suggests weights_only=False, which would run whatever the file says.)"""
    try:
        return torch.load(f, weights_only=True, **kwargs)
    except Exception as err:  # not a torch file, truncated, or a pickle of something other than tensors
        text = str(err).strip()
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = " ".join(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip))
        detail = detail.removeprefix("WeightsUnpickler error:").strip() or (text.split(". ")[0] if text else type(err).__name__)
        if "GLOBAL" in detail:
            raise DamagedCheckpoint(path, f"{f} holds Python objects other than tensors, refused without running them ({detail})") from None
        raise DamagedCheckpoint(path, f"{f} is not a readable torch file ({detail.split('. ')[0]})") from None


def _step_of(path: Path) -> int:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else -1


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders in `out`, oldest first. Checkpoints are renamed into place complete, so
    each should be intact; one that is not (say, without its state.json) is still listed, so that
    resuming reports it instead of silently passing it over."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    try:
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    except OSError as err:
        raise NormswapError(f"cannot read {root}: {err.strerror or err}") from None
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(out: Path, step: int, *, model: nn.Module, optimizer: Any, state: dict[str, Any],
                    accelerator: Any, keep: int, sharded: dict[str, tuple[int, ...]] | None = None) -> Path:
    """Write checkpoint `step` atomically (all processes call this); prune to the newest `keep`.

    `sharded` (FSDP: the promoted scalars' original shapes, see `normswap.training.sharding`): the
    weights and the optimizer state are gathered whole first (a collective), then written by the
    main process like an unsharded run's; the optimizer state is then keyed by parameter name."""
    from safetensors.torch import save_file, save_model

    from normswap.outputs import apply_umask

    final = checkpoint_dir(out, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        for stale in final.parent.glob(".tmp-step-*") if final.parent.is_dir() else []:  # left by a killed run (one run per folder: the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    weights = optim = None
    if sharded is not None:
        from normswap.training.sharding import gather_model_state, gather_optimizer_state

        weights = gather_model_state(model, accelerator, sharded)
        optim = gather_optimizer_state(model, optimizer)
        state = {**state, "optimizer_keys": "names"}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if weights is not None:
            save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            torch.save(optim, tmp / OPTIMIZER_FILE)
        else:
            save_model(accelerator.unwrap_model(model), str(tmp / MODEL_FILE))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / STATE_FILE).write_text(json.dumps({**state, "files": files}, indent=1, default=str) + "\n")
        apply_umask(tmp)  # safetensors writes 0600 files
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out):
            if _step_of(old) > step:  # left by the run before a resume that skipped it as damaged
                logger.info("removing %s: a damaged checkpoint from before the resume, superseded by %s", old, final.name)
                shutil.rmtree(old, ignore_errors=True)
        for old in [c for c in list_checkpoints(out) if _step_of(c) <= step][:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def folder_bytes(folder: Path) -> int:
    """Bytes of the files below `folder` (0 if it does not exist)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) if folder.is_dir() else 0


def drop_checkpoints(out: Path) -> int:
    """Delete `out`'s training checkpoints once its final model is saved; returns the bytes freed.

    They exist to resume an interrupted run and hold the weights again plus the optimizer state
    (about three times the model each). The folder is first renamed aside in one step, so a kill
    during the deletion leaves no half checkpoint that `--resume` would try to read, only a hidden
    `.checkpoints.tmp-<pid>-*` folder that the next call removes.
    """
    from normswap.outputs import clean_stale, staging_dir

    root = out / CHECKPOINTS
    clean_stale(root)  # trash of an earlier deletion that was killed
    if not root.is_dir() or root.is_symlink():
        return 0
    freed = folder_bytes(root)
    trash = staging_dir(root)
    os.rmdir(trash)  # mkdtemp only reserves a unique name; the rename below takes it
    os.replace(root, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return freed


def read_state(path: Path) -> dict[str, Any]:
    """The checked state.json of checkpoint `path`; DamagedCheckpoint names the file and the fault."""
    f = path / STATE_FILE
    try:
        with open(f, "rb") as fh:
            raw = fh.read(16 * 2**20 + 1)
        if len(raw) > 16 * 2**20:
            raise DamagedCheckpoint(path, f"{f} is larger than 16 MiB")
        state = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(path, f"{f} is missing") from None
    except OSError as err:
        raise DamagedCheckpoint(path, f"cannot read {f} ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON
        raise DamagedCheckpoint(path, f"{f} is not valid JSON ({err})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(path, f"{f} is not a JSON object")
    for key, kind in (("step", int), ("tokens", int), ("scheduler", dict)):
        if key not in state:
            raise DamagedCheckpoint(path, f"{f} has no {key!r}")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise DamagedCheckpoint(path, f"{f}: {key!r} is {value!r:.60}, not a {'count' if kind is int else 'mapping'}")
    if _NAME.match(path.name) and state["step"] != _step_of(path):
        raise DamagedCheckpoint(path, f"{f} says step {state['step']} in the folder of step {_step_of(path)}")
    if not isinstance(state.get("scaler"), (dict, type(None))):
        raise DamagedCheckpoint(path, f"{f}: 'scaler' is not a mapping")
    files = state.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str) for e in files.values())):
        raise DamagedCheckpoint(path, f"{f}: 'files' is not a list of sizes and digests")
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_file(path: Path, name: str, files: dict[str, Any] | None) -> Path:
    f = path / name
    if not f.is_file():
        raise DamagedCheckpoint(path, f"{f} is missing")
    entry = (files or {}).get(name)
    if entry is not None:
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise DamagedCheckpoint(path, f"{f} is {'truncated' if size < entry['bytes'] else 'the wrong size'} "
                                          f"({size} bytes; state.json recorded {entry['bytes']})")
        if _sha256(f) != entry["sha256"]:
            raise DamagedCheckpoint(path, f"{f} is corrupt (its SHA-256 differs from the one in state.json)")
    return f


def _read_model(path: Path, f: Path, model: nn.Module, sharded: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against `model`: same names (up to tied weights), same shapes, finite.
    `sharded`: the model is an FSDP one (global shapes from its state dict, every name saved)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(f), device="cpu")
    except Exception as err:  # safetensors raises its own error type for a bad header or a short file
        raise DamagedCheckpoint(path, f"{f} is not a readable safetensors file ({err})") from None
    if sharded is not None:
        from normswap.training.sharding import model_shapes

        shapes = model_shapes(model, sharded)
        missing = [k for k in shapes if k not in tensors]
    else:
        expected = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in expected.items()}
        present = {expected[k].data_ptr(): k for k in tensors if k in expected}
        missing = [k for k in expected if k not in tensors and expected[k].data_ptr() not in present]  # tied weights are saved once
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise DamagedCheckpoint(path, f"{f} holds tensors the model does not have ({', '.join(unexpected[:3])})")
    if missing:
        raise DamagedCheckpoint(path, f"{f} lacks tensors of the model ({', '.join(missing[:3])})")
    for k, t in tensors.items():
        if tuple(t.shape) != shapes[k]:
            raise DamagedCheckpoint(path, f"{f}: {k} has shape {tuple(t.shape)}, the model {shapes[k]}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DamagedCheckpoint(path, f"{f}: {k} holds non-finite values")
    return tensors


def _read_optimizer(path: Path, f: Path, optimizer: Any) -> dict[str, Any]:
    """The optimizer state (tensors and plain containers only), checked against `optimizer`."""
    saved = _torch_load(path, f, map_location="cpu")
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved["param_groups"])):
        raise DamagedCheckpoint(path, f"{f} is not an optimizer state")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups) or any(
            len(g["params"]) != len(h["params"]) for g, h in zip(saved["param_groups"], groups)):
        raise DamagedCheckpoint(path, f"{f} is for other parameters (its groups do not match the model's)")
    params = dict(zip((i for g in saved["param_groups"] for i in g["params"]), (p for h in groups for p in h["params"])))
    for key, entry in saved["state"].items():
        if key not in params or not isinstance(entry, dict):
            raise DamagedCheckpoint(path, f"{f} has state for an unknown parameter ({key!r:.40})")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(params[key].shape):
                raise DamagedCheckpoint(path, f"{f}: {name} of parameter {key} has shape {tuple(value.shape)}, "
                                              f"the parameter {tuple(params[key].shape)}")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise DamagedCheckpoint(path, f"{f}: {name} of parameter {key} holds non-finite values")
    return saved


def _scheduler_state(path: Path, saved: dict[str, Any], scheduler: Any) -> dict[str, Any]:
    """The saved scheduler state, restricted to the keys (and kinds of value) a fresh scheduler has:
    `load_state_dict` sets every key as an attribute, so nothing else may come from the file."""
    fresh = scheduler.state_dict()
    clean: dict[str, Any] = {}
    for key, now in fresh.items():
        if key == "lr_lambdas":
            clean[key] = [None] * len(now)  # functions are not saved; never update them from a file
            continue
        if key not in saved:
            if key in ("base_lrs", "last_epoch"):
                raise DamagedCheckpoint(path, f"{path / STATE_FILE}: the scheduler state has no {key!r}")
            continue  # a field of another torch version: the fresh scheduler's value stands
        value = saved[key]
        ok = (isinstance(value, bool) == isinstance(now, bool) and (
            isinstance(value, int) if isinstance(now, int) else
            isinstance(value, (int, float)) and math.isfinite(value) if isinstance(now, float) else
            isinstance(value, list) and len(value) == len(now) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            if isinstance(now, list) else value is None or type(value) is type(now)))
        if not ok:
            raise DamagedCheckpoint(path, f"{path / STATE_FILE}: the scheduler's {key!r} is {value!r:.60}")
        clean[key] = value
    return clean


def _read_rng(path: Path, f: Path) -> dict[str, Any]:
    state = _torch_load(path, f)
    ok = isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor) and state["torch"].dtype == torch.uint8
    ok = ok and (state.get("cuda") is None or (isinstance(state["cuda"], (list, tuple)) and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in state["cuda"])))
    if not ok:
        raise DamagedCheckpoint(path, f"{f} is not a random-number generator state")
    return state


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: Any, accelerator: Any,
                    scheduler: Any = None, sharded: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Restore model, optimizer, scheduler (if given), scaler and this process's RNG from `path`;
    returns its state.json. Everything is read and checked first; a fault raises DamagedCheckpoint
    (then the objects may be partly restored, to be overwritten by an older checkpoint)."""
    state = read_state(path)
    files = state.get("files")
    unwrapped = accelerator.unwrap_model(model)
    rank = accelerator.process_index
    tensors = _read_model(path, _check_file(path, MODEL_FILE, files), unwrapped, sharded)
    by_names = state.get("optimizer_keys") == "names"
    if by_names != (sharded is not None):
        raise NormswapError(f"cannot resume from {path}: it was saved by a{'' if by_names else 'n un'}sharded (FSDP) run, and this run is "
                            f"{'not ' if sharded is None else ''}sharded; resume it the way it was started")
    opt = _read_optimizer(path, _check_file(path, OPTIMIZER_FILE, files), optimizer)
    rng_name = f"rng-{rank}.pt"
    rng = None
    if rank == 0 or (path / rng_name).exists() or rng_name in (files or {}):  # more processes than saved: fresh RNG
        rng = _read_rng(path, _check_file(path, rng_name, files))
    sched = _scheduler_state(path, state["scheduler"], scheduler) if scheduler is not None else None
    scaler = getattr(accelerator, "scaler", None)
    try:
        if sharded is not None:
            from normswap.training.sharding import load_optimizer_state

            load_optimizer_state(model, optimizer, opt)
        else:
            optimizer.load_state_dict(opt)
    except Exception as err:
        raise DamagedCheckpoint(path, f"{path / OPTIMIZER_FILE} does not fit the optimizer ({err})") from None
    if sched is not None:
        scheduler.load_state_dict(sched)
    if state.get("scaler") and scaler is not None:
        try:
            scaler.load_state_dict(state["scaler"])
        except Exception as err:
            raise DamagedCheckpoint(path, f"{path / STATE_FILE}: bad gradient-scaler state ({err})") from None
    if sharded is not None:
        from normswap.training.sharding import load_model_state

        load_model_state(model, tensors, sharded)
    else:
        unwrapped.load_state_dict(tensors, strict=False)  # names and shapes checked above; tied weights follow
    if rng is not None:
        try:
            _set_rng_state(rng)
        except Exception as err:
            raise DamagedCheckpoint(path, f"{path / rng_name} is not a usable generator state ({err})") from None
    return state


def resume_checkpoint(out: Path, *, model: nn.Module, optimizer: Any, accelerator: Any,
                      scheduler: Any = None, sharded: dict[str, tuple[int, ...]] | None = None) -> tuple[Path, dict[str, Any]]:
    """Restore the newest intact checkpoint of `out` (skipping damaged ones with a warning that
    names the checkpoint and what is wrong); returns it and its state. Raises NormswapError (one
    line, every checkpoint and its fault) if none is intact. All processes take the same one."""
    found = list_checkpoints(out)
    if not found:
        raise NormswapError(f"nothing to resume in {out}: no checkpoint")
    problems: list[str] = []
    for i, ckpt in enumerate(reversed(found)):
        reason, state = None, None
        try:
            state = load_checkpoint(ckpt, model=model, optimizer=optimizer, accelerator=accelerator, scheduler=scheduler,
                                    sharded=sharded)
        except DamagedCheckpoint as err:
            reason = err.reason
        if accelerator.num_processes > 1:  # a file one process cannot read makes the checkpoint unusable for all
            bad = accelerator.reduce(torch.tensor([float(reason is not None)], device=accelerator.device), "sum")
            if float(bad[0]) > 0 and reason is None:
                reason = "damaged on another process"
        if reason is None:
            return ckpt, state
        older = found[-2 - i] if i + 1 < len(found) else None
        logger.warning("checkpoint %s is damaged: %s; %s", ckpt.name, reason,
                       f"falling back to {older.name}" if older else "no older checkpoint to fall back to")
        problems.append(f"{ckpt.name}: {reason}")
    raise NormswapError(f"cannot resume {out}: no intact checkpoint ({'; '.join(problems)})")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
