"""Honest outcomes: failure never looks like success, for every app and both transports.

A run with no valid row, or with more bad rows than ``--max-bad-rows``, fails after the
quarantine is written; an incomplete run's summary and chart name what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pytest

from dispatchkit.apps.covid.generate import GenerateSpec, generate
from dispatchkit.errors import UsageError
from dispatchkit.outcome import BadRowBudget, missing_lines

from .conftest import assert_exact, reference
from .kafka_helpers import kafka_args, new_settings

REPO = Path(__file__).resolve().parents[1]
HEADER = "country,test_datetime,result\n"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatchkit", *args],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, **env},
    )  # fmt: skip


def error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dispatchkit: error: ")
    return lines[0]


def garbage_csv(path: Path, rows: int) -> Path:
    path.write_text(HEADER + "".join(f"Italy,not a time {i},positive\n" for i in range(rows)))
    return path


def banner(png: Path) -> bool:
    """The chart carries the INCOMPLETE banner: its top strip is much the banner's red."""
    top = mpimg.imread(str(png))[:40, :, :3]
    red = np.all(np.abs(top - (0xB0 / 255, 0x00, 0x20 / 255)) < 0.03, axis=-1)
    return bool(red.mean() > 0.02)


# -- the bad-row budget -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit"),
    [("0", 0), ("25", 25), ("0.1", 100), ("10%", 100), ("2.5%", 25), ("1.0", 1000), (".5", 500)],
)
def test_a_budget_is_a_count_or_a_fraction_of_the_rows_read(text: str, limit: int) -> None:
    assert BadRowBudget.parse(text).limit(1000) == limit


@pytest.mark.parametrize("text", ["-1", "1.5", "150%", "ten", "", "1e3"])
def test_a_budget_that_is_neither_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="--max-bad-rows"):
        BadRowBudget.parse(text)


def test_a_bad_budget_flag_is_a_usage_error(small_parquet: Path, tmp_path: Path) -> None:
    line = error_line(
        cli("run", str(small_parquet), "--out", str(tmp_path), "--max-bad-rows", "2.0"), 2
    )
    assert "--max-bad-rows" in line
    assert not (tmp_path / "results.parquet").exists()


# -- embedded ---------------------------------------------------------------------------


def test_a_run_with_no_valid_row_fails_pointing_at_the_quarantine(tmp_path: Path) -> None:
    data = garbage_csv(tmp_path / "garbage.csv", 40)
    out = tmp_path / "out"
    # Even a budget that allows every row to be bad: nothing valid is nothing to compute.
    line = error_line(cli("run", str(data), "--out", str(out), "--max-bad-rows", "1.0"), 1)
    assert "no valid row" in line and "all 40 rows read were quarantined" in line
    assert str(out / "quarantine.csv") in line
    assert pl.read_csv(out / "quarantine.csv").height == 40
    assert not (out / "results.parquet").exists()


def test_mostly_garbage_fails_after_writing_the_quarantine(tmp_path: Path) -> None:
    data = tmp_path / "mixed.csv"
    good = "".join(f"Spain,2020-03-01T05:{i:02d}:00Z,negative\n" for i in range(30))
    bad = "".join(f"Spain,2020-03-01T05:{i:02d}:00Z,maybe\n" for i in range(20))
    data.write_text(HEADER + good + bad)
    out = tmp_path / "out"
    # 20 of 50 rows bad: over the default budget (10 %) and over 19 rows, within 0.4.
    line = error_line(cli("run", str(data), "--out", str(out), "--workers", "1"), 1)
    assert "20 of 50 rows read are bad" in line and "--max-bad-rows" in line
    assert str(out / "quarantine.csv") in line
    assert pl.read_parquet(out / "quarantine.parquet")["row"].to_list() == list(range(31, 51))
    assert not (out / "results.parquet").exists()
    error_line(cli("run", str(data), "--out", str(out), "--max-bad-rows", "19"), 1)
    ok = cli("run", str(data), "--out", str(out), "--workers", "1", "--max-bad-rows", "0.4")
    assert ok.returncode == 0, ok.stderr
    assert "50 read, 30 valid, 20 quarantined" in ok.stdout
    assert pl.read_parquet(out / "results.parquet")["tests"].sum() == 30


def test_a_few_bad_rows_pass_the_default_budget(tmp_path: Path) -> None:
    data = tmp_path / "dirty.parquet"
    generate(GenerateSpec(rows=4_000, seed=3, dirty_fraction=0.05), data)
    proc = cli("run", str(data), "--out", str(tmp_path / "out"), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "quarantined" in proc.stdout and ": complete" in proc.stdout
    # ... and none at all is allowed when asked.
    error_line(cli("run", str(data), "--out", str(tmp_path / "o0"), "--max-bad-rows", "0"), 1)


def test_an_incomplete_run_names_what_is_missing_in_summary_and_chart(
    small_parquet: Path, tmp_path: Path
) -> None:
    complete = cli("run", str(small_parquet), "--out", str(tmp_path / "ok"), "--workers", "2")
    assert complete.returncode == 0, complete.stderr
    assert "INCOMPLETE" not in complete.stdout
    assert not banner(tmp_path / "ok" / "report.png")

    out = tmp_path / "out"
    proc = cli(
        "run", str(small_parquet), "--out", str(out), "--workers", "2", "--attempts", "1", "-q",
        DISPATCHKIT_TEST_FAULTS="fail:Sweden",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    ref = reference(small_parquet)
    swedish = ref.filter(pl.col("country") == "Sweden").height
    assert proc.stdout.splitlines()[0].endswith(": INCOMPLETE")
    assert f"INCOMPLETE: {swedish:,} of {ref.height:,} jobs missing" in proc.stdout
    assert f"{swedish:,} dead-lettered jobs: country=Sweden ({swedish:,} jobs)" in proc.stdout
    assert banner(out / "report.png")
    ok_image = mpimg.imread(str(tmp_path / "ok" / "report.png"))
    marked = mpimg.imread(str(out / "report.png"))
    # The app's own picture is kept whole below the banner.
    assert marked.shape[0] > ok_image.shape[0] and marked.shape[1] == ok_image.shape[1]
    # A chart redrawn from the results says so too; one of a complete run does not.
    redrawn = cli("report", str(out / "results.parquet"), "--out", str(tmp_path / "re.png"))
    assert redrawn.returncode == 0, redrawn.stderr
    assert f"INCOMPLETE: {swedish:,} of {ref.height:,} jobs missing" in redrawn.stdout
    assert banner(tmp_path / "re.png")
    # From the CSV too: the results.parquet written beside it says for it.
    from_csv = cli("report", str(out / "results.csv"), "--out", str(tmp_path / "csv.png"))
    assert from_csv.returncode == 0, from_csv.stderr
    assert f"INCOMPLETE: {swedish:,} of {ref.height:,} jobs missing" in from_csv.stdout
    assert banner(tmp_path / "csv.png")
    # A CSV on its own cannot say: the chart is drawn, and stderr says it cannot tell.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "results.csv").write_bytes((out / "results.csv").read_bytes())
    lone = cli("report", str(alone / "results.csv"), "--out", str(tmp_path / "lone.png"))
    assert lone.returncode == 0, lone.stderr
    assert "does not record whether its run was complete" in lone.stderr
    assert (tmp_path / "lone.png").exists() and not banner(tmp_path / "lone.png")
    ok_results = str(tmp_path / "ok" / "results.parquet")
    again = cli("report", ok_results, "--out", str(tmp_path / "c.png"))
    assert again.returncode == 0, again.stderr
    assert "INCOMPLETE" not in again.stdout and not banner(tmp_path / "c.png")
    # A complete run's CSV, beside its results.parquet: no banner and no warning.
    ok_csv = cli("report", str(tmp_path / "ok" / "results.csv"), "--out", str(tmp_path / "k.png"))
    assert ok_csv.returncode == 0, ok_csv.stderr
    assert "INCOMPLETE" not in ok_csv.stdout and not banner(tmp_path / "k.png")
    assert "does not record" not in ok_csv.stderr


def test_every_app_gets_the_incomplete_mark(tmp_path: Path) -> None:
    from examples.sales.generate import generate as sales
    from examples.sales.generate import write

    data = write(sales(3_000, seed=5, dirty=0.0), tmp_path / "sales.parquet")
    out = tmp_path / "out"
    args = ("run", str(data), "--app", "examples/sales/app.py:app", "--task", "quantiles")
    proc = cli(*args, "--out", str(out), "--workers", "1", "--attempts", "1", "-q",
               DISPATCHKIT_TEST_FAULTS="fail:3")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "INCOMPLETE: 14 of 280 jobs missing" in proc.stdout
    assert "14 dead-lettered jobs: store_id=3 (14 jobs)" in proc.stdout
    assert banner(out / "report.png")
    redrawn = cli("report", str(out / "results.parquet"), "--app", "examples/sales/app.py:app",
                  "--out", str(tmp_path / "re.png"))  # fmt: skip
    assert redrawn.returncode == 0, redrawn.stderr
    assert banner(tmp_path / "re.png")


def test_missing_jobs_without_dead_letters_are_counted() -> None:
    lines = missing_lines(10, 6, ["k=a: E: x", "k=b: E: y"])
    assert lines == [
        "INCOMPLETE: 4 of 10 jobs missing, no result for them",
        "2 dead-lettered jobs: k=a, k=b",
        "2 jobs not done yet (no dead letter)",
    ]


# -- Kafka ------------------------------------------------------------------------------


@pytest.mark.kafka
def test_kafka_runs_refuse_garbage_and_collect_names_what_is_missing(
    small_parquet: Path, tmp_path: Path
) -> None:
    settings = new_settings()
    kargs = kafka_args(settings)
    garbage = garbage_csv(tmp_path / "garbage.csv", 25)
    line = error_line(cli("dispatch", str(garbage), *kargs, "--out", str(tmp_path / "d")), 1)
    assert "no valid row" in line and str(tmp_path / "d" / "quarantine.csv") in line
    run = cli("run", str(garbage), "--broker", "kafka", *kargs, "--out", str(tmp_path / "r"))
    assert run.returncode == 1, run.stderr
    # The collector may have said that it waits for the dispatch; the error is the end.
    assert run.stderr.strip().splitlines()[-1].startswith("dispatchkit: error: ")
    assert "no valid row" in run.stderr and "Traceback" not in run.stderr

    d = cli("dispatch", str(small_parquet), *kargs, "--run-id", "inc", "--out", str(tmp_path))
    assert d.returncode == 0, d.stderr
    assert "rows quarantined" in d.stdout
    w = cli("worker", *kargs, "--burst", "--attempts", "1", "-q",
            DISPATCHKIT_TEST_FAULTS="fail:Sweden")  # fmt: skip
    assert w.returncode == 0, w.stderr
    c = cli("collect", *kargs, "--run-id", "inc", "--out", str(tmp_path / "c"), "--timeout", "120")
    assert c.returncode == 1, c.stderr
    ref = reference(small_parquet)
    swedish = ref.filter(pl.col("country") == "Sweden").height
    assert f"INCOMPLETE: {swedish:,} of {ref.height:,} jobs missing" in c.stdout
    assert f"country=Sweden ({swedish:,} jobs)" in c.stdout
    assert banner(tmp_path / "c" / "report.png")
    results = pl.read_parquet(tmp_path / "c" / "results.parquet")
    assert_exact(results, ref.filter(pl.col("country") != "Sweden"))
