"""Output folders that never touch an input and never hold half a result.

Every command that writes a folder (`convert --out`, `finetune --out`, `eval --out`, `push
--export-dir`, a recipe's run folder) goes through this module:

- `check_output` runs before any long work: the destination must not equal, contain or lie inside
  any input (a model, a teacher, a data file or folder), an existing destination needs
  `--overwrite`, and its parent must be a folder this process can create files in;
- `atomic_output` builds the result in a hidden staging folder beside the destination, named after
  this process (`.<name>.tmp-<pid>-<random>`), and moves it into place only when complete. An
  existing destination is swapped out by rename at that moment, never deleted first, so a failed
  or interrupted run leaves the old folder exactly as it was. Staging and trash folders of dead
  processes are removed (or, for a swap cut short, the old folder is put back) by the next run;
- files come out with the user's umask (safetensors and `tempfile` create 0600 files and 0700
  folders);
- a full disk or a permission error while writing is one line, with the partial output removed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from normswap.errors import NormswapError
from normswap.locking import pid_alive
from normswap.log import logger

Inputs = Mapping[str, "str | os.PathLike | None"]

# Write failures that are the machine's state, not a bug: reported as one line.
_IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENAMETOOLONG}


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def local_inputs(inputs: Inputs) -> dict[str, Path]:
    """The inputs that are local files or folders (Hub ids and unset options are skipped)."""
    found: dict[str, Path] = {}
    for what, value in inputs.items():
        if value is None or str(value) == "":
            continue
        p = Path(os.path.expanduser(str(value)))
        if p.exists():
            found[what] = _real(p)
    return found


def check_disjoint(out: str | os.PathLike, inputs: Inputs, *, flag: str = "--out") -> None:
    """Refuse a destination that equals, contains or lies inside any local input."""
    dest = _real(out)
    for what, src in local_inputs(inputs).items():
        if dest == src:
            raise NormswapError(f"{flag} {out} is the {what} itself; choose another folder (inputs are never modified)")
        if src in dest.parents:
            raise NormswapError(f"{flag} {out} lies inside the {what} {src}; choose a folder outside it (inputs are never modified)")
        if dest in src.parents:
            raise NormswapError(f"{flag} {out} contains the {what} {src}; replacing it would delete that input")


def check_output(out: str | os.PathLike, *, overwrite: bool, inputs: Inputs = {}, flag: str = "--out",
                 allow_existing: bool = False) -> Path:
    """Everything about a destination that can be checked before the work starts.

    `allow_existing`: the caller continues or updates an existing folder (resume, a recipe's run
    folder) instead of replacing it.
    """
    out = Path(os.path.expanduser(str(out)))
    dest, cwd = _real(out), _real(os.getcwd())
    if dest == Path(dest.anchor) or dest == _real(Path.home()):
        raise NormswapError(f"{flag} {out} is {'the root folder' if dest == Path(dest.anchor) else 'your home folder'}; give a folder of its own")
    check_disjoint(out, inputs, flag=flag)
    if overwrite and (dest == cwd or dest in cwd.parents):
        raise NormswapError(f"{flag} {out} contains the current folder; replacing it would delete it")
    clean_stale(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise NormswapError(f"{flag} {out} exists and is not a folder")
        if not (overwrite or allow_existing):
            raise NormswapError(f"output folder {out} exists (use --overwrite to replace it)")
    check_writable(out, flag=flag)
    return out


def check_writable(out: Path, *, flag: str = "--out") -> None:
    """The nearest existing ancestor of `out` must be a folder in which a file can be created.

    Tried for real (a probe folder, removed at once): permission bits say nothing for root, and
    nothing about read-only or full file systems.
    """
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise NormswapError(f"{flag} {out}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise NormswapError(f"{flag} {out}: {parent} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".normswap-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as err:
        raise NormswapError(f"cannot write {flag} {out}: {err.strerror or err} in {parent}") from None


# ------------------------------------------------------------------------------ staging and swapping

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def clean_stale(out: Path) -> None:
    """Remove staging folders beside `out` left by dead processes; put back an old folder whose
    swap was cut short (the process died after moving it aside, before moving the new one in)."""
    parent = out.parent
    try:
        items = list(parent.iterdir())
    except OSError:  # no such folder (yet), or not one
        return
    for item in items:
        m = _STAGING.match(item.name)
        pid = int(m.group("pid")) if m else 0
        if not m or m.group("name") != out.name or pid == os.getpid() or pid_alive(pid):
            continue
        if m.group("kind") == "old" and not out.exists():
            logger.warning("restoring %s from an interrupted replacement (%s)", out, item.name)
            os.replace(item, out)
            continue
        logger.info("removing %s, left by a run that died (pid %s)", item, m.group("pid"))
        shutil.rmtree(item, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give everything below `folder` (and the folder) the modes a plain `open`/`mkdir` would."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                exec_bits = os.stat(p).st_mode & 0o111
                os.chmod(p, (0o666 | exec_bits) & ~mask)


def staging_dir(out: Path, kind: str = "tmp") -> Path:
    """A new hidden folder beside `out`, named so that `clean_stale` recognises it."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


def swap_into_place(new: Path, out: Path) -> None:
    """Move the complete folder `new` to `out`, replacing an existing `out` by rename (the old one
    is deleted only once the new one is in place)."""
    apply_umask(new)
    if out.exists() or out.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rmdir(trash)
        os.replace(out, trash)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(trash, out)
            raise
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink()
    else:
        os.replace(new, out)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, overwrite: bool = False, inputs: Inputs = {}, flag: str = "--out") -> Iterator[Path]:
    """A staging folder beside `out`, moved into place only if the block completes.

    An existing `out` is refused unless `overwrite`; on any error (or Ctrl-C, or SIGTERM turned
    into an exception by the CLI) the staging folder is removed and `out` is left as it was.
    """
    out = check_output(out, overwrite=overwrite, inputs=inputs, flag=flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(out)
    except OSError as err:
        raise NormswapError(f"cannot create {flag} {out}: {err.strerror or err}") from None
    try:
        yield tmp
        if out.exists() and not overwrite:  # appeared while this run worked
            raise NormswapError(f"output folder {out} exists (use --overwrite to replace it)")
        swap_into_place(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise io_error(err, out) from None
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_io_error(err):
            raise NormswapError(f"writing {out} failed: {describe_io_error(err)}; nothing was written") from None
        raise


def io_error(err: OSError, out: Path) -> BaseException:
    """One line for a write failure (full disk, permissions); other OS errors stay bugs."""
    what = describe_io_error(err, within=out.parent)
    return NormswapError(f"writing {out} failed: {what}; nothing was written") if what else err


def describe_io_error(err: BaseException, within: Path | None = None) -> str | None:
    """'No space left on device (path)' for the OS errors that are the machine's state (a full
    disk, permissions, a read-only file system); None for the others, which are bugs. With
    `within`, the path is named only if it lies there (a failed copy reports its source file)."""
    if isinstance(err, OSError) and (err.errno in _IO_ERRNOS or isinstance(err, PermissionError)):
        name = err.filename2 or err.filename
        if name and within is not None and _real(within) not in _real(name).parents:
            name = None
        return f"{err.strerror or err}" + (f" ({name})" if name else "")
    if _is_io_error(err):
        return str(err).splitlines()[0][:200]
    return None


def _is_io_error(err: BaseException) -> bool:
    """safetensors reports write failures as its own error type carrying the OS message."""
    msg = str(err)
    return type(err).__name__ == "SafetensorError" and any(
        s in msg for s in ("No space left", "Permission denied", "Read-only file system", "Disk quota", "File too large"))


def inputs_of(**named: "str | os.PathLike | None | Iterable") -> dict[str, "str | os.PathLike | None"]:
    """Inputs by name for `check_output`, with list values (several data files) numbered."""
    out: dict[str, "str | os.PathLike | None"] = {}
    for what, value in named.items():
        label = what.replace("_", " ")
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                out[f"{label} #{i + 1}"] = v
        else:
            out[label] = value
    return out
