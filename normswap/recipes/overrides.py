"""`key=value` overrides from the command line, checked against the recipe schema before use.

    model=gpt2                         a job default (every job that does not set its own)
    finetune.tokens=5M                 a nested key; `tokens` replaces `steps` and vice versa
    runs.gpt2-dyt.convert.to=rmsnorm   one job of a multi-job recipe, by name or index
    stages=[convert,eval]              values are YAML: numbers, booleans, lists, null

A key that the schema does not have is an error (with a suggestion), even if the value is fine.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from normswap.recipes.schema import JOB_KEYS, Job, RecipeError, RecipeTop, submodel, suggest

_TOP_ONLY = [k for k in RecipeTop.model_fields if k not in JOB_KEYS]
_EXCLUSIVE = {"tokens": "steps", "steps": "tokens"}  # a finetune budget is one or the other


def parse(item: str) -> tuple[list[str], Any]:
    """"a.b=value" -> (["a", "b"], parsed value)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value (e.g. finetune.tokens=5M)")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and not os.path.isabs(value) and os.path.exists(value) and ("/" in value or os.sep in value):
        value = os.path.abspath(value)  # a path typed on the command line is relative to the cwd
    return parts, value


def check_key(parts: list[str], item: str) -> None:
    """The key must exist in the schema (job keys at the top level or under runs.<job>)."""
    if parts[0] in _TOP_ONLY:
        if parts[0] == "runs":
            if len(parts) < 3:
                raise RecipeError(f"override {item!r}: address a job's key, e.g. runs.NAME.convert.to=dyt")
            parts = parts[2:]
        elif len(parts) > 1:
            raise RecipeError(f"override {item!r}: {parts[0]} has no sub-keys")
        else:
            return
    cls: Any = Job
    for i, part in enumerate(parts):
        if cls is None:
            raise RecipeError(f"override {item!r}: {'.'.join(parts[:i])} has no sub-keys")
        known = list(cls.model_fields) + (_TOP_ONLY if cls is Job and i == 0 else [])
        if cls is Job and part == "name" and i == 0:
            return
        if part not in cls.model_fields:
            where = ".".join(parts[:i]) or "the recipe"
            raise RecipeError(f"override {item!r}: no key {part!r} in {where}{suggest(part, known)}")
        cls = submodel(cls.model_fields[part].annotation)


def _copy(obj: Any) -> Any:
    """A deep copy that does not keep YAML aliases shared (an override of one job's `eval` must not
    change another job that took the same section from an anchor)."""
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj


def apply(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """A copy of the raw recipe data with the overrides applied (in order)."""
    data = _copy(raw)
    for item in items:
        parts, value = parse(item)
        check_key(parts, item)
        target = data
        top_level = parts[0] != "runs"
        if parts[0] == "runs":
            runs = data.get("runs") or []
            sel = parts[1]
            match = [r for r in runs if isinstance(r, dict) and str(r.get("name")) == sel]
            if not match and sel.isdigit() and int(sel) < len(runs):
                match = [runs[int(sel)]]
            if not match:
                names = [str(r.get("name")) for r in runs if isinstance(r, dict)]
                raise RecipeError(f"override {item!r}: no job {sel!r} under runs" + (f" (jobs: {', '.join(names)})" if names else ""))
            target, parts = match[0], parts[2:]
        for p in parts[:-1]:
            nxt = target.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                target[p] = nxt
            target = nxt
        last = parts[-1]
        target[last] = value
        if last in _EXCLUSIVE and len(parts) >= 2 and parts[-2] == "finetune" and value is not None:
            target.pop(_EXCLUSIVE[last], None)
            if top_level:  # a run-wide budget replaces the other kind of budget in every job too
                for r in data.get("runs") or []:
                    if isinstance(r, dict) and isinstance(r.get("finetune"), dict):
                        r["finetune"].pop(_EXCLUSIVE[last], None)
    return data
