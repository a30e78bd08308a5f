"""`normswap export DIR OUT`: write a converted checkpoint as a folder to share.

    normswap export gpt2-rms gpt2-rms-hub                 # remote-code export (what `push` uploads)
    normswap export gpt2-rms gpt2-rms-stock --stock       # a plain GPT2LMHeadModel checkpoint

Without `--stock` OUT holds the weights, the self-contained `modeling_normswap.py`, config.json
with `auto_map` and the card: it loads with `trust_remote_code=True` and no normswap. With
`--stock` OUT is a checkpoint of the original class (model type gpt2, llama...), loaded by stock
transformers and every runtime that reads that class, for exact conversions a stock class can
hold (`normswap.export.stock`); any other is refused with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normswap.commands.common import FORMAT_OPTION, THREADS_OPTION, OutputFormat, emit_json, setup_runtime


def register(app: typer.Typer) -> None:
    """Add the `export` command to the CLI."""
    app.command("export", help="Write a converted checkpoint as a shareable folder: remote-code (default) or a stock checkpoint (--stock).")(export_cmd)


def export_cmd(
    folder: str = typer.Argument(..., help="A converted checkpoint folder (normswap convert / finetune / recipe output)."),
    out: str = typer.Argument(..., help="The folder to write."),
    stock: bool = typer.Option(False, "--stock", help="A plain checkpoint of the original class, loadable without normswap or remote code (exact conversions a stock class can hold)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists (swapped in only once the new export is complete)."),
    repo_id: Optional[str] = typer.Option(None, "--repo-id", help="Hub repository the export is meant for (names it in the card) [default: none]."),
    threads: Optional[int] = THREADS_OPTION,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    setup_runtime(threads)  # --stock runs the model to check the export
    info = export_stock_folder(folder, out, overwrite=overwrite, repo_id=repo_id) if stock else \
        export_remote_folder(folder, out, overwrite=overwrite, repo_id=repo_id)
    if fmt == OutputFormat.json:
        emit_json(info)
        return
    typer.echo(f"wrote    {info['folder']} ({info['kind']})")
    if stock:
        typer.echo(f"class    {info['architecture']} (model type {info['model_type']}), loads with stock transformers")
        typer.echo(f"checked  max relative difference {info['max_rel_diff']:.2g} of the {info['output']} vs the checkpoint "
                   f"({info['tokens']} tokens, bound {info['tolerance']:g}), {info['seconds']:.1f} s")
        for site, readers in info["moved_biases"].items():
            typer.echo(f"bias     {', '.join(readers)}: folded bias moved back into {site} (no bias slot in the stock class)")
    typer.echo(f"files    {', '.join(info['files'])}")


def export_stock_folder(folder: str, out: str, *, overwrite: bool, repo_id: str | None) -> dict:
    from normswap.export.stock import export_stock

    return {"kind": "stock", **export_stock(folder, out, overwrite=overwrite, repo_id=repo_id)}


def export_remote_folder(folder: str, out: str, *, overwrite: bool, repo_id: str | None) -> dict:
    """The remote-code export with its card, as `push --dry-run` writes it; an existing OUT needs
    --overwrite (and is replaced only if it is an earlier export, see `export_for_hub`)."""
    from normswap.errors import NormswapError
    from normswap.export.card import build_card, find_results
    from normswap.export.push import prepare
    from normswap.export.remote import check_checkpoint, export_for_hub

    if Path(out).exists() and not overwrite:
        raise NormswapError(f"output folder {out} exists (use --overwrite to replace it)")
    if repo_id is not None:  # prepare checks the id too
        return {"kind": "remote-code", **prepare(folder, repo_id, out)}
    check_checkpoint(folder)
    job, role = find_results(folder)  # the recipe run's figures for the card, as push finds them
    files = export_for_hub(folder, out, card=build_card(folder, None, job=job, role=role))
    return {"kind": "remote-code", "folder": str(out), "card": str(Path(out) / "README.md"), "files": files,
            "results": (job or {}).get("name"), "role": role}
