"""Wire format v2: a MessagePack envelope around one Arrow IPC record batch.

A **job message** is a msgspec MessagePack map (``v = 2``, ``kind = "jobs"``) whose
``body`` is the bytes of one Arrow IPC *stream*: the schema and exactly one record
batch holding only the columns the task reads, sorted by key. Each job (or job part) is
a row range ``body[start:end]``; the ranges are contiguous and in order. The key values
of each job travel in the envelope, one list per job (see :class:`JobEntry`), not as key
columns in the body: a key is constant over its rows, so a key column would repeat it on
every row (before compression), widen the rows the task is handed, and hide the key from
a reader that only parses the envelope (the dispatcher's job ids and message keys, the
DLQ tooling). A job's entry costs a few dozen bytes, whatever its size.

A **result message** (``kind = "results"``) has one entry per job part that succeeded
and a body with one row per entry: the key columns, then the task's result columns, or,
for a part of a split job (``state = true``), the combine state columns, named
``state:<name>``. The other group's columns are null on that row. Failed parts are listed
in ``failed`` (the failed job rows themselves go to the dead-letter topic as a job
message, as in v1).

Bodies are compressed by Arrow IPC buffer compression (lz4 frame by default, zstd or
none as options); readers need no option, the compression is recorded in the batch.
Everything a decoder refuses (another version, a corrupt envelope, a corrupt body,
ranges that disagree with the body) is a :class:`~dispatchkit.errors.DecodeError`.

:func:`cut_jobs` cuts a sorted table and its job row offsets into messages of at most
``max_message_bytes``: whole jobs when they fit, and a job bigger than the budget into
``parts`` row ranges of their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from dispatchkit import arrays
from dispatchkit.errors import DecodeError, UsageError
from dispatchkit.message import MAX_DECODE_BYTES

#: Wire-format version this module writes and reads.
WIRE_VERSION: Final = 2
#: Body column names of combine states in a result message.
STATE_PREFIX: Final = "state:"
#: Default budget: below Kafka's 1 MB default ``message.max.bytes``.
DEFAULT_MAX_MESSAGE_BYTES: Final = 900_000

Compression = Literal["lz4", "zstd", "none"]
KeyValue = int | str | bool | None
#: Arrow types a key column may have, as written into ``key_types``.
KEY_TYPES: Final = {
    "int64": pa.int64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"),
}

Int64Array = npt.NDArray[np.int64]


# --------------------------------------------------------------------------- envelope


class JobEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One job (or one part of a split job): rows ``[start, end)`` of the body."""

    job_id: str
    part: int  # 0-based
    parts: int  # 1 unless the job was split
    start: int
    end: int
    #: The job's key values in ``key_names`` order; timestamps as integer epoch microseconds.
    key: tuple[KeyValue, ...]


class ResultEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One job part that succeeded; ``state`` when its body row is a combine state."""

    job_id: str
    part: int
    parts: int
    state: bool = False


class Failure(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One job part set aside after its retries (the v1 DLQ headers, per part)."""

    job_id: str
    part: int
    parts: int
    error_class: str
    error: str  # at most 500 characters
    attempts: int
    first_failure: float  # Unix time, seconds


class _Jobs(msgspec.Struct, frozen=True, tag="jobs", tag_field="kind", forbid_unknown_fields=True):
    v: int
    run_id: str
    batch_id: str
    app: str
    task: str
    fingerprint: str
    key_names: list[str]
    key_types: list[str]
    jobs: list[JobEntry]
    body: bytes


class _Results(
    msgspec.Struct, frozen=True, tag="results", tag_field="kind", forbid_unknown_fields=True
):
    v: int
    run_id: str
    batch_id: str
    worker: str
    app: str
    task: str
    fingerprint: str
    key_names: list[str]
    results: list[ResultEntry]
    failed: list[Failure]
    body: bytes


class _Probe(msgspec.Struct):
    """Just the version and kind of any message, to refuse v1 and strangers clearly."""

    v: Any = None
    kind: Any = None


_encoder = msgspec.msgpack.Encoder()
_probe = msgspec.msgpack.Decoder(_Probe)
_jobs_decoder = msgspec.msgpack.Decoder(_Jobs)
_results_decoder = msgspec.msgpack.Decoder(_Results)


# --------------------------------------------------------------------------- body


def _write_options(compression: Compression) -> pa.ipc.IpcWriteOptions:
    if compression not in ("lz4", "zstd", "none"):
        raise UsageError(f"compression must be lz4, zstd or none, not {compression!r}")
    return pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)


def _one_batch(data: pa.Table | pa.RecordBatch) -> pa.RecordBatch:
    if isinstance(data, pa.RecordBatch):
        return data
    batches = data.combine_chunks().to_batches()
    if not batches:
        return arrays.empty_batch(data.schema)
    assert len(batches) == 1
    return batches[0]


#: Bodies smaller than this are written uncompressed whatever the compression asked: an
#: lz4 or zstd frame per buffer costs ~0.4 ms to write and read, more than it saves on a
#: small message (readers need no option either way: the IPC metadata says which).
COMPRESS_MIN_BYTES: Final = 64 * 1024


def encode_body(data: pa.Table | pa.RecordBatch, compression: Compression = "lz4") -> bytes:
    """One Arrow IPC stream: the schema and exactly one record batch."""
    batch = _one_batch(data)
    if compression != "none" and batch.nbytes < COMPRESS_MIN_BYTES:
        _write_options(compression)  # still refuse an unknown name
        compression = "none"
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_write_options(compression)) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue())


def decode_body(body: bytes, *, full: bool = True) -> pa.RecordBatch:
    """The single record batch of ``body``; anything else is a :class:`DecodeError`."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(body))
        batch = reader.read_next_batch()
        try:
            reader.read_next_batch()
        except StopIteration:
            pass
        else:
            raise DecodeError("the body holds more than one record batch")
        batch.validate(full=full)
        _ = batch.schema.names  # decoded from UTF-8 on access: damage shows here
    except StopIteration:
        raise DecodeError("the body holds no record batch") from None
    except DecodeError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... on corrupt bytes
        raise DecodeError(f"corrupt Arrow body: {exc}".splitlines()[0][:300]) from None
    return batch


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobMessage:
    """A decoded job message: the envelope, the body's batch and the jobs' row offsets."""

    run_id: str
    batch_id: str
    app: str
    task: str
    fingerprint: str
    key_names: list[str]
    key_types: list[str]
    jobs: list[JobEntry]
    #: The body: only the columns the task reads, every job's rows in order.
    table: pa.RecordBatch
    #: ``len(jobs) + 1`` row offsets: job ``i`` is ``table[offsets[i]:offsets[i + 1]]``.
    offsets: Int64Array

    def __len__(self) -> int:
        return len(self.jobs)

    def rows(self, i: int) -> pa.RecordBatch:
        """Job ``i``'s rows, a zero-copy slice of :attr:`table`."""
        start = int(self.offsets[i])
        return self.table.slice(start, int(self.offsets[i + 1]) - start)

    def __iter__(self) -> Iterator[tuple[JobEntry, pa.RecordBatch]]:
        for i, job in enumerate(self.jobs):
            yield job, self.rows(i)

    def keys(self) -> pa.Table:
        """One row per job: the key columns with their Arrow types."""
        return keys_table(self.key_names, self.key_types, [job.key for job in self.jobs])

    def key_texts(self) -> dict[str, str]:
        """``job id → key`` as logs show it (:func:`dispatchkit.keys.key_text`)."""
        from dispatchkit.keys import key_text

        keys = self.keys().to_pylist()
        return {job.job_id: key_text(key) for job, key in zip(self.jobs, keys, strict=True)}


def keys_table(
    names: Sequence[str], types: Sequence[str], keys: Sequence[Sequence[KeyValue]]
) -> pa.Table:
    """Key values as the envelope carries them (one list per job) into a typed table."""
    columns = list(zip(*keys, strict=True)) if keys else [() for _ in names]
    out = []
    for type_name, values in zip(types, columns, strict=True):
        arrow_type = KEY_TYPES[type_name]
        out.append(arrays.array(values, arrow_type))  # timestamps as epoch µs
    return pa.Table.from_arrays(out, names=list(names))


def key_lists(keys: pa.Table) -> tuple[list[str], list[str], list[tuple[KeyValue, ...]]]:
    """A typed key table (one row per job) as the envelope's names, types and tuples."""
    names, types, columns = [], [], []
    for field in keys.schema:
        type_name = str(field.type)
        if type_name not in KEY_TYPES:
            raise UsageError(
                f"key column {field.name} has type {type_name}; keys may be {', '.join(KEY_TYPES)}"
            )
        column = keys.column(field.name)
        if pa.types.is_timestamp(field.type):
            column = column.cast(pa.int64())
        names.append(field.name)
        types.append(type_name)
        columns.append(column.to_pylist())
    if not columns:
        return names, types, [() for _ in range(keys.num_rows)]
    return names, types, list(zip(*columns, strict=True))


def encode_jobs(
    *,
    run_id: str,
    batch_id: str,
    app: str,
    task: str,
    fingerprint: str,
    key_names: Sequence[str],
    key_types: Sequence[str],
    jobs: Sequence[JobEntry],
    table: pa.Table | pa.RecordBatch,
    compression: Compression = "lz4",
    check: bool = True,
) -> bytes:
    """Encode a job message; ``jobs`` are contiguous row ranges covering ``table``."""
    if check:
        _check_ranges(jobs, table.num_rows, len(key_names))
    for name in key_types:
        if name not in KEY_TYPES:
            raise UsageError(f"unknown key type {name!r}; keys may be {', '.join(KEY_TYPES)}")
    return _encoder.encode(
        _Jobs(
            v=WIRE_VERSION,
            run_id=run_id,
            batch_id=batch_id,
            app=app,
            task=task,
            fingerprint=fingerprint,
            key_names=list(key_names),
            key_types=list(key_types),
            jobs=list(jobs),
            body=encode_body(table, compression),
        )
    )


def _ranges(jobs: Sequence[JobEntry], num_rows: int, n_keys: int) -> npt.NDArray[np.int64]:
    """The jobs' row offsets (``len(jobs) + 1``), checked at once; the first fault is
    named by :func:`_check_ranges`."""
    n = len(jobs)
    bounds = np.fromiter(
        itertools.chain.from_iterable((j.start, j.end, j.part, j.parts) for j in jobs),
        dtype=np.int64,
        count=4 * n,
    ).reshape(n, 4)
    start, end, part, parts = bounds.T
    follows = np.empty(n, dtype=np.int64)
    follows[:1] = 0
    follows[1:] = end[:-1]
    ok = (
        bool(np.all((start == follows) & (end > start) & (parts >= 1) & (part >= 0)))
        and bool(np.all(part < parts))
        and (int(end[-1]) if n else 0) == num_rows
        and all(j.job_id and len(j.key) == n_keys for j in jobs)
    )
    if not ok:
        _check_ranges(jobs, num_rows, n_keys)
        raise DecodeError("the jobs' row ranges do not cover the body")  # not reached
    return np.append(start, np.int64(num_rows))


def _check_ranges(jobs: Sequence[JobEntry], num_rows: int, n_keys: int) -> None:
    expected = 0
    for job in jobs:
        if not job.job_id:
            raise DecodeError("a job has an empty job_id")
        if job.parts < 1 or not 0 <= job.part < job.parts:
            raise DecodeError(f"job {job.job_id}: invalid part {job.part} of {job.parts}")
        if job.start != expected or job.end <= job.start:
            raise DecodeError(
                f"job {job.job_id}: rows [{job.start}, {job.end}) do not follow row {expected}"
            )
        if len(job.key) != n_keys:
            raise DecodeError(f"job {job.job_id}: {len(job.key)} key values for {n_keys} keys")
        expected = job.end
    if expected != num_rows:
        raise DecodeError(f"the jobs cover {expected} rows of a {num_rows}-row body")


def _envelope_bytes(payload: object, max_bytes: int) -> bytes | memoryview:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise DecodeError(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    return payload if isinstance(payload, (bytes, memoryview)) else bytes(payload)


def _check_version(payload: bytes | memoryview, kind: str) -> None:
    try:
        probe = _probe.decode(payload)
    except Exception as exc:
        raise DecodeError(f"not a dispatchkit message (not a MessagePack map): {exc}") from None
    if probe.v == 1:
        raise DecodeError(f"wire format v1 message; this worker reads v{WIRE_VERSION}")
    if probe.v is None:
        raise DecodeError("not a dispatchkit message: it has no schema version 'v'")
    if probe.v != WIRE_VERSION:
        raise DecodeError(f"wire format v{probe.v!r} message; this worker reads v{WIRE_VERSION}")
    if probe.kind != kind:
        raise DecodeError(f"a {probe.kind!r} message where {kind!r} was expected")


def decode_jobs(
    payload: bytes, *, max_bytes: int = MAX_DECODE_BYTES, validate: bool = True
) -> JobMessage:
    """Decode a v2 job message; only :class:`DecodeError` escapes.

    ``validate=False`` skips Arrow's full validation of the body (UTF-8 of strings,
    offsets), leaving the structural checks.
    """
    data = _envelope_bytes(payload, max_bytes)
    _check_version(data, "jobs")
    try:
        env = _jobs_decoder.decode(data)
    except Exception as exc:
        raise DecodeError(f"not a valid v2 job message: {exc}") from None
    if len(env.key_types) != len(env.key_names):
        raise DecodeError("key_names and key_types differ in length")
    for name in env.key_types:
        if name not in KEY_TYPES:
            raise DecodeError(f"unknown key type {name!r}")
    batch = decode_body(env.body, full=validate)
    offsets = _ranges(env.jobs, batch.num_rows, len(env.key_names))
    return JobMessage(
        run_id=env.run_id,
        batch_id=env.batch_id,
        app=env.app,
        task=env.task,
        fingerprint=env.fingerprint,
        key_names=env.key_names,
        key_types=env.key_types,
        jobs=env.jobs,
        table=batch,
        offsets=offsets,
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResultMessage:
    """A decoded result message."""

    run_id: str
    batch_id: str
    worker: str
    app: str
    task: str
    fingerprint: str
    key_names: list[str]
    results: list[ResultEntry]
    failed: list[Failure]
    #: The body: key columns, result columns, ``state:``-prefixed state columns.
    table: pa.RecordBatch

    def _ids(self, rows: Sequence[int]) -> list[pa.Array]:
        entries = [self.results[i] for i in rows]
        return [
            arrays.strings([e.job_id for e in entries]),
            arrays.array([e.part for e in entries], pa.int64()),
            arrays.array([e.parts for e in entries], pa.int64()),
        ]

    def _part(self, state: bool) -> pa.Table:
        rows = [i for i, e in enumerate(self.results) if e.state == state]
        names = self.table.schema.names
        keep = [n for n in names[len(self.key_names) :] if n.startswith(STATE_PREFIX) == state]
        body = self.table.select([*self.key_names, *keep]).take(arrays.array(rows, pa.int64()))
        columns = [*self._ids(rows), *body.columns]
        out = [n.removeprefix(STATE_PREFIX) if state else n for n in keep]
        return pa.Table.from_arrays(
            columns, names=["job_id", "part", "parts", *self.key_names, *out]
        )

    def values(self) -> pa.Table:
        """Rows of whole jobs: job_id, part, parts, the keys and the result columns."""
        return self._part(False)

    def states(self) -> pa.Table:
        """Rows of split-job parts: job_id, part, parts, the keys and the state columns."""
        return self._part(True)


def _spread(table: pa.Table | None, mask: npt.NDArray[np.bool_], n: int) -> list[pa.Array]:
    """``table``'s columns over ``n`` rows: its rows where ``mask``, nulls elsewhere."""
    if table is None:
        return []
    if table.num_rows != int(mask.sum()):
        raise UsageError(f"{table.num_rows} rows given for {int(mask.sum())} result entries")
    table = table.combine_chunks()
    if mask.all():  # the usual case: no import of pyarrow.compute in a worker
        return [c.chunk(0) if c.num_chunks else pa.nulls(0, c.type) for c in table.columns]
    index = pa.Array.from_buffers(
        pa.int64(),
        n,
        [
            pa.py_buffer(np.packbits(mask, bitorder="little")),
            pa.py_buffer((np.cumsum(mask) - 1).astype(np.int64)),
        ],
    )
    import pyarrow.compute as pc

    return (
        [pc.take(c, index).combine_chunks() for c in table.columns]
        if n
        else [pa.nulls(0, c.type) for c in table.columns]
    )


def encode_results(
    *,
    run_id: str,
    batch_id: str,
    worker: str,
    app: str,
    task: str,
    fingerprint: str,
    results: Sequence[ResultEntry],
    keys: pa.Table,
    values: pa.Table | None,
    states: pa.Table | None = None,
    failed: Sequence[Failure] = (),
    compression: Compression = "lz4",
) -> bytes:
    """Encode a result message.

    ``keys`` has one row per entry of ``results``; ``values`` one row per entry with
    ``state = False`` (in order), ``states`` one row per entry with ``state = True``.
    """
    n = len(results)
    if keys.num_rows != n:
        raise UsageError(f"{keys.num_rows} key rows for {n} results")
    state = np.fromiter((e.state for e in results), dtype=np.bool_, count=n)
    names = list(keys.schema.names)
    value_names = [] if values is None else list(values.schema.names)
    state_names = [] if states is None else [STATE_PREFIX + s for s in states.schema.names]
    if any(c.startswith(STATE_PREFIX) for c in [*names, *value_names]):
        raise UsageError(f"key and result column names may not start with {STATE_PREFIX!r}")
    if states is None and state.any():
        raise UsageError("state entries given without a states table")
    keys = keys.combine_chunks()
    columns = [c.chunk(0) if c.num_chunks else pa.nulls(0, c.type) for c in keys.columns]
    columns += _spread(values, ~state, n) + _spread(states, state, n)
    body = pa.RecordBatch.from_arrays(columns, names=[*names, *value_names, *state_names])
    return _encoder.encode(
        _Results(
            v=WIRE_VERSION,
            run_id=run_id,
            batch_id=batch_id,
            worker=worker,
            app=app,
            task=task,
            fingerprint=fingerprint,
            key_names=names,
            results=list(results),
            failed=list(failed),
            body=encode_body(body, compression),
        )
    )


def decode_results(
    payload: bytes, *, max_bytes: int = MAX_DECODE_BYTES, validate: bool = True
) -> ResultMessage:
    """Decode a v2 result message; only :class:`DecodeError` escapes."""
    data = _envelope_bytes(payload, max_bytes)
    _check_version(data, "results")
    try:
        env = _results_decoder.decode(data)
    except Exception as exc:
        raise DecodeError(f"not a valid v2 result message: {exc}") from None
    batch = decode_body(env.body, full=validate)
    if batch.num_rows != len(env.results):
        raise DecodeError(f"{batch.num_rows} body rows for {len(env.results)} results")
    if batch.schema.names[: len(env.key_names)] != env.key_names:
        raise DecodeError("the body does not start with the key columns")
    parts: list[ResultEntry | Failure] = [*env.results, *env.failed]
    for e in parts:
        if not e.job_id or e.parts < 1 or not 0 <= e.part < e.parts:
            raise DecodeError(f"result {e.job_id!r}: invalid part {e.part} of {e.parts}")
    return ResultMessage(
        run_id=env.run_id,
        batch_id=env.batch_id,
        worker=env.worker,
        app=env.app,
        task=env.task,
        fingerprint=env.fingerprint,
        key_names=env.key_names,
        results=env.results,
        failed=env.failed,
        table=batch,
    )


# --------------------------------------------------------------------------- sizing


#: Bytes an Arrow buffer may add beyond its data: padding to 8 bytes, the 8-byte
#: uncompressed length and an lz4/zstd frame header and end mark, and its metadata.
_BUFFER_OVERHEAD: Final = 64


def row_bytes(table: pa.Table | pa.RecordBatch) -> npt.NDArray[np.float64]:
    """An upper bound of each row's uncompressed body bytes, vectorized over columns."""
    import pyarrow.compute as pc

    n = table.num_rows
    cost = np.zeros(n, dtype=np.float64)
    for column in table.columns:
        t = column.type
        cost += 0.125  # a validity bit
        if pa.types.is_boolean(t):
            cost += 0.125
        elif pa.types.is_string(t) or pa.types.is_binary(t):
            lengths = pc.fill_null(pc.binary_length(column), 0)
            cost += 4 + arrays.to_numpy(lengths).astype(np.float64)
        elif pa.types.is_large_string(t) or pa.types.is_large_binary(t):
            lengths = pc.fill_null(pc.binary_length(column), 0)
            cost += 8 + arrays.to_numpy(lengths).astype(np.float64)
        elif _fixed(t):
            cost += t.bit_width / 8
        else:  # nested or other: the column's average, a bound only on average
            cost += (column.nbytes / n) if n else 0.0
    return cost


def _fixed(t: pa.DataType) -> bool:
    try:
        return int(t.bit_width) > 0
    except ValueError:
        return False


def body_overhead(schema: pa.Schema, compression: Compression = "lz4") -> int:
    """Bytes of a body with no rows, plus the per-buffer allowance of a batch."""
    empty = len(encode_body(arrays.empty_batch(schema), compression))
    return empty + 3 * len(schema) * _BUFFER_OVERHEAD


def entry_bytes(job_id_bytes: int, key: Sequence[KeyValue]) -> int:
    """An upper bound of one job entry's envelope bytes."""
    sample = JobEntry(
        job_id="x" * job_id_bytes,
        part=2**62,
        parts=2**62,
        start=2**62,
        end=2**62,
        key=tuple(2**62 if isinstance(k, int) and not isinstance(k, bool) else k for k in key),
    )
    return len(_encoder.encode(sample))


def encoded_size(table: pa.Table | pa.RecordBatch, compression: Compression = "lz4") -> int:
    """Exact bytes of ``table`` as a body (by encoding it)."""
    return len(encode_body(table, compression))


def estimated_batch_size(table: pa.Table | pa.RecordBatch) -> int:
    """Arrow's own uncompressed IPC size of ``table`` as one record batch."""
    return int(pa.ipc.get_record_batch_size(_one_batch(table)))


@dataclass(frozen=True)
class Cut:
    """One planned message: rows ``[row_start, row_end)`` and its job entries.

    ``job``, ``part``, ``parts``, ``start`` and ``end`` are parallel arrays, one item per
    entry: the job's index into the offsets, its part, its parts, and its rows relative
    to ``row_start``.
    """

    row_start: int
    row_end: int
    job: Int64Array
    part: Int64Array
    parts: Int64Array
    start: Int64Array
    end: Int64Array


def plan_cuts(
    offsets: npt.ArrayLike,
    row_cost: npt.ArrayLike,
    entry_cost: npt.ArrayLike,
    *,
    capacity: float,
    groups: npt.ArrayLike | None = None,
    max_jobs: int | None = None,
) -> list[Cut]:
    """Cut jobs into messages whose cost is at most ``capacity``; pure numpy, a loop per message.

    ``offsets`` (jobs + 1, non-decreasing, from 0) bounds each job's rows; ``row_cost`` is
    each row's cost and ``entry_cost`` each job entry's. A message holds whole jobs while
    they fit; a job over ``capacity`` is cut into parts of its own messages. A message
    never spans two values of ``groups`` (one label per job, e.g. the transport key) nor
    more than ``max_jobs`` entries.
    """
    off = np.asarray(offsets, dtype=np.int64)
    n_jobs = off.size - 1
    if n_jobs < 0 or off[0] != 0 or np.any(np.diff(off) < 1):
        raise UsageError("job offsets must start at 0 and grow by at least one row per job")
    rc = np.asarray(row_cost, dtype=np.float64)
    if rc.size != off[-1]:
        raise UsageError(f"{rc.size} row costs for {off[-1]} rows")
    ec = np.broadcast_to(np.asarray(entry_cost, dtype=np.float64), (n_jobs,))
    cum_rows = np.concatenate(([0.0], np.cumsum(rc)))
    job_cost = cum_rows[off[1:]] - cum_rows[off[:-1]] + ec
    cum_jobs = np.concatenate(([0.0], np.cumsum(job_cost)))
    if groups is None:
        group_end = np.full(n_jobs, n_jobs, dtype=np.int64)
    else:
        g = np.asarray(groups)
        change = np.flatnonzero(g[1:] != g[:-1]) + 1
        ends = np.append(change, n_jobs)
        group_end = ends[np.searchsorted(ends, np.arange(n_jobs), side="right")]
    big = job_cost > capacity
    limit = max_jobs or n_jobs
    cuts: list[Cut] = []
    j = 0
    while j < n_jobs:
        if big[j]:
            cuts.extend(_split(j, off, cum_rows, float(ec[j]), capacity))
            j += 1
            continue
        # The last job k with cum_jobs[k] - cum_jobs[j] <= capacity, before a big one.
        stop = int(np.searchsorted(cum_jobs, cum_jobs[j] + capacity, side="right")) - 1
        stop = min(stop, int(group_end[j]), j + limit)
        nxt_big = np.flatnonzero(big[j:stop])
        if nxt_big.size:
            stop = j + int(nxt_big[0])
        stop = max(stop, j + 1)
        jobs = np.arange(j, stop, dtype=np.int64)
        base = int(off[j])
        cuts.append(
            Cut(
                row_start=base,
                row_end=int(off[stop]),
                job=jobs,
                part=np.zeros(jobs.size, dtype=np.int64),
                parts=np.ones(jobs.size, dtype=np.int64),
                start=off[j:stop] - base,
                end=off[j + 1 : stop + 1] - base,
            )
        )
        j = stop
    return cuts


def _split(
    j: int, off: Int64Array, cum_rows: npt.NDArray[np.float64], entry: float, capacity: float
) -> list[Cut]:
    room = capacity - entry
    begin, end = int(off[j]), int(off[j + 1])
    bounds = [begin]
    while bounds[-1] < end:
        at = bounds[-1]
        stop = int(np.searchsorted(cum_rows, cum_rows[at] + room, side="right")) - 1
        if stop <= at:
            raise UsageError(
                f"row {at} of job {j} alone is larger than the message budget "
                f"({cum_rows[at + 1] - cum_rows[at] + entry:.0f} > {capacity:.0f})"
            )
        bounds.append(min(stop, end))
    parts = len(bounds) - 1
    return [
        Cut(
            row_start=a,
            row_end=b,
            job=np.array([j], dtype=np.int64),
            part=np.array([i], dtype=np.int64),
            parts=np.array([parts], dtype=np.int64),
            start=np.zeros(1, dtype=np.int64),
            end=np.array([b - a], dtype=np.int64),
        )
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def cut_jobs(
    table: pa.Table,
    offsets: npt.ArrayLike,
    *,
    job_ids: Sequence[str],
    keys: pa.Table,
    run_id: str,
    app: str,
    task: str,
    fingerprint: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    compression: Compression = "lz4",
    groups: npt.ArrayLike | None = None,
    max_jobs: int | None = None,
    expected_ratio: float = 1.0,
) -> list[bytes]:
    """Encoded job messages of at most ``max_message_bytes`` for a sorted table.

    ``table`` holds the task's columns, sorted by key; job ``i`` is rows
    ``offsets[i]:offsets[i + 1]`` with id ``job_ids[i]`` and key row ``keys[i]``.
    Messages are planned on an upper bound of their uncompressed size (times
    ``expected_ratio``, for a caller that knows how well its data compresses) and
    checked by encoding; if one is still over the budget, all are planned again with a
    smaller capacity, so part numbers stay consistent.
    """
    off = np.asarray(offsets, dtype=np.int64)
    key_names, key_types, key_values = key_lists(keys)
    if len(job_ids) != off.size - 1 or len(key_values) != off.size - 1:
        raise UsageError(
            f"{len(job_ids)} job ids and {len(key_values)} keys for {off.size - 1} jobs"
        )
    table = table.combine_chunks()
    head = _Jobs(
        v=WIRE_VERSION,
        run_id=run_id,
        batch_id="x" * 64,
        app=app,
        task=task,
        fingerprint=fingerprint,
        key_names=key_names,
        key_types=key_types,
        jobs=[],
        body=b"",
    )
    fixed = len(_encoder.encode(head)) + 16 + body_overhead(table.schema, compression)
    capacity = float(max_message_bytes - fixed)
    if capacity <= 0:
        raise UsageError(f"max_message_bytes {max_message_bytes} cannot carry one job")
    # lz4 and zstd may add a little to incompressible buffers.
    slack = 1.0 if compression == "none" else 1.01
    rc = row_bytes(table) * (expected_ratio * slack)
    ec = _entry_costs(job_ids, keys)
    for _attempt in range(8):
        messages = []
        for cut in plan_cuts(off, rc, ec, capacity=capacity, groups=groups, max_jobs=max_jobs):
            first = int(cut.job[0])
            entries = [
                JobEntry(job_ids[j], part, parts, start, end, key_values[j])
                for j, part, parts, start, end in zip(
                    cut.job.tolist(),
                    cut.part.tolist(),
                    cut.parts.tolist(),
                    cut.start.tolist(),
                    cut.end.tolist(),
                    strict=True,
                )
            ]
            payload = encode_jobs(
                run_id=run_id,
                batch_id=f"{job_ids[first]}.{int(cut.part[0])}",
                app=app,
                task=task,
                fingerprint=fingerprint,
                key_names=key_names,
                key_types=key_types,
                jobs=entries,
                table=table.slice(cut.row_start, cut.row_end - cut.row_start),
                compression=compression,
                check=False,
            )
            if len(payload) > max_message_bytes:
                # The estimate was short (expected_ratio, nested types): plan all again.
                capacity *= 0.95 * max_message_bytes / len(payload)
                break
            messages.append(payload)
        else:
            return messages
    raise UsageError(f"max_message_bytes {max_message_bytes} is too small for these jobs")


def _entry_costs(job_ids: Sequence[str], keys: pa.Table) -> Int64Array:
    """An upper bound of each job entry's envelope bytes, vectorized over jobs."""
    ids = arrays.strings(job_ids)
    cost = entry_bytes(0, ()) + 5 + _lengths(ids)  # a str header is at most 5 bytes
    for column in keys.columns:
        if pa.types.is_string(column.type):
            cost += 5 + _lengths(column)
        else:
            cost += 9  # an int of up to 64 bits (or a bool, or nil)
    return cost


def _lengths(column: pa.Array | pa.ChunkedArray) -> Int64Array:
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.binary_length(column), 0).cast(pa.int64())
    return arrays.to_numpy(lengths).astype(np.int64)
