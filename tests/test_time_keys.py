"""Time is floored, never rounded: exact keys and range checks for any epoch and unit.

Every expectation here is computed from the raw stored integers (or our own parse of the
ISO text) with Python integer floor division, never with the DuckDB casts under test.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchkit.apps.covid import app as covid
from dispatchkit.reader import InputReader

from .conftest import NS_PER_HOUR, covid_jobs, iso_to_ns, reference, sorted_rows

HEADER_CSV = "country,test_datetime,result\n"
NS_PER = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
H6 = iso_to_ns("2020-03-01T06:00:00Z")  # an hour boundary
START = datetime(2020, 3, 1, tzinfo=UTC)
END = datetime(2020, 3, 2, tzinfo=UTC)
END_NS = iso_to_ns("2020-03-02T00:00:00Z")
START_NS = iso_to_ns("2020-03-01T00:00:00Z")


def write_parquet(
    path: Path, ns: list[int], unit: str, tz: str | None, **cols: list[object]
) -> None:
    """Rows at the given instants, stored in ``unit`` (each a whole number of units)."""
    per = NS_PER[unit]
    assert all(v % per == 0 for v in ns)
    ts = pa.array([v // per for v in ns], pa.int64()).cast(pa.timestamp(unit, tz))
    n = len(ns)
    table = pa.table(
        {
            "country": cols.get("country", ["Italy"] * n),
            "test_datetime": ts,
            "result": cols.get("result", ["positive"] * n),
        }
    )
    pq.write_table(table, path)


def cut(path: Path, tmp_path: Path, start: datetime, end: datetime) -> tuple[pl.DataFrame, int]:
    """(country, hour, tests, positives) per job from the reader's sorted rows; rows bad.

    The hour is the key's ``date_hour`` as its stored integer (epoch µs) over the µs in an
    hour, which must divide it exactly: a floor is a whole hour.
    """
    with InputReader([path], covid, start=start, end=end, work_dir=tmp_path / "spill") as r:
        counts = r.counts()
        frame = sorted_rows(r)
    us = frame["date_hour"].dt.epoch("us")
    assert (us % (NS_PER_HOUR // 1000) == 0).all()
    frame = (
        frame.with_columns(hour=us // (NS_PER_HOUR // 1000))
        .group_by("country", "hour")
        .agg(pl.len().alias("tests"), pl.col("result").sum().cast(pl.Int64).alias("positives"))
        .with_columns(pl.col("tests").cast(pl.Int64))
        .sort("country", "hour")
    )
    assert counts.rows_read == counts.rows_valid + counts.rows_bad
    assert frame["tests"].sum() == counts.rows_valid
    assert counts.jobs == frame.height
    return frame, counts.rows_bad


def expected(
    ns: list[int], countries: list[str], pos: list[bool], lo_ns: int, hi_ns: int
) -> tuple[pl.DataFrame, int]:
    """The same, by Python integer arithmetic on the raw instants."""
    groups: dict[tuple[str, int], list[int]] = {}
    bad = 0
    for v, c, p in zip(ns, countries, pos, strict=True):
        if not lo_ns <= v < hi_ns:
            bad += 1
            continue
        g = groups.setdefault((c, v // NS_PER_HOUR), [0, 0])
        g[0] += 1
        g[1] += p
    rows = [(c, h, t, q) for (c, h), (t, q) in groups.items()]
    frame = pl.DataFrame(
        rows,
        schema={"country": pl.String, "hour": pl.Int64, "tests": pl.Int64, "positives": pl.Int64},
        orient="row",
    ).sort("country", "hour")
    return frame, bad


@pytest.mark.parametrize("tz", [None, "UTC"])
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_boundaries_are_floored_in_every_unit(tmp_path: Path, unit: str, tz: str | None) -> None:
    one = NS_PER[unit]  # the smallest step the unit can hold: 1 ns for ns
    ns = [
        H6 - one,  # just before an hour: hour 5, never rounded into hour 6
        H6,  # exactly on it: hour 6
        END_NS - one,  # just before --end: valid, hour 23
        END_NS,  # --end itself: out of range
        START_NS,  # --start itself: valid
        START_NS - one,  # just before --start: out of range
    ]
    path = tmp_path / f"b-{unit}.parquet"
    write_parquet(path, ns, unit, tz)
    got, bad = cut(path, tmp_path, START, END)
    hour0 = START_NS // NS_PER_HOUR
    assert got["hour"].to_list() == [hour0, hour0 + 5, hour0 + 6, hour0 + 23]
    assert got["tests"].to_list() == [1, 1, 1, 1]
    assert bad == 2
    want, want_bad = expected(ns, ["Italy"] * 6, [True] * 6, START_NS, END_NS)
    assert got.equals(want) and bad == want_bad


@pytest.mark.parametrize("unit", ["ms", "us", "ns"])
def test_times_before_1970_run_exact_end_to_end(tmp_path: Path, unit: str) -> None:
    instants = [
        "1969-12-31T23:59:59.999999999Z",
        "1969-12-31T23:00:00Z",
        "1969-12-31T22:59:59.999999999Z",
        "1900-01-01T00:00:00Z",
        "1960-06-15T12:30:00.5Z",
        "1960-06-15T12:59:59.999Z",
        "1970-01-01T00:00:00Z",
        "1899-12-31T23:59:59.999999999Z",  # before --start
    ]
    per = NS_PER[unit]
    ns = [iso_to_ns(t) // per * per for t in instants]  # what the unit can hold, floored
    countries = ["Chile", "Peru", "Chile", "Peru", "Chile", "Chile", "Peru", "Chile"]
    result = ["positive", "negative"] * 4
    path = tmp_path / f"old-{unit}.parquet"
    write_parquet(path, ns, unit, None, country=countries, result=result)
    start, end = datetime(1900, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC)

    got, bad = cut(path, tmp_path, start, end)
    lo, hi = iso_to_ns("1900-01-01T00:00:00Z"), iso_to_ns("2021-01-01T00:00:00Z")
    want, want_bad = expected(ns, countries, [r == "positive" for r in result], lo, hi)
    assert got.equals(want) and bad == want_bad == 1
    assert -1 in got["hour"].to_list() and -2 in got["hour"].to_list()

    jobs, counts = covid_jobs([path], tmp_path / "w", start=start, end=end)
    assert counts.rows_read == counts.rows_valid + counts.rows_bad == 8
    ref = reference(path).filter(pl.col("date_hour") >= start)
    assert jobs.equals(ref)


def test_microseconds_beyond_the_nanosecond_range_are_out_of_range(tmp_path: Path) -> None:
    """Time is exact epoch ns: a µs instant outside 1677-09-21..2262-04-11 cannot be kept.

    It is quarantined as out of range, whatever the run's range, never wrapped or
    rounded; instants near the edges of the nanosecond range are floored exactly.
    """
    instants = [
        "1500-03-01T05:59:59.999999Z",  # before the ns range
        "9999-12-31T23:59:59Z",  # after it
        "1677-09-21T01:59:59.999999Z",  # inside it, near its start
        "1677-09-21T02:00:00Z",
        "2262-04-11T22:59:59.999999Z",  # inside it, near its end
    ]
    ns = [iso_to_ns(t) for t in instants]
    path = tmp_path / "far.parquet"
    write_parquet(path, ns, "us", "UTC")
    start, end = datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, tzinfo=UTC)
    got, bad = cut(path, tmp_path, start, end)
    ns_min, ns_max = -(1 << 63) + 1, (1 << 63) - 1
    want, want_bad = expected(ns, ["Italy"] * 5, [True] * 5, ns_min, ns_max)
    assert got.equals(want) and bad == want_bad == 2
    assert got["hour"].to_list() == sorted(v // NS_PER_HOUR for v in ns[2:])
    with InputReader([path], covid, start=start, end=end, work_dir=tmp_path / "w") as reader:
        assert reader.counts().bad == {"test_datetime_out_of_range": 2}
        field, why = reader.reasons["test_datetime_out_of_range"]
    assert field == "test_datetime"
    assert why == (
        "test_datetime is outside the run's range "
        "[1677-09-21T00:12:43.145224193Z, 2262-04-11T23:47:16.854775807Z)"
    )


def test_csv_text_with_nine_digits_and_offsets_is_floored(tmp_path: Path) -> None:
    texts = [
        "2020-03-01T05:59:59.999999999Z",  # hour 5, not 6
        "2020-03-01T07:59:59.999999999+02:00",  # 05:59:59.999999999Z: hour 5
        "2020-03-01T08:00:00+02:00",  # 06:00Z
        "2020-03-01T05:30:00.123456789-00:30",  # 06:00:00.123456789Z
        "2020-03-01 23:59:59.9999999",  # no offset: UTC; just before --end, valid
        "2020-03-02T00:00:00Z",  # --end: out of range
        "2020-03-02T01:59:59.999999999+02:00",  # 23:59:59.999999999Z on the 1st: valid
        "2020-03-01T01:59:59.999999999+02:00",  # before --start
    ]
    path = tmp_path / "text.csv"
    path.write_text(
        "country,test_datetime,result\n"
        + "".join(f"Italy,{t},{'positive' if i % 2 else 'negative'}\n" for i, t in enumerate(texts))
    )
    got, bad = cut(path, tmp_path, START, END)
    ns = [iso_to_ns(t) for t in texts]
    want, want_bad = expected(ns, ["Italy"] * 8, [i % 2 == 1 for i in range(8)], START_NS, END_NS)
    assert got.equals(want) and bad == want_bad == 2
    hour0 = START_NS // NS_PER_HOUR
    assert got["hour"].to_list() == [hour0 + 5, hour0 + 6, hour0 + 23]
    assert got["tests"].to_list() == [2, 2, 2]


def test_csv_text_before_1970(tmp_path: Path) -> None:
    texts = ["1969-12-31T23:59:59.999999999Z", "1960-01-01T00:59:59.9999999+00:00", "1900-01-01"]
    path = tmp_path / "old.csv"
    path.write_text("country,test_datetime,result\n" + "".join(f"X,{t},pos\n" for t in texts))
    start = datetime(1900, 1, 1, tzinfo=UTC)
    got, bad = cut(path, tmp_path, start, END)
    want, _ = expected(
        [iso_to_ns(t) for t in texts], ["X"] * 3, [True] * 3, iso_to_ns("1900-01-01"), END_NS
    )
    assert got.equals(want) and bad == 0
    assert got["hour"].to_list() == sorted(iso_to_ns(t) // NS_PER_HOUR for t in texts)


# -- property: any instant within +-200 years, any unit -----------------------------------

YEAR_NS = 365 * 24 * NS_PER_HOUR
LIMIT = 200 * YEAR_NS


@st.composite
def datasets(draw: st.DrawFn) -> tuple[str, str | None, list[int], list[str], list[bool], int, int]:
    unit = draw(st.sampled_from(["s", "ms", "us", "ns"]))
    tz = draw(st.sampled_from([None, "UTC"]))
    per = NS_PER[unit]
    # Instants cluster around a few hour boundaries (where rounding would show) and 1970.
    anchors = draw(
        st.lists(st.integers(-LIMIT // NS_PER_HOUR, LIMIT // NS_PER_HOUR), min_size=1, max_size=3)
    )
    near = st.builds(
        lambda a, d: a * NS_PER_HOUR + d,
        st.sampled_from([*anchors, 0]),
        st.integers(-3 * NS_PER_HOUR, 3 * NS_PER_HOUR) | st.integers(-5_000, 5_000),
    )
    anywhere = st.integers(-LIMIT, LIMIT)
    ns = [v // per * per for v in draw(st.lists(near | anywhere, min_size=1, max_size=40))]
    countries = draw(
        st.lists(st.sampled_from(["A", "B", "Côte"]), min_size=len(ns), max_size=len(ns))
    )
    pos = draw(st.lists(st.booleans(), min_size=len(ns), max_size=len(ns)))
    # --start/--end: whole microseconds (what a datetime holds), sometimes cutting the data.
    bound = st.integers(-LIMIT // 1000, LIMIT // 1000) | st.sampled_from(
        [v // 1000 for v in ns] + [v // 1000 + 1 for v in ns]
    )
    a, b = sorted(draw(st.lists(bound, min_size=2, max_size=2, unique=True)))
    if draw(st.booleans()):
        a, b = -LIMIT // 1000 - 1, LIMIT // 1000 + 1  # everything in range
    return unit, tz, ns, countries, pos, a, b


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=datasets())
def test_keys_match_integer_arithmetic_for_any_instant(
    tmp_path: Path, data: tuple[str, str | None, list[int], list[str], list[bool], int, int]
) -> None:
    unit, tz, ns, countries, pos, lo_us, hi_us = data
    path = tmp_path / "p.parquet"
    write_parquet(
        path, ns, unit, tz, country=countries, result=["positive" if p else "negative" for p in pos]
    )
    epoch = datetime(1970, 1, 1, tzinfo=UTC)

    start = epoch + timedelta(microseconds=lo_us)
    end = epoch + timedelta(microseconds=hi_us)
    got, bad = cut(path, tmp_path, start, end)
    want, want_bad = expected(ns, countries, pos, lo_us * 1000, hi_us * 1000)
    assert bad == want_bad
    assert got.equals(want), (got, want)


@st.composite
def texts(draw: st.DrawFn) -> tuple[list[str], list[int]]:
    """ISO 8601 text with nine fractional digits and an offset, and its exact instant."""
    ns = draw(st.lists(st.integers(-LIMIT, LIMIT), min_size=1, max_size=30))
    out = []
    for v in ns:
        minutes = draw(st.integers(-14 * 60, 14 * 60))
        local = v + minutes * 60 * 1_000_000_000  # the civil time the text spells
        whole = datetime(1970, 1, 1) + timedelta(seconds=local // 1_000_000_000)
        sign = "-" if minutes < 0 else "+"
        off = "Z" if minutes == 0 else f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
        out.append(f"{whole:%Y-%m-%dT%H:%M:%S}.{local % 1_000_000_000:09d}{off}")
    return out, ns


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=texts())
def test_csv_text_keys_match_integer_arithmetic(
    tmp_path: Path, data: tuple[list[str], list[int]]
) -> None:
    text, ns = data
    assert [iso_to_ns(t) for t in text] == ns  # the reference parser reads them back
    path = tmp_path / "t.csv"
    path.write_text(HEADER_CSV + "".join(f"A,{t},positive\n" for t in text))
    start = datetime(1700, 1, 1, tzinfo=UTC)
    end = datetime(2300, 1, 1, tzinfo=UTC)
    got, bad = cut(path, tmp_path, start, end)
    want, want_bad = expected(
        ns, ["A"] * len(ns), [True] * len(ns), iso_to_ns("1700-01-01"), iso_to_ns("2300-01-01")
    )
    assert bad == want_bad == 0
    assert got.equals(want), (got, want)
