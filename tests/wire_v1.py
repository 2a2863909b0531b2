"""Wire format v1 (before Arrow bodies), for the tests that check it is refused and that
measure v2 against it: its job and result batches, as msgspec structs."""

from __future__ import annotations

import msgspec

V1: int = 1


class Job(msgspec.Struct, frozen=True):
    job_id: str
    country: str
    date_hour: int  # UTC hour start, seconds since the epoch
    part: int
    parts: int
    n: int
    outcomes: bytes  # n bits, MSB first, 1 = positive


class JobBatch(msgspec.Struct, frozen=True, tag="jobs", tag_field="kind"):
    v: int
    run_id: str
    batch_id: str
    task: str
    jobs: list[Job]


class JobResult(msgspec.Struct, frozen=True):
    job_id: str
    country: str
    date_hour: int
    part: int
    parts: int
    tests: int
    positives: int
    positive_rate: float
    ci_low: float
    ci_high: float


class ResultBatch(msgspec.Struct, frozen=True, tag="results", tag_field="kind"):
    v: int
    run_id: str
    batch_id: str
    worker: str
    results: list[JobResult]


def encode(message: JobBatch | ResultBatch) -> bytes:
    return msgspec.msgpack.encode(message)
