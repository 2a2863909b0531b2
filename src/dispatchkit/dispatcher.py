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
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from dispatchkit.errors import RunError
from dispatchkit.message import SCHEMA_VERSION, Job, JobBatch
from dispatchkit.reader import InputReader

#: Kafka's default message limit is 1 MB; leave room for the envelope and headers.
DEFAULT_MAX_MESSAGE_BYTES = 900_000
#: Jobs per batch are also capped so a batch stays a small unit of work.
DEFAULT_MAX_JOBS_PER_BATCH = 48
_JOB_OVERHEAD = 96  # msgpack bytes of one job's fields besides its outcomes


def job_id(run_id: str, country: str, date_hour: int) -> str:
    """The deterministic id of the job for ``(country, date_hour)`` in a run."""
    key = f"{run_id}\x1f{country}\x1f{date_hour}".encode()
    return hashlib.blake2b(key, digest_size=10).hexdigest()


def batch_key(batch: JobBatch) -> bytes:
    """The transport key of a batch: its country and UTC day (one job key → one message key)."""
    first = batch.jobs[0]
    day = datetime.fromtimestamp(first.date_hour, UTC).date().isoformat()
    return f"{first.country}|{day}".encode()


def iso_hour(date_hour: int) -> str:
    """``2020-03-01T05:00:00Z`` for an epoch second."""
    return datetime.fromtimestamp(date_hour, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        pending_day = -1
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

        for cid, hour, outcomes in self._keys(on_rows):
            country = self.reader.countries[cid]
            date_hour = hour * 3600
            n = int(outcomes.size)
            self.stats.jobs += 1
            self.stats.rows_cut += n
            if (country, date_hour) in skip:
                self.stats.jobs_skipped += 1
                continue
            self.stats.jobs_sent += 1
            self.stats.rows_sent += n
            for job in self._parts(country, date_hour, outcomes):
                if (country, date_hour, job.part) in skip_parts:
                    self.stats.parts_sent -= 1
                    continue
                size = len(job.outcomes) + _JOB_OVERHEAD
                day = cid * 1_000_000 + hour // 24
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
        self.stats.parts_sent += parts
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
    ) -> Iterator[tuple[int, int, npt.NDArray[np.bool_]]]:
        """Yield ``(cid, hour, outcomes)`` once per key from the sorted stream."""
        carry_key: tuple[int, int] | None = None
        carry: list[npt.NDArray[np.bool_]] = []
        last = -1
        for batch in self.reader.sorted_valid():
            if batch.num_rows == 0:
                continue
            cid = batch.column(0).to_numpy().astype(np.int64)
            hour = batch.column(1).to_numpy()
            pos = batch.column(2).to_numpy(zero_copy_only=False).astype(np.bool_)
            key = (cid << 32) | hour
            # Cutting relies on the sort: a key seen again later would become a second job
            # with the same id, and the store would keep only one of them.
            if key[0] < last or bool((key[1:] < key[:-1]).any()):
                raise RunError("internal check failed: input rows did not arrive sorted by key")
            last = int(key[-1])
            cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
            starts = np.concatenate(([0], cuts))
            ends = np.concatenate((cuts, [key.size]))
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                k = (int(cid[a]), int(hour[a]))
                if k != carry_key:
                    if carry_key is not None:
                        yield (*carry_key, _join(carry))
                    carry_key, carry = k, []
                carry.append(pos[a:b])
            if on_rows is not None:
                on_rows(batch.num_rows)
        if carry_key is not None:
            yield (*carry_key, _join(carry))


def _join(chunks: list[npt.NDArray[np.bool_]]) -> npt.NDArray[np.bool_]:
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
