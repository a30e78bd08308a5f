"""Reading the user's text files (calibration and evaluation text, STS and GLUE TSV files): every
problem is one line naming the file and the line.

Files in the GLUE layout are tab-separated without quoting (`csv.QUOTE_NONE`), so a row is one
line split at tabs; reading them that way needs no `csv` module and so never meets its process-wide
field limit (`_csv.Error: field larger than field limit`). The bytes must be UTF-8 (an optional
byte-order mark is dropped), without NUL bytes, and no line may be longer than `MAX_LINE_CHARS`
characters: the longest line of the real GLUE files is under 1,400 characters, so a longer one is
a wrong file (a binary, a dump on one line), not a sentence.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

from normswap.errors import NormswapError

MAX_LINE_CHARS = 100_000  # cap on one TSV line (the real GLUE files stay under 1,400)

_BREAK = re.compile(r"\r\n|\r|\n")


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is an existing regular file; otherwise a one-line reason."""
    p = Path(path)
    if p.is_dir():
        raise NormswapError(f"{what} {path} is a directory, not a file")
    if not p.exists():
        raise NormswapError(f"{what} {path} not found")
    if not p.is_file():  # FIFO, socket, device: reading could block or never end
        raise NormswapError(f"{what} {path} is not a regular file")
    return p


def read_bytes(p: Path, what: str) -> bytes:
    try:
        return p.read_bytes()
    except OSError as err:
        raise NormswapError(f"cannot read {what} {p}: {err.strerror or err}") from None


def line_of(text: str, offset: int) -> int:
    """The 1-based line (universal newlines: \\n, \\r\\n or \\r) holding character `offset` of `text`."""
    return len(_BREAK.findall(text, 0, offset)) + 1


def decode_utf8(raw: bytes, path: str | os.PathLike, *, bom: bool = True) -> str:
    """`raw` decoded as UTF-8 (dropping a byte-order mark if `bom`); bad bytes are one line naming their line."""
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as err:
        before = raw[:err.start].decode("utf-8", errors="replace")
        line = line_of(before, len(before))
        raise NormswapError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None


def read_text(path: str | Path, *, allow_empty: bool = False) -> str:
    """A text file read as-is (UTF-8, universal newlines), refusing a missing, non-UTF-8 or empty
    file. The one reader for calibration, verification and evaluation text.

    Every refusal is one line: a directory or a non-regular file (FIFO, device), an unreadable
    file, bytes that are not UTF-8 or a NUL byte (both naming the line), a file with no text.
    Lines have no length cap: the whole text is tokenised at once whatever its line breaks (text8
    is one 100 MB line), and tokenising one long line costs what the same text on many lines does.
    """
    p = check_regular_file(path, "text file")
    text = decode_utf8(read_bytes(p, "text file"), path, bom=False)
    nul = text.find("\0")
    if nul >= 0:
        raise NormswapError(f"{path}:{line_of(text, nul)}: NUL byte in the text (a binary file?)")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() in text mode
    if not text.strip() and not allow_empty:
        raise NormswapError(f"text file {path} is empty")
    return text


def read_tsv(path: str | os.PathLike, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every line of a tab-separated file, blank lines included as []."""
    p = check_regular_file(path, what)
    text = decode_utf8(read_bytes(p, what), path)
    rows: list[tuple[int, list[str]]] = []
    for n, line in enumerate(io.StringIO(text, newline=""), start=1):
        line = line.rstrip("\r\n")
        if len(line) > MAX_LINE_CHARS:
            raise NormswapError(f"{path}:{n}: line of {len(line)} characters, over the {MAX_LINE_CHARS}-character cap for a TSV line")
        if "\0" in line:
            raise NormswapError(f"{path}:{n}: NUL byte in the line (not a text file?)")
        rows.append((n, line.split("\t") if line else []))
    return rows


def shown(value: str, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters so that an error stays one readable line."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 5] + "...'" + f" ({len(value)} characters)"
