"""The example apps' own floors: ``python -m dispatchkit.bench.app_floors APP TASK FILE OUT``.

Each floor is what one would write for that statistic without dispatchkit: a lazy Polars
scan of the generated file, the app's validity rules as a filter, one vectorized
``group_by`` over the app's key, and ``OUT/results.parquet`` (key columns, then the
task's result columns). The benchmark's ``apps`` section times it from exec to exit
against the whole ``dispatchkit run --app examples/<app>/app.py:app --task TASK`` and
compares the two with :func:`compare_app_results`, the comparison of
``tests/test_examples.py``: keys and integer counts exactly, float statistics within a
relative 1e-11 (a sum depends on the order of its additions).

``sales``   ``stats``: count, sum, mean, population std; ``quantiles``: median and p95 by
            linear interpolation — per (store_id, UTC day);
``sensors`` ``trend``: the least-squares line of value over the time since the start of
            the hour (in hours), r2 and n — per (sensor, UTC hour), null where undefined.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from dispatchkit.errors import RunError

NS_PER_HOUR = 3_600_000_000_000
#: Float statistics compared within this relative tolerance (tests/test_examples.py).
REL = 1e-11
ABS = 1e-12


@dataclass(frozen=True)
class AppTask:
    """One example app's task: how to run it, and which of its columns compare how."""

    app: str
    task: str
    keys: tuple[str, ...]
    exact: tuple[str, ...]
    floats: tuple[str, ...]
    seed: int

    @property
    def name(self) -> str:
        return f"{self.app}-{self.task}"


APP_TASKS = (
    AppTask("sales", "stats", ("store_id", "day"), ("count",), ("sum", "mean", "std"), 7),
    AppTask("sales", "quantiles", ("store_id", "day"), (), ("median", "p95"), 7),
    AppTask("sensors", "trend", ("sensor", "hour"), ("n",), ("slope", "intercept", "r2"), 11),
)


def _sales(source: str) -> pl.LazyFrame:
    amount = pl.col("amount")
    return (
        pl.scan_parquet(source)
        .filter(
            pl.col("store_id").is_not_null()
            & (pl.col("store_id") >= 0)
            & pl.col("ts").is_not_null()
            & amount.is_not_null()
            & amount.is_finite()
            & (amount >= 0)
        )
        .with_columns(pl.col("ts").dt.truncate("1d").alias("day"))
    )


def sales_stats(source: str) -> pl.LazyFrame:
    amount = pl.col("amount")
    return (
        _sales(source)
        .group_by("store_id", "day")
        .agg(
            pl.len().cast(pl.Int64).alias("count"),
            amount.sum().alias("sum"),
            amount.mean().alias("mean"),
            amount.std(ddof=0).alias("std"),
        )
    )


def sales_quantiles(source: str) -> pl.LazyFrame:
    amount = pl.col("amount")
    return (
        _sales(source)
        .group_by("store_id", "day")
        .agg(
            amount.quantile(0.5, "linear").alias("median"),
            amount.quantile(0.95, "linear").alias("p95"),
        )
    )


def sensors_trend(source: str) -> pl.LazyFrame:
    sensor, value = pl.col("sensor"), pl.col("value")
    ns = pl.col("ts").dt.epoch("ns")
    x = pl.col("x")
    dx, dy = x - x.mean(), value - value.mean()
    sxx, syy, sxy = pl.col("sxx"), pl.col("syy"), pl.col("sxy")
    slope = pl.when(sxx > 0).then(sxy / sxx)
    return (
        pl.scan_parquet(source)
        .with_columns(sensor.str.strip_chars())
        .filter(
            sensor.is_not_null()
            & (sensor != "")
            & (sensor.str.len_bytes() <= 64)
            & pl.col("ts").is_not_null()
            & value.is_not_null()
            & value.is_finite()
        )
        .with_columns(
            pl.col("ts").dt.truncate("1h").alias("hour"),
            ((ns % NS_PER_HOUR).cast(pl.Float64) / NS_PER_HOUR).alias("x"),
        )
        .group_by("sensor", "hour")
        .agg(
            pl.len().cast(pl.Int64).alias("n"),
            x.mean().alias("mx"),
            value.mean().alias("my"),
            (dx * dx).sum().alias("sxx"),
            (dy * dy).sum().alias("syy"),
            (dx * dy).sum().alias("sxy"),
        )
        .select(
            "sensor",
            "hour",
            slope.alias("slope"),
            (pl.col("my") - slope * pl.col("mx")).alias("intercept"),
            pl.when(sxx > 0)
            .then(pl.when(syy > 0).then(sxy * sxy / (sxx * syy)).otherwise(1.0))
            .alias("r2"),
            "n",
        )
    )


FLOORS = {
    "sales-stats": sales_stats,
    "sales-quantiles": sales_quantiles,
    "sensors-trend": sensors_trend,
}


def _keys_us(df: pl.DataFrame, keys: tuple[str, ...]) -> pl.DataFrame:
    """Time keys as timestamp[us, UTC], whatever unit they came in."""
    return df.with_columns(
        pl.col(k).cast(pl.Datetime("us", "UTC")) for k in keys if df.schema[k].is_temporal()
    )


def compare_app_results(got: pl.DataFrame, want: pl.DataFrame, at: AppTask, what: str) -> None:
    """Raise :class:`RunError` unless ``got`` has ``want``'s keys, once each, integer
    columns equal and float columns within ``REL`` (both null counts as equal)."""
    keys = list(at.keys)
    cols = [*keys, *at.exact, *at.floats]
    got, want = _keys_us(got.select(cols), at.keys), _keys_us(want.select(cols), at.keys)
    twice = got.height - got.select(keys).unique().height
    missing = want.join(got, on=keys, how="anti").height
    extra = got.join(want, on=keys, how="anti").height
    both = got.join(want, on=keys, suffix="_floor")
    bad = pl.lit(False)
    for c in at.exact:
        bad = bad | pl.col(c).ne_missing(pl.col(f"{c}_floor"))
    for c in at.floats:
        g, w = pl.col(c), pl.col(f"{c}_floor")
        off = (g - w).abs() > pl.max_horizontal(REL * pl.max_horizontal(g.abs(), w.abs()), ABS)
        bad = bad | (g.is_null() != w.is_null()) | off.fill_null(False)
    wrong = both.filter(bad)
    if twice or missing or extra or wrong.height:
        first = wrong.row(0, named=True) if wrong.height else None
        raise RunError(
            f"{what}: results differ from the floor's — {got.height:,} keys vs "
            f"{want.height:,}, {twice:,} twice, {missing:,} missing, {extra:,} extra, "
            f"{wrong.height:,} with other values" + (f" (first: {first})" if first else "")
        )


def main(argv: list[str]) -> int:
    name, source, out = f"{argv[0]}-{argv[1]}", argv[2], Path(argv[3])
    df = FLOORS[name](source).collect(engine="streaming")
    out.mkdir(parents=True, exist_ok=True)
    df.write_parquet(out / "results.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
