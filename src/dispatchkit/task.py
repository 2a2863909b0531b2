"""Tasks: the pure computation a worker runs on one job.

A task turns a :class:`~dispatchkit.message.Job` into a
:class:`~dispatchkit.message.JobResult` and touches nothing else, so it can be called
and tested without any broker. Every task counts tests and positives the same way and
differs only in the interval it puts around the rate:

``positive-rate``  the 95% Wilson score interval (the default; microseconds per job);
``beta-posterior`` a 95% credible interval from Monte Carlo draws of the
                   Beta(1 + positives, 1 + negatives) posterior — deliberately CPU-heavy,
                   to show what spreading work over workers buys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dispatchkit.errors import UsageError
from dispatchkit.message import Job, JobResult
from dispatchkit.stats import wilson_interval

#: Draws per job for ``beta-posterior``.
BETA_DRAWS = 20_000

IntervalFn = Callable[[int, int, str], tuple[float, float]]


def count_positives(outcomes: bytes) -> int:
    """Positives in a packed outcome bit string (padding bits are zero)."""
    return int.from_bytes(outcomes, "big").bit_count()


def wilson(positives: int, tests: int, job_id: str) -> tuple[float, float]:
    """The Wilson interval (``job_id`` is unused: the interval is deterministic)."""
    return wilson_interval(positives, tests)


def beta_posterior(positives: int, tests: int, job_id: str) -> tuple[float, float]:
    """A Monte Carlo 95% credible interval, seeded by the job id so reruns agree."""
    seed = int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8).digest(), "big")
    rng = np.random.default_rng(seed)
    draws = rng.beta(1 + positives, 1 + tests - positives, size=BETA_DRAWS)
    low, high = np.quantile(draws, [0.025, 0.975])
    return (float(low), float(high))


@dataclass(frozen=True)
class Task:
    """A named way to compute a job's result."""

    name: str
    interval: IntervalFn

    def __call__(self, job: Job) -> JobResult:
        return compute(job, self.interval)

    def merge(self, job_id: str, positives: int, tests: int) -> tuple[float, float, float]:
        """Rate and interval for the summed parts of a split job."""
        low, high = self.interval(positives, tests, job_id)
        return (positives / tests, low, high)


def compute(job: Job, interval: IntervalFn = wilson) -> JobResult:
    """The positive rate of one job (part): tests, positives, rate and interval."""
    positives = count_positives(job.outcomes)
    low, high = interval(positives, job.n, job.job_id)
    return JobResult(
        job_id=job.job_id,
        country=job.country,
        date_hour=job.date_hour,
        part=job.part,
        parts=job.parts,
        tests=job.n,
        positives=positives,
        positive_rate=positives / job.n,
        ci_low=low,
        ci_high=high,
    )


def positive_rate(job: Job) -> JobResult:
    """The default task: positive rate with its Wilson interval."""
    return compute(job, wilson)


TASKS: dict[str, Task] = {
    "positive-rate": Task("positive-rate", wilson),
    "beta-posterior": Task("beta-posterior", beta_posterior),
}


def get_task(name: str) -> Task:
    """The task called ``name``, or a :class:`UsageError` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})") from None
