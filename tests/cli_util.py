"""Running the real console entry point in-process, reading its one-line errors, and the checks
every hostile case makes: inputs byte-identical, no partial output, no hidden debris."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path


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


def refused(code: int, err: str, needle: str | None = None, *, exit_code: int | None = None) -> str:
    """A refused run: non-zero exit (or exactly `exit_code`), exactly one `error:` line (containing
    `needle`, case-insensitively) and no traceback. Returns the error line."""
    assert code != 0, err
    if exit_code is not None:
        assert code == exit_code, (code, err)
    line = error_line(err)
    if needle is not None:
        assert needle.lower() in line.lower(), line
    return line


def tree_digest(path: Path) -> str:
    """A digest of every file's relative path, mode and bytes below `path` (or of `path` itself)."""
    path = Path(path)
    h = hashlib.sha256()
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for p in items:
        rel = p.name if p == path else str(p.relative_to(path))
        h.update(rel.encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
        elif p.is_dir():
            h.update(b"<dir>")
    return h.hexdigest()


def debris(folder: Path) -> list[str]:
    """Hidden temporary or trash entries that a run left in `folder` (non-recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and any(
        k in p.name for k in (".tmp", "tmp-", ".old", ".new", ".partial", ".final-model", ".staging")))
