"""One dispatcher per run: who holds a run, decided from the manifests topic's order.

Every dispatcher of a run appends manifests to the run's partition of the manifests
topic (key = run id): a *claim* when it wants to dispatch, *heartbeats* while it does,
and ``dispatched`` when it is done. One partition is one total order that every reader
sees the same way, so folding the run's records in that order gives every process the
same answer to "who holds this run?" — without a lock server:

* a claim is accepted when nobody holds the run, when it names the holder it takes over
  (the claimer saw that process dead on its own host), or when the holder's last
  heartbeat is older than :data:`STALE_SECONDS` at the claim;
* any other claim loses: its dispatcher sees someone else as the holder and waits;
* once a ``dispatched`` record is in the log the run needs no dispatcher at all.

A dispatcher that lost (or found a live holder) waits for it and says for whom; one that
waited too long is refused. The fold is pure: see :func:`holder_of`.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from dispatchkit.message import Manifest

#: A holder whose last heartbeat is older than this is taken to be gone.
STALE_SECONDS: Final = 15.0
#: How often a holder says it is alive.
HEARTBEAT_SECONDS: Final = 2.0


def new_owner() -> str:
    """``host:pid:nonce`` — unique per dispatcher process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Holding:
    """The state of a run's dispatch, folded from its manifests in log order."""

    holder: str  # owner holding the run, "" when nobody does
    heartbeat_at: float  # the holder's last heartbeat
    dispatched: Manifest | None  # the first ``dispatched`` manifest, if any
    latest: Manifest | None  # the last manifest of the run


def holder_of(manifests: Iterable[Manifest]) -> Holding:
    """Who holds the run after these manifests (one run's, in log order)."""
    holder, beat = "", 0.0
    dispatched: Manifest | None = None
    latest: Manifest | None = None
    for m in manifests:
        latest = m
        if m.status == "dispatched":
            if dispatched is None:
                dispatched = m
            holder, beat = "", 0.0
            continue
        if not m.owner:  # written by a dispatchkit that did not claim runs
            continue
        if m.owner == holder:
            beat = max(beat, m.heartbeat_at)
        elif not holder or m.takes_over == holder or m.heartbeat_at - beat > STALE_SECONDS:
            holder, beat = m.owner, m.heartbeat_at
    return Holding(holder, beat, dispatched, latest)


def is_alive(owner: str, heartbeat_at: float, now: float) -> bool:
    """Whether the holder ``owner`` may still be dispatching.

    On this host a process that no longer exists is dead at once; anywhere, a holder
    silent for :data:`STALE_SECONDS` is taken to be gone.
    """
    if now - heartbeat_at > STALE_SECONDS:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname() and pid_text.isdigit():
        pid = int(pid_text)
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def describe(owner: str) -> str:
    """``pid 1234 on host h`` for an owner string."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return f"pid {pid} on host {host}" if pid else owner
