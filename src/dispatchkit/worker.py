"""The worker: take one job batch at a time, run its task, hand back the results.

:class:`Worker` is transport-free: :meth:`Worker.handle` turns an encoded job batch into
an encoded result batch, retrying a failing job with capped exponential backoff and
full jitter, and setting aside jobs that still fail. :func:`run` is the loop every
transport shares: consume → handle → ack (or reject), until stopped or, with ``burst``,
until the source is drained.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dispatchkit import faults
from dispatchkit.brokers.base import Delivery, JobSource, Rejection
from dispatchkit.errors import DecodeError, DispatchkitError, TaskError
from dispatchkit.message import (
    SCHEMA_VERSION,
    JobBatch,
    JobResult,
    ResultBatch,
    decode,
    encode,
)
from dispatchkit.task import TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing job is retried before it is dead-lettered."""

    attempts: int = 3
    base_delay: float = 0.05
    max_delay: float = 2.0


def compute_backoff(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Seconds before retry ``attempt`` (1-based): full jitter under a capped exponential."""
    ceiling = min(policy.max_delay, policy.base_delay * (2 ** (attempt - 1)))
    return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True)
class Handled:
    """What handling one delivery produced: results, and jobs set aside after retries."""

    result: bytes
    jobs: int
    failed: bytes | None = None
    rejection: Rejection | None = None


@dataclass
class WorkerStats:
    batches: int = 0
    jobs: int = 0
    rejected: int = 0
    dead_jobs: int = 0
    started: float = field(default_factory=time.monotonic)


class Worker:
    """Runs tasks on job batches; knows nothing about the transport."""

    def __init__(
        self,
        worker_id: str,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.worker_id = worker_id
        self.retry = retry or RetryPolicy()
        self.sleep = sleep

    def handle(self, payload: bytes) -> Handled:
        """Compute a job batch; raises :class:`DecodeError` for a message that is not one."""
        batch = decode(payload, JobBatch)
        task = TASKS.get(batch.task)
        if task is None:
            raise DecodeError(f"batch {batch.batch_id} names unknown task {batch.task!r}")
        faults.maybe_sleep()
        results: list[JobResult] = []
        failed = []
        first_failure = 0.0
        last_error: BaseException | None = None
        for job in batch.jobs:
            for attempt in range(1, self.retry.attempts + 1):
                try:
                    faults.maybe_fail_job(job.country, job.date_hour)
                    results.append(task(job))
                    break
                except Exception as exc:
                    first_failure = first_failure or time.time()
                    last_error = exc
                    log.warning(
                        "job %s (%s %s) failed, attempt %d/%d: %r",
                        job.job_id,
                        job.country,
                        job.date_hour,
                        attempt,
                        self.retry.attempts,
                        exc,
                    )
                    if attempt < self.retry.attempts:
                        self.sleep(compute_backoff(attempt, self.retry))
            else:
                failed.append(job)
        faults.crash_point("worker.after_compute")
        result = encode(
            ResultBatch(
                v=SCHEMA_VERSION,
                run_id=batch.run_id,
                batch_id=batch.batch_id,
                worker=self.worker_id,
                results=results,
            )
        )
        if not failed:
            return Handled(result=result, jobs=len(results))
        assert last_error is not None
        dead = encode(
            JobBatch(
                v=SCHEMA_VERSION,
                run_id=batch.run_id,
                batch_id=batch.batch_id + ".failed",
                task=batch.task,
                jobs=failed,
            )
        )
        return Handled(
            result=result,
            jobs=len(results),
            failed=dead,
            rejection=Rejection(
                error_class=type(last_error).__name__,
                error=str(last_error)[:500],
                attempts=self.retry.attempts,
                first_failure=first_failure,
            ),
        )


def run(
    source: JobSource,
    worker: Worker,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    burst: bool = False,
    poll_timeout: float = 0.2,
    on_batch: Callable[[int], None] | None = None,
) -> WorkerStats:
    """Consume, handle and ack until ``should_stop()`` (checked between jobs) or drained."""
    stats = WorkerStats()
    try:
        while not should_stop():
            delivery = source.consume(poll_timeout)
            if delivery is None:
                source.checkpoint()
                if burst and source.drained():
                    break
                continue
            _handle_one(source, worker, delivery, stats)
            if on_batch is not None:
                on_batch(stats.jobs)
        source.checkpoint()
    finally:
        source.close()
    return stats


def _handle_one(source: JobSource, worker: Worker, delivery: Delivery, stats: WorkerStats) -> None:
    try:
        handled = source.process(lambda: worker.handle(delivery.payload), delivery)
    except DecodeError as exc:
        log.error("poison message %s: %s", delivery.token, exc)
        source.reject(delivery, Rejection("DecodeError", str(exc)[:500], 1, time.time()))
        stats.rejected += 1
        return
    except DispatchkitError as exc:  # pragma: no cover - handle() raises only DecodeError
        raise TaskError(str(exc)) from exc
    failed = None
    if handled.failed is not None and handled.rejection is not None:
        failed = (handled.failed, handled.rejection)
        stats.dead_jobs += 1
    source.ack(delivery, handled.result, failed)
    stats.batches += 1
    stats.jobs += handled.jobs
