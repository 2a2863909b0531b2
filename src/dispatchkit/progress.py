"""How long work reports its progress: a small protocol, and a silent default.

The run loops report through :class:`Progress` and never draw anything themselves; the
command line hands them its bars (:class:`dispatchkit.cli.progress.Bars`), a library
caller anything with these three methods, or nothing.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Named counters of work done, each with an optional total and a unit."""

    def add(self, name: str, total: int | None, unit: str = "", *, gauge: bool = False) -> None:
        """A new counter; a ``gauge`` goes up and down (workers running), with no rate."""

    def advance(self, name: str, n: int = 1) -> None: ...

    def update(
        self, name: str, *, completed: int | None = None, total: int | None = None
    ) -> None: ...


class NoProgress:
    """Reports nothing."""

    def add(self, name: str, total: int | None, unit: str = "", *, gauge: bool = False) -> None:
        pass

    def advance(self, name: str, n: int = 1) -> None:
        pass

    def update(self, name: str, *, completed: int | None = None, total: int | None = None) -> None:
        pass
