"""The broker interface: a handful of methods every transport implements.

Two sides, two small interfaces:

* :class:`Broker` — what the dispatcher and the collector see: announce a run, publish
  job batches, read the run's manifest and result batches back, commit what has been
  stored, list the dead-lettered jobs, close. One collecting loop
  (:func:`dispatchkit.collector.collect_run`) drives every transport through it.
* :class:`JobSource` — what a worker sees: consume one delivery, ack it with the
  encoded result (the result becomes durable and the job consumed, as one step), or
  reject it to the dead letters, close.

Payloads are the encoded messages of :mod:`dispatchkit.wire`, so every transport
carries the same bytes. The dispatcher, the worker loop and the tasks never import a
concrete broker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from dispatchkit.message import Manifest

if TYPE_CHECKING:
    from dispatchkit.dispatcher import Outgoing
    from dispatchkit.positions import ReadPositions
    from dispatchkit.wire import ResultMessage

T = TypeVar("T")


@dataclass
class Delivery:
    """One job batch handed to a worker; ``token`` is the transport's bookkeeping."""

    payload: bytes
    key: bytes | None = None
    token: Any = None
    attempts: int = 1
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """Why a delivery went to the dead letters."""

    error_class: str
    error: str
    attempts: int
    first_failure: float


class Broker(ABC):
    """The dispatcher's and the collector's view of a transport."""

    @abstractmethod
    def open_run(self, manifest: Manifest) -> None:
        """Announce a run before its jobs are published."""

    @abstractmethod
    def publish(self, message: Outgoing) -> None:
        """Send one job message; may block for back-pressure, never drops it."""

    @abstractmethod
    def close_run(self, manifest: Manifest) -> None:
        """Record the run's final totals once every batch is published and delivered."""

    @abstractmethod
    def results(self, timeout: float) -> list[ResultMessage]:
        """Result messages that arrived, waiting up to ``timeout`` seconds for the first."""

    @abstractmethod
    def commit_results(self) -> None:
        """Mark results returned so far as stored (call after the store's flush)."""

    @abstractmethod
    def read_manifest(self, run_id: str) -> Manifest | None:
        """The run's manifest as the transport holds it: ``dispatched`` once it is."""

    @abstractmethod
    def dead_jobs(self, run_id: str) -> dict[str, str]:
        """``job id → "key: error"`` of the run's dead-lettered jobs."""

    def positions(self) -> ReadPositions | None:
        """Where reading the results got to, for the store to keep with them; ``None``
        when the transport tracks that itself (:meth:`commit_results`)."""
        return None

    def settled(self) -> bool:
        """True when no result can arrive any more for what was published (a closed
        run with nothing in flight); a transport that cannot know says ``False``, and
        the collector waits for results, or for dead letters to explain their absence."""
        return False

    def refresh(self) -> None:  # noqa: B027 - optional hook
        """Notice changes of the transport (new partitions); called every few seconds."""

    #: Seconds between two reads of the run's manifest while it is not ``dispatched``.
    manifest_interval: float = 2.0

    @abstractmethod
    def close(self) -> None:
        """Release everything; idempotent."""


class JobSource(ABC):
    """A worker's view of a transport."""

    @abstractmethod
    def consume(self, timeout: float) -> Delivery | None:
        """The next delivery, or ``None`` if none came within ``timeout`` seconds."""

    @abstractmethod
    def ack(
        self,
        delivery: Delivery,
        result: bytes | None,
        failed: tuple[bytes, Rejection] | None = None,
    ) -> None:
        """Make ``result`` (and a dead letter of ``failed`` jobs) durable, and consume.

        All of it happens together or not at all.
        """

    @abstractmethod
    def reject(self, delivery: Delivery, rejection: Rejection) -> None:
        """Move the delivery to the dead letters and consume it, together."""

    def process(self, fn: Callable[[], T], delivery: Delivery) -> T:
        """Run the task for ``delivery``; a transport may run it off its poll loop."""
        return fn()

    def drained(self) -> bool:
        """True when nothing is left to consume (for ``--burst``)."""
        return False

    def checkpoint(self) -> None:  # noqa: B027 - optional hook
        """Commit acknowledged work now (called when idle and before exit)."""

    @abstractmethod
    def close(self) -> None:
        """Commit what is acknowledged and release everything."""
