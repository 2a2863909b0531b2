"""Dirty input: every bad row quarantined with its reason, the valid rows exact."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from dispatchkit.errors import BadRowError
from dispatchkit.generator import GenerateSpec, generate
from dispatchkit.runner import RunSpec, run_embedded
from dispatchkit.schema import NEGATIVE, POSITIVE

from .conftest import assert_exact, normalize

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

    summary = run_embedded(RunSpec(input=str(path), out=tmp_path / "out", workers=2))
    assert summary.status == "complete"
    assert summary.rows_read == gen.rows
    assert summary.rows_read == summary.rows_valid + summary.rows_quarantined
    assert summary.bad_rows == bad_kinds
    for kind, n in gen.bad_rows.items():
        assert summary.bad_rows.get(kind, 0) == n, kind

    results = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert_exact(results, expected)
    assert results["tests"].sum() == summary.rows_valid

    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert q.height == summary.rows_quarantined
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
    summary = run_embedded(RunSpec(input=str(path), out=tmp_path / "o", workers=1))
    q = pl.read_csv(tmp_path / "o" / "quarantine.csv").sort("row")
    assert q["row"].to_list() == [2, 3, 4, 5, 6]
    assert q["field"].to_list() == [
        "country",
        "test_datetime",
        "test_datetime",
        "result",
        "country",
    ]
    assert "outside" in q["reason"][2] and "accepted spelling" in q["reason"][3]
    assert summary.rows_valid == 1


def test_strict_stops_at_the_first_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "country,test_datetime,result\nItaly,2020-03-01T05:10:00Z,pos\n"
        "Italy,2020-03-01T05:10:00Z,perhaps\n"
    )
    with pytest.raises(BadRowError, match="row 2: result is not an accepted spelling"):
        run_embedded(RunSpec(input=str(path), out=tmp_path / "o", workers=1, strict=True))
