"""The per-job function of the ``peers`` section, in the shapes Dask, Spark and Celery call.

Each computes one (country, hour) job's row in plain Python/pandas — tests, positives,
positive rate and :func:`~dispatchkit.apps.covid.stats.wilson_interval` — once per group,
like the pandas monolith. Kept apart from :mod:`dispatchkit.bench.peers` so a peer's
worker process (a Dask worker, a Spark Python worker, a Celery child) that unpickles or
imports them loads only this module and the Wilson interval.
"""

from __future__ import annotations

from typing import Any

from dispatchkit.apps.covid.stats import wilson_interval

#: The per-job result columns after the key.
RESULT_COLUMNS = ("tests", "positives", "positive_rate", "ci_low", "ci_high")


def job_row(results: Any) -> tuple[int, int, float, float, float]:
    """One job's result from its rows' ``result`` values (a list or a pandas Series)."""
    tests = len(results)
    positives = sum(1 for r in results if r == "positive")
    low, high = wilson_interval(positives, tests)
    return (tests, positives, positives / tests, low, high)


def dask_group(group: Any) -> Any:
    """``groupby(keys).apply``: one group's rows (a pandas DataFrame) → a Series."""
    import pandas as pd

    results = group["result"]
    tests = len(results)
    positives = int((results == "positive").sum())
    low, high = wilson_interval(positives, tests)
    return pd.Series(
        {
            "tests": tests,
            "positives": positives,
            "positive_rate": positives / tests,
            "ci_low": low,
            "ci_high": high,
        }
    )


def spark_group(group: Any) -> Any:
    """``groupBy(keys).applyInPandas``: one group's rows → a one-row pandas DataFrame."""
    import pandas as pd

    results = group["result"]
    tests = len(results)
    positives = int((results == "positive").sum())
    low, high = wilson_interval(positives, tests)
    return pd.DataFrame(
        {
            "country": [group["country"].iloc[0]],
            "date_hour": [group["date_hour"].iloc[0]],
            "tests": [tests],
            "positives": [positives],
            "positive_rate": [positives / tests],
            "ci_low": [low],
            "ci_high": [high],
        }
    )
