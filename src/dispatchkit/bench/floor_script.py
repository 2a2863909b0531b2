"""The whole-process floor: ``python -m dispatchkit.bench.floor_script FILE OUT``.

What someone without dispatchkit would write for the COVID job, timed by the benchmark's
``commands`` section from exec to exit like ``dispatchkit run``: one lazy Polars
``scan_parquet → group_by(country, hour) → len, sum(positive)`` (streaming engine), the
vectorized Wilson interval, and ``OUT/results.parquet``. It does not validate or
quarantine: the generated inputs hold only valid rows, and the benchmark checks that
``dispatchkit run`` found the same jobs and counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from dispatchkit.apps.covid.stats import wilson_arrays


def main(argv: list[str]) -> int:
    source, out = argv[0], Path(argv[1])
    df = (
        pl.scan_parquet(source)
        .group_by(
            pl.col("country"),
            pl.col("test_datetime").dt.truncate("1h").alias("date_hour"),
        )
        .agg(
            pl.len().alias("tests"),
            (pl.col("result") == "positive").sum().alias("positives"),
        )
        .sort("country", "date_hour")
        .collect(engine="streaming")
    )
    low, high = wilson_arrays(df["positives"].to_numpy(), df["tests"].to_numpy())
    out.mkdir(parents=True, exist_ok=True)
    df.with_columns(
        (pl.col("positives") / pl.col("tests")).alias("positive_rate"),
        pl.Series("ci_low", low),
        pl.Series("ci_high", high),
    ).write_parquet(out / "results.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
