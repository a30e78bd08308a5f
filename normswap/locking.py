"""One run per output folder: a lock file beside the folder, holding the owner's PID and host.

    with folder_lock(Path("gpt2-dyt-ft"), "finetune"):
        ...  # nobody else runs `normswap finetune` or `normswap recipe run` into gpt2-dyt-ft now

The lock is the file `<parent>/.<name>.lock`, *beside* the folder: the folder itself may not exist
yet, and a run that replaces it by a rename at the end would take a lock inside it away. The file
is created atomically (`O_CREAT | O_EXCL`), so of two runs starting together exactly one gets it;
it holds JSON (pid, host, what, start time, a random token) and is removed when the block exits,
also on an error, Ctrl-C or SIGTERM turned into an exception. A run killed outright (SIGKILL, power
loss) leaves the file behind: the next run finds that the PID is no longer alive on this host,
warns, and takes the lock over. A lock from another host cannot be checked and is respected; the
refusal names the file to remove if that run is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from normswap.errors import NormswapError
from normswap.log import logger

_HELD: set[str] = set()  # tokens of the locks this process holds
_UNREADABLE_WAIT_S = 1.0  # a lock file without readable content may be being written right now


class FolderLocked(NormswapError):
    """Another live run holds the output folder."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of folder `path`: `.<name>.lock` in its (resolved) parent."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not p.name:
        raise NormswapError(f"cannot lock {path}: not a folder name")
    return Path(os.path.realpath(p.parent)) / f".{p.name}.lock"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A lock's content; None if it is not (yet) a JSON object with an integer pid."""
    try:
        info = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or isinstance(info.get("pid"), bool):
        return None
    return info


def _describe(info: dict[str, Any]) -> str:
    what = info.get("what") or "run"
    since = f", since {info['started']}" if isinstance(info.get("started"), str) else ""
    return f"normswap {what} (pid {info['pid']} on {info.get('host') or '?'}{since})"


def _holder_alive(info: dict[str, Any], host: str) -> bool:
    if info.get("host") not in (None, host):
        return True  # another machine's process: cannot check, so it is respected
    if info["pid"] == os.getpid():
        return info.get("token") in _HELD  # a PID reused from an earlier life of this container is stale
    return pid_alive(info["pid"])


def _create(lock: Path, content: bytes) -> bool:
    """Create `lock` with `content` if it does not exist; False if it does."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, content)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        raise
    os.close(fd)
    return True


def _take_over(lock: Path, stale: bytes) -> None:
    """Move a stale lock aside, unless it changed since it was judged stale (then leave it)."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another run took it over first
    try:
        with open(aside, "rb") as f:
            now = f.read(4096)
        if now != stale:  # a fresh lock appeared in between: put it back
            with contextlib.suppress(OSError):
                os.link(aside, lock)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        os.unlink(aside)


def _make_parents(folder: Path) -> list[Path]:
    """Create the missing ancestors of `folder`; returns those created (deepest first)."""
    missing: list[Path] = []
    p = folder
    while not p.exists():
        if p.is_symlink():
            raise NormswapError(f"cannot lock {folder}: {p} is a broken symbolic link")
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, what: str) -> Iterator[Path | None]:
    """Hold the lock of output folder `path` for the block (`what` names the command, for the
    refusal another run prints). Raises FolderLocked (one line, naming the PID) if a live run holds
    it; a stale lock is reported as a warning and taken over. Yields the lock file, or None where
    the parent folder does not accept files (the run then goes unlocked, with a warning)."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not p.name:
        raise NormswapError(f"cannot lock {path}: not a folder name")
    created: list[Path] = []
    possible = True
    try:
        created = _make_parents(p.parent)
    except OSError as err:
        logger.warning("cannot lock %s (%s): running without a lock", path, err.strerror or err)
        possible = False
    lock = lock_path(p)
    host = socket.gethostname()
    token = secrets.token_hex(8)
    content = (json.dumps({"pid": os.getpid(), "host": host, "what": what, "folder": str(p),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token}) + "\n").encode()
    acquired = False
    try:
        acquired = possible and _acquire(lock, content, host, path)
    except OSError as err:  # a read-only or full file system, a parent that is a file...: the
        # output checks that follow give the one-line error where the run cannot write at all
        logger.warning("cannot create the lock file %s (%s): running without a lock", lock, err.strerror or err)
    except BaseException:
        _remove_empty(created)
        raise
    if acquired:
        _HELD.add(token)
    try:
        yield lock if acquired else None
    finally:
        if acquired:
            _HELD.discard(token)
            with contextlib.suppress(OSError):
                if lock.read_bytes() == content:  # never remove a lock that someone else took over
                    lock.unlink()
        _remove_empty(created)


def _acquire(lock: Path, content: bytes, host: str, path: Any) -> bool:
    deadline = None
    for _ in range(1000):
        if _create(lock, content):
            return True
        try:
            with open(lock, "rb") as f:
                raw = f.read(4096)
        except FileNotFoundError:
            if os.path.islink(lock):
                raise NormswapError(f"cannot lock {path}: {lock} is a broken symbolic link; remove it") from None
            continue  # released (or taken over) just now: try again
        except OSError as err:
            raise NormswapError(f"cannot lock {path}: cannot read the lock file {lock} ({err.strerror or err}); "
                                f"remove it if no run is going") from None
        info = _parse(raw)
        if info is None:
            # Being written this instant, or left empty by a run killed between create and write.
            if deadline is None:
                deadline = time.monotonic() + _UNREADABLE_WAIT_S
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            logger.warning("taking over the unreadable lock file %s of %s", lock, path)
            _take_over(lock, raw)
            continue
        if _holder_alive(info, host):
            raise FolderLocked(f"{path} is in use by another {_describe(info)}; wait for it to finish "
                               f"(if no such run is going, remove {lock})")
        logger.warning("taking over the stale lock of %s: %s is no longer running", path, _describe(info))
        _take_over(lock, raw)
    raise NormswapError(f"cannot lock {path}: {lock} keeps changing")


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break
