"""Shared fixtures: small generated datasets and an independent reference computation."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import polars as pl
import pytest

from dispatchkit.generator import GenerateSpec, generate

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def reference(path: Path | str) -> pl.DataFrame:
    """(country, date_hour, tests, positives) by a plain DuckDB group-by over a clean file.

    Written without dispatchkit's reader or dispatcher, as a user would check the result.
    """
    path = str(path)
    source = f"read_csv('{path}', all_varchar=true)" if path.endswith(".csv") else f"'{path}'"
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    table = con.sql(
        f"""
        SELECT country,
               date_trunc('hour', CAST(test_datetime AS TIMESTAMPTZ)) AS date_hour,
               count(*) AS tests,
               count(*) FILTER (WHERE result = 'positive') AS positives
        FROM {source}
        GROUP BY ALL ORDER BY country, date_hour
        """
    ).to_arrow_table()
    return normalize(pl.DataFrame(pl.from_arrow(table)))


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
