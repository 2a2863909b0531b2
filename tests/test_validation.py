"""Dirty input: every bad row quarantined with its reason, the valid rows exact."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from dispatchkit.apps.covid import NEGATIVE, POSITIVE
from dispatchkit.apps.covid import app as covid
from dispatchkit.apps.covid.generate import GenerateSpec, generate
from dispatchkit.errors import BadRowError
from dispatchkit.reader import InputReader

from .conftest import covid_jobs, normalize

START, END = "2020-03-01T00:00:00Z", "2021-01-01T00:00:00Z"


def independent_clean(path: Path) -> tuple[pl.DataFrame, dict[str, int]]:
    """Classify rows with Polars, apart from dispatchkit's SQL rules, and group the good ones."""
    df = (
        pl.read_csv(path, infer_schema=False)
        if path.suffix == ".csv"
        else pl.read_parquet(path).cast(pl.String)
    )
    ts = pl.col("test_datetime").str.to_datetime(time_zone="UTC", strict=False)
    res = pl.col("result").str.strip_chars().str.to_lowercase()
    country = pl.col("country").str.strip_chars()
    kind = (
        pl.when(pl.col("country").is_null())
        .then(pl.lit("country_missing"))
        .when(country == "")
        .then(pl.lit("country_empty"))
        .when(pl.col("test_datetime").is_null())
        .then(pl.lit("test_datetime_missing"))
        .when(ts.is_null())
        .then(pl.lit("test_datetime_unparseable"))
        .when(
            (ts < pl.lit(START).str.to_datetime(time_zone="UTC"))
            | (ts >= pl.lit(END).str.to_datetime(time_zone="UTC"))
        )
        .then(pl.lit("test_datetime_out_of_range"))
        .when(pl.col("result").is_null())
        .then(pl.lit("result_missing"))
        .when(~res.is_in(list(POSITIVE + NEGATIVE)))
        .then(pl.lit("result_invalid"))
        .otherwise(None)
    )
    df = df.with_columns(kind.alias("kind"), ts.alias("ts"), res.alias("res"), country.alias("c"))
    bad = {k: n for k, n in df.group_by("kind").len().iter_rows() if k is not None}
    good = (
        df.filter(pl.col("kind").is_null())
        .group_by(pl.col("c").alias("country"), pl.col("ts").dt.truncate("1h").alias("date_hour"))
        .agg(pl.len().alias("tests"), pl.col("res").is_in(list(POSITIVE)).sum().alias("positives"))
    )
    return normalize(good), bad


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_dirty_rows_are_quarantined_and_valid_rows_exact(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"dirty{suffix}"
    gen = generate(GenerateSpec(rows=24_000, seed=9, dirty_fraction=0.03), path)
    assert sum(gen.bad_rows.values()) >= 0.01 * gen.rows
    expected, bad_kinds = independent_clean(path)

    results, counts = covid_jobs([path], tmp_path / "work", out=tmp_path / "out")
    assert counts.rows_read == gen.rows
    assert counts.rows_read == counts.rows_valid + counts.rows_bad
    assert counts.bad == bad_kinds
    for kind, n in gen.bad_rows.items():
        assert counts.bad.get(kind, 0) == n, kind

    assert results.equals(expected)
    assert results["tests"].sum() == counts.rows_valid

    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert q.height == counts.rows_bad
    assert set(q.columns) >= {
        "file",
        "row",
        "field",
        "reason",
        "country",
        "test_datetime",
        "result",
    }
    assert q["row"].n_unique() == q.height
    assert set(q["field"]) <= {"country", "test_datetime", "result"}
    assert pl.read_csv(tmp_path / "out" / "quarantine.csv").height == q.height


def test_quarantine_row_numbers_point_at_the_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "few.csv"
    path.write_text(
        "country,test_datetime,result\n"
        "Italy,2020-03-01T05:10:00Z,positive\n"
        ",2020-03-01T05:10:00Z,positive\n"
        "Italy,yesterday,negative\n"
        "Italy,2019-03-01T05:10:00Z,negative\n"
        "Italy,2020-03-01T05:10:00Z,maybe\n"
        '"  ",2020-03-01T05:10:00Z,neg\n'
    )
    _, counts = covid_jobs([path], tmp_path / "work", out=tmp_path / "o")
    q = pl.read_csv(tmp_path / "o" / "quarantine.csv").sort("row")
    assert q["row"].to_list() == [2, 3, 4, 5, 6]
    assert q["field"].to_list() == [
        "country",
        "test_datetime",
        "test_datetime",
        "result",
        "country",
    ]
    assert q["reason"][2] == (
        "test_datetime is outside the run's range [2020-03-01T00:00:00Z, 2021-01-01T00:00:00Z)"
    )
    assert q["reason"][3] == "result is not an accepted spelling of true/false"
    assert q["result"][3] == "maybe" and q["country"][4] == "  "
    assert counts.rows_valid == 1


def test_strict_stops_at_the_first_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "country,test_datetime,result\nItaly,2020-03-01T05:10:00Z,pos\n"
        "Italy,2020-03-01T05:10:00Z,perhaps\n"
    )
    with (
        InputReader([path], covid, strict=True, work_dir=tmp_path / "w") as reader,
        pytest.raises(BadRowError, match="row 2: result is not an accepted spelling") as err,
    ):
        reader.counts()
    assert str(err.value) == (
        f"{path}: row 2: result is not an accepted spelling of true/false (value 'perhaps'); "
        "--strict stops here"
    )
    with InputReader([path], covid, work_dir=tmp_path / "w") as reader:
        assert reader.counts().bad == {"result_invalid": 1}  # not strict: counted
