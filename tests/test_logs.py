"""Log lines: timestamp, level, logger and the run/worker/batch context; JSON lines for
log shippers; progress lines when stderr is not a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from dispatchkit import logs
from dispatchkit.cli.progress import Bars

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("dispatchkit.worker", level, __file__, 1, msg, None, None)


def test_text_lines_carry_time_level_logger_and_context() -> None:
    with logs.context(run="r1", worker="w0"), logs.context(batch="b7"):
        line = logs.TextFormatter().format(record("job failed"))
    assert re.fullmatch(
        ISO + r" WARNING dispatchkit\.worker \[run=r1 worker=w0 batch=b7\]: job failed", line
    ), line
    # Outside the block the context is gone.
    assert "[" not in logs.TextFormatter().format(record("idle"))


def test_json_lines_parse_and_carry_the_context() -> None:
    with logs.context(run="r1", key="store_id=3 day=2024-05-01T00:00:00Z"):
        got = json.loads(logs.JsonFormatter().format(record("slow", logging.INFO)))
    assert got["level"] == "INFO" and got["logger"] == "dispatchkit.worker"
    assert got["msg"] == "slow" and got["run"] == "r1"
    assert got["key"] == "store_id=3 day=2024-05-01T00:00:00Z"
    assert re.fullmatch(ISO, got["ts"])


def test_progress_lines_when_stderr_is_not_a_terminal() -> None:
    out = io.StringIO()  # not a terminal
    bars = Bars(None, stream=out, every=0.0)
    with bars:
        bars.add("dispatch", 100, "rows")
        bars.advance("dispatch", 40)
        bars.advance("dispatch", 60)
    lines = out.getvalue().splitlines()
    assert lines and all(" INFO dispatchkit.progress: dispatch " in x for x in lines), lines
    assert "dispatch 100/100 rows" in lines[-1]
    quiet = io.StringIO()
    with Bars(False, stream=quiet) as silent:
        silent.add("dispatch", 100, "rows")
        silent.advance("dispatch", 100)
    assert quiet.getvalue() == ""


def test_run_logs_json_lines_with_the_run_id(small_parquet: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DISPATCHKIT_PROGRESS_SECONDS": "0.2"}
    args = ["run", str(small_parquet), "--out", str(tmp_path), "--workers", "1", "--no-report"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dispatchkit",
            *args,
            "-v",
            "--log-format",
            "json",
            "--run-id",
            "lj",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stderr.splitlines()]  # every line is JSON
    assert lines
    collector = [x for x in lines if x["logger"] == "dispatchkit.collector"]
    assert collector and all(x["run"] == "lj" for x in collector), collector
    assert any(x["msg"].startswith("collected: complete") for x in collector)
    progress = [x for x in lines if x["logger"] == "dispatchkit.progress"]
    assert (
        progress
        and progress[-1]["progress"]["jobs"]["done"] == (progress[-1]["progress"]["jobs"]["total"])
    ), progress[-1]
