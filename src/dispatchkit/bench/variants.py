"""The benchmark variants, each run by :mod:`dispatchkit.bench` in a process of its own.

``python -m dispatchkit.bench.variants SPEC.json`` runs the variant the spec names and
writes an :class:`Outcome` as JSON to the spec's ``outcome`` path. Libraries are imported
before the clock starts; the clock stops once the results exist (in memory for the
single-process variants, in ``results.parquet`` and the store for dispatchkit). Each
variant that computes results writes ``(country, date_hour, tests, positives)`` to the
spec's ``check`` path after the clock stops, for the parent to compare with the floor's.

Variants:

``floor``       one lazy Polars group-by over the three needed columns, vectorized Wilson;
``pandas``      the monolith: ``pd.read_parquet`` of the whole file, then a group-by
                ``apply`` calling the task's interval once per (country, hour);
``embedded``    :func:`dispatchkit.runner.run_embedded`;
``dispatcher``  read, validate, cut and encode job batches with no transport at all;
``kafka*``      the variants on Kafka, in :mod:`dispatchkit.bench.kafka`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import polars as pl

from dispatchkit.apps.covid.stats import wilson_arrays

CHECK_COLUMNS = ("country", "date_hour", "tests", "positives")


@dataclass
class Outcome:
    """What a variant reports back; ``wall_s`` and ``cpu_s`` cover the timed part only."""

    variant: str
    wall_s: float
    cpu_s: float
    rows: int
    jobs: int
    phases: dict[str, float] = field(default_factory=dict)
    worker_jobs_per_s: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    check: str | None = None
    run_id: str = ""


def normalize(df: pl.DataFrame) -> pl.DataFrame:
    """The compared columns in one dtype and order, sorted by key."""
    return df.select(
        pl.col("country").cast(pl.String),
        pl.col("date_hour").cast(pl.Datetime("us", "UTC")),
        pl.col("tests").cast(pl.Int64),
        pl.col("positives").cast(pl.Int64),
    ).sort("country", "date_hour")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- single process ---------------------------------------------------------------------


def floor(spec: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, float]]:
    df = (
        pl.scan_parquet(spec["input"])
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
    df = df.with_columns(
        (pl.col("positives") / pl.col("tests")).alias("positive_rate"),
        pl.Series("ci_low", low),
        pl.Series("ci_high", high),
    )
    return df, {}


def pandas_monolith(spec: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, float]]:
    import pandas as pd

    from dispatchkit.apps.covid import beta, wilson

    interval = {"positive-rate": wilson, "beta-posterior": beta}[spec["task"]]
    t0 = time.perf_counter()
    frame = pd.read_parquet(spec["input"])
    load = time.perf_counter() - t0
    frame["date_hour"] = frame["test_datetime"].dt.floor("h")

    def rate(results: pd.Series) -> tuple[int, int, float, float, float]:
        tests = len(results)
        positives = int((results == "positive").sum())
        country, hour = cast(tuple[str, Any], results.name)
        low, high = interval(positives, tests, {"country": country, "date_hour": hour})
        return (tests, positives, positives / tests, low, high)

    per_key = frame.groupby(["country", "date_hour"], sort=True)["result"].apply(rate)
    out = pd.DataFrame(
        per_key.tolist(),
        index=per_key.index,
        columns=["tests", "positives", "positive_rate", "ci_low", "ci_high"],
    ).reset_index()
    return pl.from_pandas(out), {"load": load, "groupby_apply": time.perf_counter() - t0 - load}


# -- dispatchkit ------------------------------------------------------------------------


def run_spec_of(spec: dict[str, Any]) -> Any:
    from dispatchkit.runner import RunSpec

    return RunSpec(
        input=spec["input"],
        out=Path(spec["run_dir"]),
        run_id=f"bench-{uuid.uuid4().hex[:12]}",
        task=spec["task"],
        workers=spec["workers"],
        report=False,
        quiet=True,
    )


def settings_of(spec: dict[str, Any]) -> Any:
    from dispatchkit.brokers.kafka.settings import load_settings

    # Servers and librdkafka options come in the environment, as workers get them.
    return load_settings(
        bootstrap_servers=None,
        options=[],
        config_file=None,
        topic_prefix=spec["topic_prefix"],
        partitions=spec["partitions"],
    )


def embedded(spec: dict[str, Any]) -> Outcome:
    from dispatchkit.runner import run_embedded

    summary = run_embedded(run_spec_of(spec))
    require_complete(summary)
    return Outcome(
        "embedded",
        0.0,
        0.0,
        summary.rows_valid,
        summary.jobs_done,
        dict(summary.seconds),
        run_id=summary.run_id,
    )


def dispatcher_only(spec: dict[str, Any]) -> Outcome:
    from dispatchkit.dispatcher import Dispatcher
    from dispatchkit.runner import prepare

    run_spec = run_spec_of(spec)
    t0 = time.perf_counter()
    prep = prepare(run_spec)
    t_prepare = time.perf_counter() - t0
    with prep.reader:
        assert prep.app is not None
        d = Dispatcher(prep.reader, app=prep.app, run_id=prep.run_id, task=run_spec.task)
        nbytes = sum(len(m.payload) for m in d.messages())
    if d.stats.rows_cut != prep.counts.rows_valid:
        raise SystemExit(f"dispatcher cut {d.stats.rows_cut} of {prep.counts.rows_valid} rows")
    phases = {"prepare": t_prepare, "sort_cut_encode": time.perf_counter() - t0 - t_prepare}
    extra = {"batches": float(d.stats.messages), "bytes": float(nbytes)}
    return Outcome("dispatcher", 0.0, 0.0, d.stats.rows_cut, d.stats.jobs, phases, extra=extra)


def require_complete(summary: Any) -> None:
    if summary.status != "complete":
        raise SystemExit(f"run {summary.run_id} ended {summary.status}: {summary.failed_jobs[:3]}")


# -- entry point ------------------------------------------------------------------------

SINGLE: dict[str, Callable[[dict[str, Any]], tuple[pl.DataFrame, dict[str, float]]]] = {
    "floor": floor,
    "pandas": pandas_monolith,
}
DISPATCHKIT: dict[str, Callable[[dict[str, Any]], Outcome]] = {
    "embedded": embedded,
    "dispatcher": dispatcher_only,
}


def run_variant(spec: dict[str, Any]) -> Outcome:
    """Run and time the variant ``spec["variant"]``; write its check file."""
    name = spec["variant"]
    check = Path(spec["check"])
    if name in SINGLE:
        c0, t0 = _cpu(), time.perf_counter()
        df, phases = SINGLE[name](spec)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        normalize(df).write_parquet(check)
        rows = int(pl.scan_parquet(spec["input"]).select(pl.len()).collect().item())
        return Outcome(name, wall, cpu, rows, df.height, phases, check=str(check))
    if name.startswith("peer-"):
        from dispatchkit.bench.peers import run_peer

        return run_peer(spec)
    if name.startswith("kafka"):
        from dispatchkit.bench import kafka as bench_kafka

        variant = bench_kafka.VARIANTS[name]
    else:
        variant = DISPATCHKIT[name]
    c0, t0 = _cpu(), time.perf_counter()
    outcome = variant(spec)
    if not outcome.wall_s:  # a variant that warms up first times itself
        outcome.wall_s, outcome.cpu_s = time.perf_counter() - t0, _cpu() - c0
    results = Path(spec["run_dir"]) / "results.parquet"
    if results.exists():
        normalize(pl.read_parquet(results)).write_parquet(check)
        outcome.check = str(check)
    if name.startswith("kafka"):
        outcome.worker_jobs_per_s = bench_kafka.worker_rates(spec, outcome.run_id)
        bench_kafka.delete_topics(spec)
    return outcome


def _preload(name: str) -> None:
    """Import what the variant needs before its clock starts."""
    if name == "pandas":
        import pandas  # noqa: F401
    elif name.startswith("peer-"):
        from dispatchkit.bench.peers import preload

        preload(name)
    elif name in DISPATCHKIT or name.startswith("kafka"):
        import dispatchkit.dispatcher
        import dispatchkit.runner
        import dispatchkit.store

        if name.startswith("kafka"):
            import dispatchkit.kafka_run  # noqa: F401


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    _preload(spec["variant"])
    outcome = run_variant(spec)
    Path(spec["outcome"]).write_text(json.dumps(asdict(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
