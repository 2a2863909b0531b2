"""Helpers for tests on a real broker: settings per test, plain-client readers, processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pyarrow as pa
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from dispatchkit.brokers.kafka.settings import KafkaSettings

from .conftest import IN_CI

REPO = Path(__file__).resolve().parents[1]


def bootstrap() -> str:
    servers = os.environ.get("DISPATCHKIT_BOOTSTRAP_SERVERS", "")
    if not servers:
        if IN_CI:
            pytest.fail("DISPATCHKIT_BOOTSTRAP_SERVERS is not set: CI must run Kafka tests")
        pytest.skip("no Kafka broker (run the tests with `make test`)")
    return servers


def new_settings(servers: str | None = None, partitions: int = 6, **options: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=servers or bootstrap(),
        options=dict(options),
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        partitions=partitions,
    )


def _watermarks(c: Consumer, tp: TopicPartition, wait: float = 60.0) -> tuple[int, int]:
    """A partition's low and high offsets, asked again while the cluster is degraded (a killed
    broker can still be named leader in metadata a few seconds after the run ends)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            low, high = c.get_watermark_offsets(tp, timeout=10, cached=False)
            return int(low), int(high)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def read_all(settings: KafkaSettings, topic: str, *, committed: bool = True) -> Iterator[object]:
    """Every record of a topic with a plain confluent-kafka consumer (no dispatchkit code)."""
    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"check-{uuid.uuid4().hex}",
            "isolation.level": "read_committed" if committed else "read_uncommitted",
            "enable.auto.commit": False,
        }
    )
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        parts = sorted(md.partitions)
        ends = {}
        for p in parts:
            low, high = _watermarks(c, TopicPartition(topic, p))
            if high > low:
                ends[p] = high
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            for msg in c.consume(500, timeout=0.5):
                if msg.error() is None:
                    yield msg
            for p in list(ends):
                if c.position([TopicPartition(topic, p)])[0].offset >= ends[p]:
                    del ends[p]
        assert not ends, f"could not read {topic} to the end"
    finally:
        c.close()


def committed_result_job_ids(settings: KafkaSettings, run_id: str) -> Counter[tuple[str, int]]:
    """(job_id, part) → how many committed result records carry it, decoded with msgpack
    and pyarrow (no dispatchkit code)."""
    counts: Counter[tuple[str, int]] = Counter()
    for msg in read_all(settings, settings.results_topic):
        batch = msgpack.unpackb(msg.value())  # type: ignore[attr-defined]
        if batch["run_id"] != run_id:
            continue
        counts.update(index_entries(batch["index"]))
    return counts


def index_entries(index: bytes) -> list[tuple[str, int]]:
    """(job_id, part) of each row of a message's Arrow index, read with plain pyarrow."""
    table = pa.ipc.open_stream(index).read_all()
    return list(zip(table["job_id"].to_pylist(), table["part"].to_pylist(), strict=True))


def cli(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "dispatchkit", *args]


def kafka_args(settings: KafkaSettings) -> list[str]:
    return [
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--topic-prefix",
        settings.topic_prefix,
        "--partitions",
        str(settings.partitions),
    ]


def start(
    args: list[str], env: dict[str, str] | None = None, **kw: object
) -> subprocess.Popen[str]:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.Popen(
        cli(*args),
        env=full,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kw,  # type: ignore[call-overload]
    )


def stop(
    procs: list[subprocess.Popen[str]], sig: int = signal.SIGTERM, timeout: float = 60
) -> list[int]:
    """Signal every process still running, wait, and return the exit codes (pipes closed)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    codes = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode not in (0, -signal.SIGKILL, -9, 137):
            print(f"process {p.args} exited {p.returncode}: {err[-2000:]}")
        codes.append(p.returncode)
    return codes
