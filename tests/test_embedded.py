"""The whole job on the embedded broker, against the independent reference."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from dispatchkit.brokers.embedded import EmbeddedBroker
from dispatchkit.runner import RunSpec, run_embedded
from dispatchkit.store import ResultStore
from dispatchkit.worker import RetryPolicy

from .conftest import assert_exact, reference
from .fault_helpers import SMALL_MESSAGES


def test_run_is_exact_and_writes_every_file(small_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_embedded(RunSpec(input=str(small_parquet), out=out, workers=2))
    assert summary.status == "complete"
    results = pl.read_parquet(out / "results.parquet")
    assert_exact(results, reference(small_parquet))
    assert results["tests"].sum() == summary.rows_read == 30_000
    assert list(results.columns) == [
        "run_id",
        "job_id",
        "country",
        "date_hour",
        "tests",
        "positives",
        "positive_rate",
        "ci_low",
        "ci_high",
    ]
    csv = pl.read_csv(out / "results.csv")
    assert csv.height == results.height
    assert csv["date_hour"][0].endswith(":00:00Z")
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (results["ci_low"] <= results["positive_rate"]).all()
    assert (results["positive_rate"] <= results["ci_high"]).all()


def test_csv_input_gives_the_same_results(small_csv: Path, tmp_path: Path) -> None:
    run_embedded(RunSpec(input=str(small_csv), out=tmp_path, workers=1))
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_csv))


def test_rerun_with_the_same_run_id_does_no_work(small_parquet: Path, tmp_path: Path) -> None:
    spec = RunSpec(input=str(small_parquet), out=tmp_path, workers=2, run_id="again")
    first = run_embedded(spec)
    second = run_embedded(spec)
    assert first.jobs_sent == first.jobs > 0
    assert second.jobs_sent == 0 and second.jobs_skipped == first.jobs
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))


def test_resume_after_an_interrupted_run_redoes_only_what_is_missing(
    small_parquet: Path, tmp_path: Path
) -> None:
    spec = RunSpec(input=str(small_parquet), out=tmp_path, workers=2, run_id="resume")
    run_embedded(spec)
    with ResultStore(tmp_path / "dispatchkit.duckdb") as store:
        parts = store.parts_table("resume")
        store.con.execute(f"DELETE FROM {parts} WHERE run_id = 'resume' AND hash(job_id) % 3 = 0")
        store.update_run("resume", status="dispatching")
        missing = store.con.execute(
            f"SELECT ? - count(*) FROM {parts} WHERE run_id = 'resume'", [spec_jobs(tmp_path)]
        ).fetchall()[0][0]
    summary = run_embedded(spec)
    assert summary.jobs_sent == missing > 0
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))


def spec_jobs(out: Path) -> int:
    return pl.read_parquet(out / "results.parquet").height


def test_a_killed_worker_is_replaced_and_its_jobs_redone(
    small_parquet: Path, tmp_path: Path
) -> None:
    """kill -9 a worker process mid-run: the run still completes exactly."""
    killed: list[int] = []
    original = EmbeddedBroker.publish

    def publish(self: EmbeddedBroker, batch):  # type: ignore[no-untyped-def]
        original(self, batch)
        if self.batches_sent == 40 and not killed:
            pid = self.pids[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    EmbeddedBroker.publish = publish  # type: ignore[method-assign]
    try:
        # Small messages (hundreds, instead of about 30), so that the kill lands mid-run.
        spec = RunSpec(
            input=str(small_parquet), out=tmp_path, workers=2, max_message_bytes=SMALL_MESSAGES
        )
        summary = run_embedded(spec)
    finally:
        EmbeddedBroker.publish = original  # type: ignore[method-assign]
    assert killed, "the test did not kill a worker"
    assert summary.worker_restarts >= 1
    assert summary.status == "complete"
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))


def test_failing_jobs_are_dead_lettered_and_the_run_is_incomplete(
    small_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHKIT_TEST_FAULTS", "fail:Sweden")
    spec = RunSpec(
        input=str(small_parquet),
        out=tmp_path,
        workers=2,
        retry=RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0),
    )
    summary = run_embedded(spec)
    assert summary.status == "incomplete"
    assert summary.failed_jobs and all(f.startswith("country=Sweden ") for f in summary.failed_jobs)
    results = pl.read_parquet(tmp_path / "results.parquet")
    ref = reference(small_parquet)
    assert "Sweden" not in results["country"].to_list()
    assert len(summary.failed_jobs) == ref.filter(pl.col("country") == "Sweden").height
    assert_exact(results, ref.filter(pl.col("country") != "Sweden"))
    # The cause is fixed: the same run id completes the missing jobs exactly.
    monkeypatch.delenv("DISPATCHKIT_TEST_FAULTS")
    again = run_embedded(spec)
    assert again.status == "complete"
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), ref)


def test_jobs_that_fail_once_are_retried_not_dead_lettered(
    small_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHKIT_TEST_FAULTS", "fail-once:Italy")
    summary = run_embedded(
        RunSpec(
            input=str(small_parquet),
            out=tmp_path,
            workers=1,
            retry=RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0),
        )
    )
    assert summary.status == "complete" and not summary.failed_jobs
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))


def test_unused_imports_guard() -> None:
    assert threading and time


def test_skewed_key_is_split_and_exact(tmp_path: Path) -> None:
    from dispatchkit.apps.covid.generate import GenerateSpec, generate

    path = tmp_path / "skew.parquet"
    generate(GenerateSpec(rows=8_000, seed=5, hot_key_rows=100_000), path)
    summary = run_embedded(
        RunSpec(input=str(path), out=tmp_path / "o", workers=2, max_message_bytes=4096)
    )
    assert summary.split_jobs >= 1 and summary.status == "complete"
    results = pl.read_parquet(tmp_path / "o" / "results.parquet")
    assert_exact(results, reference(path))
    assert results["tests"].max() >= 100_000


def test_a_mistyped_input_or_task_fails_before_any_process_starts(
    small_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispatchkit.charting import ChartProcess
    from dispatchkit.errors import InputError, UsageError

    asked: list[str] = []
    monkeypatch.setattr(EmbeddedBroker, "start_soon", lambda self: asked.append("workers"))
    monkeypatch.setattr(ChartProcess, "start_soon", lambda self: asked.append("chart"))
    with pytest.raises(InputError, match="no such file"):
        run_embedded(RunSpec(input=str(tmp_path / "nope.parquet"), out=tmp_path / "o1"))
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        run_embedded(RunSpec(input=str(small_parquet), out=tmp_path / "o2", task="nope"))
    assert asked == [], f"{asked} started for a run that could not begin"
