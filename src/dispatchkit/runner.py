"""A whole run: prepare the input, dispatch, collect into the store, export, report.

:func:`run_embedded` is what ``dispatchkit run`` does with the default (embedded)
broker: it publishes the run's job messages through the collector's loop
(:func:`dispatchkit.collector.collect_run`), the loop the Kafka collector runs too.
:func:`prepare` (validate the input, write the quarantine, refuse a changed rerun) is
shared with the Kafka dispatcher, so both backends write the same files the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pyarrow as pa

from dispatchkit import metrics, wire
from dispatchkit.app import App, Task, Timestamp, load_app
from dispatchkit.charting import ChartProcess
from dispatchkit.collector import Collected, collect_run, conclude
from dispatchkit.dispatcher import DEFAULT_MAX_MESSAGE_BYTES, Dispatcher, too_big_message
from dispatchkit.errors import InputError, RunError, UsageError
from dispatchkit.identity import run_identity
from dispatchkit.keys import key_text
from dispatchkit.limits import DEFAULT_SORT_MEMORY
from dispatchkit.message import SCHEMA_VERSION, Manifest
from dispatchkit.outcome import DEFAULT_MAX_BAD_ROWS, BadRowBudget, check_rows
from dispatchkit.outdir import holds_out_dir
from dispatchkit.prefetch import prefetched
from dispatchkit.progress import NoProgress, Progress
from dispatchkit.reader import InputReader, RowCounts, fingerprint, resolve_inputs
from dispatchkit.store import ResultStore, RunRecord
from dispatchkit.summary import RunSummary
from dispatchkit.worker import RetryPolicy

if TYPE_CHECKING:
    from dispatchkit.brokers.base import Broker
    from dispatchkit.dispatcher import Outgoing

__all__ = ["STORE_NAME", "RunSpec", "RunSummary", "prepare", "run_embedded"]

log = logging.getLogger(__name__)

STORE_NAME = "dispatchkit.duckdb"


@dataclass(frozen=True)
class RunSpec:
    """Everything a run needs; built by the CLI, or by hand when used as a library."""

    input: str
    out: Path
    run_id: str | None = None
    task: str = "positive-rate"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: The run's range of the app's ``run_range`` column; ``None``: the app's own bounds.
    start: datetime | None = None
    end: datetime | None = None
    strict: bool = False
    #: ``--max-bad-rows``: more bad rows than this fail the run before any job is sent.
    max_bad_rows: BadRowBudget = field(
        default_factory=lambda: BadRowBudget.parse(DEFAULT_MAX_BAD_ROWS)
    )
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    memory_limit: str = DEFAULT_SORT_MEMORY
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    report: bool = True
    quiet: bool = False
    #: The app, by import path (``module:attr`` or ``file.py:attr``); ``None``: the
    #: ``$DISPATCHKIT_APP`` or the built-in COVID app.
    app: str | None = None


@dataclass
class Prepared:
    paths: list[Path]
    fingerprint: str
    run_id: str
    reader: InputReader
    counts: RowCounts
    total_jobs: int
    identity: dict[str, str] = field(default_factory=dict)
    app: App | None = None


def run_range(spec: RunSpec, app: App) -> tuple[datetime | None, datetime | None]:
    """The run's ``[start, end)``: the flags, else the app's bounds of its range column."""
    column = app.run_range_column
    if column is None:
        if spec.start is not None or spec.end is not None:
            raise UsageError(
                f"app {app.name!r} has no run range (no Timestamp column with "
                "run_range=True): --start and --end do not apply"
            )
        return None, None
    col = app.input_columns[column]
    assert isinstance(col, Timestamp)
    lo, hi = col.min_ns, col.max_ns
    start = spec.start if spec.start is not None else (None if lo is None else _from_ns(lo))
    end = spec.end if spec.end is not None else (None if hi is None else _from_ns(hi))
    if start is not None and end is not None and start >= end:
        raise InputError(f"--start {start:%Y-%m-%d} is not before --end {end:%Y-%m-%d}")
    return start, end


def _from_ns(ns: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)


def key_description(app: App) -> str:
    """The job key as text: ``country,date_hour=floor(test_datetime,hour)``."""
    return ",".join(
        p if isinstance(p, str) else f"{p.name}=floor({p.column},{p.unit})" for p in app.key_parts
    )


def spec_identity(spec: RunSpec, fingerprint: str, app: App | None = None) -> dict[str, str]:
    """The identity (:mod:`dispatchkit.identity`) of a run of ``spec`` over this input."""
    app = app if app is not None else load_app(spec.app)
    start, end = run_range(spec, app)
    unbounded = datetime(1, 1, 1, tzinfo=UTC)
    return run_identity(
        fingerprint=fingerprint,
        task=spec.task,
        start=start or unbounded,
        end=end or unbounded,
        max_message_bytes=spec.max_message_bytes,
        key=key_description(app),
        app=app.name,
        app_fingerprint=app.fingerprint,
    )


def prepare_run_id(spec: RunSpec) -> str:
    """The run id a run of ``spec`` gets: ``--run-id``, or one derived from the input."""
    return spec.run_id or f"run-{fingerprint(resolve_inputs(spec.input))[:12]}"


Check = Callable[[str, dict[str, str], App, Task], None]


def inputs_of(spec: RunSpec, app: App) -> list[Path]:
    """The run's input files, once its task is known to exist: what a run checks before it
    starts any process, so that a mistyped path or task is one line at once."""
    app.get_task(spec.task)
    return resolve_inputs(spec.input)


def prepare(
    spec: RunSpec,
    check: Check | None = None,
    app: App | None = None,
    paths: list[Path] | None = None,
) -> Prepared:
    """Resolve and validate the input, write the quarantine files; nothing is dispatched.

    ``check(run_id, identity, app, task)`` is called once the input is validated and
    before anything is written: a rerun that differs from its run is refused there. A
    job too big for one message, in a task without a combine step, is refused too.
    """
    app = app if app is not None else load_app(spec.app)
    task = app.get_task(spec.task)
    paths = resolve_inputs(spec.input) if paths is None else paths
    fp = fingerprint(paths)
    run_id = spec.run_id or f"run-{fp[:12]}"
    start, end = run_range(spec, app)
    identity = spec_identity(spec, fp, app)
    reader = InputReader(
        paths,
        app,
        start=start,
        end=end,
        spill_dir=spec.out / ".spill",
        memory_limit=spec.memory_limit,
    )
    try:
        counts = reader.counts()
        if spec.strict and counts.rows_bad:
            reader.first_bad_row()
        if counts.rows_read == 0:
            raise InputError(f"{spec.input}: holds no rows")
        if check is not None:
            check(run_id, identity, app, task)
        _refuse_too_big(spec, app, task, run_id, counts)
        reader.write_quarantine(spec.out, any_bad=counts.rows_bad > 0)
        check_rows(run_id, counts, spec.max_bad_rows, spec.out / "quarantine.csv")
        metrics.rows_counted(app.name, counts.rows_read, counts.bad)
        total_jobs = counts.jobs
    except BaseException:
        reader.close()
        raise
    log.info(
        "run %s: %d rows read, %d valid, %d quarantined; %d jobs of key %s",
        run_id,
        counts.rows_read,
        counts.rows_valid,
        counts.rows_bad,
        counts.jobs,
        key_description(app),
    )
    return Prepared(paths, fp, run_id, reader, counts, total_jobs, identity, app)


def _refuse_too_big(spec: RunSpec, app: App, task: Task, run_id: str, counts: RowCounts) -> None:
    """A key bigger than one message in a task without a combine: refused up front."""
    largest = counts.largest_job
    if task.combine is not None or largest is None:
        return
    key, rows, size = largest
    probe = Dispatcher(
        _NoRows(), app=app, task=task.name, run_id=run_id, max_message_bytes=spec.max_message_bytes
    )
    capacity = probe.capacity(_body_schema(app, task))
    if size * 1.02 + 64 > capacity:
        raise RunError(too_big_message(task, key_text(key), rows, spec.max_message_bytes, size))


def _body_schema(app: App, task: Task) -> pa.Schema:
    return pa.schema([pa.field(c, _ARROW[app.input_columns[c].kind]) for c in task.reads])


def minimum_message_bytes(app: App, task_name: str, run_id: str) -> int:
    """The smallest ``--max-message-bytes`` that carries one small job of the run."""
    task = app.get_task(task_name)
    budget = wire.COMPRESS_MIN_BYTES  # the allowance of a message too small to compress
    probe = Dispatcher(_NoRows(), app=app, task=task.name, run_id=run_id, max_message_bytes=budget)
    capacity = probe.capacity(_body_schema(app, task))
    return int(probe.max_message_bytes - capacity) + 64


class _NoRows:
    def sorted_valid(self, columns: object) -> Iterator[pa.RecordBatch]:
        return iter(())


_ARROW = {
    "int": pa.int64(),
    "float": pa.float64(),
    "text": pa.string(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("ns", tz="UTC"),
}


@holds_out_dir("run")  # one writer per --out, before anything is written there
def run_embedded(spec: RunSpec, bars: Progress | None = None) -> RunSummary:
    """Run the whole job on this machine with ``spec.workers`` worker processes."""
    from dispatchkit.brokers.embedded import EmbeddedBroker

    progress = bars or NoProgress()
    t_start = time.perf_counter()
    app = load_app(spec.app)
    paths = inputs_of(spec, app)  # a mistyped path or task fails before any process starts
    # The workers start while the input is validated: they are ready when jobs come.
    broker = EmbeddedBroker(
        spec.workers, app=app.spec if app.spec is not None else spec.app, retry=spec.retry
    )
    charts = ChartProcess(app, spec.app)
    done = False
    try:
        broker.start_soon()
        if spec.report:
            charts.start_soon()
        with ResultStore(spec.out / STORE_NAME) as store:
            records: list[RunRecord] = []

            def check(run_id: str, identity: dict[str, str], app: App, task: Task) -> None:
                records.append(store.start_run(run_id, identity, spec.input, app=app, task=task))

            prep = prepare(spec, check, app, paths)
            record = records[0]
            summary = RunSummary(run_id=prep.run_id)
            _count_rows(summary, prep)
            summary.seconds["prepare"] = time.perf_counter() - t_start
            with prep.reader:
                _run_prepared(spec, prep, store, record, progress, summary, broker, charts)
        done = True
    finally:
        broker.close()
        charts.close(wait=done)  # a failed run does not wait for the chart's imports
    summary.files["quarantine.parquet"] = spec.out / "quarantine.parquet"
    summary.files["store"] = spec.out / STORE_NAME
    summary.seconds["total"] = time.perf_counter() - t_start
    return summary


def manifest_of(spec: RunSpec, prep: Prepared, **changes: object) -> Manifest:
    """The run's manifest as its dispatcher announces it (``dispatching``)."""
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
        created_at=time.time(),
        identity=prep.identity,
    )
    return msgspec.structs.replace(manifest, **changes) if changes else manifest


def _run_prepared(
    spec: RunSpec,
    prep: Prepared,
    store: ResultStore,
    record: RunRecord,
    progress: Progress,
    summary: RunSummary,
    broker: Broker,
    charts: ChartProcess | None = None,
) -> None:
    assert prep.app is not None
    store.update_run(
        prep.run_id,
        status="dispatching",
        rows_read=prep.counts.rows_read,
        rows_quarantined=prep.counts.rows_bad,
        total_jobs=prep.total_jobs,
    )
    done = store.done_jobs(prep.run_id)
    summary.jobs = prep.total_jobs
    if record.status == "complete" and len(done) == prep.total_jobs:
        log.info("run %s is already complete; nothing to do", prep.run_id)
        summary.jobs_skipped = len(done)
        final = manifest_of(spec, prep, status="dispatched", total_parts=record.total_parts)
        collected = Collected(final, "complete")
    else:
        collected = _dispatch_and_collect(spec, prep, store, done, progress, summary, broker)
        broker.close()  # the workers are done before the export
    conclude(
        store, collected, prep.app, spec.out, report=spec.report, summary=summary, charts=charts
    )


def _count_rows(summary: RunSummary, prep: Prepared) -> None:
    summary.rows_read = prep.counts.rows_read
    summary.rows_valid = prep.counts.rows_valid
    summary.rows_quarantined = prep.counts.rows_bad
    summary.bad_rows = dict(prep.counts.bad)


def _dispatch_and_collect(
    spec: RunSpec,
    prep: Prepared,
    store: ResultStore,
    done: set[str],
    progress: Progress,
    summary: RunSummary,
    broker: Broker,
) -> Collected:
    """Publish the jobs not done yet through the collector's loop, which stores results
    as they come; the run is closed (its manifest ``dispatched``) when all are sent."""
    assert prep.app is not None
    dispatcher = Dispatcher(
        prep.reader,
        app=prep.app,
        task=spec.task,
        run_id=prep.run_id,
        max_message_bytes=spec.max_message_bytes,
    )
    manifest = manifest_of(spec, prep)
    t0 = time.perf_counter()
    progress.add("dispatch", prep.counts.rows_valid, "rows")

    def feed() -> Iterator[Outgoing]:
        # Cut and encoded in a thread of their own, ahead of the loop that publishes
        # them and stores results (DuckDB and Arrow work there runs without the GIL).
        yield from prefetched(
            dispatcher.messages(skip=done, on_rows=lambda n: progress.advance("dispatch", n)),
            depth=16,
            name="dispatcher",
        )
        stats = dispatcher.stats
        if stats.rows_cut != prep.counts.rows_valid:
            raise RunError(
                f"internal check failed: {stats.rows_cut} rows cut into jobs but "
                f"{prep.counts.rows_valid} rows are valid"
            )
        summary.seconds["dispatch"] = time.perf_counter() - t0
        broker.close_run(
            msgspec.structs.replace(
                manifest,
                status="dispatched",
                total_parts=stats.parts,
                total_batches=stats.messages,
            )
        )

    broker.open_run(manifest)
    collected = collect_run(
        broker,
        store,
        prep.run_id,
        app=prep.app,
        feed=feed(),
        progress=progress,
        wait_for_dispatch=None,
        inputs=spec.input,
        where="this process",
    )
    summary.seconds["work"] = time.perf_counter() - t0
    stats = dispatcher.stats
    summary.jobs_sent = stats.jobs_sent
    summary.jobs_skipped = stats.jobs_skipped
    summary.split_jobs = stats.split_jobs
    summary.batches = stats.messages
    summary.worker_restarts = getattr(broker, "restarts", 0)
    return collected
