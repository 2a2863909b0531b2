"""The example apps (``examples/sales``, ``examples/sensors``) and an app written outside
the package, run end to end through the CLI and compared with an independent reference.

The references read the generated file with PyArrow, apply the apps' validity rules
themselves in Polars (not the core's DuckDB rule SQL), and aggregate with DuckDB's own
functions over the filtered rows in memory:

- ``median`` / ``p95``: ``quantile_cont`` — linear interpolation between the closest
  ranks, the definition the ``quantiles`` task uses (NumPy's default ``method="linear"``);
- ``std``: ``stddev_pop`` — the task's std is the population one (divisor n);
- the sensor trend: ``regr_slope``, ``regr_intercept``, ``regr_r2`` and ``regr_count`` of
  value over the time since the start of the hour, in hours.

Counts and keys are compared exactly. Float results are compared with a tolerance, and
only them: floating-point addition is not associative, so a sum (and the mean, std, fit
built on it) depends on the order of the additions — DuckDB's aggregate, NumPy's pairwise
sum and a split key's parts merged by the combine all add in different orders. The
quantiles differ from DuckDB's by at most the rounding of one interpolation.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SALES = "examples/sales/app.py:app"
SENSORS = "examples/sensors/app.py:app"
US_PER_DAY = 86_400_000_000
NS_PER_HOUR = 3_600_000_000_000
#: Tolerance of float results (see the module docstring for why there is one). Observed:
#: sums, means, stds and quantiles within 5e-16 relative; slope and r2 within 5e-13 (a
#: flat, noisy hour's slope is a small difference of large sums).
REL = 1e-11
#: A --max-message-bytes that holds an ordinary key but not the hot one.
TINY = 4096
ROWS, HOT = 4000, 1500
Key = tuple[Any, ...]


# -- running ---------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("DISPATCHKIT_APP", None)
    return env


def python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def dk_run(
    data: Path, app: str, task: str, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``dispatchkit run`` in a subprocess, from the repository root."""
    args = ["-m", "dispatchkit", "run", str(data), "--app", app, "--task", task]
    return python(*args, "--out", str(out), "--workers", "2", "-q", *extra)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "complete" in proc.stdout.splitlines()[0], proc.stdout
    return proc.stdout


def split_count(stdout: str) -> int:
    m = re.search(r"([\d,]+) split into parts", stdout)
    return int(m.group(1).replace(",", "")) if m else 0


def valid_rows(stdout: str) -> int:
    m = re.search(r"([\d,]+) valid", stdout)
    assert m, stdout
    return int(m.group(1).replace(",", ""))


def results(out: Path, keys: tuple[str, ...]) -> dict[Key, dict[str, Any]]:
    """results.parquet by key; a time key as its epoch microseconds."""
    table = pq.read_table(out / "results.parquet")
    rows: dict[Key, dict[str, Any]] = {}
    for row in table.to_pylist():
        key = tuple(_us(row[k]) if isinstance(row[k], datetime) else row[k] for k in keys)
        assert key not in rows, f"key {key} twice"
        rows[key] = row
    return rows


def _us(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def close(got: float | None, want: float | None, what: str) -> None:
    if want is None or got is None:
        assert got is None and want is None, f"{what}: got {got}, want {want}"
        return
    assert math.isclose(got, want, rel_tol=REL, abs_tol=1e-12), f"{what}: got {got}, want {want}"


def compare(
    got: dict[Key, dict[str, Any]],
    want: dict[Key, dict[str, Any]],
    exact: tuple[str, ...],
    floats: tuple[str, ...],
) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        for name in exact:
            assert g[name] == w[name], f"{key} {name}: got {g[name]}, want {w[name]}"
        for name in floats:
            close(g[name], w[name], f"{key} {name}")


def aggregate(df: pl.DataFrame, sql: str) -> list[tuple[Any, ...]]:
    """``sql`` over the rows ``v`` in DuckDB (in memory: the rules were applied already)."""
    con = duckdb.connect()
    try:
        con.register("v", df.to_arrow())
        return con.execute(sql).fetchall()
    finally:
        con.close()


# -- the sales app ---------------------------------------------------------------------


def ipc(table: pa.Table) -> bytes:
    """A table's bytes (Arrow IPC): equal tables, NaNs included, give equal bytes."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def sales_valid(path: Path) -> pl.DataFrame:
    """The rows the sales app must keep: store_id present and >= 0, a time, and an
    amount present, not NaN and >= 0; with the day as epoch µs floored."""
    df = pl.from_arrow(pq.read_table(path))
    assert isinstance(df, pl.DataFrame)
    us = pl.col("ts").dt.epoch("us")
    return df.filter(
        pl.col("store_id").is_not_null()
        & (pl.col("store_id") >= 0)
        & pl.col("ts").is_not_null()
        & pl.col("amount").is_not_null()
        & pl.col("amount").is_not_nan()
        & (pl.col("amount") >= 0)
    ).with_columns(day=us.floordiv(US_PER_DAY) * US_PER_DAY)


def sales_reference(path: Path) -> tuple[int, dict[Key, dict[str, Any]]]:
    df = sales_valid(path)
    rows = aggregate(
        df,
        "SELECT store_id, day, count(*), sum(amount), avg(amount), stddev_pop(amount), "
        "quantile_cont(amount, 0.5), quantile_cont(amount, 0.95) FROM v GROUP BY ALL",
    )
    names = ("count", "sum", "mean", "std", "median", "p95")
    return df.height, {(r[0], r[1]): dict(zip(names, r[2:], strict=True)) for r in rows}


@pytest.fixture(scope="module")
def sales_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sales") / "sales.parquet"
    args = ("--rows", str(ROWS), "--hot-rows", str(HOT), "--dirty", "0.03", "--out", str(path))
    proc = python("-m", "examples.sales.generate", *args)
    assert proc.returncode == 0, proc.stderr
    return path


def test_sales_generator_is_deterministic_and_dirty(tmp_path: Path) -> None:
    from examples.sales.generate import generate

    a = generate(500, seed=3, dirty=0.1, hot_rows=100)
    assert ipc(a) == ipc(generate(500, seed=3, dirty=0.1, hot_rows=100))  # NaN != NaN
    assert ipc(a) != ipc(generate(500, seed=4, dirty=0.1, hot_rows=100))
    amount = a.column("amount").to_numpy()
    assert a.num_rows == 600
    assert a.column("store_id").null_count > 0
    assert (amount < 0).sum() > 0 and np.isnan(amount).sum() > 0


def test_sales_stats_exact(sales_file: Path, tmp_path: Path) -> None:
    stdout = ok(dk_run(sales_file, SALES, "stats", tmp_path / "out"))
    n_valid, want = sales_reference(sales_file)
    assert valid_rows(stdout) == n_valid
    assert split_count(stdout) == 0
    got = results(tmp_path / "out", ("store_id", "day"))
    compare(got, want, exact=("count",), floats=("sum", "mean", "std"))
    assert (tmp_path / "out" / "report.png").stat().st_size > 0  # the app's chart


def test_sales_stats_splits_the_hot_key_and_stays_exact(sales_file: Path, tmp_path: Path) -> None:
    stdout = ok(dk_run(sales_file, SALES, "stats", tmp_path / "out", "--max-message-bytes", "4096"))
    assert split_count(stdout) >= 1, stdout
    _, want = sales_reference(sales_file)
    got = results(tmp_path / "out", ("store_id", "day"))
    compare(got, want, exact=("count",), floats=("sum", "mean", "std"))
    day0 = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp()) * 1_000_000
    assert got[(0, day0)]["count"] > 0.9 * HOT  # the hot store-day, taken in parts


def test_sales_quantiles_exact(sales_file: Path, tmp_path: Path) -> None:
    ok(dk_run(sales_file, SALES, "quantiles", tmp_path / "out"))
    _, want = sales_reference(sales_file)
    got = results(tmp_path / "out", ("store_id", "day"))
    compare(got, want, exact=(), floats=("median", "p95"))


def test_sales_quantiles_refuse_a_hot_key_in_one_line(sales_file: Path, tmp_path: Path) -> None:
    proc = dk_run(sales_file, SALES, "quantiles", tmp_path / "out", "--max-message-bytes", "4096")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "store_id=0 day=2024-03-01" in lines[0] and "no combine" in lines[0], lines[0]
    assert not (tmp_path / "out" / "results.parquet").exists()


def test_sales_forms_agree() -> None:
    """The vectorized quantiles equal the per-job form bit for bit (one formula), and
    the stats combine over any cut of the rows matches one pass."""
    from examples.sales.app import app

    import dispatchkit as dk

    rng = np.random.default_rng(5)
    sizes = [1, 2, 3, 10, 101]
    key_schema = pa.schema([("store_id", pa.int64()), ("day", pa.timestamp("us", tz="UTC"))])
    day = datetime(2024, 3, 1, tzinfo=UTC)
    groups = [
        ({"store_id": i, "day": day}, pa.table({"amount": rng.lognormal(3, 1, n).round(2)}))
        for i, n in enumerate(sizes)
    ]
    jobs = dk.Jobs.from_groups(key_schema, groups)
    quantiles = app.get_task("quantiles")
    vector = quantiles.run_jobs(jobs).to_pylist()
    assert vector == [quantiles.run_one(k, r) for k, r in groups]
    stats = app.get_task("stats")
    for key, rows in groups:
        whole = stats.run_one(key, rows)
        cuts = [0, *sorted(rng.choice(rows.num_rows + 1, size=3)), rows.num_rows]
        parts = [rows.slice(a, b - a) for a, b in pairwise(cuts)]
        merged = stats.finish_states(key, [stats.part_state(p) for p in parts])
        assert merged["count"] == whole["count"]
        for name in ("sum", "mean", "std"):
            close(merged[name], whole[name], name)


# -- the sensors app -------------------------------------------------------------------


def sensors_reference(path: Path) -> tuple[int, dict[Key, dict[str, Any]]]:
    """The rows the sensors app must keep (a sensor name not empty once trimmed, a time,
    a value not NaN), each at ``x`` = the time since its hour, in hours; then the fit."""
    df = pl.from_arrow(pq.read_table(path))
    assert isinstance(df, pl.DataFrame)
    ns = pl.col("ts").dt.epoch("ns")
    df = (
        df.with_columns(sensor=pl.col("sensor").str.strip_chars())
        .filter(
            pl.col("sensor").is_not_null()
            & (pl.col("sensor") != "")
            & pl.col("ts").is_not_null()
            & pl.col("value").is_not_null()
            & pl.col("value").is_not_nan()
        )
        .with_columns(
            hour=ns.floordiv(NS_PER_HOUR) * (NS_PER_HOUR // 1000),
            x=(ns - ns.floordiv(NS_PER_HOUR) * NS_PER_HOUR) / NS_PER_HOUR,
        )
    )
    rows = aggregate(
        df,
        "SELECT sensor, hour, regr_slope(value, x), regr_intercept(value, x), "
        "regr_r2(value, x), regr_count(value, x) FROM v GROUP BY ALL",
    )
    names = ("slope", "intercept", "r2", "n")
    # Where the line is undefined (fewer than two distinct times) DuckDB's regr_slope is
    # NaN, where SQL's (and PostgreSQL's, and the app's) is NULL: both mean "no line".
    return df.height, {
        (r[0], r[1]): dict(zip(names, [_null_nan(v) for v in r[2:]], strict=True)) for r in rows
    }


def _null_nan(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


@pytest.fixture(scope="module")
def sensors_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sensors") / "sensors.parquet"
    args = ("--rows", str(ROWS), "--hot-rows", str(HOT), "--dirty", "0.03", "--out", str(path))
    proc = python("-m", "examples.sensors.generate", *args)
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.mark.parametrize("budget", [None, TINY], ids=["whole", "split"])
def test_sensors_trend_exact(sensors_file: Path, tmp_path: Path, budget: int | None) -> None:
    extra = () if budget is None else ("--max-message-bytes", str(budget))
    stdout = ok(dk_run(sensors_file, SENSORS, "trend", tmp_path / "out", *extra))
    assert (split_count(stdout) >= 1) == (budget is not None), stdout
    # An app without a chart says so, and writes none.
    assert "no report.png: app 'sensors' declares no chart" in stdout, stdout
    assert not (tmp_path / "out" / "report.png").exists()
    n_valid, want = sensors_reference(sensors_file)
    assert valid_rows(stdout) == n_valid
    got = results(tmp_path / "out", ("sensor", "hour"))
    compare(got, want, exact=("n",), floats=("slope", "intercept", "r2"))
    h1 = int(datetime(2024, 5, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000
    assert got[("lone", h1)]["slope"] is None  # one reading: no line
    assert got[("flat", h1)]["r2"] == 1.0  # equal values: a perfect (flat) fit


# -- an app of one's own, outside the package ------------------------------------------

SHOP_APP = '''
"""Orders per (region, UTC day): an app that lives outside dispatchkit and its examples."""

import polars as pl
import pyarrow as pa

import dispatchkit as dk

app = dk.App("shop", version="3")
app.columns(
    region=dk.Text(allowed=("north", "south", "east", "west"), lower=True),
    placed=dk.Timestamp(),
    qty=dk.Int(min=1, max=1000),
)
app.key("region", dk.floor("placed", "day", name="day"))


@app.task(
    result={"orders": pa.int64(), "units": pa.int64(), "biggest": pa.int64()},
    reads=("qty",),
    format="polars",
)
def units(key: dict, rows: pl.DataFrame) -> dict:
    qty = rows["qty"]
    return {"orders": rows.height, "units": int(qty.sum()), "biggest": int(qty.max())}
'''

REGIONS = ("north", " South", "EAST ", "west", "Mars", "", None)


def shop_rows(n: int, seed: int = 2) -> list[dict[str, Any]]:
    """Orders as CSV text: ISO times with and without offsets (before 1970 too), dirty
    regions, quantities and times among them."""
    rng = np.random.default_rng(seed)
    base = datetime(1969, 12, 30, tzinfo=UTC)
    offsets = ("Z", "+02:00", "-05:30", "")
    rows = []
    for i in range(n):
        t = base + timedelta(seconds=int(rng.integers(0, 5 * 86_400)))
        off = offsets[i % 4]
        shift = {"Z": 0, "+02:00": 120, "-05:30": -330, "": 0}[off]
        local = (t + timedelta(minutes=shift)).replace(tzinfo=None).isoformat()
        qty = str(int(rng.integers(-2, 40)))
        rows.append(
            {
                "region": REGIONS[int(rng.integers(0, len(REGIONS)))],
                "placed": local + off if i % 97 else "last tuesday",
                "qty": qty if i % 89 else "many",
                "comment": "ignored",
            }
        )
    return rows


def shop_reference(rows: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Plain Python: the rules, the day by integer arithmetic, the sums."""
    out: dict[Key, dict[str, Any]] = {}
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for row in rows:
        region = (row["region"] or "").strip().lower()
        if region not in ("north", "south", "east", "west"):
            continue
        try:
            placed = datetime.fromisoformat(row["placed"])
        except ValueError:
            continue
        if placed.tzinfo is None:
            placed = placed.replace(tzinfo=UTC)
        try:
            qty = int(row["qty"])
        except ValueError:
            continue
        if not 1 <= qty <= 1000:
            continue
        day = (placed - epoch) // timedelta(days=1) * US_PER_DAY
        acc = out.setdefault((region, day), {"orders": 0, "units": 0, "biggest": 0})
        acc["orders"] += 1
        acc["units"] += qty
        acc["biggest"] = max(acc["biggest"], qty)
    return out


def test_an_app_outside_the_package_runs_exact(tmp_path: Path) -> None:
    app_file = tmp_path / "shop" / "shop_app.py"
    app_file.parent.mkdir()
    app_file.write_text(SHOP_APP)
    rows = shop_rows(3000)
    data = tmp_path / "orders.csv"
    pl.DataFrame(rows, schema={k: pl.String for k in rows[0]}).write_csv(data)
    # Half the drawn rows are dirty on purpose: the bad-row budget is lifted.
    stdout = ok(dk_run(data, f"{app_file}:app", "units", tmp_path / "out", "--max-bad-rows", "1.0"))
    want = shop_reference(rows)
    assert valid_rows(stdout) == sum(w["orders"] for w in want.values())
    got = results(tmp_path / "out", ("region", "day"))
    assert any(day < 0 for _, day in got)  # days before 1970 are floored, not truncated
    compare(got, want, exact=("orders", "units", "biggest"), floats=())


# -- on Kafka ----------------------------------------------------------------------------


@pytest.fixture
def bootstrap() -> str:
    servers = os.environ.get("DISPATCHKIT_BOOTSTRAP_SERVERS")
    if not servers:
        if os.environ.get("CI"):
            pytest.fail("DISPATCHKIT_BOOTSTRAP_SERVERS is not set")
        pytest.skip("no Kafka broker (set DISPATCHKIT_BOOTSTRAP_SERVERS)")
    return servers


@pytest.fixture
def kafka_out() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="dk-examples-kafka-"))
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def kafka_flags(bootstrap: str) -> tuple[str, ...]:
    prefix = f"examples{uuid.uuid4().hex[:8]}"
    return ("--broker", "kafka", "-b", bootstrap, "--topic-prefix", prefix, "--partitions", "3")


@pytest.mark.kafka
@pytest.mark.parametrize("task", ["stats", "quantiles"])
def test_kafka_sales(sales_file: Path, bootstrap: str, kafka_out: Path, task: str) -> None:
    budget = ("--max-message-bytes", str(TINY)) if task == "stats" else ()
    stdout = ok(dk_run(sales_file, SALES, task, kafka_out, *kafka_flags(bootstrap), *budget))
    assert (split_count(stdout) >= 1) == (task == "stats"), stdout
    _, want = sales_reference(sales_file)
    got = results(kafka_out, ("store_id", "day"))
    if task == "stats":
        compare(got, want, exact=("count",), floats=("sum", "mean", "std"))
    else:
        compare(got, want, exact=(), floats=("median", "p95"))


@pytest.mark.kafka
def test_kafka_sales_quantiles_refuse_a_hot_key(
    sales_file: Path, bootstrap: str, kafka_out: Path
) -> None:
    flags = (*kafka_flags(bootstrap), "--max-message-bytes", str(TINY))
    proc = dk_run(sales_file, SALES, "quantiles", kafka_out / "out", *flags)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no combine" in lines[0], proc.stderr


@pytest.mark.kafka
def test_kafka_sensors(sensors_file: Path, bootstrap: str, kafka_out: Path) -> None:
    flags = (*kafka_flags(bootstrap), "--max-message-bytes", str(TINY))
    stdout = ok(dk_run(sensors_file, SENSORS, "trend", kafka_out, *flags))
    assert split_count(stdout) >= 1, stdout
    _, want = sensors_reference(sensors_file)
    got = results(kafka_out, ("sensor", "hour"))
    compare(got, want, exact=("n",), floats=("slope", "intercept", "r2"))
