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

from dispatchkit.dispatcher import Dispatcher, batch_key, iso_hour
from dispatchkit.message import Job, JobBatch
from dispatchkit.reader import InputReader
from dispatchkit.runner import RunSpec, run_embedded

from .conftest import NS_PER_HOUR, assert_exact, iso_to_ns, reference

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
    """(country, hour, tests, positives) per job from InputReader + Dispatcher; rows bad."""
    with InputReader([path], start=start, end=end, spill_dir=tmp_path / "spill") as reader:
        counts = reader.counts()
        d = Dispatcher(reader, run_id="r", task="positive-rate")
        rows = [
            (j.country, j.date_hour // 3600, j.n, _ones(j.outcomes, j.n))
            for b in d.batches()
            for j in b.jobs
        ]
    assert counts.rows_read == counts.rows_valid + counts.rows_bad
    assert sum(r[2] for r in rows) == counts.rows_valid
    assert counts.jobs == len(rows)
    frame = pl.DataFrame(rows, schema=["country", "hour", "tests", "positives"], orient="row").sort(
        "country", "hour"
    )
    return frame, counts.rows_bad


def _ones(packed: bytes, n: int) -> int:
    bits = "".join(f"{b:08b}" for b in packed)[:n]
    return bits.count("1")


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

    summary = run_embedded(
        RunSpec(
            input=str(path),
            out=tmp_path / "out",
            workers=1,
            start=start,
            end=end,
            report=False,
            quiet=True,
        )
    )
    assert summary.status == "complete"
    assert summary.rows_read == summary.rows_valid + summary.rows_quarantined == 8
    results = pl.read_parquet(tmp_path / "out" / "results.parquet")
    ref = reference(path).filter(pl.col("date_hour") >= start)
    assert_exact(results, ref)


def test_times_before_the_nanosecond_range_in_microseconds(tmp_path: Path) -> None:
    """A microsecond column holds years a nanosecond integer cannot: 1500 is floored too."""
    instants = ["1500-03-01T05:59:59.999999Z", "1500-03-01T06:00:00Z", "9999-12-31T23:59:59Z"]
    ns = [iso_to_ns(t) for t in instants]
    path = tmp_path / "far.parquet"
    write_parquet(path, ns, "us", "UTC")
    start, end = datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, tzinfo=UTC)
    got, bad = cut(path, tmp_path, start, end)
    want, want_bad = expected(
        ns,
        ["Italy"] * 3,
        [True] * 3,
        iso_to_ns("0001-01-01T00:00:00Z"),
        iso_to_ns("9999-12-31T23:00:00Z"),
    )
    assert got.equals(want) and bad == want_bad == 1


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


def test_hour_names_and_batch_keys_before_1970() -> None:
    assert iso_hour(-3600) == "1969-12-31T23:00:00Z"
    assert iso_hour(-2208988800) == "1900-01-01T00:00:00Z"
    job = Job("j", "Peru", -3600, 0, 1, 1, b"\x80")
    assert batch_key(JobBatch(1, "r", "b", "t", [job])) == b"Peru|1969-12-31"


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
