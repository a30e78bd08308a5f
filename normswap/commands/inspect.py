"""`normswap inspect MODEL` and `normswap archs`."""
from __future__ import annotations

import typer

from normswap.commands.common import FORMAT_OPTION, OutputFormat, emit_json, table


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
    app.command("archs")(archs_cmd)


def inspect_cmd(
    model: str = typer.Argument(..., help="Hub id or local model folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code (only if you trust it)."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Norm sites, placement, readers and writers, and what each conversion would be."""
    from normswap.inspection import inspect_model

    report = inspect_model(model, trust_remote_code=trust_remote_code)
    if fmt == OutputFormat.json:
        emit_json(report.to_json())
        return
    style = {"pre": "Pre-LN", "post": "Post-LN", "unknown": "unknown (no family table)"}[report.style]
    typer.echo(f"model       {report.model}")
    typer.echo(f"class       {report.architecture} ({report.parameters:,} parameters)")
    typer.echo(f"family      {report.family or report.model_type + ' (no family table: --to rmsnorm keeps LayerNorm semantics, nothing folded; --drop-mean for plain RMSNorm, measured)'}")
    typer.echo(f"placement   {style}")
    typer.echo(f"tied head   {'yes, shares ' + report.tied_head if report.tied_head else 'no'}")
    typer.echo(f"writers     {len(report.embed_writers)} embeddings + {len(report.writers)} sublayer outputs")
    for path in report.centred_inputs:
        typer.echo(f"centring    {path}: its input is centred by one explicit mean subtraction (no weight can centre it)")
    check = "passed" if not report.reader_check else f"FAILED at {', '.join(report.reader_check)}"
    typer.echo(f"hook check  {check if report.family else 'skipped'}")
    typer.echo("")
    rows = [[s.path, s.placement, s.kind, ", ".join(r.rsplit('.', 2)[-2] + '.' + r.rsplit('.', 1)[-1] if r.count('.') else r for r in s.readers) or "-", s.rmsnorm,
             s.fold.split(":", 1)[0], s.dyt]
            for s in report.sites]
    typer.echo(table(rows, ["site", "placement", "now", "readers", "--to rmsnorm", "--fold", "--to dyt"]))
    kept: dict[str, list[str]] = {}
    for s in report.sites:
        if s.fold.startswith("no: "):
            kept.setdefault(s.fold[4:], []).append(s.path)
    for why, paths in kept.items():
        typer.echo(f"\nnot folded  {len(paths)} site(s) keep their affine: {why}")
    if report.other_norms:
        typer.echo(f"\nnorms not in the family table (left alone): {', '.join(report.other_norms)}")


def archs_cmd(fmt: OutputFormat = FORMAT_OPTION) -> None:
    """Supported architecture families (keyed by config.model_type)."""
    from normswap.archs import families
    from normswap.archs.plan import describe_family

    items = [describe_family(f) for f in families()]
    if fmt == OutputFormat.json:
        emit_json(items)
        return
    rows = [[f["model_type"], {"pre": "Pre-LN", "post": "Post-LN"}[f["style"]] + (" (flag-dependent)" if f["flag_dependent"] else ""),
             f["norm_kind"], ", ".join(f["norms"])] for f in items]
    typer.echo(table(rows, ["model_type", "placement", "norms", "norm sites"]))
    typer.echo("\nOther architectures: every nn.LayerNorm is swapped, without folding or exactness claims; the result is"
               " measured (models whose inputs normswap cannot build, such as speech, are refused).")
