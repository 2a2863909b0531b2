"""The benchmark's code path: quick mode end to end, the results check, the measurement.

Timings are never asserted: the machine running the tests is not a benchmark machine.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from dispatchkit import bench
from dispatchkit.bench import compare_results
from dispatchkit.bench.app_floors import APP_TASKS, compare_app_results
from dispatchkit.bench.measure import measure
from dispatchkit.cli import bench as bench_cli
from dispatchkit.cli import main
from dispatchkit.errors import RunError

from .conftest import IN_CI


def test_quick_bench_runs_every_variant_and_writes_its_files(tmp_path: Path) -> None:
    servers = os.environ.get("DISPATCHKIT_BOOTSTRAP_SERVERS", "")
    if IN_CI and not servers:
        pytest.fail("DISPATCHKIT_BOOTSTRAP_SERVERS is not set: CI must run the Kafka variants")
    out = tmp_path / "bench"
    # Quick mode, trimmed further: one variant per code path is enough here.
    args = ["bench", "--quick", "-q", "--out", str(out), "--heavy-rows", "1000"]
    args += ["--kafka-workers", "1", "--warm-workers", "2"]
    args += ["--topic-prefix", f"tbench{os.getpid()}"] if servers else ["--no-kafka"]

    assert main(args) == 0

    for name in ("bench.json", "bench.md", "bench.png", "bench-heavy.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "bench.json").read_text())
    rows = {(r["section"], r["key"]): r for r in doc["rows"]}
    expected = {
        ("main", "floor"),
        ("main", "pandas"),
        ("main", "embedded-1"),
        ("main", "embedded-2"),
        ("components", "dispatcher"),
        ("heavy", "pandas"),
        ("heavy", "embedded-1"),
        ("heavy", "embedded-2"),
        ("commands", "script"),
        ("commands", "run"),
        ("commands", "run-no-report"),
        ("overhead", "noop"),
    }
    expected |= {(f"apps/{at.name}", key) for at in APP_TASKS for key in ("floor", "run")}
    if servers:
        expected |= {("main", "kafka-1"), ("main", "warm-2")}
        expected |= {("components", "staged-1")}
        expected |= {("heavy", "kafka-1"), ("heavy", "kafka-2")}
        expected |= {("commands", "run-kafka"), ("commands", "warm")}
    assert expected <= set(rows)
    assert all(r["results_match"] for r in rows.values())
    floor = rows[("main", "floor")]
    assert floor["rows"] == 20_000
    # Every variant computed the same number of (country, hour) jobs as the floor.
    assert {r["jobs"] for (section, _), r in rows.items() if section == "main"} == {floor["jobs"]}
    assert rows[("main", "embedded-2")]["peak_rss_total_mb"] > 0
    # Whole commands: every run's results.parquet equalled the floor script's (the
    # benchmark stops otherwise), the same jobs as the in-process floor found.
    commands = {r["jobs"] for (section, _), r in rows.items() if section == "commands"}
    assert commands == {floor["jobs"]}
    # The no-op overhead: every one-row job dispatched, handled and back exactly once.
    noop = rows[("overhead", "noop")]
    assert noop["rows"] == noop["jobs"] == 5_000
    assert set(noop["phases"]) >= {"per_job_worker", "per_job_bare", "vectorized_worker"}
    # Each example app's run found its floor's keys (values compared in the run).
    for at in APP_TASKS:
        app_floor, app_run = rows[(f"apps/{at.name}", "floor")], rows[(f"apps/{at.name}", "run")]
        assert app_run["jobs"] == app_floor["jobs"] > 0, at.name
    judged = {t["target"]: t for t in doc["targets"]}
    assert len(judged) == len(doc["targets"]) >= 19
    wanted = ("--no-report", "fixed cost", "per-job form", "vectorized form", "5,000,000")
    for words in (*wanted, "3,000,000", "1,000,000 jobs/s", "Kafka ×2 within", "700 MB"):
        assert any(words in t for t in judged), words
    run_kafka = next(t for t in judged.values() if "--broker kafka" in t["target"])
    assert (run_kafka["met"] is None) == (not servers)
    table = (out / "bench.md").read_text()
    assert "| embedded ×2 |" in table and "## Targets" in table
    assert "## Whole commands" in table and "## Per-job overhead" in table
    assert "## Example apps" in table


def _frame(positives: list[int]) -> pl.DataFrame:
    hours = [datetime(2020, 3, 1, h, tzinfo=UTC) for h in range(len(positives))]
    return pl.DataFrame(
        {
            "country": ["Chile"] * len(positives),
            "date_hour": hours,
            "tests": [10] * len(positives),
            "positives": positives,
        }
    )


def test_results_that_differ_from_the_floor_stop_the_benchmark() -> None:
    compare_results(_frame([1, 2, 3]), _frame([1, 2, 3]), "same")
    with pytest.raises(RunError, match=r"differ from the floor's.*1 with other counts"):
        compare_results(_frame([1, 2, 4]), _frame([1, 2, 3]), "embedded ×2")
    with pytest.raises(RunError, match=r"1 missing"):
        compare_results(_frame([1, 2]), _frame([1, 2, 3]), "kafka ×1")


def test_app_results_compare_counts_exactly_and_floats_within_a_tolerance() -> None:
    at = next(a for a in APP_TASKS if a.name == "sensors-trend")
    hours = [datetime(2024, 5, 1, h, tzinfo=UTC) for h in range(3)]
    want = pl.DataFrame(
        {
            "sensor": ["a", "a", "b"],
            "hour": hours,
            "slope": [1.5, None, 0.0],
            "intercept": [2.0, None, 7.25],
            "r2": [0.5, None, 1.0],
            "n": [10, 1, 3],
        }
    )
    near = want.with_columns(pl.col("slope") * (1 + 1e-13))
    compare_app_results(near, want, at, "within the tolerance")
    with pytest.raises(RunError, match=r"1 with other values"):
        compare_app_results(want.with_columns(pl.col("slope") * (1 + 1e-9)), want, at, "far")
    with pytest.raises(RunError, match=r"1 with other values"):
        compare_app_results(want.with_columns(n=pl.Series([10, 2, 3])), want, at, "count")
    with pytest.raises(RunError, match=r"1 with other values"):  # a null is not a number
        compare_app_results(want.with_columns(r2=pl.Series([0.5, 0.0, 1.0])), want, at, "null")
    with pytest.raises(RunError, match=r"1 missing"):
        compare_app_results(want.head(2), want, at, "short")
    with pytest.raises(RunError, match=r"1 twice"):
        compare_app_results(pl.concat([want, want.tail(1)]), want, at, "twice")


def test_memory_scales_and_overhead_jobs_reach_the_config(tmp_path: Path) -> None:
    parser = bench_cli._sizes
    assert parser("20000000,100_000_000") == (20_000_000, 100_000_000)
    assert parser("0") == ()
    config = bench.BenchConfig.quick(tmp_path)
    assert config.overhead_jobs == 5_000 and config.memory_scales == ()
    with pytest.raises(Exception, match="--memory-scale"):
        bench.BenchConfig(out=tmp_path, sections=("memory",)).check()


def test_measure_sees_the_peak_of_a_child_process(tmp_path: Path) -> None:
    child = "x = bytearray(200_000_000); x[::4096] = b'1' * len(x[::4096])"
    parent = (
        f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    )
    m = measure([sys.executable, "-c", parent], log=tmp_path / "log.txt", interval=0.01)
    assert m.returncode == 0
    assert m.peak_rss_max_mb >= 190  # the child's, though the parent stayed small
    assert m.main_rss_mb < m.peak_rss_max_mb
    assert m.cpu_s > 0


def test_usage_mistakes_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--workers", "0,2"]) == 2
    assert "give worker counts of at least 1" in capsys.readouterr().err
    assert main(["bench", "--no-kafka", "--task", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "dispatchkit: error: unknown task 'nope' (known: beta-posterior, positive-rate)"
    )
    assert main(["bench", "--no-kafka", "--sections", "main,speed", "--out", str(tmp_path)]) == 2
    assert "unknown speed" in capsys.readouterr().err
    assert bench_cli.SECTIONS == bench.SECTIONS
    (tmp_path / "file").write_text("")
    assert main(["bench", "--no-kafka", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_peers_are_asked_for_and_a_missing_one_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispatchkit.bench import peers

    assert main(["bench", "--quick", "--peers", "--no-kafka", "--out", str(tmp_path)]) == 2
    assert "--peers is not part of --quick" in capsys.readouterr().err
    assert main(["bench", "--sections", "peers", "--no-kafka", "--out", str(tmp_path)]) == 2
    assert "--sections peers needs --peers" in capsys.readouterr().err
    monkeypatch.setitem(
        peers.PEERS, "dask", peers.Peer("dask", "dask groupby.apply", ("no_such_module_dk",))
    )
    assert peers.missing(peers.PEERS["dask"]) == (
        "dask groupby.apply skipped: no no_such_module_dk — pip install 'dispatchkit[peers]'"
    )
    tool = peers.Peer("x", "x", (), program="no-such-program-dk", program_hint="it")
    assert peers.missing(tool) == "x skipped: no-such-program-dk not found — needs it"


def test_the_memory_growth_target_compares_the_two_largest_scales() -> None:
    from dispatchkit.bench import goals

    def row(rows: int, mb: float) -> dict[str, object]:
        return {
            "section": "memory",
            "key": f"embedded-2-{rows}",
            "variant": "embedded ×2",
            "workers": 2,
            "rows": rows,
            "peak_rss_max_mb": mb,
            "wall_median_s": rows / 1e6,
        }

    # 2M is far below the others; 20M → 100M grows 9%, within the target.
    judged = goals.memory([row(2_000_000, 440.0), row(100_000_000, 678.0), row(20_000_000, 622.0)])
    growth = next(e for e in judged if e["target"] == goals.GROWTH)
    assert growth["met"] is True
    assert "20,000,000 → 100,000,000" in growth["measured"]
    judged = goals.memory([row(2_000_000, 600.0), row(20_000_000, 440.0), row(100_000_000, 678.0)])
    growth = next(e for e in judged if e["target"] == goals.GROWTH)
    assert growth["met"] is False and growth["measured"].startswith("1.54×")
    judged = goals.memory([row(20_000_000, 500.0)])
    assert next(e for e in judged if e["target"] == goals.GROWTH)["met"] is None
    assert next(e for e in judged if e["target"] == goals.TIME_PER_ROW)["met"] is None


def test_time_per_row_falls_back_to_the_smallest_memory_scale() -> None:
    from dispatchkit.bench import goals

    def row(section: str, rows: int, seconds: float) -> dict[str, object]:
        return {
            "section": section,
            "key": "embedded-2" if section == "main" else f"embedded-2-{rows}",
            "variant": "embedded ×2",
            "workers": 2,
            "rows": rows,
            "peak_rss_max_mb": 500.0,
            "wall_median_s": seconds,
        }

    def judged(rows: list[dict[str, object]]) -> dict[str, object]:
        return next(e for e in goals.memory(rows) if e["target"] == goals.TIME_PER_ROW)

    # No main section: 100M rows in 100 s (1,000 ns/row) against 2M rows in 3.5 s (1,750).
    alone = judged([row("memory", 2_000_000, 3.5), row("memory", 100_000_000, 100.0)])
    assert alone["met"] is True and "1,000 ns/row at 100,000,000 vs 1,750 at 2,000,000" in str(
        alone["measured"]
    )
    # The main section's run, when there is one, is the reference (here 400 ns/row).
    with_main = judged(
        [
            row("main", 2_000_000, 0.8),
            row("memory", 2_000_000, 3.5),
            row("memory", 100_000_000, 100.0),
        ]
    )
    assert with_main["met"] is False and str(with_main["measured"]).startswith("2.50×")
