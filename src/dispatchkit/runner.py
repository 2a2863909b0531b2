"""A whole run: prepare the input, dispatch, collect into the store, export, report.

:func:`run_embedded` is what ``dispatchkit run`` does with the default (embedded)
broker. The pieces — :func:`prepare`, :func:`pump_results` and :func:`finish` — are
shared with the Kafka commands so both backends write the same files the same way.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from dispatchkit import faults
from dispatchkit.brokers.base import Broker
from dispatchkit.cli.progress import Bars
from dispatchkit.dispatcher import DEFAULT_MAX_MESSAGE_BYTES, Dispatcher, iso_hour
from dispatchkit.errors import InputError, RunError
from dispatchkit.identity import run_identity
from dispatchkit.message import JobBatch, decode
from dispatchkit.outdir import holds_out_dir
from dispatchkit.reader import InputReader, RowCounts, fingerprint, resolve_inputs
from dispatchkit.schema import DEFAULT_END, DEFAULT_START
from dispatchkit.store import ResultStore, RunRecord, write_results
from dispatchkit.task import get_task
from dispatchkit.worker import RetryPolicy

if TYPE_CHECKING:
    from dispatchkit.brokers.embedded import EmbeddedBroker

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
    start: datetime = DEFAULT_START
    end: datetime = DEFAULT_END
    strict: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    memory_limit: str = "384MB"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    report: bool = True
    quiet: bool = False


@dataclass
class RunSummary:
    """What a run did, for the printed summary and for tests."""

    run_id: str
    status: str = "started"
    rows_read: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    jobs: int = 0
    jobs_done: int = 0
    jobs_sent: int = 0
    jobs_skipped: int = 0
    split_jobs: int = 0
    batches: int = 0
    duplicates_ignored: int = 0
    failed_jobs: list[str] = field(default_factory=list)
    worker_restarts: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class Prepared:
    paths: list[Path]
    fingerprint: str
    run_id: str
    reader: InputReader
    counts: RowCounts
    total_jobs: int
    identity: dict[str, str] = field(default_factory=dict)


def spec_identity(spec: RunSpec, fingerprint: str) -> dict[str, str]:
    """The identity (:mod:`dispatchkit.identity`) of a run of ``spec`` over this input."""
    return run_identity(
        fingerprint=fingerprint,
        task=spec.task,
        start=spec.start,
        end=spec.end,
        max_message_bytes=spec.max_message_bytes,
    )


def prepare_run_id(spec: RunSpec) -> str:
    """The run id a run of ``spec`` gets: ``--run-id``, or one derived from the input."""
    return spec.run_id or f"run-{fingerprint(resolve_inputs(spec.input))[:12]}"


def prepare(spec: RunSpec, check: Callable[[str, dict[str, str]], None] | None = None) -> Prepared:
    """Resolve and validate the input, write the quarantine files; nothing is dispatched.

    ``check(run_id, identity)`` is called once the input is validated and before
    anything is written: a rerun that differs from its run is refused there.
    """
    paths = resolve_inputs(spec.input)
    fp = fingerprint(paths)
    run_id = spec.run_id or f"run-{fp[:12]}"
    get_task(spec.task)
    if spec.start >= spec.end:
        raise InputError(f"--start {spec.start:%Y-%m-%d} is not before --end {spec.end:%Y-%m-%d}")
    identity = spec_identity(spec, fp)
    reader = InputReader(
        paths,
        start=spec.start,
        end=spec.end,
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
            check(run_id, identity)
        reader.write_quarantine(spec.out, any_bad=counts.rows_bad > 0)
        total_jobs = counts.jobs
    except BaseException:
        reader.close()
        raise
    return Prepared(paths, fp, run_id, reader, counts, total_jobs, identity)


def pump_results(broker: Broker, store: ResultStore, timeout: float, flush_at: int = 20_000) -> int:
    """Move arrived results into the store; flush (then commit the broker) when enough wait.

    Returns the number of job parts that arrived.
    """
    got = 0
    for rb in broker.results(timeout):
        store.add(rb.run_id, rb.worker, rb.results)
        got += len(rb.results)
    if store.buffered >= faults.flush_at(flush_at):
        store.flush()
        faults.crash_point("run.after_flush")
        broker.commit_results()
    return got


def finish(
    store: ResultStore, run_id: str, task: str, out: Path, *, report: bool, summary: RunSummary
) -> None:
    """Export results.parquet/csv and report.png from the store."""
    t0 = time.perf_counter()
    results = store.results(run_id, get_task(task))
    pq_path, csv_path = write_results(results, out)
    summary.files["results.parquet"] = pq_path
    summary.files["results.csv"] = csv_path
    summary.jobs_done = results.height
    if report and results.height:
        from dispatchkit.report import plot_report  # matplotlib costs ~0.4 s to import

        summary.files["report.png"] = plot_report(results, out / "report.png")
    summary.seconds["export"] = time.perf_counter() - t0


@holds_out_dir("run")  # one writer per --out, before anything is written there
def run_embedded(spec: RunSpec, bars: Bars | None = None) -> RunSummary:
    """Run the whole job on this machine with ``spec.workers`` worker processes."""
    bars = bars or Bars(enabled=False)
    t_start = time.perf_counter()
    with ResultStore(spec.out / STORE_NAME) as store:
        records: list[RunRecord] = []

        def check(run_id: str, identity: dict[str, str]) -> None:
            records.append(store.start_run(run_id, identity, spec.input))

        prep = prepare(spec, check)
        record = records[0]
        summary = RunSummary(run_id=prep.run_id)
        _count_rows(summary, prep)
        summary.seconds["prepare"] = time.perf_counter() - t_start
        with prep.reader:
            _run_prepared(spec, prep, store, record, bars, summary)
    summary.files["quarantine.parquet"] = spec.out / "quarantine.parquet"
    summary.files["store"] = spec.out / STORE_NAME
    summary.seconds["total"] = time.perf_counter() - t_start
    return summary


def _run_prepared(
    spec: RunSpec,
    prep: Prepared,
    store: ResultStore,
    record: RunRecord,
    bars: Bars,
    summary: RunSummary,
) -> None:
    from dispatchkit.brokers.embedded import EmbeddedBroker

    store.update_run(
        prep.run_id,
        status="dispatching",
        rows_read=prep.counts.rows_read,
        rows_quarantined=prep.counts.rows_bad,
        total_jobs=prep.total_jobs,
    )
    done = store.done_keys(prep.run_id)
    summary.jobs = prep.total_jobs
    if record.status == "complete" and len(done) == prep.total_jobs:
        log.info("run %s is already complete; nothing to do", prep.run_id)
        summary.jobs_skipped = len(done)
    else:
        broker = EmbeddedBroker(spec.workers, retry=spec.retry)
        _dispatch_and_collect(spec, prep, store, done, bars, summary, broker)
    finish(store, prep.run_id, spec.task, spec.out, report=spec.report, summary=summary)
    if summary.failed_jobs:
        summary.files["dead_letters.csv"] = write_dead_letters(summary.failed_jobs, spec.out)
    if summary.rows_valid and summary.jobs_done != prep.total_jobs:
        summary.status = "incomplete"
    else:
        summary.status = "complete"
    store.update_run(
        prep.run_id,
        status=summary.status,
        rows_dispatched=summary.rows_valid,
        total_parts=prep.total_jobs + summary.split_jobs,
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
    done: set[tuple[str, int]],
    bars: Bars,
    summary: RunSummary,
    broker: EmbeddedBroker,
) -> None:
    dispatcher = Dispatcher(
        prep.reader, run_id=prep.run_id, task=spec.task, max_message_bytes=spec.max_message_bytes
    )
    bars.add("dispatch", prep.counts.rows_valid, "rows")
    bars.add("work", prep.total_jobs, "jobs")
    bars.update("work", completed=len(done))
    t0 = time.perf_counter()
    try:
        broker.start()
        for i, batch in enumerate(
            dispatcher.batches(skip=done, on_rows=lambda n: bars.advance("dispatch", n))
        ):
            broker.publish(batch)
            if i % 64 == 0:
                bars.advance("work", pump_results(broker, store, 0.0))
        summary.seconds["dispatch"] = time.perf_counter() - t0
        while broker.outstanding:
            bars.advance("work", pump_results(broker, store, 0.5))
        bars.advance("work", pump_results(broker, store, 0.0))
        store.flush()
    finally:
        broker.close()
    summary.seconds["work"] = time.perf_counter() - t0
    stats = dispatcher.stats
    if stats.rows_cut != prep.counts.rows_valid:
        raise RunError(
            f"internal check failed: {stats.rows_cut} rows cut into jobs but "
            f"{prep.counts.rows_valid} rows are valid"
        )
    summary.jobs_sent = stats.jobs_sent
    summary.jobs_skipped = stats.jobs_skipped
    summary.split_jobs = stats.split_jobs
    summary.batches = stats.batches
    summary.duplicates_ignored = store.duplicates
    summary.worker_restarts = broker.restarts
    for dead in broker.dead_letters:
        try:
            batch = decode(dead.payload, JobBatch)
        except Exception:
            summary.failed_jobs.append(f"undecodable batch ({dead.rejection.error})")
            continue
        summary.failed_jobs.extend(
            f"{j.country} {iso_hour(j.date_hour)}: {dead.rejection.error_class}: "
            f"{dead.rejection.error}"
            for j in batch.jobs
        )


def write_dead_letters(failed: list[str], out: Path) -> Path:
    """The embedded run's dead-lettered jobs, one line each: key and error."""
    path = out / "dead_letters.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["job", "error"])
        writer.writerows(f.partition(": ")[::2] for f in failed)
    return path
