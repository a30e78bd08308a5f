"""Recipes: YAML files that take models through convert -> finetune -> eval and write a report.

    from normswap.recipes import load_recipe, run_recipe
    recipe = load_recipe("recipes/quickstart.yaml", ["finetune.steps=50"])
    results = run_recipe(recipe)          # runs/quickstart/{results.json,report.md,...}

`schema` (the file format and its checks), `overrides` (key=value), `loader` (file -> Recipe),
`runner` (stages, run folder, resume), `report` (results.json, report.md, plots).
"""
from __future__ import annotations

import os
from pathlib import Path

from normswap.recipes.loader import check_inputs, load_recipe
from normswap.recipes.runner import run_recipe
from normswap.recipes.schema import Recipe, RecipeError

__all__ = ["Recipe", "RecipeError", "check_inputs", "find_recipe", "list_recipes", "load_recipe", "recipe_dirs", "run_recipe"]


def recipe_dirs() -> list[Path]:
    """Where `normswap recipe ls` looks: $NORMSWAP_RECIPES (os.pathsep-separated), ./recipes, and
    the recipes/ folder of the normswap checkout."""
    dirs = [Path(p) for p in os.environ.get("NORMSWAP_RECIPES", "").split(os.pathsep) if p]
    dirs += [Path("recipes"), Path(__file__).resolve().parent.parent.parent / "recipes"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and all(d.resolve() != o.resolve() for o in out):
            out.append(d)
    return out


def list_recipes() -> list[Path]:
    """Every *.yaml / *.yml file in the recipe folders (first folder wins on equal names)."""
    seen: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(list(d.glob("*.yaml")) + list(d.glob("*.yml"))):
            seen.setdefault(p.stem, p)
    return sorted(seen.values(), key=lambda p: p.stem)


def find_recipe(name_or_path: str) -> Path:
    """A recipe file by path, or by name among the listed recipes (`quickstart`)."""
    p = Path(name_or_path)
    if p.exists() or p.suffix in (".yaml", ".yml") or os.sep in name_or_path or "/" in name_or_path:
        return p
    for r in list_recipes():
        if r.stem == name_or_path:
            return r
    return p
