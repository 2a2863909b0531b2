"""Job keys: which columns cut the input into jobs, exact time floors, job ids, key text.

A key is an ordered list of parts. A part is a declared column taken as is (``Int``,
``Text`` or ``Bool``) or a ``Timestamp`` column floored to a unit with :func:`floor`::

    app.key("store_id", dk.floor("ts", "day", name="day"))

Time is kept as an exact integer count of nanoseconds since the epoch (1970-01-01 UTC).
Floors are integer arithmetic, true floors for instants before 1970 too:

``second`` ``minute`` ``hour`` ``day``  fixed lengths;
``week``   ISO weeks, starting Monday 00:00 UTC (1970-01-01 was a Thursday);
``month``  calendar months of the proleptic Gregorian calendar, in UTC.

The same floors are given as DuckDB SQL over a BIGINT column (:func:`floor_sql`,
:func:`floor_us_sql`). DuckDB's ``//`` and ``%`` truncate toward zero, so the SQL turns a
truncated quotient into a floor by subtracting one when the remainder is negative.

Keys keep their types in results: ``Int`` → ``int64``, ``Text`` → ``string``, ``Bool`` →
``bool``, a floor → ``timestamp[us, tz=UTC]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

import pyarrow as pa

if TYPE_CHECKING:
    from dispatchkit.app import Column

NS_PER_US: Final = 1_000
NS_PER_SECOND: Final = 1_000_000_000
NS_PER_DAY: Final = 86_400 * NS_PER_SECOND

#: Fixed-length units, in nanoseconds.
FIXED_UNITS: Final = {
    "second": NS_PER_SECOND,
    "minute": 60 * NS_PER_SECOND,
    "hour": 3_600 * NS_PER_SECOND,
    "day": NS_PER_DAY,
}
UNITS: Final = (*FIXED_UNITS, "week", "month")

#: Days from a Monday to 1970-01-01 (a Thursday): ``(days + 3) mod 7`` is the weekday, Monday 0.
_THURSDAY: Final = 3

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The Arrow type of a floored key column.
KEY_TIMESTAMP: Final = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Floor:
    """A key part: the ``Timestamp`` column ``column`` floored to ``unit``, named ``name``."""

    column: str
    unit: str
    name: str

    def __post_init__(self) -> None:
        from dispatchkit.app import AppError

        if self.unit not in UNITS:
            raise AppError(
                f"floor({self.column!r}, {self.unit!r}): unknown unit; use one of "
                + ", ".join(UNITS)
            )
        if not self.column or not self.name:
            raise AppError(f"floor({self.column!r}, {self.unit!r}): column and name must be set")


def floor(column: str, unit: str, name: str | None = None) -> Floor:
    """A key part: the timestamp ``column`` floored to ``unit`` (named ``<column>_<unit>``)."""
    return Floor(column, unit, name if name is not None else f"{column}_{unit}")


# -- exact floors ----------------------------------------------------------------------


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(z: int) -> tuple[int, int, int]:
    """The proleptic Gregorian ``(year, month, day)`` of a day count since 1970-01-01."""
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (yoe + era * 400 + (m <= 2), m, d)


def floor_ns(epoch_ns: int, unit: str) -> int:
    """``epoch_ns`` floored to the start of its ``unit`` (UTC), in nanoseconds since the epoch."""
    size = FIXED_UNITS.get(unit)
    if size is not None:
        return epoch_ns // size * size
    days = epoch_ns // NS_PER_DAY
    if unit == "week":
        return (days - (days + _THURSDAY) % 7) * NS_PER_DAY
    if unit == "month":
        y, m, _ = civil_from_days(days)
        return days_from_civil(y, m, 1) * NS_PER_DAY
    raise ValueError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")


def _floor_div_sql(expr: str, n: int) -> str:
    """SQL for ``floor(expr / n)`` on BIGINT (DuckDB's ``//`` truncates toward zero)."""
    return f"(({expr}) // {n} - (({expr}) % {n} < 0)::BIGINT)"


def _floor_units_sql(expr: str, unit: str) -> tuple[str, int]:
    """SQL counting whole ``unit`` periods, and the nanoseconds in one count."""
    size = FIXED_UNITS.get(unit)
    if size is not None:
        return _floor_div_sql(expr, size), size
    days = _floor_div_sql(expr, NS_PER_DAY)
    if unit == "week":
        # (days + 3) mod 7, floored: the days since the last Monday.
        weekday = f"((({days}) + {_THURSDAY}) % 7 + 7) % 7"
        return f"({days} - {weekday})", NS_PER_DAY
    if unit == "month":
        # A DATE is an exact integer day number; its day of the month is civil arithmetic
        # on that integer, so no rounding can enter (the range is ±106,752 days).
        dom = f"dayofmonth(DATE '1970-01-01' + CAST({days} AS INTEGER))"
        return f"({days} - ({dom} - 1))", NS_PER_DAY
    raise ValueError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")


def floor_sql(expr: str, unit: str) -> str:
    """DuckDB SQL flooring a BIGINT epoch-ns ``expr`` to ``unit``, in epoch ns (BIGINT).

    Equal to :func:`floor_ns` wherever the floor is itself a BIGINT: every instant from
    1677-10-01 on (the first floors of the nanosecond range lie before ``-2**63``; use
    :func:`floor_us_sql` there, as the key columns do).
    """
    units, per = _floor_units_sql(expr, unit)
    return f"({units} * {per})"


def floor_us_sql(expr: str, unit: str) -> str:
    """DuckDB SQL flooring a BIGINT epoch-ns ``expr`` to ``unit``, in epoch µs (BIGINT).

    ``floor_ns(x, unit) // 1000`` for every BIGINT ``x``: units are whole seconds, so the
    floor in microseconds is exact and cannot overflow.
    """
    units, per = _floor_units_sql(expr, unit)
    return f"({units} * {per // NS_PER_US})"


# -- key columns -----------------------------------------------------------------------


def _part_name(part: str | Floor) -> str:
    return part if isinstance(part, str) else part.name


@dataclass(frozen=True)
class KeySpec:
    """The key columns of an app: names, Arrow types and the part each comes from."""

    parts: tuple[str | Floor, ...]
    names: tuple[str, ...]
    types: tuple[pa.DataType, ...]

    @classmethod
    def build(cls, parts: Iterable[str | Floor], columns: Mapping[str, Column]) -> KeySpec:
        """Check ``parts`` against the declared ``columns`` (raises :class:`AppError`)."""
        from dispatchkit.app import AppError, Bool, Int, Text, Timestamp

        parts = tuple(parts)
        if not parts:
            raise AppError("key() needs at least one part")
        names: list[str] = []
        types: list[pa.DataType] = []
        for part in parts:
            if isinstance(part, Floor):
                col = columns.get(part.column)
                if col is None:
                    raise AppError(f"key part floor({part.column!r}): no such column")
                if not isinstance(col, Timestamp):
                    raise AppError(
                        f"key part floor({part.column!r}): {part.column} is "
                        f"{type(col).__name__}, only a Timestamp can be floored"
                    )
                source, arrow = part.column, KEY_TIMESTAMP
            elif isinstance(part, str):
                col = columns.get(part)
                if col is None:
                    raise AppError(f"key part {part!r}: no such column")
                if isinstance(col, Int):
                    arrow = pa.int64()
                elif isinstance(col, Text):
                    arrow = pa.string()
                elif isinstance(col, Bool):
                    arrow = pa.bool_()
                else:
                    hint = "; use floor() for a timestamp" if isinstance(col, Timestamp) else ""
                    raise AppError(
                        f"key part {part!r}: a {type(col).__name__} column cannot be a key "
                        f"as is (Int, Text or Bool){hint}"
                    )
                source = part
            else:
                raise AppError(
                    f"key part {part!r}: expected a column name or floor(...), "
                    f"got {type(part).__name__}"
                )
            if not col.required:
                raise AppError(f"key part {_part_name(part)!r}: column {source} must be required")
            name = _part_name(part)
            if name in names:
                raise AppError(f"key part {name!r} appears twice")
            names.append(name)
            types.append(arrow)
        return cls(parts, tuple(names), tuple(types))

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(n, t, nullable=False) for n, t in zip(self.names, self.types, strict=True)]
        )

    @property
    def floors(self) -> tuple[Floor, ...]:
        return tuple(p for p in self.parts if isinstance(p, Floor))

    def values(self, key: Mapping[str, object]) -> tuple[object, ...]:
        """The key's values in key order (a :class:`KeyError` names a missing part)."""
        try:
            return tuple(key[n] for n in self.names)
        except KeyError as exc:
            raise KeyError(f"key {dict(key)!r} has no part {exc.args[0]!r}") from None


# -- identity and text -------------------------------------------------------------------


def epoch_us(when: datetime) -> int:
    """An aware (or UTC naive) datetime as exact microseconds since the epoch."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(microseconds=1)


def _token(value: object) -> bytes:
    """A typed, unambiguous encoding of one key value."""
    if value is None:
        text = "n"
    elif isinstance(value, bool):
        text = "b1" if value else "b0"
    elif isinstance(value, int):
        text = f"i{value}"
    elif isinstance(value, str):
        text = "s" + value
    elif isinstance(value, datetime):  # as the dispatcher has it: epoch µs, an int
        text = f"i{epoch_us(value)}"
    elif hasattr(value, "item"):  # a NumPy scalar
        return _token(value.item())
    else:
        raise TypeError(f"key value {value!r} of type {type(value).__name__} is not supported")
    raw = text.encode()
    return f"{len(raw)}:".encode() + raw


#: Hex digits of a job id: the first 80 bits of an MD5.
JOB_ID_HEX: Final = 20


def _prefix(run_id: str, app: str, task: str) -> bytes:
    out = b""
    for part in (run_id, app, task):
        raw = part.encode()
        out += f"{len(raw)}:".encode() + raw
    return out


def job_id(
    run_id: str, app: str, task: str, key_values: Sequence[object] | Mapping[str, object]
) -> str:
    """The stable id of the job for ``key_values`` of ``task`` of ``app`` in a run.

    The first 80 bits of the MD5 of the run, the app, the task and the key values, each
    typed and length-prefixed (:func:`_token`), as hex; a timestamp is its epoch
    microseconds (an int), as the dispatcher reads it. :func:`job_ids_sql` computes the
    same ids in DuckDB.
    """
    values = tuple(key_values.values()) if isinstance(key_values, Mapping) else key_values
    data = _prefix(run_id, app, task) + b"".join(_token(value) for value in values)
    return hashlib.md5(data, usedforsecurity=False).hexdigest()[:JOB_ID_HEX]


def job_ids(run_id: str, app: str, task: str, keys: Iterable[Sequence[object]]) -> list[str]:
    """:func:`job_id` of many keys at once (the run's prefix is hashed once)."""
    base = hashlib.md5(_prefix(run_id, app, task), usedforsecurity=False)
    keys = list(keys)
    if not keys:
        return []
    # One column at a time, by the type of its first value (key columns have one type);
    # a column of mixed values falls back to the general encoding.
    columns = [_tokens([k[i] for k in keys]) for i in range(len(keys[0]))]
    out = []
    for parts in zip(*columns, strict=True):
        digest = base.copy()
        digest.update(b"".join(parts))
        out.append(digest.hexdigest()[:JOB_ID_HEX])
    return out


def _tokens(values: list[object]) -> list[bytes]:
    """:func:`_token` of every value of one key column, fast for one-typed columns."""
    kinds = {type(v) for v in values}
    if kinds == {str}:
        raws = [b"s" + v.encode() for v in values]  # type: ignore[attr-defined]
    elif kinds == {int}:
        raws = [b"i%d" % v for v in values]  # type: ignore[str-format]
    else:
        return [_token(v) for v in values]
    return [b"%d:%s" % (len(r), r) for r in raws]


def _token_sql(name: str, t: pa.DataType) -> str:
    """DuckDB SQL of :func:`_token` of a key column (a timestamp as epoch µs, ``i``)."""
    col = '"' + name.replace('"', '""') + '"'
    if pa.types.is_boolean(t):
        return f"CASE WHEN {col} THEN '2:b1' ELSE '2:b0' END"
    if pa.types.is_string(t):
        return f"CAST(octet_length(encode({col})) + 1 AS VARCHAR) || ':s' || {col}"
    if pa.types.is_timestamp(t):
        text = f"('i' || CAST(epoch_us({col}) AS VARCHAR))"
    elif pa.types.is_integer(t):
        text = f"('i' || CAST({col} AS VARCHAR))"
    else:
        raise TypeError(f"key column {name} of type {t} has no job id token")
    return f"CAST(length({text}) AS VARCHAR) || ':' || {text}"


def job_ids_sql(run_id: str, app: str, task: str, schema: pa.Schema) -> tuple[str, str]:
    """DuckDB SQL of the job id of each row of a key table of ``schema`` (one expression,
    its parameter ``$prefix`` the second item): :func:`job_ids` without a Python loop."""
    tokens = " || ".join(_token_sql(f.name, f.type) for f in schema) or "''"
    expr = f"left(md5($prefix || {tokens}), {JOB_ID_HEX})"
    return expr, _prefix(run_id, app, task).decode()


def iso_ns(epoch_ns: int) -> str:
    """ISO 8601 in UTC of an epoch-ns instant, any year: ``2020-03-01T05:00:00Z``.

    Fractions are shown only when non-zero, with as many digits as they need (3, 6 or 9).
    """
    days, rest = divmod(epoch_ns, NS_PER_DAY)
    y, m, d = civil_from_days(days)
    secs, frac = divmod(rest, NS_PER_SECOND)
    hh, rem = divmod(secs, 3600)
    mm, ss = divmod(rem, 60)
    year = f"{y:04d}" if y >= 0 else f"-{-y:04d}"
    text = f"{year}-{m:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}"
    if frac:
        digits = f"{frac:09d}"
        for width in (3, 6, 9):
            if int(digits[width:] or "0") == 0:
                text += "." + digits[:width]
                break
    return text + "Z"


def _value_text(value: object) -> str:
    if isinstance(value, datetime):
        return iso_ns(epoch_us(value) * NS_PER_US)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        plain = value and not any(c.isspace() or c in "=\"'\\" for c in value)
        return value if plain else json.dumps(value, ensure_ascii=False)
    return str(value)


def key_text(key: Mapping[str, object]) -> str:
    """A key for logs and the CLI: ``store_id=3 day=2020-03-01T00:00:00Z``."""
    return " ".join(f"{name}={_value_text(value)}" for name, value in key.items())
