"""The ``dispatchkit`` command: parse flags, build a spec, call one library function.

Errors dispatchkit raises on purpose become one line on stderr and their exit code
(:mod:`dispatchkit.errors`); argparse's own usage errors exit 2. So do the expected
failures of the libraries underneath (DuckDB errors, OS errors on the user's paths),
Ctrl-C and SIGTERM in any phase, and a stdout closed early (``| head``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException

from dispatchkit import __version__
from dispatchkit.errors import (
    RET_BROKEN_PIPE,
    RET_BROKER,
    RET_FAILED,
    RET_INTERRUPTED,
    RET_OK,
    RET_TERMINATED,
    DispatchkitError,
    UsageError,
)
from dispatchkit.progress import Bars

if TYPE_CHECKING:
    from dispatchkit.config import KafkaSettings

log = logging.getLogger("dispatchkit")

DEFAULT_ROWS = 2_000_000
DEFAULT_SEED = 42


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"dispatchkit: error: {message} (see --help)\n")


def _date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def default_data_path() -> Path:
    """Where ``run`` without INPUT keeps the default generated dataset."""
    base = Path(os.environ.get("DISPATCHKIT_DATA", "data"))
    return base / f"covid_tests_{DEFAULT_ROWS}_seed{DEFAULT_SEED}.parquet"


# -- generate ---------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.generator import GenerateSpec, generate

    spec = GenerateSpec(
        rows=args.rows,
        seed=args.seed,
        dirty_fraction=args.dirty,
        hot_key_rows=args.hot_key_rows,
    )
    if args.countries:
        spec = dataclasses.replace(spec, countries=_countries(args.countries))
    t0 = time.perf_counter()
    bars.add("generate", spec.rows + spec.hot_key_rows, "rows")
    try:
        report = generate(spec, Path(args.out), on_rows=lambda n: bars.advance("generate", n))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    bars.__exit__(None, None, None)
    took = time.perf_counter() - t0
    _say(args, f"generated {report.rows:,} rows in {took:.1f} s → {report.path}")
    if report.bad_rows:
        _say(args, "bad rows: " + ", ".join(f"{k}={v}" for k, v in report.bad_rows.items()))
    return RET_OK


def _countries(text: str) -> dict[str, str]:
    from dispatchkit.generator import DEFAULT_COUNTRIES

    out: dict[str, str] = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, locale = item.partition("=")
        if not locale:
            if name not in DEFAULT_COUNTRIES:
                raise UsageError(f"unknown country {name!r}: give NAME=LOCALE, e.g. 'Chile=es_CL'")
            locale = DEFAULT_COUNTRIES[name]
        out[name] = locale
    return out


# -- run --------------------------------------------------------------------------------


def check_message_bytes(run_id: str | None, max_message_bytes: int) -> None:
    """Refuse, before any work, a --max-message-bytes too small to carry one job.

    A job part may carry ``max_message_bytes - 256 - len(run_id) - 96`` bytes of
    outcomes (:class:`~dispatchkit.dispatcher.Dispatcher`); at least one byte must fit.
    A derived run id (``run-`` and 12 hex digits) always fits the 1,024-byte minimum.
    """
    if run_id is None:
        return
    minimum = max(1024, 256 + len(run_id.encode()) + 96 + 1)
    if max_message_bytes < minimum:
        raise UsageError(
            f"--max-message-bytes {max_message_bytes:,} is too small for --run-id of "
            f"{len(run_id.encode()):,} bytes: a message that carries one job needs at "
            f"least {minimum:,} bytes"
        )


def cmd_run(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.runner import RunSpec, run_embedded
    from dispatchkit.worker import RetryPolicy

    check_message_bytes(args.run_id, args.max_message_bytes)
    source = args.input
    if source is None:
        path = default_data_path()
        if not path.exists():
            from dispatchkit.generator import GenerateSpec, generate

            _say(args, f"no INPUT given: generating the default dataset at {path} (once)")
            bars.add("generate", DEFAULT_ROWS, "rows")
            generate(
                GenerateSpec(rows=DEFAULT_ROWS, seed=DEFAULT_SEED),
                path,
                on_rows=lambda n: bars.advance("generate", n),
            )
        source = str(path)
    spec = RunSpec(
        input=source,
        out=Path(args.out),
        run_id=args.run_id,
        task=args.task,
        workers=args.workers,
        start=args.start,
        end=args.end,
        strict=args.strict,
        max_message_bytes=args.max_message_bytes,
        retry=RetryPolicy(attempts=args.attempts),
        report=not args.no_report,
    )
    if args.broker == "kafka":
        from dispatchkit.kafka_run import run_kafka

        summary = run_kafka(spec, _kafka_settings(args), bars)
    else:
        summary = run_embedded(spec, bars)
    bars.__exit__(None, None, None)
    _print_summary(args, summary)
    return RET_OK if summary.status == "complete" else 1


def _print_summary(args: argparse.Namespace, summary: object) -> None:
    from dispatchkit.runner import RunSummary

    assert isinstance(summary, RunSummary)
    s = summary
    lines = [
        f"run {s.run_id}: {s.status}",
        f"  rows     {s.rows_read:,} read, {s.rows_valid:,} valid, "
        f"{s.rows_quarantined:,} quarantined",
        f"  jobs     {s.jobs:,} total, {s.jobs_done:,} done"
        + (
            f" ({s.jobs_sent:,} sent now, {s.jobs_skipped:,} already stored"
            + (f", {s.split_jobs:,} split" if s.split_jobs else "")
            + ")"
            if s.jobs_sent or s.jobs_skipped
            else ""
        ),
        "  time     " + ", ".join(f"{k} {v:.2f} s" for k, v in s.seconds.items()),
    ]
    if s.bad_rows:
        lines.append("  bad rows " + ", ".join(f"{k}={v:,}" for k, v in sorted(s.bad_rows.items())))
    if s.worker_restarts:
        lines.append(f"  workers  {s.worker_restarts} restarted after a crash")
    for name, path in s.files.items():
        lines.append(f"  {name:<18} {path}")
    if s.failed_jobs:
        lines.append(f"  FAILED   {len(s.failed_jobs)} job(s) dead-lettered:")
        lines.extend(f"    {f}" for f in s.failed_jobs[:20])
        if len(s.failed_jobs) > 20:
            lines.append(f"    … and {len(s.failed_jobs) - 20} more")
    print("\n".join(lines))


# -- report -----------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.report import plot_report_file

    src = Path(args.results)
    if not src.exists():
        raise UsageError(f"{src}: no such results file")
    try:
        out = plot_report_file(src, Path(args.out), title=args.title)
    except ValueError as exc:
        raise UsageError(f"{src}: {exc}") from None
    _say(args, f"report written to {out}")
    return RET_OK


# -- plumbing ---------------------------------------------------------------------------


def _kafka_settings(args: argparse.Namespace) -> KafkaSettings:
    from dispatchkit.config import kafka_settings_from_args

    return kafka_settings_from_args(args)


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


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
        return p

    g = add(
        "generate",
        "generate the fake COVID-19 test dataset",
        "examples:\n  dispatchkit generate --rows 2000000 --out data/covid.parquet\n"
        "  dispatchkit generate --rows 10000 --seed 7 --out sample.csv",
        cmd_generate,
    )
    g.add_argument("--rows", type=_positive_int, default=DEFAULT_ROWS, help="rows to generate")
    g.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="random seed (same seed, same file)"
    )
    g.add_argument("--out", required=True, help="output file: .parquet or .csv")
    g.add_argument("--countries", help="comma-separated countries (NAME or NAME=LOCALE)")
    g.add_argument("--dirty", type=float, default=0.0, help="fraction of rows to corrupt (tests)")
    g.add_argument("--hot-key-rows", type=int, default=0, help="extra rows in one (country, hour)")

    r = add(
        "run",
        "run the whole job: dispatch, work, store, report",
        "examples:\n  dispatchkit run --out out/                 # default 2M-row dataset\n"
        "  dispatchkit run data/covid.parquet --out out/ --workers 4\n"
        "  dispatchkit run 'data/*.csv' --out out/ --run-id march --strict\n"
        "  dispatchkit run data/covid.parquet --out out/ --broker kafka "
        "--bootstrap-servers 127.0.0.1:9092",
        cmd_run,
    )
    r.add_argument(
        "input",
        nargs="?",
        help="Parquet/CSV file, directory or glob "
        "(default: generate 2M rows once under $DISPATCHKIT_DATA or ./data)",
    )
    r.add_argument("--out", default="out", help="output directory")
    r.add_argument(
        "--run-id",
        help="run id (default: derived from the input's content); rerunning an id resumes it",
    )
    r.add_argument(
        "--workers", type=_positive_int, default=os.cpu_count() or 1, help="worker processes"
    )
    r.add_argument("--task", default="positive-rate", help="positive-rate or beta-posterior")
    r.add_argument(
        "--start",
        type=_date,
        default=datetime(2020, 3, 1, tzinfo=UTC),
        help="first valid test time (UTC)",
    )
    r.add_argument(
        "--end",
        type=_date,
        default=datetime(2021, 1, 1, tzinfo=UTC),
        help="end of valid test times, exclusive (UTC)",
    )
    r.add_argument("--strict", action="store_true", help="fail on the first invalid row")
    r.add_argument(
        "--attempts",
        type=_positive_int,
        default=3,
        help="tries per failing job before it is dead-lettered",
    )
    r.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=900_000,
        help="largest job batch message; bigger jobs are split into parts",
    )
    r.add_argument("--no-report", action="store_true", help="skip report.png")
    r.add_argument("--broker", choices=["embedded", "kafka"], default="embedded", help="transport")
    _add_kafka_flags(r, required=False)

    rp = add(
        "report",
        "redraw report.png from a results file",
        "examples:\n  dispatchkit report out/results.parquet --out out/report.png",
        cmd_report,
    )
    rp.add_argument("results", help="results.parquet or results.csv")
    rp.add_argument("--out", default="report.png", help="PNG to write")
    rp.add_argument("--title", help="chart title")

    _add_kafka_commands(add)
    from dispatchkit.bench_cli import register as register_bench

    register_bench(add, _add_kafka_flags)
    return parser


def _add_kafka_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
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
        "--partitions", type=_positive_int, default=12, help="partitions of the jobs topic"
    )


def _add_kafka_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    try:
        from dispatchkit.kafka_cli import register
    except ImportError:  # pragma: no cover - the Kafka commands ship with the package
        return
    register(add, _add_kafka_flags)


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Configure dispatchkit's own logger only; other libraries keep their defaults."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    level = logging.WARNING - 10 * verbose
    log.setLevel(max(level, logging.ERROR) if quiet else max(level, logging.DEBUG))
    # librdkafka reports (and recovers from) transient errors; show them only with -v.
    logging.getLogger("dispatchkit.librdkafka").setLevel(
        logging.CRITICAL if verbose == 0 else logging.WARNING if verbose == 1 else logging.DEBUG
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` cleans up the same way."""


def _on_signal(signals: list[int]) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)
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
        _configure_logging(args.verbose, args.quiet)
        bars = Bars(enabled=False if args.quiet else None)
        with bars:
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
