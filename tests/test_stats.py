import math

import numpy as np
import pytest

from dispatchkit.apps.covid.stats import wilson_arrays, wilson_interval

# Published values of the 95% Wilson score interval (z = 1.96).
KNOWN = [
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 20, 0.0089, 0.2361),
    (81, 263, 0.2553, 0.3662),
]


@pytest.mark.parametrize(("k", "n", "low", "high"), KNOWN)
def test_wilson_known_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-4)
    assert hi == pytest.approx(high, abs=5e-4)


def test_wilson_arrays_match_scalar_and_nan_for_zero_tests() -> None:
    k = np.array([0, 5, 10, 1, 81, 0])
    n = np.array([10, 10, 10, 20, 263, 0])
    lo, hi = wilson_arrays(k, n)
    for i in range(5):
        assert (lo[i], hi[i]) == pytest.approx(wilson_interval(int(k[i]), int(n[i])))
    assert math.isnan(lo[5]) and math.isnan(hi[5])


def test_wilson_contains_the_rate_and_rejects_impossible_counts() -> None:
    for k, n in [(0, 1), (1, 1), (3, 7), (999, 1000)]:
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_wilson_endpoints_solve_the_score_equation() -> None:
    """Independent check: each bound p solves (k/n - p)^2 = z^2 p (1 - p) / n."""
    z = 1.959963984540054
    for k, n in [(3, 7), (81, 263), (1, 1000), (500, 1000)]:
        for p in wilson_interval(k, n):
            assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9, abs=1e-15)
