"""Shared fixtures: small generated datasets and an independent reference computation."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dispatchkit.apps.covid import app as covid
from dispatchkit.apps.covid.generate import GenerateSpec, generate
from dispatchkit.reader import InputReader, RowCounts

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


NS_PER_HOUR = 3_600_000_000_000
_NS_PER_UNIT = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_ISO = re.compile(
    r"(-?\d{4,})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:\.(\d+))?)?)?"
    r"\s*(Z|[+-]\d\d(?::?\d\d)?)?",
    re.IGNORECASE,
)


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def iso_to_ns(text: str) -> int:
    """Nanoseconds since the epoch of ISO 8601 text, floored; no offset means UTC."""
    m = _ISO.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not ISO 8601: {text!r}")
    y, mo, d, h, mi, s, frac, off = m.groups()
    seconds = days_from_civil(int(y), int(mo), int(d)) * 86_400
    seconds += int(h or 0) * 3600 + int(mi or 0) * 60 + int(s or 0)
    if off and off.upper() != "Z":
        sign = -1 if off[0] == "-" else 1
        digits = off[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:] or 0) * 60)
    return seconds * 1_000_000_000 + int(((frac or "") + "000000000")[:9])


def hours(column: pa.ChunkedArray | pa.Array) -> list[int]:
    """The hour since the epoch of each instant of a timestamp or ISO text column, floored.

    For a timestamp, the stored integers in the column's own unit, floor-divided by the
    units in an hour (NumPy's ``//`` on integers floors, as Python's does).
    """
    if pa.types.is_timestamp(column.type):
        per_hour = NS_PER_HOUR // _NS_PER_UNIT[column.type.unit]
        ints = pc.cast(column, pa.int64())  # the stored integers; tz only labels them
        raw = np.asarray(ints.to_numpy(), dtype=np.int64)
        return (raw // np.int64(per_hour)).tolist()
    return [iso_to_ns(v) // NS_PER_HOUR for v in column.to_pylist()]


def reference(path: Path | str) -> pl.DataFrame:
    """(country, date_hour, tests, positives) of a clean file, apart from dispatchkit.

    The hour of each row is the raw stored integer (Parquet) or our own parse of the
    ISO text (CSV), floor-divided in Python integers: no DuckDB cast, no float, the
    same for instants before 1970 and for nanoseconds just before an hour.
    """
    path = str(path)
    if path.endswith(".csv"):
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                include_columns=["country", "test_datetime", "result"],
                column_types={
                    "country": pa.string(),
                    "test_datetime": pa.string(),
                    "result": pa.string(),
                },
            ),
        )
    else:
        table = pq.read_table(path, columns=["country", "test_datetime", "result"])
    hour = hours(table.column("test_datetime"))
    result = table.column("result")
    positive = (
        result.to_pylist()
        if pa.types.is_boolean(result.type)
        else [r == "positive" for r in result.to_pylist()]
    )
    df = pl.DataFrame(
        {"country": table.column("country").to_pylist(), "hour": hour, "pos": positive},
        schema={"country": pl.String, "hour": pl.Int64, "pos": pl.Boolean},
    )
    grouped = df.group_by("country", "hour").agg(
        pl.len().alias("tests"), pl.col("pos").sum().alias("positives")
    )
    return normalize(
        grouped.with_columns(pl.from_epoch(pl.col("hour") * 3600, time_unit="s").alias("date_hour"))
    )


def normalize(df: pl.DataFrame) -> pl.DataFrame:
    """The comparable columns in one dtype and order."""
    return df.select(
        pl.col("country").cast(pl.String),
        pl.col("date_hour").cast(pl.Datetime("us", "UTC")),
        pl.col("tests").cast(pl.Int64),
        pl.col("positives").cast(pl.Int64),
    ).sort("country", "date_hour")


def assert_exact(results: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Results equal the reference row for row; no job missing, none twice."""
    got = normalize(results)
    assert got.height == expected.height, f"{got.height} jobs, expected {expected.height}"
    assert results["job_id"].n_unique() == results.height, "duplicate job ids"
    diff = got.join(expected, on=got.columns, how="anti")
    assert diff.is_empty(), f"rows not in the reference:\n{diff.head()}"
    assert got.equals(expected)


def sorted_rows(reader: InputReader, columns: tuple[str, ...] = ("result",)) -> pl.DataFrame:
    """Every batch of ``reader.sorted_valid(columns)`` in one frame, checked as it comes.

    The batches have the schema the reader promises; rows are sorted by bucket and each
    job's rows are contiguous (its key is never seen again once another starts).
    """
    schema = reader.batch_schema(columns)
    batches = list(reader.sorted_valid(columns, rows_per_batch=1_000))
    for b in batches:
        assert b.schema.equals(schema), (b.schema, schema)
    table = pa.Table.from_batches(batches, schema=schema)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    names = ["bucket", *reader.keyspec.names]
    assert frame["bucket"].is_sorted(), "not sorted by bucket"
    runs = frame.select(names).with_columns(
        start=pl.any_horizontal(pl.col(n).ne_missing(pl.col(n).shift(1)) for n in names)
    )
    assert runs["start"].sum() == frame.select(reader.keyspec.names).n_unique(), "split job"
    return frame


def covid_jobs(
    paths: list[Path], work: Path, *, out: Path | None = None, **kw: object
) -> tuple[pl.DataFrame, RowCounts]:
    """(country, date_hour, tests, positives) per job from the COVID app's reader.

    The reader's counts come with it; with ``out``, its quarantine files are written there.
    """
    with InputReader(paths, covid, work_dir=work, **kw) as reader:  # type: ignore[arg-type]
        counts = reader.counts()
        if out is not None:
            reader.write_quarantine(out, any_bad=counts.rows_bad > 0)
        rows = sorted_rows(reader)
    jobs = rows.group_by("country", "date_hour").agg(
        pl.len().alias("tests"), pl.col("result").sum().alias("positives")
    )
    assert counts.rows_read == counts.rows_valid + counts.rows_bad
    assert rows.height == counts.rows_valid and jobs.height == counts.jobs
    return normalize(jobs), counts


@pytest.fixture(scope="session")
def small_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.parquet"
    generate(GenerateSpec(rows=30_000, seed=7), path)
    return path


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.csv"
    generate(GenerateSpec(rows=20_000, seed=11), path)
    return path


# -- results as workers send them ---------------------------------------------------------

#: (job id, part, parts, tests, positives) of one COVID job part.
Part = tuple[str, int, int, int, int]


def started_store(store: object, run_id: str = "r") -> None:
    """Start ``run_id`` of the COVID app's positive-rate task in a store."""
    store.start_run(  # type: ignore[attr-defined]
        run_id,
        {"input": "f", "task": "positive-rate"},
        "test",
        app=covid,
        task=covid.get_task("positive-rate"),
    )


def result_message(run_id: str, parts: list[Part], worker: str = "w") -> object:
    """A decoded result message of COVID job parts (whole jobs as results, split parts
    as combine states), encoded as a worker encodes it."""
    from dispatchkit import wire

    n = len(parts)
    keys = pa.table(
        {
            "country": ["X"] * n,
            "date_hour": pa.array([3_600_000_000] * n, pa.timestamp("us", tz="UTC")),
        }
    )
    whole = [p for p in parts if p[2] == 1]
    split = [p for p in parts if p[2] > 1]
    values = pa.table(
        {
            "tests": pa.array([p[3] for p in whole], pa.int64()),
            "positives": pa.array([p[4] for p in whole], pa.int64()),
            "positive_rate": pa.array([p[4] / p[3] for p in whole], pa.float64()),
            "ci_low": pa.array([0.0] * len(whole), pa.float64()),
            "ci_high": pa.array([1.0] * len(whole), pa.float64()),
        }
    )
    states = pa.table(
        {
            "tests": pa.array([p[3] for p in split], pa.int64()),
            "positives": pa.array([p[4] for p in split], pa.int64()),
        }
    )
    payload = wire.encode_results(
        run_id=run_id,
        batch_id="b",
        worker=worker,
        app="covid",
        task="positive-rate",
        fingerprint=covid.fingerprint,
        results=[wire.ResultEntry(p[0], p[1], p[2], state=p[2] > 1) for p in parts],
        keys=keys,
        values=values,
        states=states,
    )
    return wire.decode_results(payload)
