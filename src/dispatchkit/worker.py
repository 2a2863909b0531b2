"""The worker: take one job message at a time, run the app's task, hand back the results.

:class:`Worker` is transport-free: :meth:`Worker.handle` turns an encoded job message
(wire v3) into an encoded result message, using the task's vectorized form when it has
one, retrying a failing job with capped exponential backoff and
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
from typing import Any

import pyarrow as pa

from dispatchkit import arrays, faults, logs, metrics, wire
from dispatchkit.app import App, Jobs, ResultError, Task, load_app
from dispatchkit.brokers.base import Delivery, JobSource, Rejection
from dispatchkit.errors import DecodeError, DispatchkitError, MisdeployedError, TaskError
from dispatchkit.keys import key_text

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
    task: str = ""
    dead: int = 0  # jobs in ``failed``


@dataclass
class WorkerStats:
    batches: int = 0
    jobs: int = 0
    rejected: int = 0
    dead_jobs: int = 0
    started: float = field(default_factory=time.monotonic)


class Worker:
    """Runs an app's tasks on job messages; knows nothing about the transport."""

    def __init__(
        self,
        worker_id: str,
        retry: RetryPolicy | None = None,
        *,
        app: App | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.worker_id = worker_id
        self.retry = retry or RetryPolicy()
        self.app = app if app is not None else load_app(None)
        self.sleep = sleep

    def check(self, msg: wire.JobMessage) -> Task:
        """The task a message asks for, or :class:`MisdeployedError` if this worker lacks it."""
        app = self.app
        if msg.app != app.name:
            raise MisdeployedError(
                f"batch {msg.batch_id} of run {msg.run_id!r} is for app {msg.app!r}; this "
                f"worker runs app {app.name!r} ({app.spec or 'given'}): start it with --app "
                "for that app"
            )
        if msg.task not in app.tasks:
            raise MisdeployedError(
                f"batch {msg.batch_id} of run {msg.run_id!r} asks for task {msg.task!r}, which "
                f"app {app.name!r} here does not have (it has: {', '.join(app.tasks)})"
            )
        if msg.fingerprint != app.fingerprint:
            raise MisdeployedError(
                f"batch {msg.batch_id} of run {msg.run_id!r} was made by app {app.name!r} "
                f"{msg.fingerprint}; this worker runs {app.fingerprint}: deploy the same code"
            )
        return app.get_task(msg.task)

    def handle(self, payload: bytes) -> Handled:
        """Compute a job message; raises :class:`DecodeError` for bytes that are not one,
        :class:`MisdeployedError` for a job of other code."""
        msg = wire.decode_jobs(payload)
        metrics.computing(len(msg))
        with logs.context(run=msg.run_id, batch=msg.batch_id):
            return self._handle(msg)

    def _handle(self, msg: wire.JobMessage) -> Handled:
        task = self.check(msg)
        faults.maybe_sleep()
        keys = msg.keys()
        rows = pa.Table.from_batches([msg.table])
        n = len(msg)
        split = n == 1 and int(msg.parts[0]) > 1
        outcome: list[Any] = [None] * n  # a result row, a state row, or a Failure
        if not split and not faults.enabled() and task.vectorized_fn is not None:
            try:
                values = task.run_jobs(Jobs(keys=keys, rows=rows, offsets=msg.offsets))
            except Exception as exc:  # find the failing job(s) one at a time
                log.warning("batch %s: vectorized task failed (%r); job by job", msg.batch_id, exc)
            else:
                faults.crash_point("worker.after_compute")
                return self._encode(msg, list(range(n)), keys, values, None, [], rows)
        raw: list[Any] = []  # the per-job form's rows, computed and not yet checked
        if not split and not faults.enabled():
            raw = _run_plain(task, keys, rows, msg.offsets)
            if len(raw) == n:
                values = task.rows_table(raw)
                if values is not None:
                    faults.crash_point("worker.after_compute")
                    return self._encode(msg, list(range(n)), keys, values, None, [], rows)
        # Job by job: a job that raised (and those after it) with retries, and each row
        # checked on its own, so a wrong row fails its job only and is named.
        first_failure = 0.0
        last_error: BaseException | None = None
        failed: list[wire.Failure] = []
        for i, job in enumerate(msg.jobs):
            key = _key_dict(keys, i)
            part_rows = rows.slice(int(msg.offsets[i]), int(msg.offsets[i + 1] - msg.offsets[i]))
            attempts = self.retry.attempts
            for attempt in range(1, attempts + 1):
                try:
                    faults.maybe_fail_job(key)
                    if split:
                        outcome[i] = task.part_state(part_rows)
                    elif i < len(raw) and attempt == 1:
                        outcome[i] = task.check_row(raw[i])
                    else:
                        outcome[i] = task.run_one(key, part_rows)
                    break
                except Exception as exc:
                    first_failure = first_failure or time.time()
                    last_error = exc
                    log.warning(
                        "job %s (%s) failed, attempt %d/%d: %r",
                        job.job_id,
                        key_text(key),
                        attempt,
                        attempts,
                        exc,
                    )
                    if isinstance(exc, ResultError):
                        break  # the same code gives the same wrong result: no retry
                    if attempt < attempts:
                        metrics.job_retried(msg.app, msg.task)
                        self.sleep(compute_backoff(attempt, self.retry))
            if outcome[i] is None:
                assert last_error is not None
                failed.append(
                    wire.Failure(
                        job_id=job.job_id,
                        part=job.part,
                        parts=job.parts,
                        error_class=type(last_error).__name__,
                        error=str(last_error)[:500],
                        attempts=attempt,
                        first_failure=first_failure,
                    )
                )
        faults.crash_point("worker.after_compute")
        done = [i for i in range(n) if outcome[i] is not None]
        if split:
            state_schema = task.combine.schema if task.combine is not None else None
            states = (
                pa.Table.from_pylist([outcome[i] for i in done], schema=state_schema)
                if state_schema is not None
                else None
            )
            values = None
        else:
            values = pa.Table.from_pylist([outcome[i] for i in done], schema=task.result)
            states = None
        done_keys = keys.take(arrays.array(done, pa.int64()))
        return self._encode(msg, done, done_keys, values, states, failed, rows)

    def _encode(
        self,
        msg: wire.JobMessage,
        done: list[int],
        keys: pa.Table,
        values: pa.Table | None,
        states: pa.Table | None,
        failed: list[wire.Failure],
        rows: pa.Table,
    ) -> Handled:
        """The result message of the jobs ``done``, and a dead letter of the others."""
        entries = msg.entries(None if len(done) == len(msg) else done)
        result = wire.encode_results(
            run_id=msg.run_id,
            batch_id=msg.batch_id,
            worker=self.worker_id,
            app=msg.app,
            task=msg.task,
            fingerprint=msg.fingerprint,
            results=entries,
            keys=keys,
            values=values,
            states=states,
            failed=failed,
        )
        if not failed:
            return Handled(result=result, jobs=entries.num_rows, task=msg.task)
        dead = [i for i in range(len(msg)) if i not in set(done)]
        at, moved, slices = 0, [], []
        for i in dead:
            j = msg.jobs[i]
            a, b = int(msg.offsets[i]), int(msg.offsets[i + 1])
            slices.append(rows.slice(a, b - a))
            moved.append(wire.JobEntry(j.job_id, j.part, j.parts, at, at + b - a, j.key))
            at += b - a
        dead_payload = wire.encode_jobs(
            run_id=msg.run_id,
            batch_id=msg.batch_id + ".failed",
            app=msg.app,
            task=msg.task,
            fingerprint=msg.fingerprint,
            key_names=msg.key_names,
            key_types=msg.key_types,
            jobs=moved,
            table=pa.concat_tables(slices),
        )
        last = failed[-1]
        return Handled(
            result=result,
            jobs=entries.num_rows,
            task=msg.task,
            dead=len(failed),
            failed=dead_payload,
            rejection=Rejection(
                error_class=last.error_class,
                error=last.error,
                attempts=last.attempts,
                first_failure=min(f.first_failure for f in failed),
            ),
        )


def _run_plain(task: Task, keys: pa.Table, rows: pa.Table, offsets: Any) -> list[Any]:
    """The per-job form over every job of a message, in one tight loop, unchecked.

    Stops at the first job that raises and returns the rows before it: the caller goes
    on job by job from there (with retries and the failure's log line).
    """
    fn, convert = task.fn, task.convert
    bounds = offsets.tolist()
    out: list[Any] = []
    try:
        view = task.select_rows(rows)
        for i, key in enumerate(keys.to_pylist()):
            a = bounds[i]
            out.append(fn(key, convert(view.slice(a, bounds[i + 1] - a))))
    except Exception:
        pass
    return out


def _key_dict(keys: pa.Table, i: int) -> dict[str, Any]:
    return {name: keys.column(name)[i].as_py() for name in keys.column_names}


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
    t0 = time.perf_counter()
    metrics.job_message_in(len(delivery.payload))
    try:
        handled = source.process(lambda: worker.handle(delivery.payload), delivery)
    except DecodeError as exc:
        log.error("poison message %s: %s", delivery.token, exc)
        source.reject(delivery, Rejection("DecodeError", str(exc)[:500], 1, time.time()))
        stats.rejected += 1
        metrics.poison_message()
        return
    except MisdeployedError:
        raise  # leave the job for a worker with the right code
    except DispatchkitError as exc:  # pragma: no cover - handle() raises only these
        raise TaskError(str(exc)) from exc
    failed = None
    if handled.failed is not None and handled.rejection is not None:
        failed = (handled.failed, handled.rejection)
        stats.dead_jobs += 1
    source.ack(delivery, handled.result, failed)
    stats.batches += 1
    stats.jobs += handled.jobs
    metrics.batch_handled(
        worker.app.name,
        handled.task,
        time.perf_counter() - t0,
        jobs=handled.jobs,
        dead=handled.dead,
        result_bytes=len(handled.result),
        dead_bytes=len(handled.failed or b""),
    )
    metrics.computing(0)
