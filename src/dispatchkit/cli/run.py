"""The ``generate``, ``run`` and ``report`` subcommands (registered by :mod:`dispatchkit.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
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

DEFAULT_ROWS = 2_000_000
DEFAULT_SEED = 42


def register(add: Add, kafka_flags: Flags) -> None:
    g = add(
        "generate",
        "generate the fake COVID-19 test dataset",
        "examples:\n  dispatchkit generate --rows 2000000 --out data/covid.parquet\n"
        "  dispatchkit generate --rows 10000 --seed 7 --out sample.csv",
        cmd_generate,
    )
    g.add_argument("--rows", type=positive_int, default=DEFAULT_ROWS, help="rows to generate")
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
        "--workers", type=positive_int, default=os.cpu_count() or 1, help="worker processes"
    )
    add_app_flag(r)
    r.add_argument(
        "--task",
        default="positive-rate",
        help="the app's task (COVID app: positive-rate or beta-posterior)",
    )
    r.add_argument(
        "--start",
        type=iso_date,
        default=None,
        help="first valid time of the app's run-range column, UTC (COVID app: 2020-03-01)",
    )
    r.add_argument(
        "--end",
        type=iso_date,
        default=None,
        help="end of the valid times, exclusive, UTC (COVID app: 2021-01-01)",
    )
    r.add_argument("--strict", action="store_true", help="fail on the first invalid row")
    add_bad_rows_flag(r)
    r.add_argument(
        "--attempts",
        type=positive_int,
        default=3,
        help="tries per failing job before it is dead-lettered",
    )
    r.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=900_000,
        help="largest job batch message; bigger jobs are split into parts",
    )
    add_sort_memory_flag(r)
    r.add_argument("--no-report", action="store_true", help="skip report.png")
    r.add_argument("--broker", choices=["embedded", "kafka"], default="embedded", help="transport")
    add_metrics_flag(r)
    kafka_flags(r, required=False)

    ck = add(
        "check",
        "show an app's declarations and check its task forms agree on a sample",
        "examples:\n  dispatchkit check --app examples/sales/app.py:app sample.parquet\n"
        "  dispatchkit check data/covid.parquet          # the built-in COVID app",
        cmd_check,
    )
    ck.add_argument("sample", help="a small Parquet/CSV input for the app")
    add_app_flag(ck)

    rp = add(
        "report",
        "redraw report.png from a results file",
        "examples:\n  dispatchkit report out/results.parquet --out out/report.png",
        cmd_report,
    )
    rp.add_argument("results", help="results.parquet or results.csv")
    rp.add_argument("--out", default="report.png", help="PNG to write")
    rp.add_argument("--title", help="chart title")
    add_app_flag(rp)


def default_data_path() -> Path:
    """Where ``run`` without INPUT keeps the default generated dataset."""
    base = Path(os.environ.get("DISPATCHKIT_DATA", "data"))
    return base / f"covid_tests_{DEFAULT_ROWS}_seed{DEFAULT_SEED}.parquet"


# -- generate ---------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.apps.covid.generate import GenerateSpec, generate

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
    from dispatchkit.apps.covid.generate import DEFAULT_COUNTRIES

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


def check_message_bytes(
    run_id: str | None, max_message_bytes: int, app_spec: str | None, task: str
) -> None:
    """Refuse, before any work, a --max-message-bytes too small to carry one job.

    The envelope of a job message (run id, app, task, fingerprint, the index's and the
    body's schemas) takes a fixed number of bytes whatever the jobs; one small job must
    fit beside it. A derived run id (``run-`` and 12 hex digits) is counted at its length.
    """
    if max_message_bytes >= 64 * 1024:
        return  # every app's envelope is far smaller
    from dispatchkit.app import load_app
    from dispatchkit.runner import minimum_message_bytes

    rid = run_id if run_id is not None else "run-" + "0" * 12
    minimum = minimum_message_bytes(load_app(app_spec), task, rid)
    if max_message_bytes < minimum:
        about = (
            f"--run-id of {len(rid.encode()):,} bytes" if run_id is not None else "a derived run id"
        )
        raise UsageError(
            f"--max-message-bytes {max_message_bytes:,} is too small for {about}: a "
            f"message that carries one job of task {task!r} needs at least {minimum:,} bytes"
        )


def cmd_run(args: argparse.Namespace, bars: Bars) -> int:
    if args.broker != "kafka":  # the workers' fork server imports while this one does
        from dispatchkit import procs

        procs.start_fork_server()
    from dispatchkit.runner import RunSpec, run_embedded
    from dispatchkit.worker import RetryPolicy

    check_message_bytes(args.run_id, args.max_message_bytes, args.app, args.task)
    source = args.input
    if source is None:
        path = default_data_path()
        if not path.exists():
            from dispatchkit.apps.covid.generate import GenerateSpec, generate

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
        max_bad_rows=args.max_bad_rows,
        max_message_bytes=args.max_message_bytes,
        memory_limit=args.sort_memory,
        retry=RetryPolicy(attempts=args.attempts),
        report=not args.no_report,
        app=args.app,
    )
    if args.broker == "kafka":
        from dispatchkit.kafka_run import run_kafka

        summary = run_kafka(spec, kafka_settings_from_args(args), bars)
    else:
        summary = run_embedded(spec, bars)
    bars.__exit__(None, None, None)
    print_summary(args, summary)
    return RET_OK if summary.status == "complete" else 1


def print_summary(args: argparse.Namespace, summary: object) -> None:
    from dispatchkit.runner import RunSummary

    assert isinstance(summary, RunSummary)
    from dispatchkit.outcome import missing_lines

    s = summary
    incomplete = s.status != "complete"
    lines = [
        f"run {s.run_id}: {s.status.upper() if incomplete else s.status}",
        f"  rows     {s.rows_read:,} read, {s.rows_valid:,} valid, "
        f"{s.rows_quarantined:,} quarantined",
        f"  jobs     {s.jobs:,} total, {s.jobs_done:,} done"
        + (
            f" ({s.jobs_sent:,} sent now, {s.jobs_skipped:,} already stored"
            + (f", {s.split_jobs:,} split into parts" if s.split_jobs else "")
            + ")"
            if s.jobs_sent or s.jobs_skipped
            else ""
        ),
        *(
            f"  {line}"
            for line in missing_lines(s.jobs, s.jobs_done, s.failed_jobs)
            if incomplete and s.jobs_done < s.jobs
        ),
        "  time     " + ", ".join(f"{k} {v:.2f} s" for k, v in s.seconds.items()),
    ]
    if s.bad_rows:
        lines.append("  bad rows " + ", ".join(f"{k}={v:,}" for k, v in sorted(s.bad_rows.items())))
    if s.worker_restarts:
        lines.append(f"  workers  {s.worker_restarts} restarted after a crash")
    for name, path in s.files.items():
        lines.append(f"  {name:<18} {path}")
    lines.extend(f"  note     {note}" for note in s.notes)
    if s.failed_jobs:
        lines.append(f"  FAILED   {len(s.failed_jobs):,} jobs dead-lettered:")
        lines.extend(f"    {f}" for f in s.failed_jobs[:20])
        if len(s.failed_jobs) > 20:
            lines.append(f"    … and {len(s.failed_jobs) - 20:,} more jobs")
    print("\n".join(lines))


# -- check ------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, bars: Bars) -> int:
    import tempfile

    from dispatchkit.app import load_app
    from dispatchkit.check import check_app, describe

    app = load_app(args.app)
    print("\n".join(describe(app)))
    with tempfile.TemporaryDirectory(prefix="dispatchkit-check-") as work:
        checks = check_app(app, args.sample, Path(work))
    failed = False
    for c in checks:
        status = "ok" if not c.problems else f"{len(c.problems)} problem(s)"
        print(f"task {c.task}: {c.jobs:,} jobs, {c.split_jobs:,} split in 3 parts: {status}")
        for problem in c.problems[:20]:
            print(f"  {problem}")
        failed = failed or bool(c.problems)
    return 1 if failed else RET_OK


# -- report -----------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace, bars: Bars) -> int:
    from dispatchkit.apps.covid.chart import plot_report_file

    src = Path(args.results)
    if not src.exists():
        raise UsageError(f"{src}: no such results file")
    if args.app is not None:
        return _app_report(args, src)
    try:
        out = plot_report_file(src, Path(args.out), title=args.title)
    except ValueError as exc:
        raise UsageError(f"{src}: {exc}") from None
    _mark_incomplete(args, src, out)
    _say(args, f"report written to {out}")
    return RET_OK


def _mark_incomplete(args: argparse.Namespace, src: Path, out: Path) -> None:
    """Redraw an incomplete run's banner, as its results.parquet records it.

    A CSV file holds no such record: the run's results.parquet beside it (written with
    it, so with as many rows) says for it; without one, stderr says the chart cannot."""
    from dispatchkit.outcome import mark_chart
    from dispatchkit.store import incomplete_lines, same_rows

    record = src
    if src.suffix == ".csv":
        record = src.with_suffix(".parquet")
        if not same_rows(src, record):
            logging.getLogger(__name__).warning(
                "%s does not record whether its run was complete (no %s of the same rows "
                "beside it): the chart cannot say if jobs are missing; redraw from "
                "results.parquet to keep an INCOMPLETE banner",
                src,
                record.name,
            )
            return
    lines = incomplete_lines(record)
    if lines:
        mark_chart(out, lines)
        _say(args, lines[0])


def _app_report(args: argparse.Namespace, src: Path) -> int:
    """``report --app``: the app's own chart of a results file."""
    import polars as pl

    from dispatchkit.app import load_app
    from dispatchkit.outdir import atomic_path

    app = load_app(args.app)
    if app.chart_fn is None:
        raise UsageError(f"app {app.name!r} has no chart (declare one with @app.chart)")
    try:
        results = pl.read_parquet(src) if src.suffix == ".parquet" else pl.read_csv(src)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise UsageError(f"{src}: cannot read results ({str(exc).splitlines()[0]})") from None
    out = Path(args.out)
    with atomic_path(out) as tmp:
        app.chart_fn(results.to_arrow(), tmp)
    _mark_incomplete(args, src, out)
    _say(args, f"report written to {out}")
    return RET_OK


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)
