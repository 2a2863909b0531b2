"""A run's state on Kafka, as the topics and the workers' consumer group hold it."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition

from dispatchkit.brokers.kafka.broker import H_RUN, KafkaBroker, headers_of, scan
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.errors import DecodeError
from dispatchkit.message import Manifest
from dispatchkit.wire import decode_results


def worker_group(settings: KafkaSettings) -> str:
    """The workers' consumer group."""
    return f"{settings.topic_prefix}.workers"


def collector_group(settings: KafkaSettings, run_id: str) -> str:
    """The collector consumer's ``group.id``: librdkafka wants one, but the collector
    never joins it and commits nothing to it (its positions are in its store)."""
    return f"{settings.topic_prefix}.collector.{run_id}"


def dead_jobs(settings: KafkaSettings, run_id: str, check: bool = True) -> dict[str, str]:
    """``job id → "key: error"`` of a run's dead-lettered jobs."""
    return KafkaBroker(settings).dead_jobs(run_id, check=check)


@dataclass
class RunStatus:
    run_id: str
    manifest: Manifest | None
    jobs_done: int
    jobs_dead: int
    lag: dict[int, int]
    jobs_per_second: float


def status(settings: KafkaSettings, run_id: str, window: float = 10.0) -> RunStatus:
    """Jobs total and done, dead letters, worker lag per partition, recent throughput."""
    broker = KafkaBroker(settings)
    manifest = broker.read_manifest(run_id)
    parts: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    stamps: list[tuple[float, int]] = []
    for msg in scan(settings, settings.results_topic):
        if headers_of(msg).get(H_RUN) != run_id:
            continue
        try:
            rb = decode_results(msg.value(), validate=False)
        except DecodeError:
            continue
        for r in rb.results:
            parts.setdefault(r.job_id, set()).add(r.part)
            sizes[r.job_id] = r.parts
        stamps.append((msg.timestamp()[1] / 1000.0, len(rb.results)))
    done = sum(1 for j, p in parts.items() if len(p) == sizes[j])
    newest = max((t for t, _ in stamps), default=0.0)
    recent = sum(n for t, n in stamps if t >= newest - window)
    consumer = Consumer(settings.client_config(**{"group.id": worker_group(settings)}))
    lag: dict[int, int] = {}
    try:
        md = consumer.list_topics(settings.jobs_topic, timeout=10).topics[settings.jobs_topic]
        tps = [TopicPartition(settings.jobs_topic, p) for p in sorted(md.partitions)]
        for tp in consumer.committed(tps, timeout=10):
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            lag[tp.partition] = high - (tp.offset if tp.offset >= 0 else low)
    finally:
        consumer.close()
    return RunStatus(
        run_id=run_id,
        manifest=manifest,
        jobs_done=done,
        jobs_dead=len(dead_jobs(settings, run_id)),
        lag=lag,
        jobs_per_second=recent / window if stamps else 0.0,
    )
