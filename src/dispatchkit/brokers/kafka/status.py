"""A run's state on Kafka, as the topics and the workers' consumer group hold it.

:func:`status` answers "is my run done, correct, and if not, what is wrong and where?"
from the topics alone (no store needed): the run's manifest, its job messages and its
results (read from the run's creation time on, so older runs in the topics cost
nothing), its dead letters, and the workers' consumer group — members, their
partitions, committed positions. Every count is in jobs: a job split into parts is done
when all of its parts are.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from dispatchkit.brokers.kafka.broker import H_BATCH, H_RUN, KafkaBroker, headers_of, scan
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.errors import DecodeError
from dispatchkit.message import Manifest
from dispatchkit.wire import decode_jobs, decode_results

#: Seconds a partition may hold pending jobs without a result before it is called stalled.
STALL_SECONDS = 30.0
#: The sliding window of the throughput, in seconds.
WINDOW_SECONDS = 10.0
#: Records are read from this long before the run's creation (clocks of hosts differ).
CLOCK_SLACK_MS = 60_000


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
class Member:
    """A member of the workers' consumer group."""

    client_id: str
    host: str
    partitions: list[int] = field(default_factory=list)


@dataclass
class PartitionState:
    """One partition of the jobs topic, as far as the run is concerned."""

    partition: int
    #: Jobs of the run in messages at or after the group's committed position.
    lag: int = 0
    owner: str = ""  # the member assigned the partition now ("": none)
    #: The worker of the newest result of a message of this partition, and its time.
    last_owner: str = ""
    last_result_at: float | None = None
    stalled: bool = False


@dataclass
class RunStatus:
    run_id: str
    manifest: Manifest | None
    #: dispatching, running, stalled, complete, incomplete (or unknown: no manifest).
    state: str = "unknown"
    jobs_total: int = 0
    jobs_done: int = 0
    #: Dead-lettered jobs not done (by a replay) since.
    jobs_dead: int = 0
    jobs_per_second: float = 0.0
    window: float = WINDOW_SECONDS
    eta_seconds: float | None = None
    last_result_at: float | None = None
    partitions: list[PartitionState] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    took: float = 0.0
    #: Records of the jobs and results topics read to answer (of any run).
    records_read: int = 0

    @property
    def lag(self) -> dict[int, int]:
        """Pending jobs per partition of the jobs topic."""
        return {p.partition: p.lag for p in self.partitions}

    @property
    def stalled(self) -> list[PartitionState]:
        return [p for p in self.partitions if p.stalled]

    def to_json(self) -> dict[str, Any]:
        """The status as plain JSON types (``status --json``)."""
        out = asdict(self)
        m = self.manifest
        out["manifest"] = (
            None
            if m is None
            else {
                "status": m.status,
                "task": m.task,
                "rows_read": m.rows_read,
                "rows_dispatched": m.rows_dispatched,
                "rows_quarantined": m.rows_quarantined,
                "total_jobs": m.total_jobs,
                "total_parts": m.total_parts,
                "identity": dict(m.identity),
            }
        )
        return out


def status(
    settings: KafkaSettings,
    run_id: str,
    *,
    window: float = WINDOW_SECONDS,
    stall_seconds: float = STALL_SECONDS,
    now: float | None = None,
    clock_slack_ms: int = CLOCK_SLACK_MS,
) -> RunStatus:
    """The run's state, jobs done of total, dead letters, throughput over the last
    ``window`` seconds (0 when nothing moves), ETA, the workers' group with lag per
    partition, and the partitions stalled (jobs pending, no result for
    ``stall_seconds``) with their last owner."""
    t0 = time.monotonic()
    broker = KafkaBroker(settings)
    manifest = broker.read_manifest(run_id)
    st = RunStatus(run_id=run_id, manifest=manifest, window=window)
    if manifest is None:
        st.took = time.monotonic() - t0
        return st
    now = time.time() if now is None else now
    since = max(0, int(manifest.created_at * 1000) - clock_slack_ms)

    # The run's job messages: per partition, (offset, batch id, job ids).
    messages: dict[int, list[tuple[int, str, list[str]]]] = {}
    for msg in scan(settings, settings.jobs_topic, since_ms=since, check=False):
        st.records_read += 1
        headers = headers_of(msg)
        if headers.get(H_RUN) != run_id:
            continue
        try:
            batch = decode_jobs(msg.value(), validate=False)
        except DecodeError:
            continue
        messages.setdefault(msg.partition() or 0, []).append(
            (msg.offset() or 0, headers.get(H_BATCH, ""), [j.job_id for j in batch.jobs])
        )

    # The run's results: parts per job, when each job was done, by whom each batch.
    parts: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    done_at: dict[str, float] = {}
    batch_result: dict[str, tuple[float, str]] = {}
    for msg in scan(settings, settings.results_topic, since_ms=since, check=False):
        st.records_read += 1
        if headers_of(msg).get(H_RUN) != run_id:
            continue
        try:
            rb = decode_results(msg.value(), validate=False)
        except DecodeError:
            continue
        at = msg.timestamp()[1] / 1000.0
        batch_result[rb.batch_id] = (at, rb.worker)
        for r in rb.results:
            got = parts.setdefault(r.job_id, set())
            got.add(r.part)
            sizes[r.job_id] = r.parts
            if len(got) == r.parts:
                done_at.setdefault(r.job_id, at)
    done = set(done_at)
    st.jobs_total = manifest.total_jobs
    st.jobs_done = len(done)
    st.last_result_at = max(done_at.values(), default=None)
    recent = sum(1 for at in done_at.values() if at >= now - window)
    st.jobs_per_second = recent / window
    dead = broker.dead_jobs(run_id, since_ms=since)
    st.jobs_dead = sum(1 for job in dead if job not in done)

    committed, owners, st.members = _group(settings)
    for p in sorted(set(committed) | set(messages)):
        ps = PartitionState(partition=p, owner=owners.get(p, ""))
        position = committed.get(p, -1)
        for offset, batch_id, jobs in messages.get(p, []):
            if offset >= position:
                ps.lag += sum(1 for j in jobs if j not in done)
            seen = batch_result.get(batch_id)
            if seen is not None and (ps.last_result_at is None or seen[0] > ps.last_result_at):
                ps.last_result_at, ps.last_owner = seen
        quiet_since = ps.last_result_at or manifest.heartbeat_at or manifest.created_at
        ps.stalled = ps.lag > 0 and now - quiet_since > stall_seconds
        st.partitions.append(ps)

    missing = st.jobs_total - st.jobs_done
    if manifest.status != "dispatched":
        st.state = "dispatching"
    elif missing <= 0:
        st.state = "complete"
    elif st.jobs_dead and missing == st.jobs_dead:
        st.state = "incomplete"
    elif st.stalled or now - (st.last_result_at or manifest.created_at) > stall_seconds:
        st.state = "stalled"
    else:
        st.state = "running"
    if missing > 0 and st.jobs_per_second > 0:
        st.eta_seconds = missing / st.jobs_per_second
    st.took = time.monotonic() - t0
    return st


def _group(settings: KafkaSettings) -> tuple[dict[int, int], dict[int, str], list[Member]]:
    """The workers' group: committed offset per jobs partition, owner per partition, and
    its members (client id, host, partitions)."""
    group = worker_group(settings)
    topic = settings.jobs_topic
    admin = AdminClient(settings.client_config())  # type: ignore[arg-type]
    committed: dict[int, int] = {}
    consumer = Consumer(settings.client_config(**{"group.id": group}))
    try:
        md = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if md is not None and md.error is None:
            tps = [TopicPartition(topic, p) for p in sorted(md.partitions)]
            for tp in consumer.committed(tps, timeout=10):
                committed[tp.partition] = tp.offset
    finally:
        consumer.close()
    owners: dict[int, str] = {}
    members: list[Member] = []
    try:
        described = admin.describe_consumer_groups([group], request_timeout=10)[group].result(15)
    except KafkaException:
        return committed, owners, members
    for m in described.members:
        mine = sorted(
            tp.partition
            for tp in (m.assignment.topic_partitions if m.assignment else [])
            if tp.topic == topic
        )
        members.append(Member(client_id=m.client_id, host=m.host, partitions=mine))
        for p in mine:
            owners[p] = m.client_id
    members.sort(key=lambda m: m.client_id)
    return committed, owners, members
