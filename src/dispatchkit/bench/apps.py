"""The ``apps`` section: each example app's tasks, a whole ``dispatchkit run`` against the
app's own floor.

For every cheap task of ``examples/sales`` (``stats``, ``quantiles``) and
``examples/sensors`` (``trend``), on its generator's output (``rows`` rows, the
generator's default dirt, so the quarantine works too):

* the floor, ``python -m dispatchkit.bench.app_floors APP TASK FILE OUT``: the
  statistic as one vectorized Polars group-by with the app's validity rules as a filter
  (:mod:`dispatchkit.bench.app_floors`);
* ``dispatchkit run FILE --app examples/APP/app.py:app --task TASK --out D`` (report.png
  included when the app has a chart),

both timed from exec to exit. The run's results must equal the floor's — keys and
integer counts exactly, float statistics within a relative 1e-11 — or the benchmark
stops. The examples live in the source checkout (``examples/`` beside ``src/``), so the
section runs from a checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from dispatchkit.bench.app_floors import APP_TASKS, AppTask, compare_app_results
from dispatchkit.bench.commands import dk, input_rows, run_command, sample_of, wall
from dispatchkit.errors import RunError, UsageError

if TYPE_CHECKING:
    from dispatchkit.bench.runner import Plan, _State

Row = dict[str, Any]
BY_NAME = {at.name: at for at in APP_TASKS}


def checkout() -> Path:
    """The source checkout holding ``examples/``: the working directory, or this file's."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / "examples" / "sales" / "app.py").is_file():
            return root
    raise UsageError(
        "the apps section needs the examples of a source checkout: run from its root, "
        "or leave apps out of --sections"
    )


def app_spec(at: AppTask) -> str:
    return f"{checkout() / 'examples' / at.app / 'app.py'}:app"


def _input(state: _State, app: str, seed: int, rows: int) -> Path:
    c = state.config
    path = (c.data_dir or c.out / "data") / f"{app}_{rows}_seed{seed}.parquet"
    if not path.exists():
        state.say(f"generating {rows:,} {app} rows → {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", f"examples.{app}.generate", "--rows", str(rows)]
        cmd += ["--seed", str(seed), "--out", str(path)]
        done = subprocess.run(cmd, cwd=checkout(), capture_output=True, text=True)
        if done.returncode != 0:
            raise RunError(f"examples.{app}.generate failed: {done.stderr.strip()[-500:]}")
    state.inputs[f"apps/{app}"] = {"rows": rows, "path": str(path), "bytes": path.stat().st_size}
    return path


def sections(state: _State) -> Iterator[tuple[str, list[Plan], int]]:
    """One section per app task (``apps/sales-stats``, …): its floor, then its run."""
    from dispatchkit.bench.runner import Plan

    c = state.config
    for at in APP_TASKS:
        path = _input(state, at.app, at.seed, c.rows)
        section = f"apps/{at.name}"
        yield (
            section,
            [
                Plan(section, "floor", f"{at.name} floor", "app-floor", path, at.task),
                Plan(section, "run", f"{at.name} run", "app-run", path, at.task, workers=2),
            ],
            c.repeats,
        )


def _app_task(plan: Plan) -> AppTask:
    return BY_NAME[plan.section.removeprefix("apps/")]


def _floor(state: _State, plan: Plan, base: Path) -> Row:
    at = _app_task(plan)
    out = base / "floor"
    cmd = [sys.executable, "-m", "dispatchkit.bench.app_floors", at.app, at.task]
    m = run_command([*cmd, str(plan.input), str(out)], base / "log.txt", plan.label)
    ref = pl.read_parquet(out / "results.parquet")
    state.references[plan.section] = ref
    shutil.rmtree(out, ignore_errors=True)
    return sample_of(m, rows=input_rows(plan.input), jobs=ref.height)


def _run(state: _State, plan: Plan, base: Path) -> Row:
    at = _app_task(plan)
    out = base / "run"
    cmd = dk("run", "-q", str(plan.input), "--app", app_spec(at), "--task", at.task)
    cmd += ["--out", str(out), "--workers", str(plan.workers)]
    m = run_command(cmd, base / "log.txt", plan.label)
    results = out / "results.parquet"
    if not results.exists():
        raise RunError(f"{plan.label} wrote no {results}")
    got = pl.read_parquet(results)
    compare_app_results(got, state.references[plan.section], at, plan.label)
    shutil.rmtree(out, ignore_errors=True)
    return sample_of(m, rows=input_rows(plan.input), jobs=got.height)


VARIANTS: dict[str, Callable[[_State, Plan, Path], Row]] = {
    "app-floor": _floor,
    "app-run": _run,
}


def ratios(rows: list[Row]) -> list[tuple[AppTask, Row, Row]]:
    """(app task, floor row, run row) of every app task measured."""
    out = []
    for at in APP_TASKS:
        mine = {r["key"]: r for r in rows if r["section"] == f"apps/{at.name}"}
        if "floor" in mine and "run" in mine:
            out.append((at, mine["floor"], mine["run"]))
    return out


def table(rows: list[Row]) -> list[str]:
    measured = ratios(rows)
    if not measured:
        return []
    out = [
        f"## Example apps: whole `dispatchkit run --app` against the app's own floor, "
        f"median of {measured[0][2]['repeats']}",
        "",
        "| app / task | rows | jobs | floor s (min–max) | run s (min–max) | × floor "
        "| run largest RSS MB | run CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for at, floor, run in measured:
        out.append(
            f"| {at.app} / {at.task} | {run['rows']:,} | {run['jobs']:,} | {wall(floor)} "
            f"| {wall(run)} | {run['wall_median_s'] / floor['wall_median_s']:.2f}× "
            f"| {run['peak_rss_max_mb']:,.0f} | {run['cpu_s']:.1f} |"
        )
    out += [
        "",
        "Floor: `python -m dispatchkit.bench.app_floors APP TASK FILE OUT` (the app's rules "
        "as a filter, one Polars group-by). Run: `dispatchkit run -q FILE --app "
        "examples/APP/app.py:app --task TASK --out D --workers 2` (report.png when the "
        "app has a chart). Both exec to exit; keys and counts equal, floats within 1e-11.",
        "",
    ]
    return out
