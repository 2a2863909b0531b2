"""Keys: exact floors (Python and DuckDB SQL) against independent references, ids, text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dispatchkit as dk
from dispatchkit.app import AppError
from dispatchkit.keys import (
    FIXED_UNITS,
    NS_PER_DAY,
    UNITS,
    KeySpec,
    civil_from_days,
    days_from_civil,
    floor_ns,
    floor_sql,
    floor_us_sql,
    iso_ns,
    job_id,
    key_text,
)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The first instant whose month (and week) floor is itself a BIGINT of nanoseconds.
SQL_NS_MIN = days_from_civil(1677, 10, 1) * NS_PER_DAY

int64s = st.integers(INT64_MIN, INT64_MAX)


def ns_of(when: datetime) -> int:
    return (when - EPOCH) // timedelta(microseconds=1) * 1000


def reference(when: datetime, unit: str) -> datetime:
    """The floor by Python's calendar (proleptic Gregorian, UTC)."""
    if unit == "second":
        return when.replace(microsecond=0)
    if unit == "minute":
        return when.replace(second=0, microsecond=0)
    if unit == "hour":
        return when.replace(minute=0, second=0, microsecond=0)
    day = datetime(when.year, when.month, when.day, tzinfo=UTC)
    if unit == "day":
        return day
    if unit == "week":
        return day - timedelta(days=day.weekday())
    return datetime(when.year, when.month, 1, tzinfo=UTC)


instants = st.datetimes(
    min_value=datetime(1600, 1, 1), max_value=datetime(2400, 12, 31, 23, 59, 59, 999999)
).map(lambda d: d.replace(tzinfo=UTC))


@settings(max_examples=200, deadline=None)
@given(when=instants, extra_ns=st.integers(0, 999), unit=st.sampled_from(UNITS))
def test_floor_ns_matches_the_calendar(when: datetime, extra_ns: int, unit: str) -> None:
    assert floor_ns(ns_of(when) + extra_ns, unit) == ns_of(reference(when, unit))


@settings(max_examples=200, deadline=None)
@given(value=int64s, unit=st.sampled_from(sorted(FIXED_UNITS)))
def test_fixed_floors_are_integer_floor_division(value: int, unit: str) -> None:
    size = FIXED_UNITS[unit]
    got = floor_ns(value, unit)
    assert got == value // size * size
    assert got <= value < got + size


@settings(max_examples=200, deadline=None)
@given(value=int64s)
def test_week_and_month_floors_start_on_monday_and_the_first(value: int) -> None:
    week = floor_ns(value, "week")
    assert week <= value < week + 7 * NS_PER_DAY and week % NS_PER_DAY == 0
    assert (week // NS_PER_DAY + 3) % 7 == 0  # a Monday: 1970-01-01 was a Thursday
    month = floor_ns(value, "month")
    y, m, d = civil_from_days(month // NS_PER_DAY)
    assert d == 1 and month <= value
    assert (y, m) == civil_from_days(value // NS_PER_DAY)[:2]


@pytest.mark.parametrize(
    ("text", "unit", "expected"),
    [
        ("1970-01-01T00:00:00Z", "week", "1969-12-29T00:00:00Z"),
        ("1969-12-31T23:59:59.999999999Z", "day", "1969-12-31T00:00:00Z"),
        ("1969-12-31T23:59:59.999999999Z", "month", "1969-12-01T00:00:00Z"),
        ("2024-02-29T12:00:00Z", "month", "2024-02-01T00:00:00Z"),
        ("2020-03-01T00:00:00Z", "week", "2020-02-24T00:00:00Z"),
        ("1900-03-01T00:00:00Z", "week", "1900-02-26T00:00:00Z"),
    ],
)
def test_floor_examples(text: str, unit: str, expected: str) -> None:
    when = datetime.fromisoformat(text.replace(".999999999", ".999999"))
    extra = 999 if ".999999999" in text else 0
    assert iso_ns(floor_ns(ns_of(when) + extra, unit)) == expected


def test_floor_ns_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unknown unit 'year'"):
        floor_ns(0, "year")


def test_civil_round_trip() -> None:
    for z in (-106752, -719468, -1, 0, 1, 59, 60, 11016, 106751, 2932896):
        assert days_from_civil(*civil_from_days(z)) == z


def _duck(values: list[int], sql_of: str) -> list[int]:
    con = duckdb.connect()
    con.register("t", pa.table({"i": range(len(values)), "x": pa.array(values, pa.int64())}))
    return [r[0] for r in con.execute(f"SELECT {sql_of} FROM t ORDER BY i").fetchall()]


EDGES = [INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX - 1, INT64_MAX, SQL_NS_MIN, SQL_NS_MIN - 1]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(SQL_NS_MIN, INT64_MAX), min_size=1, max_size=40),
    unit=st.sampled_from(UNITS),
)
def test_floor_sql_matches_floor_ns(values: list[int], unit: str) -> None:
    assert _duck(values, floor_sql("x", unit)) == [floor_ns(v, unit) for v in values]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(int64s, min_size=1, max_size=40), unit=st.sampled_from(UNITS))
def test_floor_us_sql_matches_floor_ns_over_all_int64(values: list[int], unit: str) -> None:
    values = values + [v for v in EDGES if v >= INT64_MIN]
    assert _duck(values, floor_us_sql("x", unit)) == [floor_ns(v, unit) // 1000 for v in values]


@pytest.mark.parametrize("unit", UNITS)
def test_floor_sql_edges(unit: str) -> None:
    ok = [v for v in EDGES if v >= SQL_NS_MIN]
    assert _duck(ok, floor_sql("x", unit)) == [floor_ns(v, unit) for v in ok]


def test_month_sql_over_every_month_start_in_range() -> None:
    """The first instant of each month from 1678 to 2261, and the instant before it."""
    starts = [
        days_from_civil(y, m, 1) * NS_PER_DAY for y in range(1678, 2262) for m in range(1, 13)
    ]
    values = [v + d for v in starts for d in (-1, 0)]
    assert _duck(values, floor_sql("x", "month")) == [floor_ns(v, "month") for v in values]


# -- key specs ------------------------------------------------------------------------


def _app() -> dk.App:
    app = dk.App("k")
    app.columns(
        store=dk.Int(),
        region=dk.Text(),
        flag=dk.Bool(),
        ts=dk.Timestamp(),
        amount=dk.Float(),
        note=dk.Text(required=False),
    )
    return app


def test_keyspec_names_and_types() -> None:
    app = _app().key("store", "region", "flag", dk.floor("ts", "day", name="day"))
    spec = app.keyspec
    assert spec.names == ("store", "region", "flag", "day")
    assert spec.types == (pa.int64(), pa.string(), pa.bool_(), pa.timestamp("us", tz="UTC"))
    assert spec.schema.names == list(spec.names)
    assert [f.column for f in spec.floors] == ["ts"]
    assert spec.values({"day": 1, "flag": True, "region": "x", "store": 2}) == (2, "x", True, 1)
    assert dk.floor("ts", "hour").name == "ts_hour"


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ((), "at least one part"),
        (("nope",), "key part 'nope': no such column"),
        (("amount",), "a Float column cannot be a key"),
        (("ts",), "use floor"),
        ((dk.floor("store", "day"),), "only a Timestamp can be floored"),
        ((dk.floor("gone", "day"),), "no such column"),
        (("note",), "must be required"),
        (("store", "store"), "appears twice"),
        ((3,), "expected a column name or floor"),
    ],
)
def test_key_errors(parts: tuple[object, ...], message: str) -> None:
    with pytest.raises(AppError, match=message) as info:
        _app().key(*parts)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and str(info.value).startswith("app k: ")


def test_floor_unit_is_checked() -> None:
    with pytest.raises(AppError, match="unknown unit; use one of second, minute"):
        dk.floor("ts", "fortnight")


def test_keyspec_build_direct() -> None:
    spec = KeySpec.build(["store"], _app().input_columns)
    assert spec.names == ("store",)


# -- ids and text ---------------------------------------------------------------------


def test_job_id_is_stable_and_typed() -> None:
    day = datetime(2020, 3, 1, tzinfo=UTC)
    a = job_id("run", "sales", "totals", (3, "web", True, day))
    assert a == job_id("run", "sales", "totals", {"s": 3, "c": "web", "f": True, "d": day})
    # Pinned: ids must not change within a wire format (a run's identity records its
    # format, so a run of another format is refused before its ids could differ).
    assert a == "0c57a8de7931316e952b"
    assert len(a) == 20
    # A datetime is its epoch microseconds, as the dispatcher reads a timestamp key.
    assert a == job_id("run", "sales", "totals", (3, "web", True, 1_583_020_800_000_000))
    others = {
        job_id("run", "sales", "totals", ("3", "web", True, day)),
        job_id("run", "sales", "totals", (3, "web", 1, day)),
        job_id("run", "sales", "other", (3, "web", True, day)),
        job_id("run2", "sales", "totals", (3, "web", True, day)),
        job_id("run", "sales", "totals", (3, "web", True, day + timedelta(microseconds=1))),
        job_id("ru", "nsales", "totals", (3, "web", True, day)),
    }
    assert a not in others and len(others) == 6


KEY_TYPES = {
    "s": (pa.string(), st.text(max_size=12)),
    "i": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "b": (pa.bool_(), st.booleans()),
    "t": (
        pa.timestamp("us", tz="UTC"),
        # years 1 to 9999 (Python's datetimes), or any of DuckDB's timestamps
        st.integers(-62_135_596_800 * 10**6, 253_402_300_799 * 10**6)
        | st.integers(-(2**62), 2**62),
    ),
}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(sorted(KEY_TYPES)), min_size=1, max_size=4).flatmap(
        lambda kinds: st.tuples(
            st.just(kinds),
            st.lists(st.tuples(*(KEY_TYPES[k][1] for k in kinds)), min_size=1, max_size=30),
        )
    ),
    st.text(min_size=1, max_size=10),
)
def test_job_ids_in_sql_equal_the_python_ones(
    case: tuple[list[str], list[tuple]], run: str
) -> None:
    """The dispatcher's ids (DuckDB's MD5 over typed tokens) are :func:`job_ids`' (hashlib),
    whatever the key types, values (negative, empty, non-ASCII text) and run id."""
    from dispatchkit.keys import job_ids, job_ids_sql

    kinds, rows = case
    names = [f"k{i}" for i in range(len(kinds))]
    table = pa.table(
        {
            n: pa.array([r[i] for r in rows], pa.int64()).cast(KEY_TYPES[k][0])
            if k == "t"
            else pa.array([r[i] for r in rows], KEY_TYPES[k][0])
            for i, (n, k) in enumerate(zip(names, kinds, strict=True))
        }
    )
    expr, prefix = job_ids_sql(run, "app", "task", table.schema)
    con = duckdb.connect()
    con.register("key_rows", table)
    got = con.sql(f"SELECT {expr} FROM key_rows", params={"prefix": prefix}).fetchall()
    # Timestamps go into ids as their epoch microseconds (ints), as the dispatcher has them.
    assert [g[0] for g in got] == job_ids(run, "app", "task", rows)
    assert job_ids(run, "app", "task", rows[:1]) == [job_id(run, "app", "task", rows[0])]
    # ... and given as datetimes (where Python has them: years 1 to 9999), the same ids.
    as_dt = [
        tuple(_as_datetime(v) if k == "t" else v for v, k in zip(r, kinds, strict=True))
        for r in rows
    ]
    if all(v is not None for r in as_dt for v in r):
        assert job_ids(run, "app", "task", as_dt) == [g[0] for g in got]
        assert job_id(run, "app", "task", as_dt[0]) == got[0][0]


def _as_datetime(us: int) -> datetime | None:
    try:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    except OverflowError:
        return None


def test_key_text() -> None:
    key = {
        "store": 3,
        "region": "north east",
        "flag": False,
        "day": datetime(1969, 12, 31, tzinfo=UTC),
        "at": datetime(2020, 1, 1, 0, 0, 0, 5000, tzinfo=UTC),
    }
    assert key_text(key) == (
        'store=3 region="north east" flag=false day=1969-12-31T00:00:00Z '
        "at=2020-01-01T00:00:00.005Z"
    )
    assert key_text({"c": "web"}) == "c=web"
    assert key_text({"c": ""}) == 'c=""'


def test_iso_ns() -> None:
    assert iso_ns(0) == "1970-01-01T00:00:00Z"
    assert iso_ns(-1) == "1969-12-31T23:59:59.999999999Z"
    assert iso_ns(1_500_000) == "1970-01-01T00:00:00.001500Z"
    assert iso_ns(1_000_000) == "1970-01-01T00:00:00.001Z"
    assert iso_ns(1_000) == "1970-01-01T00:00:00.000001Z"
    assert iso_ns(INT64_MIN) == "1677-09-21T00:12:43.145224192Z"
    assert iso_ns(INT64_MAX) == "2262-04-11T23:47:16.854775807Z"
