"""Progress of long work: rich bars on a terminal; on a pipe or a file, a line every few
seconds (counts, totals, rates); nothing when quiet."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Seconds between two progress lines when stderr is not a terminal
#: (``$DISPATCHKIT_PROGRESS_SECONDS``).
LINE_SECONDS = float(os.environ.get("DISPATCHKIT_PROGRESS_SECONDS", "5"))


@dataclass
class _Count:
    total: int | None
    unit: str
    done: int = 0
    started: float = 0.0
    changed: float = 0.0
    gauge: bool = False


class Bars:
    """Named progress counters (:class:`dispatchkit.progress.Progress`).

    ``enabled=None``: bars when stderr is a terminal, else progress lines; ``False``:
    nothing (``--quiet``, tests); ``True``: bars.
    """

    def __init__(
        self,
        enabled: bool | None = None,
        *,
        stream: TextIO | None = None,
        every: float = LINE_SECONDS,
        json_lines: bool = False,
    ) -> None:
        self.stream = stream or sys.stderr
        tty = self.stream.isatty()
        self.lines = enabled is None and not tty
        if enabled is None:
            enabled = tty
        self.enabled = enabled
        self.every = every
        self.json_lines = json_lines
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._counts: dict[str, _Count] = {}
        self._last_line = time.monotonic()
        self._said = False
        self._closed = False
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )

    def __enter__(self) -> Bars:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._closed:
            return
        self._closed = True
        # The last state, once, if this was long enough to have said anything before.
        if self.lines and self._counts and et is None and self._said:
            self._line(force=True)

    def add(self, name: str, total: int | None, unit: str = "", *, gauge: bool = False) -> None:
        if self._progress is not None:
            self._tasks[name] = self._progress.add_task(name, total=total, unit=unit)
        if self.lines:
            self._counts[name] = _Count(total, unit, 0, time.monotonic(), gauge=gauge)

    def advance(self, name: str, n: int = 1) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.advance(self._tasks[name], n)
        count = self._counts.get(name)
        if count is not None:
            count.done += n
            count.changed = time.monotonic()
            self._line()

    def update(self, name: str, *, completed: int | None = None, total: int | None = None) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.update(self._tasks[name], completed=completed, total=total)
        count = self._counts.get(name)
        if count is not None:
            if completed is not None and completed != count.done:
                count.done = completed
                count.changed = time.monotonic()
            if total is not None:
                count.total = total
            self._line()

    def _line(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_line < self.every:
            return
        self._last_line = now
        self._said = True
        parts = []
        fields: dict[str, object] = {}
        for name, c in self._counts.items():
            of = f"/{c.total:,}" if c.total is not None else ""
            took = (c.changed or now) - c.started
            per_second = c.done / took if took > 0.5 and c.done and not c.gauge else None
            rate = f", {per_second:,.0f} {c.unit}/s" if per_second is not None else ""
            parts.append(f"{name} {c.done:,}{of} {c.unit}{rate}")
            fields[name] = {"done": c.done, "total": c.total, "unit": c.unit, "rate": per_second}
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.json_lines:
            line = json.dumps(
                {
                    "ts": stamp,
                    "level": "INFO",
                    "logger": "dispatchkit.progress",
                    "msg": "; ".join(parts),
                    "progress": fields,
                }
            )
        else:
            line = f"{stamp} INFO dispatchkit.progress: " + "; ".join(parts)
        print(line, file=self.stream, flush=True)
