"""The embedded broker: worker processes on this machine, no server needed.

The parent process (dispatcher and collector) talks to each worker process over its own
pipe and keeps, per worker, the batches it sent and has not had results for. A worker
gets a new batch only while it holds fewer than ``credit`` batches, so the dispatcher
is paced by the workers (back-pressure) and memory stays bounded.

If a worker process dies, the parent starts a new one in its slot and sends it the dead
worker's unfinished batches again; a batch that was in fact finished is stored twice
under the same job ids, which the store ignores. Nothing is lost, nothing is counted
twice.

Worker processes are forked from a *fork server* (``multiprocessing``'s forkserver
start method): one clean interpreter, started with the run, imports the worker's modules
once, and each worker (or a worker restarted after a crash) is a fork of it, ready in
milliseconds instead of paying the imports again. A worker takes the parent's current
environment and working directory with it, as a spawned process would.

Worker processes leave Ctrl-C to the parent (they ignore it), stop when the parent
closes their pipe or dies (the fork server exits with the parent, and
``PR_SET_PDEATHSIG`` on Linux, or a parent-pid check, ends the worker with the fork
server), and exit quietly then: see :mod:`dispatchkit.procs`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import msgspec

from dispatchkit import logs, procs
from dispatchkit.app import load_app
from dispatchkit.brokers.base import Broker, Delivery, JobSource, Rejection
from dispatchkit.errors import BrokerError, DecodeError
from dispatchkit.message import Manifest
from dispatchkit.wire import ResultMessage, decode_jobs, decode_results
from dispatchkit.worker import RetryPolicy, Worker, run

if TYPE_CHECKING:
    from dispatchkit.dispatcher import Outgoing

log = logging.getLogger(__name__)


class _Reply(msgspec.Struct, array_like=True):
    """Worker → parent: one reply per batch, in the order the batches were sent."""

    result: bytes | None
    dead: bytes | None = None
    error_class: str = ""
    error: str = ""
    attempts: int = 0
    first_failure: float = 0.0


_reply_decoder = msgspec.msgpack.Decoder(_Reply)


@dataclass
class DeadLetter:
    """A batch (or the failing jobs of one) that could not be processed."""

    payload: bytes
    rejection: Rejection


@dataclass
class _Slot:
    index: int
    process: BaseProcess
    conn: Connection
    outstanding: deque[bytes] = field(default_factory=deque)
    restarts: int = 0


class EmbeddedBroker(Broker):
    """Runs ``workers`` worker processes and feeds them over pipes."""

    def __init__(
        self,
        workers: int,
        *,
        app: str | None = None,
        credit: int = 4,
        retry: RetryPolicy | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.app = app  # the import path each worker process loads the app by
        self.n_workers = workers
        self.credit = credit
        self.retry = retry or RetryPolicy()
        self._ctx = procs.fork_context()
        self._slots: list[_Slot] = []
        self._results: deque[ResultMessage] = deque()
        self.dead_letters: list[DeadLetter] = []
        self.restarts = 0
        self.batches_sent = 0
        self._manifest: Manifest | None = None
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker processes (forks of a clean fork server, not of this process)."""
        self._join_starter()
        if not self._slots:
            self._slots = [self._spawn(i) for i in range(self.n_workers)]

    def start_soon(self) -> None:
        """Start the workers in a thread, while this process goes on (e.g. reads the input).

        The fork server's imports take a moment; :meth:`start` (and every use of the
        workers) waits for the thread, and raises what it raised.
        """
        if self._slots or self._starter is not None:
            return

        def start() -> None:
            try:
                self._slots = [self._spawn(i) for i in range(self.n_workers)]
            except BaseException as exc:  # raised again by start()
                self._start_error = exc

        self._starter = threading.Thread(target=start, name="dispatchkit-start-workers")
        self._starter.start()

    def _join_starter(self) -> None:
        if self._starter is not None:
            self._starter.join()
            self._starter = None
            if self._start_error is not None:
                exc, self._start_error = self._start_error, None
                raise exc

    def _spawn(self, index: int) -> _Slot:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, f"embedded-{index}", self.retry, self.app, procs.Origin.here()),
            name=f"dispatchkit-worker-{index}",
            daemon=True,
        )
        with procs.signals_deferred():  # a Ctrl-C now is the parent's, not the child's
            proc.start()
        child.close()
        return _Slot(index=index, process=proc, conn=parent)

    @property
    def pids(self) -> list[int]:
        return [s.process.pid or 0 for s in self._slots]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._join_starter()
        for slot in self._slots:
            with contextlib.suppress(OSError):
                slot.conn.send_bytes(b"")
        deadline = time.monotonic() + 5
        for slot in self._slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(1)
            slot.conn.close()
        self._slots = []

    # -- Broker ------------------------------------------------------------------------

    #: The manifest is held here, in this process: read it at every turn of the loop.
    manifest_interval = 0.0

    def open_run(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self.start()

    def close_run(self, manifest: Manifest) -> None:
        """Hold the run's final manifest; the store holds the embedded run's ledger."""
        self._manifest = manifest

    def read_manifest(self, run_id: str) -> Manifest | None:
        m = self._manifest
        return m if m is not None and m.run_id == run_id else None

    def settled(self) -> bool:
        """The run is closed and every batch sent has had its reply."""
        m = self._manifest
        return m is not None and m.status == "dispatched" and self.outstanding == 0

    def dead_jobs(self, run_id: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for i, dead in enumerate(self.dead_letters):
            why = f"{dead.rejection.error_class}: {dead.rejection.error}"
            try:
                msg = decode_jobs(dead.payload, validate=False)
            except DecodeError:
                out[f"undecodable-batch-{i}"] = f"undecodable batch ({dead.rejection.error})"
                continue
            if msg.run_id == run_id:
                out.update({job: f"{key}: {why}" for job, key in msg.key_texts().items()})
        return out

    def publish(self, message: Outgoing) -> None:
        self.start()
        payload = message.payload
        while True:
            free = [s for s in self._slots if len(s.outstanding) < self.credit]
            if free:
                slot = min(free, key=lambda s: len(s.outstanding))
                slot.outstanding.append(payload)
                self._send(slot, payload)
                self.batches_sent += 1
                return
            self._pump(timeout=1.0)

    def results(self, timeout: float) -> list[ResultMessage]:
        if not self._results and self.outstanding:
            self._pump(timeout)
        out = list(self._results)
        self._results.clear()
        return out

    def commit_results(self) -> None:
        """Nothing to commit: outstanding batches are tracked until their results arrive."""

    @property
    def outstanding(self) -> int:
        return sum(len(s.outstanding) for s in self._slots)

    # -- internals ---------------------------------------------------------------------

    def _send(self, slot: _Slot, payload: bytes) -> None:
        try:
            slot.conn.send_bytes(payload)
        except OSError:
            # The worker is gone; _pump notices and resends its outstanding batches.
            log.warning("worker %d is gone; its batches will be resent", slot.index)

    def _pump(self, timeout: float) -> None:
        """Wait for replies or worker deaths and handle them."""
        by_conn: dict[Any, _Slot] = {s.conn: s for s in self._slots}
        by_sentinel: dict[Any, _Slot] = {s.process.sentinel: s for s in self._slots}
        ready = wait([*by_conn, *by_sentinel], timeout)
        for obj in ready:
            slot = by_conn.get(obj)
            if slot is not None:
                self._receive(slot)
        for obj in ready:
            slot = by_sentinel.get(obj)
            if slot is not None and not slot.process.is_alive():
                self._restart(slot)

    def _receive(self, slot: _Slot) -> None:
        while True:
            try:
                if not slot.conn.poll():
                    return
                data = slot.conn.recv_bytes()
            except (EOFError, OSError):
                return
            reply = _reply_decoder.decode(data)
            if slot.outstanding:
                slot.outstanding.popleft()
            if reply.result is not None:
                result = decode_results(reply.result)
                if len(result):
                    self._results.append(result)
            if reply.dead is not None:
                self.dead_letters.append(
                    DeadLetter(
                        reply.dead,
                        Rejection(
                            reply.error_class, reply.error, reply.attempts, reply.first_failure
                        ),
                    )
                )

    def _restart(self, slot: _Slot) -> None:
        self._receive(slot)  # replies sent just before dying still count
        code = slot.process.exitcode
        pending = list(slot.outstanding)
        log.warning(
            "worker %d (pid %s) exited with code %s; restarting it and resending %d batch(es)",
            slot.index,
            slot.process.pid,
            code,
            len(pending),
        )
        self.restarts += 1
        slot.conn.close()
        fresh = self._spawn(slot.index)
        slot.process, slot.conn, slot.restarts = fresh.process, fresh.conn, slot.restarts + 1
        if slot.restarts > 50:
            raise BrokerError(f"worker {slot.index} keeps dying (last exit code {code})")
        for payload in pending:
            self._send(slot, payload)


class _PipeSource(JobSource):
    """A worker process's end of its pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.closed = False

    def consume(self, timeout: float) -> Delivery | None:
        try:
            if self.closed or not self.conn.poll(timeout):
                return None
            data = self.conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone: stop quietly
            data = b""
        if not data:
            self.closed = True
            return None
        return Delivery(payload=data)

    def ack(
        self,
        delivery: Delivery,
        result: bytes | None,
        failed: tuple[bytes, Rejection] | None = None,
    ) -> None:
        if failed is None:
            reply = _Reply(result)
        else:
            payload, r = failed
            reply = _Reply(result, payload, r.error_class, r.error, r.attempts, r.first_failure)
        try:
            self.conn.send_bytes(msgspec.msgpack.encode(reply))
        except OSError:  # the parent is gone: stop quietly
            self.closed = True

    def reject(self, delivery: Delivery, rejection: Rejection) -> None:
        self.ack(delivery, None, (delivery.payload, rejection))

    def drained(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.conn.close()


def _worker_main(
    conn: Connection, worker_id: str, retry: RetryPolicy, app: str | None, origin: procs.Origin
) -> None:
    origin.enter()
    logs.configure_from_env()  # log as the command that started us does
    logs.set_context(worker=f"{worker_id}:{os.getpid()}")
    source = _PipeSource(conn)
    worker = Worker(f"{worker_id}:{os.getpid()}", retry, app=load_app(app))
    run(source, worker, should_stop=lambda: source.closed or procs.orphaned(), burst=True)
