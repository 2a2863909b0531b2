"""Column rules compiled to DuckDB SQL, run on small tables: every reason code, every input type."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dispatchkit as dk
from dispatchkit import rules
from dispatchkit.app import Column
from dispatchkit.errors import InputError, UsageError
from dispatchkit.keys import days_from_civil

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NS_2020 = 1_577_836_800 * 10**9


def ns_of(when: datetime) -> int:
    return (when - EPOCH) // timedelta(microseconds=1) * 1000


def check(
    columns: dict[str, Column],
    table: pa.Table,
    tmp_path: Path | None = None,
    run_range: tuple[datetime | None, datetime | None] | None = None,
) -> list[tuple[str | None, dict[str, Any]]]:
    """``(reason, normalized values)`` per row; from Parquet when ``tmp_path`` is given."""
    con = duckdb.connect()
    con.execute(rules.SESSION_SQL)
    if tmp_path is None:
        con.register("src", table)
        source = "SELECT * FROM src"
    else:
        path = tmp_path / "in.parquet"
        pq.write_table(table, path)
        source = f"SELECT * FROM read_parquet('{path}')"
    types = {str(r[0]): str(r[1]) for r in con.execute(f"DESCRIBE {source}").fetchall()}
    compiled = rules.compile_rules(columns, types, where="in.parquet", run_range=run_range)
    names = [c.alias for c in compiled]
    sql = rules.checked_sql(compiled, source)
    out = []
    for row in con.execute(f"SELECT reason, {', '.join(names)} FROM ({sql})").fetchall():
        out.append((row[0], dict(zip(columns, row[1:], strict=True))))
    return out


def reasons_of(columns: dict[str, Column], table: pa.Table, **kw: Any) -> list[str | None]:
    return [r for r, _ in check(columns, table, **kw)]


# -- Int ------------------------------------------------------------------------------------


def test_int_from_text() -> None:
    cols: dict[str, Column] = {"n": dk.Int(min=0, max=100)}
    text = [" 7 ", "+5", "1.5", "x", "", "1_000", None, "-1", "101", "99999999999999999999"]
    got = check(cols, pa.table({"n": pa.array(text, pa.string())}))
    assert [r for r, _ in got] == [
        None,
        None,
        "n_unparseable",
        "n_unparseable",
        "n_unparseable",
        "n_unparseable",
        "n_missing",
        "n_out_of_range",
        "n_out_of_range",
        "n_unparseable",
    ]
    assert [v["n"] for _, v in got[:2]] == [7, 5]


def test_int_from_parquet(tmp_path: Path) -> None:
    cols: dict[str, Column] = {"a": dk.Int(max=10), "b": dk.Int()}
    table = pa.table(
        {
            "a": pa.array([1, 11, None, 3], pa.int16()),
            "b": pa.array([1, 2, 3, (1 << 64) - 1], pa.uint64()),
        }
    )
    got = check(cols, table, tmp_path)
    assert [r for r, _ in got] == [None, "a_out_of_range", "a_missing", "b_unparseable"]
    assert got[0][1] == {"a": 1, "b": 1}


def test_int_reasons() -> None:
    compiled = rules.compile_column("n", dk.Int(min=0), "VARCHAR")
    assert [(c.code, c.reason) for c in compiled.checks] == [
        ("n_missing", "n is missing"),
        ("n_unparseable", "n is not a 64-bit integer"),
        ("n_out_of_range", "n is below 0"),
    ]
    assert rules.compile_column("n", dk.Int(max=9), "BIGINT").checks[-1].reason == "n is above 9"
    both = rules.compile_column("n", dk.Int(min=1, max=9), "INTEGER")
    assert [c.code for c in both.checks] == ["n_missing", "n_out_of_range"]
    assert both.checks[-1].reason == "n is outside [1, 9]"


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1, max_size=20))
def test_int_text_is_exact(values: list[int]) -> None:
    got = check({"n": dk.Int()}, pa.table({"n": [str(v) for v in values]}))
    assert [v["n"] for _, v in got] == values and {r for r, _ in got} == {None}


# -- Float ----------------------------------------------------------------------------------


def test_float_from_text() -> None:
    cols: dict[str, Column] = {"x": dk.Float(min=0.0, max=10.0)}
    text = ["1.5", " .5 ", "2e0", "abc", "1_0.5", "nan", "-inf", "1e400", None, "-0.1", "10.5"]
    got = check(cols, pa.table({"x": pa.array(text, pa.string())}))
    assert [r for r, _ in got] == [
        None,
        None,
        None,
        "x_unparseable",
        "x_unparseable",
        "x_invalid",
        "x_invalid",
        "x_invalid",
        "x_missing",
        "x_out_of_range",
        "x_out_of_range",
    ]
    assert [v["x"] for _, v in got[:3]] == [1.5, 0.5, 2.0]


def test_float_from_parquet(tmp_path: Path) -> None:
    cols: dict[str, Column] = {"x": dk.Float(min=0.0), "i": dk.Float()}
    table = pa.table(
        {
            "x": pa.array([1.0, math.nan, math.inf, -2.0, None], pa.float32()),
            "i": pa.array([1, 2, 3, 4, 5], pa.int64()),
        }
    )
    got = check(cols, table, tmp_path)
    assert [r for r, _ in got] == [None, "x_invalid", "x_invalid", "x_out_of_range", "x_missing"]
    assert got[0][1] == {"x": 1.0, "i": 1.0}
    codes = [c.code for c in rules.compile_column("x", dk.Float(), "DOUBLE").checks]
    assert codes == ["x_missing", "x_invalid"]  # a typed column cannot be unparseable


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20))
def test_float_text_round_trips(values: list[float]) -> None:
    got = check({"x": dk.Float()}, pa.table({"x": [repr(v) for v in values]}))
    assert [v["x"] for _, v in got] == values and {r for r, _ in got} == {None}


# -- Text -----------------------------------------------------------------------------------


def test_text_rules() -> None:
    cols: dict[str, Column] = {
        "c": dk.Text(allowed=("web", "shop"), lower=True, max_bytes=4),
    }
    text = [" WEB ", "Shop", "", "   ", None, "éééé", "mail"]
    got = check(cols, pa.table({"c": pa.array(text, pa.string())}))
    assert [r for r, _ in got] == [
        None,
        None,
        "c_empty",
        "c_empty",
        "c_missing",
        "c_too_long",  # 8 bytes in UTF-8
        "c_not_allowed",
    ]
    assert [v["c"] for _, v in got[:2]] == ["web", "shop"]
    reasons = rules.reasons(rules.compile_rules(cols, {"c": "VARCHAR"}))
    assert reasons["c_not_allowed"] == ("c", "c is not one of web, shop")
    assert reasons["c_too_long"] == ("c", "c is longer than 4 bytes")


def test_text_options(tmp_path: Path) -> None:
    cols: dict[str, Column] = {
        "raw": dk.Text(strip=False, nonempty=False, max_bytes=None),
        "opt": dk.Text(required=False),
    }
    table = pa.table({"raw": [" a\t", "", "b"], "opt": ["x", None, " "]})
    got = check(cols, table, tmp_path)
    assert got[0] == (None, {"raw": " a\t", "opt": "x"})
    assert got[1] == (None, {"raw": "", "opt": None})
    assert got[2][0] == "opt_empty"


def test_text_from_dictionary_parquet(tmp_path: Path) -> None:
    table = pa.table({"c": pa.array(["a", "b", "a"]).dictionary_encode()})
    assert [v["c"] for _, v in check({"c": dk.Text()}, table, tmp_path)] == ["a", "b", "a"]


# -- Bool -----------------------------------------------------------------------------------


def test_bool_from_text() -> None:
    cols: dict[str, Column] = {"b": dk.Bool(true=("positive", "1"), false=("negative", "0"))}
    text = [" Positive ", "0", "NEGATIVE", "maybe", "", None]
    got = check(cols, pa.table({"b": pa.array(text, pa.string())}))
    assert [r for r, _ in got] == [None, None, None, "b_invalid", "b_invalid", "b_missing"]
    assert [v["b"] for _, v in got[:3]] == [True, False, False]


def test_bool_from_parquet(tmp_path: Path) -> None:
    got = check({"b": dk.Bool()}, pa.table({"b": [True, False, None]}), tmp_path)
    assert got == [(None, {"b": True}), (None, {"b": False}), ("b_missing", {"b": None})]


# -- Timestamp ------------------------------------------------------------------------------


def test_timestamp_from_text_is_exact() -> None:
    text = [
        "2020-01-01",
        "2020-01-01T00:00:00.1234567",  # digits past the microsecond are dropped (a floor)
        "2020-01-01T02:00:00+02:00",
        "1969-12-31T23:59:59.5",
        "1600-02-29 12:00:00Z",
        "bad",
        "",
        None,
        "3000-01-01",  # beyond nanoseconds: out of range
        "infinity",
    ]
    got = check({"t": dk.Timestamp()}, pa.table({"t": pa.array(text, pa.string())}))
    assert [r for r, _ in got] == [
        None,
        None,
        None,
        None,
        "t_out_of_range",
        "t_unparseable",
        "t_unparseable",
        "t_missing",
        "t_out_of_range",
        "t_unparseable",
    ]
    values = [v["t"] for _, v in got[:4]]
    assert values == [NS_2020, NS_2020 + 123_456_000, NS_2020, -500_000_000]


def test_timestamp_from_parquet_keeps_nanoseconds(tmp_path: Path) -> None:
    ns = [NS_2020 + 123_456_789, -1, None]
    table = pa.table(
        {
            "a": pa.array(ns, pa.timestamp("ns", tz="UTC")),
            "b": pa.array(ns, pa.timestamp("ns")),
            "c": pa.array([NS_2020 // 1000, -1, 7], pa.timestamp("us", tz="UTC")),
            "d": pa.array([NS_2020 // 10**6, -1, 5], pa.timestamp("ms")),
        }
    )
    cols: dict[str, Column] = {
        "a": dk.Timestamp(required=False),
        "b": dk.Timestamp(required=False),
        "c": dk.Timestamp(),
        "d": dk.Timestamp(),
    }
    got = check(cols, table, tmp_path)
    assert got[0] == (
        None,
        {"a": NS_2020 + 123_456_789, "b": NS_2020 + 123_456_789, "c": NS_2020, "d": NS_2020},
    )
    assert got[1] == (None, {"a": -1, "b": -1, "c": -1000, "d": -1_000_000})
    assert got[2] == (None, {"a": None, "b": None, "c": 7000, "d": 5_000_000})


def test_timestamp_beyond_nanoseconds_in_parquet(tmp_path: Path) -> None:
    year_2300 = days_from_civil(2300, 1, 1) * 86_400 * 10**6
    table = pa.table({"t": pa.array([year_2300, -year_2300], pa.timestamp("us"))})
    assert reasons_of({"t": dk.Timestamp()}, table, tmp_path=tmp_path) == ["t_out_of_range"] * 2


def test_timestamp_bounds_and_run_range() -> None:
    col = dk.Timestamp(min="2020-01-01", max="2020-02-01", run_range=True)
    text = ["2019-12-31T23:59:59.999999", "2020-01-01", "2020-01-31T23:59:59", "2020-02-01"]
    table = pa.table({"t": text})
    assert reasons_of({"t": col}, table) == ["t_out_of_range", None, None, "t_out_of_range"]
    start = datetime(2020, 1, 15, tzinfo=UTC)
    got = reasons_of({"t": col}, table, run_range=(start, None))
    assert got == ["t_out_of_range", "t_out_of_range", None, "t_out_of_range"]
    end = datetime(2021, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    assert reasons_of({"t": col}, table, run_range=(None, end)) == [
        "t_out_of_range",
        None,
        None,
        None,
    ]
    compiled = rules.compile_column("t", col, "VARCHAR", run_range=(start, end))
    assert compiled.checks[-1].reason == (
        "t is outside the run's range [2020-01-15T00:00:00Z, 2020-12-31T23:00:00Z)"
    )
    plain = rules.compile_column("t", dk.Timestamp(min="2020-01-01"), "VARCHAR")
    assert (
        plain.checks[-1].reason
        == "t is outside [2020-01-01T00:00:00Z, 2262-04-11T23:47:16.854775807Z)"
    )
    # run_range applies only to the run_range column
    other = rules.compile_column(
        "t", dk.Timestamp(min="2020-01-01"), "VARCHAR", run_range=(start, end)
    )
    assert other.checks == plain.checks


def test_run_range_needs_a_run_range_column() -> None:
    with pytest.raises(UsageError, match="no Timestamp column with run_range=True"):
        rules.compile_rules({"t": dk.Timestamp()}, {"t": "VARCHAR"}, run_range=(EPOCH, None))


@settings(max_examples=50, deadline=None)
@given(
    when=st.datetimes(min_value=datetime(1700, 1, 1), max_value=datetime(2200, 1, 1)),
    offset_min=st.integers(-14 * 60, 14 * 60),
)
def test_timestamp_text_with_offsets(when: datetime, offset_min: int) -> None:
    aware = when.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    got = check({"t": dk.Timestamp()}, pa.table({"t": [aware.isoformat()]}))
    assert got == [(None, {"t": ns_of(aware)})]


# -- the first failing check, types refused up front ----------------------------------------


def test_first_failing_column_wins() -> None:
    cols: dict[str, Column] = {"a": dk.Int(), "b": dk.Bool(), "c": dk.Text()}
    table = pa.table(
        {"a": ["x", "1", "1"], "b": ["nope", "nope", "yes"], "c": pa.array([None] * 3, pa.string())}
    )
    assert reasons_of(cols, table) == ["a_unparseable", "b_invalid", "c_missing"]
    compiled = rules.compile_rules(cols, {"a": "VARCHAR", "b": "VARCHAR", "c": "VARCHAR"})
    case = rules.reason_case_sql(compiled)
    assert case.startswith("CASE WHEN") and case.index("'a_missing'") < case.index("'c_missing'")
    assert rules.reason_case_sql([]) == "CAST(NULL AS VARCHAR)"


@pytest.mark.parametrize(
    ("column", "arrow", "ok"),
    [
        (dk.Int(), pa.int32(), True),
        (dk.Int(), pa.string(), True),
        (dk.Int(), pa.float64(), False),
        (dk.Float(), pa.decimal128(10, 2), True),
        (dk.Float(), pa.int8(), True),
        (dk.Float(), pa.bool_(), False),
        (dk.Text(), pa.large_string(), True),
        (dk.Text(), pa.dictionary(pa.int32(), pa.string()), True),
        (dk.Text(), pa.int64(), False),
        (dk.Bool(), pa.bool_(), True),
        (dk.Bool(), pa.int8(), False),
        (dk.Timestamp(), pa.timestamp("ns", tz="UTC"), True),
        (dk.Timestamp(), pa.date32(), False),
        (dk.Timestamp(), pa.int64(), False),
    ],
)
def test_arrow_types_accepted_or_refused(column: Column, arrow: pa.DataType, ok: bool) -> None:
    if ok:
        assert rules.check_input_type("f.parquet", "c", column, arrow) in rules.accepted_kinds(
            column
        )
        return
    with pytest.raises(InputError) as info:
        rules.check_input_type("f.parquet", "c", column, arrow)
    text = str(info.value)
    assert text == f"f.parquet: column c has type {arrow}; expected {rules.expected(column)}"


@pytest.mark.parametrize(
    ("column", "duck", "message"),
    [
        (dk.Int(), "DOUBLE", "column n has type DOUBLE; expected an integer or integer text"),
        (dk.Text(), "BIGINT", "column n has type BIGINT; expected text"),
        (dk.Bool(), "INTEGER", "column n has type INTEGER; expected a boolean or text"),
        (dk.Timestamp(), "DATE", "column n has type DATE; expected a timestamp or ISO 8601 text"),
        (dk.Float(), "BOOLEAN", "column n has type BOOLEAN; expected a number or numeric text"),
    ],
)
def test_duckdb_types_refused(column: Column, duck: str, message: str) -> None:
    with pytest.raises(InputError, match=f"^data/x.parquet: {message}$"):
        rules.compile_column("n", column, duck, where="data/x.parquet")


def test_missing_declared_column() -> None:
    with pytest.raises(InputError, match=r"x\.csv: missing column\(s\) b"):
        rules.compile_rules({"a": dk.Int(), "b": dk.Int()}, {"a": "VARCHAR"}, where="x.csv")


def test_kinds() -> None:
    assert rules.duck_kind("TIMESTAMP WITH TIME ZONE") == "timestamp"
    assert rules.duck_kind("TIMESTAMPTZ_NS") == "timestamp"
    assert rules.duck_kind("DECIMAL(10,2)") == "decimal"
    assert rules.duck_kind("UBIGINT") == "integer"
    assert rules.duck_kind("BLOB") == "BLOB"
    assert rules.arrow_kind(pa.binary()) == "binary"
    assert rules.accepted_kinds(dk.Timestamp()) == ("timestamp", "text")
    assert rules.quote('a"b') == '"a""b"' and rules.alias("x") == '"dk:x"'
