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
import os
import signal
import sys
from collections.abc import Iterator

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
