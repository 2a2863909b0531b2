"""The built-in example: the positive rate of COVID-19 tests per (country, UTC hour).

Every row is one test: who was tested where (``country``), when (``test_datetime``, in
the run's range ``[--start, --end)``) and with what ``result``. A job is every test of
one country in one hour; its result is the count of tests and positives, the positive
rate and a 95% interval around it:

``positive-rate``  the Wilson score interval (microseconds per job; vectorized);
``beta-posterior`` a credible interval from Monte Carlo draws of the
                   Beta(1 + positives, 1 + negatives) posterior — deliberately CPU-heavy,
                   to show what spreading work over workers buys.

Both combine split parts exactly: a part's state is its (tests, positives) counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

import dispatchkit as dk
from dispatchkit.apps.covid.stats import wilson_arrays, wilson_interval
from dispatchkit.arrays import to_numpy
from dispatchkit.keys import key_text

#: Accepted spellings of a result, compared after trimming and lower-casing.
POSITIVE = ("positive", "pos", "p", "+", "1", "true", "yes", "detected")
NEGATIVE = ("negative", "neg", "n", "-", "0", "false", "no", "not detected")
#: Draws per job for ``beta-posterior``.
BETA_DRAWS = 20_000

RESULT = {
    "tests": pa.int64(),
    "positives": pa.int64(),
    "positive_rate": pa.float64(),
    "ci_low": pa.float64(),
    "ci_high": pa.float64(),
}
STATE = {"tests": pa.int64(), "positives": pa.int64()}

app = dk.App("covid", version="2")
app.columns(
    country=dk.Text(max_bytes=1024),
    test_datetime=dk.Timestamp(min="2020-03-01", max="2021-01-01", run_range=True),
    result=dk.Bool(true=POSITIVE, false=NEGATIVE),
)
app.key("country", dk.floor("test_datetime", "hour", name="date_hour"))

Interval = Callable[[int, int, dict[str, Any]], tuple[float, float]]


def _positives(rows: pa.Table) -> int:
    import pyarrow.compute as pc  # here: the vectorized form does without it

    return int(pc.sum(rows["result"]).as_py() or 0)


def _counts(rows: pa.Table) -> dict[str, int]:
    return {"tests": rows.num_rows, "positives": _positives(rows)}


def _rate(interval: Interval) -> Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]]:
    def finish(key: dict[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
        tests, positives = int(state["tests"]), int(state["positives"])
        low, high = interval(positives, tests, key)
        return {
            "tests": tests,
            "positives": positives,
            "positive_rate": positives / tests,
            "ci_low": low,
            "ci_high": high,
        }

    return finish


def _combine(interval: Interval) -> dk.Combine:
    return dk.Combine(
        state=STATE,
        create=lambda: {"tests": 0, "positives": 0},
        add=lambda s, rows: {
            "tests": s["tests"] + rows.num_rows,
            "positives": s["positives"] + _positives(rows),
        },
        merge=lambda a, b: {
            "tests": a["tests"] + b["tests"],
            "positives": a["positives"] + b["positives"],
        },
        finish=_rate(interval),
    )


def wilson(positives: int, tests: int, key: dict[str, Any]) -> tuple[float, float]:
    """The Wilson interval (the key is unused: the interval is deterministic)."""
    return wilson_interval(positives, tests)


def beta(positives: int, tests: int, key: dict[str, Any]) -> tuple[float, float]:
    """A Monte Carlo 95% credible interval, seeded by the job's key so reruns agree."""
    digest = hashlib.blake2b(key_text(key).encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "big"))
    draws = rng.beta(1 + positives, 1 + tests - positives, size=BETA_DRAWS)
    low, high = np.quantile(draws, [0.025, 0.975])
    return (float(low), float(high))


@app.task(name="positive-rate", result=RESULT, reads=("result",), combine=_combine(wilson))
def positive_rate(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
    """Tests, positives, the positive rate and its Wilson interval."""
    return _rate(wilson)(key, _counts(rows))


@positive_rate.vectorized
def positive_rate_jobs(jobs: dk.Jobs) -> dict[str, Any]:
    """All jobs of a message at once: a cumulative sum over the packed outcomes."""
    flags = to_numpy(jobs.rows["result"]).astype(np.int64)
    cum = np.concatenate(([0], np.cumsum(flags)))
    offsets = jobs.offsets
    positives = cum[offsets[1:]] - cum[offsets[:-1]]
    tests = np.diff(offsets)
    low, high = wilson_arrays(positives, tests)
    return {
        "tests": tests,
        "positives": positives,
        "positive_rate": positives / tests,
        "ci_low": low,
        "ci_high": high,
    }


@app.task(name="beta-posterior", result=RESULT, reads=("result",), combine=_combine(beta))
def beta_posterior(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
    """Tests, positives, the positive rate and a Beta-posterior credible interval."""
    return _rate(beta)(key, _counts(rows))


@app.chart(preload=["dispatchkit.apps.covid.chart"])
def chart(results: pa.Table, path: Any) -> None:
    """Small multiples: the daily positive rate of each country with its Wilson band."""
    import polars as pl

    from dispatchkit.apps.covid.chart import plot_report

    df = pl.from_arrow(results)
    assert isinstance(df, pl.DataFrame)
    plot_report(df, path)
