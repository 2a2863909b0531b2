"""An app's column rules compiled to DuckDB SQL.

For each declared column and the DuckDB type its input has (``VARCHAR`` from CSV, or a
Parquet file's own type), :func:`compile_column` gives

* ``value``: SQL normalizing the input column: ``BIGINT`` for ``Int``, ``DOUBLE`` for
  ``Float``, trimmed (and lower-cased) ``VARCHAR`` for ``Text``, ``BOOLEAN`` for
  ``Bool``, and for ``Timestamp`` exact ``BIGINT`` nanoseconds since the epoch
  (``epoch_ns`` for nanosecond columns, ``epoch_us * 1000`` for others, ISO 8601 text
  parsed to the microsecond with ``TRY_CAST(... AS TIMESTAMPTZ)``);
* ``checks``: the ordered ``(code, field, reason, bad)`` of the column's rules. ``bad`` is
  SQL over the input column (by its quoted name) and the normalized value (by
  ``alias``), true when the row fails; a check may assume the earlier ones passed, so
  they are meant to be read in order, as :func:`reason_case_sql` does.

:func:`checked_sql` puts them together: the source's rows, each column's normalized
value under its alias, and ``reason``, the code of the row's first failing check (NULL
for a valid row), columns taken in declaration order.

Text to timestamp uses the session's time zone for text without an offset: run
:data:`SESSION_SQL` (``SET TimeZone = 'UTC'``) on the connection first.

A Parquet column of a type no rule can read is refused before any row is read
(:func:`check_input_type`), naming the file, the column, its type and what is expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, NamedTuple

import pyarrow as pa

from dispatchkit.app import Bool, Column, Float, Int, Text, Timestamp
from dispatchkit.errors import InputError, UsageError
from dispatchkit.keys import epoch_us, iso_ns

SESSION_SQL: Final = "SET TimeZone = 'UTC'"

#: The instants a Timestamp can hold: exact epoch ns in ``[NS_MIN, NS_MAX)``. The
#: extremes of BIGINT are kept as markers for text or microseconds beyond that range.
INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1
NS_MIN: Final = INT64_MIN + 1
NS_MAX: Final = INT64_MAX

_INT64_MIN_SQL: Final = "(-9223372036854775807 - 1)"
_US_LIMIT: Final = INT64_MAX // 1000  # |epoch µs| up to this has an exact ns BIGINT
_WHITESPACE: Final = "chr(32) || chr(9) || chr(10) || chr(13) || chr(11) || chr(12)"

_INT_TEXT: Final = r"[+-]?[0-9]+"
_FLOAT_TEXT: Final = r"[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|nan|inf|infinity)"


class Check(NamedTuple):
    """One rule of a column: the code, the field, the one-line reason, the SQL failing it."""

    code: str
    field: str
    reason: str
    bad: str


@dataclass(frozen=True)
class ColumnSQL:
    """A column's rules compiled for one input type."""

    name: str
    column: Column
    input_type: str
    value: str
    alias: str
    checks: tuple[Check, ...]


# -- types ------------------------------------------------------------------------------

_KINDS: Final[dict[type[Column], tuple[str, ...]]] = {
    Int: ("integer", "text"),
    Float: ("float", "integer", "decimal", "text"),
    Text: ("text",),
    Bool: ("boolean", "text"),
    Timestamp: ("timestamp", "text"),
}
_EXPECTED: Final[dict[type[Column], str]] = {
    Int: "an integer or integer text",
    Float: "a number or numeric text",
    Text: "text",
    Bool: "a boolean or text",
    Timestamp: "a timestamp or ISO 8601 text",
}


def accepted_kinds(column: Column) -> tuple[str, ...]:
    """The kinds of input type a column of this type can be read from."""
    return _KINDS[type(column)]


def expected(column: Column) -> str:
    """What a column of this type accepts, in words (for errors)."""
    return _EXPECTED[type(column)]


def arrow_kind(t: pa.DataType) -> str:
    """The kind of an Arrow type: text, integer, float, decimal, boolean, timestamp, or itself."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_decimal(t):
        return "decimal"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return str(t)


_DUCK_INTEGERS: Final = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"}
    | {"UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"}
)
#: Integer types whose values may not fit BIGINT.
_DUCK_WIDE: Final = frozenset(("HUGEINT", "UBIGINT", "UHUGEINT"))


def duck_kind(type_name: str) -> str:
    """The kind of a DuckDB type name (as ``DESCRIBE`` prints it)."""
    t = type_name.strip().upper()
    if t in ("VARCHAR", "STRING", "TEXT") or t.startswith("ENUM"):
        return "text"
    if t in _DUCK_INTEGERS:
        return "integer"
    if t in ("FLOAT", "DOUBLE", "REAL"):
        return "float"
    if t.startswith("DECIMAL") or t.startswith("NUMERIC"):
        return "decimal"
    if t == "BOOLEAN":
        return "boolean"
    if t.startswith("TIMESTAMP"):
        return "timestamp"
    return t


def check_input_type(where: object, name: str, column: Column, t: pa.DataType | str) -> str:
    """The kind of input type ``t`` of column ``name``; :class:`InputError` if unreadable."""
    kind = duck_kind(t) if isinstance(t, str) else arrow_kind(t)
    if kind not in accepted_kinds(column):
        raise InputError(f"{where}: column {name} has type {t}; expected {expected(column)}")
    return kind


# -- SQL pieces -------------------------------------------------------------------------


def quote(name: str) -> str:
    """A DuckDB identifier for ``name``."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A DuckDB string literal for ``text``."""
    return "'" + text.replace("'", "''") + "'"


def _list(values: Sequence[str]) -> str:
    return ", ".join(literal(v) for v in values)


def strip_sql(expr: str) -> str:
    """SQL trimming spaces, tabs and line breaks (one-argument ``trim`` takes spaces only)."""
    return f"trim({expr}, {_WHITESPACE})"


def alias(name: str) -> str:
    """The quoted name a column's normalized value has in :func:`checked_sql`."""
    return quote("dk:" + name)


def ns_from_us_sql(us: str) -> str:
    """Exact epoch ns of epoch µs; µs beyond the ns range become the BIGINT extremes."""
    return (
        f"CASE WHEN ({us}) < -{_US_LIMIT} THEN {_INT64_MIN_SQL} "
        f"WHEN ({us}) > {_US_LIMIT} THEN {INT64_MAX} ELSE ({us}) * 1000 END"
    )


def _bounds_text(lo: object, hi: object, lo_sym: str = "[", hi_sym: str = "]") -> str:
    return f"{lo_sym}{lo}, {hi}{hi_sym}"


def _range_reason(name: str, lo: object | None, hi: object | None) -> str:
    if lo is not None and hi is not None:
        return f"{name} is outside {_bounds_text(lo, hi)}"
    if lo is not None:
        return f"{name} is below {lo}"
    return f"{name} is above {hi}"


def _range_bad(v: str, lo: object | None, hi: object | None) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{v} < {lo!r}")
    if hi is not None:
        parts.append(f"{v} > {hi!r}")
    return " OR ".join(parts)


def time_bounds(
    column: Timestamp, run_range: tuple[datetime | None, datetime | None] | None = None
) -> tuple[int, int]:
    """The column's accepted epoch-ns range ``[lo, hi)``, clipped to ``[NS_MIN, NS_MAX)``.

    ``run_range`` (the run's start and end) replaces ``min``/``max`` where given.
    """
    lo, hi = column.min_ns, column.max_ns
    if run_range is not None:
        start, end = run_range
        if start is not None:
            lo = epoch_us(start) * 1000
        if end is not None:
            hi = epoch_us(end) * 1000
    lo = NS_MIN if lo is None else min(max(lo, NS_MIN), NS_MAX)
    hi = NS_MAX if hi is None else min(max(hi, NS_MIN), NS_MAX)
    return lo, hi


# -- compiling --------------------------------------------------------------------------


def compile_column(
    name: str,
    column: Column,
    input_type: str,
    *,
    where: object = "input",
    run_range: tuple[datetime | None, datetime | None] | None = None,
) -> ColumnSQL:
    """``column``'s normalized value and ordered checks for input of DuckDB type ``input_type``.

    ``run_range`` applies to a ``Timestamp`` with ``run_range=True`` and is ignored for
    other columns.
    """
    kind = check_input_type(where, name, column, input_type)
    raw = quote(name)
    v = alias(name)
    text = strip_sql(raw if input_type.upper() == "VARCHAR" else f"CAST({raw} AS VARCHAR)")
    checks: list[Check] = []

    def check(what: str, reason: str, bad: str) -> None:
        checks.append(Check(f"{name}_{what}", name, reason, bad))

    if column.required:
        check("missing", f"{name} is missing", f"{raw} IS NULL")

    if isinstance(column, Int):
        if kind == "text":
            value = (
                f"CASE WHEN regexp_full_match({text}, '{_INT_TEXT}') "
                f"THEN TRY_CAST({text} AS BIGINT) END"
            )
        else:
            value = f"TRY_CAST({raw} AS BIGINT)"
        if kind == "text" or input_type.upper() in _DUCK_WIDE:
            check(
                "unparseable",
                f"{name} is not a 64-bit integer",
                f"{raw} IS NOT NULL AND {v} IS NULL",
            )
        if column.min is not None or column.max is not None:
            check(
                "out_of_range",
                _range_reason(name, column.min, column.max),
                _range_bad(v, column.min, column.max),
            )
    elif isinstance(column, Float):
        if kind == "text":
            value = (
                f"CASE WHEN regexp_full_match(lower({text}), '{_FLOAT_TEXT}') "
                f"THEN TRY_CAST({text} AS DOUBLE) END"
            )
            check("unparseable", f"{name} is not a number", f"{raw} IS NOT NULL AND {v} IS NULL")
        else:
            value = f"CAST({raw} AS DOUBLE)"
        check("invalid", f"{name} is not a finite number", f"NOT isfinite({v})")
        if column.min is not None or column.max is not None:
            lo = None if column.min is None else float(column.min)
            hi = None if column.max is None else float(column.max)
            check(
                "out_of_range", _range_reason(name, column.min, column.max), _range_bad(v, lo, hi)
            )
    elif isinstance(column, Text):
        value = raw if input_type.upper() == "VARCHAR" else f"CAST({raw} AS VARCHAR)"
        if column.strip:
            value = strip_sql(value)
        if column.lower:
            value = f"lower({value})"
        if column.nonempty:
            check("empty", f"{name} is empty", f"{v} = ''")
        if column.max_bytes is not None:
            check(
                "too_long",
                f"{name} is longer than {column.max_bytes} bytes",
                f"strlen({v}) > {column.max_bytes}",
            )
        if column.allowed is not None:
            shown = ", ".join(column.allowed)
            check(
                "not_allowed",
                f"{name} is not one of {shown}",
                f"{v} NOT IN ({_list(column.allowed)})",
            )
    elif isinstance(column, Bool):
        if kind == "text":
            # One look-up of the lower-cased text in a constant map (not two IN lists
            # over it): the text is trimmed and lower-cased once a row. The spellings of
            # true and false are disjoint (Bool checks), so the map is well defined.
            pairs = [f"{literal(w)}: true" for w in column.true]
            pairs += [f"{literal(w)}: false" for w in column.false]
            value = f"MAP {{{', '.join(pairs)}}}[lower({text})]"
            check(
                "invalid",
                f"{name} is not an accepted spelling of true/false",
                f"{raw} IS NOT NULL AND {v} IS NULL",
            )
        else:
            value = raw
    elif isinstance(column, Timestamp):
        t = input_type.upper()
        if kind == "text":
            value = ns_from_us_sql(f"epoch_us(TRY_CAST({text} AS TIMESTAMPTZ))")
            check(
                "unparseable",
                f"{name} is not a valid timestamp",
                f"{raw} IS NOT NULL AND {v} IS NULL",
            )
        elif t.endswith("_NS"):
            value = f"epoch_ns({raw})"
        else:
            value = ns_from_us_sql(f"epoch_us({raw})")
        lo, hi = time_bounds(column, run_range if column.run_range else None)
        span = f"[{iso_ns(lo)}, {iso_ns(hi)})"
        if column.run_range:
            why = f"{name} is outside the run's range {span}"
        elif column.min is None and column.max is None:
            why = f"{name} is outside the nanosecond timestamp range {span}"
        else:
            why = f"{name} is outside {span}"
        check("out_of_range", why, f"{v} < {lo} OR {v} >= {hi}")
    else:  # pragma: no cover - every Column type is handled above
        raise TypeError(f"unknown column type {type(column).__name__}")
    return ColumnSQL(name, column, input_type, value, v, tuple(checks))


def compile_rules(
    columns: Mapping[str, Column],
    input_types: Mapping[str, str],
    *,
    where: object = "input",
    run_range: tuple[datetime | None, datetime | None] | None = None,
) -> list[ColumnSQL]:
    """Every declared column compiled, in declaration order.

    ``input_types`` maps each column to its input's DuckDB type; a declared column missing
    from it is an :class:`InputError`. ``run_range`` (start, end) is the run's range for
    the ``run_range=True`` column; giving it to an app without one is a :class:`UsageError`.
    """
    if run_range is not None and not any(
        isinstance(c, Timestamp) and c.run_range for c in columns.values()
    ):
        raise UsageError("--start/--end: the app has no Timestamp column with run_range=True")
    missing = [n for n in columns if n not in input_types]
    if missing:
        raise InputError(f"{where}: missing column(s) {', '.join(missing)}")
    return [
        compile_column(n, c, input_types[n], where=where, run_range=run_range)
        for n, c in columns.items()
    ]


def reason_case_sql(compiled: Sequence[ColumnSQL]) -> str:
    """SQL giving the code of a row's first failing check, or NULL when none fails."""
    whens = [
        f"WHEN {check.bad} THEN {literal(check.code)}" for col in compiled for check in col.checks
    ]
    return f"CASE {' '.join(whens)} END" if whens else "CAST(NULL AS VARCHAR)"


def reasons(compiled: Sequence[ColumnSQL]) -> dict[str, tuple[str, str]]:
    """``code -> (field, reason)`` for every check, in check order."""
    return {check.code: (check.field, check.reason) for col in compiled for check in col.checks}


def checked_sql(compiled: Sequence[ColumnSQL], source: str) -> str:
    """A query of ``source``'s rows with each normalized value (by alias) and ``reason``."""
    values = ", ".join(f"{c.value} AS {c.alias}" for c in compiled)
    inner = f"SELECT *, {values} FROM ({source})" if values else f"SELECT * FROM ({source})"
    return f"SELECT *, {reason_case_sql(compiled)} AS reason FROM ({inner})"
