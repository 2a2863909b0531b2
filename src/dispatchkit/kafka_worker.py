"""``dispatchkit worker``: one member of the workers' consumer group on Kafka.

Kept apart from the dispatcher and collector commands (:mod:`dispatchkit.kafka_run`): a
worker process loads only what computing jobs needs (the app, Arrow, the Kafka client),
not the input reader or the results store (DuckDB, Polars), so it starts in a fraction
of the time, which matters to every worker a ``run`` or an autoscaler starts.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from types import FrameType

from dispatchkit import logs, metrics, procs
from dispatchkit.app import load_app
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.brokers.kafka.source import KafkaJobSource, default_worker_id
from dispatchkit.brokers.kafka.status import worker_group
from dispatchkit.worker import RetryPolicy, Worker, WorkerStats, run

__all__ = ["WorkerOptions", "work"]

log = logging.getLogger("dispatchkit.kafka_run")


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
    #: The app by import path; ``None``: ``$DISPATCHKIT_APP`` or the built-in COVID app.
    app: str | None = None


def work(settings: KafkaSettings, options: WorkerOptions) -> WorkerStats:
    """Be a consumer-group member until SIGTERM/SIGINT (or drained, with ``burst``)."""
    worker_id = options.worker_id or default_worker_id()
    logs.set_context(worker=worker_id)
    worker = Worker(worker_id, options.retry, app=load_app(options.app))  # fail before joining
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
        metrics.set_draining()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    idle_since = [time.monotonic()]

    lag = metrics.LagProbe(source.lag)

    def should_stop() -> bool:
        metrics.set_ready("worker", source.joined)
        lag.tick()
        return bool(stopping) or procs.orphaned()  # a run that started us is gone

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
            worker,
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
