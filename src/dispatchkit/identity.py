"""A run's identity: everything that changes its results.

A run id names one computation. Rerunning or resuming it is only safe when every input
to that computation is the same, so each run records its identity — in the store's run
ledger (embedded and Kafka) and in the run's manifest (Kafka) — and a rerun, resume or
collect that differs in any part of it is refused with one line naming the parameter and
both values. Parameters that change how fast a run goes but not what it computes
(``--workers``, ``--attempts``, ``--strict``, Kafka settings) are not part of it.

================== ============================================================
``input``          BLAKE2b-128 of the input files' bytes (names excluded)
``app``            the app's name (``covid``, …)
``fingerprint``    the app's version and a hash of its tasks' code
``task``           the task computing each job (``positive-rate``, …)
``key``            the job key (``country,date_hour=floor(test_datetime, hour)``)
``start``/``end``  the valid time range ``[start, end)``, ISO 8601 UTC
``max_message_bytes`` the message budget, which decides how big jobs are split
``format``         the wire-format version of the run's messages
================== ============================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

from dispatchkit.errors import RunError

#: The job key of the built-in COVID job.
JOB_KEY: Final = "country,hour"

#: What each parameter is called on the command line, for messages.
_FLAGS: Final = {
    "input": "input",
    "app": "--app",
    "fingerprint": "app fingerprint",
    "task": "--task",
    "key": "job key",
    "start": "--start",
    "end": "--end",
    "max_message_bytes": "--max-message-bytes",
    "format": "wire format",
}


def run_identity(
    *,
    fingerprint: str,
    task: str,
    start: datetime,
    end: datetime,
    max_message_bytes: int,
    key: str = JOB_KEY,
    app: str | None = None,
    app_fingerprint: str | None = None,
) -> dict[str, str]:
    """The identity of a run with these parameters, as text values (stable across versions)."""
    from dispatchkit.wire import WIRE_VERSION as SCHEMA_VERSION

    extra = {} if app is None else {"app": app, "fingerprint": app_fingerprint or ""}
    return {
        "input": fingerprint,
        **extra,
        "task": task,
        "key": key,
        "start": _iso(start),
        "end": _iso(end),
        "max_message_bytes": str(max_message_bytes),
        "format": str(SCHEMA_VERSION),
    }


def check_identity(
    run_id: str, recorded: Mapping[str, str], wanted: Mapping[str, str], *, where: str
) -> None:
    """Refuse (:class:`RunError`) unless ``wanted`` equals what the run ``recorded``.

    A parameter missing on one side (a run recorded before it existed) counts as
    different: the run cannot be shown to be the same computation.
    """
    for name in (*_FLAGS, *sorted(set(recorded) | set(wanted) - set(_FLAGS))):
        if name not in recorded and name not in wanted:
            continue
        old, new = recorded.get(name, "(not recorded)"), wanted.get(name, "(not given)")
        if old != new and name == "input":
            raise RunError(
                f"run {run_id!r} was {where} from different input ({_show(name, old)}; this "
                f"input has {_show(name, new)}): choose another --run-id"
            )
        if old != new:
            flag = _FLAGS.get(name, name)
            raise RunError(
                f"run {run_id!r} was {where} with {flag} {_show(name, old)}, not "
                f"{_show(name, new)}: rerun it with the same {flag}, or choose another --run-id"
            )


def dumps(identity: Mapping[str, str]) -> str:
    return json.dumps(dict(identity), sort_keys=True, separators=(",", ":"))


def loads(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    value = json.loads(text)
    return {str(k): str(v) for k, v in value.items()}


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _show(name: str, value: str) -> str:
    if name == "input" and len(value) > 12 and not value.startswith("("):
        return f"fingerprint {value[:12]}…"
    return repr(value) if name in ("task", "key") else value
