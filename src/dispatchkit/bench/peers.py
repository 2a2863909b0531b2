"""The ``peers`` section of ``dispatchkit bench``: the same job the way other tools do it.

On the same generated input, in the same invocation, each peer runs the way its
documentation recommends, in a process of its own like every variant:

``duckdb floor``   one SQL group-by from ``read_parquet``, then ``stats.wilson_arrays``;
``dask``           ``dd.read_parquet`` → ``groupby(keys).apply(fn, meta=…)`` on a
                   ``distributed.LocalCluster`` of 2 worker processes, 1 thread each;
``pyspark``        ``local[2]``, ``groupBy(keys).applyInPandas(fn, schema)`` (UI off,
                   1 GB driver, session time zone UTC), collected with ``toPandas``;
``celery``         Redis (``redis-server`` on port 46379, no persistence) as broker and
                   result backend and a prefork worker (``-c 2``), both started by the
                   variant and stopped after it; the producer reads the file, groups each
                   job's rows and sends one message per job carrying that job's
                   ``result`` values (``group`` of one task per job), or the same jobs
                   hand-batched 48 per task with ``task.chunks`` (``celery chunks``).

``fn`` computes a job's row in Python once per group with the same
:func:`~dispatchkit.apps.covid.stats.wilson_interval` as the pandas monolith
(:mod:`dispatchkit.bench.peers_tasks`). The clock of a peer that needs a cluster (Dask,
Spark, Celery with its Redis) starts once the cluster is up — as with long-running
workers — and the set-up time is reported apart. Every peer's ``(country, date_hour,
tests, positives)`` must equal the Polars floor's before its time counts.

A peer whose package (or program: ``java``, ``redis-server``) is missing is skipped with
one line saying what to install; the Python packages are the ``peers`` extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

    from dispatchkit.bench.runner import BenchConfig, Plan
    from dispatchkit.bench.variants import Outcome

Row = dict[str, Any]

EXTRA = "pip install 'dispatchkit[peers]'"
REDIS_PORT = 46379
CELERY_CHUNK = 48


@dataclass(frozen=True)
class Peer:
    """One peer: its variant name, label, what it needs, and whether it is slow."""

    key: str
    label: str
    modules: tuple[str, ...]
    program: str | None = None
    program_hint: str = ""
    slow: bool = False
    what: str = ""


PEERS: dict[str, Peer] = {
    p.key: p
    for p in (
        Peer(
            "duckdb",
            "duckdb floor",
            ("duckdb",),
            what="one SQL group-by from read_parquet, vectorized Wilson",
        ),
        Peer(
            "dask",
            "dask groupby.apply",
            ("dask", "distributed", "pandas", "pyarrow"),
            slow=True,
            what="LocalCluster 2 processes × 1 thread, groupby(keys).apply(fn, meta)",
        ),
        Peer(
            "spark",
            "pyspark applyInPandas",
            ("pyspark", "pandas", "pyarrow"),
            program="java",
            program_hint="a Java 17 or 21 runtime (e.g. apt-get install openjdk-17-jre-headless)",
            slow=True,
            what="local[2], groupBy(keys).applyInPandas(fn, schema)",
        ),
        Peer(
            "celery-chunks",
            f"celery chunks ×{CELERY_CHUNK}",
            ("celery", "redis"),
            program="redis-server",
            program_hint="redis-server (apt-get install redis-server)",
            what=f"Redis, worker -c 2 prefork; task.chunks: {CELERY_CHUNK} jobs a task",
        ),
        Peer(
            "celery",
            "celery per job",
            ("celery", "redis"),
            program="redis-server",
            program_hint="redis-server (apt-get install redis-server)",
            slow=True,
            what="Redis, worker -c 2 prefork; group of one task per job",
        ),
    )
}


def missing(peer: Peer) -> str | None:
    """One line saying what ``peer`` lacks and how to install it, or ``None``."""
    absent = [m for m in peer.modules if importlib.util.find_spec(m) is None]
    if absent:
        return f"{peer.label} skipped: no {', '.join(absent)} — {EXTRA}"
    if peer.program and shutil.which(peer.program) is None:
        return f"{peer.label} skipped: {peer.program} not found — needs {peer.program_hint}"
    return None


# -- the section's plans (parent process) ---------------------------------------------------


def plans(
    config: BenchConfig,
    inputs: Callable[[str, int], Path],
    kafka: bool,
    say: Callable[[str], None],
) -> Iterator[tuple[str, list[Plan], int]]:
    """The ``peers`` section, and ``peers-slow``: the capped peers on fewer rows.

    PySpark and Celery per job pay milliseconds per job: with ``peers_slow_rows`` below
    the section's rows they run on an input of that size, with a floor of their own.
    """
    from dispatchkit.bench.runner import Plan

    rows = config.peers_rows or config.rows
    slow_rows = min(config.peers_slow_rows or rows, rows)
    slow = config.peers_slow_repeats or config.repeats
    task = "positive-rate"
    path = inputs("peers", rows)
    usable = {}
    for key, peer in PEERS.items():
        why = missing(peer)
        if why:
            say(f"peers: {why}")
        else:
            usable[key] = peer

    def plan(section: str, key: str, src: Path) -> Plan:
        peer = PEERS[key]
        return Plan(section, key, peer.label, f"peer-{key}", src, task, repeats=slow * peer.slow)

    capped = [k for k in CAPPED if k in usable] if slow_rows != rows else []
    main = [Plan("peers", "floor", "polars floor", "floor", path)]
    if "duckdb" in usable:
        main.append(plan("peers", "duckdb", path))
    main.append(Plan("peers", "embedded-2", "dispatchkit embedded ×2", "embedded", path, task, 2))
    if kafka:
        main.append(Plan("peers", "kafka-2", "dispatchkit kafka ×2", "kafka", path, task, 2, True))
    for key in ("dask", "spark", "celery-chunks", "celery"):
        if key in usable and key not in capped:
            main.append(plan("peers", key, path))
    yield "peers", main, config.repeats
    if capped:
        small = inputs("peers-slow", slow_rows)
        floor = Plan("peers-slow", "floor", "polars floor", "floor", small)
        yield "peers-slow", [floor, *(plan("peers-slow", k, small) for k in capped)], slow


#: The peers that ``peers_slow_rows`` puts on the smaller input.
CAPPED = ("spark", "celery")


# -- the variants (child process) ---------------------------------------------------------


def run_peer(spec: dict[str, Any]) -> Outcome:
    """Run the peer ``spec["variant"]`` (``peer-KEY``), timed; write its check file."""
    import polars as pl

    from dispatchkit.bench.variants import Outcome, normalize

    key = spec["variant"].removeprefix("peer-")
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with VARIANTS[key](spec, run_dir) as timed:
        c0, t0 = tree_cpu(), time.perf_counter()
        df, phases = timed()
        wall, cpu = time.perf_counter() - t0, tree_cpu() - c0
    df = _finish(df)
    normalize(df).write_parquet(spec["check"])
    rows = int(pl.scan_parquet(spec["input"]).select(pl.len()).collect().item())
    extra = {"setup_s": _SETUP.get("s", 0.0)}
    return Outcome(
        spec["variant"], wall, cpu, rows, df.height, phases, extra=extra, check=spec["check"]
    )


Timed = Callable[[], "tuple[pl.DataFrame, dict[str, float]]"]
_SETUP: dict[str, float] = {}


def tree_cpu() -> float:
    """CPU seconds so far of this process and every live descendant, and what they reaped."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _finish(df: pl.DataFrame) -> pl.DataFrame:
    """UTC-aware ``date_hour`` (Spark hands back naive times in its session zone, UTC)."""
    import polars as pl

    dtype = df.schema["date_hour"]
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
        df = df.with_columns(pl.col("date_hour").dt.replace_time_zone("UTC"))
    return df


def _with_wilson(df: pl.DataFrame) -> pl.DataFrame:
    import polars as pl

    from dispatchkit.apps.covid.stats import wilson_arrays

    low, high = wilson_arrays(df["positives"].to_numpy(), df["tests"].to_numpy())
    return df.with_columns(
        (pl.col("positives") / pl.col("tests")).alias("positive_rate"),
        pl.Series("ci_low", low),
        pl.Series("ci_high", high),
    )


@contextlib.contextmanager
def _duckdb(spec: dict[str, Any], run_dir: Path) -> Iterator[Timed]:
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    _SETUP["s"] = 0.0

    def timed() -> tuple[pl.DataFrame, dict[str, float]]:
        result: Any = con.sql(
            """
            SELECT country, date_trunc('hour', test_datetime) AS date_hour,
                   count(*) AS tests,
                   count(*) FILTER (WHERE result = 'positive') AS positives
            FROM read_parquet(?)
            GROUP BY ALL ORDER BY ALL
            """,
            params=[spec["input"]],
        )
        return _with_wilson(result.pl()), {}

    try:
        yield timed
    finally:
        con.close()


@contextlib.contextmanager
def _dask(spec: dict[str, Any], run_dir: Path) -> Iterator[Timed]:
    import dask.dataframe as dd
    import distributed
    import pandas as pd
    import polars as pl

    dist: Any = distributed  # typed or not, whether its stubs are installed or not

    from dispatchkit.bench.peers_tasks import dask_group

    t0 = time.perf_counter()
    cluster = dist.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        local_directory=str(run_dir / "dask"),
    )
    client = dist.Client(cluster)
    client.run(lambda: __import__("dispatchkit.bench.peers_tasks"))  # workers import first
    _SETUP["s"] = time.perf_counter() - t0
    meta = pd.DataFrame(
        {
            "tests": pd.Series(dtype="int64"),
            "positives": pd.Series(dtype="int64"),
            "positive_rate": pd.Series(dtype="float64"),
            "ci_low": pd.Series(dtype="float64"),
            "ci_high": pd.Series(dtype="float64"),
        }
    )

    def timed() -> tuple[pl.DataFrame, dict[str, float]]:
        ddf = dd.read_parquet(spec["input"], columns=["country", "test_datetime", "result"])
        ddf = ddf.assign(date_hour=ddf["test_datetime"].dt.floor("h"))
        out = ddf.groupby(["country", "date_hour"]).apply(dask_group, meta=meta).compute()
        return pl.from_pandas(out.reset_index()), {}

    try:
        yield timed
    finally:
        client.close()
        cluster.close()


@contextlib.contextmanager
def _spark(spec: dict[str, Any], run_dir: Path) -> Iterator[Timed]:
    import polars as pl
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from dispatchkit.bench.peers_tasks import spark_group

    os.environ["PYSPARK_PYTHON"] = sys.executable  # workers run this interpreter
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    t0 = time.perf_counter()
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("dispatchkit-bench-peers")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "1g")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.local.dir", str(run_dir / "spark"))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    _SETUP["s"] = time.perf_counter() - t0
    schema = (
        "country string, date_hour timestamp, tests long, positives long, "
        "positive_rate double, ci_low double, ci_high double"
    )

    def timed() -> tuple[pl.DataFrame, dict[str, float]]:
        sdf = spark.read.parquet(spec["input"]).select(
            "country", F.date_trunc("hour", "test_datetime").alias("date_hour"), "result"
        )
        out = sdf.groupBy("country", "date_hour").applyInPandas(spark_group, schema).toPandas()
        return pl.from_pandas(out), {}

    try:
        yield timed
    finally:
        spark.stop()


@contextlib.contextmanager
def _celery(spec: dict[str, Any], run_dir: Path, chunk: int) -> Iterator[Timed]:
    import polars as pl

    url = f"redis://127.0.0.1:{REDIS_PORT}/0"
    os.environ["DKBENCH_REDIS_URL"] = url
    t0 = time.perf_counter()
    with _redis_server(run_dir), _celery_worker(run_dir):
        from dispatchkit.bench.peers_celery import job

        _SETUP["s"] = time.perf_counter() - t0

        def timed() -> tuple[pl.DataFrame, dict[str, float]]:
            from celery import group

            t_read = time.perf_counter()
            jobs = (
                pl.read_parquet(spec["input"], columns=["country", "test_datetime", "result"])
                .group_by(
                    pl.col("country"),
                    pl.col("test_datetime").dt.truncate("1h").alias("date_hour"),
                )
                .agg(pl.col("result"))
            )
            payloads = jobs["result"].to_list()
            t_send = time.perf_counter()
            if chunk == 1:
                pending = group(job.s(r) for r in payloads).apply_async()
            else:
                pending = job.chunks(((r,) for r in payloads), chunk).apply_async()
            t_collect = time.perf_counter()
            got = pending.get(timeout=3600, disable_sync_subtasks=False)
            if chunk != 1:
                got = [r for part in got for r in part]
            t_end = time.perf_counter()
            results = pl.DataFrame(
                got,
                schema=[
                    ("tests", pl.Int64),
                    ("positives", pl.Int64),
                    ("positive_rate", pl.Float64),
                    ("ci_low", pl.Float64),
                    ("ci_high", pl.Float64),
                ],
                orient="row",
            )
            df = pl.concat([jobs.select("country", "date_hour"), results], how="horizontal")
            phases = {
                "read_group": t_send - t_read,
                "send": t_collect - t_send,
                "collect": t_end - t_collect,
            }
            return df, phases

        yield timed


def _celery_per_job(
    spec: dict[str, Any], run_dir: Path
) -> contextlib.AbstractContextManager[Timed]:
    return _celery(spec, run_dir, 1)


def _celery_chunks(spec: dict[str, Any], run_dir: Path) -> contextlib.AbstractContextManager[Timed]:
    return _celery(spec, run_dir, CELERY_CHUNK)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _redis_server(run_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A throw-away ``redis-server`` on :data:`REDIS_PORT`, stopped on the way out."""
    import redis

    if _port_open(REDIS_PORT):
        raise SystemExit(f"port {REDIS_PORT} is in use; the Celery peer starts its own Redis")
    cmd = ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1"]
    cmd += ["--save", "", "--appendonly", "no", "--dir", str(run_dir), "--daemonize", "no"]
    log = open(run_dir / "redis.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = redis.Redis(port=REDIS_PORT)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_path = run_dir / "redis.log"
                    raise SystemExit(f"redis-server did not start; see {log_path}") from None
                time.sleep(0.05)
        client.close()
        yield proc
    finally:
        _stop(proc, signal.SIGTERM, 20)
        log.close()


@contextlib.contextmanager
def _celery_worker(run_dir: Path) -> Iterator[Any]:
    """``celery worker -c 2`` (prefork) on the Redis broker, until it answers a ping."""
    from dispatchkit.bench.peers_celery import app

    cmd = [sys.executable, "-m", "celery", "-A", "dispatchkit.bench.peers_celery", "worker"]
    cmd += ["-c", "2", "-P", "prefork", "--loglevel", "WARNING", "-n", f"dkbench{os.getpid()}@%h"]
    cmd += ["--without-gossip", "--without-mingle"]
    log = open(run_dir / "celery.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while not app.control.ping(timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Celery worker did not start; see {run_dir / 'celery.log'}")
        yield app
    finally:
        _stop(proc, signal.SIGTERM, 30)
        log.close()


def _stop(proc: subprocess.Popen[bytes], sig: int, wait: float) -> None:
    """Stop ``proc`` and its process group, reaping it; no child is left behind."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: anything it left
    proc.wait()


VARIANTS: dict[str, Callable[[dict[str, Any], Path], contextlib.AbstractContextManager[Timed]]] = {
    "duckdb": _duckdb,
    "dask": _dask,
    "spark": _spark,
    "celery": _celery_per_job,
    "celery-chunks": _celery_chunks,
}


def preload(name: str) -> None:
    """Import what the peer needs before its clock starts."""
    key = name.removeprefix("peer-")
    modules = {
        "duckdb": ["duckdb"],
        "dask": ["dask.dataframe", "distributed", "pandas"],
        "spark": ["pyspark.sql", "pandas", "pyarrow"],
        "celery": ["celery", "redis"],
        "celery-chunks": ["celery", "redis"],
    }[key]
    for m in ["polars", *modules]:
        __import__(m)


# -- outputs ------------------------------------------------------------------------------


def table(rows: Sequence[Row], config: BenchConfig) -> list[str]:
    """The peers' Markdown table (empty if the section did not run)."""
    chosen = [r for r in rows if r["section"] in ("peers", "peers-slow")]
    if not chosen:
        return []
    floors = {r["section"]: r for r in chosen if r["key"] == "floor"}
    what = {
        "floor": "lazy scan_parquet → group_by → len, sum (streaming), vectorized Wilson",
        "embedded-2": "dispatchkit run, 2 worker processes: validate, quarantine, store, export",
        "kafka-2": "dispatchkit run --broker kafka, 2 workers started by the run",
        **{k: p.what for k, p in PEERS.items()},
    }
    out = [
        f"## Peers: {chosen[0]['rows']:,} rows, {chosen[0]['jobs']:,} jobs, positive-rate",
        "",
        "| way | what runs | rows | repeats | wall s, median (min–max) | × floor | µs a job "
        "| CPU s | largest RSS MB | all RSS MB | set-up s, not timed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in chosen:
        floor = floors.get(r["section"])
        x = r["wall_median_s"] / floor["wall_median_s"] if floor else math.nan
        setup = r["extra"].get("setup_s") if r["extra"] else None
        label = r["variant"]
        if r["section"] == "peers-slow":
            label += f", {r['rows']:,} rows"
        out.append(
            f"| {label} | {what.get(r['key'], '')} | {r['rows']:,} | {r['repeats']} "
            f"| {r['wall_median_s']:.2f} ({r['wall_min_s']:.2f}–{r['wall_max_s']:.2f}) "
            f"| {x:.1f}× | {1e6 * r['wall_median_s'] / r['jobs']:,.0f} "
            f"| {r['cpu_s']:.1f} | {r['peak_rss_max_mb']:,.0f} "
            f"| {r['peak_rss_total_mb']:,.0f} | {f'{setup:.1f}' if setup else '–'} |"
        )
    notes = [missing(p) for p in PEERS.values()]
    skipped = [n for n in notes if n]
    out += [
        "",
        "Every row's (country, date_hour, tests, positives) equals the Polars floor's on "
        "the same input (rows marked with their size ran on a smaller input, against its "
        "own floor; × floor is against the floor of the same input). Dask, Spark and "
        "Celery are timed from reading the file to results "
        "in the driver, with their cluster (LocalCluster, SparkSession and its JVM, Redis "
        "and the Celery worker) already up; its start-up is the last column. Celery's "
        "messages carry each job's rows as the `result` strings; rows are read and grouped "
        "by the producer inside the clock.",
    ]
    out += [f"- {line}" for line in skipped]
    return [*out, ""]


_KIND_COLOURS = {"floor": "#6b6b6b", "dispatchkit": "#1f5fa6", "peer": "#e08a2c"}


def _kind(row: Mapping[str, Any]) -> str:
    if row["key"] in ("floor", "duckdb"):
        return "floor"
    return "dispatchkit" if str(row["variant"]).startswith("dispatchkit") else "peer"


def plot(rows: Sequence[Row], path: Path) -> Path | None:
    """bench-peers.png: wall time (log scale) and peak memory, one bar per way."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from dispatchkit.apps.covid.chart import save_png

    chosen = [r for r in rows if r["section"] == "peers"]
    chosen += [r for r in rows if r["section"] == "peers-slow" and r["key"] != "floor"]
    if not chosen:
        return None
    floor = next(r for r in chosen if r["key"] == "floor")
    labels = [
        f"{r['variant']} ({r['rows']:,} rows)" if r["section"] == "peers-slow" else r["variant"]
        for r in chosen
    ]
    colours = [_KIND_COLOURS[_kind(r)] for r in chosen]
    median = np.array([r["wall_median_s"] for r in chosen], dtype=np.float64)
    low = np.array([r["wall_min_s"] for r in chosen], dtype=np.float64)
    high = np.array([r["wall_max_s"] for r in chosen], dtype=np.float64)
    y = np.arange(len(chosen), dtype=np.float64)

    fig = Figure(figsize=(12.0, 1.8 + 0.6 * len(chosen)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    wall_ax, rss_ax = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    xerr = np.vstack([np.clip(median - low, 0, None), np.clip(high - median, 0, None)])
    wall_ax.barh(y, median, height=0.6, color=colours, xerr=xerr, capsize=3, ecolor="#333333")
    wall_ax.set_xscale("log")
    for yi, m, hi, r in zip(y, median, high, chosen, strict=True):
        ref = floor["wall_median_s"] if r["section"] == "peers" else None
        text = f"{m:.2f} s" if m < 10 else f"{m:,.1f} s"
        if ref:
            text += f"  {m / ref:,.0f}×" if m / ref >= 10 else f"  {m / ref:.1f}×"
        wall_ax.annotate(
            text, (hi, yi), xytext=(5, 0), textcoords="offset points", va="center", fontsize=9
        )
    wall_ax.set_xlim(min(float(low.min()), float(median.min())) / 1.6, float(high.max()) * 6)
    wall_ax.set_title(
        "Wall time, median (whisker: min–max), log scale; × the Polars floor",
        loc="left",
        fontsize=11,
    )
    wall_ax.set_xlabel("seconds")

    rss_max = np.array([r["peak_rss_max_mb"] for r in chosen], dtype=np.float64)
    rss_all = np.array([r["peak_rss_total_mb"] for r in chosen], dtype=np.float64)
    h = 0.36
    rss_ax.barh(y - h / 2, rss_max, height=h, color=colours, alpha=1.0)
    rss_ax.barh(y + h / 2, rss_all, height=h, color=colours, alpha=0.45)
    for yi, a, b in zip(y, rss_max, rss_all, strict=True):
        for off, v in ((-h / 2, a), (h / 2, b)):
            rss_ax.annotate(
                f"{v:,.0f}",
                (v, yi + off),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    rss_ax.set_xlim(0, float(max(rss_max.max(), rss_all.max())) * 1.2)
    rss_ax.set_title("Peak RSS MB: largest process / all (pale)", loc="left", fontsize=11)
    rss_ax.set_xlabel("MB")
    wall_ax.set_yticks(y, labels)
    wall_ax.invert_yaxis()
    for ax in (wall_ax, rss_ax):
        ax.grid(axis="x", color="#e3e3e3", linewidth=0.8, which="both")
        ax.set_axisbelow(True)
        ax.tick_params(axis="y", length=0)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles = [Patch(color=c, label=k) for k, c in _KIND_COLOURS.items()]
    handles[0].set_label("single vectorized process")
    handles[2].set_label("peer: per-group Python on a cluster")
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    fig.suptitle(
        f"dispatchkit bench — with and without the dispatcher: {floor['rows']:,} rows, "
        f"{floor['jobs']:,} jobs",
        fontsize=14,
        fontweight="bold",
    )
    return save_png(fig, path)
