"""The collector: results from Kafka into the store until a run is done; run status.

:func:`collect` reads result batches (``read_committed``, so aborted worker transactions
are never seen) and stores them together with its read positions, in one store
transaction: the store alone says where its collector goes on, so collectors into other
directories (at once or in turn) cannot move it, and a crash anywhere re-reads at most
what the store does not hold. It stops when the run's manifest says every job is done,
or, as ``incomplete``, when every missing job is dead-lettered. A run with no manifest is
waited for ``wait_for_dispatch`` seconds, then refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from dispatchkit import faults
from dispatchkit.app import App, load_app
from dispatchkit.brokers.kafka.broker import H_RUN, KafkaBroker, headers_of, scan
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.cli.progress import Bars
from dispatchkit.errors import BrokerError, DecodeError, FatalBrokerError, RunError
from dispatchkit.identity import check_identity
from dispatchkit.keys import key_text
from dispatchkit.message import Manifest
from dispatchkit.outdir import holds_out_dir
from dispatchkit.runner import STORE_NAME, RunSummary, finish
from dispatchkit.store import ResultStore
from dispatchkit.wire import decode_jobs, decode_results

log = logging.getLogger(__name__)


def worker_group(settings: KafkaSettings) -> str:
    return f"{settings.topic_prefix}.workers"


def collector_group(settings: KafkaSettings, run_id: str) -> str:
    """The collector consumer's ``group.id``: librdkafka wants one, but the collector
    never joins it and commits nothing to it (its positions are in its store)."""
    return f"{settings.topic_prefix}.collector.{run_id}"


#: How long ``collect`` waits for a run's manifest by default.
WAIT_FOR_DISPATCH = 60.0


@holds_out_dir("collect")  # one collector per --out: the store is single-writer
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
    wait_for_dispatch: float | None = WAIT_FOR_DISPATCH,
    identity: Mapping[str, str] | None = None,
    app: App | None = None,
) -> RunSummary:
    """Store a run's results until its manifest's jobs are all done, then export them.

    Ends early, as ``incomplete``, when every missing job is dead-lettered and no result
    has arrived for ``dead_grace`` seconds; ``timeout`` ends it after that many seconds
    without progress. With no manifest of the run after ``wait_for_dispatch`` seconds
    (``None`` or 0: wait for ever) it raises :class:`RunError`. Given an ``identity``
    (the run this process means to make), a run dispatched with another one is refused.
    """
    the_app = app if app is not None else load_app(None)
    bars = bars or Bars(enabled=False)
    t0 = time.perf_counter()
    summary = RunSummary(run_id=run_id)
    manifest: Manifest | None = None
    last_manifest_check = last_flush = last_dlq_check = 0.0
    dead: dict[str, str] = {}
    last_progress = waiting_since = last_partition_check = time.monotonic()
    said_waiting = False
    with ResultStore(out / STORE_NAME) as store:
        done = 0  # counted once the run is started in the store (its manifest read)
        broker = KafkaBroker(
            settings,
            collector_group=collector_group(settings, run_id),
            start_positions=store.read_positions(run_id, settings.results_topic),
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
                    try:
                        manifest = broker.read_manifest(run_id)
                    except FatalBrokerError:
                        raise
                    except BrokerError as exc:  # a broker restarting: try again later
                        log.warning("collector: %s", exc)
                    last_manifest_check = now
                    if manifest is not None:
                        if identity is not None:
                            check_identity(
                                run_id, manifest.run_identity(), identity, where="dispatched"
                            )
                        _check_app(run_id, manifest, the_app)
                        store.start_run(
                            run_id,
                            manifest.run_identity(),
                            "kafka",
                            app=the_app,
                            task=the_app.get_task(manifest.task),
                        )
                        done = store.jobs_done(run_id)
                        bars.update("collect", total=manifest.total_jobs)
                    else:
                        waited = now - waiting_since
                        if wait_for_dispatch and waited > wait_for_dispatch:
                            raise RunError(
                                f"run {run_id!r} was not dispatched: no manifest on "
                                f"{settings.manifests_topic} after {wait_for_dispatch:.0f} s "
                                "(check --run-id and --topic-prefix, or wait longer with "
                                "--wait-for-dispatch; 0 waits for ever)"
                            )
                        if not said_waiting:
                            said_waiting = True
                            bound = (
                                f"up to {wait_for_dispatch:.0f} s"
                                if wait_for_dispatch
                                else "for as long as it takes"
                            )
                            log.warning(
                                "collector: waiting %s for run %r to be dispatched "
                                "(its manifest on %s)",
                                bound,
                                run_id,
                                settings.manifests_topic,
                            )
                if now - last_partition_check > 5.0:
                    broker.refresh_partitions()  # partitions added to the results topic
                    last_partition_check = now
                if manifest is None:
                    # Results can only be stored once the run is started from its
                    # manifest: until then they wait in the topic.
                    time.sleep(0.2)
                else:
                    for rb in broker.results(0.5):
                        store.add(rb)
                if store.buffered and (store.buffered >= 20_000 or now - last_flush > 1.0):
                    # The results and the positions they were read up to, in one transaction.
                    store.flush(broker.read_positions())
                    faults.crash_point("collector.after_store")
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
                        try:
                            dead = dead_jobs(settings, run_id, check=False)
                        except FatalBrokerError:
                            raise
                        except BrokerError as exc:  # a broker restarting: try again later
                            log.warning("collector: %s", exc)
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
            store.flush(broker.read_positions())
        finally:
            broker.close()
        if manifest is None:
            raise RunError(
                f"run {run_id!r} was not dispatched: no manifest on "
                f"{settings.manifests_topic} after {time.monotonic() - waiting_since:.0f} s "
                "(--timeout)"
            )
        summary.jobs = manifest.total_jobs
        summary.rows_read = manifest.rows_read
        summary.rows_valid = manifest.rows_dispatched
        summary.rows_quarantined = manifest.rows_quarantined
        summary.duplicates_ignored = store.duplicates
        done_ids = store.done_jobs(run_id)
        summary.failed_jobs = sorted(why for job, why in dead.items() if job not in done_ids)
        finish(store, run_id, the_app, out, report=report, summary=summary)
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


def _check_app(run_id: str, manifest: Manifest, app: App) -> None:
    """The run's results can only be stored by the app (and code) that made them."""
    made = manifest.run_identity()
    for name, have in (("app", app.name), ("fingerprint", app.fingerprint)):
        if name in made and made[name] != have:
            raise RunError(
                f"run {run_id!r} was dispatched by app {made.get('app')!r} "
                f"{made.get('fingerprint', '')}; this collector runs app {app.name!r} "
                f"{app.fingerprint}: give the run's --app"
            )


def _dead_not_done(store: ResultStore, run_id: str, dead: dict[str, str]) -> int:
    done = store.done_jobs(run_id)
    return sum(1 for job in dead if job not in done)


def dead_jobs(settings: KafkaSettings, run_id: str, check: bool = True) -> dict[str, str]:
    """``job id → "key: error"`` of a run's dead-lettered jobs."""
    out: dict[str, str] = {}
    for msg in scan(settings, settings.dlq_topic, timeout=15, check=check):
        headers = headers_of(msg)
        if headers.get(H_RUN) != run_id:
            continue
        try:
            batch = decode_jobs(msg.value(), validate=False)
        except DecodeError:
            continue
        why = f"{headers.get('dk-error-class', '?')}: {headers.get('dk-error', '')}"
        for job, key in zip(batch.jobs, batch.keys().to_pylist(), strict=True):
            out[job.job_id] = f"{key_text(key)}: {why}"
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
