"""The three messages that cross the broker: job batches, result batches, run manifests.

Frozen, typed, versioned msgspec structs, encoded as MessagePack maps with the field
names below (docs/wire-format.md is the contract; any MessagePack library decodes them).
Every message carries ``v`` (the schema version) and ``kind`` (its type tag).

A *job* is one atomic unit of work: the outcomes of every test of one country in one
hour, packed one bit per test (1 = positive, most significant bit first, zero padding).
A job too large for one message is cut into ``parts`` parts; each part is computed on
its own and the store adds the parts up. A *job batch* is the transport unit: jobs of one
country and one UTC day, so that one job key always travels under one message key.

Decoders cap the size of what they are given before decoding and turn every failure into
:class:`~dispatchkit.errors.DecodeError`.
"""

from __future__ import annotations

from typing import Final, Literal, TypeVar

import msgspec

from dispatchkit.errors import DecodeError

#: Wire-format version written into every message; decoders refuse any other.
SCHEMA_VERSION: Final = 1
#: Decoders refuse larger inputs before looking inside them.
MAX_DECODE_BYTES: Final = 64 * 1024 * 1024


class Job(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One atomic job (or one part of a split job)."""

    job_id: str
    country: str
    date_hour: int  # UTC hour start, seconds since the epoch
    part: int  # 0-based
    parts: int
    n: int  # tests in this part
    outcomes: bytes  # n bits, MSB first, 1 = positive


class JobBatch(
    msgspec.Struct, frozen=True, tag="jobs", tag_field="kind", forbid_unknown_fields=True
):
    """Jobs sharing one transport key (country and UTC day)."""

    v: int
    run_id: str
    batch_id: str
    task: str
    jobs: list[Job]


class JobResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the task computed for one job part."""

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


class ResultBatch(
    msgspec.Struct, frozen=True, tag="results", tag_field="kind", forbid_unknown_fields=True
):
    """The results of one job batch, in the batch's order."""

    v: int
    run_id: str
    batch_id: str
    worker: str
    results: list[JobResult]


RunStatus = Literal["dispatching", "dispatched"]


class Manifest(
    msgspec.Struct, frozen=True, tag="manifest", tag_field="kind", forbid_unknown_fields=True
):
    """What a run holds: written when dispatch starts and again, with totals, when it ends."""

    v: int
    run_id: str
    status: RunStatus
    task: str
    input_fingerprint: str
    rows_read: int = 0
    rows_dispatched: int = 0
    rows_quarantined: int = 0
    total_jobs: int = 0
    total_parts: int = 0
    total_batches: int = 0
    created_at: float = 0.0
    #: The run's identity (:mod:`dispatchkit.identity`): every parameter that shapes its
    #: results; a rerun that differs in any of them is refused.
    identity: dict[str, str] = msgspec.field(default_factory=dict)
    #: The dispatcher that holds the run while ``dispatching`` (``host:pid:nonce``) and
    #: when it last said it is alive; a second dispatcher waits for it.
    owner: str = ""
    heartbeat_at: float = 0.0
    #: A claim taking the run over from this owner, seen dead by the claimer.
    takes_over: str = ""

    def run_identity(self) -> dict[str, str]:
        """The identity; for manifests written before identities, input and task."""
        return dict(self.identity) or {"input": self.input_fingerprint, "task": self.task}


Message = JobBatch | ResultBatch | Manifest
M = TypeVar("M", JobBatch, ResultBatch, Manifest)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder[object]] = {
    cls: msgspec.msgpack.Decoder(cls) for cls in (JobBatch, ResultBatch, Manifest)
}


def encode(message: Message) -> bytes:
    """Encode a message for the wire."""
    return _encoder.encode(message)


def decode(data: bytes, cls: type[M], *, max_bytes: int = MAX_DECODE_BYTES) -> M:
    """Decode and validate ``data`` as a ``cls``; only :class:`DecodeError` escapes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        message = _decoders[cls].decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"not a valid {cls.__name__} message: {exc}") from None
    except Exception as exc:  # msgspec raises a few others on hostile input
        raise DecodeError(f"not a valid {cls.__name__} message: {exc!r}") from None
    assert isinstance(message, cls)
    if message.v != SCHEMA_VERSION:
        raise DecodeError(
            f"unsupported {cls.__name__} schema version {message.v} "
            f"(this dispatchkit reads version {SCHEMA_VERSION})"
        )
    if isinstance(message, JobBatch):
        for job in message.jobs:
            check_job(job)
    return message


def check_job(job: Job) -> None:
    """Raise :class:`DecodeError` unless the job's fields agree with each other."""
    if not job.job_id or not job.country:
        raise DecodeError("job has an empty job_id or country")
    if job.n < 1 or job.parts < 1 or not 0 <= job.part < job.parts:
        raise DecodeError(
            f"job {job.job_id}: invalid counts n={job.n} part={job.part} parts={job.parts}"
        )
    if job.date_hour % 3600:
        raise DecodeError(f"job {job.job_id}: date_hour {job.date_hour} is not an hour start")
    if len(job.outcomes) != (job.n + 7) // 8:
        raise DecodeError(
            f"job {job.job_id}: {len(job.outcomes)} outcome bytes cannot hold {job.n} tests"
        )
    pad = 8 * len(job.outcomes) - job.n
    if pad and job.outcomes[-1] & ((1 << pad) - 1):
        raise DecodeError(f"job {job.job_id}: padding bits of the outcomes are not zero")
