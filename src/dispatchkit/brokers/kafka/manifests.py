"""The manifests topic, read from its beginning once and then only what was appended.

A dispatcher claiming a run and a collector waiting for its manifest read the topic
again and again. A fresh scan each time costs a new client, its connection and a
metadata round trip; :class:`ManifestLog` keeps one consumer assigned to the topic and
its records so far, so each read costs one offsets request and whatever was appended
since. Every read reaches the end the topic had when the read began, like a scan from
the beginning would; only the (compacted) topic's history is kept in memory, a few
hundred bytes a manifest.

The ends come from an admin client, not from the consumer: a consumer's offsets
request waits behind its own fetch, which the broker holds up to ``fetch.wait.max.ms``
(500 ms) when there is nothing new.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, IsolationLevel, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from dispatchkit.brokers.kafka.consume import ready, watermarks
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.errors import BrokerError


class ManifestLog:
    """Every record of the manifests topic, by key, in log order (see the module)."""

    def __init__(self, settings: KafkaSettings, connect: Callable[[], AdminClient]) -> None:
        self.settings = settings
        # An admin client that has reached the cluster (a clear error for bad credentials).
        self._connect = connect
        self._consumer: Consumer | None = None
        self._admin: AdminClient | None = None
        self._partitions: list[int] = []
        self._next: dict[int, int] = {}  # the offset to read next, per partition
        self._by_key: dict[bytes, list[bytes]] = {}

    def values(self, key: bytes, timeout: float) -> list[bytes]:
        """The values of ``key``'s records up to the topic's current end, oldest first."""
        self._catch_up(timeout)
        return list(self._by_key.get(key, ()))

    def _open(self, timeout: float) -> Consumer | None:
        topic = self.settings.manifests_topic
        admin = self._connect()
        consumer = Consumer(
            self.settings.client_config(
                **{
                    "group.id": "dispatchkit-scan",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": False,
                }
            )
        )
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:  # not created yet: nothing to read
            consumer.close()
            return None
        self._partitions = sorted(md.partitions)
        for p in self._partitions:  # before assign: no fetch in flight to wait behind
            low, _ = watermarks(consumer, TopicPartition(topic, p), timeout)
            self._next[p] = low
        self._admin = admin
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in self._partitions])
        return consumer

    def _catch_up(self, timeout: float) -> None:
        if self._consumer is None:
            self._consumer = self._open(timeout)
            if self._consumer is None:
                return
        consumer, topic = self._consumer, self.settings.manifests_topic
        ends = {p: high for p, high in self._ends(timeout).items() if self._next[p] < high}
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in ready(consumer, 1000, 0.5):
                if msg.error():
                    continue
                p, offset = msg.partition() or 0, msg.offset() or 0
                if offset < self._next.get(p, 0):
                    continue  # read already
                self._next[p] = offset + 1
                self._by_key.setdefault(msg.key() or b"", []).append(msg.value() or b"")
                if p in ends and offset + 1 >= ends[p]:
                    del ends[p]
            # Transaction markers take offsets too: the position tells when we are past them.
            for p in list(ends):
                pos = consumer.position([TopicPartition(topic, p)])[0].offset
                if pos >= ends[p]:
                    self._next[p] = max(self._next.get(p, 0), pos)
                    del ends[p]
        if ends:
            raise BrokerError(f"could not read {topic} to its end within {timeout:.0f} s")

    def _ends(self, timeout: float) -> dict[int, int]:
        """Each partition's end for a ``read_committed`` reader (its last stable offset)."""
        assert self._admin is not None
        topic = self.settings.manifests_topic
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        futures = self._admin.list_offsets(
            {TopicPartition(topic, p): latest for p in self._partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=timeout,
        )
        return {tp.partition: int(f.result().offset) for tp, f in futures.items()}

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = self._admin = None
