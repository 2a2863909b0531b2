"""Sales per (store, UTC day).

Every input row is one sale: a ``store_id`` (an integer, 0 or more), when it happened
(``ts``) and its ``amount`` (0 or more; a negative amount, a NaN or a missing store id
sends the row to quarantine). A job is every sale of one store on one UTC day.

``quantiles``  the median and the 95th percentile of the amounts, by linear interpolation
               between the closest ranks (NumPy's default ``method="linear"``, DuckDB's
               ``quantile_cont``). Quantiles do not split into parts, so the task has no
               combine: a store-day bigger than one message is refused before the run.
``stats``      count, sum, mean and the *population* standard deviation (divisor n) of
               the amounts. It combines exactly: a part's state is its count, sum, mean
               and M2 (the sum of squared deviations from its mean), merged with Chan et
               al.'s parallel formula, so a store-day of any size is taken in parts.

Run it::

    python -m examples.sales.generate --rows 200000 --hot-rows 50000 --out data/sales.parquet
    dispatchkit run data/sales.parquet --app examples/sales/app.py:app --task stats --out out/
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

import dispatchkit as dk

Floats = npt.NDArray[np.float64]

app = dk.App("sales", version="1")
app.columns(
    store_id=dk.Int(min=0),
    ts=dk.Timestamp(),
    amount=dk.Float(min=0.0),
)
app.key("store_id", dk.floor("ts", "day", name="day"))

# -- quantiles ---------------------------------------------------------------------------

QUANTILES = {"median": 0.5, "p95": 0.95}


def quantile_linear(
    values: Floats, starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64], q: float
) -> Floats:
    """The ``q`` quantile of each segment ``values[start:start + size]``, already sorted.

    Linear interpolation between the closest ranks: at position ``h = q * (size - 1)``,
    ``v[floor(h)] + (v[floor(h) + 1] - v[floor(h)]) * (h - floor(h))``.
    """
    h = q * (sizes - 1).astype(np.float64)
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, sizes - 1)
    a = values[starts + lo]
    b = values[starts + hi]
    out: Floats = a + (b - a) * (h - lo)
    return out


def _amounts(rows: pa.Table) -> Floats:
    return np.asarray(rows.column("amount").to_numpy(), dtype=np.float64)


@app.task(result={"median": pa.float64(), "p95": pa.float64()}, reads=("amount",))
def quantiles(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
    """The median and p95 of one store-day's amounts (linear interpolation)."""
    values = np.sort(_amounts(rows))
    starts = np.zeros(1, dtype=np.int64)
    sizes = np.array([len(values)], dtype=np.int64)
    return {
        name: float(quantile_linear(values, starts, sizes, q)[0]) for name, q in QUANTILES.items()
    }


@quantiles.vectorized
def quantiles_all(jobs: dk.Jobs) -> dict[str, Any]:
    """Every job of a message at once: one sort by (job, amount), then index arithmetic."""
    offsets = jobs.offsets
    sizes = np.diff(offsets)
    values = _amounts(jobs.rows)
    job = np.repeat(np.arange(len(sizes)), sizes)
    ordered = values[np.lexsort((values, job))]
    starts = offsets[:-1]
    return {name: quantile_linear(ordered, starts, sizes, q) for name, q in QUANTILES.items()}


# -- stats -------------------------------------------------------------------------------

STATS = {"count": pa.int64(), "sum": pa.float64(), "mean": pa.float64(), "std": pa.float64()}
STATE = {"count": pa.int64(), "sum": pa.float64(), "mean": pa.float64(), "m2": pa.float64()}
EMPTY: dict[str, Any] = {"count": 0, "sum": 0.0, "mean": 0.0, "m2": 0.0}


def moments(values: Floats) -> dict[str, Any]:
    """A state of one part: count, sum, mean and M2 (two passes over the values)."""
    n = len(values)
    if n == 0:
        return dict(EMPTY)
    total = float(np.sum(values))
    mean = total / n
    m2 = float(np.sum(np.square(values - mean)))
    return {"count": n, "sum": total, "mean": mean, "m2": m2}


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two states into one (Chan, Golub and LeVeque's pairwise update of mean and M2)."""
    na, nb = int(a["count"]), int(b["count"])
    if nb == 0:
        return dict(a)
    if na == 0:
        return dict(b)
    n = na + nb
    delta = float(b["mean"]) - float(a["mean"])
    return {
        "count": n,
        "sum": float(a["sum"]) + float(b["sum"]),
        "mean": float(a["mean"]) + delta * nb / n,
        "m2": float(a["m2"]) + float(b["m2"]) + delta * delta * na * nb / n,
    }


def finish(key: dict[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """The result row: the mean is sum / count, the std is sqrt(M2 / count) (population)."""
    n = int(state["count"])
    return {
        "count": n,
        "sum": float(state["sum"]),
        "mean": float(state["sum"]) / n,
        "std": math.sqrt(max(float(state["m2"]), 0.0) / n),
    }


@app.task(
    result=STATS,
    reads=("amount",),
    combine=dk.Combine(
        state=STATE,
        create=lambda: dict(EMPTY),
        add=lambda state, rows: merge(state, moments(_amounts(rows))),
        merge=merge,
        finish=finish,
    ),
)
def stats(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
    """Count, sum, mean and population std of one store-day's amounts."""
    return finish(key, moments(_amounts(rows)))


@app.chart
def chart(results: pa.Table, path: Path) -> None:
    """The daily takings of the (up to) eight busiest stores (``stats``), or their
    median sale (``quantiles``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = "sum" if "sum" in results.column_names else "median"
    stores = np.asarray(results.column("store_id").to_numpy(), dtype=np.int64)
    days = results.column("day").to_pylist()
    values = np.asarray(results.column(column).to_numpy(), dtype=np.float64)
    busiest = sorted(set(stores.tolist()), key=lambda s: -values[stores == s].sum())[:8]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for store in busiest:
        idx = np.flatnonzero(stores == store)
        idx = idx[np.argsort([days[i] for i in idx])]
        ax.plot([days[i] for i in idx], values[idx], marker=".", label=f"store {store}")
    ax.set_title(f"sales: daily {column} per store")
    ax.set_ylabel(column)
    if len(values) and values.max() > 20 * max(float(np.median(values)), 1e-9):
        ax.set_yscale("log")  # a hot store-day would flatten every other line
    ax.legend(fontsize="small", ncol=2)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
