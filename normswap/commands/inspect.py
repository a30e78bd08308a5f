"""`normswap inspect MODEL` and `normswap archs`."""
from __future__ import annotations

from typing import Optional

import typer

from normswap.commands.common import FORMAT_OPTION, THREADS_OPTION, OutputFormat, emit_json, setup_runtime, table


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
    app.command("archs")(archs_cmd)


PLAN_HELP = ("Where the norm sites come from: auto (the family table, cross-checked by discovery; discovery where there is no "
             "table), table (the table alone, no probe pass) or discover (from what the model computes, ignoring any table).")


def inspect_cmd(
    model: str = typer.Argument(..., help="Hub id or local model folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code (only if you trust it)."),
    plan: str = typer.Option("auto", "--plan", help=PLAN_HELP),
    threads: Optional[int] = THREADS_OPTION,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Norm sites, placement, readers and writers, and what each conversion would be."""
    setup_runtime(threads)
    from normswap.archs.plan import check_plan_source
    from normswap.inspection import inspect_model

    check_plan_source(plan)
    report = inspect_model(model, trust_remote_code=trust_remote_code, plan=plan)
    if fmt == OutputFormat.json:
        emit_json(report.to_json())
        return
    style = {"pre": "Pre-LN", "post": "Post-LN", "unknown": "unknown"}[report.style]
    source = {"table": f"the {report.family} family table" + (", confirmed by discovery" if report.checked else " (not cross-checked)"),
              "discovery": "discovery (no family table: found from what the model computes on a probe batch)",
              "generic": "none (no family table, and discovery could not run): every LayerNorm keeps its function, nothing folds"}[report.plan]
    typer.echo(f"model       {report.model}")
    typer.echo(f"class       {report.architecture} ({report.parameters:,} parameters, model_type {report.model_type})")
    typer.echo(f"plan        {source} ({report.seconds:.2f} s)")
    typer.echo(f"placement   {style}")
    typer.echo(f"tied head   {'yes, shares ' + report.tied_head if report.tied_head else 'no'}")
    typer.echo(f"writers     {len(report.embed_writers)} embeddings + {len(report.writers)} sublayer outputs")
    for path in report.centred_inputs:
        typer.echo(f"centring    {path}: its input is centred by one explicit mean subtraction (no weight can centre it)")
    if report.family:
        check = "passed" if not report.reader_check else f"FAILED at {', '.join(report.reader_check)}"
        typer.echo(f"hook check  {check}")
    for note in report.notes:
        typer.echo(f"note        {note}")
    typer.echo("")
    rows = [[s.path, s.placement, s.kind, _short_paths(s.readers), _short_paths(s.writers) if s.writers else "-", s.rmsnorm,
             s.fold.split(":", 1)[0], s.dyt] for s in report.sites]
    typer.echo(table(rows, ["site", "placement", "now", "readers", "stream writers", "--to rmsnorm", "--fold", "--to dyt"]))
    kept: dict[str, list[str]] = {}
    for s in report.sites:
        if s.fold.startswith("no: "):
            kept.setdefault(s.fold[4:], []).append(s.path)
    for why, paths in kept.items():
        typer.echo(f"\nnot folded  {len(paths)} site(s) keep their affine: {why}")
    means: dict[str, list[str]] = {}
    for s in report.sites:
        if s.note:
            means.setdefault(s.note, []).append(s.path)
    for why, paths in means.items():
        typer.echo(f"\nnot centred {len(paths)} site(s), e.g. {paths[0]}: {why}")
    for path, why in report.other_norms.items():
        typer.echo(f"\nleft alone  {path}: {why}")


def _short_paths(paths: list[str], keep: int = 3) -> str:
    """The last two parts of each path ("attn.c_attn"), at most `keep` of them."""
    short = [p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] if p.count(".") else p for p in paths]
    return ", ".join(short[:keep]) + (f" +{len(short) - keep}" if len(short) > keep else "") or "-"


def archs_cmd(fmt: OutputFormat = FORMAT_OPTION) -> None:
    """The architecture family tables (keyed by config.model_type); other architectures are discovered."""
    from normswap.archs import describe_family, families  # torch-free: listing the tables loads no model

    items = [describe_family(f) for f in families()]
    if fmt == OutputFormat.json:
        emit_json(items)
        return
    rows = [[f["model_type"], {"pre": "Pre-LN", "post": "Post-LN"}[f["style"]] + (" (flag-dependent)" if f["flag_dependent"] else ""),
             f["norm_kind"], ", ".join(f["norms"])] for f in items]
    typer.echo(table(rows, ["model_type", "placement", "norms", "norm sites"]))
    typer.echo("\nEvery other architecture is discovered: normswap runs a short probe batch and finds the norms by what they"
               " compute, their readers and the residual writers from the data flow (`normswap inspect MODEL` shows the plan)."
               " A table is cross-checked the same way before it is used.")
