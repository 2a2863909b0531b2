"""The ``dispatchkit`` command: parse flags, build a spec, call one library function.

Errors dispatchkit raises on purpose become one line on stderr and their exit code
(:mod:`dispatchkit.errors`); argparse's own usage errors exit 2. So do the expected
failures of the libraries underneath (DuckDB errors, OS errors on the user's paths),
Ctrl-C and SIGTERM in any phase, and a stdout closed early (``| head``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from dispatchkit import __version__
from dispatchkit.cli.args import add_kafka_flags
from dispatchkit.cli.progress import Bars
from dispatchkit.errors import (
    RET_BROKEN_PIPE,
    RET_BROKER,
    RET_FAILED,
    RET_INTERRUPTED,
    RET_TERMINATED,
    DispatchkitError,
)

log = logging.getLogger("dispatchkit")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"dispatchkit: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dispatchkit",
        description="The Dispatcher pattern for data jobs: cut a dataset into atomic jobs by "
        "key, fan them out to workers (local processes or Kafka), collect exact results.",
        formatter_class=_Formatter,
        epilog="examples:\n  dispatchkit run --out out/          # the whole job, 2M rows\n"
        "  dispatchkit generate --rows 200000 --out data/small.parquet\n"
        "  dispatchkit run data/small.parquet --out out/small --workers 2",
    )
    parser.add_argument("--version", action="version", version=f"dispatchkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, epilog: str, fn: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=_Formatter
        )
        p.set_defaults(fn=fn)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or chatter")
        p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
        p.add_argument(
            "--log-format",
            choices=["text", "json"],
            default=os.environ.get("DISPATCHKIT_LOG_FORMAT", "text"),
            help="log lines as text or as one JSON object each (for log shippers; "
            "also $DISPATCHKIT_LOG_FORMAT)",
        )
        return p

    from dispatchkit.cli.run import register as register_run

    register_run(add, add_kafka_flags)
    _add_kafka_commands(add)
    from dispatchkit.cli.bench import register as register_bench

    register_bench(add, add_kafka_flags)
    return parser


def _add_kafka_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    try:
        from dispatchkit.cli.kafka import register
    except ImportError:  # pragma: no cover - the Kafka commands ship with the package
        return
    register(add, add_kafka_flags)


def _configure_logging(verbose: int, quiet: bool, fmt: str = "text") -> None:
    """Configure dispatchkit's own logger only; other libraries keep their defaults."""
    from dispatchkit import logs

    level = logging.WARNING - 10 * verbose
    logs.configure(
        max(level, logging.ERROR) if quiet else max(level, logging.DEBUG),
        "json" if fmt == "json" else "text",
    )
    # librdkafka reports (and recovers from) transient errors; show them only with -v.
    logging.getLogger("dispatchkit.librdkafka").setLevel(
        logging.CRITICAL if verbose == 0 else logging.WARNING if verbose == 1 else logging.DEBUG
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` cleans up the same way."""


#: Called on SIGTERM/SIGINT before the command unwinds (the metrics endpoint's draining).
_on_stop: list[Callable[[], None]] = []


def _on_signal(signals: list[int]) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)
        for fn in _on_stop:
            fn()
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; every expected failure ends in one line and its exit code.

    Exit codes (:mod:`dispatchkit.errors`): 0 ok, 1 failed or incomplete, 2 usage or
    input error (also: --out in use), 3 broker error, 130 interrupted (SIGINT), 141
    stdout closed early (``| head``), 143 terminated (SIGTERM).
    """
    from dispatchkit import outdir, procs

    procs.adopt_parent_from_env()  # a worker a ``run`` started dies with it
    argv = list(sys.argv[1:] if argv is None else argv)
    outdir.command_line = " ".join(argv)[:300]
    signals: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        handler = _on_signal(signals)
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    bars: Bars | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _configure_logging(args.verbose, args.quiet, args.log_format)
        bars = Bars(enabled=False if args.quiet else None, json_lines=args.log_format == "json")
        with bars, _metrics_endpoint(args):
            code: int = args.fn(args, bars)
        sys.stdout.flush()  # a closed pipe fails here, not at exit
        return _interrupted(bars, signals) if signals else code
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        if signals:
            return _interrupted(bars, signals)
        sys.stdout.flush()
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except BrokenPipeError:
        # stdout closed early (``| head``): say nothing more; see the Python docs on SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return RET_BROKEN_PIPE
    except BaseException as exc:
        if signals or isinstance(exc, KeyboardInterrupt) or _is_duckdb_interrupt(exc):
            return _interrupted(bars, signals)
        line, code = _one_line(exc)
        if line is None:
            raise  # a bug: keep the traceback
        _close(bars)
        print(f"dispatchkit: error: {line}", file=sys.stderr)
        return code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _metrics_endpoint(args: argparse.Namespace) -> Iterator[None]:
    """``--metrics-port``: serve metrics and health for as long as the command runs."""
    from dispatchkit.cli.args import metrics_port

    port = metrics_port(args)
    if not port:
        yield
        return
    from dispatchkit import metrics
    from dispatchkit.errors import UsageError

    metrics.reset()
    try:
        server = metrics.serve(port, version=__version__)
    except OSError as exc:
        raise UsageError(f"--metrics-port {port}: {exc.strerror or exc}") from None
    log.info("metrics on http://0.0.0.0:%d/metrics; health on /healthz/live, /healthz/ready", port)
    _on_stop.append(metrics.set_draining)
    try:
        yield
    finally:
        _on_stop.remove(metrics.set_draining)
        server.close()


def _close(bars: Bars | None) -> None:
    if bars is not None:
        with contextlib.suppress(Exception):
            bars.__exit__(None, None, None)


def _interrupted(bars: Bars | None, signals: list[int]) -> int:
    from dispatchkit import procs

    _close(bars)
    # A worker a ``run`` started is stopped by it: the parent's line is the one to read.
    quiet = procs.supervised()
    if signals and signals[0] == signal.SIGTERM:
        if not quiet:
            print("dispatchkit: terminated", file=sys.stderr)
        return RET_TERMINATED
    if not quiet:
        print("dispatchkit: interrupted", file=sys.stderr)
    return RET_INTERRUPTED


def _is_duckdb_interrupt(exc: BaseException) -> bool:
    import duckdb

    return isinstance(exc, duckdb.InterruptException) or (
        isinstance(exc, RuntimeError) and str(exc).startswith("Query interrupted")
    )


_DUCKDB_WRITE = re.compile(r'(?:Could not write|Cannot open|Could not open) file "([^"]+)": (.+)')


def _one_line(exc: BaseException) -> tuple[str | None, int]:
    """The line and exit code of an *expected* failure; ``(None, 0)`` for a bug."""
    import duckdb
    from confluent_kafka import KafkaException

    if isinstance(exc, DispatchkitError):
        return str(exc), exc.exit_code
    if isinstance(exc, KafkaException):
        # Wrapped almost everywhere; this is the last line of defence. librdkafka's
        # error strings never carry credentials.
        err = exc.args[0] if exc.args else exc
        text = err.str() if hasattr(err, "str") else str(err)
        return f"Kafka: {text}", RET_BROKER
    if isinstance(exc, duckdb.Error):
        text = " ".join(str(exc).split())
        found = _DUCKDB_WRITE.search(text)
        if found:
            return f"cannot write {found.group(1)}: {found.group(2).rstrip('.')}", RET_FAILED
        return f"DuckDB: {text[:300]}", RET_FAILED
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{what}", RET_FAILED
    return None, 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
