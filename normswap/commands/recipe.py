"""`normswap recipe ls | validate | run`: YAML recipes of convert -> finetune -> eval with a report.

    normswap recipe ls
    normswap recipe validate recipes/minilm-dyt-glue.yaml
    normswap recipe run recipes/gpt2-dyt.yaml model=gpt2 finetune.tokens=5M
    normswap recipe run quickstart --force
"""
from __future__ import annotations

from typing import List, Optional

import typer

from normswap.commands.common import FORMAT_OPTION, THREADS_OPTION, OutputFormat, emit_json, setup_runtime, table

recipe_app = typer.Typer(help="Recipes: convert -> finetune -> eval from one YAML file, with a report.", no_args_is_help=True,
                         rich_markup_mode=None)  # plain help, as the root app's (see normswap.cli)


def register(app: typer.Typer) -> None:
    """Add the `recipe` command group to the CLI."""
    app.add_typer(recipe_app, name="recipe")


@recipe_app.command("ls", help="List the recipes in ./recipes, the checkout's recipes/ and $NORMSWAP_RECIPES.")
def ls_cmd(fmt: OutputFormat = FORMAT_OPTION) -> None:
    from normswap.recipes import list_recipes, load_recipe
    from normswap.recipes.schema import RecipeError

    rows = []
    for path in list_recipes():
        try:
            r = load_recipe(path, check_files=False)
            rows.append({"name": path.stem, "file": str(path), "jobs": [j.name for j in r.jobs],
                         "stages": sorted({s for j in r.jobs for s in j.stages}, key=["convert", "finetune", "eval"].index),
                         "description": r.description.splitlines()[0] if r.description else "", "error": None})
        except RecipeError as err:
            rows.append({"name": path.stem, "file": str(path), "jobs": [], "stages": [], "description": "", "error": str(err)})
    if fmt == OutputFormat.json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no recipes found (looked in ./recipes, the checkout's recipes/ and $NORMSWAP_RECIPES)")
        return
    typer.echo(table([[r["name"], len(r["jobs"]), ",".join(r["stages"]), ("INVALID: " + r["error"]) if r["error"] else r["description"], r["file"]]
                      for r in rows], ["recipe", "jobs", "stages", "description", "file"]))


@recipe_app.command("validate", help="Check a recipe (and overrides) without running anything.")
def validate_cmd(
    recipe: str = typer.Argument(..., help="Recipe file (or the name of a listed recipe)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. finetune.tokens=5M."),
    check_files: bool = typer.Option(True, "--check-files/--no-check-files", help="Also require the local files and folders it names to exist."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    from normswap.recipes import find_recipe, load_recipe

    r = load_recipe(find_recipe(recipe), overrides or [], check_files=check_files)
    if fmt == OutputFormat.json:
        emit_json({"valid": True, **r.resolved()})
        return
    typer.echo(f"{r.path}: valid, {len(r.jobs)} job(s)")
    typer.echo(table([[j.name, j.model, ",".join(j.stages), j.convert.to if j.convert else "-"] for j in r.jobs],
                     ["job", "model", "stages", "target"]))


@recipe_app.command("run", help="Run a recipe: each job's stages into <output_dir>/<name>/, then results.json and report.md.")
def run_cmd(
    recipe: str = typer.Argument(..., help="Recipe file (or the name of a listed recipe)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. model=gpt2 finetune.tokens=5M."),
    force: bool = typer.Option(False, "--force", help="Run every stage again, even those already complete."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Parent folder of the run folder [default: the recipe's output_dir, usually runs/]."),
    job: Optional[List[str]] = typer.Option(None, "--job", help="Run only this job (repeatable)."),
    threads: Optional[int] = THREADS_OPTION,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    setup_runtime(threads)  # every stage runs in this process
    from normswap.recipes import find_recipe, load_recipe, run_recipe
    from normswap.recipes.report import summary_table

    r = load_recipe(find_recipe(recipe), overrides or [])
    results = run_recipe(r, output_dir=output_dir, force=force, jobs=job or None)
    if fmt == OutputFormat.json:
        emit_json({k: v for k, v in results.items() if k != "config"})
        return
    typer.echo(summary_table(results))
    typer.echo("")
    typer.echo(f"report   {results['report']}")
    typer.echo(f"results  {results['run_dir']}/results.json")
    typer.echo(f"time     {results['wall_seconds']:.1f} s")
