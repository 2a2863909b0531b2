"""Arrow arrays from Python and NumPy values, and back, without importing pandas.

pyarrow imports pandas, when it is installed, the first time a process calls
``pa.array``, ``pa.scalar``, ``Array.to_numpy`` or ``Schema.empty_table`` (it checks
whether the argument is a pandas object): 0.3-0.8 s of CPU, paid by the dispatcher, the
collector and every worker process, none of which uses pandas. The functions here build
the same arrays from buffers (``pa.Array.from_buffers``) and read them back with
``np.frombuffer``; a case they do not cover (nulls among Python values, a type without a
fixed width) falls back to pyarrow's own constructor, which gives the same array.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

#: NumPy dtypes of the fixed-width Arrow types built from buffers here.
_NUMPY: dict[pa.DataType, np.dtype[Any]] = {
    pa.int8(): np.dtype(np.int8),
    pa.int16(): np.dtype(np.int16),
    pa.int32(): np.dtype(np.int32),
    pa.int64(): np.dtype(np.int64),
    pa.uint8(): np.dtype(np.uint8),
    pa.uint16(): np.dtype(np.uint16),
    pa.uint32(): np.dtype(np.uint32),
    pa.uint64(): np.dtype(np.uint64),
    pa.float32(): np.dtype(np.float32),
    pa.float64(): np.dtype(np.float64),
}


def _storage(t: pa.DataType) -> pa.DataType:
    """The integer type a timestamp, date or duration is stored as (else ``t``)."""
    if pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_date64(t):
        return pa.int64()
    if pa.types.is_date32(t):
        return pa.int32()
    return t


def from_numpy(values: npt.NDArray[Any], type: pa.DataType | None = None) -> pa.Array:
    """A 1-d NumPy array (no nulls) as an Arrow array of ``type`` (default: of its
    dtype), zero-copy when it can; NaN stays NaN, as with ``pa.array``."""
    if type is None:
        type = pa.from_numpy_dtype(values.dtype)
    storage = _storage(type)
    if pa.types.is_boolean(type):
        bits = np.packbits(np.asarray(values, dtype=np.bool_), bitorder="little")
        return pa.Array.from_buffers(type, len(values), [None, pa.py_buffer(bits)])
    dtype = _NUMPY.get(storage)
    if dtype is None:
        return pa.array(values, type)
    data = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(type, len(data), [None, pa.py_buffer(data)])


def array(values: Sequence[Any] | Iterable[Any], type: pa.DataType) -> pa.Array:
    """Python values as an Arrow array of ``type`` (like ``pa.array(values, type)``).

    Integers, floats, booleans and text are built from buffers; timestamps, dates and
    durations are given as their integer storage (e.g. epoch microseconds). Values
    holding ``None``, and other types, go through ``pa.array``.
    """
    items = values if isinstance(values, list | tuple) else list(values)
    if None in items:  # one C loop (identity first), where a generator costs ~50 ns a value
        return pa.array(items, type)
    storage = _storage(type)
    if pa.types.is_string(type):
        return strings(items)
    if pa.types.is_boolean(type):
        return from_numpy(np.fromiter(items, dtype=np.bool_, count=len(items)), type)
    dtype = _NUMPY.get(storage)
    if dtype is None:
        return pa.array(items, type)
    return from_numpy(np.fromiter(items, dtype=dtype, count=len(items)), type)


def strings(values: Sequence[str]) -> pa.Array:
    """Python strings (no ``None``) as an Arrow ``string`` array."""
    joined = "".join(values)
    if joined.isascii():  # job ids, codes: a character is a byte, one encode for all
        n = len(values)
        ascii_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=n), out=ascii_offsets[1:])
        if ascii_offsets[-1] < 2**31:
            data = pa.py_buffer(joined.encode("ascii"))
            offsets = pa.py_buffer(ascii_offsets.astype(np.int32))
            return pa.Array.from_buffers(pa.string(), n, [None, offsets, data])
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    if offsets[-1] >= 2**31:
        return pa.array(values, pa.string())
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(encoded), buffers)


def repeat(value: Any, n: int, type: pa.DataType) -> pa.Array:
    """``n`` copies of one (non-null) Python value, built without a Python loop."""
    if pa.types.is_string(type):
        one = str(value).encode()
        if len(one) * n < 2**31:
            offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(one))
            buffers = [None, pa.py_buffer(offsets), pa.py_buffer(one * n)]
            return pa.Array.from_buffers(pa.string(), n, buffers)
    storage = _storage(type)
    dtype = np.dtype(np.bool_) if pa.types.is_boolean(type) else _NUMPY.get(storage)
    if dtype is None or value is None:
        return array([value] * n, type)
    return from_numpy(np.full(n, value, dtype=dtype), type)


def to_numpy(column: pa.Array | pa.ChunkedArray) -> npt.NDArray[Any]:
    """A column as NumPy, like ``to_numpy(zero_copy_only=False)``.

    Integers, floats and booleans without nulls are read from their buffers; any other
    column goes through pyarrow's ``to_numpy``.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    t = column.type
    if column.null_count == 0:
        if pa.types.is_boolean(t):
            buf = column.buffers()[1]
            bits = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
            start = column.offset
            return np.unpackbits(bits, bitorder="little", count=start + len(column))[start:].astype(
                np.bool_
            )
        dtype = _NUMPY.get(t)
        if dtype is not None:
            buf = column.buffers()[1]
            if buf is None or len(column) == 0:
                return np.zeros(0, dtype=dtype)
            start = column.offset * dtype.itemsize
            return np.frombuffer(buf, dtype=dtype, count=len(column), offset=start)
    return np.asarray(column.to_numpy(zero_copy_only=False))


def byte_lengths(column: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.int64]:
    """Bytes of each value of a string or binary column (large or not), 0 for a null;
    read from its offsets (``pc.fill_null(pc.binary_length(c), 0)`` imports pandas)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        large = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
        dtype = np.int64 if large else np.int32
        validity, offsets_buf = chunk.buffers()[:2]
        n = len(chunk)
        if n == 0 or offsets_buf is None:
            parts.append(np.zeros(n, dtype=np.int64))
            continue
        offsets = np.frombuffer(
            offsets_buf, dtype=dtype, count=n + 1, offset=chunk.offset * np.dtype(dtype).itemsize
        )
        lengths = np.diff(offsets).astype(np.int64)
        if chunk.null_count and validity is not None:
            bits = np.frombuffer(validity, dtype=np.uint8)
            valid = np.unpackbits(bits, bitorder="little", count=chunk.offset + n)[chunk.offset :]
            lengths *= valid
        parts.append(lengths)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    """A record batch of ``schema`` with no rows (``RecordBatch.from_pylist([])``)."""
    return pa.RecordBatch.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)


def empty_table(schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` with no rows (``Schema.empty_table()``)."""
    return pa.Table.from_batches([], schema=schema)
