"""Wire format v3: a MessagePack envelope around Arrow IPC record batches.

A **job message** is a msgspec MessagePack map (``v = 3``, ``kind = "jobs"``) with two
Arrow IPC *streams* (the schema and exactly one record batch each): ``index``, one row
per job (or job part) — its id, part, parts, row count and key values — and ``body``,
the rows of every job in order, holding only the columns the task reads, sorted by key.
Job ``i`` is ``body[offsets[i]:offsets[i + 1]]`` with the offsets the running sum of the
index's ``rows``. The index is columnar so that no reader or writer touches a job in
Python: the dispatcher builds it from the key columns it cut, a worker hands its key
columns to the task as they are and takes the result index from it, the store takes
its job ids as one column. Key values are typed Arrow columns (``key:<name>``), not key
columns of the body: a key is constant over its rows.

A **result message** (``kind = "results"``) has an ``index`` with one row per job part
that succeeded (its id, part, parts, and ``state``) and a body with one row per index
row: the key columns, then the task's result columns, or, for a part of a split job
(``state = true``), the combine state columns, named ``state:<name>``. The other
group's columns are null on that row. Failed parts are listed in ``failed`` (the failed
job rows themselves go to the dead-letter topic as a job message).

Bodies are compressed by Arrow IPC buffer compression (lz4 frame by default, zstd or
none as options) when they are large enough to gain from it; indexes are written
uncompressed. Readers need no option, the compression is recorded in the batch.
Everything a decoder refuses (another version, a corrupt envelope, index or body, an
index that disagrees with the body) is a
:class:`~dispatchkit.errors.DecodeError`.

:func:`cut_jobs` cuts a sorted table and its job row offsets into messages of at most
``max_message_bytes``: whole jobs when they fit, and a job bigger than the budget into
``parts`` row ranges of their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from dispatchkit import arrays
from dispatchkit.errors import DecodeError, UsageError
from dispatchkit.message import MAX_DECODE_BYTES

#: Wire-format version this module writes and reads.
WIRE_VERSION: Final = 3
#: Body column names of combine states in a result message.
STATE_PREFIX: Final = "state:"
#: Index column names of key values in a job message.
KEY_PREFIX: Final = "key:"
#: The index columns of a job message before its key columns, and of a result message.
JOB_INDEX: Final = (
    ("job_id", pa.string()),
    ("part", pa.int32()),
    ("parts", pa.int32()),
    ("rows", pa.int32()),
)
RESULT_INDEX: Final = pa.schema(
    [("job_id", pa.string()), ("part", pa.int32()), ("parts", pa.int32()), ("state", pa.bool_())]
)
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
    """One job (or one part of a split job): rows ``[start, end)`` of the body.

    A row of a job message's index, as Python values (see :attr:`JobMessage.jobs`).
    """

    job_id: str
    part: int  # 0-based
    parts: int  # 1 unless the job was split
    start: int
    end: int
    #: The job's key values in ``key_names`` order; timestamps as integer epoch microseconds.
    key: tuple[KeyValue, ...]


class ResultEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One job part that succeeded; ``state`` when its body row is a combine state.

    A row of a result message's index, as Python values (see :attr:`ResultMessage.results`).
    """

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
    index: bytes
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
    index: bytes
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


#: Indexes are written uncompressed: their bulk is the 20-character hex job ids, which lz4
#: hardly shrinks (~25%) at ~15x the cost of writing them plain (0.43 vs 0.03 ms for a
#: 4,000-entry index), and the Kafka producer compresses the record batch once more.
INDEX_COMPRESSION: Final[Compression] = "none"


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


def decode_body(body: bytes, *, full: bool = True, what: str = "body") -> pa.RecordBatch:
    """The single record batch of ``body``; anything else is a :class:`DecodeError`
    (naming the part of the message, ``what``, that it was)."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(body))
        batch = reader.read_next_batch()
        try:
            reader.read_next_batch()
        except StopIteration:
            pass
        else:
            raise DecodeError(f"the {what} holds more than one record batch")
        batch.validate(full=full)
        _ = batch.schema.names  # decoded from UTF-8 on access: damage shows here
    except StopIteration:
        raise DecodeError(f"the {what} holds no record batch") from None
    except DecodeError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... on corrupt bytes
        raise DecodeError(f"corrupt Arrow {what}: {exc}".splitlines()[0][:300]) from None
    return batch


# --------------------------------------------------------------------------- jobs


def job_index(
    job_ids: pa.Array | Sequence[str],
    part: npt.ArrayLike,
    parts: npt.ArrayLike,
    rows: npt.ArrayLike,
    keys: pa.Table | pa.RecordBatch,
) -> pa.RecordBatch:
    """A job message's index: one row per entry, ``keys`` its typed key columns."""
    ids = job_ids if isinstance(job_ids, pa.Array) else arrays.strings(list(job_ids))
    columns: list[pa.Array] = [ids]
    for values in (part, parts, rows):
        columns.append(arrays.from_numpy(np.asarray(values, dtype=np.int32), pa.int32()))
    names = [name for name, _ in JOB_INDEX]
    for name, column in zip(keys.schema.names, keys.columns, strict=True):
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        columns.append(column)
        names.append(KEY_PREFIX + name)
    return pa.RecordBatch.from_arrays(columns, names=names)


def _index_of(
    jobs: Sequence[JobEntry], key_names: Sequence[str], key_types: Sequence[str]
) -> pa.RecordBatch:
    keys = keys_table(key_names, key_types, [job.key for job in jobs])
    return job_index(
        [j.job_id for j in jobs],
        [j.part for j in jobs],
        [j.parts for j in jobs],
        [j.end - j.start for j in jobs],
        keys,
    )


@dataclass(frozen=True)
class JobMessage:
    """A decoded job message: the envelope, its index, the body's batch and the offsets."""

    run_id: str
    batch_id: str
    app: str
    task: str
    fingerprint: str
    key_names: list[str]
    key_types: list[str]
    #: One row per entry: ``job_id``, ``part``, ``parts``, ``rows``, ``key:<name>``…
    index: pa.RecordBatch
    #: The body: only the columns the task reads, every job's rows in order.
    table: pa.RecordBatch
    #: ``len(self) + 1`` row offsets: job ``i`` is ``table[offsets[i]:offsets[i + 1]]``.
    offsets: Int64Array

    def __len__(self) -> int:
        return int(self.index.num_rows)

    def rows(self, i: int) -> pa.RecordBatch:
        """Job ``i``'s rows, a zero-copy slice of :attr:`table`."""
        start = int(self.offsets[i])
        return self.table.slice(start, int(self.offsets[i + 1]) - start)

    def __iter__(self) -> Iterator[tuple[JobEntry, pa.RecordBatch]]:
        for i, job in enumerate(self.jobs):
            yield job, self.rows(i)

    @cached_property
    def job_ids(self) -> list[str]:
        return [str(v) for v in self.index.column(0).to_pylist()]

    @cached_property
    def part(self) -> Int64Array:
        return arrays.to_numpy(self.index.column(1)).astype(np.int64)

    @cached_property
    def parts(self) -> Int64Array:
        return arrays.to_numpy(self.index.column(2)).astype(np.int64)

    @cached_property
    def jobs(self) -> list[JobEntry]:
        """The index as Python values (keys' timestamps as epoch µs), for cold paths."""
        _, _, keys = key_lists(self.keys())
        bounds = self.offsets.tolist()
        return [
            JobEntry(job_id, part, parts, bounds[i], bounds[i + 1], keys[i])
            for i, (job_id, part, parts) in enumerate(
                zip(self.job_ids, self.part.tolist(), self.parts.tolist(), strict=True)
            )
        ]

    def keys(self) -> pa.Table:
        """One row per job: the key columns with their Arrow types (zero-copy)."""
        return pa.Table.from_batches(
            [self.index.select(range(len(JOB_INDEX), self.index.num_columns))]
        ).rename_columns(self.key_names)

    def entries(self, rows: Sequence[int] | None = None) -> pa.RecordBatch:
        """The result index of entries ``rows`` (all by default), none failed."""
        index = self.index if rows is None else self.index.take(arrays.array(rows, pa.int64()))
        state = arrays.to_numpy(index.column(2)) > 1
        return pa.RecordBatch.from_arrays(
            [index.column(0), index.column(1), index.column(2), arrays.from_numpy(state)],
            schema=RESULT_INDEX,
        )

    def key_texts(self) -> dict[str, str]:
        """``job id → key`` as logs show it (:func:`dispatchkit.keys.key_text`)."""
        from dispatchkit.keys import key_text

        keys = self.keys().to_pylist()
        return {job_id: key_text(key) for job_id, key in zip(self.job_ids, keys, strict=True)}


def keys_table(
    names: Sequence[str], types: Sequence[str], keys: Sequence[Sequence[KeyValue]]
) -> pa.Table:
    """Key values as Python values (one tuple per job) into a typed table."""
    columns = list(zip(*keys, strict=True)) if keys else [() for _ in names]
    out = []
    for type_name, values in zip(types, columns, strict=True):
        arrow_type = KEY_TYPES[type_name]
        out.append(arrays.array(values, arrow_type))  # timestamps as epoch µs
    return pa.Table.from_arrays(out, names=list(names))


def key_schema(keys: pa.Schema) -> tuple[list[str], list[str]]:
    """The names and wire type names of a key table's columns (refusing other types)."""
    names, types = [], []
    for field in keys:
        type_name = str(field.type)
        if type_name not in KEY_TYPES:
            raise UsageError(
                f"key column {field.name} has type {type_name}; keys may be {', '.join(KEY_TYPES)}"
            )
        names.append(field.name)
        types.append(type_name)
    return names, types


def key_lists(keys: pa.Table) -> tuple[list[str], list[str], list[tuple[KeyValue, ...]]]:
    """A typed key table (one row per job) as names, types and Python tuples."""
    names, types = key_schema(keys.schema)
    columns = []
    for field in keys.schema:
        column = keys.column(field.name)
        if pa.types.is_timestamp(field.type):
            column = column.cast(pa.int64())
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
    jobs: Sequence[JobEntry] | pa.RecordBatch,
    table: pa.Table | pa.RecordBatch,
    compression: Compression = "lz4",
    check: bool = True,
) -> bytes:
    """Encode a job message; ``jobs`` (entries, or an index of :func:`job_index`) are
    contiguous row ranges covering ``table``."""
    for name in key_types:
        if name not in KEY_TYPES:
            raise UsageError(f"unknown key type {name!r}; keys may be {', '.join(KEY_TYPES)}")
    if isinstance(jobs, pa.RecordBatch):
        index = jobs
    else:
        if check:
            _check_ranges(jobs, table.num_rows, len(key_names))
        index = _index_of(jobs, key_names, key_types)
    if check:
        _offsets(index, list(key_names), list(key_types), table.num_rows)
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
            index=encode_body(index, INDEX_COMPRESSION),
            body=encode_body(table, compression),
        )
    )


def _ints(column: pa.Array, what: str) -> Int64Array:
    if column.null_count:
        raise DecodeError(f"the index has a null {what}")
    return arrays.to_numpy(column).astype(np.int64)


def _check_meta(ids: pa.Array, part: Int64Array, parts: Int64Array) -> None:
    """The entries' ids and parts, checked at once; the first fault is named."""
    if ids.null_count:
        raise DecodeError("the index has a null job_id")
    empty = arrays.byte_lengths(ids) < 1
    bad = (parts < 1) | (part < 0) | (part >= parts)
    if empty.any() or bad.any():
        i = int(np.flatnonzero(empty | bad)[0])
        job = ids[i].as_py()
        if empty[i]:
            raise DecodeError("a job has an empty job_id")
        raise DecodeError(f"job {job}: invalid part {part[i]} of {parts[i]}")


def _offsets(
    index: pa.RecordBatch, key_names: list[str], key_types: list[str], num_rows: int
) -> Int64Array:
    """The jobs' row offsets (``len(index) + 1``) of a checked index."""
    expected = [
        *JOB_INDEX,
        *((KEY_PREFIX + n, KEY_TYPES[t]) for n, t in zip(key_names, key_types, strict=True)),
    ]
    got = [(f.name, f.type) for f in index.schema]
    if got != expected:
        raise DecodeError(
            "the index's columns "
            + ", ".join(f"{n} {t}" for n, t in got)
            + " are not "
            + ", ".join(f"{n} {t}" for n, t in expected)
        )
    part, parts = _ints(index.column(1), "part"), _ints(index.column(2), "parts")
    _check_meta(index.column(0), part, parts)
    rows = _ints(index.column(3), "rows")
    if rows.size and int(rows.min()) < 1:
        i = int(np.flatnonzero(rows < 1)[0])
        raise DecodeError(f"job {index.column(0)[i].as_py()}: {rows[i]} rows")
    offsets = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(rows, out=offsets[1:])
    if int(offsets[-1]) != num_rows:
        raise DecodeError(f"the jobs cover {int(offsets[-1])} rows of a {num_rows}-row body")
    return offsets


def _check_ranges(jobs: Sequence[JobEntry], num_rows: int, n_keys: int) -> None:
    expected = 0
    for job in jobs:
        if not job.job_id:
            raise UsageError("a job has an empty job_id")
        if job.parts < 1 or not 0 <= job.part < job.parts:
            raise UsageError(f"job {job.job_id}: invalid part {job.part} of {job.parts}")
        if job.start != expected or job.end <= job.start:
            raise UsageError(
                f"job {job.job_id}: rows [{job.start}, {job.end}) do not follow row {expected}"
            )
        if len(job.key) != n_keys:
            raise UsageError(f"job {job.job_id}: {len(job.key)} key values for {n_keys} keys")
        expected = job.end
    if expected != num_rows:
        raise UsageError(f"the jobs cover {expected} rows of a {num_rows}-row body")


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
    if probe.v is None:
        raise DecodeError("not a dispatchkit message: it has no schema version 'v'")
    if probe.v != WIRE_VERSION:
        raise DecodeError(f"wire format v{probe.v!r} message; this worker reads v{WIRE_VERSION}")
    if probe.kind != kind:
        raise DecodeError(f"a {probe.kind!r} message where {kind!r} was expected")


def decode_jobs(
    payload: bytes, *, max_bytes: int = MAX_DECODE_BYTES, validate: bool = True
) -> JobMessage:
    """Decode a v3 job message; only :class:`DecodeError` escapes.

    ``validate=False`` skips Arrow's full validation of the body (UTF-8 of strings,
    offsets), leaving the structural checks.
    """
    data = _envelope_bytes(payload, max_bytes)
    _check_version(data, "jobs")
    try:
        env = _jobs_decoder.decode(data)
    except Exception as exc:
        raise DecodeError(f"not a valid v{WIRE_VERSION} job message: {exc}") from None
    if len(env.key_types) != len(env.key_names):
        raise DecodeError("key_names and key_types differ in length")
    for name in env.key_types:
        if name not in KEY_TYPES:
            raise DecodeError(f"unknown key type {name!r}")
    index = decode_body(env.index, what="index")
    batch = decode_body(env.body, full=validate)
    offsets = _offsets(index, env.key_names, env.key_types, batch.num_rows)
    return JobMessage(
        run_id=env.run_id,
        batch_id=env.batch_id,
        app=env.app,
        task=env.task,
        fingerprint=env.fingerprint,
        key_names=env.key_names,
        key_types=env.key_types,
        index=index,
        table=batch,
        offsets=offsets,
    )


# --------------------------------------------------------------------------- results


def result_index(entries: Sequence[ResultEntry]) -> pa.RecordBatch:
    """A result message's index from Python entries."""
    return pa.RecordBatch.from_arrays(
        [
            arrays.strings([e.job_id for e in entries]),
            arrays.array([e.part for e in entries], pa.int32()),
            arrays.array([e.parts for e in entries], pa.int32()),
            arrays.array([e.state for e in entries], pa.bool_()),
        ],
        schema=RESULT_INDEX,
    )


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
    #: One row per job part that succeeded: ``job_id``, ``part``, ``parts``, ``state``.
    index: pa.RecordBatch
    failed: list[Failure]
    #: The body: key columns, result columns, ``state:``-prefixed state columns.
    table: pa.RecordBatch

    def __len__(self) -> int:
        return int(self.index.num_rows)

    @cached_property
    def results(self) -> list[ResultEntry]:
        """The index as Python values, for cold paths."""
        c = self.index.columns
        return [
            ResultEntry(str(j), int(p), int(n), bool(s))
            for j, p, n, s in zip(
                c[0].to_pylist(), c[1].to_pylist(), c[2].to_pylist(), c[3].to_pylist(), strict=True
            )
        ]

    @cached_property
    def state(self) -> npt.NDArray[np.bool_]:
        return arrays.to_numpy(self.index.column(3))

    def _part(self, state: bool) -> pa.Table:
        mask = self.state == state
        names = self.table.schema.names
        keep = [n for n in names[len(self.key_names) :] if n.startswith(STATE_PREFIX) == state]
        picked = self.table.select([*self.key_names, *keep])
        index = self.index
        if not mask.all():
            rows = arrays.from_numpy(np.flatnonzero(mask).astype(np.int64))
            picked, index = picked.take(rows), index.take(rows)
        columns = [
            index.column(0),
            index.column(1).cast(pa.int64()),
            index.column(2).cast(pa.int64()),
            *picked.columns,
        ]
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
    results: Sequence[ResultEntry] | pa.RecordBatch,
    keys: pa.Table,
    values: pa.Table | None,
    states: pa.Table | None = None,
    failed: Sequence[Failure] = (),
    compression: Compression = "lz4",
) -> bytes:
    """Encode a result message.

    ``results`` are the entries (or their index, see :meth:`JobMessage.entries`);
    ``keys`` has one row per entry, ``values`` one row per entry with ``state = False``
    (in order), ``states`` one row per entry with ``state = True``.
    """
    index = results if isinstance(results, pa.RecordBatch) else result_index(results)
    if index.schema != RESULT_INDEX:
        raise UsageError(f"a result index has the columns {RESULT_INDEX}, not {index.schema}")
    n = index.num_rows
    if keys.num_rows != n:
        raise UsageError(f"{keys.num_rows} key rows for {n} results")
    state = arrays.to_numpy(index.column(3)) if n else np.zeros(0, dtype=np.bool_)
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
            index=encode_body(index, INDEX_COMPRESSION),
            failed=list(failed),
            body=encode_body(body, compression),
        )
    )


def decode_results(
    payload: bytes, *, max_bytes: int = MAX_DECODE_BYTES, validate: bool = True
) -> ResultMessage:
    """Decode a v3 result message; only :class:`DecodeError` escapes."""
    data = _envelope_bytes(payload, max_bytes)
    _check_version(data, "results")
    try:
        env = _results_decoder.decode(data)
    except Exception as exc:
        raise DecodeError(f"not a valid v{WIRE_VERSION} result message: {exc}") from None
    index = decode_body(env.index, what="index")
    if index.schema != RESULT_INDEX:
        raise DecodeError(f"the result index's columns are {index.schema.names}")
    batch = decode_body(env.body, full=validate)
    if batch.num_rows != index.num_rows:
        raise DecodeError(f"{batch.num_rows} body rows for {index.num_rows} results")
    if batch.schema.names[: len(env.key_names)] != env.key_names:
        raise DecodeError("the body does not start with the key columns")
    if index.column(3).null_count:
        raise DecodeError("the index has a null state")
    part, parts = _ints(index.column(1), "part"), _ints(index.column(2), "parts")
    _check_meta(index.column(0), part, parts)
    for e in env.failed:
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
        index=index,
        failed=env.failed,
        table=batch,
    )


# --------------------------------------------------------------------------- sizing


#: Bytes an Arrow buffer may add beyond its data: its metadata (16) and padding to 8
#: bytes, and when compressed the 8-byte uncompressed length and an lz4/zstd frame header
#: and end mark.
_BUFFER_OVERHEAD: Final = 24
_COMPRESSED_BUFFER_OVERHEAD: Final = 64


def _buffer_overhead(compression: Compression, budget: int | None) -> int:
    """Per-buffer allowance; under :data:`COMPRESS_MIN_BYTES` a message is never compressed
    (its batches are planned on their uncompressed size, below that threshold)."""
    if compression == "none" or (budget is not None and budget <= COMPRESS_MIN_BYTES):
        return _BUFFER_OVERHEAD
    return _COMPRESSED_BUFFER_OVERHEAD


def row_bytes(table: pa.Table | pa.RecordBatch) -> npt.NDArray[np.float64]:
    """An upper bound of each row's uncompressed body bytes, vectorized over columns."""
    n = table.num_rows
    cost = np.zeros(n, dtype=np.float64)
    for column in table.columns:
        t = column.type
        cost += 0.125  # a validity bit
        if pa.types.is_boolean(t):
            cost += 0.125
        elif pa.types.is_string(t) or pa.types.is_binary(t):
            cost += 4 + arrays.byte_lengths(column).astype(np.float64)
        elif pa.types.is_large_string(t) or pa.types.is_large_binary(t):
            cost += 8 + arrays.byte_lengths(column).astype(np.float64)
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


def body_overhead(
    schema: pa.Schema, compression: Compression = "lz4", budget: int | None = None
) -> int:
    """Bytes of a body with no rows, plus the per-buffer allowance of a batch (at most
    three buffers a column) in a message of at most ``budget`` bytes."""
    empty = len(encode_body(arrays.empty_batch(schema), compression))
    return empty + 3 * len(schema) * _buffer_overhead(compression, budget)


def index_schema(keys: pa.Schema) -> pa.Schema:
    """The schema of a job message's index for key columns ``keys``."""
    return pa.schema([*JOB_INDEX, *((KEY_PREFIX + f.name, f.type) for f in keys)])


def entry_costs(job_ids: pa.Array, keys: pa.Table | pa.RecordBatch) -> npt.NDArray[np.float64]:
    """An upper bound of each entry's index bytes (uncompressed), vectorized over jobs."""
    # job_id: a 4-byte offset and its bytes; part, parts, rows: 4 bytes; a validity bit each.
    return arrays.byte_lengths(job_ids) + (4 + 12 + 0.5) + row_bytes(keys)


def job_envelope_overhead(
    *,
    run_id: str,
    app: str,
    task: str,
    fingerprint: str,
    keys: pa.Schema,
    body: pa.Schema,
    compression: Compression,
    budget: int,
) -> int:
    """Bytes a job message takes beyond its rows and entries: the envelope (a batch id of
    up to 64 characters), an empty index and body, and their buffers' allowances."""
    head = _Jobs(
        v=WIRE_VERSION,
        run_id=run_id,
        batch_id="x" * 64,
        app=app,
        task=task,
        fingerprint=fingerprint,
        key_names=list(keys.names),
        key_types=[str(f.type) for f in keys],
        index=b"",
        body=b"",
    )
    # + 10: the two bin headers (at most 5 bytes each) around the index and the body.
    return (
        len(_encoder.encode(head))
        + 10
        + body_overhead(body, compression, budget)
        + index_overhead(keys)
    )


def index_overhead(keys: pa.Schema) -> int:
    """Bytes of an index with no rows, plus the per-buffer allowance of a batch (an
    index is never compressed, see :data:`INDEX_COMPRESSION`)."""
    return body_overhead(index_schema(keys), INDEX_COMPRESSION)


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
    key_names, key_types = key_schema(keys.schema)
    if len(job_ids) != off.size - 1 or keys.num_rows != off.size - 1:
        raise UsageError(f"{len(job_ids)} job ids and {keys.num_rows} keys for {off.size - 1} jobs")
    table = table.combine_chunks()
    fixed = job_envelope_overhead(
        run_id=run_id,
        app=app,
        task=task,
        fingerprint=fingerprint,
        keys=keys.schema,
        body=table.schema,
        compression=compression,
        budget=max_message_bytes,
    )
    capacity = float(max_message_bytes - fixed)
    if capacity <= 0:
        raise UsageError(f"max_message_bytes {max_message_bytes} cannot carry one job")
    # lz4 and zstd may add a little to incompressible buffers.
    slack = 1.0 if compression == "none" else 1.01
    rc = row_bytes(table) * (expected_ratio * slack)
    ids = arrays.strings(list(job_ids))
    keys = keys.combine_chunks()
    ec = entry_costs(ids, keys) * slack
    for _attempt in range(8):
        messages = []
        for cut in plan_cuts(off, rc, ec, capacity=capacity, groups=groups, max_jobs=max_jobs):
            first = int(cut.job[0])
            picked = arrays.from_numpy(cut.job)
            index = job_index(
                ids.take(picked), cut.part, cut.parts, cut.end - cut.start, keys.take(picked)
            )
            payload = encode_jobs(
                run_id=run_id,
                batch_id=f"{job_ids[first]}.{int(cut.part[0])}",
                app=app,
                task=task,
                fingerprint=fingerprint,
                key_names=key_names,
                key_types=key_types,
                jobs=index,
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
