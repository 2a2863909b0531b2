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
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from dispatchkit import wire
from dispatchkit.brokers.kafka.broker import H_BATCH, H_RUN, KafkaBroker, headers_of, scan
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.dispatcher import Outgoing
from dispatchkit.errors import DecodeError, UsageError
from dispatchkit.keys import key_text

if TYPE_CHECKING:
    from dispatchkit.app import App

#: The end of a replayed batch's id.
REPLAY_SUFFIX = ".replay"


@dataclass
class DeadLetterEntry:
    offset: int
    headers: dict[str, str]
    record_key: bytes = b""
    message: wire.JobMessage | None = None
    jobs: list[wire.JobEntry] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # each job's key as text
    payload_error: str = ""

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
    """Dead letters, optionally of one run and/or holding one of ``keys`` (key text, as
    listed, or any single key value such as a country)."""
    out = []
    for msg in scan(settings, settings.dlq_topic):
        headers = headers_of(msg)
        if run_id is not None and headers.get(H_RUN) != run_id:
            continue
        entry = DeadLetterEntry(offset=msg.offset(), headers=headers, record_key=msg.key() or b"")
        try:
            entry.message = wire.decode_jobs(msg.value() or b"")
        except DecodeError as exc:
            entry.payload_error = str(exc)[:120]
        else:
            entry.jobs = list(entry.message.jobs)
            dicts = entry.message.keys().to_pylist()
            entry.keys = [key_text(k) for k in dicts]
            if keys:
                wanted = set(keys)
                picked = [
                    i
                    for i, (k, d) in enumerate(zip(entry.keys, dicts, strict=True))
                    if k in wanted or any(str(v) in wanted for v in d.values())
                ]
                entry.jobs = [entry.jobs[i] for i in picked]
                entry.keys = [entry.keys[i] for i in picked]
        if keys and not entry.jobs:
            continue
        out.append(entry)
    return out


def replay(
    settings: KafkaSettings,
    *,
    run_id: str | None = None,
    keys: list[str] | None = None,
    app: App | None = None,
) -> tuple[int, int]:
    """Republish dead-lettered jobs neither done nor already replayed and pending; returns
    (replayed, skipped), counted per dead-lettered job (a payload that is no job message
    counts as skipped).

    Given the ``app`` the workers run, jobs made by another app, or by other code of it
    (another fingerprint), are refused before anything is published: no worker of that
    deployment would take them.
    """
    entries = list_dead(settings, run_id=run_id, keys=keys)
    if app is not None:
        _check_app(entries, app)
    runs = {e.headers.get(H_RUN, "") for e in entries if e.jobs}
    done = {r: _done_parts(settings, r) for r in runs}
    replays = {r: _replayed_parts(settings, r) for r in runs}
    failures: Counter[tuple[str, str, int]] = Counter(
        (e.headers.get(H_RUN, ""), job.job_id, job.part) for e in entries for job in e.jobs
    )
    broker = KafkaBroker(settings)
    replayed = skipped = 0
    sent: set[tuple[str, str, int]] = set()
    try:
        for e in entries:
            run = e.headers.get(H_RUN, "")
            if e.message is None:
                skipped += 1
                continue
            for job in e.jobs:
                key = (run, job.job_id, job.part)
                pending = failures[key] <= replays.get(run, Counter())[job.job_id, job.part]
                if (job.job_id, job.part) in done.get(run, set()) or key in sent or pending:
                    skipped += 1
                    continue
                sent.add(key)
                broker.run_id = run
                broker.publish(_one_job(e.message, job, e.record_key))
                replayed += 1
        broker.flush()
    finally:
        broker.close()
    return replayed, skipped


def _check_app(entries: list[DeadLetterEntry], app: App) -> None:
    for e in entries:
        m = e.message
        if m is not None and e.jobs and (m.app, m.fingerprint) != (app.name, app.fingerprint):
            raise UsageError(
                f"dead letters of run {m.run_id!r} were made by app {m.app!r} {m.fingerprint}; "
                f"--app gives {app.name!r} {app.fingerprint}: replay them with the run's app, "
                "or rerun the run with the new one"
            )


def _one_job(msg: wire.JobMessage, job: wire.JobEntry, record_key: bytes) -> Outgoing:
    """A message of one dead-lettered job part, as the dispatcher would have cut it."""
    rows: Any = msg.table.slice(job.start, job.end - job.start)
    batch_id = f"{job.job_id}.{job.part}{REPLAY_SUFFIX}"
    payload = wire.encode_jobs(
        run_id=msg.run_id,
        batch_id=batch_id,
        app=msg.app,
        task=msg.task,
        fingerprint=msg.fingerprint,
        key_names=msg.key_names,
        key_types=msg.key_types,
        jobs=[wire.JobEntry(job.job_id, job.part, job.parts, 0, job.end - job.start, job.key)],
        table=pa.Table.from_batches([rows]),
    )
    return Outgoing(
        payload=payload,
        key=record_key,
        batch_id=batch_id,
        index=wire.decode_jobs(payload).index,
        rows=job.end - job.start,
    )


def _replayed_parts(settings: KafkaSettings, run_id: str) -> Counter[tuple[str, int]]:
    """How often each ``(job_id, part)`` of the run has been replayed onto the jobs topic."""
    out: Counter[tuple[str, int]] = Counter()
    for value in _run_values(settings, settings.jobs_topic, run_id, REPLAY_SUFFIX):
        try:
            msg = wire.decode_jobs(value, validate=False)
        except DecodeError:
            continue
        out.update((j.job_id, j.part) for j in msg.jobs)
    return out


def _done_parts(settings: KafkaSettings, run_id: str) -> set[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    for value in _run_values(settings, settings.results_topic, run_id):
        try:
            msg = wire.decode_results(value, validate=False)
        except DecodeError:
            continue
        out.update((r.job_id, r.part) for r in msg.results)
    return out


def _run_values(
    settings: KafkaSettings, topic: str, run_id: str, batch_suffix: str = ""
) -> Iterator[bytes]:
    """The record values of ``run_id`` on ``topic`` whose batch id ends in ``batch_suffix``."""
    for msg in scan(settings, topic):
        headers = headers_of(msg)
        if headers.get(H_RUN) != run_id or not headers.get(H_BATCH, "").endswith(batch_suffix):
            continue
        yield msg.value() or b""
