"""Reading a recipe: YAML -> overrides -> schema check -> jobs with resolved paths -> input checks.

Everything here is cheap and happens before any model is loaded, so a typo costs a second.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from normswap.errors import NormswapError
from normswap.recipes import overrides as _ov
from normswap.recipes.schema import (
    JOB_KEYS, PATH_KEYS, STAGES, Job, Recipe, RecipeError, RecipeTop, check_bounded, line_of, read_yaml, resolve_path,
    validation_error,
)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = (), *, check_files: bool = True) -> Recipe:
    """Read, override, validate and resolve a recipe; raise RecipeError (one line) on any mistake."""
    path = Path(path)
    items = list(overrides)
    raw, lines = read_yaml(path)
    for item in items:  # an override's value is YAML too: the same bounds as the file's
        if "=" in item:
            shown = item if len(item) <= 60 else item[:57] + "..."
            check_bounded(item.partition("=")[2], f"override {shown!r}")
    raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}  # free keys for YAML anchors
    data = _ov.apply(raw, items)
    overridden = {tuple(_ov.parse(i)[0]): i for i in items}
    recipe_dir = path.resolve().parent

    try:
        top = RecipeTop.model_validate(data)
    except ValidationError as err:
        raise _error(err, path, lines, [()], (), RecipeTop, overridden) from None
    name = top.name or path.stem
    defaults = {k: data[k] for k in JOB_KEYS if data.get(k) is not None}
    runs = data.get("runs") or [{}]
    jobs: list[Job] = []
    for i, run in enumerate(runs):
        prefixes = [("runs", i), ()] if data.get("runs") else [()]
        merged = _merge(defaults, run)
        if "name" not in merged:
            merged["name"] = name if len(runs) == 1 else _default_name(merged)
        if merged.get("stages") is None:
            merged["stages"] = [s for s in STAGES if merged.get(s) is not None]
        for key in PATH_KEYS:
            _resolve(merged, key, recipe_dir, path, lines, prefixes)
        try:
            job = Job.model_validate(merged)
        except ValidationError as err:
            where = ("runs", str(run.get("name", i)) if isinstance(run, dict) else i) if data.get("runs") else ()
            raise _error(err, path, lines, prefixes, where, Job, overridden) from None
        if any(j.name == job.name for j in jobs):
            raise RecipeError(f"{path}:{line_of(lines, prefixes, ('name',)) or '?'}: two jobs are named {job.name!r}; give each run a unique name")
        jobs.append(job)
    recipe = Recipe(path=path, name=name, description=top.description.strip(), output_dir=top.output_dir, jobs=jobs,
                    raw=data, overrides=items)
    if check_files:
        check_inputs(recipe, lines)
    return recipe


def _default_name(job: dict[str, Any]) -> str:
    model = str(job.get("model") or "model").rstrip("/").split("/")[-1]
    target = (job.get("convert") or {}).get("to") if isinstance(job.get("convert"), dict) else None
    return f"{model}-{target}" if target else model


def _resolve(job: dict[str, Any], key: tuple, recipe_dir: Path, path: Path, lines: dict, prefixes: list[tuple]) -> None:
    node = job
    for k in key[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return
    value = node.get(key[-1])
    if not isinstance(value, str) or (key == ("finetune", "teacher") and value == "original"):
        return
    try:
        node[key[-1]] = resolve_path(value, recipe_dir)
    except KeyError as err:
        line = line_of(lines, prefixes, key)
        raise RecipeError(f"{path}:{line or '?'}: {'.'.join(key)}: {err.args[0]}") from None


def _error(err: ValidationError, path: Path, lines: dict, prefixes: list[tuple], where: tuple, model: Any,
           overridden: dict[tuple, str]) -> RecipeError:
    first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = tuple(str(x) for x in first["loc"])
    for keys, item in overridden.items():
        tail = keys[2:] if keys and keys[0] == "runs" else keys
        if tuple(tail) == loc[:len(tail)] and tail:
            msg = first["msg"].removeprefix("Value error, ")
            return RecipeError(f"override {item!r}: {msg}")
    return validation_error(err, path, lines, where, prefixes, model)


def _local(value: str) -> bool:
    return os.path.isabs(value)


def check_inputs(recipe: Recipe, lines: dict[tuple, int] | None = None) -> None:
    """Local files and folders named by the recipe must exist (Hub ids and `datasets` names are
    left to the stage that uses them, since they need the network)."""
    lines = lines or {}
    multi = bool(recipe.raw.get("runs"))
    for i, job in enumerate(recipe.jobs):
        prefixes = [("runs", i), ()] if multi else [()]
        checks: list[tuple[tuple, str | None, str]] = [(("model",), job.model, "dir")]
        if job.convert:
            checks += [(("convert", "calib_text"), job.convert.calib_text, "file"), (("convert", "verify_text"), job.convert.verify_text, "file"),
                       (("convert", "calib_audio"), job.convert.calib_audio, "dir"), (("convert", "verify_audio"), job.convert.verify_audio, "dir")]
        if job.finetune:
            checks += [(("finetune", "data"), job.finetune.data, "any"), (("finetune", "audio"), job.finetune.audio, "dir")]
            if job.finetune.teacher not in (None, "original"):
                checks.append((("finetune", "teacher"), job.finetune.teacher, "dir"))
        if job.eval:
            for part in ("ppl", "sts", "glue", "asr"):
                sec = getattr(job.eval, part)
                if sec is not None:
                    checks.append((("eval", part, "data"), sec.data, "dir" if part in ("glue", "asr") else "file"))
        for stage in STAGES:  # a named accelerator must be on this machine (auto and cpu always are)
            section = getattr(job, stage)
            spec = getattr(section, "device", None)
            if spec is None or spec in ("auto", "cpu"):
                continue
            from normswap.devices import resolve_device

            try:
                resolve_device(spec)
            except NormswapError as err:  # no such device here
                own = [p + (stage, "device") for p in prefixes if p + (stage, "device") in lines]  # else inherited from the job
                line = lines[own[0]] if own else line_of(lines, prefixes, ("device",))
                why = str(err).split(": ", 1)[-1] if str(err).startswith("--device") else str(err)
                why = why.replace("use --device ", "use device: ")
                raise RecipeError(f"{recipe.path}:{line or '?'}: job {job.name}: {stage}.device {spec}: {why}") from None
        for key, value, kind in checks:
            if value is None or not _local(value):
                continue
            p = Path(value)
            ok = p.is_dir() if kind == "dir" else p.is_file() if kind == "file" else p.exists()
            if not ok:
                line = line_of(lines, prefixes, key)
                what = "folder" if kind == "dir" else "file"
                raise RecipeError(f"{recipe.path}:{line or '?'}: job {job.name}: {'.'.join(key)}: no such {what} {value}")
