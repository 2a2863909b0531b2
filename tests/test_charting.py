"""Tests for dispatchkit.charting: the chart process, its twin, and that both go away."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from dispatchkit.app import load_app
from dispatchkit.charting import ChartProcess, draw, twin
from tests.test_report import wavy_results


def _gone(pids: list[int], within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_the_chart_process_draws_with_its_twin_and_both_end_with_it(tmp_path: Path) -> None:
    app = load_app(None)  # the COVID app, whose chart draws its lower rows in the twin
    results = wavy_results(20, days=40).to_arrow()
    charts = ChartProcess(app, None)
    charts.start_soon()
    try:
        charts.submit(results, tmp_path / "warm.png", []).wait()  # ready, twin forked
        assert charts._pool is not None
        (chart,) = (psutil.Process(pid) for pid in charts._pool._processes)
        (helper,) = chart.children()  # the twin
        pids = [chart.pid, helper.pid]

        charts.submit(results, tmp_path / "report.png", []).wait()
    finally:
        closing = threading.Thread(target=charts.close, daemon=True)
        closing.start()
        closing.join(timeout=60)
        if closing.is_alive():  # a hang at exit: end it, then fail
            for k in psutil.Process().children(recursive=True):
                k.kill()
    assert not closing.is_alive(), "the chart process did not exit"
    assert _gone(pids), "the chart process or its twin outlived close()"

    assert twin() is None  # not in this process
    draw(app, results, tmp_path / "here.png", [])  # one process, no twin
    assert (tmp_path / "report.png").read_bytes() == (tmp_path / "here.png").read_bytes()
