"""Prometheus metrics and health endpoints of the long-running processes.

The metric objects live here, in the default ``prometheus_client`` registry, next to
the tiny hook functions the core loops call (the reader's counts, the dispatcher, the
worker loop, the collector loop): each hook is a few counter increments per *message*,
never per row, so they cost nothing next to encoding one. Labels are bounded: the app,
the task, a quarantine reason, a role; never a job, key or worker id (one process is
one worker: the scrape target names it).

:func:`serve` answers ``/metrics`` (Prometheus text format, or OpenMetrics when asked),
``/healthz/live`` (200 while the process runs) and ``/healthz/ready`` (200 while the
process does its work — a worker in its consumer group, a collector with its store
open, a dispatcher publishing; 503 before that, after it, and while draining after
SIGTERM). The CLI starts it for ``--metrics-port``; nothing here imports the CLI.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder

__all__ = [
    "MetricsServer",
    "is_ready",
    "serve",
    "set_draining",
    "set_ready",
]

_BYTES_BUCKETS = (1e3, 4e3, 16e3, 64e3, 128e3, 256e3, 512e3, 1e6, 2e6, 4e6, 16e6)
_SECONDS_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    30.0,
    120.0,
    600.0,
)

BUILD = Info("dispatchkit_build", "dispatchkit's version")

ROWS_READ = Counter("dispatchkit_rows_read", "Input rows read and checked", ["app"])
ROWS_QUARANTINED = Counter(
    "dispatchkit_rows_quarantined",
    "Input rows set aside in the quarantine, by the rule they broke",
    ["app", "reason"],
)
JOBS_DISPATCHED = Counter(
    "dispatchkit_jobs_dispatched", "Jobs cut and sent to the workers", ["app", "task"]
)
JOBS_PROCESSED = Counter(
    "dispatchkit_jobs_processed",
    "Jobs (or parts of split jobs) computed and handed back by this worker",
    ["app", "task"],
)
JOBS_RETRIED = Counter(
    "dispatchkit_jobs_retried", "Retries of failing jobs (one per extra attempt)", ["app", "task"]
)
JOBS_DEAD_LETTERED = Counter(
    "dispatchkit_jobs_dead_lettered",
    "Jobs set aside in the dead letters after their retries",
    ["app", "task"],
)
MESSAGES = Counter(
    "dispatchkit_messages",
    "Messages sent or received: kind job, result, dead_letter or poison; role "
    "dispatcher, worker or collector",
    ["role", "kind"],
)
#: Its ``_sum`` is the bytes of the messages counted by ``dispatchkit_messages_total``.
MESSAGE_BYTES = Histogram(
    "dispatchkit_message_size_bytes",
    "Size of one message (the _sum: their bytes)",
    ["role", "kind"],
    buckets=_BYTES_BUCKETS,
)
JOB_DURATION = Histogram(
    "dispatchkit_job_duration_seconds",
    "Compute time per job: a job message's handling time shared among its jobs",
    ["app", "task"],
    buckets=_SECONDS_BUCKETS,
)
BATCH_DURATION = Histogram(
    "dispatchkit_batch_duration_seconds",
    "Time a worker took to handle one job message (decode, compute, encode, hand back)",
    ["app", "task"],
    buckets=_SECONDS_BUCKETS,
)
JOBS_IN_PROGRESS = Gauge("dispatchkit_jobs_in_progress", "Jobs this worker is computing now")
CONSUMER_LAG = Gauge(
    "dispatchkit_consumer_lag_messages",
    "Job messages not yet consumed on this worker's assigned partitions (summed)",
)
RUN_JOBS = Gauge(
    "dispatchkit_run_jobs", "The collected run's jobs: state total or done (stored)", ["state"]
)
RUN_PARTS = Gauge(
    "dispatchkit_run_parts",
    "The collected run's job parts: state total (once dispatched) or done (stored)",
    ["state"],
)
READY = Gauge("dispatchkit_ready", "1 while /healthz/ready answers 200, else 0")


# -- readiness ----------------------------------------------------------------------------

_ready: dict[str, bool] = {}
_draining = [False]


def set_ready(role: str, ready: bool) -> None:
    """Say whether ``role`` (worker, collector, dispatcher) is doing its work now."""
    _ready[role] = ready


def set_draining() -> None:
    """SIGTERM (or Ctrl-C) came: not ready any more, whatever the roles say."""
    _draining[0] = True


def is_ready() -> bool:
    """Ready: not draining, and some role of this process says it is doing its work."""
    ready = not _draining[0] and any(_ready.values())
    READY.set(1 if ready else 0)
    return ready


def reset() -> None:
    """Forget readiness and draining (a process that serves more than once: the tests)."""
    _ready.clear()
    _draining[0] = False


# -- hooks of the core loops --------------------------------------------------------------


def rows_counted(app: str, rows_read: int, bad: Mapping[str, int]) -> None:
    """The reader checked an input: ``rows_read`` rows, ``bad`` of them per reason."""
    ROWS_READ.labels(app).inc(rows_read)
    for reason, n in bad.items():
        ROWS_QUARANTINED.labels(app, reason).inc(n)


class DispatchMeter:
    """The dispatcher's counters, bound to its app and task (one lookup, not per message)."""

    def __init__(self, app: str, task: str) -> None:
        self._jobs = JOBS_DISPATCHED.labels(app, task)
        self._flow = _Flow("dispatcher", "job")
        self._jobs_seen = 0

    def sent(self, size: int, jobs_sent: int) -> None:
        """One job message of ``size`` bytes; ``jobs_sent``: the dispatcher's running total."""
        self._flow.add(size)
        if jobs_sent > self._jobs_seen:
            self._jobs.inc(jobs_sent - self._jobs_seen)
            self._jobs_seen = jobs_sent


def jobs_dispatched(app: str, task: str, jobs: int) -> None:
    """Jobs another process dispatched, counted here once it reports them."""
    JOBS_DISPATCHED.labels(app, task).inc(jobs)


class _Flow:
    """The metrics of one (role, kind) of message, bound once."""

    def __init__(self, role: str, kind: str) -> None:
        self.messages = MESSAGES.labels(role, kind)
        self.sizes = MESSAGE_BYTES.labels(role, kind)

    def add(self, size: int) -> None:
        self.messages.inc()
        self.sizes.observe(size)


class _TaskMetrics:
    """A worker's metrics of one (app, task), bound once: a label lookup takes a lock."""

    def __init__(self, app: str, task: str) -> None:
        self.batch = BATCH_DURATION.labels(app, task)
        self.job = JOB_DURATION.labels(app, task)
        self.processed = JOBS_PROCESSED.labels(app, task)
        self.dead = JOBS_DEAD_LETTERED.labels(app, task)


_JOBS_IN = _Flow("worker", "job")
_RESULTS_OUT = _Flow("worker", "result")
_DEAD_OUT = _Flow("worker", "dead_letter")
_RESULTS_IN = MESSAGES.labels("collector", "result")
_POISON = MESSAGES.labels("worker", "poison")
_by_task: dict[tuple[str, str], _TaskMetrics] = {}


def _task_metrics(app: str, task: str) -> _TaskMetrics:
    found = _by_task.get((app, task))
    if found is None:
        found = _by_task[(app, task)] = _TaskMetrics(app, task)
    return found


def job_message_in(size: int) -> None:
    """A worker received a job message of ``size`` bytes."""
    _JOBS_IN.add(size)


def computing(jobs: int) -> None:
    """A worker computes ``jobs`` jobs now (0: nothing)."""
    JOBS_IN_PROGRESS.set(jobs)


def job_retried(app: str, task: str) -> None:
    JOBS_RETRIED.labels(app, task).inc()  # rare: a failing job


def batch_handled(
    app: str,
    task: str,
    seconds: float,
    *,
    jobs: int,
    dead: int,
    result_bytes: int,
    dead_bytes: int,
) -> None:
    """A worker handled one job message: ``jobs`` done, ``dead`` dead-lettered."""
    m = _task_metrics(app, task)
    m.batch.observe(seconds)
    n = jobs + dead
    if n:
        observe_many(m.job, seconds / n, n)
    m.processed.inc(jobs)
    if result_bytes:
        _RESULTS_OUT.add(result_bytes)
    if dead:
        m.dead.inc(dead)
        _DEAD_OUT.add(dead_bytes)


def poison_message() -> None:
    """A worker received bytes that are no job message (sent to the dead letters)."""
    _POISON.inc()


def observe_many(hist: Histogram, value: float, count: int) -> None:
    """``count`` observations of ``value`` at the cost of one (a batch of equal jobs)."""
    buckets = getattr(hist, "_buckets", None)
    bounds = getattr(hist, "_upper_bounds", None)
    total = getattr(hist, "_sum", None)
    if buckets is None or bounds is None or total is None:  # another client version
        for _ in range(count):
            hist.observe(value)
        return
    total.inc(value * count)
    for i, bound in enumerate(bounds):
        if value <= bound:
            buckets[i].inc(count)
            break


def result_message_in() -> None:
    """The collector received one result message."""
    _RESULTS_IN.inc()


def run_progress(
    *,
    jobs_done: int | None = None,
    jobs_total: int | None = None,
    parts_done: int | None = None,
    parts_total: int | None = None,
) -> None:
    """The collected run's totals and what is stored of them."""
    if jobs_done is not None:
        RUN_JOBS.labels("done").set(jobs_done)
    if jobs_total is not None:
        RUN_JOBS.labels("total").set(jobs_total)
    if parts_done is not None:
        RUN_PARTS.labels("done").set(parts_done)
    if parts_total:  # 0 until the run is dispatched
        RUN_PARTS.labels("total").set(parts_total)


class LagProbe:
    """Sets the consumer-lag gauge from ``lag()`` at most every ``every`` seconds."""

    def __init__(self, lag: Callable[[], int | None], every: float = 2.0) -> None:
        self._lag = lag
        self._every = every
        self._last = float("-inf")

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            return
        self._last = now
        value = self._lag()
        if value is not None:
            CONSUMER_LAG.set(value)


# -- the HTTP server ----------------------------------------------------------------------


class MetricsServer:
    """A running endpoint (:func:`serve`); :meth:`close` stops it and frees the port."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    port: int, ready: Callable[[], bool] = is_ready, *, host: str = "", version: str = ""
) -> MetricsServer:
    """Answer ``/metrics``, ``/healthz/live`` and ``/healthz/ready`` on ``port`` (on a
    daemon thread) until :meth:`MetricsServer.close`; raises ``OSError`` if the port is
    taken. ``host`` ``""`` listens on every interface, as a scrape target in a pod must;
    ``version`` is dispatchkit's, for ``dispatchkit_build_info``."""
    if version:
        BUILD.info({"version": version})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                is_ready()  # the dispatchkit_ready gauge as of this scrape
                self._answer(200, encoder(REGISTRY), content_type)
            elif path == "/healthz/live":
                self._answer(200, b"live\n")
            elif path == "/healthz/ready":
                ok = ready()
                self._answer(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._answer(404, b"not found: /metrics, /healthz/live, /healthz/ready\n")

        def _answer(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds is no news

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever,
        name="dispatchkit-metrics",
        kwargs={"poll_interval": 0.5},
        daemon=True,
    )
    thread.start()
    return MetricsServer(httpd, thread)
