"""The Kafka broker: topics, the dispatcher's producer and the collector's consumer.

Topics (``<prefix>`` is ``--topic-prefix``, default ``dispatchkit``):

``<prefix>.jobs``       job batches, keyed ``country|YYYY-MM-DD`` so one job key always
                        lands in one partition; ``--partitions`` partitions (default 12).
``<prefix>.results``    result batches, written by workers inside transactions.
``<prefix>.manifests``  one compacted record per run (key = run id): totals and status.
``<prefix>.dlq``        dead letters: original key and value, failure in the headers.

Topics are created with the AdminClient and waited for; nothing relies on the broker's
auto-creation. The producer is idempotent (``acks=all``), batches and compresses; every
delivery report is checked and a failed one fails the dispatch. The collector reads with
``isolation.level=read_committed``, so records of aborted worker transactions are never
seen; it assigns the results partitions itself (no group) and its store keeps its
positions, written with the results they read.

Clients are created lazily: constructing a :class:`KafkaBroker` touches no network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from dispatchkit.brokers.base import Broker
from dispatchkit.brokers.kafka.consume import ready, watermarks
from dispatchkit.brokers.kafka.manifests import ManifestLog
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.claim import holder_of
from dispatchkit.errors import BrokerError, DecodeError, DeliveryError, FatalBrokerError
from dispatchkit.message import Manifest, decode, encode
from dispatchkit.wire import WIRE_VERSION, ResultMessage, decode_jobs, decode_results

if TYPE_CHECKING:
    from dispatchkit.dispatcher import Outgoing
from dispatchkit.positions import ReadPositions

log = logging.getLogger(__name__)

#: Header names of every dispatchkit record (values are UTF-8 text).
H_KIND, H_VERSION, H_RUN, H_BATCH = "dk-kind", "dk-v", "dk-run", "dk-batch"

PRODUCER_DEFAULTS: dict[str, object] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "message.max.bytes": 1_000_000,
    "queue.buffering.max.kbytes": 262_144,
}


def headers_of(msg: Any) -> dict[str, str]:
    """A record's headers as a dict of text (undecodable values become ``''``)."""
    out: dict[str, str] = {}
    for key, value in msg.headers() or []:
        try:
            out[key] = value.decode() if isinstance(value, bytes) else str(value or "")
        except UnicodeDecodeError:
            out[key] = ""
    return out


def wrap_kafka_error(exc: KafkaException, what: str, redact: Callable[[str], str]) -> BrokerError:
    err = exc.args[0] if exc.args else None
    text = err.str() if isinstance(err, KafkaError) else str(exc)
    return BrokerError(redact(f"{what}: {text}"))


#: Codes that end a client whatever flag they carry: librdkafka answers every call after a
#: fatal error with ``_FATAL`` (the original error, flagged fatal, is reported once).
_FATAL_CODES = {KafkaError._FATAL, KafkaError.FENCED_INSTANCE_ID}


def is_fatal(err: KafkaError) -> bool:
    """Whether a client that got ``err`` cannot go on (retrying would loop for ever)."""
    return bool(err.fatal()) or err.code() in _FATAL_CODES


def consumer_error(err: KafkaError, what: str, redact: Callable[[str], str] = str) -> BrokerError:
    """One line for a consumer error: :class:`FatalBrokerError` if it is fatal."""
    text = " ".join(err.str().split())
    cls = FatalBrokerError if is_fatal(err) else BrokerError
    return cls(redact(f"{what}: Kafka consumer failed: {text}"))


_AUTH_ERRORS = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED}


def _is_tls_failure(err: KafkaError) -> bool:
    # librdkafka reports a failed TLS handshake (untrusted or mismatched certificate,
    # protocol mismatch) as _SSL; a bare disconnect during the handshake is _TRANSPORT
    # and may be transient, so only a certificate failure counts there.
    return err.code() == KafkaError._SSL or (
        err.code() == KafkaError._TRANSPORT and "certificate verify failed" in err.str()
    )


def connect(settings: KafkaSettings, timeout: float = 15.0) -> AdminClient:
    """An AdminClient that has reached the cluster; fails fast and clearly on bad
    credentials or a failed TLS handshake."""
    errors: list[KafkaError] = []
    admin = AdminClient(settings.client_config(error_cb=errors.append))  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.list_topics(timeout=1.0)
            return admin
        except KafkaException as exc:
            errors.append(exc.args[0])
        admin.poll(0.1)  # serves error_cb, where authentication and TLS failures arrive
        auth = [e for e in errors if e.code() in _AUTH_ERRORS]
        if auth:
            raise BrokerError(
                settings.redact(f"Kafka authentication failed: {auth[-1].str()}")
            ) from None
        tls = [e for e in errors if _is_tls_failure(e)]
        if tls:
            raise BrokerError(
                settings.redact(f"Kafka TLS handshake failed: {tls[-1].str()}")
            ) from None
        if time.monotonic() > deadline:
            last = errors[-1].str() if errors else "no answer"
            raise BrokerError(
                settings.redact(
                    f"cannot reach Kafka at {settings.bootstrap_servers} "
                    f"within {timeout:.0f} s: {last}"
                )
            ) from None


def ensure_topics(settings: KafkaSettings, timeout: float = 30.0) -> None:
    """Create the four topics if missing and wait until their leaders are known."""
    admin = connect(settings)
    rf = settings.replication_factor
    wanted = {
        settings.jobs_topic: NewTopic(settings.jobs_topic, settings.partitions, rf),
        settings.results_topic: NewTopic(settings.results_topic, settings.partitions, rf),
        settings.manifests_topic: NewTopic(
            settings.manifests_topic, 1, rf, config={"cleanup.policy": "compact"}
        ),
        settings.dlq_topic: NewTopic(settings.dlq_topic, 1, rf),
    }
    deadline = time.monotonic() + timeout
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise wrap_kafka_error(exc, "cannot list topics", settings.redact) from None
    missing = [t for name, t in wanted.items() if name not in existing]
    if missing:
        for name, fut in admin.create_topics(missing, operation_timeout=timeout).items():
            try:
                fut.result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise wrap_kafka_error(
                        exc, f"cannot create topic {name}", settings.redact
                    ) from None
    while True:
        md = admin.list_topics(timeout=max(1.0, deadline - time.monotonic())).topics
        ready = all(
            name in md
            and md[name].error is None
            and md[name].partitions
            and all(p.leader >= 0 for p in md[name].partitions.values())
            for name in wanted
        )
        if ready:
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"topics {sorted(wanted)} did not become ready in {timeout:.0f} s")
        time.sleep(0.2)


class KafkaBroker(Broker):
    """The dispatcher's and the collector's side of Kafka."""

    #: A read of the manifests topic costs a round trip (:class:`ManifestLog`): cheap
    #: enough that a collector notices a run's dispatch, and its end, at once.
    manifest_interval = 0.25

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        collector_group: str | None = None,
        start_positions: ReadPositions | None = None,
    ) -> None:
        self.settings = settings
        self.collector_group = collector_group
        # The store is the truth: the collector starts where its store got to (absent
        # positions: from the beginning), whatever any other collector has read.
        self.start_positions = start_positions
        self._next: dict[int, int] = dict(start_positions.offsets) if start_positions else {}
        self._assigned: set[int] = set()
        self._topic_id_now: str | None = None
        self._fatal: list[KafkaError] = []
        self._admin: AdminClient | None = None
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._failures: list[str] = []
        self.delivered = 0
        self.run_id: str | None = None
        self._manifests: ManifestLog | None = None

    # -- producing ---------------------------------------------------------------------

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            ensure_topics(self.settings)
            self._producer = Producer(
                self.settings.client_config(**{**PRODUCER_DEFAULTS, **self._producer_overrides()})
            )
        return self._producer

    def warm_up(self) -> None:
        """Connect, create the topics and start the producer, whose connection and
        idempotence PID librdkafka then sets up in the background: round trips a caller
        can overlap with other work (the dispatcher: with validating its input)."""
        _ = self.producer

    def _producer_overrides(self) -> dict[str, object]:
        # Options given by the user for producers win over the defaults.
        keys = set(PRODUCER_DEFAULTS) & set(self.settings.options)
        return {k: self.settings.client_config()[k] for k in keys}

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._failures.append(
                f"{msg.topic()}[{msg.partition()}] key {msg.key()!r}: {err.str()}"
            )
        else:
            self.delivered += 1

    def _produce(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, str | bytes | None]]
    ) -> None:
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self.producer.poll(0.1)
            except KafkaException as exc:
                raise wrap_kafka_error(
                    exc, f"cannot produce to {topic}", self.settings.redact
                ) from None
        self.producer.poll(0)
        if self._failures:
            raise DeliveryError(self.settings.redact(f"delivery failed: {self._failures[0]}"))

    def open_run(self, manifest: Manifest) -> None:
        self.run_id = manifest.run_id
        # Waited for: a rerun after a crash must find the run's manifest and the parts
        # already published, or it publishes every job again (results stay exact, but the
        # results topic would carry repeated records).
        self._publish_manifest(manifest)

    def publish(self, message: Outgoing) -> None:
        assert self.run_id is not None, "open_run() first"
        self._produce(
            self.settings.jobs_topic,
            message.key,
            message.payload,
            [
                (H_KIND, b"jobs"),
                (H_VERSION, str(WIRE_VERSION).encode()),
                (H_RUN, self.run_id.encode()),
                (H_BATCH, message.batch_id.encode()),
            ],
        )

    def close_run(self, manifest: Manifest) -> None:
        self.flush()
        self._publish_manifest(manifest)

    def _publish_manifest(self, manifest: Manifest, *, wait: bool = True) -> None:
        self._produce(
            self.settings.manifests_topic,
            manifest.run_id.encode(),
            encode(manifest),
            [(H_KIND, b"manifest"), (H_VERSION, b"1"), (H_RUN, manifest.run_id.encode())],
        )
        if wait:
            self.flush()

    def flush(self, timeout: float = 120.0) -> None:
        """Wait for every delivery report; raise if any failed or any is still queued."""
        if self._producer is None:
            return
        left = self._producer.flush(timeout)
        if self._failures:
            raise DeliveryError(
                self.settings.redact(
                    f"{len(self._failures)} message(s) not delivered; first: {self._failures[0]}"
                )
            )
        if left:
            raise DeliveryError(f"{left} message(s) still queued after {timeout:.0f} s")

    # -- collecting --------------------------------------------------------------------
    #
    # The collector joins no consumer group and commits nothing to Kafka: it assigns the
    # results topic's partitions itself and starts each at the position its store holds
    # (the beginning for a partition the store has not read). Its positions are written
    # by the store, in the transaction of the results they read (``read_positions``).
    # So a collector's state belongs to its store: collectors into other directories, at
    # once or in turn, cannot move it.

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            if self.collector_group is None:
                raise BrokerError("this broker was not opened for collecting")
            ensure_topics(self.settings)
            self._consumer = Consumer(
                self.settings.client_config(
                    **{
                        # librdkafka needs a group.id; it is never joined (assign, not
                        # subscribe) and no offset is ever committed to it.
                        "group.id": self.collector_group,
                        "enable.auto.commit": False,
                        "enable.auto.offset.store": False,
                        "auto.offset.reset": "earliest",
                        "isolation.level": "read_committed",
                        "enable.partition.eof": False,
                        "error_cb": self._on_client_error,
                    }
                )
            )
            self._assign_partitions()
        return self._consumer

    def _on_client_error(self, err: KafkaError) -> None:
        if is_fatal(err):
            self._fatal.append(err)

    def _topic_id(self) -> str | None:
        topic = self.settings.results_topic
        try:
            if self._admin is None:
                self._admin = AdminClient(self.settings.client_config())  # type: ignore[arg-type]
            futures = self._admin.describe_topics(TopicCollection([topic]), request_timeout=10)
            return str(futures[topic].result(15).topic_id)
        except Exception as exc:  # an older broker, a broker restarting: offsets alone
            log.info("collector: cannot describe %s (%s)", topic, exc)
            return None

    def _assign_partitions(self) -> None:
        """Assign the results topic's partitions not assigned yet: at the stored position,
        or from the beginning. The first time, positions that cannot belong to this topic
        (another topic id, beyond a partition's end, a partition that is gone) mean the
        topic was recreated or lost records: said in one line, and it is read again from
        the beginning (the store keeps one row per job part, so re-reading is harmless)."""
        consumer = self._consumer
        assert consumer is not None
        topic = self.settings.results_topic
        try:
            md = consumer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as exc:
            if is_fatal(exc.args[0]):
                raise consumer_error(
                    exc.args[0], f"cannot read {topic}", self.settings.redact
                ) from None
            log.warning("collector: cannot list %s (%s); trying again", topic, exc.args[0])
            return
        if md is None or md.error is not None or not md.partitions:
            log.warning("collector: topic %s has no partitions yet; trying again", topic)
            return
        new = sorted(set(md.partitions) - self._assigned)
        if not new:
            return
        start = self.start_positions
        if not self._assigned and start is not None and start.offsets:
            why = self._stale_positions(consumer, start, set(md.partitions))
            if why:
                log.warning(
                    "collector: the positions stored for run %s on %s do not fit it (%s): "
                    "the topic was recreated or lost records; reading it again from the "
                    "beginning",
                    start.run_id,
                    topic,
                    why,
                )
                start = None
            self._next = dict(start.offsets) if start is not None else {}
        if self._topic_id_now is None:
            self._topic_id_now = self._topic_id()
        stored = start.offsets if start is not None else {}
        if self._assigned:
            log.info("collector: %s has new partitions %s", topic, new)
        tps = [TopicPartition(topic, p, stored.get(p, OFFSET_BEGINNING)) for p in new]
        consumer.incremental_assign(tps)
        self._assigned.update(new)

    def _stale_positions(
        self, consumer: Consumer, start: ReadPositions, partitions: set[int]
    ) -> str | None:
        current = self._topic_id_now = self._topic_id()
        if start.topic_id and current and start.topic_id != current:
            return f"topic id {current}, stored {start.topic_id}"
        for p, offset in sorted(start.offsets.items()):
            if p not in partitions:
                return f"partition {p} is gone"
            low, high = watermarks(consumer, TopicPartition(start.topic, p), 10.0)
            if offset > high:
                return f"partition {p}: stored {offset}, end {high}"
            if offset < low:
                log.warning(
                    "collector: %s[%d] records %d to %d were deleted before they were "
                    "collected; their results are lost to this store",
                    start.topic,
                    p,
                    offset,
                    low - 1,
                )
        return None

    def refresh_partitions(self) -> None:
        """Assign partitions added to the results topic since the last call."""
        if self._consumer is not None:
            self._assign_partitions()

    def read_positions(self) -> ReadPositions:
        """The next offset of every partition read, for the store to write with the results
        read up to there (:meth:`ResultStore.flush`)."""
        return ReadPositions(
            run_id=self.run_id or "",
            topic=self.settings.results_topic,
            offsets=dict(self._next),
            topic_id=self._topic_id_now,
        )

    def results(self, timeout: float) -> list[ResultMessage]:
        out: list[ResultMessage] = []
        try:
            msgs = ready(self.consumer, 1000, timeout)
        except KafkaException as exc:
            raise consumer_error(exc.args[0], "collector", self.settings.redact) from None
        if self._fatal:
            raise consumer_error(self._fatal[0], "collector", self.settings.redact)
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if is_fatal(err):
                    raise consumer_error(err, "collector", self.settings.redact)
                log.warning("collector: %s", err.str())
                continue
            # Every record handed out is either buffered below or not a result of the run:
            # the store may say it is read once the buffer is flushed.
            self._next[msg.partition() or 0] = (msg.offset() or 0) + 1
            headers = headers_of(msg)
            if self.run_id is not None and headers.get(H_RUN) != self.run_id:
                continue
            try:
                rb = decode_results(msg.value() or b"")
            except DecodeError as exc:
                log.error(
                    "skipping undecodable result %s[%d]@%d: %s",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    exc,
                )
                continue
            if self.run_id is None or rb.run_id == self.run_id:
                out.append(rb)
        return out

    def commit_results(self) -> None:
        """Nothing to commit on Kafka: the collector's positions are stored with its
        results (:meth:`read_positions`, :meth:`ResultStore.flush`)."""

    def positions(self) -> ReadPositions | None:
        """The collector's positions (:meth:`read_positions`) once it reads results."""
        return self.read_positions() if self._consumer is not None else None

    def refresh(self) -> None:
        self.refresh_partitions()

    def dead_jobs(
        self, run_id: str, *, check: bool = False, since_ms: int | None = None
    ) -> dict[str, str]:
        """``job id → "key: error"`` of the run's jobs in the dead-letter topic (of its
        records from ``since_ms`` on, when given)."""
        out: dict[str, str] = {}
        topic = self.settings.dlq_topic
        for msg in scan(self.settings, topic, timeout=15, check=check, since_ms=since_ms):
            headers = headers_of(msg)
            if headers.get(H_RUN) != run_id:
                continue
            try:
                batch = decode_jobs(msg.value(), validate=False)
            except DecodeError:
                continue
            why = f"{headers.get('dk-error-class', '?')}: {headers.get('dk-error', '')}"
            out.update({job: f"{key}: {why}" for job, key in batch.key_texts().items()})
        return out

    # -- reading whole topics ----------------------------------------------------------

    def read_manifest(self, run_id: str, timeout: float = 10.0) -> Manifest | None:
        """The run's manifest, or ``None``: its ``dispatched`` one once there is one (a
        late dispatcher's claim may follow it), else the latest."""
        held = holder_of(self.run_manifests(run_id, timeout))
        return held.dispatched or held.latest

    def run_manifests(self, run_id: str, timeout: float = 10.0) -> list[Manifest]:
        """Every manifest of a run in log order (one key, so one partition: one order)."""
        if self._manifests is None:
            self._manifests = ManifestLog(self.settings, lambda: connect(self.settings))
        try:
            values = self._manifests.values(run_id.encode(), timeout)
        except KafkaException as exc:
            raise wrap_kafka_error(
                exc, f"cannot read {self.settings.manifests_topic}", self.settings.redact
            ) from None
        out: list[Manifest] = []
        for value in values:
            try:
                out.append(decode(value, Manifest))
            except DecodeError:
                continue
        return out

    def publish_manifest(self, manifest: Manifest, *, wait: bool = True) -> None:
        """Append a manifest (a claim, a heartbeat); ``wait`` for its delivery."""
        self._publish_manifest(manifest, wait=wait)

    def published_parts(self, run_id: str) -> set[tuple[str, int]]:
        """``(job_id, part)`` of every job part of a run already in the jobs topic."""
        seen: set[tuple[str, int]] = set()
        for msg in scan(self.settings, self.settings.jobs_topic):
            if headers_of(msg).get(H_RUN) != run_id:
                continue
            try:
                batch = decode_jobs(msg.value(), validate=False)
            except DecodeError:
                continue
            seen.update(zip(batch.job_ids, batch.part.tolist(), strict=True))
        return seen

    def close(self) -> None:
        try:
            if self._producer is not None:
                self._producer.flush(30)
        finally:
            if self._consumer is not None:
                self._consumer.close()
            if self._manifests is not None:
                self._manifests.close()
            self._producer = self._consumer = self._manifests = None


def scan(
    settings: KafkaSettings,
    topic: str,
    *,
    timeout: float = 30.0,
    committed_only: bool = True,
    check: bool = True,
    since_ms: int | None = None,
) -> Iterable[Any]:
    """Every record of a topic, from the beginning to the current end, without a group.

    ``since_ms`` (epoch milliseconds) starts each partition at its first record of that
    time or later instead, so a scan for one run skips the runs before it. ``check``
    first makes sure the cluster answers (a clear error for bad credentials); callers
    that scan repeatedly check once.
    """
    try:
        yield from _scan(settings, topic, timeout, committed_only, check, since_ms)
    except KafkaException as exc:
        raise wrap_kafka_error(exc, f"cannot read {topic}", settings.redact) from None


def _scan(
    settings: KafkaSettings,
    topic: str,
    timeout: float,
    committed_only: bool,
    check: bool,
    since_ms: int | None = None,
) -> Iterable[Any]:
    if check:
        connect(settings)
    consumer = Consumer(
        settings.client_config(
            **{
                "group.id": "dispatchkit-scan",
                "enable.auto.commit": False,
                "isolation.level": "read_committed" if committed_only else "read_uncommitted",
                "enable.partition.eof": False,
            }
        )
    )
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            return
        ends: dict[int, int] = {}
        assignment = []
        for p in md.partitions:
            low, high = watermarks(consumer, TopicPartition(topic, p), timeout)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        if since_ms is not None and assignment:
            found = consumer.offsets_for_times(
                [TopicPartition(topic, tp.partition, since_ms) for tp in assignment], timeout
            )
            assignment = []
            for tp in found:
                # -1: no record that new in the partition; nothing to read there.
                if tp.offset < 0 or tp.offset >= ends[tp.partition]:
                    ends.pop(tp.partition, None)
                else:
                    assignment.append(TopicPartition(topic, tp.partition, tp.offset))
        if not assignment:
            return
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in ready(consumer, 1000, 0.5):
                if msg.error():
                    continue
                yield msg
                p = msg.partition()
                if p in ends and (msg.offset() or 0) + 1 >= ends[p]:
                    del ends[p]
            # Transaction markers take offsets too: the position tells when we are past them.
            for p in list(ends):
                pos = consumer.position([TopicPartition(topic, p)])[0].offset
                if pos >= ends[p]:
                    del ends[p]
        if ends:
            raise BrokerError(f"could not read {topic} to its end within {timeout:.0f} s")
    finally:
        consumer.close()
