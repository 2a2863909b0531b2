"""The command line: one clear line and a named exit code for every user mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dispatchkit.cli import main

from .conftest import assert_exact, reference


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatchkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dispatchkit: error:")
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_generate_run_report_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "d.parquet"
    gen = run_cli("generate", "--rows", "8000", "--seed", "5", "--out", str(data), "-q")
    assert gen.returncode == 0, gen.stderr
    run = run_cli("run", str(data), "--out", str(tmp_path / "out"), "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert "complete" in run.stdout and "8,000 read" in run.stdout
    results = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert_exact(results, reference(data))
    rep = run_cli("report", str(tmp_path / "out" / "results.csv"), "--out", str(tmp_path / "r.png"))
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_every_subcommand_has_help_with_examples() -> None:
    for cmd in ("generate", "run", "report"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0
        assert "examples:" in proc.stdout


def test_missing_input(tmp_path: Path) -> None:
    one_line_error(
        run_cli("run", str(tmp_path / "nope.parquet"), "--out", str(tmp_path)),
        2,
        "no such file or directory",
    )


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.parquet").write_bytes(b"")
    one_line_error(
        run_cli("run", str(tmp_path / "e.parquet"), "--out", str(tmp_path)), 2, "file is empty"
    )


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "c.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 50)
    one_line_error(
        run_cli("run", str(tmp_path / "c.parquet"), "--out", str(tmp_path)),
        2,
        "not a readable Parquet file",
    )


def test_missing_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"country": ["Italy"], "when": ["2020-05-01"]}), tmp_path / "m.parquet")
    one_line_error(
        run_cli("run", str(tmp_path / "m.parquet"), "--out", str(tmp_path)),
        2,
        "missing column(s) test_datetime, result",
    )


def test_csv_with_wrong_delimiter(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text(
        "country;test_datetime;result\nItaly;2020-05-01T00:00:00Z;pos\n"
    )
    one_line_error(
        run_cli("run", str(tmp_path / "s.csv"), "--out", str(tmp_path)), 2, "not comma-separated"
    )


def test_csv_with_wrong_header(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("land,time,outcome\nItaly,2020-05-01T00:00:00Z,pos\n")
    one_line_error(
        run_cli("run", str(tmp_path / "h.csv"), "--out", str(tmp_path)),
        2,
        "missing column(s) country, test_datetime, result",
    )


def test_directory_without_inputs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(
        run_cli("run", str(tmp_path), "--out", str(tmp_path / "o")),
        2,
        "holds no .parquet or .csv files",
    )


def test_unknown_flag_and_bad_values() -> None:
    proc = run_cli("run", "--frobnicate")
    assert proc.returncode == 2 and "unrecognized arguments: --frobnicate" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("generate", "--rows", "-5", "--out", "x.parquet")
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr
    proc = run_cli("generate", "--rows", "10", "--out", "x.txt")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("value", "needle"), [("3x", "is not a size like 256MB"), ("32MB", "too small (at least 64MB)")]
)
def test_a_bad_sort_memory_is_one_line(
    value: str, needle: str, small_parquet: Path, tmp_path: Path
) -> None:
    proc = run_cli("run", str(small_parquet), "--out", str(tmp_path), "--sort-memory", value)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "results.parquet").exists()


def test_a_run_under_the_smallest_sort_memory_spills_and_stays_exact(tmp_path: Path) -> None:
    from dispatchkit.apps.covid.generate import GenerateSpec, generate

    data = tmp_path / "d.parquet"
    generate(GenerateSpec(rows=600_000, seed=11), data)
    out = tmp_path / "out"
    run = run_cli("run", str(data), "--out", str(out), "--sort-memory", "64MiB", "--no-report")
    assert run.returncode == 0, run.stderr
    assert "complete" in run.stdout
    assert_exact(pl.read_parquet(out / "results.parquet"), reference(data))


def test_unknown_task(small_parquet: Path, tmp_path: Path) -> None:
    one_line_error(
        run_cli("run", str(small_parquet), "--out", str(tmp_path), "--task", "nope"),
        2,
        "unknown task 'nope'",
    )


def test_run_id_reused_for_other_input(
    small_parquet: Path, small_csv: Path, tmp_path: Path
) -> None:
    assert main(["run", str(small_parquet), "--out", str(tmp_path), "--run-id", "x", "-q"]) == 0
    one_line_error(
        run_cli("run", str(small_csv), "--out", str(tmp_path), "--run-id", "x"),
        1,
        "was made from different input",
    )


@pytest.mark.parametrize("argv", [["--version"]])
def test_version(argv: list[str]) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 0 and "dispatchkit 0." in proc.stdout


def test_run_of_several_csv_files_by_glob_and_by_directory(tmp_path: Path) -> None:
    """Two or more CSV files (the `run --help` example) run, with row numbers per file."""
    d = tmp_path / "data"
    d.mkdir()
    head = "country,test_datetime,result\n"
    (d / "a.csv").write_text(
        head + "".join(f"Italy,2020-03-01T05:{i:02d}:00Z,positive\n" for i in range(40))
    )
    (d / "b.csv").write_text(
        head
        + "".join(f"Spain,2020-03-02T07:{i:02d}:00Z,negative\n" for i in range(30))
        + "Spain,2020-03-02T07:00:00Z,maybe\n"  # row 31 of b.csv
    )
    (d / "c.csv").write_text(
        head + "Chile,yesterday,positive\n" + "Chile,2020-03-03T01:00:00Z,positive\n"
    )
    for source in (f"{d}/*.csv", str(d)):
        out = tmp_path / ("glob" if "*" in source else "dir")
        proc = run_cli("run", source, "--out", str(out), "--workers", "2")
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "73 read, 71 valid, 2 quarantined" in proc.stdout
        results = pl.read_parquet(out / "results.parquet").sort("country")
        assert results.select("country", "tests").rows() == [
            ("Chile", 1),
            ("Italy", 40),
            ("Spain", 30),
        ]
        q = pl.read_csv(out / "quarantine.csv")
        assert q.select("file", "row").rows() == [(str(d / "b.csv"), 31), (str(d / "c.csv"), 1)]
