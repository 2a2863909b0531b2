"""Runs on Kafka: dispatch, work, collect, and all-in-one runs — the Kafka commands.

Each function is what one CLI command does. They share the embedded run's pieces
(:func:`~dispatchkit.runner.prepare`, the store, and the collector's loop
:func:`~dispatchkit.collector.collect_run` with its ending
:func:`~dispatchkit.collector.conclude`), so a Kafka run writes the same files, the same
way, as an embedded one. ``status`` is :func:`dispatchkit.brokers.kafka.status.status`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import msgspec

from dispatchkit import faults, logs, metrics, outdir, procs
from dispatchkit.app import App, Task, load_app
from dispatchkit.brokers.kafka.broker import KafkaBroker
from dispatchkit.brokers.kafka.protocol import run_protocol
from dispatchkit.brokers.kafka.settings import KafkaSettings, Secret
from dispatchkit.brokers.kafka.status import (
    collector_group,
    dead_jobs,
    status,
    worker_group,
)
from dispatchkit.charting import ChartProcess
from dispatchkit.claim import HEARTBEAT_SECONDS, Holding, describe, holder_of, is_alive, new_owner
from dispatchkit.collector import WAIT_FOR_DISPATCH, collect_run, conclude
from dispatchkit.dispatcher import Dispatcher
from dispatchkit.errors import RunError
from dispatchkit.identity import check_identity
from dispatchkit.kafka_worker import WorkerOptions, work
from dispatchkit.message import Manifest
from dispatchkit.progress import NoProgress, Progress
from dispatchkit.reader import fingerprint
from dispatchkit.runner import (
    STORE_NAME,
    RunSpec,
    RunSummary,
    inputs_of,
    manifest_of,
    prepare,
    prepare_run_id,
    spec_identity,
)
from dispatchkit.store import ResultStore

__all__ = [
    "WorkerOptions",
    "collect",
    "collector_group",
    "dead_jobs",
    "dispatch",
    "run_kafka",
    "spawn_worker",
    "status",
    "work",
    "worker_env",
    "worker_group",
]

log = logging.getLogger(__name__)


# -- dispatch ---------------------------------------------------------------------------


@outdir.holds_out_dir("dispatch")  # it writes the quarantine files and .spill there
def dispatch(
    spec: RunSpec,
    settings: KafkaSettings,
    bars: Progress | None = None,
    *,
    wait_for_holder: float = 60.0,
) -> RunSummary:
    """Publish a run's manifest and jobs; a rerun publishes only what is missing.

    One dispatcher per run at a time (:mod:`dispatchkit.claim`): while another one holds
    the run, this one waits up to ``wait_for_holder`` seconds, saying for whom, and is
    then refused. A rerun whose identity differs from the run's is refused before
    anything is written.
    """
    progress = bars or NoProgress()
    t0 = time.perf_counter()
    broker = KafkaBroker(settings)
    # Connecting, creating the topics and the producer's idempotence PID are round trips
    # (0.3-1 s): made on a helper thread while the input is validated.
    warm = _Background(broker.warm_up)

    def check(run_id: str, identity: dict[str, str], app: App, task: Task) -> None:
        warm.result()
        existing = broker.read_manifest(run_id)
        if existing is not None:
            check_identity(run_id, existing.run_identity(), identity, where="dispatched")

    try:
        prep = prepare(spec, check)
    except BaseException:
        warm.abandon(broker.close)  # an input error is reported without waiting
        raise
    summary = RunSummary(run_id=prep.run_id, jobs=prep.total_jobs)
    summary.rows_read, summary.rows_valid = prep.counts.rows_read, prep.counts.rows_valid
    summary.rows_quarantined, summary.bad_rows = prep.counts.rows_bad, dict(prep.counts.bad)
    with prep.reader:
        try:
            manifest = manifest_of(spec, prep, owner=new_owner())
            held = _hold(broker, manifest, wait_for_holder)
            if held.dispatched is not None:
                log.info("run %s was dispatched already; nothing to publish", prep.run_id)
                summary.jobs_skipped = held.dispatched.total_jobs
                summary.status = "dispatched"
                return summary
            first = _first_claim(broker.run_manifests(prep.run_id))
            if first is not None:
                manifest = msgspec.structs.replace(manifest, created_at=first.created_at)
            # Our claim is in the log; anything of the run published before it is found now.
            resumed = first is not None and first.owner != manifest.owner
            published = broker.published_parts(prep.run_id) if resumed else set()
            broker.run_id = prep.run_id
            assert prep.app is not None
            metrics.set_ready("dispatcher", True)
            dispatcher = Dispatcher(
                prep.reader,
                app=prep.app,
                task=spec.task,
                run_id=prep.run_id,
                max_message_bytes=spec.max_message_bytes,
            )
            progress.add("dispatch", prep.counts.rows_valid, "rows")
            beat = time.monotonic()
            for message in dispatcher.messages(
                skip_parts=published, on_rows=lambda n: progress.advance("dispatch", n)
            ):
                broker.publish(message)
                faults.crash_point("dispatch.mid_publish")
                if time.monotonic() - beat > HEARTBEAT_SECONDS:
                    beat = time.monotonic()
                    broker.publish_manifest(
                        msgspec.structs.replace(manifest, heartbeat_at=time.time()), wait=False
                    )
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
                    heartbeat_at=time.time(),
                    total_parts=stats.parts,
                    total_batches=stats.messages,
                )
            )
        finally:
            metrics.set_ready("dispatcher", False)
            broker.close()
    summary.jobs_sent = stats.jobs_sent
    summary.split_jobs = stats.split_jobs
    summary.batches = stats.messages
    summary.jobs_skipped = len({job for job, _ in published})
    summary.status = "dispatched"
    summary.seconds["dispatch"] = time.perf_counter() - t0
    return summary


def _hold(broker: KafkaBroker, claim: Manifest, wait: float) -> Holding:
    """Claim the run and return once this dispatcher holds it, or it is dispatched.

    While another live dispatcher holds the run, wait (saying for whom) up to ``wait``
    seconds, then refuse. A holder seen dead, or silent for longer than
    :data:`~dispatchkit.claim.STALE_SECONDS`, is taken over.
    """
    run_id = claim.run_id
    deadline = time.monotonic() + wait
    told = ""
    while True:
        held = holder_of(broker.run_manifests(run_id))
        if held.dispatched is not None:
            if held.latest is not held.dispatched:
                # A late claim follows the dispatched manifest: put that last again, so
                # the compacted topic keeps it.
                broker.publish_manifest(held.dispatched)
            return held
        if held.holder == claim.owner:
            return held
        now = time.time()
        if held.holder and is_alive(held.holder, held.heartbeat_at, now):
            if time.monotonic() > deadline:
                raise RunError(
                    f"run {run_id!r} is being dispatched by {describe(held.holder)} (last "
                    f"heartbeat {now - held.heartbeat_at:.0f} s ago); one dispatcher per run: "
                    "wait for it to finish, or stop it and dispatch again"
                )
            if told != held.holder:
                told = held.holder
                log.warning(
                    "run %s is being dispatched by %s; waiting up to %.0f s for it",
                    run_id,
                    describe(held.holder),
                    max(0.0, deadline - time.monotonic()),
                )
            time.sleep(1.0)
            continue
        if held.holder:
            log.warning("run %s: taking over from %s, gone", run_id, describe(held.holder))
        broker.publish_manifest(
            msgspec.structs.replace(claim, heartbeat_at=time.time(), takes_over=held.holder)
        )


def _first_claim(manifests: list[Manifest]) -> Manifest | None:
    return manifests[0] if manifests else None


class _Background:
    """``fn()`` on a daemon thread; :meth:`result` waits and re-raises what it raised."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._cleanup: Callable[[], None] | None = None

        def target() -> None:
            try:
                fn()
            except BaseException as exc:
                self._error = exc
            with self._lock:
                self._done.set()
                cleanup = self._cleanup
            if cleanup is not None:
                cleanup()

        threading.Thread(target=target, name="dispatchkit-warm-up", daemon=True).start()

    def result(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error

    def abandon(self, cleanup: Callable[[], None]) -> None:
        """Not waited for after all: ``cleanup()`` now if done, else when it is."""
        with self._lock:
            if not self._done.is_set():
                self._cleanup = cleanup
                return
        cleanup()


# -- collect ----------------------------------------------------------------------------


@outdir.holds_out_dir("collect")  # one collector per --out: the store is single-writer
def collect(
    settings: KafkaSettings,
    run_id: str,
    out: Path,
    *,
    bars: Progress | None = None,
    report: bool = True,
    timeout: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    dead_grace: float = 5.0,
    wait_for_dispatch: float | None = WAIT_FOR_DISPATCH,
    identity: Mapping[str, str] | None = None,
    app: App | None = None,
    on_collected: Callable[[], None] | None = None,
) -> RunSummary:
    """Store a run's results from Kafka until its manifest's jobs are all done, export them.

    ``on_collected`` is called once the results are stored, before they are exported.

    The collector reads the results topic ``read_committed`` (aborted worker transactions
    are never seen) and keeps its read positions in its store, written with the results
    they read: the store alone says where its collector goes on, so collectors into other
    directories cannot move it, and a crash re-reads at most what the store does not
    hold. See :func:`~dispatchkit.collector.collect_run` for when it stops.
    """
    the_app = app if app is not None else load_app(None)
    t0 = time.perf_counter()
    summary = RunSummary(run_id=run_id)
    charts = ChartProcess(the_app, None)
    if report:
        charts.start_soon()  # warms up while the results come
    with contextlib.ExitStack() as stack:
        stack.callback(charts.close)
        store = stack.enter_context(ResultStore(out / STORE_NAME))
        broker = KafkaBroker(
            settings,
            collector_group=collector_group(settings, run_id),
            start_positions=store.read_positions(run_id, settings.results_topic),
        )
        broker.run_id = run_id
        try:
            collected = collect_run(
                broker,
                store,
                run_id,
                app=the_app,
                progress=bars,
                on_tick=on_tick,
                on_progress=on_progress,
                timeout=timeout,
                dead_grace=dead_grace,
                wait_for_dispatch=wait_for_dispatch,
                identity=identity,
                inputs="kafka",
                where=settings.manifests_topic,
            )
        finally:
            broker.close()
        if on_collected is not None:
            on_collected()
        manifest = collected.manifest
        summary.rows_read = manifest.rows_read
        summary.rows_valid = manifest.rows_dispatched
        summary.rows_quarantined = manifest.rows_quarantined
        conclude(store, collected, the_app, out, report=report, summary=summary, charts=charts)
    summary.files["store"] = out / STORE_NAME
    summary.seconds["collect"] = time.perf_counter() - t0
    return summary


# -- worker -----------------------------------------------------------------------------


# -- run (all in one) -------------------------------------------------------------------


def worker_env(settings: KafkaSettings) -> dict[str, str]:
    """Environment that hands these settings to a child process (secrets stay off argv)."""
    env = dict(os.environ)
    env.pop("DISPATCHKIT_METRICS_PORT", None)  # the parent's port: a child would collide
    env["DISPATCHKIT_BOOTSTRAP_SERVERS"] = settings.bootstrap_servers
    for key, value in settings.options.items():
        name = "DISPATCHKIT_KAFKA_" + key.upper().replace(".", "_")
        env[name] = value.get() if isinstance(value, Secret) else value
    return env


def spawn_worker(
    settings: KafkaSettings,
    worker_id: str,
    *extra: str,
    env: dict[str, str] | None = None,
    supervised: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``dispatchkit worker`` as a separate OS process.

    ``supervised`` (a child this process stops, as ``run`` does): the worker gets a
    process group of its own, so a Ctrl-C at the terminal reaches only this process,
    which stops it with SIGTERM; and it dies with this process (PR_SET_PDEATHSIG plus
    a parent-pid check), even on kill -9.
    """
    base = env or worker_env(settings)
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
        env=procs.child_env(base) if supervised else base,
        process_group=0 if supervised else None,
    )


#: The dispatcher process's count of rows cut into jobs, shared with ``run_kafka``.
_rows_dispatched: Any = None


def _share_rows(counter: Any) -> None:
    """The dispatcher process's initializer: keep the shared row counter."""
    global _rows_dispatched
    _rows_dispatched = counter


class _SharedRows(NoProgress):
    """Progress of the dispatcher process: the rows it has cut, for the parent to show."""

    def advance(self, name: str, n: int = 1) -> None:
        if name == "dispatch" and _rows_dispatched is not None:
            with _rows_dispatched.get_lock():
                _rows_dispatched.value += n


def _dispatch_child(spec: RunSpec, settings: KafkaSettings, parent: int) -> RunSummary:
    """``dispatch`` in ``run_kafka``'s dispatcher process, under the parent's lock on --out."""
    procs.die_with_parent(parent)
    procs.child_signals()  # Ctrl-C is the parent's: it stops this process with SIGTERM
    logs.configure_from_env()
    outdir.inherit(spec.out, "dispatch", parent)
    return dispatch(spec, settings, _SharedRows())


def _dispatched(future: Future[RunSummary]) -> RunSummary:
    """The dispatcher child's summary; its abrupt end (killed, crashed) is one line."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise RunError(
            "the dispatcher process ended abruptly (killed?); rerun the same command: "
            "the run resumes where it stopped"
        ) from None


@outdir.holds_out_dir("run")  # both locks, in the parent; the dispatcher child inherits one
def run_kafka(spec: RunSpec, settings: KafkaSettings, bars: Progress | None = None) -> RunSummary:
    """Dispatcher, ``spec.workers`` worker processes and the collector, on one machine."""
    t0 = time.perf_counter()
    from dispatchkit.brokers.kafka.broker import ensure_topics

    app = load_app(spec.app)
    paths = inputs_of(spec, app)  # a mistyped path or task fails before any process starts
    ensure_topics(settings)
    protocol = run_protocol(settings)
    log.info("run: workers use the %s group protocol", protocol)
    extra = (
        "--attempts",
        str(spec.retry.attempts),
        "--group-protocol",
        protocol,
        *(("--app", app.spec) if app.spec else ()),
    )
    slots = [f"{os.getpid()}-{i}" for i in range(spec.workers)]
    children = [spawn_worker(settings, slot, *extra) for slot in slots]
    restarts = [0]

    def supervise() -> None:
        # Like any supervisor: a worker that exits is restarted in its slot.
        for i, p in enumerate(children):
            if p.poll() is not None:
                restarts[0] += 1
                if restarts[0] > 10 * spec.workers:
                    raise RunError(f"workers keep exiting (last exit code {p.returncode})")
                log.warning("worker %s exited with %s; restarting it", slots[i], p.returncode)
                children[i] = spawn_worker(settings, slots[i], *extra)

    # The dispatcher runs in its own process so the collector stores results meanwhile.
    progress = bars or NoProgress()
    ctx = mp.get_context("spawn")
    rows = ctx.Value("q", 0)
    progress.add("dispatch", None, "rows")
    progress.add("workers", spec.workers, "workers running", gauge=True)
    pool = ProcessPoolExecutor(
        max_workers=1, mp_context=ctx, initializer=_share_rows, initargs=(rows,)
    )
    try:
        run_id = prepare_run_id(spec)
        identity = spec_identity(spec, fingerprint(paths), app)
        with procs.signals_deferred():  # the child starts with Ctrl-C left to us
            dispatching = pool.submit(_dispatch_child, spec, settings, os.getpid())

        def tick() -> None:
            supervise()
            progress.update("dispatch", completed=rows.value)
            progress.update("workers", completed=sum(p.poll() is None for p in children))
            if dispatching.done() and dispatching.exception() is not None:
                _dispatched(dispatching)

        def stop_workers() -> None:
            # Nothing is left for them: they leave the group while the results are
            # exported (the finally below waits for them).
            for p in children:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)

        # No bound on the wait for the manifest: the dispatcher child is validating the
        # input meanwhile, and its failure ends the wait through tick().
        summary = collect(
            settings,
            run_id,
            spec.out,
            bars=bars,
            report=spec.report,
            on_tick=tick,
            wait_for_dispatch=None,
            identity=identity,
            app=app,
            on_collected=stop_workers,
        )
        sent = _dispatched(dispatching)
        summary.worker_restarts = restarts[0]
        # The dispatcher process's counts, as it reported them (its metrics are its own).
        metrics.rows_counted(app.name, sent.rows_read, sent.bad_rows)
        metrics.jobs_dispatched(app.name, spec.task, sent.jobs_sent)
    except BaseException:
        # Interrupted or failed: stop the dispatcher now rather than wait for it.
        for child in list(getattr(pool, "_processes", {}).values()):
            if child.is_alive():
                child.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for p in children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in children:
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
