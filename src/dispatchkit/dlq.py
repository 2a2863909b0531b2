"""Dead letters on Kafka: list them, and replay the jobs among them.

A dead letter keeps the original record's key and value; its headers say where it came
from and why it failed (docs/wire-format.md). Replaying publishes the dead-lettered jobs
of a run again — as fresh job batches on the jobs topic, batch id ``<job>.<part>.replay``
— unless their results are on the results topic already; workers then treat them like
any other job, and the collector completes the run.

Replay is safe to repeat. A job part has had one attempt from the dispatch plus one per
replay published, and each dead letter of it records one attempt that failed; it is
replayed again only when every attempt so far has been dead-lettered. A replay still
pending (or running) is left alone, so two replays in a row publish a job once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from dispatchkit.brokers.kafka.broker import H_BATCH, H_RUN, KafkaBroker, headers_of, scan
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.dispatcher import iso_hour
from dispatchkit.errors import DecodeError
from dispatchkit.message import SCHEMA_VERSION, Job, JobBatch, ResultBatch, decode

#: The end of a replayed batch's id.
REPLAY_SUFFIX = ".replay"

B = TypeVar("B", JobBatch, ResultBatch)


@dataclass
class DeadLetterEntry:
    offset: int
    headers: dict[str, str]
    jobs: list[Job] = field(default_factory=list)
    payload_error: str = ""

    @property
    def keys(self) -> list[str]:
        return [f"{j.country} {iso_hour(j.date_hour)}" for j in self.jobs]

    def describe(self) -> str:
        h = self.headers
        what = ", ".join(self.keys[:5]) + (" …" if len(self.keys) > 5 else "")
        if not self.jobs:
            what = f"undecodable payload ({self.payload_error})"
        return (
            f"@{self.offset} run={h.get(H_RUN) or '?'} "
            f"from={h.get('dk-original-topic')}[{h.get('dk-original-partition')}]"
            f"@{h.get('dk-original-offset')} attempts={h.get('dk-attempts')} "
            f"error={h.get('dk-error-class')}: {h.get('dk-error')} jobs: {what}"
        )


def list_dead(
    settings: KafkaSettings, *, run_id: str | None = None, keys: list[str] | None = None
) -> list[DeadLetterEntry]:
    """Dead letters, optionally of one run and/or holding one of ``keys``."""
    out = []
    for msg in scan(settings, settings.dlq_topic):
        headers = headers_of(msg)
        if run_id is not None and headers.get(H_RUN) != run_id:
            continue
        entry = DeadLetterEntry(offset=msg.offset(), headers=headers)
        try:
            entry.jobs = decode(msg.value() or b"", JobBatch).jobs
        except DecodeError as exc:
            entry.payload_error = str(exc)[:120]
        if keys:
            entry.jobs = [j for j, k in zip(entry.jobs, entry.keys, strict=True) if k in keys]
            if not entry.jobs:
                continue
        out.append(entry)
    return out


def replay(
    settings: KafkaSettings, *, run_id: str | None = None, keys: list[str] | None = None
) -> tuple[int, int]:
    """Republish dead-lettered jobs neither done nor already replayed and pending; returns
    (replayed, skipped), counted per dead-lettered job (a payload that is no job batch
    counts as skipped)."""
    entries = list_dead(settings, run_id=run_id, keys=keys)
    runs = {e.headers.get(H_RUN, "") for e in entries if e.jobs}
    done = {r: _done_parts(settings, r) for r in runs}
    replays = {r: _replayed_parts(settings, r) for r in runs}
    failures: Counter[tuple[str, str, int]] = Counter(
        (e.headers.get(H_RUN, ""), job.job_id, job.part) for e in entries for job in e.jobs
    )
    broker = KafkaBroker(settings)
    tasks = {r: _task_of(broker, r) for r in runs}
    replayed = skipped = 0
    sent: set[tuple[str, str, int]] = set()
    try:
        for e in entries:
            run = e.headers.get(H_RUN, "")
            task = tasks.get(run, "positive-rate")
            fresh = []
            for job in e.jobs:
                key = (run, job.job_id, job.part)
                pending = failures[key] <= replays.get(run, Counter())[job.job_id, job.part]
                if (job.job_id, job.part) in done.get(run, set()) or key in sent or pending:
                    skipped += 1
                    continue
                sent.add(key)
                fresh.append(job)
            if not e.jobs:
                skipped += 1
            for job in fresh:
                broker.publish(
                    JobBatch(
                        v=SCHEMA_VERSION,
                        run_id=run,
                        batch_id=f"{job.job_id}.{job.part}{REPLAY_SUFFIX}",
                        task=task,
                        jobs=[job],
                    )
                )
                replayed += 1
        broker.flush()
    finally:
        broker.close()
    return replayed, skipped


def _task_of(broker: KafkaBroker, run_id: str) -> str:
    manifest = broker.read_manifest(run_id)
    return manifest.task if manifest is not None else "positive-rate"


def _replayed_parts(settings: KafkaSettings, run_id: str) -> Counter[tuple[str, int]]:
    """How often each ``(job_id, part)`` of the run has been replayed onto the jobs topic."""
    batches = _run_batches(settings, settings.jobs_topic, run_id, JobBatch, REPLAY_SUFFIX)
    return Counter((j.job_id, j.part) for batch in batches for j in batch.jobs)


def _done_parts(settings: KafkaSettings, run_id: str) -> set[tuple[str, int]]:
    batches = _run_batches(settings, settings.results_topic, run_id, ResultBatch)
    return {(r.job_id, r.part) for batch in batches for r in batch.results}


def _run_batches(
    settings: KafkaSettings, topic: str, run_id: str, kind: type[B], batch_suffix: str = ""
) -> Iterator[B]:
    """The decodable batches of ``run_id`` on ``topic`` whose batch id ends in
    ``batch_suffix``."""
    for msg in scan(settings, topic):
        headers = headers_of(msg)
        if headers.get(H_RUN) != run_id or not headers.get(H_BATCH, "").endswith(batch_suffix):
            continue
        try:
            yield decode(msg.value(), kind)
        except DecodeError:
            continue
