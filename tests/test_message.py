import contextlib

import msgpack
import numpy as np
import pytest
from dispatchkit.task import positive_rate
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchkit.errors import DecodeError
from dispatchkit.message import (
    SCHEMA_VERSION,
    Job,
    JobBatch,
    JobResult,
    Manifest,
    ResultBatch,
    decode,
    encode,
)


def make_job(bits: list[int], job_id: str = "j1", hour: int = 1583038800) -> Job:
    arr = np.array(bits, dtype=bool)
    return Job(job_id, "Italy", hour, 0, 1, len(bits), np.packbits(arr).tobytes())


def test_round_trip_of_every_message() -> None:
    batch = JobBatch(SCHEMA_VERSION, "r", "b", "positive-rate", [make_job([1, 0, 1])])
    assert decode(encode(batch), JobBatch) == batch
    res = ResultBatch(SCHEMA_VERSION, "r", "b", "w", [positive_rate(batch.jobs[0])])
    assert decode(encode(res), ResultBatch) == res
    man = Manifest(SCHEMA_VERSION, "r", "dispatched", "positive-rate", "fp", total_jobs=3)
    assert decode(encode(man), Manifest) == man


def test_plain_msgpack_reads_the_documented_fields() -> None:
    """Another client needs only a MessagePack library and docs/wire-format.md."""
    batch = JobBatch(SCHEMA_VERSION, "run-1", "b", "positive-rate", [make_job([1, 1, 0, 0, 1])])
    raw = msgpack.unpackb(encode(batch))
    assert raw["kind"] == "jobs" and raw["v"] == 1 and raw["run_id"] == "run-1"
    job = raw["jobs"][0]
    bits = np.unpackbits(np.frombuffer(job["outcomes"], np.uint8))[: job["n"]]
    assert bits.tolist() == [1, 1, 0, 0, 1]
    assert job["date_hour"] == 1583038800 and job["country"] == "Italy"


def test_task_counts_tests_and_positives() -> None:
    bits = [1] * 7 + [0] * 13
    result = positive_rate(make_job(bits))
    assert isinstance(result, JobResult)
    assert (result.tests, result.positives) == (20, 7)
    assert result.positive_rate == pytest.approx(0.35)
    assert result.ci_low < 0.35 < result.ci_high


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\xc1garbage", "not a valid JobBatch"),
        (
            msgpack.packb(
                {"v": 2, "kind": "jobs", "run_id": "r", "batch_id": "b", "task": "t", "jobs": []}
            ),
            "schema version 2",
        ),
        (msgpack.packb({"kind": "results"}), "not a valid JobBatch"),
    ],
)
def test_bad_bytes_raise_decode_error(data: bytes, needle: str) -> None:
    with pytest.raises(DecodeError, match=needle):
        decode(data, JobBatch)


def test_invalid_fields_in_a_valid_envelope_are_refused() -> None:
    bad = JobBatch(
        SCHEMA_VERSION,
        "r",
        "b",
        "positive-rate",
        [Job("j", "Italy", 1583038800, 0, 1, 20, b"\xff")],
    )
    with pytest.raises(DecodeError, match="cannot hold 20 tests"):
        decode(encode(bad), JobBatch)
    pad = JobBatch(
        SCHEMA_VERSION, "r", "b", "positive-rate", [Job("j", "Italy", 1583038800, 0, 1, 3, b"\xff")]
    )
    with pytest.raises(DecodeError, match="padding"):
        decode(encode(pad), JobBatch)


def test_size_is_capped_before_decoding() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        decode(b"\x00" * 101, JobBatch, max_bytes=100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    for cls in (JobBatch, ResultBatch, Manifest):
        with contextlib.suppress(DecodeError):
            decode(data, cls)
