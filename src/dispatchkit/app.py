"""A dispatchkit app: the input contract, the key, and the tasks that compute each job.

::

    import dispatchkit as dk
    import pyarrow as pa

    app = dk.App("sales", version="1")
    app.columns(store_id=dk.Int(min=0), ts=dk.Timestamp(), amount=dk.Float(min=0.0))
    app.key("store_id", dk.floor("ts", "day", name="day"))

    @app.task(result={"n": pa.int64(), "total": pa.float64()}, reads=("amount",))
    def totals(key: dict, rows: pa.Table) -> dict:
        return {"n": rows.num_rows, "total": pa.compute.sum(rows["amount"]).as_py()}

Workers find an app by import path (:func:`load_app`), never by pickle; the app's
:attr:`App.fingerprint` (its version and a hash of its tasks' code) travels in every
message so a worker running other code refuses the work instead of computing it.

Declaration mistakes raise :class:`AppError`, one line naming the app and what is wrong.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import reduce
from pathlib import Path
from typing import Any, ClassVar, Final, overload

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from dispatchkit import arrays
from dispatchkit.errors import TaskError, UsageError
from dispatchkit.keys import Floor, KeySpec, epoch_us, floor

__all__ = [
    "APP_ENV",
    "DEFAULT_APP",
    "App",
    "AppError",
    "Bool",
    "Column",
    "Combine",
    "Float",
    "Int",
    "Jobs",
    "ResultError",
    "Task",
    "Text",
    "Timestamp",
    "floor",
    "load_app",
]

DEFAULT_APP: Final = "dispatchkit.apps.covid:app"
APP_ENV: Final = "DISPATCHKIT_APP"
FORMATS: Final = ("arrow", "polars", "numpy")

TRUE_SPELLINGS: Final = ("true", "t", "yes", "y", "1")
FALSE_SPELLINGS: Final = ("false", "f", "no", "n", "0")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class AppError(UsageError):
    """An app declaration that cannot work (a bad column rule, key or task)."""


class ResultError(TaskError):
    """A task returned a row or table that does not match its declared schema."""


# -- column types ---------------------------------------------------------------------


class Column:
    """Base of the column types; ``required=False`` lets a value be missing (null)."""

    required: bool
    kind: ClassVar[str] = "column"


def _check_bounds(cls: str, lo: object, hi: object) -> None:
    for which, v in (("min", lo), ("max", hi)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise AppError(f"{cls}({which}={v!r}): expected a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise AppError(f"{cls}({which}={v!r}): bounds must be finite")
    if lo is not None and hi is not None and lo > hi:  # type: ignore[operator]
        raise AppError(f"{cls}(min={lo!r}, max={hi!r}): min is above max")


@dataclass(frozen=True)
class Int(Column):
    """A 64-bit integer; ``min``/``max`` are inclusive bounds. Text must be digits (not ``1.5``)."""

    min: int | None = None
    max: int | None = None
    required: bool = True
    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        for which, v in (("min", self.min), ("max", self.max)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise AppError(f"Int({which}={v!r}): expected an integer")
            if v is not None and not -(1 << 63) <= v < (1 << 63):
                raise AppError(f"Int({which}={v!r}): outside the 64-bit integer range")
        _check_bounds("Int", self.min, self.max)


@dataclass(frozen=True)
class Float(Column):
    """A finite 64-bit float (NaN and infinities are invalid); ``min``/``max`` inclusive."""

    min: float | None = None
    max: float | None = None
    required: bool = True
    kind: ClassVar[str] = "float"

    def __post_init__(self) -> None:
        _check_bounds("Float", self.min, self.max)


def _spellings(cls: str, what: str, values: object, *, lower: bool, strip: bool) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise AppError(f"{cls}({what}={values!r}): expected a tuple of strings")
    out = tuple(values)
    for v in out:
        if not isinstance(v, str):
            raise AppError(f"{cls}({what}=...): {v!r} is not a string")
        if (strip and v != v.strip()) or (lower and v != v.lower()):
            norm = "trimmed and lower-cased" if lower else "trimmed"
            raise AppError(f"{cls}({what}=...): {v!r} can never match, values are compared {norm}")
    if len(set(out)) != len(out):
        raise AppError(f"{cls}({what}=...): a value appears twice")
    return out


@dataclass(frozen=True)
class Text(Column):
    """Text, trimmed (``strip``) and lower-cased (``lower``) before the checks.

    ``nonempty``: blank text is invalid; ``max_bytes``: the longest value in UTF-8 (None:
    no limit); ``allowed``: the only values accepted, compared after normalizing.
    """

    allowed: tuple[str, ...] | None = None
    strip: bool = True
    lower: bool = False
    nonempty: bool = True
    max_bytes: int | None = 1024
    required: bool = True
    kind: ClassVar[str] = "text"

    def __post_init__(self) -> None:
        if self.allowed is not None:
            allowed = _spellings(
                "Text", "allowed", self.allowed, lower=self.lower, strip=self.strip
            )
            if not allowed:
                raise AppError("Text(allowed=()): no value could ever be accepted")
            object.__setattr__(self, "allowed", allowed)
        if self.max_bytes is not None and (
            isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int)
        ):
            raise AppError(f"Text(max_bytes={self.max_bytes!r}): expected an integer")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise AppError(f"Text(max_bytes={self.max_bytes!r}): must be at least 1")


@dataclass(frozen=True)
class Bool(Column):
    """A boolean column as is, or text matched (trimmed, lower-cased) against spellings."""

    true: tuple[str, ...] = TRUE_SPELLINGS
    false: tuple[str, ...] = FALSE_SPELLINGS
    required: bool = True
    kind: ClassVar[str] = "bool"

    def __post_init__(self) -> None:
        t = _spellings("Bool", "true", self.true, lower=True, strip=True)
        f = _spellings("Bool", "false", self.false, lower=True, strip=True)
        if not t or not f:
            raise AppError("Bool(): true and false need at least one spelling each")
        both = sorted(set(t) & set(f))
        if both:
            raise AppError(f"Bool(): {both[0]!r} is a spelling of both true and false")
        object.__setattr__(self, "true", t)
        object.__setattr__(self, "false", f)


def _instant(what: str, value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise AppError(f"Timestamp({what}={value!r}): not an ISO 8601 date or time") from None
    if not isinstance(value, datetime):
        raise AppError(f"Timestamp({what}={value!r}): expected a datetime or ISO 8601 text")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class Timestamp(Column):
    """An instant: a timestamp column, or ISO 8601 text (UTC when it has no offset).

    ``min``/``max`` bound it to ``[min, max)`` (datetimes or ISO text; naive means UTC).
    The app's one ``run_range=True`` column takes the run's ``--start``/``--end`` instead.
    Kept as exact integer nanoseconds since the epoch; text is read to the microsecond.
    """

    min: datetime | str | None = None
    max: datetime | str | None = None
    required: bool = True
    run_range: bool = False
    kind: ClassVar[str] = "timestamp"

    def __post_init__(self) -> None:
        lo, hi = _instant("min", self.min), _instant("max", self.max)
        if lo is not None and hi is not None and lo >= hi:
            raise AppError(f"Timestamp(min={self.min!r}, max={self.max!r}): min is not before max")
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)

    @property
    def min_ns(self) -> int | None:
        """``min`` as exact nanoseconds since the epoch."""
        lo = _instant("min", self.min)
        return None if lo is None else epoch_us(lo) * 1000

    @property
    def max_ns(self) -> int | None:
        """``max`` as exact nanoseconds since the epoch."""
        hi = _instant("max", self.max)
        return None if hi is None else epoch_us(hi) * 1000


# -- jobs -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Jobs:
    """Many jobs at once: one key row per job, and the jobs' rows back to back.

    The rows of job ``i`` are ``rows[offsets[i]:offsets[i + 1]]``; ``offsets`` has
    ``len(jobs) + 1`` entries, from 0 to ``rows.num_rows``.
    """

    keys: pa.Table
    rows: pa.Table
    offsets: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64)
        n = self.keys.num_rows
        if offsets.shape != (n + 1,):
            raise ValueError(f"Jobs: {n} keys need {n + 1} offsets, got shape {offsets.shape}")
        if offsets[0] != 0 or offsets[-1] != self.rows.num_rows or np.any(np.diff(offsets) < 0):
            raise ValueError(
                f"Jobs: offsets must rise from 0 to {self.rows.num_rows} (the row count)"
            )
        object.__setattr__(self, "offsets", offsets)

    @classmethod
    def from_groups(
        cls,
        key_schema: pa.Schema,
        groups: Sequence[tuple[Mapping[str, Any], pa.Table]],
        rows_schema: pa.Schema | None = None,
    ) -> Jobs:
        """Jobs from ``(key, rows)`` pairs (every rows table with the same schema)."""
        keys = pa.Table.from_pylist([dict(k) for k, _ in groups], schema=key_schema)
        if groups:
            rows = pa.concat_tables([r for _, r in groups])
        elif rows_schema is not None:
            rows = arrays.empty_table(rows_schema)
        else:
            rows = pa.table({})
        sizes = [r.num_rows for _, r in groups]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        return cls(keys, rows, offsets)

    def __len__(self) -> int:
        return int(self.keys.num_rows)

    def key(self, i: int) -> dict[str, Any]:
        return {name: self.keys.column(name)[i].as_py() for name in self.keys.column_names}

    def rows_of(self, i: int) -> pa.Table:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.rows.slice(start, stop - start)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], pa.Table]]:
        keys = self.keys.to_pylist()
        for i, key in enumerate(keys):
            yield key, self.rows_of(i)

    def select(self, columns: Sequence[str]) -> Jobs:
        """The same jobs with only ``columns`` of the rows."""
        return Jobs(self.keys, self.rows.select(list(columns)), self.offsets)


# -- tasks ------------------------------------------------------------------------------

TaskFn = Callable[[dict[str, Any], Any], Mapping[str, Any]]
VectorFn = Callable[[Jobs], Any]
ChartFn = Callable[[pa.Table, Path], None]


@dataclass(frozen=True)
class Combine:
    """How a task's result is computed from parts of a key too big for one message.

    ``add(state, rows)`` folds one part's rows into a state, ``merge(a, b)`` joins two
    states, ``finish(key, state)`` gives the result row; ``create()`` is the empty state.
    ``state`` is the state's schema (a dict of Arrow types or a schema), like a result's.
    """

    state: Mapping[str, pa.DataType] | pa.Schema
    create: Callable[[], Mapping[str, Any]]
    add: Callable[[Mapping[str, Any], Any], Mapping[str, Any]]
    merge: Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]]
    finish: Callable[[dict[str, Any], Mapping[str, Any]], Mapping[str, Any]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", _schema("Combine(state=...)", self.state))
        for name in ("create", "add", "merge", "finish"):
            if not callable(getattr(self, name)):
                raise AppError(f"Combine({name}=...): expected a function")

    @property
    def schema(self) -> pa.Schema:
        return self.state

    def functions(self) -> tuple[Callable[..., Any], ...]:
        return (self.create, self.add, self.merge, self.finish)


def _schema(what: str, spec: object) -> pa.Schema:
    """A result or state schema from a dict of Arrow types or a ``pa.Schema``."""
    if isinstance(spec, pa.Schema):
        schema = spec
    elif isinstance(spec, Mapping):
        fields = []
        for name, t in spec.items():
            if not isinstance(name, str) or not name:
                raise AppError(f"{what}: column names must be non-empty strings, got {name!r}")
            if not isinstance(t, pa.DataType):
                raise AppError(
                    f"{what}: column {name} has {t!r}; expected a pyarrow type such as pa.int64()"
                )
            fields.append(pa.field(name, t))
        schema = pa.schema(fields)
    else:
        raise AppError(f"{what}: expected a dict of pyarrow types or a pa.Schema")
    if len(schema) == 0:
        raise AppError(f"{what}: needs at least one column")
    if len(set(schema.names)) != len(schema.names):
        raise AppError(f"{what}: a column name appears twice")
    return schema


_INT_TYPES = (int, np.integer)
_FLOAT_TYPES = (int, float, np.integer, np.floating)


#: The exact value types :meth:`Task.rows_table` takes for a column of each family.
_DATETIME: set[type] = {datetime}
_QUICK_TYPES: dict[str, set[type]] = {
    "integer": {int},
    "float": {float, int},
    "text": {str},
    "timestamp": _DATETIME,
    "bool": {bool},
}


def _family(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return str(t)


def _fits(got: pa.DataType, want: pa.DataType) -> bool:
    """Whether a ``got`` column may be cast to ``want`` (null, or a widening in its family)."""
    if got == want or pa.types.is_null(got):
        return True
    g, w = _family(got), _family(want)
    return g == w or (g == "integer" and w == "float")


class Task:
    """One task of an app: the per-job function, its schema and optional forms.

    Call :meth:`run_one` for one job and :meth:`run_jobs` for many (the vectorized form
    when there is one); :meth:`check_result` names any mismatch with the schema.
    """

    def __init__(
        self,
        app: App,
        fn: TaskFn,
        *,
        name: str,
        result: pa.Schema,
        reads: tuple[str, ...] | None,
        format: str,
        combine: Combine | None,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.result = result
        self._reads = reads
        self.format = format
        self.combine = combine
        self.vectorized_fn: VectorFn | None = None
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.app.name}.{self.name}>"

    def __call__(self, key: dict[str, Any], rows: Any) -> Mapping[str, Any]:
        """The per-job function itself, unchecked."""
        return self.fn(key, rows)

    @property
    def reads(self) -> tuple[str, ...]:
        """The input columns the task needs (default: every declared column not in the key)."""
        if self._reads is not None:
            return self._reads
        plain = {p for p in self.app.key_parts if isinstance(p, str)}
        return tuple(c for c in self.app.input_columns if c not in plain)

    def vectorized(self, fn: VectorFn) -> VectorFn:
        """Decorator: the form computing every job of a message at once (``Jobs`` → table)."""
        if not callable(fn):
            raise AppError(f"task {self.name}: vectorized form must be a function")
        if self.vectorized_fn is not None:
            raise AppError(f"task {self.name}: vectorized form declared twice")
        self.vectorized_fn = fn
        return fn

    def functions(self) -> tuple[Callable[..., Any], ...]:
        """Every function of the task (per-job, vectorized, combine), for the fingerprint."""
        fns: list[Callable[..., Any]] = [self.fn]
        if self.vectorized_fn is not None:
            fns.append(self.vectorized_fn)
        if self.combine is not None:
            fns.extend(self.combine.functions())
        return tuple(fns)

    # -- running -----------------------------------------------------------------------

    def _fail(self, why: str) -> ResultError:
        return ResultError(f"task {self.name}: {why}")

    def select_rows(self, rows: pa.Table) -> pa.Table:
        """``rows`` with only the columns the task reads, in its order."""
        return self._select(rows)

    def _select(self, rows: pa.Table) -> pa.Table:
        reads = self.reads
        missing = [c for c in reads if c not in rows.column_names]
        if missing:
            raise TaskError(
                f"task {self.name}: rows lack column(s) {', '.join(missing)} the task reads"
            )
        return rows if list(rows.column_names) == list(reads) else rows.select(list(reads))

    def convert(self, rows: pa.Table) -> Any:
        """``rows`` in the task's format: a ``pa.Table``, a polars DataFrame or NumPy arrays."""
        if self.format == "polars":
            import polars as pl

            return pl.from_arrow(rows)
        if self.format == "numpy":
            return {c: arrays.to_numpy(rows.column(c)) for c in rows.column_names}
        return rows

    def run_one(self, key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
        """The result row of one job, checked against the schema."""
        return self.check_row(self.fn(key, self.convert(self._select(rows))))

    def run_jobs(self, jobs: Jobs) -> pa.Table:
        """One result row per job, in job order (the vectorized form when there is one)."""
        view = jobs.select(self.reads) if len(jobs) else jobs
        if self.vectorized_fn is not None:
            return self._vector_table(self.vectorized_fn(view), len(jobs))
        out = [self.check_row(self.fn(key, self.convert(rows))) for key, rows in view]
        return pa.Table.from_pylist(out, schema=self.result)

    def _vector_table(self, out: object, n: int) -> pa.Table:
        if hasattr(out, "to_arrow") and not isinstance(out, pa.Table):  # a polars DataFrame
            out = out.to_arrow()
        if isinstance(out, pa.RecordBatch):
            out = pa.Table.from_batches([out])
        if isinstance(out, Mapping):
            self._check_names(out.keys(), "result")
            columns = {}
            for name in self.result.names:
                values = out[name]
                try:
                    columns[name] = (
                        values
                        if isinstance(values, pa.Array | pa.ChunkedArray)
                        else _to_arrow(values)
                    )
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
                    raise self._fail(
                        f"column {name} ({self.result.field(name).type} in the result schema) "
                        f"cannot be made an Arrow array ({str(exc).splitlines()[0]})"
                    ) from None
            lengths = {len(a) for a in columns.values()}
            if len(lengths) > 1:
                raise self._fail("vectorized form returned columns of different lengths")
            out = pa.table(columns)
        if not isinstance(out, pa.Table):
            raise self._fail(
                f"vectorized form returned {type(out).__name__}; expected a dict of columns "
                "or a pyarrow Table"
            )
        table = self.check_table(out)
        if table.num_rows != n:
            raise self._fail(f"vectorized form returned {table.num_rows} rows for {n} jobs")
        return table

    # -- checking ----------------------------------------------------------------------

    def check_result(self, result: object) -> Any:
        """``result`` (a row dict or a table) checked against the result schema.

        Returns it normalized (a table cast to the declared types where that is a lossless
        widening, columns in declared order); raises :class:`ResultError` naming the task,
        the column and both types otherwise.
        """
        if isinstance(result, pa.RecordBatch):
            result = pa.Table.from_batches([result])
        if isinstance(result, pa.Table):
            return self.check_table(result)
        if isinstance(result, Mapping):
            return self.check_row(result)
        raise self._fail(
            f"returned {type(result).__name__}; expected a dict (one row) or a pyarrow Table"
        )

    def _check_names(self, names: Any, what: str, schema: pa.Schema | None = None) -> None:
        schema = self.result if schema is None else schema
        got = list(names)
        for name in schema.names:
            if name not in got:
                raise self._fail(
                    f"{what} has no column {name} ({schema.field(name).type} in the {what} schema)"
                )
        for name in got:
            if name not in schema.names:
                raise self._fail(f"{what} has column {name}, which is not in the {what} schema")

    def check_row(
        self, row: object, *, what: str = "result", schema: pa.Schema | None = None
    ) -> dict[str, Any]:
        """One row dict checked against the result (or ``what``) schema."""
        schema = self.result if schema is None else schema
        if not isinstance(row, Mapping):
            raise self._fail(f"returned {type(row).__name__} as a {what} row; expected a dict")
        self._check_names(row.keys(), what, schema)
        out: dict[str, Any] = {}
        for f in schema:
            out[f.name] = self._check_value(f, row[f.name], what)
        return out

    def _check_value(self, f: pa.Field, value: Any, what: str) -> Any:
        t = f.type
        if value is None:
            if not f.nullable:
                raise self._fail(f"column {f.name} is {t} in the {what} schema, but got None")
            return None
        if isinstance(value, np.generic):
            value = value.item()
        fam = _family(t)
        ok: bool
        if fam == "integer":
            ok = isinstance(value, _INT_TYPES) and not isinstance(value, bool)
        elif fam == "float":
            ok = isinstance(value, _FLOAT_TYPES) and not isinstance(value, bool)
        elif pa.types.is_boolean(t):
            ok = isinstance(value, bool)
        elif fam == "text":
            ok = isinstance(value, str)
        elif fam == "timestamp":
            ok = isinstance(value, datetime)
        else:
            ok = True
        if ok:
            try:
                pa.scalar(value, type=t)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
                ok = False
        if not ok:
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise self._fail(
                f"column {f.name} is {t} in the {what} schema, but the task returned "
                f"{type(value).__name__} ({shown})"
            )
        return value

    def rows_table(self, rows: Sequence[object]) -> pa.Table | None:
        """The result table of many unchecked result rows at once, or ``None``.

        The quick check of the per-job form: every row a plain dict with exactly the
        schema's names, every value of a column of the one exact Python type that column
        takes (``int``; ``float`` or ``int``; ``str``; ``bool``; ``datetime``), built
        column by column. Anything else (``None``, NumPy scalars, other types, values
        out of range) gives ``None``: :meth:`check_row` then checks each row and names
        what is wrong, as it always did. Both ways give the same table.
        """
        names = set(self.result.names)
        if not all(type(r) is dict and r.keys() == names for r in rows):
            return None
        columns = []
        for f in self.result:
            allowed = _QUICK_TYPES.get(_family(f.type))
            if allowed is None:
                return None
            values = [r[f.name] for r in rows]  # type: ignore[index]
            if not set(map(type, values)) <= allowed:
                return None
            try:
                if allowed is _DATETIME:
                    columns.append(pa.array(values, type=f.type))
                else:  # from buffers: no pandas import (see dispatchkit.arrays)
                    columns.append(arrays.array(values, f.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError):
                return None
        return pa.Table.from_arrays(columns, schema=self.result)

    def check_table(
        self, table: pa.Table, *, what: str = "result", schema: pa.Schema | None = None
    ) -> pa.Table:
        """A table checked against the schema, cast where lossless, in declared order."""
        schema = self.result if schema is None else schema
        self._check_names(table.column_names, what, schema)
        if len(set(table.column_names)) != len(table.column_names):
            raise self._fail(f"{what} table has a column name twice")
        columns = []
        for f in schema:
            col = table.column(f.name)
            if col.type != f.type:
                if not _fits(col.type, f.type):
                    raise self._fail(
                        f"column {f.name} is {f.type} in the {what} schema, but the task "
                        f"returned {col.type}"
                    )
                import pyarrow.compute as pc  # here: a worker need not import it

                try:
                    col = pc.cast(col, f.type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise self._fail(
                        f"column {f.name} is {f.type} in the {what} schema, but the task "
                        f"returned {col.type} that does not fit ({str(exc).splitlines()[0]})"
                    ) from None
            columns.append(col)
        return pa.Table.from_arrays(columns, schema=schema)

    # -- combine -----------------------------------------------------------------------

    def _combine(self) -> Combine:
        if self.combine is None:
            raise TaskError(f"task {self.name} has no combine; a key cannot be split for it")
        return self.combine

    def part_state(self, rows: pa.Table) -> dict[str, Any]:
        """The state of one part of a split key: ``add(create(), rows)``, checked."""
        c = self._combine()
        state = c.add(c.create(), self.convert(self._select(rows)))
        return self.check_row(state, what="state", schema=c.schema)

    def finish_states(
        self, key: dict[str, Any], states: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The result row of a split key from its parts' states: merge them, then finish."""
        c = self._combine()
        if not states:
            raise TaskError(f"task {self.name}: no part states to finish")
        merged = reduce(c.merge, states)
        merged = self.check_row(merged, what="state", schema=c.schema)
        return self.check_row(c.finish(key, merged))


# -- the app ----------------------------------------------------------------------------


def _to_arrow(values: object) -> pa.Array:
    """A vectorized task's result column as Arrow: a 1-d NumPy array of numbers or
    booleans from its buffer (no pandas import), anything else by ``pa.array``."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "biuf":
        return arrays.from_numpy(values)
    return pa.array(values)


def _source(fn: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if code is None:
            return repr(fn)
        return repr((code.co_code, code.co_consts, code.co_names))


@dataclass(eq=False)
class App:
    """A dispatchkit app: named, versioned, with columns, a key and tasks."""

    name: str
    version: str = "0"
    input_columns: dict[str, Column] = field(default_factory=dict, init=False)
    key_parts: tuple[str | Floor, ...] = field(default=(), init=False)
    tasks: dict[str, Task] = field(default_factory=dict, init=False)
    chart_fn: ChartFn | None = field(default=None, init=False)
    chart_preload: tuple[str, ...] = field(default=(), init=False)
    #: The import path :func:`load_app` found the app by (None when built in-process).
    spec: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise AppError(
                f"App({self.name!r}): a name is letters, digits and _ . - (not starting with . -)"
            )
        if not isinstance(self.version, str) or not self.version.strip():
            raise AppError(f"App({self.name!r}, version={self.version!r}): version must be text")

    def __repr__(self) -> str:
        return f"<App {self.name} {self.version}: tasks {', '.join(self.tasks) or 'none'}>"

    def _fail(self, why: str) -> AppError:
        return AppError(f"app {self.name}: {why}")

    # -- declaring ---------------------------------------------------------------------

    def columns(self, **types: Column) -> App:
        """Declare the input columns and their rules (undeclared input columns are ignored)."""
        if not types:
            raise self._fail("columns() needs at least one column")
        for name, col in types.items():
            if not isinstance(col, Column):
                raise self._fail(
                    f"column {name}: expected dk.Int/Float/Text/Bool/Timestamp(...), got {col!r}"
                )
            if name in self.input_columns:
                raise self._fail(f"column {name} is declared twice")
        merged = {**self.input_columns, **types}
        ranged = [n for n, c in merged.items() if isinstance(c, Timestamp) and c.run_range]
        if len(ranged) > 1:
            raise self._fail(
                f"columns {' and '.join(ranged)} both have run_range=True; at most one may"
            )
        self.input_columns = merged
        return self

    def key(self, *parts: str | Floor) -> App:
        """Declare the key: one job per distinct value of these parts."""
        if self.key_parts:
            raise self._fail("key() is declared twice")
        try:
            spec = KeySpec.build(parts, self.input_columns)
        except AppError as exc:
            raise self._fail(str(exc)) from None
        for task in self.tasks.values():
            self._check_clash(task.name, task.result, spec.names)
        self.key_parts = spec.parts
        return self

    @property
    def keyspec(self) -> KeySpec:
        """The key columns: names, Arrow types and parts."""
        if not self.key_parts:
            raise self._fail("no key declared; call app.key(...)")
        return KeySpec.build(self.key_parts, self.input_columns)

    def _check_clash(self, task: str, result: pa.Schema, key_names: Sequence[str]) -> None:
        for name in result.names:
            if name in key_names:
                raise self._fail(f"task {task}: result column {name} is also a key column")

    def task(
        self,
        result: Mapping[str, pa.DataType] | pa.Schema,
        reads: Sequence[str] | None = None,
        format: str = "arrow",
        combine: Combine | None = None,
        name: str | None = None,
    ) -> Callable[[TaskFn], Task]:
        """Decorator: register a per-job function ``fn(key, rows) -> dict`` as a task."""
        schema = _schema(f"app {self.name}: task result", result)
        if format not in FORMATS:
            raise self._fail(f"task format {format!r}: use one of {', '.join(FORMATS)}")
        if combine is not None and not isinstance(combine, Combine):
            raise self._fail(f"task combine: expected dk.Combine(...), got {combine!r}")
        if not self.input_columns:
            raise self._fail("declare columns() before tasks")
        read_cols: tuple[str, ...] | None = None
        if reads is not None:
            if isinstance(reads, str):
                raise self._fail(f"task reads={reads!r}: expected a tuple of column names")
            read_cols = tuple(reads)
            for c in read_cols:
                if c not in self.input_columns:
                    raise self._fail(f"task reads {c!r}, which is not a declared column")
            if len(set(read_cols)) != len(read_cols):
                raise self._fail("task reads a column twice")

        def register(fn: TaskFn) -> Task:
            if not callable(fn):
                raise self._fail(f"@app.task must decorate a function, not {fn!r}")
            task_name = name if name is not None else getattr(fn, "__name__", "")
            if not isinstance(task_name, str) or not _NAME.fullmatch(task_name):
                raise self._fail(f"task name {task_name!r}: use letters, digits and _ . -")
            if task_name in self.tasks:
                raise self._fail(f"task {task_name} is declared twice")
            if self.key_parts:
                self._check_clash(task_name, schema, self.keyspec.names)
            task = Task(
                self,
                fn,
                name=task_name,
                result=schema,
                reads=read_cols,
                format=format,
                combine=combine,
            )
            self.tasks[task_name] = task
            return task

        return register

    @overload
    def chart(self, fn: ChartFn) -> ChartFn: ...

    @overload
    def chart(self, *, preload: Sequence[str] = ()) -> Callable[[ChartFn], ChartFn]: ...

    def chart(
        self, fn: ChartFn | None = None, *, preload: Sequence[str] = ()
    ) -> ChartFn | Callable[[ChartFn], ChartFn]:
        """Decorator: the report's picture of the results, ``fn(results, path)``.

        ``@app.chart`` or ``@app.chart(preload=["my_charts"])``: ``preload`` names modules
        the chart needs (beyond matplotlib), imported by the run's chart process while
        the jobs run, so drawing at the end does not wait for them.
        """
        if isinstance(preload, str):
            raise self._fail("@app.chart(preload=...) takes a list of module names")

        def decorate(f: ChartFn) -> ChartFn:
            if not callable(f):
                raise self._fail("@app.chart must decorate a function")
            if self.chart_fn is not None:
                raise self._fail("chart is declared twice")
            self.chart_fn = f
            self.chart_preload = tuple(preload)
            return f

        return decorate if fn is None else decorate(fn)

    # -- using -------------------------------------------------------------------------

    def get_task(self, name: str) -> Task:
        """The task called ``name``, or a :class:`UsageError` listing the app's tasks."""
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UsageError(f"unknown task {name!r} (known: {known})") from None

    @property
    def run_range_column(self) -> str | None:
        """The ``Timestamp`` column the run's ``--start``/``--end`` apply to, if any."""
        for name, col in self.input_columns.items():
            if isinstance(col, Timestamp) and col.run_range:
                return name
        return None

    @property
    def fingerprint(self) -> str:
        """``<version>:<16 hex>``: the version and a hash of every task's code and schema."""
        # Reading source is slow (tokenizing whole files): computed once per declaration.
        memo_key = (
            self.version,
            tuple((n, *(id(f) for f in t.functions())) for n, t in sorted(self.tasks.items())),
        )
        memo = self.__dict__.get("_fingerprint_memo")
        if memo is not None and memo[0] == memo_key:
            return str(memo[1])
        value = self._fingerprint()
        self.__dict__["_fingerprint_memo"] = (memo_key, value)
        return value

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.tasks):
            task = self.tasks[name]
            state = "" if task.combine is None else str(task.combine.schema)
            for part in (name, str(task.result), state, task.format, ",".join(task.reads)):
                digest.update(part.encode() + b"\x00")
            for fn in task.functions():
                digest.update(_source(fn).encode() + b"\x00")
        return f"{self.version}:{digest.hexdigest()[:16]}"


# -- loading ----------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not attr.isidentifier():
        return spec, "app"
    return target, attr


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_app(spec: str | None = None) -> App:
    """The :class:`App` at ``spec``: ``"pkg.mod:attr"`` or ``"path/to/file.py:attr"``.

    ``attr`` defaults to ``app``. Without ``spec``, ``$DISPATCHKIT_APP`` names it, else the
    built-in COVID app. Every failure is one :class:`UsageError` line naming what was tried.
    """
    origin = ""
    if spec is None:
        env = os.environ.get(APP_ENV, "").strip()
        spec, origin = (env, f" (from ${APP_ENV})") if env else (DEFAULT_APP, " (the default)")

    def fail(why: str) -> UsageError:
        return UsageError(f"cannot load app {spec!r}{origin}: {why}")

    target, attr = _split_spec(spec.strip())
    if not target:
        raise fail("expected module:attr or path/to/file.py:attr")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if is_file:
        path = Path(target)
        if path.is_dir():
            raise fail(f"{target} is a directory, not a Python file")
        if not path.is_file():
            raise fail(f"no such file {target}")
        resolved = str(path.resolve())
        mod_name = (
            "_dispatchkit_app_" + hashlib.blake2b(resolved.encode(), digest_size=6).hexdigest()
        )
        mod_spec = importlib.util.spec_from_file_location(mod_name, resolved)
        if mod_spec is None or mod_spec.loader is None:
            raise fail(f"{target} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise fail(f"running {target} failed: {_first_line(exc)}") from None
    else:
        if not all(part.isidentifier() for part in target.split(".")):
            raise fail(f"{target!r} is neither a module name nor a path to a .py file")
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
                raise fail(f"no module named {exc.name!r}") from None
            raise fail(f"importing {target} failed: {_first_line(exc)}") from None
        except Exception as exc:
            raise fail(f"importing {target} failed: {_first_line(exc)}") from None
    obj = getattr(module, attr, None)
    if obj is None and not hasattr(module, attr):
        apps = sorted(n for n, v in vars(module).items() if isinstance(v, App))
        hint = f" (its apps: {', '.join(apps)})" if apps else " (it defines no App)"
        raise fail(f"{target} has no attribute {attr!r}{hint}")
    if not isinstance(obj, App):
        raise fail(f"{target}:{attr} is a {type(obj).__name__}, not a dispatchkit App")
    obj.spec = f"{target}:{attr}"
    return obj
