"""`normswap push DIR REPO_ID`: upload a converted checkpoint to the Hub with a generated model card.

    normswap push runs/gpt2-dyt/gpt2-dyt/finetune me/gpt2-dyt --private
    normswap push runs/quickstart/minilm-dyt/finetune me/minilm-dyt --dry-run    # write the folder, upload nothing

The upload folder holds the weights, tokenizer files, config.json with `auto_map`, the
self-contained `modeling_normswap.py` (so `trust_remote_code=True` loads it without normswap) and
README.md (base_model, tags, model-index results from the recipe run's results.json).
"""
from __future__ import annotations

from typing import Optional

import typer

from normswap.commands.common import FORMAT_OPTION, OutputFormat, emit_json, setup_runtime


def register(app: typer.Typer) -> None:
    """Add the `push` command to the CLI."""
    app.command("push", help="Upload a converted checkpoint to the Hugging Face Hub with a model card.")(push_cmd)


def push_cmd(
    folder: str = typer.Argument(..., help="A converted checkpoint folder (normswap convert / finetune / recipe output)."),
    repo_id: str = typer.Argument(..., help="Hub repository: owner/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to upload to (created if missing)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the exact upload folder and card, print where, upload nothing."),
    export_dir: Optional[str] = typer.Option(None, "--export-dir", help="Where to write the upload folder [default: DIR-hub beside DIR for --dry-run, a temporary folder otherwise]."),
    results: Optional[str] = typer.Option(None, "--results", help="A recipe run's results.json for the card's evaluation [default: the nearest one above DIR]."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    setup_runtime()  # as every command that reads checkpoints (quiet transformers, model type registered); no model runs: no --threads
    from normswap.export import push

    info = push(folder, repo_id, private=private, revision=revision, dry_run=dry_run, export_dir=export_dir,
                results=results, commit_message=message)
    if fmt == OutputFormat.json:
        emit_json(info)
        return
    if dry_run:
        typer.echo(f"dry run: nothing uploaded; the upload folder for {repo_id} is {info['folder']}")
        typer.echo(f"card     {info['card']}")
        typer.echo(f"files    {', '.join(info['files'])}")
    else:
        typer.echo(f"pushed   {info['url']}" + (" (private)" if private else ""))
    typer.echo("results  " + (f"job {info['results']} ({info['role']} model)" if info.get("results") else "none found (no evaluation in the card)"))
