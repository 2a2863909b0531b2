"""The collector: one loop that stores a run's results from any transport until it is done.

:func:`collect_run` drives a :class:`~dispatchkit.brokers.base.Broker` — the embedded
one, whose workers are this process's children, or Kafka's — the same way: it reads the
run's manifest, checks that the run is the one meant (identity, app), stores arriving
result messages together with the transport's read positions in one store transaction
(then tells the transport they are stored), and stops when the manifest says every job
is done; or, as ``incomplete``, when the transport has settled or every missing job is
dead-lettered and nothing has moved for a while. It can publish a run's job messages
meanwhile (``feed``), which is how an embedded run dispatches and collects in one process.

:func:`conclude` is the common ending: export results.parquet/csv and the chart, list the
dead-lettered jobs, record the run's status in the store.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dispatchkit import faults, logs, metrics
from dispatchkit.app import App
from dispatchkit.brokers.base import Broker
from dispatchkit.charting import ChartProcess
from dispatchkit.errors import BrokerError, FatalBrokerError, RunError
from dispatchkit.identity import check_identity
from dispatchkit.message import Manifest
from dispatchkit.outcome import missing_lines
from dispatchkit.progress import NoProgress, Progress
from dispatchkit.store import ResultStore, write_results
from dispatchkit.summary import RunSummary

if TYPE_CHECKING:
    from dispatchkit.dispatcher import Outgoing

log = logging.getLogger(__name__)

#: How long a collector waits for a run's manifest by default.
WAIT_FOR_DISPATCH = 60.0
#: Results buffered before the store is written (and the transport told), at the latest.
FLUSH_AT = 20_000
#: Messages published from a ``feed`` between two reads of the results.
FEED_STEP = 64


@dataclass
class Collected:
    """How collecting ended."""

    manifest: Manifest
    status: str  # "complete", "incomplete" or "timed out" (until :func:`conclude`)
    #: ``job id → "key: error"`` of the run's dead-lettered jobs (some may be done since).
    dead: dict[str, str] = field(default_factory=dict)


class NotDispatched(RunError):
    """No manifest of the run came within the wait."""


def collect_run(
    broker: Broker,
    store: ResultStore,
    run_id: str,
    *,
    app: App,
    feed: Iterator[Outgoing] | None = None,
    progress: Progress | None = None,
    on_tick: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    timeout: float | None = None,
    dead_grace: float = 5.0,
    wait_for_dispatch: float | None = WAIT_FOR_DISPATCH,
    identity: Mapping[str, str] | None = None,
    inputs: str = "",
    where: str = "the transport",
) -> Collected:
    """Store ``run_id``'s results from ``broker`` until the run is done (see the module).

    ``feed`` yields job messages this loop publishes between reads of the results; it
    closes the run itself (``broker.close_run``) once it is exhausted. ``timeout`` ends
    collecting after that many seconds without progress; with no manifest of the run
    after ``wait_for_dispatch`` seconds (``None`` or 0: wait for ever) it raises
    :class:`NotDispatched`. Given an ``identity`` (the run this process means to make), a
    run dispatched with another one is refused; so is a run made by another app.
    """
    with logs.context(run=run_id):
        return _collect(
            broker,
            store,
            run_id,
            app=app,
            feed=feed,
            progress=progress or NoProgress(),
            on_tick=on_tick,
            on_progress=on_progress,
            timeout=timeout,
            dead_grace=dead_grace,
            wait_for_dispatch=wait_for_dispatch,
            identity=identity,
            inputs=inputs,
            where=where,
        )


def _collect(
    broker: Broker,
    store: ResultStore,
    run_id: str,
    *,
    app: App,
    feed: Iterator[Outgoing] | None,
    progress: Progress,
    on_tick: Callable[[], None] | None,
    on_progress: Callable[[int, int], None] | None,
    timeout: float | None,
    dead_grace: float,
    wait_for_dispatch: float | None,
    identity: Mapping[str, str] | None,
    inputs: str,
    where: str,
) -> Collected:
    bars = progress
    manifest: Manifest | None = None
    dead: dict[str, str] = {}
    done = 0  # counted once the run is started in the store (its manifest read)
    parts = parts_counted = 0  # job parts stored; how many there were when done was counted
    counted_at, count_cost = float("-inf"), 0.0
    last_manifest_check = last_flush = last_dlq_check = float("-inf")
    last_progress = waiting_since = last_refresh = time.monotonic()
    said_waiting = False
    status = ""
    bars.add("jobs", None, "jobs done")
    metrics.set_ready("collector", True)  # the store is open
    while True:
        now = time.monotonic()
        if on_tick is not None:
            on_tick()
        if feed is not None:
            feed = _publish_some(broker, feed)
        if (manifest is None or manifest.status != "dispatched") and (
            now - last_manifest_check >= broker.manifest_interval
        ):
            last_manifest_check = now
            seen = _read_manifest(broker, run_id)
            if seen is not None and manifest is None:
                _start(store, run_id, seen, app, identity, inputs)
                done = store.jobs_done(run_id)
                parts = parts_counted = store.parts_stored(run_id)
                bars.update("jobs", completed=done)
                metrics.run_progress(jobs_done=done, parts_done=parts)
            if seen is not None:
                if manifest is None or seen.status != manifest.status:
                    log.info(
                        "manifest %s: %d jobs from %d valid rows (%d quarantined)",
                        seen.status,
                        seen.total_jobs,
                        seen.rows_dispatched,
                        seen.rows_quarantined,
                    )
                manifest = seen
                bars.update("jobs", total=manifest.total_jobs)
                metrics.run_progress(jobs_total=seen.total_jobs, parts_total=seen.total_parts)
            elif manifest is None:
                waited = now - waiting_since
                if wait_for_dispatch and waited > wait_for_dispatch:
                    raise NotDispatched(
                        f"run {run_id!r} was not dispatched: no manifest on {where} after "
                        f"{wait_for_dispatch:.0f} s (check --run-id and --topic-prefix, or "
                        "wait longer with --wait-for-dispatch; 0 waits for ever)"
                    )
                if not said_waiting:
                    said_waiting = True
                    bound = (
                        f"up to {wait_for_dispatch:.0f} s"
                        if wait_for_dispatch
                        else "for as long as it takes"
                    )
                    (log.warning if wait_for_dispatch else log.info)(
                        "collector: waiting %s for run %r to be dispatched (its manifest on %s)",
                        bound,
                        run_id,
                        where,
                    )
        if now - last_refresh > 5.0:
            broker.refresh()
            last_refresh = now
        if manifest is None:
            if timeout is not None and now - last_progress > timeout:
                raise NotDispatched(
                    f"run {run_id!r} was not dispatched: no manifest on {where} after "
                    f"{now - waiting_since:.0f} s (--timeout)"
                )
            # Results can only be stored once the run is started from its manifest:
            # until then they wait in the transport.
            if feed is None:
                time.sleep(0.2)
            continue
        for message in broker.results(0.0 if feed is not None else 0.5):
            store.add(message)
            metrics.result_message_in()
        if store.buffered and (
            store.buffered >= faults.flush_at(FLUSH_AT) or now - last_flush > 1.0
        ):
            new_parts = _flush(broker, store, run_id)
            last_flush = now
            if new_parts != parts:
                last_progress = now
            parts = new_parts
        # Done jobs are counted from the parts this store wrote, a query over the split
        # parts only (store.jobs_done_counted): made when every part may be in, when
        # parts stop coming, and otherwise at most every quarter second or its own cost
        # times 20, so a run of many split jobs does not spend its time counting.
        if parts != parts_counted and (
            (manifest.status == "dispatched" and parts >= manifest.total_parts)
            or now - last_progress > 1.0
            or now - counted_at > max(0.25, 20 * count_cost)
        ):
            t0 = time.monotonic()
            done, parts_counted = store.jobs_done_counted(run_id), parts
            count_cost, counted_at = time.monotonic() - t0, now
            metrics.run_progress(jobs_done=done)
            bars.update("jobs", completed=done)
            if on_progress is not None:
                on_progress(done, manifest.total_jobs)
        if manifest.status != "dispatched":
            if timeout is not None and now - last_progress > timeout:
                status = "timed out"
                break
            continue
        missing = manifest.total_jobs - done
        if missing == 0:
            status = "complete"
            break
        if broker.settled():
            # Nothing more can arrive: what is buffered is the last of it.
            for message in broker.results(0.0):
                store.add(message)
            _flush(broker, store, run_id)
            done = store.jobs_done_counted(run_id)
            dead = broker.dead_jobs(run_id)
            status = "complete" if done == manifest.total_jobs else "incomplete"
            break
        # Dead letters only matter once results stop coming.
        if now - last_dlq_check > 3.0 and now - last_progress > 1.0:
            try:
                dead = broker.dead_jobs(run_id)
            except FatalBrokerError:
                raise
            except BrokerError as exc:  # a broker restarting: try again later
                log.warning("collector: %s", exc)
            last_dlq_check = now
        # Every missing job is dead-lettered and nothing has moved for a while (a replay
        # in flight would): the run ends incomplete.
        if (
            dead
            and not store.buffered
            and now - last_progress > dead_grace
            and missing == _dead_not_done(store, run_id, dead)
        ):
            status = "incomplete"
            break
        if timeout is not None and now - last_progress > timeout:
            status = "timed out"
            break
    store.flush(broker.positions())
    bars.update("jobs", completed=done)
    metrics.run_progress(jobs_done=done)
    log.info(
        "collected: %s, %d of %d jobs done, %d dead-lettered",
        status,
        done,
        manifest.total_jobs,
        len(dead),
    )
    metrics.set_ready("collector", False)
    return Collected(manifest, status, dead)


def _publish_some(broker: Broker, feed: Iterator[Outgoing]) -> Iterator[Outgoing] | None:
    """Publish up to :data:`FEED_STEP` messages of ``feed``; ``None`` once it is done."""
    for _ in range(FEED_STEP):
        message = next(feed, None)
        if message is None:
            return None
        broker.publish(message)
    return feed


def _read_manifest(broker: Broker, run_id: str) -> Manifest | None:
    try:
        return broker.read_manifest(run_id)
    except FatalBrokerError:
        raise
    except BrokerError as exc:  # a broker restarting: try again later
        log.warning("collector: %s", exc)
        return None


def _start(
    store: ResultStore,
    run_id: str,
    manifest: Manifest,
    app: App,
    identity: Mapping[str, str] | None,
    inputs: str,
) -> None:
    """Start the run in the store, once it is known to be the run meant, by this app."""
    if identity is not None:
        check_identity(run_id, manifest.run_identity(), identity, where="dispatched")
    check_app(run_id, manifest, app)
    store.start_run(
        run_id, manifest.run_identity(), inputs, app=app, task=app.get_task(manifest.task)
    )


def _flush(broker: Broker, store: ResultStore, run_id: str) -> int:
    """The results and the positions they were read up to, in one transaction; the
    transport is told once they are stored. Returns the run's job parts stored."""
    store.flush(broker.positions())
    faults.crash_point("run.after_flush")
    faults.crash_point("collector.after_store")
    broker.commit_results()
    parts = store.parts_stored(run_id)
    metrics.run_progress(parts_done=parts)
    return parts


def check_app(run_id: str, manifest: Manifest, app: App) -> None:
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


# -- the ending ---------------------------------------------------------------------------


def conclude(
    store: ResultStore,
    collected: Collected,
    app: App,
    out: Path,
    *,
    report: bool,
    summary: RunSummary,
    charts: ChartProcess | None = None,
) -> None:
    """Export the results (and chart), list the dead-lettered jobs, record the status.

    ``charts``, a chart process started with the run, draws the chart while the CSV is
    written; without one the chart is drawn in this process.
    """
    manifest = collected.manifest
    run_id = manifest.run_id
    summary.jobs = manifest.total_jobs
    summary.duplicates_ignored = store.duplicates
    if collected.dead:  # before the export: an incomplete run's chart names them
        done = store.done_jobs(run_id)
        summary.failed_jobs = sorted(why for job, why in collected.dead.items() if job not in done)
    export(store, run_id, app, out, report=report, summary=summary, charts=charts)
    if summary.failed_jobs:
        summary.files["dead_letters.csv"] = write_dead_letters(summary.failed_jobs, out)
    if collected.status == "timed out":
        summary.status = "timed out"
    else:
        summary.status = "complete" if summary.jobs_done == manifest.total_jobs else "incomplete"
    store.update_run(
        run_id,
        status=summary.status,
        rows_read=manifest.rows_read,
        rows_dispatched=manifest.rows_dispatched,
        rows_quarantined=manifest.rows_quarantined,
        total_jobs=manifest.total_jobs,
        total_parts=manifest.total_parts,
    )


def export(
    store: ResultStore,
    run_id: str,
    app: App,
    out: Path,
    *,
    report: bool,
    summary: RunSummary,
    charts: ChartProcess | None = None,
) -> None:
    """Export results.parquet/csv, and the app's chart as report.png, from the store."""
    from dispatchkit.outdir import atomic_path

    t0 = time.perf_counter()
    results = store.results(run_id)
    summary.jobs_done = results.height
    # an incomplete run's chart names what is missing (never passes for the whole)
    banner = (
        missing_lines(summary.jobs, summary.jobs_done, summary.failed_jobs)
        if summary.jobs_done < summary.jobs
        else []
    )
    if report and results.height and app.chart_fn is not None:
        path = out / "report.png"
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            table = results.to_arrow()
            drawing = (charts or ChartProcess(app, None)).submit(table, tmp, banner)
            try:
                pq_path, csv_path = write_results(results, out, banner)
            finally:
                drawing.wait()  # before the temp file may be removed
        summary.files["report.png"] = path
    else:
        pq_path, csv_path = write_results(results, out, banner)
    summary.files["results.parquet"] = pq_path
    summary.files["results.csv"] = csv_path
    if report and app.chart_fn is None:
        summary.notes.append(
            f"no report.png: app {app.name!r} declares no chart (@app.chart); "
            "results.parquet and results.csv hold its results"
        )
    summary.seconds["export"] = time.perf_counter() - t0


def write_dead_letters(failed: list[str], out: Path) -> Path:
    """A run's dead-lettered jobs, one line each: key and error."""
    from dispatchkit.outdir import atomic_path

    path = out / "dead_letters.csv"
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["job", "error"])
        writer.writerows(f.partition(": ")[::2] for f in failed)
    return path
