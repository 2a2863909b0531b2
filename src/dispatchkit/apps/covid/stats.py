"""Statistics shared by the task, the store and the report: the Wilson score interval.

Pure functions, scalar and vectorized, with no I/O. The scalar form runs once per job in
the worker; the vectorized form recomputes intervals after merging split jobs and after
summing hours into days for the chart.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

#: z for a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(positives: int, tests: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for ``positives`` successes out of ``tests`` trials.

    Returns ``(nan, nan)`` for zero trials: there is no rate to bound.
    """
    if tests < 0 or positives < 0 or positives > tests:
        raise ValueError(f"need 0 <= positives <= tests, got {positives} of {tests}")
    if tests == 0:
        return (math.nan, math.nan)
    p = positives / tests
    z2 = z * z
    denom = 1.0 + z2 / tests
    centre = (p + z2 / (2.0 * tests)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / tests + z2 / (4.0 * tests * tests))
    # At 0 or n positives a bound is exactly 0 or 1; rounding must not move it inside.
    low = 0.0 if positives == 0 else max(0.0, centre - half)
    high = 1.0 if positives == tests else min(1.0, centre + half)
    return (low, high)


def wilson_arrays(
    positives: npt.ArrayLike, tests: npt.ArrayLike, z: float = Z95
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Vectorized :func:`wilson_interval`; NaN where ``tests`` is zero."""
    k = np.asarray(positives, dtype=np.float64)
    n = np.asarray(tests, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        z2 = z * z
        denom = 1.0 + z2 / n
        centre = (p + z2 / (2.0 * n)) / denom
        half = (z / denom) * np.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
        low = np.clip(centre - half, 0.0, 1.0)
        high = np.clip(centre + half, 0.0, 1.0)
    low[k == 0] = 0.0
    high[k == n] = 1.0
    low[n == 0] = np.nan
    high[n == 0] = np.nan
    return low, high
