"""A worker's consumer-group member on a real broker: a worker joining gets its share
while another one is busy with records it has already fetched, a producer that refuses
records is replaced without losing or repeating a result, and the group protocol that
``run`` picks for its workers."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Producer

from dispatchkit.brokers.kafka.broker import ensure_topics
from dispatchkit.brokers.kafka.protocol import choose, run_protocol
from dispatchkit.brokers.kafka.source import KafkaJobSource

from .kafka_helpers import bootstrap, new_settings, read_all


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_joining_worker_gets_partitions_while_the_other_still_has_records_fetched(
    protocol: str,
) -> None:
    settings = new_settings(partitions=4)
    ensure_topics(settings)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i in range(400):
        producer.produce(settings.jobs_topic, key=f"k{i}".encode(), value=b"job", partition=i % 4)
    assert producer.flush(30) == 0

    group = f"{settings.topic_prefix}.workers"
    a = KafkaJobSource(settings, group=group, worker_id="a", group_protocol=protocol)
    b = KafkaJobSource(settings, group=group, worker_id="b", group_protocol=protocol)
    b_partitions: list[int] = []
    # Times the first worker, holding every partition, had no fetched record left once
    # the second one started.
    dry = [0]
    dry_then: list[int] = []
    stop = threading.Event()

    def second_worker() -> None:
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            delivery = b.consume(0.2)
            if delivery is not None:
                b.ack(delivery, b"result")
            if b.consumer.assignment() and not b_partitions:
                b_partitions.extend(p.partition for p in b.consumer.assignment())
                dry_then.append(dry[0])
                return

    try:
        handled = 0
        deadline = time.monotonic() + 90
        started: threading.Thread | None = None
        while time.monotonic() < deadline and not b_partitions:
            if started is not None and not a._buffer and len(a._assigned) == 4:
                dry[0] += 1  # (a revoke empties the buffer too: that is not running dry)
            delivery = a.consume(1.0)
            if delivery is None:
                if started is not None and not started.is_alive():
                    break
                continue
            if started is None and len(a._buffer) >= 50:
                # a holds every partition and has records fetched: b starts
                assert len(a.consumer.assignment()) == 4
                started = threading.Thread(target=second_worker)
                started.start()
            time.sleep(0.05)  # a slow task: 400 records are 20 s of work for one worker
            a.ack(delivery, b"result")
            handled += 1
        stop.set()
        if started is not None:
            started.join(30)
        assert b_partitions, "the second worker never got a partition"
        # It got them while the first one was still busy with what it had fetched: the
        # group was served between batches, not once the fetched records ran out.
        assert dry_then == [0]
        assert handled < 400
        assert not set(b_partitions) & {p.partition for p in a.consumer.assignment()}
    finally:
        stop.set()
        a.close()
        b.close()


def test_a_producer_refusing_records_is_replaced_and_the_batch_redone() -> None:
    settings = new_settings(partitions=1)
    ensure_topics(settings)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i in range(3):
        producer.produce(settings.jobs_topic, key=b"k", value=f"job{i}".encode())
    assert producer.flush(30) == 0
    source = KafkaJobSource(settings, group=f"{settings.topic_prefix}.workers", worker_id="w")
    offsets: list[int] = []  # in the order they were delivered
    try:
        deadline = time.monotonic() + 60
        broke = False
        while 2 not in offsets and time.monotonic() < deadline:
            delivery = source.consume(1.0)
            if delivery is None:
                continue
            offset = delivery.token[2]
            offsets.append(offset)
            if offset == 1 and not broke:
                # As librdkafka can leave it after a purging abort: this side thinks a
                # transaction is open, the producer has none and refuses the record.
                source.checkpoint()
                source._in_txn = True
                broke = True
            source.ack(delivery, f"result{offset}".encode())
        source.checkpoint()
        assert offsets == [0, 1, 1, 2]  # the refused batch came again
        assert source.aborts == 1
    finally:
        source.close()
    # The refused batch was redone: each job has exactly one committed result.
    results = sorted(r.value() for r in read_all(settings, settings.results_topic))
    assert results == [b"result0", b"result1", b"result2"]


def test_run_picks_kip_848_on_the_test_cluster() -> None:
    # scripts/kafka offers the consumer protocol with a 10 s session timeout.
    settings = new_settings()
    assert run_protocol(settings) == "consumer"


def test_run_keeps_the_classic_protocol_when_it_cannot_read_the_broker() -> None:
    bootstrap()  # a Kafka test: skipped the same way as the others without a broker
    settings = new_settings(servers="127.0.0.1:1")
    assert run_protocol(settings, timeout=1.0) == "classic"


@pytest.mark.parametrize(
    ("protocols", "session_ms", "expected"),
    [
        ("classic,consumer", "10000", "consumer"),
        ("classic,consumer,streams", "5000", "consumer"),
        ("classic, consumer", "10000", "consumer"),
        ("classic,consumer", "45000", "classic"),  # a stock broker: crashes recover slower
        ("classic", "10000", "classic"),  # no KIP-848
        (None, "10000", "classic"),
        ("classic,consumer", None, "classic"),
        ("classic,consumer", "ten", "classic"),
        ("consumers", "10000", "classic"),
    ],
)
def test_the_protocol_choice(protocols: str | None, session_ms: str | None, expected: str) -> None:
    assert choose(protocols, session_ms) == expected
