"""The ``overhead`` section: what dispatchkit costs per job when the job costs nothing.

Input: ``overhead_jobs`` rows of the :mod:`dispatchkit.bench.noop` app, every row its own
job (its key ``id`` is distinct). One process of its own
(``python -m dispatchkit.bench.overhead SPEC.json``), for each of the app's two tasks:

1. **dispatcher side**: the real :class:`~dispatchkit.dispatcher.Dispatcher` reads,
   validates, sorts, cuts and encodes every job message (kept in memory) — the
   dispatcher's rows/s and jobs/s on tiny jobs;
2. **worker side**: the real :meth:`dispatchkit.worker.Worker.handle` (decode, check,
   run the task, encode the results — what a worker calls per message, whatever the
   transport) over every message, timed in-process;
3. **bare function**: the no-op itself called once per job (per-job form) or once per
   message with the message's jobs (vectorized form), timed the same way.

µs per job *on top of the function* = (worker side − bare function) / jobs. ``noop`` has
only the per-job form (the worker calls it once per job and checks each row);
``noop-vectorized`` has a vectorized form (called once per message). Every result
message is decoded afterwards: each job must come back once, with its constant.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispatchkit.bench.commands import run_command, sample_of, wall
from dispatchkit.errors import RunError

if TYPE_CHECKING:
    from dispatchkit.bench.runner import Plan, _State

Row = dict[str, Any]
#: (task, tag): the per-job form and the vectorized form.
FORMS = (("noop", "per_job"), ("noop-vectorized", "vectorized"))


# -- parent side ------------------------------------------------------------------------


def _input(state: _State, jobs: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = state.config
    path = (c.data_dir or c.out / "data") / f"tiny_{jobs}.parquet"
    if not path.exists():
        state.say(f"writing {jobs:,} one-row jobs → {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.arange(jobs, dtype=np.int64)
        pq.write_table(pa.table({"id": ids, "v": np.zeros(jobs, dtype=np.int64)}), path)
    state.inputs["overhead"] = {"rows": jobs, "path": str(path), "bytes": path.stat().st_size}
    return path


def sections(state: _State) -> Iterator[tuple[str, list[Plan], int]]:
    from dispatchkit.bench.runner import Plan

    c = state.config
    path = _input(state, c.overhead_jobs)
    plan = Plan("overhead", "noop", "no-op task, one row per job", "overhead", path)
    yield "overhead", [plan], c.repeats


def _run(state: _State, plan: Plan, base: Path) -> Row:
    spec = {
        "input": str(plan.input),
        "run_dir": str(base / "run"),
        "outcome": str(base / "outcome.json"),
    }
    (base / "spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "dispatchkit.bench.overhead", str(base / "spec.json")]
    m = run_command(cmd, base / "log.txt", f"{plan.section}: {plan.label}")
    outcome = json.loads((base / "outcome.json").read_text())
    shutil.rmtree(base / "run", ignore_errors=True)
    return sample_of(
        m,
        rows=outcome["rows"],
        jobs=outcome["jobs"],
        phases=outcome["phases"],
        extra=outcome["extra"],
    )


VARIANTS: dict[str, Callable[[_State, Plan, Path], Row]] = {"overhead": _run}


def figures(row: Row) -> dict[str, float]:
    """µs per job of each form, and the dispatcher's rates, from a row's median phases."""
    p, jobs = row["phases"], row["jobs"]
    out: dict[str, float] = {}
    for _, tag in FORMS:
        out[f"{tag}_us"] = (p[f"{tag}_worker"] - p[f"{tag}_bare"]) / jobs * 1e6
        out[f"{tag}_worker_us"] = p[f"{tag}_worker"] / jobs * 1e6
        out[f"{tag}_bare_us"] = p[f"{tag}_bare"] / jobs * 1e6
    dispatch = p["per_job_prepare"] + p["per_job_dispatch"]
    out["dispatch_rows_per_s"] = row["rows"] / dispatch
    out["dispatch_jobs_per_s"] = jobs / dispatch
    out["cut_jobs_per_s"] = jobs / p["per_job_dispatch"]
    out["dispatch_us"] = dispatch / jobs * 1e6
    return out


def table(rows: list[Row]) -> list[str]:
    row = next((r for r in rows if r["section"] == "overhead"), None)
    if row is None:
        return []
    f, p = figures(row), row["phases"]
    out = [
        f"## Per-job overhead: a no-op task on {row['jobs']:,} one-row jobs, "
        f"median of {row['repeats']}",
        "",
        "| side | form | s | µs per job | µs per job on top of the function |",
        "| --- | --- | --- | --- | --- |",
        f"| dispatcher: read, validate, count | – | {p['per_job_prepare']:.2f} "
        f"| {p['per_job_prepare'] / row['jobs'] * 1e6:.2f} | – |",
        f"| dispatcher: sort, cut, encode | – | {p['per_job_dispatch']:.2f} "
        f"| {p['per_job_dispatch'] / row['jobs'] * 1e6:.2f} | – |",
    ]
    for _, tag in FORMS:
        name = tag.replace("_", "-")
        out.append(
            f"| worker: decode, task, encode | {name} | {p[f'{tag}_worker']:.2f} "
            f"| {f[f'{tag}_worker_us']:.2f} | **{f[f'{tag}_us']:.3f}** |"
        )
        out.append(
            f"| the no-op alone | {name} | {p[f'{tag}_bare']:.3f} | {f[f'{tag}_bare_us']:.3f} | – |"
        )
    out += [
        "",
        f"Dispatcher on tiny jobs: **{f['dispatch_rows_per_s']:,.0f} rows/s = "
        f"{f['dispatch_jobs_per_s']:,.0f} jobs/s** (read to encoded messages, "
        f"{row['extra'].get('messages', 0):,.0f} messages, no transport); the cut and "
        f"encode alone {f['cut_jobs_per_s']:,.0f} jobs/s. Whole process: {wall(row)} s, "
        f"largest RSS {row['peak_rss_max_mb']:,.0f} MB. Timed in one process, in-process "
        "(no transport, no store): `Worker.handle` over every job message.",
        "",
    ]
    return out


# -- child side -------------------------------------------------------------------------


def measure_forms(source: str, run_dir: Path) -> dict[str, Any]:
    """Dispatch, handle and call the bare no-op for each form; see the module docstring."""
    import numpy as np
    import pyarrow as pa

    from dispatchkit import wire
    from dispatchkit.app import Jobs, load_app
    from dispatchkit.bench.noop import SPEC
    from dispatchkit.dispatcher import Dispatcher
    from dispatchkit.runner import RunSpec, prepare
    from dispatchkit.worker import Worker

    app = load_app(SPEC)
    phases: dict[str, float] = {}
    extra: dict[str, float] = {}
    rows = jobs = 0
    for task_name, tag in FORMS:
        spec = RunSpec(
            input=source,
            out=run_dir / tag,
            run_id=f"bench-overhead-{tag}",
            task=task_name,
            workers=1,
            report=False,
            quiet=True,
            app=SPEC,
        )
        t0 = time.perf_counter()
        prep = prepare(spec, app=app)
        t1 = time.perf_counter()
        with prep.reader:
            d = Dispatcher(prep.reader, app=app, run_id=prep.run_id, task=task_name)
            payloads = [m.payload for m in d.messages()]
        t2 = time.perf_counter()
        rows, jobs = prep.counts.rows_valid, d.stats.jobs
        if jobs != rows or d.stats.rows_cut != rows:
            raise SystemExit(f"{tag}: {jobs} jobs of {rows} rows; every row must be a job")
        worker = Worker("bench-overhead", app=app)
        t3 = time.perf_counter()
        results = [worker.handle(p) for p in payloads]
        t4 = time.perf_counter()
        task = app.get_task(task_name)
        if task.vectorized_fn is None:
            fn, key, one_row = task.fn, {"id": 0}, pa.table({"v": [0]})
            t5 = time.perf_counter()
            for _ in range(jobs):
                fn(key, one_row)
            t6 = time.perf_counter()
        else:
            views = []
            for p in payloads:
                msg = wire.decode_jobs(p)
                views.append(Jobs(msg.keys(), pa.Table.from_batches([msg.table]), msg.offsets))
            vfn = task.vectorized_fn
            t5 = time.perf_counter()
            for view in views:
                vfn(view)
            t6 = time.perf_counter()
        seen: set[str] = set()
        for h in results:
            if h.failed is not None:
                raise SystemExit(f"{tag}: a job failed")
            rm = wire.decode_results(h.result)
            ones = np.asarray(rm.values().column("one").to_numpy())
            if not (ones == 1).all():
                raise SystemExit(f"{tag}: a no-op result is not 1")
            seen.update(e.job_id for e in rm.results)
        if len(seen) != jobs:
            raise SystemExit(f"{tag}: {len(seen)} distinct jobs came back of {jobs}")
        phases[f"{tag}_prepare"] = t1 - t0
        phases[f"{tag}_dispatch"] = t2 - t1
        phases[f"{tag}_worker"] = t4 - t3
        phases[f"{tag}_bare"] = t6 - t5
        extra["messages"] = float(len(payloads))
        extra[f"{tag}_bytes"] = float(sum(len(p) for p in payloads))
        del payloads, results
    return {"rows": rows, "jobs": jobs, "phases": phases, "extra": extra}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    outcome = measure_forms(spec["input"], Path(spec["run_dir"]))
    Path(spec["outcome"]).write_text(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise RunError("usage: python -m dispatchkit.bench.overhead SPEC.json")
    sys.exit(main(sys.argv[1:]))
