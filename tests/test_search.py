"""Searching for wrong results: random inputs, crash points and reruns.

Each example draws an input (rows near the range's edges, before 1970 too, dirty values,
hot keys), a crash point and a rerun that keeps or changes one parameter of the run. The
property: the first run ends complete or is killed at the crash point; a rerun with a
changed parameter is refused in one line and writes nothing; the rerun with the run's own
parameters ends complete, and its results equal a reference computed here from the drawn
values with integer arithmetic (no DuckDB, no casts shared with the code under test).

Examples per test: ``$DISPATCHKIT_SEARCH_EXAMPLES`` (default 10 embedded, a third of it
on Kafka). Each example runs the CLI three times, so keep it small in CI.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .conftest import normalize

SRC = str(Path(__file__).resolve().parents[1] / "src")
EXAMPLES = int(os.environ.get("DISPATCHKIT_SEARCH_EXAMPLES", "10"))
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NS_PER_HOUR = 3_600_000_000_000

#: Spellings the reference accepts, written out here rather than imported.
POSITIVE = ("positive", "pos", "p", "+", "1", "true", "yes", "detected")
NEGATIVE = ("negative", "neg", "n", "-", "0", "false", "no", "not detected")
RESULTS = (*POSITIVE, *NEGATIVE, " Positive ", "NEG", "maybe", "", None)
COUNTRIES = ("Peru", "Chad", " Fiji ", "Côte d'Ivoire", "", "  ", None)


@dataclass(frozen=True)
class Case:
    rows: list[tuple[str | None, int, str | None]]  # country, instant in ns, result
    start_ns: int  # the run's range, whole seconds
    end_ns: int
    fmt: str  # "parquet-us", "parquet-ns" or "csv"
    workers: int
    budget: int | None  # --max-message-bytes, small enough to split the hot key
    crash: str | None
    change: tuple[str, str] | None


def _iso(ns: int) -> str:
    return (EPOCH + timedelta(microseconds=ns // 1000)).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


@st.composite
def cases(draw: st.DrawFn, crashes: tuple[str | None, ...]) -> Case:
    base_hour = draw(st.sampled_from([-30, -1, 0, 440_000, 442_000]))  # 1969/1970 or 2020
    hours = draw(st.integers(1, 6))
    start_ns, end_ns = base_hour * NS_PER_HOUR, (base_hour + hours) * NS_PER_HOUR
    instant = st.one_of(
        st.integers(start_ns - NS_PER_HOUR, end_ns + NS_PER_HOUR),
        st.sampled_from([start_ns, start_ns - 1, end_ns - 1, end_ns, start_ns + NS_PER_HOUR - 1]),
    )
    row = st.tuples(st.sampled_from(COUNTRIES), instant, st.sampled_from(RESULTS))
    rows = draw(st.lists(row, min_size=1, max_size=120))
    hot = draw(st.integers(0, 400))  # one hot key, split when the budget is small
    rows += [("Peru", start_ns + 1_000, "positive" if i % 3 else "neg") for i in range(hot)]
    fmt = draw(st.sampled_from(["parquet-us", "parquet-ns", "csv"]))
    if fmt != "parquet-ns":  # microseconds in the file: the reference sees what is written
        rows = [(c, t // 1000 * 1000, r) for c, t, r in rows]
    budget = draw(st.sampled_from([None, 2400]))
    changes: list[tuple[str, str] | None] = [
        None,
        ("--start", _iso(start_ns - NS_PER_HOUR)),
        ("--end", _iso(end_ns + NS_PER_HOUR)),
        ("--task", "beta-posterior"),
        ("--max-message-bytes", "2600" if budget else "2400"),
    ]
    return Case(
        rows=rows,
        start_ns=start_ns,
        end_ns=end_ns,
        fmt=fmt,
        workers=draw(st.integers(1, 2)),
        budget=budget,
        crash=draw(st.sampled_from(crashes)),
        change=draw(st.sampled_from(changes)),
    )


def write_input(case: Case, where: Path) -> Path:
    if case.fmt == "csv":
        path = where / "input.csv"
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["country", "test_datetime", "result"])
            for c, t, r in case.rows:
                w.writerow(["" if c is None else c, _iso(t), "" if r is None else r])
        return path
    unit = "ns" if case.fmt == "parquet-ns" else "us"
    per = 1 if unit == "ns" else 1000
    table = pa.table(
        {
            "country": pa.array([c for c, _, _ in case.rows], pa.string()),
            "test_datetime": pa.array(
                [t // per for _, t, _ in case.rows], pa.timestamp(unit, "UTC")
            ),
            "result": pa.array([r for _, _, r in case.rows], pa.string()),
        }
    )
    path = where / "input.parquet"
    pq.write_table(table, path)
    return path


def expected(case: Case) -> tuple[pl.DataFrame, int]:
    """(country, hour) → tests, positives from the drawn values; and the bad-row count."""
    tests: Counter[tuple[str, int]] = Counter()
    positives: Counter[tuple[str, int]] = Counter()
    bad = 0
    for c, t, r in case.rows:
        # CSV writes an empty field for None, which reads back as missing: the same rule.
        country = (c or "").strip()
        result = (r or "").strip().lower()
        if (
            not country
            or not case.start_ns <= t < case.end_ns
            or (result not in POSITIVE and result not in NEGATIVE)
        ):
            bad += 1
        else:
            key = (country, t // NS_PER_HOUR)  # Python's // floors, before 1970 too
            tests[key] += 1
            positives[key] += result in POSITIVE
    df = pl.DataFrame(
        {
            "country": [k[0] for k in tests],
            "date_hour": [EPOCH + timedelta(hours=k[1]) for k in tests],
            "tests": [tests[k] for k in tests],
            "positives": [positives[k] for k in tests],
        },
        schema={
            "country": pl.String,
            "date_hour": pl.Datetime("us", "UTC"),
            "tests": pl.Int64,
            "positives": pl.Int64,
        },
    )
    return normalize(df), bad


def cli(
    args: list[str], faults: str = "", fault_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DISPATCHKIT_TEST_FAULTS", None)
    if faults:
        env["DISPATCHKIT_TEST_FAULTS"] = faults
        env["DISPATCHKIT_TEST_FAULT_DIR"] = str(fault_dir)
    return subprocess.run(
        [sys.executable, "-m", "dispatchkit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def check_case(case: Case, extra: list[str], where: Path) -> None:
    data = write_input(case, where)
    out = where / "out"
    args = [
        "run", str(data), "--out", str(out), "--run-id", "search", "-q", "--no-report",
        "--workers", str(case.workers),
        "--start", _iso(case.start_ns), "--end", _iso(case.end_ns),
        *(["--max-message-bytes", str(case.budget)] if case.budget else []),
        # Exactness is searched here, whatever the share of bad rows (tests/test_outcome.py
        # checks the budget).
        "--max-bad-rows", "1.0",
        *extra,
    ]  # fmt: skip
    want, bad = expected(case)
    if want.is_empty():
        # No valid row: refused once the quarantine is written, in one line naming it.
        refused = cli(args)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1, refused.stderr
        assert "no valid row" in lines[-1] and "quarantine.csv" in lines[-1], refused.stderr
        assert pl.read_csv(out / "quarantine.csv", infer_schema=False).height == bad
        return

    faults = f"crash-once:{case.crash},flush-at:1" if case.crash else ""
    first = cli(args, faults, where)
    if case.crash and case.crash.startswith("dispatch.") and first.returncode == 1:
        # run --broker kafka: its dispatcher process was killed; the run says so.
        lines = first.stderr.strip().splitlines()
        assert len(lines) == 1 and "dispatcher process ended abruptly" in lines[0], first.stderr
    else:
        assert first.returncode in (0, 137), first.stderr
    if first.returncode == 0:
        assert_results(out, want, bad)

    if case.change is not None:
        # The store may be checkpointed by DuckDB; the exports may not change.
        exports = ("results.parquet", "results.csv", "quarantine.csv", "quarantine.parquet")
        before = {n: (out / n).read_bytes() for n in exports if (out / n).exists()}
        refused = cli([*args, *case.change])
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1, refused.stderr
        assert len(lines) == 1, refused.stderr
        assert case.change[0] in lines[0], lines[0]
        after = {n: (out / n).read_bytes() for n in exports if (out / n).exists()}
        assert after == before, "a refused run wrote its outputs"

    final = cli(args)
    assert final.returncode == 0, final.stderr
    assert_results(out, want, bad)


def assert_results(out: Path, want: pl.DataFrame, bad: int) -> None:
    got = pl.read_parquet(out / "results.parquet")
    assert got["job_id"].n_unique() == got.height, "a job stored twice"
    assert normalize(got).equals(want), f"\n{normalize(got)}\n!=\n{want}"
    quarantined = pl.read_csv(out / "quarantine.csv", infer_schema=False).height if bad else 0
    assert quarantined == bad


EMBEDDED_CRASHES = (
    None,
    "run.after_flush@1",
    "run.after_flush@3",
    "worker.after_compute@1",
    "worker.after_compute@2",
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # each example takes seconds
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases(EMBEDDED_CRASHES))
def test_embedded_runs_are_exact_or_refused(case: Case) -> None:
    where = Path(tempfile.mkdtemp(prefix="dk-search-"))
    try:
        check_case(case, [], where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


KAFKA_CRASHES = (
    None,
    "dispatch.mid_publish@1",
    "worker.after_produce@1",
    "collector.after_store@1",
)


@pytest.mark.kafka
@pytest.mark.slow
@settings(
    max_examples=max(2, EXAMPLES // 3),
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # each example takes seconds
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases(KAFKA_CRASHES))
def test_kafka_runs_are_exact_or_refused(case: Case) -> None:
    bootstrap = os.environ.get("DISPATCHKIT_BOOTSTRAP_SERVERS")
    if not bootstrap:
        if os.environ.get("CI"):
            pytest.fail("DISPATCHKIT_BOOTSTRAP_SERVERS is not set")
        pytest.skip("no Kafka broker (set DISPATCHKIT_BOOTSTRAP_SERVERS)")
    where = Path(tempfile.mkdtemp(prefix="dk-search-kafka-"))
    prefix = f"search{uuid.uuid4().hex[:8]}"
    try:
        check_case(
            case,
            ["--broker", "kafka", "-b", bootstrap, "--topic-prefix", prefix, "--partitions", "3"],
            where,
        )
    finally:
        shutil.rmtree(where, ignore_errors=True)
