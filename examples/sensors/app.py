"""A least-squares linear trend per (sensor, UTC hour).

Every input row is one reading: a ``sensor`` name (trimmed; empty names are invalid),
when it was taken (``ts``) and its ``value`` (NaN is invalid). A job is every reading
of one sensor in one UTC hour; its result is the ordinary least-squares line
``value = intercept + slope * x``, where ``x`` is the time since the start of the hour
in hours (0 <= x < 1), with the coefficient of determination ``r2`` and the number of
readings ``n``.

Degenerate fits follow SQL's ``regr_slope`` / ``regr_intercept`` / ``regr_r2``: with
fewer than two distinct times the line is undefined (all three null); when every value
is the same, ``r2`` is 1.

The fit is computed from centered moments (means, and sums of squared and crossed
deviations), which merge exactly across parts (Chan et al.'s pairwise update), so a hot
sensor-hour bigger than one message is taken in parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

import dispatchkit as dk

Floats = npt.NDArray[np.float64]
NS_PER_HOUR = 3_600_000_000_000
_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}

app = dk.App("sensors", version="1")
app.columns(
    sensor=dk.Text(max_bytes=64),
    ts=dk.Timestamp(),
    value=dk.Float(),
)
app.key("sensor", dk.floor("ts", "hour", name="hour"))

RESULT = {
    "slope": pa.float64(),
    "intercept": pa.float64(),
    "r2": pa.float64(),
    "n": pa.int64(),
}
STATE = {
    "n": pa.int64(),
    "mean_x": pa.float64(),
    "mean_y": pa.float64(),
    "sxx": pa.float64(),
    "syy": pa.float64(),
    "sxy": pa.float64(),
}
EMPTY: dict[str, Any] = {"n": 0, "mean_x": 0.0, "mean_y": 0.0, "sxx": 0.0, "syy": 0.0, "sxy": 0.0}


def hours_into_hour(rows: pa.Table) -> Floats:
    """``x`` of each row: the time since the start of its UTC hour, in hours, in [0, 1)."""
    col = rows.column("ts")
    unit = col.type.unit if pa.types.is_timestamp(col.type) else "ns"
    ns = np.asarray(col.cast(pa.int64()).to_numpy(), dtype=np.int64) * _NS[unit]
    out: Floats = (ns % NS_PER_HOUR).astype(np.float64) / NS_PER_HOUR  # % floors: 1969 too
    return out


def _values(rows: pa.Table) -> Floats:
    return np.asarray(rows.column("value").to_numpy(), dtype=np.float64)


def moments(x: Floats, y: Floats) -> dict[str, Any]:
    """The state of one part: n, the means, and the centered sums Sxx, Syy and Sxy."""
    n = len(x)
    if n == 0:
        return dict(EMPTY)
    mx, my = float(np.mean(x)), float(np.mean(y))
    dx, dy = x - mx, y - my
    return {
        "n": n,
        "mean_x": mx,
        "mean_y": my,
        "sxx": float(np.dot(dx, dx)),
        "syy": float(np.dot(dy, dy)),
        "sxy": float(np.dot(dx, dy)),
    }


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two states into one: the pairwise update of the means and co-moments."""
    na, nb = int(a["n"]), int(b["n"])
    if nb == 0:
        return dict(a)
    if na == 0:
        return dict(b)
    n = na + nb
    dx = float(b["mean_x"]) - float(a["mean_x"])
    dy = float(b["mean_y"]) - float(a["mean_y"])
    f = na * nb / n
    return {
        "n": n,
        "mean_x": float(a["mean_x"]) + dx * nb / n,
        "mean_y": float(a["mean_y"]) + dy * nb / n,
        "sxx": float(a["sxx"]) + float(b["sxx"]) + dx * dx * f,
        "syy": float(a["syy"]) + float(b["syy"]) + dy * dy * f,
        "sxy": float(a["sxy"]) + float(b["sxy"]) + dx * dy * f,
    }


def fit(n: Any, mean_x: Any, mean_y: Any, sxx: Any, syy: Any, sxy: Any) -> tuple[Any, Any, Any]:
    """(slope, intercept, r2) from moments; NumPy arrays or floats (NaN: undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), np.nan)
        intercept = mean_y - slope * mean_x
        r2 = np.where(
            sxx > 0,
            np.where(
                syy > 0,
                sxy * sxy / (np.where(sxx > 0, sxx, 1.0) * np.where(syy > 0, syy, 1.0)),
                1.0,
            ),
            np.nan,
        )
    return slope, intercept, r2


def _or_none(v: Any) -> float | None:
    f = float(v)
    return None if np.isnan(f) else f


def finish(key: dict[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """The result row of a state."""
    slope, intercept, r2 = fit(
        *(np.float64(state[k]) for k in ("n", "mean_x", "mean_y", "sxx", "syy", "sxy"))
    )
    return {
        "slope": _or_none(slope),
        "intercept": _or_none(intercept),
        "r2": _or_none(r2),
        "n": int(state["n"]),
    }


@app.task(
    result=RESULT,
    reads=("ts", "value"),
    combine=dk.Combine(
        state=STATE,
        create=lambda: dict(EMPTY),
        add=lambda state, rows: merge(state, moments(hours_into_hour(rows), _values(rows))),
        merge=merge,
        finish=finish,
    ),
)
def trend(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
    """The least-squares line of value over the hour, its r2 and n."""
    return finish(key, moments(hours_into_hour(rows), _values(rows)))


@trend.vectorized
def trend_all(jobs: dk.Jobs) -> dict[str, Any]:
    """Every job of a message at once: segment sums of the centered values."""
    starts = jobs.offsets[:-1]
    sizes = np.diff(jobs.offsets)
    if len(sizes) == 0:
        empty = np.zeros(0, dtype=np.float64)
        return {"slope": empty, "intercept": empty, "r2": empty, "n": sizes}
    x, y = hours_into_hour(jobs.rows), _values(jobs.rows)
    mx = np.add.reduceat(x, starts) / sizes
    my = np.add.reduceat(y, starts) / sizes
    dx, dy = x - np.repeat(mx, sizes), y - np.repeat(my, sizes)
    slope, intercept, r2 = fit(
        sizes,
        mx,
        my,
        np.add.reduceat(dx * dx, starts),
        np.add.reduceat(dy * dy, starts),
        np.add.reduceat(dx * dy, starts),
    )

    def nullable(a: Floats) -> pa.Array:
        return pa.array(a, pa.float64(), mask=np.isnan(a))

    return {
        "slope": nullable(slope),
        "intercept": nullable(intercept),
        "r2": nullable(r2),
        "n": sizes,
    }
