"""Running the real console entry point in-process, and reading its one-line errors."""
from __future__ import annotations

import sys


def run_cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run normswap.cli.main with `args`; return (exit code, stdout, stderr)."""
    from normswap.cli import main

    monkeypatch.setattr(sys, "argv", ["normswap", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def error_line(err: str, code: int | None = None) -> str:
    """The single `error:` line of a failed run (no traceback); with `code`, it must be exit 2."""
    if code is not None:
        assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
