"""The output directory: one writer at a time, and files written whole or not at all.

**One writer per output directory.** Every command that writes to ``--out`` first takes
an exclusive, non-blocking ``flock`` on a lock file in it. The kernel drops the lock when
the process ends, however it ends (kill -9 included), so there is never a stale lock to
clean up. A second process is refused at once, in one line naming the holder, whose pid,
host and command are written into the lock file.

An output directory holds two groups of files, written by different roles:

``dispatch``  ``quarantine.parquet|csv`` and the ``.spill/`` directory (DuckDB's temp
              files, CSV staging) — written while the input is prepared;
              lock file ``.dispatchkit-dispatch.lock``.
``collect``   the store ``dispatchkit.duckdb``, ``results.parquet|csv``, ``report.png``,
              ``dead_letters.csv``; lock file ``.dispatchkit.lock``.

``run`` (embedded or Kafka) takes both, ``dispatch`` the first, ``collect`` the second:
so a ``dispatch`` and a ``collect`` of a run may share a directory (they write disjoint
files — the documented two-terminal workflow), while two runs, two dispatches or two
collects into one directory are refused. ``run --broker kafka`` holds both locks in the
parent; its dispatcher child is told, with :func:`inherit`, that it runs under the
parent's ``dispatch`` lock (checked: the lock file names the parent and is held).

The locks are re-entrant within a process (``run --broker kafka`` calls ``collect``).

**Whole files.** :func:`atomic_path` yields a temporary name beside the target, renames
it over the target when the block succeeds and removes it when it fails; an ``OSError``
(disk full, quota, I/O error, read-only file system) becomes one :class:`OutputError`
line naming the file. Files are created ``0666 & ~umask``, like any other file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from dispatchkit.errors import OutDirBusyError, OutputError, UsageError

P = ParamSpec("P")
R = TypeVar("R")

LOCK_FILES = {"dispatch": ".dispatchkit-dispatch.lock", "collect": ".dispatchkit.lock"}
ROLES = {
    "run": ("dispatch", "collect"),
    "dispatch": ("dispatch",),
    "collect": ("collect",),
}

#: What the lock file says the holder is running; the CLI sets the command line.
command_line: str | None = None

_held: dict[tuple[str, str], list[Any]] = {}  # (real dir, role) -> [fd or None, count]
_mutex = threading.RLock()


def _key(out: Path, role: str) -> tuple[str, str]:
    return (os.path.realpath(out), role)


def _describe(out: Path, fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return f"{out} is in use by another dispatchkit process; one writer per output directory"
    return (
        f"{out} is in use by dispatchkit pid {info.get('pid', '?')} "
        f"({info.get('command', '?')}) on host {info.get('host', '?')}; "
        "one writer per output directory"
    )


def prepare_dir(out: Path) -> None:
    """Create ``out`` if needed; refuse (exit 2) a path that is no writable directory."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--out {out} is not a directory") from None
    except NotADirectoryError:
        raise UsageError(f"--out {out}: a parent of it is not a directory") from None
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create it: {_reason(exc)}") from None
    if not out.is_dir():
        raise UsageError(f"--out {out} is not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} is not writable (permission denied)")


def _acquire(out: Path, role: str, command: str) -> None:
    key = _key(out, role)
    with _mutex:
        if key in _held:
            _held[key][1] += 1
            return
        path = out / LOCK_FILES[role]
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot create {path.name}: {_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            message = _describe(out, fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutDirBusyError(message) from None
            raise UsageError(f"--out {out}: cannot lock {path.name}: {_reason(exc)}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
        with contextlib.suppress(OSError):  # the lock holds even if the note cannot be written
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        _held[key] = [fd, 1]


def _release(out: Path, role: str) -> None:
    key = _key(out, role)
    with _mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        fd = entry[0]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor drops the flock


@contextlib.contextmanager
def hold(out: Path, command: str) -> Iterator[None]:
    """Hold the locks ``command`` (run, dispatch, collect) needs on ``out`` for the block."""
    out = Path(out)
    prepare_dir(out)
    what = command_line or f"{command} --out {out}"
    taken: list[str] = []
    try:
        for role in ROLES[command]:
            _acquire(out, role, what)
            taken.append(role)
        yield
    finally:
        for role in reversed(taken):
            _release(out, role)


def holds_out_dir(command: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a library function whose ``spec.out`` or ``out`` argument it writes to."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = sig.bind(*args, **kwargs)
            out = bound.arguments.get("out")
            if out is None:
                out = bound.arguments["spec"].out
            with hold(Path(out), command):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def held(out: Path, role: str) -> bool:
    """Whether this process holds (or inherited) ``role``'s lock on ``out``."""
    with _mutex:
        return _key(out, role) in _held


def inherit(out: Path, role: str, holder_pid: int) -> None:
    """Run under ``holder_pid``'s lock: for a child process of the holder only.

    Checks that the lock file names the holder and that the lock is held; the child then
    writes the role's files without taking the lock itself (for the rest of its life).
    """
    path = Path(out) / LOCK_FILES[role]
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot open {path.name}: {_reason(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        is_held = True
    else:
        is_held = False
    finally:
        os.close(fd)  # had we got the lock, this drops it again
    if not is_held or info.get("pid") != holder_pid:
        raise UsageError(f"{out}: not locked by pid {holder_pid}; cannot write under its lock")
    with _mutex:
        _held[_key(out, role)] = [None, 1]


# -- whole files ------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """The OS's words for an OSError (``No space left on device``), else its text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def output_error(path: Path | str, exc: BaseException) -> OutputError:
    return OutputError(f"cannot write {path}: {_reason(exc)}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path``; renamed over it if the block succeeds, else removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Created here, so its mode is 0666 & ~umask like every other output file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        os.close(fd)
        from dispatchkit import faults

        faults.write_error(path.name)
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) or _is_io_error(exc):
            raise output_error(path, exc) from None
        raise


def _is_io_error(exc: BaseException) -> bool:
    """Libraries that wrap an OS error (polars, pyarrow) in their own exception type."""
    text = str(exc)
    return any(
        os.strerror(code) in text
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
    )
