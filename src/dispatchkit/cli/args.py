"""Flag types and flag groups shared by the subcommands."""

from __future__ import annotations

import argparse
import os
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from dispatchkit.brokers.kafka.settings import KafkaSettings, load_settings
from dispatchkit.errors import UsageError
from dispatchkit.limits import DEFAULT_SORT_MEMORY

if TYPE_CHECKING:
    from dispatchkit.outcome import BadRowBudget


def iso_date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_bad_rows_flag(p: argparse.ArgumentParser) -> None:
    """``--max-bad-rows``: the bad-row budget of a run (:mod:`dispatchkit.outcome`)."""
    from dispatchkit.outcome import DEFAULT_MAX_BAD_ROWS

    p.add_argument(
        "--max-bad-rows",
        type=bad_row_budget,
        default=DEFAULT_MAX_BAD_ROWS,
        metavar="N|FRACTION",
        help="fail the run, after writing the quarantine, when more rows are bad than this: "
        "a number of rows (0: none) or a fraction of the rows read (0.1 or 10%%; 1.0: any)",
    )


def bad_row_budget(text: str) -> BadRowBudget:
    from dispatchkit.errors import UsageError
    from dispatchkit.outcome import BadRowBudget

    try:
        return BadRowBudget.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--max-bad-rows ")) from None


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", re.IGNORECASE)


def add_sort_memory_flag(p: argparse.ArgumentParser) -> None:
    """``--sort-memory``: the reader's DuckDB memory limit (the run's largest allocation)."""
    p.add_argument(
        "--sort-memory",
        type=memory_size,
        default=DEFAULT_SORT_MEMORY,
        metavar="SIZE",
        help="memory for reading and sorting the input, e.g. 256MB or 2GB; a bigger input "
        "spills the sort to disk under --out",
    )


def memory_size(text: str) -> str:
    """A size DuckDB's ``memory_limit`` takes (``256MB``, ``1.5GiB``), of at least 64 MB."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256MB or 2GB")
    number, unit = float(m.group(1)), m.group(2).upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    scale |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if number * scale[unit] < 64e6:  # below, reading the input alone runs out of it
        raise argparse.ArgumentTypeError(f"{text!r} is too small (at least 64MB)")
    return f"{m.group(1)}{m.group(2)}"


def add_kafka_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    k = p.add_argument_group("kafka")
    k.add_argument(
        "--bootstrap-servers",
        "-b",
        help="Kafka bootstrap servers (or $DISPATCHKIT_BOOTSTRAP_SERVERS)",
    )
    k.add_argument(
        "-X",
        dest="kafka_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any librdkafka setting, e.g. -X security.protocol=SASL_SSL",
    )
    k.add_argument(
        "--kafka-config", help="file of librdkafka key=value lines (or $DISPATCHKIT_KAFKA_CONFIG)"
    )
    k.add_argument("--topic-prefix", default="dispatchkit", help="prefix of the topic names")
    k.add_argument(
        "--partitions", type=positive_int, default=12, help="partitions of the jobs topic"
    )


def kafka_settings_from_args(args: object) -> KafkaSettings:
    """Settings from the CLI's parsed Kafka flags."""
    return load_settings(
        bootstrap_servers=getattr(args, "bootstrap_servers", None),
        options=list(getattr(args, "kafka_options", []) or []),
        config_file=getattr(args, "kafka_config", None),
        topic_prefix=getattr(args, "topic_prefix", "dispatchkit"),
        partitions=getattr(args, "partitions", 12),
    )


def add_app_flag(p: argparse.ArgumentParser) -> None:
    """``--app``: the app by import path (``module:attr`` or ``path/to/file.py:attr``)."""
    p.add_argument(
        "--app",
        default=None,
        help="the app: module:attr or path/to/file.py:attr (default: $DISPATCHKIT_APP, "
        "else the built-in COVID app dispatchkit.apps.covid:app)",
    )


def add_metrics_flag(p: argparse.ArgumentParser) -> None:
    """``--metrics-port``: Prometheus metrics and health endpoints (see docs/operations.md)."""
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve /metrics (Prometheus), /healthz/live and /healthz/ready on this port; "
        "0: off (default: $DISPATCHKIT_METRICS_PORT, else off)",
    )


def metrics_port(args: object) -> int:
    """The port ``--metrics-port`` or ``$DISPATCHKIT_METRICS_PORT`` asks for; 0: none.

    Only commands with the flag serve metrics: ``status`` or ``report`` never bind a port.
    """
    if not hasattr(args, "metrics_port"):
        return 0
    port: int | None = args.metrics_port
    if port is None:
        text = os.environ.get("DISPATCHKIT_METRICS_PORT", "").strip()
        if not text:
            return 0
        try:
            port = _port(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"$DISPATCHKIT_METRICS_PORT: {exc}") from None
    return port


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value
