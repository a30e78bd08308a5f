"""The `normswap` command line: a thin Typer layer over the library API.

Each verb lives in `normswap/commands/<verb>.py` and registers itself on `app`; results go to stdout
(human tables or `--format json`), logs and progress to stderr, and a user mistake exits non-zero
with one line (see `normswap.errors.NormswapError`).

`normswap --help`, `--version` and `archs` must answer in a fraction of a second, so nothing here or
in the command modules imports torch or transformers at the top: each command that loads a model
imports what it needs in its body and calls `commands.common.setup_runtime` first.
"""
from __future__ import annotations

import os
import sys

import typer

from normswap import __version__
from normswap.commands import convert as _convert
from normswap.commands import eval as _eval
from normswap.commands import export as _export
from normswap.commands import finetune as _finetune
from normswap.commands import inspect as _inspect
from normswap.commands import push as _push
from normswap.commands import recipe as _recipe
from normswap.errors import NormswapError
from normswap.interrupts import Interrupted
from normswap.interrupts import install as install_signal_handlers
from normswap.log import setup_logging
from normswap.outputs import describe_io_error

app = typer.Typer(
    name="normswap",
    help="Normalisation surgery on pretrained transformers: LayerNorm -> RMSNorm or DyT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: help texts are printed as written. Rich markup (Typer's default) would read
    # "[default: ...]" in a help string as a style tag and drop it, and its boxes wrap badly in pipes.
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"normswap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log output on stderr."),
) -> None:
    setup_logging(verbose)  # transformers' own logging is set where it is imported (commands.common.setup_runtime)


for _module in (_inspect, _convert, _eval, _finetune, _recipe, _push, _export):
    _module.register(app)


def main() -> None:
    """Console entry point: run the app and exit with its code; user errors and interrupts are one
    line on stderr (exit 2 for a mistake, 130 for Ctrl-C, 143 for SIGTERM), never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    install_signal_handlers()
    try:
        code = app(standalone_mode=False, prog_name="normswap")  # also under `python -m normswap` and in tests
    except NormswapError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except Interrupted as err:
        typer.echo(f"error: interrupted ({err})", err=True)
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as err:
        what = describe_io_error(err)  # a full disk or a permission error wherever it happened
        if what is not None:
            typer.echo(f"error: {what}", err=True)
            sys.exit(2)
        # `normswap` or `normswap recipe` alone: the help itself is the message (on stderr, exit 2, as
        # click does); printed as "error: <help>" it would read as a failure with no reason.
        if type(err).__name__ == "NoArgsIsHelpError":
            typer.echo(err.format_message(), err=True)
            sys.exit(2)
        # Usage errors (unknown option, missing argument, a value of the wrong type) from click or
        # Typer's bundled copy of it: one line, with where to find the usage.
        if hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int):
            ctx = getattr(err, "ctx", None)
            hint = f" (see '{ctx.command_path if ctx is not None else 'normswap'} --help')"
            typer.echo(f"error: {err.format_message()}{hint}", err=True)
            sys.exit(err.exit_code)
        raise
    # Without standalone mode Typer returns the code of a `typer.Exit` (and 130 for a
    # KeyboardInterrupt it caught) instead of exiting with it.
    sys.exit(code if isinstance(code, int) else 0)
