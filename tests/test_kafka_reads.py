"""Reading Kafka without waiting for records that are not coming (a real broker)."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from dispatchkit.brokers.kafka.broker import KafkaBroker, connect, ensure_topics
from dispatchkit.brokers.kafka.consume import ready
from dispatchkit.brokers.kafka.manifests import ManifestLog
from dispatchkit.message import Manifest, RunStatus, decode

from .kafka_helpers import new_settings


def _manifest(run_id: str, status: RunStatus = "dispatching", owner: str = "a") -> Manifest:
    return Manifest(
        v=1, run_id=run_id, status=status, task="positive-rate", input_fingerprint="f", owner=owner
    )


def test_ready_takes_what_there_is_without_waiting_out_the_timeout() -> None:
    settings = new_settings(partitions=1)
    ensure_topics(settings)
    topic = settings.jobs_topic
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i in range(3):
        producer.produce(topic, key=b"k", value=str(i).encode())
    assert producer.flush(30) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"t-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        got: list[bytes] = []
        t0 = time.monotonic()
        # Asked for up to 1000 with 3 on their way: consume(1000, 60) would block 60 s.
        while len(got) < 3 and time.monotonic() - t0 < 60:
            got += [m.value() for m in ready(consumer, 1000, 60.0) if m.error() is None]
        assert got == [b"0", b"1", b"2"]
        assert time.monotonic() - t0 < 60  # returned with the records, not at the timeout
        assert ready(consumer, 1000, 0.0) == []  # nothing more, and no wait at all
        t1 = time.monotonic()
        assert ready(consumer, 1000, 0.3) == []
        assert time.monotonic() - t1 >= 0.25  # with nothing coming, it does wait
    finally:
        consumer.close()


def test_the_manifest_log_reads_to_the_end_each_time_and_keeps_log_order() -> None:
    settings = new_settings(partitions=1)
    broker = KafkaBroker(settings)
    log = ManifestLog(settings, lambda: connect(settings))
    try:
        assert log.values(b"run-a", 10) == []  # the topic may not even exist yet
        broker.publish_manifest(_manifest("run-a", owner="first"))
        broker.publish_manifest(_manifest("run-b"))
        first = [decode(v, Manifest) for v in log.values(b"run-a", 10)]
        assert [m.owner for m in first] == ["first"]
        # Appended after the first read: seen by the next one, after the earlier ones.
        broker.publish_manifest(_manifest("run-a", status="dispatched", owner="first"))
        broker.publish_manifest(_manifest("run-a", owner="second"))
        again = broker.run_manifests("run-a")  # the broker's own log, created now
        assert [(m.status, m.owner) for m in again] == [
            ("dispatching", "first"),
            ("dispatched", "first"),
            ("dispatching", "second"),
        ]
        assert len(log.values(b"run-a", 10)) == 3
        assert len(log.values(b"run-b", 10)) == 1
        assert log.values(b"run-c", 10) == []
        # Each later read costs one offsets request: nothing is appended, nothing waits
        # behind the consumer's own fetch (that wait was 0.5 s a read).
        t0 = time.monotonic()
        for _ in range(10):
            assert len(broker.run_manifests("run-a")) == 3
        assert time.monotonic() - t0 < 5.0
    finally:
        log.close()
        broker.close()
