"""The run manifest: what a run holds, announced by its dispatcher on the manifests topic.

A frozen, typed, versioned msgspec struct, encoded as a MessagePack map with the field
names below (docs/wire-format.md is the contract; any MessagePack library decodes it). It
carries ``v`` (its schema version) and ``kind`` (its type tag). Job and result messages
are :mod:`dispatchkit.wire`'s.

The decoder caps the size of what it is given before decoding and turns every failure
into :class:`~dispatchkit.errors.DecodeError`.
"""

from __future__ import annotations

from typing import Final, Literal, TypeVar

import msgspec

from dispatchkit.errors import DecodeError

#: Wire-format version written into every message; decoders refuse any other.
SCHEMA_VERSION: Final = 1
#: Decoders refuse larger inputs before looking inside them.
MAX_DECODE_BYTES: Final = 64 * 1024 * 1024


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


Message = Manifest
M = TypeVar("M", bound=Manifest)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder[object]] = {
    Manifest: msgspec.msgpack.Decoder(Manifest)
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
    return message
