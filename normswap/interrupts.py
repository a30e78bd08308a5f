"""Ctrl-C and SIGTERM for the command line: one line and a truthful exit code, never a traceback.

The CLI turns both signals into `Interrupted`, a BaseException that no `except Exception` swallows
and that Typer passes through (it would turn a KeyboardInterrupt into a silent exit 130). Every
`with` block unwinds on the way out, so staging folders are removed (`normswap.outputs`) and a
fine-tuning run saves its checkpoint first (its own handler, `training.loop`). Exit codes follow
the shell's convention: 130 for SIGINT, 143 for SIGTERM.

The handlers are installed as early as possible: `normswap/__init__.py` calls `install()` before
its heavy imports (torch, transformers) when the process was started as the `normswap` command,
so a Ctrl-C during start-up is handled too; a signal that arrives during an import is held back
until the import is done. Library users' signal handling is never touched.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):
    """The process got SIGINT or SIGTERM."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(NAMES.get(signum, f"signal {signum}"))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + int(self.signum))


def _raise(signum: int, frame: Any) -> None:
    # An exception raised in the middle of an import can leave a library half-initialised (numpy
    # and transformers catch and re-wrap errors there, and the next import of the same module then
    # fails in odd ways). Inside an import the signal is sent again shortly instead, so that it
    # lands once the import is complete.
    f = frame
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        f = f.f_back
    raise Interrupted(signum)


def launched_as_cli() -> bool:
    """True in the `normswap` console script and in `python -m normswap` (also under accelerate/torchrun)."""
    argv = getattr(sys, "orig_argv", None) or sys.argv
    if argv and os.path.basename(sys.argv[0] if sys.argv else "") == "normswap":
        return True
    return any(a == "-m" and i + 1 < len(argv) and argv[i + 1] == "normswap" for i, a in enumerate(argv))


def install() -> None:
    """SIGINT and SIGTERM raise `Interrupted` (main thread only; idempotent)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL, _raise):
            signal.signal(signum, _raise)

