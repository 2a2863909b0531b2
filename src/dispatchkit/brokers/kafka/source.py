"""A worker's side of Kafka: a consumer-group member with transactional results.

Each delivery's result is produced inside a Kafka transaction together with the
consumer's input offsets (``send_offsets_to_transaction``), so a job batch is either
consumed *and* its result visible to ``read_committed`` readers, or neither — a crash
anywhere before the commit leaves the batch to be redone and its result invisible.
Many deliveries share one transaction (up to ``txn_max_batches`` or ``txn_max_seconds``);
the guarantee does not depend on how many.

Error classes (librdkafka): a *retriable* commit is retried; an *abortable* one aborts
the transaction and rewinds the consumer to its committed offsets, so the batches are
redone; a *fatal* one (e.g. fenced by a newer instance of the same ``transactional.id``)
raises :class:`~dispatchkit.errors.FatalBrokerError` and the process exits non-zero for
its supervisor to restart it.

Long jobs: the task runs on a helper thread; while it runs, the assigned partitions are
paused and the consumer keeps polling, so ``max.poll.interval.ms`` is never exceeded and
the member stays in its group. If a rebalance takes the partition away meanwhile, the
finished result is dropped (the new owner redoes the batch) instead of committed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from dispatchkit import faults
from dispatchkit.brokers.base import Delivery, JobSource, Rejection
from dispatchkit.brokers.kafka.broker import (
    H_BATCH,
    H_KIND,
    H_RUN,
    H_VERSION,
    PRODUCER_DEFAULTS,
    ensure_topics,
    headers_of,
)
from dispatchkit.brokers.kafka.consume import ready
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.errors import BrokerError, FatalBrokerError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a task may run inline before the partitions are paused and polling goes on.
INLINE_SECONDS = 0.5
#: A batch that took less than this lets the next one run on the poll loop itself.
FAST_SECONDS = 0.05
#: Timeout of each transactional call, and how much longer we wait for it to return:
#: librdkafka can block in ``send_offsets_to_transaction`` far past its timeout once the
#: group coordinator went away (confluentinc/librdkafka#5456, #5511). Such a producer is
#: abandoned and replaced (:meth:`KafkaJobSource._replace_producer`).
TXN_TIMEOUT = 10.0
TXN_GRACE = 5.0
#: Seconds an abort waits for the transaction's records in flight to be delivered.
FLUSH_BEFORE_ABORT = 5.0
#: While records wait in its buffer, a worker still serves its consumer this often
#: (rebalance callbacks, group joins), so a worker joining the group gets its share
#: within a batch or so instead of when this one's buffer of fetched records runs out.
SERVE_SECONDS = 0.1
#: Records taken from the consumer at a time.
FETCH_RECORDS = 200


class _Wedged(Exception):
    """A transactional call did not return within ``TXN_TIMEOUT + TXN_GRACE`` seconds."""


def default_worker_id() -> str:
    import os

    return f"{socket.gethostname()}-{os.getpid()}"


class KafkaJobSource(JobSource):
    """Consumes job batches in a group; acks by producing results in a transaction."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        group: str,
        worker_id: str,
        group_protocol: str = "classic",
        txn_max_batches: int = 1000,
        txn_max_seconds: float = 1.0,
        session_timeout_ms: int = 10_000,
        max_poll_interval_ms: int = 300_000,
    ) -> None:
        self.settings = settings
        self.group = group
        self.worker_id = worker_id
        self.group_protocol = group_protocol
        self.txn_max_batches = txn_max_batches
        self.txn_max_seconds = txn_max_seconds
        self.session_timeout_ms = session_timeout_ms
        self.max_poll_interval_ms = max_poll_interval_ms
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._buffer: deque[Any] = deque()
        self._offsets: dict[tuple[str, int], int] = {}
        self._in_txn = False
        self._txn_batches = 0
        self._txn_started = 0.0
        self._assigned: set[tuple[str, int]] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dispatchkit-task")
        self._inline = False
        self._served = 0.0  # when the consumer was last served (monotonic)
        self._abandoned: list[Producer | None] = []
        self.committed_batches = 0
        self.aborts = 0
        self.dropped = 0
        #: The group has given this member its share (maybe none) at least once.
        self.joined = False

    # -- clients -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._consumer is not None:
            return
        ensure_topics(self.settings)
        conf: dict[str, object] = {
            "group.id": self.group,
            "client.id": self.worker_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "max.poll.interval.ms": self.max_poll_interval_ms,
        }
        if self.group_protocol == "consumer":
            conf["group.protocol"] = "consumer"
        else:
            conf["partition.assignment.strategy"] = "cooperative-sticky"
            conf["session.timeout.ms"] = self.session_timeout_ms
            # A member learns that the group rebalances from a heartbeat's answer, and a
            # cooperative rebalance takes two rounds: with librdkafka's default ratio
            # (a third of the session) a worker joining waited ~2 heartbeats for its share.
            conf["heartbeat.interval.ms"] = max(250, self.session_timeout_ms // 20)
        self._consumer = Consumer(self.settings.client_config(**conf))
        self._new_producer()
        self._consumer.subscribe(
            [self.settings.jobs_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    @property
    def consumer(self) -> Consumer:
        self._start()
        assert self._consumer is not None
        return self._consumer

    @property
    def producer(self) -> Producer:
        self._start()
        assert self._producer is not None
        return self._producer

    def _new_producer(self) -> None:
        self._producer = Producer(
            self.settings.client_config(
                **{
                    **PRODUCER_DEFAULTS,
                    "transactional.id": f"{self.settings.topic_prefix}.worker.{self.worker_id}",
                    "transaction.timeout.ms": 60_000,
                    "linger.ms": 5,
                }
            )
        )
        # A broker restarting, a coordinator moving: a timed-out init_transactions is
        # resumed by calling it again (librdkafka: "retry call to resume").
        deadline = time.monotonic() + 120
        while True:
            try:
                self._call(lambda p: p.init_transactions(TXN_TIMEOUT))
                return
            except _Wedged:
                raise FatalBrokerError("producer: init_transactions did not return") from None
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if not err.retriable() or time.monotonic() > deadline:
                    raise
                log.warning("%s: init_transactions: %s; retrying", self.worker_id, err.str())
                time.sleep(0.5)

    def _call(self, fn: Any) -> Any:
        """Run a transactional call on a helper thread; :class:`_Wedged` if it never returns."""
        producer = self._producer
        box: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                box["value"] = fn(producer)
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        # A daemon thread: one stuck inside librdkafka must not keep the process alive.
        threading.Thread(target=target, name="dispatchkit-txn", daemon=True).start()
        if not done.wait(TXN_TIMEOUT + TXN_GRACE):
            raise _Wedged()
        exc = box.get("error")
        if exc is None:
            return box.get("value")
        if isinstance(exc, KafkaException):
            err: KafkaError = exc.args[0]
            if err.fatal():
                raise FatalBrokerError(self.settings.redact(f"producer: {err.str()}")) from None
        raise exc

    def _replace_producer(self, why: str | None = None) -> None:
        """Abandon a wedged producer. Its successor (same transactional.id) fences it and
        aborts its open transaction; the consumer rewinds, so those batches are redone."""
        log.warning(
            "%s: %s; replacing the producer",
            self.worker_id,
            why or f"a transactional call hung for {TXN_TIMEOUT + TXN_GRACE:.0f} s",
        )
        # Keep the old client referenced: destroying it while a call is stuck would block.
        self._abandoned.append(self._producer)
        self._in_txn = False
        self._offsets.clear()
        self._txn_batches = 0
        self._buffer.clear()
        self._new_producer()
        self._rewind()

    # -- rebalances --------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        self.joined = True
        log.info("%s assigned %s", self.worker_id, _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Abort, not commit: committing means sending offsets to a group in the middle of
        # a rebalance, and librdkafka can then block in send_offsets_to_transaction until
        # the rebalance gives up, which it cannot while this callback waits. The open
        # transaction holds at most txn_max_seconds of work; the new owners redo its
        # batches on the revoked partitions, this worker on the ones it keeps.
        if self._in_txn:
            self._abort(rewind=False)
            self._forget(partitions)
            self._rewind()
        else:
            self._forget(partitions)
        log.info("%s revoked %s", self.worker_id, _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Too late to commit: another member may already own them. Abort and forget.
        if self._in_txn:
            self._abort(rewind=False)
        self._forget(partitions)
        log.warning("%s lost %s", self.worker_id, _names(partitions))

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self._assigned -= gone
        self._buffer = deque(m for m in self._buffer if (m.topic(), m.partition()) not in gone)
        for key in gone:
            self._offsets.pop(key, None)

    def lag(self) -> int | None:
        """Job messages not yet consumed on the assigned partitions, summed; from what
        the consumer knows already (no round trip), ``None`` before it knows anything."""
        consumer = self._consumer
        if consumer is None or not self.joined:
            return None
        total, known = 0, False
        for tp in consumer.position([TopicPartition(t, p) for t, p in self._assigned]):
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if tp.offset >= 0 and high >= 0:
                total += max(0, high - tp.offset)
                known = True
        return total if known or not self._assigned else None

    # -- JobSource ---------------------------------------------------------------------

    def consume(self, timeout: float) -> Delivery | None:
        if not self._buffer:
            if self._in_txn and self._txn_due():
                self._commit()
            self._fetch(FETCH_RECORDS, timeout)
        elif time.monotonic() - self._served >= SERVE_SECONDS:
            # Records are at hand: take what else is there without waiting, which serves
            # the group protocol (a rebalance's revoke may empty or rewind the buffer).
            self._fetch(max(1, FETCH_RECORDS - len(self._buffer)), 0)
        if not self._buffer:
            return None
        msg = self._buffer.popleft()
        return Delivery(
            payload=msg.value() or b"",
            key=msg.key(),
            token=(msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1]),
            headers=headers_of(msg),
        )

    def _fetch(self, limit: int, timeout: float) -> None:
        for msg in ready(self.consumer, limit, timeout):
            err = msg.error()
            if err is None:
                self._buffer.append(msg)
            elif err.fatal():
                raise FatalBrokerError(self.settings.redact(f"consumer: {err.str()}"))
            else:
                log.warning("%s consumer: %s", self.worker_id, err.str())
        self._served = time.monotonic()

    def process(self, fn: Callable[[], T], delivery: Delivery) -> T:
        """Run ``fn()``; a slow task runs off the poll loop, which keeps polling meanwhile.

        Heartbeats come from librdkafka's own thread, so only max.poll.interval.ms bounds
        how long the loop may go without a poll. A task whose last batch was fast runs the
        next one inline: handing a batch to the helper thread and back costs 100-250 µs,
        more than a whole positive-rate batch. One batch slower than FAST_SECONDS sends the
        next ones back through the helper thread. A batch that turns slow while inline
        keeps its transaction open; should it outlast max.poll.interval.ms or
        transaction.timeout.ms, the member's transaction is aborted or fenced and the batch
        is redone (through the helper thread, by then): slower, never wrong.
        """
        t0 = time.monotonic()
        if self._inline:
            try:
                return fn()
            finally:
                self._inline = time.monotonic() - t0 < FAST_SECONDS
        future = self._pool.submit(fn)
        try:
            result = future.result(timeout=INLINE_SECONDS)
        except TimeoutError:
            pass
        else:
            self._inline = time.monotonic() - t0 < FAST_SECONDS
            return result
        # A transaction must not stay open for a long job: the coordinator aborts one that
        # outlives transaction.timeout.ms and the producer is then fenced (fatal), every
        # time the job is redone. Commit what is acked so far first.
        if self._in_txn:
            self._commit()
        consumer = self.consumer
        paused = consumer.assignment()
        consumer.pause(paused)
        log.info("%s: long job at %s; polling while it runs", self.worker_id, delivery.token)
        try:
            while not future.done():
                # Paused partitions deliver nothing; poll serves heartbeats and rebalances.
                for msg in consumer.consume(num_messages=1, timeout=0.2):
                    if msg.error() is None:
                        self._buffer.append(msg)
        finally:
            still = [p for p in paused if (p.topic, p.partition) in self._assigned]
            if still:
                consumer.resume(still)
        return future.result()

    def ack(
        self,
        delivery: Delivery,
        result: bytes | None,
        failed: tuple[bytes, Rejection] | None = None,
    ) -> None:
        topic, partition, offset, _ = delivery.token
        if (topic, partition) not in self._assigned:
            # Revoked while the task ran: the new owner redoes it from the committed offset.
            self.dropped += 1
            return
        run = delivery.headers.get(H_RUN, "").encode()
        try:
            self._begin()
            if result is not None:
                self._produce(
                    self.settings.results_topic,
                    delivery.key,
                    result,
                    [
                        (H_KIND, b"results"),
                        (H_VERSION, b"2"),
                        (H_RUN, run),
                        (H_BATCH, delivery.headers.get(H_BATCH, "").encode()),
                    ],
                )
            if failed is not None:
                payload, rejection = failed
                self._produce(
                    self.settings.dlq_topic,
                    delivery.key,
                    payload,
                    self._dlq_headers(delivery, rejection),
                )
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal() or err.code() != KafkaError._STATE:
                raise
            # The producer refuses to produce although this side began a transaction:
            # librdkafka can leave such a state behind an abort whose in-flight records
            # it purged. A new producer fences this one; the batches are redone.
            self.aborts += 1
            self._replace_producer(f"the producer refused a record ({err.str()})")
            return
        self._offsets[(topic, partition)] = offset + 1
        self._txn_batches += 1
        faults.crash_point("worker.after_produce")
        if self._txn_due():
            self._commit()

    def reject(self, delivery: Delivery, rejection: Rejection) -> None:
        self.ack(delivery, None, (delivery.payload, rejection))

    def checkpoint(self) -> None:
        if self._in_txn:
            self._commit()

    def drained(self) -> bool:
        """True when every assigned partition's committed position is at its end."""
        if self._buffer or self._in_txn:
            return False
        consumer = self.consumer
        assignment = consumer.assignment()
        if not assignment:
            return False
        positions = consumer.position(assignment)
        # A partition this member has consumed nothing from has no position yet (it is
        # set by the first message handed over): on a drained topic that stays so for
        # ever, so the group's committed offset says where it stands instead.
        unknown = [tp for tp in positions if tp.offset < 0]
        committed = (
            {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(unknown, timeout=10)}
            if unknown
            else {}
        )
        for tp in positions:
            # Fetch responses keep the cached high watermark fresh; ask the broker only
            # for partitions never fetched from (a round trip each).
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
            at = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            # No committed offset: auto.offset.reset=earliest starts at the low watermark.
            if max(at, low) < high:
                return False
        return True

    def close(self) -> None:
        try:
            if self._in_txn:
                self._commit()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._consumer is not None:
                self._consumer.close()
            if self._producer is not None:
                self._producer.flush(10)
            self._consumer = self._producer = None

    # -- transactions ------------------------------------------------------------------

    def _dlq_headers(
        self, delivery: Delivery, rejection: Rejection
    ) -> list[tuple[str, str | bytes | None]]:
        topic, partition, offset, timestamp = delivery.token
        fields = {
            "dk-original-topic": topic,
            "dk-original-partition": partition,
            "dk-original-offset": offset,
            "dk-original-timestamp": timestamp,
            "dk-group": self.group,
            "dk-worker": self.worker_id,
            "dk-error-class": rejection.error_class,
            "dk-error": rejection.error,
            "dk-attempts": rejection.attempts,
            "dk-first-failure": f"{rejection.first_failure:.3f}",
            H_KIND: "dead-letter",
            H_RUN: delivery.headers.get(H_RUN, ""),
        }
        out: list[tuple[str, str | bytes | None]] = []
        out.extend((k, str(v).encode()) for k, v in fields.items())
        return out

    def _begin(self) -> None:
        if not self._in_txn:
            self._call(lambda p: p.begin_transaction())
            self._in_txn = True
            self._txn_batches = 0
            self._txn_started = time.monotonic()

    def _txn_due(self) -> bool:
        return self._txn_batches >= self.txn_max_batches or (
            time.monotonic() - self._txn_started >= self.txn_max_seconds
        )

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, str | bytes | None]],
    ) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers)
                return
            except BufferError:
                self.producer.poll(0.1)

    def _commit(self) -> None:
        """Send offsets and commit; retry what is retriable, abort what must be.

        A retriable failure is resumed by repeating the call that failed, not the ones
        before it: once ``send_offsets_to_transaction`` has succeeded, calling it again
        while a commit is in progress is refused as a conflicting call.
        """
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._offsets.items()]
        offsets_sent = not offsets
        deadline = time.monotonic() + 120
        while True:
            try:
                if not offsets_sent:
                    self._call(
                        lambda p: p.send_offsets_to_transaction(
                            offsets, self.consumer.consumer_group_metadata(), TXN_TIMEOUT
                        )
                    )
                    offsets_sent = True
                self._call(lambda p: p.commit_transaction(TXN_TIMEOUT))
                self.committed_batches += self._txn_batches
                break
            except _Wedged:
                self.aborts += 1
                self._replace_producer()
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.retriable() and time.monotonic() < deadline:
                    log.warning("%s: commit failed (%s); retrying", self.worker_id, err.str())
                    time.sleep(0.5)
                    continue
                if err.txn_requires_abort() or err.retriable():
                    log.warning("%s: aborting transaction (%s)", self.worker_id, err.str())
                    self._abort(rewind=True)
                    return
                raise BrokerError(self.settings.redact(f"commit failed: {err.str()}")) from None
        self._in_txn = False
        self._offsets.clear()
        self._txn_batches = 0

    def _abort(self, *, rewind: bool) -> None:
        self.aborts += 1
        # Let the records in flight land first: an abort purges queued ones, and a purged
        # in-flight request can leave the next transaction with a sequence gap.
        self.producer.flush(FLUSH_BEFORE_ABORT)
        deadline = time.monotonic() + 120
        while True:
            try:
                self._call(lambda p: p.abort_transaction(TXN_TIMEOUT))
                break
            except _Wedged:
                self._replace_producer()
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                # A timed-out abort is resumed by calling it again. A producer that cannot
                # abort cannot begin the next transaction either: exit for a restart.
                if err.retriable() and time.monotonic() < deadline:
                    log.warning("%s: abort failed (%s); retrying", self.worker_id, err.str())
                    time.sleep(0.5)
                    continue
                raise FatalBrokerError(
                    self.settings.redact(f"cannot abort a transaction: {err.str()}")
                ) from None
        self._in_txn = False
        self._offsets.clear()
        self._txn_batches = 0
        self._buffer.clear()
        if rewind:
            self._rewind()

    def _rewind(self) -> None:
        """Seek every partition still ours back to its committed offset (redo uncommitted
        work)."""
        consumer = self.consumer
        assignment = [
            tp for tp in consumer.assignment() if (tp.topic, tp.partition) in self._assigned
        ]
        if not assignment:
            return
        deadline = time.monotonic() + 120
        while True:
            try:
                committed = consumer.committed(assignment, timeout=30)
                break
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                # NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS, timeouts: the coordinator
                # moves or loads. Going on without the rewind would skip the aborted
                # batches, so in the end give up (exit for a restart), never go on.
                if err.fatal() or time.monotonic() > deadline:
                    raise FatalBrokerError(
                        self.settings.redact(f"cannot read committed offsets: {err.str()}")
                    ) from None
                log.warning("%s: committed offsets: %s; retrying", self.worker_id, err.str())
                time.sleep(0.5)
        for tp in committed:
            if tp.offset >= 0:
                consumer.seek(tp)
            else:
                consumer.seek(TopicPartition(tp.topic, tp.partition, -2))  # beginning


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
