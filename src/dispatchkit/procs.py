"""Child processes that never outlive their parent and leave Ctrl-C to it.

A ``run`` starts worker processes (and, on Kafka, a dispatcher process). They must not
print tracebacks when the user presses Ctrl-C — the terminal sends SIGINT to the whole
process group — and must not keep running when the parent is killed with ``kill -9``:

* **Ctrl-C is the parent's.** The parent starts a child with SIGINT and SIGTERM
  *blocked* (:func:`signals_deferred`; the mask survives ``exec``), so a Ctrl-C during
  the child's start-up stays pending in the child, which ignores SIGINT once it runs
  (:func:`child_signals`). The parent then stops its children itself. ``run``-spawned
  Kafka workers are put in a process group of their own instead.
* **Die with the parent.** Linux's ``prctl(PR_SET_PDEATHSIG, SIGTERM)``
  (:func:`die_with_parent`) has the kernel send the child SIGTERM when its parent
  dies; elsewhere, and as a fallback, worker loops poll :func:`orphaned` (the parent's
  pid changed). A standalone ``dispatchkit worker`` has no parent to watch: the
  environment variable :data:`PARENT_ENV` is only set for workers a ``run`` starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

PARENT_ENV = "DISPATCHKIT_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_DEFERRED = {signal.SIGINT, signal.SIGTERM}

_parent: int | None = None


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` when the parent dies; poll :func:`orphaned` too."""
    global _parent
    _parent = parent_pid
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the prctl took effect
        os.kill(os.getpid(), sig)


def orphaned() -> bool:
    """Whether the parent this process was told to die with is gone."""
    return _parent is not None and os.getppid() != _parent


def supervised() -> bool:
    """Whether this process is a child a ``run`` started and stops (it says nothing then)."""
    return _parent is not None


def adopt_parent_from_env() -> None:
    """For a process a ``run`` started: die with it (``$DISPATCHKIT_PARENT_PID``)."""
    value = os.environ.pop(PARENT_ENV, "")
    if value.isdigit():
        die_with_parent(int(value))


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` plus the variable that makes a ``dispatchkit`` child die with this process."""
    return {**env, PARENT_ENV: str(os.getpid())}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread for the block (children inherit the mask)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def child_signals() -> None:
    """In a child started under :func:`signals_deferred`: ignore Ctrl-C, die on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)


#: What the fork server imports before it forks any child (see :func:`fork_context`).
PRELOAD = ("dispatchkit.brokers.embedded", "dispatchkit.apps.covid")


def fork_context(
    preload: Sequence[str] = PRELOAD,
) -> mp.context.ForkServerContext | mp.context.SpawnContext:
    """The start method of a run's helper processes (embedded workers, the chart).

    ``multiprocessing``'s *fork server*: one clean interpreter, started by the first
    child, imports ``preload`` once; every child is then a fork of it, ready in
    milliseconds instead of paying the imports again, and holding nothing of this
    process (no threads, no open store). The fork server exits with this process.
    Where there is no fork server, children are spawned.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def start_fork_server(preload: Sequence[str] = PRELOAD) -> None:
    """Start :func:`fork_context`'s fork server now; it imports ``preload`` in the
    background, beside this process's own imports (``run`` imports DuckDB, Polars and
    the rest for most of a second) rather than after them. No-op without a fork server."""
    if fork_context(preload).get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with signals_deferred():  # as for every child: a Ctrl-C now is the parent's
        forkserver.ensure_running()


@dataclass(frozen=True)
class Origin:
    """What a child of :func:`fork_context` takes from the process that asked for it:
    its environment and working directory (a fork server's are from its own start)."""

    env: dict[str, str]
    cwd: str

    @classmethod
    def here(cls) -> Origin:
        return cls(dict(os.environ), os.getcwd())

    def enter(self) -> None:
        """In the child: die with our parent (the fork server, or the asking process
        when spawned), leave Ctrl-C to it, and take the environment and directory."""
        _close_fork_server_fd()
        parent = os.getppid()
        die_with_parent(parent)
        child_signals()  # Ctrl-C is the parent's; SIGTERM (the parent died) ends us
        if parent == 1:  # orphaned before the prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        os.environ.clear()
        os.environ.update(self.env)
        os.chdir(self.cwd)
        from dispatchkit import faults

        faults.reload()


def _close_fork_server_fd() -> None:
    """Close a forked child's copy of the fork server's "alive" pipe.

    ``multiprocessing`` hands every child of the fork server the write end of the pipe
    whose end-of-file tells the fork server that the asking process is gone (so that the
    child could ask for children of its own). Our children never do; holding it would
    keep the fork server, and so the children dying with it, alive after a ``kill -9``
    of the run.
    """
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None
