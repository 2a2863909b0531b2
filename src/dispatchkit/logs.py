"""Log lines an operator can search: a timestamp, the level, the logger, and the run,
worker, batch and job key each line concerns — as text, or as JSON for log shippers.

The context is kept in :mod:`contextvars` (:func:`context`), so the loops set it once
per run, per worker and per batch, and every line logged meanwhile carries it. The
command line configures the ``dispatchkit`` logger (:func:`configure`) and hands the
configuration to the processes it starts through the environment
(``DISPATCHKIT_LOG_LEVEL``, ``DISPATCHKIT_LOG_FORMAT``), which :func:`configure_from_env`
reads in an embedded worker process.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Final, Literal

LogFormat = Literal["text", "json"]

#: The context fields, in the order text lines show them.
FIELDS: Final = ("run", "worker", "batch", "key")

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "dispatchkit_log_context", default=None
)

ENV_LEVEL: Final = "DISPATCHKIT_LOG_LEVEL"
ENV_FORMAT: Final = "DISPATCHKIT_LOG_FORMAT"


@contextlib.contextmanager
def context(**fields: str | None) -> Iterator[None]:
    """Add ``run=…``, ``worker=…``, ``batch=…`` or ``key=…`` to every line logged inside."""
    merged = {**current(), **{k: v for k, v in fields.items() if v}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def set_context(**fields: str | None) -> None:
    """Like :func:`context`, for the rest of this thread (a worker's id, once)."""
    _context.set({**current(), **{k: v for k, v in fields.items() if v}})


def current() -> dict[str, str]:
    """The context of lines logged here now."""
    return dict(_context.get() or {})


def _iso(created: float) -> str:
    return (
        datetime.fromtimestamp(created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class TextFormatter(logging.Formatter):
    """``2026-12-01T18:05:29.123Z WARNING dispatchkit.worker [run=r1 worker=w0] message``."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = getattr(record, "dk_context", None) or current()
        where = " ".join(f"{k}={ctx[k]}" for k in FIELDS if k in ctx)
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return (
            f"{_iso(record.created)} {record.levelname} {record.name}"
            + (f" [{where}]" if where else "")
            + f": {text}"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` and the context."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = getattr(record, "dk_context", None) or current()
        out: dict[str, object] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        out.update({k: ctx[k] for k in FIELDS if k in ctx})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: int, fmt: LogFormat = "text", *, export: bool = True) -> None:
    """Configure dispatchkit's own logger only (other libraries keep their defaults);
    ``export`` hands the configuration to child processes through the environment."""
    log = logging.getLogger("dispatchkit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(level)
    if export:
        os.environ[ENV_LEVEL] = str(level)
        os.environ[ENV_FORMAT] = fmt


def configure_from_env() -> None:
    """In a process started by a dispatchkit command: log as that command does."""
    level = os.environ.get(ENV_LEVEL)
    if level is None:
        return
    fmt: LogFormat = "json" if os.environ.get(ENV_FORMAT) == "json" else "text"
    try:
        configure(int(level), fmt, export=False)
    except ValueError:
        return
    librdkafka = logging.getLogger("dispatchkit.librdkafka")
    librdkafka.setLevel(logging.CRITICAL if int(level) >= logging.WARNING else logging.WARNING)
