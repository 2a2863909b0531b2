"""Runs on Kafka: dispatch, work, collect, status — the library behind the Kafka commands.

Each function is what one CLI command does. They share the embedded run's pieces
(:func:`~dispatchkit.runner.prepare`, the store, :func:`~dispatchkit.runner.finish`), so
a Kafka run writes the same files, the same way, as an embedded one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import msgspec

from dispatchkit import faults
from dispatchkit.brokers.kafka import H_RUN, KafkaBroker, headers_of, scan
from dispatchkit.brokers.kafka_worker import KafkaJobSource, default_worker_id
from dispatchkit.config import KafkaSettings, Secret
from dispatchkit.dispatcher import Dispatcher, iso_hour
from dispatchkit.errors import RunError
from dispatchkit.message import SCHEMA_VERSION, JobBatch, Manifest, ResultBatch, decode
from dispatchkit.progress import Bars
from dispatchkit.runner import STORE_NAME, RunSpec, RunSummary, finish, prepare, prepare_run_id
from dispatchkit.store import ResultStore
from dispatchkit.worker import RetryPolicy, Worker, WorkerStats, run

log = logging.getLogger(__name__)


def worker_group(settings: KafkaSettings) -> str:
    return f"{settings.topic_prefix}.workers"


def collector_group(settings: KafkaSettings, run_id: str) -> str:
    return f"{settings.topic_prefix}.collector.{run_id}"


# -- dispatch ---------------------------------------------------------------------------


def dispatch(spec: RunSpec, settings: KafkaSettings, bars: Bars | None = None) -> RunSummary:
    """Publish a run's manifest and jobs; a rerun publishes only what is missing."""
    bars = bars or Bars(enabled=False)
    t0 = time.perf_counter()
    prep = prepare(spec)
    summary = RunSummary(run_id=prep.run_id, jobs=prep.total_jobs)
    summary.rows_read, summary.rows_valid = prep.counts.rows_read, prep.counts.rows_valid
    summary.rows_quarantined, summary.bad_rows = prep.counts.rows_bad, dict(prep.counts.bad)
    broker = KafkaBroker(settings)
    with prep.reader:
        try:
            existing = broker.read_manifest(prep.run_id)
            if existing is not None and existing.input_fingerprint != prep.fingerprint:
                raise RunError(
                    f"run {prep.run_id!r} was dispatched from different input; "
                    "choose another --run-id"
                )
            if existing is not None and existing.status == "dispatched":
                log.info("run %s was dispatched already; nothing to publish", prep.run_id)
                summary.jobs_skipped = existing.total_jobs
                summary.status = "dispatched"
                return summary
            published = broker.published_parts(prep.run_id) if existing else set()
            manifest = Manifest(
                v=SCHEMA_VERSION,
                run_id=prep.run_id,
                status="dispatching",
                task=spec.task,
                input_fingerprint=prep.fingerprint,
                rows_read=prep.counts.rows_read,
                rows_dispatched=prep.counts.rows_valid,
                rows_quarantined=prep.counts.rows_bad,
                total_jobs=prep.total_jobs,
                created_at=existing.created_at if existing else time.time(),
            )
            broker.open_run(manifest)
            dispatcher = Dispatcher(
                prep.reader,
                run_id=prep.run_id,
                task=spec.task,
                max_message_bytes=spec.max_message_bytes,
            )
            bars.add("dispatch", prep.counts.rows_valid, "rows")
            for batch in dispatcher.batches(
                skip_parts=published, on_rows=lambda n: bars.advance("dispatch", n)
            ):
                broker.publish(batch)
                faults.crash_point("dispatch.mid_publish")
            stats = dispatcher.stats
            if stats.rows_cut != prep.counts.rows_valid:
                raise RunError(
                    f"internal check failed: {stats.rows_cut} rows cut, "
                    f"{prep.counts.rows_valid} valid"
                )
            broker.close_run(
                msgspec.structs.replace(
                    manifest,
                    status="dispatched",
                    total_parts=stats.parts,
                    total_batches=stats.batches,
                )
            )
        finally:
            broker.close()
    summary.jobs_sent = stats.jobs_sent
    summary.split_jobs = stats.split_jobs
    summary.batches = stats.batches
    summary.jobs_skipped = len({(c, h) for c, h, _ in published})
    summary.status = "dispatched"
    summary.seconds["dispatch"] = time.perf_counter() - t0
    return summary


# -- worker -----------------------------------------------------------------------------


@dataclass
class WorkerOptions:
    group: str | None = None
    worker_id: str | None = None
    burst: bool = False
    group_protocol: str = "classic"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    session_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000
    idle_exit_seconds: float = 15.0


def work(settings: KafkaSettings, options: WorkerOptions) -> WorkerStats:
    """Be a consumer-group member until SIGTERM/SIGINT (or drained, with ``burst``)."""
    worker_id = options.worker_id or default_worker_id()
    source = KafkaJobSource(
        settings,
        group=options.group or worker_group(settings),
        worker_id=worker_id,
        group_protocol=options.group_protocol,
        session_timeout_ms=options.session_timeout_ms,
        max_poll_interval_ms=options.max_poll_interval_ms,
    )
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("worker %s: signal %d, finishing the current job", worker_id, signum)
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    idle_since = [time.monotonic()]

    def should_stop() -> bool:
        return bool(stopping)

    def on_batch(_: int) -> None:
        idle_since[0] = time.monotonic()

    try:
        if options.burst:
            original = source.drained

            def drained() -> bool:
                if original():
                    return True
                # A member with no partitions (more workers than partitions) idles out.
                return (
                    not source.consumer.assignment()
                    and time.monotonic() - idle_since[0] > options.idle_exit_seconds
                )

            source.drained = drained  # type: ignore[method-assign]
        stats = run(
            source,
            Worker(worker_id, options.retry),
            should_stop=should_stop,
            burst=options.burst,
            on_batch=on_batch,
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info(
        "worker %s: %d batches, %d jobs, %d rejected, %d aborts",
        worker_id,
        stats.batches,
        stats.jobs,
        stats.rejected,
        source.aborts,
    )
    return stats


# -- collect ----------------------------------------------------------------------------


def collect(
    settings: KafkaSettings,
    run_id: str,
    out: Path,
    *,
    bars: Bars | None = None,
    report: bool = True,
    timeout: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    dead_grace: float = 5.0,
) -> RunSummary:
    """Store a run's results until its manifest's jobs are all done, then export them.

    Ends early, as ``incomplete``, when every missing job is dead-lettered and no result
    has arrived for ``dead_grace`` seconds; ``timeout`` ends it after that many seconds
    without progress.
    """
    bars = bars or Bars(enabled=False)
    t0 = time.perf_counter()
    summary = RunSummary(run_id=run_id)
    manifest: Manifest | None = None
    last_manifest_check = last_flush = last_dlq_check = 0.0
    dead: dict[str, str] = {}
    last_progress = time.monotonic()
    with ResultStore(out / STORE_NAME) as store:
        done = store.jobs_done(run_id)
        broker = KafkaBroker(
            settings,
            collector_group=collector_group(settings, run_id),
            from_beginning=store.get_run(run_id) is None,
        )
        broker.run_id = run_id
        try:
            bars.add("collect", None, "jobs")
            while True:
                now = time.monotonic()
                if on_tick is not None:
                    on_tick()
                if (manifest is None or manifest.status != "dispatched") and (
                    now - last_manifest_check > 2.0
                ):
                    manifest = broker.read_manifest(run_id)
                    last_manifest_check = now
                    if manifest is not None:
                        store.start_run(run_id, manifest.input_fingerprint, "kafka", manifest.task)
                        bars.update("collect", total=manifest.total_jobs)
                for rb in broker.results(0.5):
                    store.add(rb.run_id, rb.worker, rb.results)
                if store.buffered and (store.buffered >= 20_000 or now - last_flush > 1.0):
                    store.flush()
                    faults.crash_point("collector.after_store")
                    broker.commit_results()
                    last_flush = now
                    new_done = store.jobs_done(run_id)
                    if new_done != done:
                        last_progress = now
                    done = new_done
                    bars.update("collect", completed=done)
                    if on_progress is not None and manifest is not None:
                        on_progress(done, manifest.total_jobs)
                if manifest is not None and manifest.status == "dispatched":
                    # Dead letters only matter once results stop coming.
                    if now - last_dlq_check > 3.0 and now - last_progress > 1.0:
                        dead = dead_jobs(settings, run_id, check=False)
                        last_dlq_check = now
                    missing = manifest.total_jobs - done
                    if missing == 0:
                        break
                    # Every missing job is dead-lettered and nothing has moved for a while
                    # (a replay in flight would): the run ends incomplete.
                    if (
                        dead
                        and not store.buffered
                        and now - last_progress > dead_grace
                        and missing == _dead_not_done(store, run_id, dead)
                    ):
                        break
                if timeout is not None and now - last_progress > timeout:
                    summary.status = "timed out"
                    break
            store.flush()
            broker.commit_results()
        finally:
            broker.close()
        if manifest is None:
            raise RunError(f"run {run_id!r} has no manifest: was it dispatched?")
        summary.jobs = manifest.total_jobs
        summary.rows_read = manifest.rows_read
        summary.rows_valid = manifest.rows_dispatched
        summary.rows_quarantined = manifest.rows_quarantined
        summary.duplicates_ignored = store.duplicates
        finish(store, run_id, manifest.task, out, report=report, summary=summary)
        done_keys = store.done_keys(run_id)
        summary.failed_jobs = sorted(
            f"{key}: {why}" for key, why in dead.items() if _key_tuple(key) not in done_keys
        )
        if summary.status != "timed out":
            summary.status = (
                "complete" if summary.jobs_done == manifest.total_jobs else "incomplete"
            )
        store.update_run(
            run_id,
            status=summary.status,
            rows_read=manifest.rows_read,
            rows_dispatched=manifest.rows_dispatched,
            rows_quarantined=manifest.rows_quarantined,
            total_jobs=manifest.total_jobs,
            total_parts=manifest.total_parts,
        )
    summary.files["store"] = out / STORE_NAME
    summary.seconds["collect"] = time.perf_counter() - t0
    return summary


def _key(country: str, date_hour: int) -> str:
    return f"{country} {iso_hour(date_hour)}"


def _key_tuple(key: str) -> tuple[str, int]:
    from datetime import datetime

    country, _, hour = key.rpartition(" ")
    return (country, int(datetime.fromisoformat(hour.replace("Z", "+00:00")).timestamp()))


def _dead_not_done(store: ResultStore, run_id: str, dead: dict[str, str]) -> int:
    done = store.done_keys(run_id)
    return sum(1 for k in dead if _key_tuple(k) not in done)


def dead_jobs(settings: KafkaSettings, run_id: str, check: bool = True) -> dict[str, str]:
    """``"country hour" → error`` of a run's dead-lettered jobs."""
    out: dict[str, str] = {}
    for msg in scan(settings, settings.dlq_topic, timeout=15, check=check):
        headers = headers_of(msg)
        if headers.get(H_RUN) != run_id:
            continue
        try:
            batch = decode(msg.value(), JobBatch)
        except Exception:
            continue
        for job in batch.jobs:
            out[_key(job.country, job.date_hour)] = (
                f"{headers.get('dk-error-class', '?')}: {headers.get('dk-error', '')}"
            )
    return out


# -- status -----------------------------------------------------------------------------


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
    from confluent_kafka import Consumer, TopicPartition

    broker = KafkaBroker(settings)
    manifest = broker.read_manifest(run_id)
    parts: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    stamps: list[tuple[float, int]] = []
    for msg in scan(settings, settings.results_topic):
        if headers_of(msg).get(H_RUN) != run_id:
            continue
        rb = decode(msg.value(), ResultBatch)
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


# -- run (all in one) -------------------------------------------------------------------


def worker_env(settings: KafkaSettings) -> dict[str, str]:
    """Environment that hands these settings to a child process (secrets stay off argv)."""
    env = dict(os.environ)
    env["DISPATCHKIT_BOOTSTRAP_SERVERS"] = settings.bootstrap_servers
    for key, value in settings.options.items():
        name = "DISPATCHKIT_KAFKA_" + key.upper().replace(".", "_")
        env[name] = value.get() if isinstance(value, Secret) else value
    return env


def spawn_worker(
    settings: KafkaSettings, worker_id: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``dispatchkit worker`` as a separate OS process."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dispatchkit",
            "worker",
            "-q",
            "--topic-prefix",
            settings.topic_prefix,
            "--partitions",
            str(settings.partitions),
            "--worker-id",
            worker_id,
            *extra,
        ],
        env=env or worker_env(settings),
    )


def run_kafka(spec: RunSpec, settings: KafkaSettings, bars: Bars | None = None) -> RunSummary:
    """Dispatcher, ``spec.workers`` worker processes and the collector, on one machine."""
    bars = bars or Bars(enabled=False)
    t0 = time.perf_counter()
    from dispatchkit.brokers.kafka import ensure_topics

    ensure_topics(settings)
    extra = ("--attempts", str(spec.retry.attempts))
    slots = [f"{os.getpid()}-{i}" for i in range(spec.workers)]
    procs = [spawn_worker(settings, slot, *extra) for slot in slots]
    restarts = [0]

    def supervise() -> None:
        # Like any supervisor: a worker that exits is restarted in its slot.
        for i, p in enumerate(procs):
            if p.poll() is not None:
                restarts[0] += 1
                if restarts[0] > 10 * spec.workers:
                    raise RunError(f"workers keep exiting (last exit code {p.returncode})")
                log.warning("worker %s exited with %s; restarting it", slots[i], p.returncode)
                procs[i] = spawn_worker(settings, slots[i], *extra)

    # The dispatcher runs in its own process so the collector stores results meanwhile.
    pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
    try:
        run_id = prepare_run_id(spec)
        dispatching = pool.submit(dispatch, spec, settings)

        def tick() -> None:
            supervise()
            if dispatching.done() and dispatching.exception() is not None:
                raise dispatching.exception()  # type: ignore[misc]

        summary = collect(settings, run_id, spec.out, bars=bars, report=spec.report, on_tick=tick)
        sent = dispatching.result()
        summary.worker_restarts = restarts[0]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    summary.rows_read, summary.rows_valid = sent.rows_read, sent.rows_valid
    summary.rows_quarantined, summary.bad_rows = sent.rows_quarantined, sent.bad_rows
    summary.jobs_sent, summary.jobs_skipped = sent.jobs_sent, sent.jobs_skipped
    summary.split_jobs, summary.batches = sent.split_jobs, sent.batches
    summary.seconds["dispatch"] = sent.seconds.get("dispatch", 0.0)
    summary.seconds["total"] = time.perf_counter() - t0
    summary.files["quarantine.parquet"] = spec.out / "quarantine.parquet"
    return summary
