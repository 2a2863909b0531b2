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


def test_a_failed_run_ends_the_chart_process_without_waiting_for_its_imports(
    tmp_path: Path,
) -> None:
    # An app whose chart module takes a minute to import: close(wait=False), as a run
    # that failed calls it, ends the process at once; close() would wait for the import.
    (tmp_path / "slow_chart_dk.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "slow_app.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import pyarrow as pa\n"
        "import dispatchkit as dk\n"
        "app = dk.App('slow-chart', version='1')\n"
        "app.columns(k=dk.Int(), v=dk.Int())\n"
        "app.key('k')\n"
        "@app.task(result={'n': pa.int64()})\n"
        "def count(key, rows):\n"
        "    return {'n': rows.num_rows}\n"
        "@app.chart(preload=['slow_chart_dk'])\n"
        "def chart(results, path):\n"
        "    pass\n"
    )
    app = load_app(f"{tmp_path / 'slow_app.py'}:app")
    charts = ChartProcess(app, None)
    charts.start_soon()
    if charts._starter is not None:
        charts._starter.join()
    assert charts._pool is not None
    deadline = time.monotonic() + 30
    while not charts._pool._processes and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = list(charts._pool._processes)
    assert pids, "the chart process did not start"
    time.sleep(1.0)  # well into its minute of importing
    t0 = time.monotonic()
    charts.close(wait=False)
    assert time.monotonic() - t0 < 20, "close(wait=False) waited for the chart's imports"
    assert _gone(pids), "the chart process outlived close(wait=False)"
