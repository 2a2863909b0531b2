"""``dispatchkit check``: what an app declares, and whether its task forms agree on a sample.

For every key of a sample input (read and validated as a run would), each task is run
per job; its vectorized form, when it has one, must give the same rows; and a task with
a combine step must give the same row when the job is split into three parts
(``finish(merge(add(create(), part) …))``). Integers, text, booleans and times must be
equal; floats equal to a relative 1e-9 (a combine adds in another order than one pass).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from dispatchkit.app import App, Jobs, Task
from dispatchkit.keys import key_text
from dispatchkit.reader import InputReader, resolve_inputs

REL_TOLERANCE = 1e-9


@dataclass
class TaskCheck:
    task: str
    jobs: int = 0
    split_jobs: int = 0
    problems: list[str] = field(default_factory=list)


def describe(app: App) -> list[str]:
    """The app's declarations, one line each."""
    lines = [f"app {app.name} {app.fingerprint}" + (f" ({app.spec})" if app.spec else "")]
    for name, col in app.input_columns.items():
        lines.append(f"  column {name}: {col!r}")
    ks = app.keyspec
    key = ", ".join(f"{n} {t}" for n, t in zip(ks.names, ks.types, strict=True))
    lines.append(f"  key ({key})")
    for task in app.tasks.values():
        forms = ["per job"] + (["vectorized"] if task.vectorized_fn else [])
        forms += ["combine"] if task.combine else []
        result = ", ".join(f"{f.name} {f.type}" for f in task.result)
        lines.append(f"  task {task.name} [{', '.join(forms)}] reads {', '.join(task.reads)}")
        lines.append(f"    result ({result})")
        if task.combine is not None:
            state = ", ".join(f"{f.name} {f.type}" for f in task.combine.schema)
            lines.append(f"    state ({state})")
    lines.append(f"  chart: {'yes' if app.chart_fn else 'none (report has nothing to draw)'}")
    return lines


def check_app(app: App, sample: str, work_dir: Path) -> list[TaskCheck]:
    """Run every task of ``app`` on every key of ``sample`` in each of its forms."""
    paths = resolve_inputs(sample)
    checks = []
    with InputReader(paths, app, spill_dir=work_dir) as reader:
        for task in app.tasks.values():
            check = TaskCheck(task.name)
            for jobs in _jobs(reader, app, task):
                _check_jobs(task, jobs, check)
            checks.append(check)
    return checks


def _jobs(reader: InputReader, app: App, task: Task) -> Iterator[Jobs]:
    """The sample's jobs, whole, one record batch at a time."""
    names = list(app.keyspec.names)
    carry: pa.Table | None = None
    for batch in reader.sorted_valid(task.reads):
        table = pa.Table.from_batches([batch])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        keys = table.select(names).to_pylist()
        starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
        carry = table.slice(starts[-1])
        if len(starts) > 1:
            yield _as_jobs(table.slice(0, starts[-1]), names, starts[:-1], task)
    if carry is not None and carry.num_rows:
        yield _as_jobs(carry, names, [0], task)


def _as_jobs(table: pa.Table, names: list[str], starts: list[int], task: Task) -> Jobs:
    import numpy as np

    offsets = np.array([*starts, table.num_rows], dtype=np.int64)
    keys = table.select(names).take(pa.array(starts, pa.int64()))
    return Jobs(keys=keys, rows=table.select(list(task.reads)), offsets=offsets)


def _check_jobs(task: Task, jobs: Jobs, check: TaskCheck) -> None:
    per_job = [task.run_one(key, rows) for key, rows in jobs]
    check.jobs += len(per_job)
    if task.vectorized_fn is not None:
        vector = task.run_jobs(jobs).to_pylist()
        for (key, _), a, b in zip(jobs, per_job, vector, strict=True):
            if (why := _differs(a, b)) is not None:
                check.problems.append(f"{key_text(key)}: vectorized form differs: {why}")
    if task.combine is None:
        return
    for (key, rows), whole in zip(jobs, per_job, strict=True):
        if rows.num_rows < 2:
            continue
        cut = [0, rows.num_rows // 3, 2 * rows.num_rows // 3, rows.num_rows]
        parts = [rows.slice(a, b - a) for a, b in itertools.pairwise(cut) if b > a]
        check.split_jobs += 1
        merged = task.finish_states(key, [task.part_state(p) for p in parts])
        if (why := _differs(whole, merged)) is not None:
            check.problems.append(f"{key_text(key)}: split in {len(parts)} parts: {why}")


def _differs(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for name, x in a.items():
        y = b.get(name)
        if isinstance(x, float) and isinstance(y, float):
            if math.isnan(x) and math.isnan(y):
                continue
            if math.isclose(x, y, rel_tol=REL_TOLERANCE, abs_tol=1e-12):
                continue
        elif x == y:
            continue
        return f"{name} {x!r} != {y!r}"
    return None
