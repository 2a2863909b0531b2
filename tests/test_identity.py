"""A run's identity: a rerun or resume that changes what the run computes is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from dispatchkit.claim import STALE_SECONDS, holder_of
from dispatchkit.message import SCHEMA_VERSION, Manifest
from dispatchkit.store import ResultStore

from .conftest import assert_exact, reference, result_message, started_store


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatchkit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--start", "2020-04-01", "--start 2020-03-01T00:00:00Z, not 2020-04-01T00:00:00Z"),
        ("--end", "2020-12-01", "--end 2021-01-01T00:00:00Z, not 2020-12-01T00:00:00Z"),
        ("--task", "beta-posterior", "--task 'positive-rate', not 'beta-posterior'"),
        ("--max-message-bytes", "20000", "--max-message-bytes 900000, not 20000"),
    ],
)
def test_rerun_with_a_changed_parameter_is_refused_in_one_line(
    small_parquet: Path, tmp_path: Path, flag: str, value: str, named: str
) -> None:
    base = ["run", str(small_parquet), "--out", str(tmp_path), "--run-id", "r", "-q"]
    assert _cli(*base).returncode == 0
    before = pl.read_parquet(tmp_path / "results.parquet")
    quarantine = (tmp_path / "quarantine.csv").read_bytes()
    refused = _cli(*base, flag, value)
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert named in lines[0], lines[0]
    # Nothing was written: results and quarantine are the first run's.
    assert pl.read_parquet(tmp_path / "results.parquet").equals(before)
    assert (tmp_path / "quarantine.csv").read_bytes() == quarantine
    assert_exact(before, reference(small_parquet))
    # The same parameters again: accepted, nothing to do.
    again = _cli(*base)
    assert again.returncode == 0, again.stderr


def test_parts_of_different_splits_never_add_up() -> None:
    """Part 0 of a one-part split plus parts 1-9 of a ten-part split is not a job of 10."""
    with ResultStore(":memory:") as store:
        started_store(store)
        store.add(result_message("r", [("j", i, 10, 5, 1) for i in range(1, 10)]))
        store.add(result_message("r", [("k", 0, 1, 7, 2)]))
        store.flush()
        assert store.jobs_done("r") == 1
        assert store.done_jobs("r") == {"k"}
        # j: once part 0 of its ten-part split arrives it is complete, and alone.
        store.add(result_message("r", [("j", 0, 10, 5, 1)]))
        store.flush()
        assert store.jobs_done("r") == 2
        results = store.results("r")
        j = results.filter(pl.col("job_id") == "j")
        assert j["tests"].to_list() == [50] and j["positives"].to_list() == [10]


def _m(status: str, owner: str, beat: float, takes_over: str = "") -> Manifest:
    return Manifest(
        v=SCHEMA_VERSION,
        run_id="r",
        status=status,  # type: ignore[arg-type]
        task="positive-rate",
        input_fingerprint="f",
        owner=owner,
        heartbeat_at=beat,
        takes_over=takes_over,
    )


def test_the_first_live_claim_holds_the_run() -> None:
    a, b = _m("dispatching", "h:1:a", 100.0), _m("dispatching", "h:2:b", 101.0)
    assert holder_of([a, b]).holder == "h:1:a"
    assert holder_of([b, a]).holder == "h:2:b"
    # A heartbeat keeps it; a claim after the holder went silent takes it.
    late = _m("dispatching", "h:2:b", 100.0 + STALE_SECONDS + 1)
    assert holder_of([a, late]).holder == "h:2:b"
    assert holder_of([a, _m("dispatching", "h:1:a", 110.0), late]).holder == "h:1:a"
    # A claim naming the holder it saw dead takes over at once.
    assert holder_of([a, _m("dispatching", "h:2:b", 101.0, "h:1:a")]).holder == "h:2:b"
    # Once dispatched, nobody holds it and the dispatched manifest is kept.
    done = _m("dispatched", "h:1:a", 120.0)
    held = holder_of([a, done, b])
    assert held.dispatched is done and held.latest is b
