"""The ``overhead`` section's app: every row its own job, and a task that does nothing.

Columns ``id`` (the key: one job per distinct id) and ``v`` (the one column the tasks
read). ``noop`` has only the per-job form and returns a constant row; ``noop-vectorized``
has a vectorized form too (the one a worker uses), returning constant columns. Whatever
the worker spends beyond calling these is dispatchkit's per-job overhead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

import dispatchkit as dk

SPEC = "dispatchkit.bench.noop:app"
ONE: dict[str, Any] = {"one": 1}

app = dk.App("bench-noop", version="1")
app.columns(id=dk.Int(), v=dk.Int())
app.key("id")


@app.task(result={"one": pa.int64()}, reads=("v",))
def noop(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
    """Nothing: a constant row."""
    return ONE


@app.task(name="noop-vectorized", result={"one": pa.int64()}, reads=("v",))
def noop_vectorized(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
    """Nothing: a constant row (the worker uses the vectorized form below)."""
    return ONE


@noop_vectorized.vectorized
def noop_all(jobs: dk.Jobs) -> dict[str, Any]:
    """Nothing for every job of a message: a constant column."""
    return {"one": np.ones(len(jobs), dtype=np.int64)}
