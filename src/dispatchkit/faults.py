"""Fault injection for the test suite: crash or fail at named points.

Read from ``DISPATCHKIT_TEST_FAULTS`` (comma-separated) once per process; unset in normal
use, where every hook is a cheap no-op. Recognized entries:

``crash:<point>``          ``os._exit(137)`` (as a kill -9 would) the first time the
                           point is reached; ``crash:<point>@<n>`` on its n-th time.
``crash-once:<point>@<n>`` the same, but only in the first process of a run to get there:
                           a marker file in ``$DISPATCHKIT_TEST_FAULT_DIR`` remembers it, so
                           a restarted worker does not crash again.
``fail:<value>``           every job with that key value (e.g. a country) raises.
``fail-once:<value>``      its jobs fail on the first attempt only.
``slow:<seconds>``         each batch takes that much longer (a long job).
``enospc:<file name>``     writing that output file fails with ENOSPC (disk full).
``flush-at:<n>``           the embedded run flushes its store every n job parts.

Points: ``worker.after_compute`` (a batch computed, its results not yet sent),
``worker.after_produce`` (results produced, transaction not committed),
``run.after_flush`` (the embedded run stored results, before it acknowledges them),
``collector.after_store`` (results and read positions stored, after a flush),
``dispatch.mid_publish`` (after some batches are published).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

_spec = [s for s in os.environ.get("DISPATCHKIT_TEST_FAULTS", "").split(",") if s]
_counts: dict[str, int] = {}
_failed_once: set[tuple[tuple[str, str], ...]] = set()


def reload() -> None:
    """Read ``DISPATCHKIT_TEST_FAULTS`` again (a process forked with another environment)."""
    global _spec
    _spec = [s for s in os.environ.get("DISPATCHKIT_TEST_FAULTS", "").split(",") if s]
    _counts.clear()
    _failed_once.clear()


def enabled() -> bool:
    return bool(_spec)


def crash_point(point: str) -> None:
    """Exit at once, without cleanup, if the tests asked for a crash at ``point``."""
    if not _spec:
        return
    _counts[point] = _counts.get(point, 0) + 1
    for entry in _spec:
        kind, _, rest = entry.partition(":")
        if kind not in ("crash", "crash-once"):
            continue
        name, _, nth = rest.partition("@")
        if name != point or _counts[point] != int(nth or 1):
            continue
        if kind == "crash-once":
            marker = os.path.join(os.environ["DISPATCHKIT_TEST_FAULT_DIR"], f"crashed-{point}")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        os._exit(137)


def flush_at(default: int) -> int:
    """The store's flush threshold: ``default``, unless the tests set ``flush-at:<n>``."""
    for entry in _spec:
        if entry.startswith("flush-at:"):
            return int(entry[9:])
    return default


def maybe_fail_job(key: Mapping[str, object]) -> None:
    """Raise if the tests asked jobs with this key value (e.g. a country) to fail."""
    if not _spec:
        return
    values = {str(v) for v in key.values()}
    for entry in _spec:
        kind, _, value = entry.partition(":")
        if kind == "fail" and value in values:
            raise RuntimeError(f"injected failure for {value}")
        ident = tuple(sorted((k, str(v)) for k, v in key.items()))
        if kind == "fail-once" and value in values and ident not in _failed_once:
            _failed_once.add(ident)
            raise RuntimeError(f"injected one-time failure for {value}")


def slow_seconds() -> float:
    for entry in _spec:
        if entry.startswith("slow:"):
            return float(entry[5:])
    return 0.0


def maybe_sleep() -> None:
    if _spec and (s := slow_seconds()):
        time.sleep(s)


def write_error(name: str) -> None:
    """Raise a real ``OSError(ENOSPC)`` if the tests asked writing file ``name`` to fail.

    ``enospc:<file name>`` (e.g. ``enospc:results.csv``) in ``DISPATCHKIT_TEST_FAULTS``.
    """
    if _spec and f"enospc:{name}" in _spec:
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
