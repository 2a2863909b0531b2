"""The dispatcher: cut validated input rows into atomic jobs and pack them into batches.

Data flow::

    input files ──reader──▶ valid rows sorted by (country, hour)  ──cut──▶ Job per key
                   └──────▶ quarantine.parquet/.csv (bad rows)           │
                                                                        ▼
                                              JobBatch per (country, UTC day) ──▶ broker

A job is keyed by ``(country, date_hour)``: every test of one country in one UTC hour.
Its id is a hash of the run id and the key, so the same run always gives the same ids
and a job redone anywhere lands on the same row of the store. A job only carries what
the task needs: the outcomes, one bit per test.

Memory is bounded: the reader streams the rows already sorted (DuckDB sorts out of core
and spills to disk past its memory limit), and the cutter holds one record batch plus the
rows of the current key. Keys with more outcomes than fit in one message are cut into
parts that the store adds back together.

The dispatcher never touches a broker: :meth:`Dispatcher.batches` is an iterator that the
run (embedded or Kafka) publishes, and jobs already done can be skipped for a resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from dispatchkit.errors import RunError, UsageError
from dispatchkit.message import SCHEMA_VERSION, Job, JobBatch
from dispatchkit.reader import HOUR_BIAS, InputReader

#: Kafka's default message limit is 1 MB; leave room for the envelope and headers.
DEFAULT_MAX_MESSAGE_BYTES = 900_000
#: Jobs per batch are also capped so a batch stays a small unit of work.
DEFAULT_MAX_JOBS_PER_BATCH = 48
_JOB_OVERHEAD = 96  # msgpack bytes of one job's fields besides its outcomes
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def job_id(run_id: str, country: str, date_hour: int) -> str:
    """The deterministic id of the job for ``(country, date_hour)`` in a run."""
    key = f"{run_id}\x1f{country}\x1f{date_hour}".encode()
    return hashlib.blake2b(key, digest_size=10).hexdigest()


def batch_key(batch: JobBatch) -> bytes:
    """The transport key of a batch: its country and UTC day (one job key → one message key)."""
    first = batch.jobs[0]
    day = _utc(first.date_hour).date().isoformat()
    return f"{first.country}|{day}".encode()


def iso_hour(date_hour: int) -> str:
    """``2020-03-01T05:00:00Z`` for an epoch second (before 1970 too)."""
    return _utc(date_hour).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc(epoch_second: int) -> datetime:
    # Exact integer arithmetic on any platform; fromtimestamp() refuses negative times on some.
    return _EPOCH + timedelta(seconds=epoch_second)


@dataclass
class DispatchStats:
    """What one pass of the dispatcher produced; ``rows_cut`` counts skipped jobs' rows too."""

    rows_cut: int = 0
    rows_sent: int = 0
    jobs: int = 0
    jobs_sent: int = 0
    jobs_skipped: int = 0
    parts: int = 0
    parts_sent: int = 0
    batches: int = 0
    split_jobs: int = 0
    countries: list[str] = field(default_factory=list)


class Dispatcher:
    """Cuts the sorted valid rows of an :class:`InputReader` into job batches."""

    def __init__(
        self,
        reader: InputReader,
        *,
        run_id: str,
        task: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_jobs_per_batch: int = DEFAULT_MAX_JOBS_PER_BATCH,
    ) -> None:
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        self.reader = reader
        self.run_id = run_id
        self.task = task
        self.max_message_bytes = max_message_bytes
        self.max_jobs_per_batch = max_jobs_per_batch
        # Outcome bytes one job part may carry, so that a one-job batch fits a message.
        self.max_part_bytes = max_message_bytes - 256 - len(run_id) - _JOB_OVERHEAD
        if self.max_part_bytes < 1:
            raise UsageError(f"max_message_bytes {max_message_bytes} cannot carry one job")
        self.stats = DispatchStats()

    def batches(
        self,
        skip: Container[tuple[str, int]] = frozenset(),
        on_rows: Callable[[int], None] | None = None,
        skip_parts: Container[tuple[str, int, int]] = frozenset(),
    ) -> Iterator[JobBatch]:
        """Yield job batches in (country, hour) order, leaving out keys in ``skip``.

        ``skip`` holds ``(country, date_hour)`` of jobs already complete (a resume);
        ``skip_parts`` holds ``(country, date_hour, part)`` of parts already published.
        ``on_rows`` is called with the number of rows cut from each record batch.
        """
        pending: list[Job] = []
        pending_day = (-1, 0)
        pending_bytes = 0

        def flush() -> Iterator[JobBatch]:
            nonlocal pending, pending_bytes
            if pending:
                first = pending[0]
                self.stats.batches += 1
                yield JobBatch(
                    v=SCHEMA_VERSION,
                    run_id=self.run_id,
                    batch_id=f"{first.job_id}.{first.part}",
                    task=self.task,
                    jobs=pending,
                )
            pending, pending_bytes = [], 0

        rows_per_part = self.max_part_bytes * 8
        countries = self.reader.countries
        stats = self.stats
        for cid, hour, n, packed, outcomes in self._keys(on_rows):
            country = countries[cid]
            date_hour = hour * 3600
            stats.jobs += 1
            stats.rows_cut += n
            if (country, date_hour) in skip:
                stats.jobs_skipped += 1
                continue
            stats.jobs_sent += 1
            stats.rows_sent += n
            if n <= rows_per_part:
                stats.parts += 1
                jobs = [
                    Job(
                        job_id(self.run_id, country, date_hour), country, date_hour, 0, 1, n, packed
                    )
                ]
            else:
                jobs = self._parts(country, date_hour, outcomes)
            day = (cid, hour // 24)  # floor: hours before 1970 are negative
            for job in jobs:
                if skip_parts and (country, date_hour, job.part) in skip_parts:
                    continue
                stats.parts_sent += 1
                size = len(job.outcomes) + _JOB_OVERHEAD
                if (
                    day != pending_day
                    or len(pending) >= self.max_jobs_per_batch
                    or pending_bytes + size > self.max_part_bytes
                ):
                    yield from flush()
                    pending_day = day
                pending.append(job)
                pending_bytes += size
        yield from flush()
        self.stats.countries = list(self.reader.countries)

    def _parts(self, country: str, date_hour: int, outcomes: npt.NDArray[np.bool_]) -> list[Job]:
        jid = job_id(self.run_id, country, date_hour)
        rows_per_part = self.max_part_bytes * 8
        n = int(outcomes.size)
        parts = max(1, -(-n // rows_per_part))
        self.stats.parts += parts
        if parts > 1:
            self.stats.split_jobs += 1
        return [
            Job(
                job_id=jid,
                country=country,
                date_hour=date_hour,
                part=i,
                parts=parts,
                n=int(chunk.size),
                outcomes=np.packbits(chunk).tobytes(),
            )
            for i, chunk in enumerate(
                outcomes[k : k + rows_per_part] for k in range(0, n, rows_per_part)
            )
        ]

    def _keys(
        self, on_rows: Callable[[int], None] | None
    ) -> Iterator[tuple[int, int, int, bytes, npt.NDArray[np.bool_]]]:
        """Yield ``(cid, hour, n, packed outcomes, outcomes)`` once per key, in key order.

        ``hour`` counts hours since the epoch (negative before 1970): the reader's key is
        ``cid << 32 | hour + HOUR_BIAS``.

        Each record batch is cut at key changes and all its complete keys are bit-packed
        in one vectorized pass; the last key of a batch may continue in the next, so its
        rows are carried over and cut with the next batch.
        """
        carry_key = np.empty(0, np.int64)
        carry_pos = np.empty(0, np.bool_)
        last = -1
        for batch in self.reader.sorted_valid():
            if batch.num_rows == 0:
                continue
            key = _values(batch.column(0), np.int64)
            pos = _values(batch.column(1), np.uint8).view(np.bool_)
            # Cutting relies on the sort: a key seen again later would become a second job
            # with the same id, and the store would keep only one of them.
            if key[0] < last or bool((key[1:] < key[:-1]).any()):
                raise RunError("internal check failed: input rows did not arrive sorted by key")
            last = int(key[-1])
            if carry_key.size:
                key = np.concatenate((carry_key, key))
                pos = np.concatenate((carry_pos, pos))
            cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
            starts = np.concatenate(([0], cuts))
            # The last key may go on in the next batch: carry it.
            tail = int(starts[-1])
            carry_key, carry_pos = key[tail:], pos[tail:]
            if starts.size > 1:
                yield from _pack(key[:tail], pos[:tail], starts[:-1], cuts)
            if on_rows is not None:
                on_rows(batch.num_rows)
        if carry_key.size:
            yield from _pack(carry_key, carry_pos, np.array([0]), np.array([carry_key.size]))


def _values(column: Any, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """A fixed-width Arrow column without nulls, as a zero-copy numpy view.

    Not ``to_numpy()``: where pandas is installed, pyarrow imports it on first use, which
    costs a dispatcher 0.3-1 s (and pandas is not even a dependency of dispatchkit).
    """
    if column.null_count:
        raise RunError("internal check failed: a null among the sorted job keys")
    width = np.dtype(dtype).itemsize
    return np.frombuffer(
        column.buffers()[1], dtype=dtype, count=len(column), offset=column.offset * width
    )


def _pack(
    key: npt.NDArray[np.int64],
    pos: npt.NDArray[np.bool_],
    starts: npt.NDArray[np.int64],
    ends: npt.NDArray[np.int64],
) -> Iterator[tuple[int, int, int, bytes, npt.NDArray[np.bool_]]]:
    """Bit-pack every key segment ``[starts[i], ends[i])`` at once, one byte-aligned run each."""
    lens = ends - starts
    nbytes = (lens + 7) // 8
    byte_off = np.zeros(lens.size + 1, np.int64)
    np.cumsum(nbytes, out=byte_off[1:])
    # Row r of segment s goes to bit byte_off[s] * 8 + (r - starts[s]).
    seg = np.repeat(np.arange(lens.size), lens)
    bit = byte_off[seg] * 8 + (np.arange(pos.size) - starts[seg])
    bits = np.zeros(int(byte_off[-1]) * 8, np.bool_)
    bits[bit] = pos
    packed = np.packbits(bits).tobytes()
    seg_key = key[starts]
    for k, a, b, n, lo, hi in zip(
        seg_key.tolist(),
        starts.tolist(),
        ends.tolist(),
        lens.tolist(),
        byte_off[:-1].tolist(),
        byte_off[1:].tolist(),
        strict=True,
    ):
        yield (k >> 32, (k & 0xFFFFFFFF) - HOUR_BIAS, n, packed[lo:hi], pos[a:b])
