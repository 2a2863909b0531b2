"""Read ahead of a consumer: an iterator's next items made in a thread of their own.

The reader's sorted batches come out of DuckDB, which sorts and fetches without holding
the GIL; the dispatcher cuts and encodes them in Python. :func:`prefetched` lets the two
overlap: a thread pulls up to ``depth`` items ahead while the caller works on the last.
An exception in the thread is raised in the caller at the item where it happened; when
the caller stops early (``close()``, an exception), the thread is told to stop and is
joined (for up to ten seconds) before the source is closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
#: How long a consumer that stops early waits for the thread to finish its item (a
#: DuckDB sort may be under way); after that the daemon thread is left to end alone.
_JOIN_SECONDS = 10.0


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(items: Iterable[T], depth: int = 2, name: str = "prefetch") -> Iterator[T]:
    """Yield ``items`` in order, each made ahead in a background thread (``depth`` ≥ 1)."""
    if depth < 1:
        raise ValueError("depth must be at least 1")
    box: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # raised again in the consumer
            put(_Failed(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=pull, name=f"dispatchkit-{name}", daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(_JOIN_SECONDS)
        close = getattr(items, "close", None)
        if close is not None and not thread.is_alive():
            close()
