"""The Kafka subcommands: dispatch, worker, collect, status, dlq (see :mod:`dispatchkit.cli`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dispatchkit.cli.args import (
    add_app_flag,
    add_bad_rows_flag,
    add_metrics_flag,
    add_sort_memory_flag,
    iso_date,
    kafka_settings_from_args,
    positive_int,
)
from dispatchkit.cli.progress import Bars
from dispatchkit.errors import RET_OK, UsageError

Add = Callable[..., argparse.ArgumentParser]
Flags = Callable[..., None]


def register(add: Add, kafka_flags: Flags) -> None:
    d = add(
        "dispatch",
        "publish a run's manifest and jobs to Kafka",
        "examples:\n  dispatchkit dispatch data/covid.parquet -b 127.0.0.1:9092 --run-id r1\n"
        "  (rerun the same command after a crash: only what is missing is published)",
        cmd_dispatch,
    )
    d.add_argument("input", help="Parquet/CSV file, directory or glob")
    d.add_argument("--run-id", help="run id (default: derived from the input's content)")
    d.add_argument("--out", default="out", help="where quarantine files are written")
    add_app_flag(d)
    d.add_argument(
        "--task",
        default="positive-rate",
        help="the app's task (COVID app: positive-rate or beta-posterior)",
    )
    d.add_argument("--start", type=iso_date, default=None, help="first valid test time (UTC)")
    d.add_argument("--end", type=iso_date, default=None, help="end of valid test times (UTC)")
    d.add_argument("--strict", action="store_true", help="fail on the first invalid row")
    add_bad_rows_flag(d)
    d.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=900_000,
        help="largest job batch message; bigger jobs are split into parts",
    )
    add_sort_memory_flag(d)
    add_metrics_flag(d)
    kafka_flags(d, required=True)

    w = add(
        "worker",
        "be a worker: consume jobs, run tasks, produce results (a consumer-group member)",
        "examples:\n  dispatchkit worker -b 127.0.0.1:9092          # runs until SIGTERM\n"
        "  dispatchkit worker -b 127.0.0.1:9092 --burst  # drain what is there, exit",
        cmd_worker,
    )
    add_app_flag(w)
    w.add_argument("--group", help="consumer group (default: <prefix>.workers)")
    w.add_argument(
        "--worker-id",
        help="stable id of this worker slot; its transactional.id "
        "fences an older instance of the same slot (default: host-pid)",
    )
    w.add_argument("--burst", action="store_true", help="exit once the jobs topic is drained")
    w.add_argument(
        "--attempts",
        type=positive_int,
        default=3,
        help="tries per failing job before it is dead-lettered",
    )
    w.add_argument(
        "--group-protocol",
        choices=["classic", "consumer"],
        default="classic",
        help="classic (cooperative-sticky) or consumer (KIP-848)",
    )
    w.add_argument(
        "--session-timeout-ms",
        type=positive_int,
        default=10_000,
        help="classic protocol session timeout",
    )
    w.add_argument(
        "--max-poll-interval-ms",
        type=positive_int,
        default=300_000,
        help="librdkafka max.poll.interval.ms (long jobs poll while they run)",
    )
    add_metrics_flag(w)
    kafka_flags(w, required=True)

    c = add(
        "collect",
        "store a run's results until every job is done; write results and report",
        "examples:\n  dispatchkit collect -b 127.0.0.1:9092 --run-id r1 --out out/",
        cmd_collect,
    )
    add_app_flag(c)
    c.add_argument("--run-id", required=True, help="the run to collect")
    c.add_argument("--out", default="out", help="output directory")
    c.add_argument("--timeout", type=float, help="give up after this many seconds without progress")
    c.add_argument(
        "--wait-for-dispatch",
        type=_non_negative_float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the run's manifest before giving up (exit 1); "
        "0 waits for ever (default: 60)",
    )
    c.add_argument("--no-report", action="store_true", help="skip report.png")
    add_metrics_flag(c)
    kafka_flags(c, required=True)

    s = add(
        "status",
        "show a run's state: jobs done of total, ETA, throughput, dead letters, the "
        "workers' group with lag per partition, stalled partitions",
        "examples:\n  dispatchkit status -b 127.0.0.1:9092 --run-id r1\n"
        "  dispatchkit status -b 127.0.0.1:9092 --run-id r1 --watch   # refresh every 2 s\n"
        "  dispatchkit status -b 127.0.0.1:9092 --run-id r1 --json",
        cmd_status,
    )
    add_app_flag(s)
    s.add_argument("--run-id", required=True, help="the run to show")
    s.add_argument(
        "--watch",
        nargs="?",
        type=_non_negative_float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 2) until the run ends or Ctrl-C",
    )
    s.add_argument("--json", action="store_true", help="print the status as one JSON object")
    s.add_argument(
        "--stall-seconds",
        type=_non_negative_float,
        default=30.0,
        help="a partition with pending jobs and no result for this long is stalled (default 30)",
    )
    kafka_flags(s, required=True)

    q = add(
        "dlq",
        "list or replay dead-lettered jobs",
        "examples:\n  dispatchkit dlq list -b 127.0.0.1:9092 --run-id r1\n"
        "  dispatchkit dlq replay -b 127.0.0.1:9092 --run-id r1 --key 'Italy 2020-04-01T12:00:00Z'",
        cmd_dlq,
    )
    q.add_argument("action", choices=["list", "replay"], help="what to do")
    add_app_flag(q)
    q.add_argument("--run-id", help="only this run")
    q.add_argument(
        "--key",
        action="append",
        default=[],
        help="only this job key 'COUNTRY YYYY-MM-DDTHH:00:00Z' (repeatable)",
    )
    kafka_flags(q, required=True)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def cmd_dispatch(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.cli.run import check_message_bytes
    from dispatchkit.kafka_run import dispatch
    from dispatchkit.runner import RunSpec

    check_message_bytes(args.run_id, args.max_message_bytes, args.app, args.task)
    settings = kafka_settings_from_args(args)
    spec = RunSpec(
        input=args.input,
        out=Path(args.out),
        run_id=args.run_id,
        task=args.task,
        start=args.start,
        end=args.end,
        strict=args.strict,
        max_bad_rows=args.max_bad_rows,
        max_message_bytes=args.max_message_bytes,
        memory_limit=args.sort_memory,
        app=args.app,
    )
    summary = dispatch(spec, settings, bars)
    bars.__exit__(None, None, None)
    if not args.quiet:
        print(
            f"run {summary.run_id}: dispatched {summary.jobs:,} jobs "
            f"({summary.jobs_sent:,} published now, {summary.jobs_skipped:,} already there) "
            f"from {summary.rows_valid:,} valid rows; {summary.rows_quarantined:,} rows "
            "quarantined"
        )
    return RET_OK


def cmd_worker(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.kafka_worker import WorkerOptions, work
    from dispatchkit.worker import RetryPolicy

    settings = kafka_settings_from_args(args)
    stats = work(
        settings,
        WorkerOptions(
            group=args.group,
            worker_id=args.worker_id,
            burst=args.burst,
            group_protocol=args.group_protocol,
            retry=RetryPolicy(attempts=args.attempts),
            session_timeout_ms=args.session_timeout_ms,
            max_poll_interval_ms=args.max_poll_interval_ms,
            app=args.app,
        ),
    )
    if not args.quiet:
        print(
            # One dead letter is one message: the batch's failed jobs, or an undecodable one.
            f"worker done: {stats.batches:,} messages, {stats.jobs:,} jobs done; "
            f"{stats.rejected + stats.dead_jobs:,} messages dead-lettered"
        )
    return RET_OK


def cmd_collect(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.app import load_app
    from dispatchkit.cli.run import print_summary
    from dispatchkit.kafka_run import collect

    settings = kafka_settings_from_args(args)
    app = load_app(args.app)
    summary = collect(
        settings,
        args.run_id,
        Path(args.out),
        bars=bars,
        report=not args.no_report,
        timeout=args.timeout,
        wait_for_dispatch=args.wait_for_dispatch or None,
        app=app,
    )
    bars.__exit__(None, None, None)
    print_summary(args, summary)
    return RET_OK if summary.status == "complete" else 1


def cmd_status(args: argparse.Namespace, bars: Bars) -> int:
    import json
    import time

    from dispatchkit.app import load_app
    from dispatchkit.kafka_run import status

    settings = kafka_settings_from_args(args)
    app = load_app(args.app)

    def look() -> tuple[str, list[str]]:
        st = status(settings, args.run_id, stall_seconds=args.stall_seconds)
        if st.manifest is None:
            raise UsageError(f"run {args.run_id!r} has no manifest on {settings.manifests_topic}")
        if args.json:
            return st.state, [json.dumps(st.to_json(), default=str)]
        return st.state, status_lines(st, app)

    if args.watch is None:
        print("\n".join(look()[1]))
        return RET_OK
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    with Live(Text(""), console=Console(), auto_refresh=False) as live:
        while True:
            state, lines = look()
            live.update(Text("\n".join(lines)), refresh=True)
            if state in ("complete", "incomplete"):
                return RET_OK
            time.sleep(args.watch)


def status_lines(st: object, app: object) -> list[str]:
    """``dispatchkit status`` as text lines."""
    from dispatchkit.app import App
    from dispatchkit.brokers.kafka.status import RunStatus

    assert isinstance(st, RunStatus) and isinstance(app, App)
    m = st.manifest
    assert m is not None
    lines = [f"run {st.run_id}: {st.state}"]
    made = m.run_identity()
    lines.append(f"  task    {m.task}")
    if "app" in made:
        line = f"  app     {made['app']} {made.get('fingerprint', '')}"
        if (made["app"], made.get("fingerprint")) != (app.name, app.fingerprint):
            line += (
                f" — not the app given ({app.name} {app.fingerprint}): its workers and "
                "collector need the run's app"
            )
        lines.append(line)
    eta = "" if st.eta_seconds is None else f", ETA {_duration(st.eta_seconds)}"
    lines.append(
        f"  jobs    {st.jobs_done:,} done of {st.jobs_total:,}; {st.jobs_dead:,} dead-lettered{eta}"
    )
    lines.append(
        f"  rows    {m.rows_read:,} read, {m.rows_dispatched:,} dispatched, "
        f"{m.rows_quarantined:,} quarantined"
    )
    lines.append(f"  rate    {st.jobs_per_second:,.1f} jobs/s (last {st.window:.0f} s)")
    lines.append("  lag     " + ", ".join(f"[{p}] {n:,}" for p, n in sorted(st.lag.items())))
    if st.members:
        lines.append(f"  workers {len(st.members)} in the group:")
        lines.extend(
            f"    {w.client_id} on {w.host}: partitions "
            + (", ".join(map(str, w.partitions)) or "none")
            for w in st.members
        )
    else:
        lines.append("  workers none in the group")
    for p in st.stalled:
        last = (
            "no result yet"
            if p.last_result_at is None
            else f"last result {_duration(time_since(p.last_result_at))} ago by {p.last_owner}"
        )
        owner = p.owner or "no member"
        lines.append(
            f"  STALLED partition {p.partition}: {p.lag:,} jobs pending, {last}; "
            f"assigned to {owner}"
        )
    return lines


def time_since(at: float) -> float:
    import time

    return max(0.0, time.time() - at)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def cmd_dlq(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.dlq import list_dead, replay

    settings = kafka_settings_from_args(args)
    if args.action == "list":
        entries = list_dead(settings, run_id=args.run_id, keys=args.key)
        for e in entries:
            print(e.describe())
        jobs = sum(len(e.jobs) for e in entries)
        print(f"{len(entries):,} dead-letter messages holding {jobs:,} jobs")
        return RET_OK
    from dispatchkit.app import load_app

    replayed, skipped = replay(settings, run_id=args.run_id, keys=args.key, app=load_app(args.app))
    print(f"replayed {replayed:,} jobs; {skipped:,} skipped (done already or not replayable)")
    return RET_OK
