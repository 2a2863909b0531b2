"""The dispatcher: cut validated input rows into atomic jobs and pack them into messages.

Data flow::

    input files ──reader──▶ valid rows sorted by (bucket, key)  ──cut──▶ one job per key
                   └──────▶ quarantine.parquet/.csv (bad rows)                 │
                                                                              ▼
                              job messages (wire v3), one transport key per bucket ──▶ broker

A job is every row of one key of the app (e.g. one country in one UTC hour). Its id is a
hash of the run id, the app, the task and the key, so the same run always gives the same
ids and a job redone anywhere lands on the same row of the store. A message carries only
the columns the task reads, as one Arrow record batch, and the jobs as row ranges.

Messages are sized by bytes (``max_message_bytes``), never by a job count. A job too big
for one message is cut into parts, each in a message of its own; the split depends only
on the job's rows and the budget, so a resume cuts the same parts. Only a task with a
combine step can take parts; for any other the run is refused before anything is sent.

Memory is bounded: the reader streams the rows already sorted (DuckDB sorts out of core),
and the cutter holds one record batch plus the rows of the key that goes on in the next.
The dispatcher never touches a broker: :meth:`Dispatcher.messages` is an iterator that
the run (embedded or Kafka) publishes, and jobs already done can be skipped for a resume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from dispatchkit import arrays, metrics, wire
from dispatchkit.app import App, Task
from dispatchkit.errors import RunError, UsageError
from dispatchkit.keys import job_ids_sql, key_text
from dispatchkit.prefetch import prefetched

#: Kafka's default message limit is 1 MB; leave room for the headers.
DEFAULT_MAX_MESSAGE_BYTES = wire.DEFAULT_MAX_MESSAGE_BYTES
#: The reader's column holding each row's transport bucket.
BUCKET = "bucket"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Outgoing:
    """One encoded job message and what a broker needs to route and count it."""

    payload: bytes
    key: bytes  # the transport key: the jobs' bucket (one job key → one message key)
    batch_id: str
    index: pa.RecordBatch  # the message's job index (see :func:`dispatchkit.wire.job_index`)
    rows: int

    @property
    def job_ids(self) -> tuple[str, ...]:
        """The id of each entry, in order (built on demand: Python strings cost per job)."""
        return tuple(self.index.column(0).to_pylist())

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:
        """(part, parts) of each entry, in order."""
        part = self.index.column(1).to_pylist()
        return tuple(zip(part, self.index.column(2).to_pylist(), strict=True))


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
    messages: int = 0
    split_jobs: int = 0
    bytes_sent: int = 0
    largest_message: int = 0
    split: list[str] = field(default_factory=list)  # keys of split jobs (first few)


class RowSource(Protocol):
    """What the dispatcher reads: sorted valid rows (see :meth:`InputReader.sorted_valid`)."""

    def sorted_valid(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]: ...


class Dispatcher:
    """Cuts the sorted valid rows of a reader into job messages for one task of an app."""

    def __init__(
        self,
        reader: RowSource,
        *,
        app: App,
        task: str,
        run_id: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        compression: wire.Compression = "lz4",
    ) -> None:
        if max_message_bytes < 1024:
            raise UsageError("max_message_bytes must be at least 1024")
        self.reader = reader
        self.app = app
        self.task: Task = app.get_task(task)
        self.run_id = run_id
        self.max_message_bytes = max_message_bytes
        self.compression: wire.Compression = compression
        self.key_names = list(app.keyspec.names)
        self.key_types = [str(t) for t in app.keyspec.types]
        self.stats = DispatchStats()
        self._capacity: float | None = None
        self._split_sent: set[str] = set()
        self._meter = metrics.DispatchMeter(app.name, self.task.name)
        self._bucket = -1  # the bucket cut last, and the ids of its jobs cut so far
        self._bucket_ids: set[str] = set()
        self._ids = _JobIds(run_id, app.name, self.task.name)

    def capacity(self, schema: pa.Schema) -> float:
        """Bytes of rows and entries one message may carry under the budget."""
        if self._capacity is None:
            fixed = wire.job_envelope_overhead(
                run_id=self.run_id,
                app=self.app.name,
                task=self.task.name,
                fingerprint=self.app.fingerprint,
                keys=self.app.keyspec.schema,
                body=schema,
                compression=self.compression,
                budget=self.max_message_bytes,
            )
            self._capacity = float(self.max_message_bytes - fixed)
            if self._capacity < 64:
                raise UsageError(
                    f"--max-message-bytes {self.max_message_bytes} cannot carry one job of "
                    f"run {self.run_id!r} (its envelope alone takes {fixed} bytes)"
                )
        return self._capacity

    def messages(
        self,
        skip: Container[str] = frozenset(),
        on_rows: Callable[[int], None] | None = None,
        skip_parts: Container[tuple[str, int]] = frozenset(),
    ) -> Iterator[Outgoing]:
        """Yield job messages in (bucket, key) order, leaving out job ids in ``skip``.

        ``skip`` holds the ids of jobs already complete (a resume); ``skip_parts`` holds
        ``(job_id, part)`` of parts already published. ``on_rows`` is called with the
        number of rows cut from each record batch.
        """
        columns = [BUCKET, *self.key_names, *self.task.reads]
        self._bucket, self._bucket_ids = -1, set()
        carry: pa.Table | None = None
        # The next sorted batches are read (DuckDB, without the GIL) while this one is cut.
        for batch in prefetched(self.reader.sorted_valid(self.task.reads), name="reader"):
            if batch.num_rows == 0:
                continue
            table = pa.Table.from_batches([batch]).select(columns)
            if carry is not None:
                table = pa.concat_tables([carry, table])
            starts = _job_starts(table, [BUCKET, *self.key_names])
            # The last key may go on in the next batch: carry it.
            tail = int(starts[-1])
            carry = table.slice(tail)
            if starts.size > 1:
                yield from self._cut(table.slice(0, tail), starts[:-1], skip, skip_parts)
            if on_rows is not None:
                on_rows(batch.num_rows)
        if carry is not None and carry.num_rows:
            yield from self._cut(carry, np.zeros(1, np.int64), skip, skip_parts)

    def _check_contiguous(
        self,
        buckets: npt.NDArray[np.int64],
        ids: list[str],
        key_rows: pa.Table,
    ) -> None:
        """Internal check: buckets never go back, and no job is cut twice in its bucket.

        The reader sorts by bucket, then key; a key whose rows were not together would
        be cut into two jobs of one id, and one of them would overwrite the other.
        """
        if buckets.size == 0:
            return
        if buckets[0] < self._bucket or np.any(np.diff(buckets) < 0):
            raise RunError("internal check failed: the reader's rows are not sorted by bucket")
        bounds = [0, *(np.flatnonzero(np.diff(buckets)) + 1).tolist(), len(ids)]
        for a, b in itertools.pairwise(bounds):
            if int(buckets[a]) != self._bucket:
                self._bucket, self._bucket_ids = int(buckets[a]), set()
            fresh = set(ids[a:b])
            if len(fresh) != b - a or not self._bucket_ids.isdisjoint(fresh):
                seen = set(self._bucket_ids)
                for i in range(a, b):
                    if ids[i] in seen:
                        raise RunError(
                            f"internal check failed: the rows of job {self._key(key_rows, i)} "
                            "are not together in the reader's order"
                        )
                    seen.add(ids[i])
            self._bucket_ids |= fresh

    def _cut(
        self,
        table: pa.Table,
        starts: npt.NDArray[np.int64],
        skip: Container[str],
        skip_parts: Container[tuple[str, int]],
    ) -> Iterator[Outgoing]:
        """Messages of the jobs starting at ``starts`` (the last one ends the table)."""
        stats = self.stats
        n = table.num_rows
        offsets = np.append(starts, n).astype(np.int64)
        lengths = np.diff(offsets)
        first_rows = arrays.from_numpy(starts, pa.int64())
        key_rows = table.select(self.key_names).take(first_rows).combine_chunks()
        buckets = arrays.to_numpy(table.column(BUCKET).take(first_rows))
        id_array = self._ids.of(key_rows)
        ids: list[str] = id_array.to_pylist()
        self._check_contiguous(buckets, ids, key_rows)
        stats.jobs += len(ids)
        stats.rows_cut += n
        if skip:
            keep = np.fromiter((i not in skip for i in ids), dtype=np.bool_, count=len(ids))
        else:
            keep = np.ones(len(ids), dtype=np.bool_)
        stats.jobs_skipped += int((~keep).sum())
        if not keep.any():
            return
        if not keep.all():  # drop the rows of skipped jobs
            rows = np.repeat(keep, lengths)
            table = table.filter(arrays.from_numpy(rows, pa.bool_()))
            ids = [i for i, k in zip(ids, keep.tolist(), strict=True) if k]
            key_rows = key_rows.filter(arrays.from_numpy(keep, pa.bool_()))
            id_array = id_array.filter(arrays.from_numpy(keep, pa.bool_()))
            buckets = buckets[keep]
            lengths = lengths[keep]
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        body = table.select(list(self.task.reads))
        capacity = self.capacity(body.schema)
        row_cost = wire.row_bytes(body) * 1.01  # lz4 may add a little to random data
        jobs = _Jobs(ids, id_array, key_rows.combine_chunks())
        entry_cost = wire.entry_costs(jobs.id_array, jobs.key_rows) * 1.01
        cuts = wire.plan_cuts(offsets, row_cost, entry_cost, capacity=capacity, groups=buckets)
        for cut in cuts:
            first = int(cut.job[0])
            parts = int(cut.parts[0])
            if parts > 1:
                if int(cut.part[0]) == 0:
                    stats.split_jobs += 1
                    stats.parts += parts
                    if len(stats.split) < 20:
                        stats.split.append(self._key(jobs.key_rows, first))
                if self.task.combine is None:
                    raise RunError(self._too_big(jobs.key_rows, first, int(lengths[first])))
            else:
                stats.parts += len(cut.job)
            yield from self._encode(body, cut, jobs, buckets, skip_parts)

    def _encode(
        self,
        body: pa.Table,
        cut: wire.Cut,
        jobs: _Jobs,
        buckets: npt.NDArray[np.int64],
        skip_parts: Container[tuple[str, int]],
    ) -> Iterator[Outgoing]:
        sel, part, parts = cut.job, cut.part, cut.parts
        sizes = cut.end - cut.start
        rows = body.slice(cut.row_start, cut.row_end - cut.row_start)
        if skip_parts:  # a resume: parts published before are left out
            ids = jobs.ids
            kept = np.fromiter(
                (
                    (ids[j], p) not in skip_parts
                    for j, p in zip(sel.tolist(), part.tolist(), strict=True)
                ),
                dtype=np.bool_,
                count=sel.size,
            )
            if not kept.any():
                return
            if not kept.all():
                starts = cut.start[kept].tolist()
                rows = pa.concat_tables(
                    [rows.slice(a, n) for a, n in zip(starts, sizes[kept].tolist(), strict=True)]
                )
                sel, part, parts, sizes = sel[kept], part[kept], parts[kept], sizes[kept]
        stats = self.stats
        if int(parts.max()) == 1:  # whole jobs only
            stats.jobs_sent += int(sel.size)
        else:  # a job counts as sent with its first part published now
            for j, p in zip(sel.tolist(), parts.tolist(), strict=True):
                job_id = jobs.ids[j]
                if p == 1 or job_id not in self._split_sent:
                    stats.jobs_sent += 1
                    if p > 1:
                        self._split_sent.add(job_id)
        stats.rows_sent += rows.num_rows
        first = int(sel[0])
        if int(sel[-1]) - first + 1 == sel.size:  # contiguous jobs: slices, no copies
            ids_col = jobs.id_array.slice(first, sel.size)
            key_col = jobs.key_rows.slice(first, sel.size)
        else:
            picked = arrays.from_numpy(sel)
            ids_col, key_col = jobs.id_array.take(picked), jobs.key_rows.take(picked)
        index = wire.job_index(ids_col, part, parts, sizes, key_col)
        yield from self._fit(rows, index, int(buckets[first]))

    def _fit(self, rows: pa.Table, index: pa.RecordBatch, bucket: int) -> Iterator[Outgoing]:
        """Encode one message; one over the budget is halved (jobs stay whole)."""
        part = arrays.to_numpy(index.column(1))
        batch_id = f"{index.column(0)[0].as_py()}.{int(part[0])}"
        payload = wire.encode_jobs(
            run_id=self.run_id,
            batch_id=batch_id,
            app=self.app.name,
            task=self.task.name,
            fingerprint=self.app.fingerprint,
            key_names=self.key_names,
            key_types=self.key_types,
            jobs=index,
            table=rows,
            compression=self.compression,
            check=False,
        )
        if len(payload) > self.max_message_bytes:
            if index.num_rows == 1:
                keys = index.select(range(len(wire.JOB_INDEX), index.num_columns))
                key_rows = pa.Table.from_batches([keys]).rename_columns(self.key_names)
                raise RunError(
                    f"job {self._key(key_rows, 0)} encodes to "
                    f"{len(payload)} bytes, over --max-message-bytes {self.max_message_bytes}"
                )
            half = index.num_rows // 2
            cut_at = int(arrays.to_numpy(index.column(3))[:half].sum())
            yield from self._fit(rows.slice(0, cut_at), index.slice(0, half), bucket)
            yield from self._fit(rows.slice(cut_at), index.slice(half), bucket)
            return
        stats = self.stats
        stats.messages += 1
        stats.parts_sent += index.num_rows
        stats.bytes_sent += len(payload)
        stats.largest_message = max(stats.largest_message, len(payload))
        self._meter.sent(len(payload), stats.jobs_sent)
        yield Outgoing(
            payload=payload,
            key=f"b{bucket}".encode(),
            batch_id=batch_id,
            index=index,
            rows=rows.num_rows,
        )

    def _too_big(self, key_rows: pa.Table, i: int, rows: int) -> str:
        return too_big_message(self.task, self._key(key_rows, i), rows, self.max_message_bytes)

    def _key(self, key_rows: pa.Table, i: int) -> str:
        """Row ``i`` of a key table as text for messages."""
        _, _, key = wire.key_lists(key_rows.slice(i, 1))
        return self._text(key[0])

    def _text(self, key: tuple[wire.KeyValue, ...]) -> str:
        """A key of the envelope (times as epoch µs) as text for messages."""
        values: list[object] = []
        for t, v in zip(self.key_types, key, strict=True):
            if t.startswith("timestamp") and isinstance(v, int):
                values.append(_EPOCH + timedelta(microseconds=v))
            else:
                values.append(v)
        return key_text(dict(zip(self.key_names, values, strict=True)))


@dataclass(frozen=True)
class _Jobs:
    """The jobs of one cut: ids (Python and Arrow), key rows (Arrow) and key tuples."""

    ids: list[str]
    id_array: pa.Array
    key_rows: pa.Table


class _JobIds:
    """Job ids of key tables, computed by DuckDB (:func:`dispatchkit.keys.job_ids_sql`)."""

    def __init__(self, run_id: str, app: str, task: str) -> None:
        self._names = (run_id, app, task)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._sql: tuple[str, str] | None = None

    def of(self, key_rows: pa.Table) -> pa.Array:
        if self._con is None or self._sql is None:
            # One thread, little memory: the sort (the reader's DuckDB) and the workers need the
            # cores, and a batch of keys is small.
            self._con = duckdb.connect(config={"threads": 1, "memory_limit": "64MB"})
            expr, prefix = job_ids_sql(*self._names, key_rows.schema)
            self._sql = (f"SELECT {expr} AS id FROM key_rows", prefix)
        query, prefix = self._sql
        self._con.register("key_rows", key_rows)
        try:
            out = self._con.sql(query, params={"prefix": prefix}).to_arrow_table()
        finally:
            self._con.unregister("key_rows")
        column = out.column(0).combine_chunks()
        if column.type != pa.string():
            column = column.cast(pa.string())
        if len(column) != key_rows.num_rows or column.null_count:
            raise RunError("internal check failed: job ids do not match the keys")
        return column


def too_big_message(task: Task, key: str, rows: int, budget: int, size: int | None = None) -> str:
    """The one-line refusal of a key over the message budget in a task without combine."""
    about = f" (about {size:,} bytes)" if size is not None else ""
    return (
        f"job {key} has {rows:,} rows{about}, more than one message of "
        f"--max-message-bytes {budget:,} holds, and task {task.name!r} has no combine step "
        "to take it in parts: raise --max-message-bytes or give the task a combine"
    )


def _job_starts(table: pa.Table, names: Sequence[str]) -> npt.NDArray[np.int64]:
    """Row indices where a new key starts (0 first); the rows must be sorted by key."""
    n = table.num_rows
    change = np.zeros(n, dtype=np.bool_)
    change[0] = True
    if n > 1:
        for name in names:
            col = table.column(name)
            if col.null_count:
                raise RunError(f"internal check failed: a null in key column {name}")
            diff = pc.not_equal(col.slice(1), col.slice(0, n - 1))
            change[1:] |= arrays.to_numpy(diff)
    return np.flatnonzero(change).astype(np.int64)
