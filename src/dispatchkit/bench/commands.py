"""Whole commands, timed from exec to exit: the ``commands`` and ``fixed`` sections.

Every variant here is one command line (or two started together) run by
:func:`dispatchkit.bench.measure.measure`: interpreter start-up, imports, the work and
the exit are all inside its wall time. The floor is a whole process too,
``python -m dispatchkit.bench.floor_script FILE OUT`` (:mod:`~dispatchkit.bench.floor_script`).

``commands`` (on the main input): the floor script; ``dispatchkit run FILE --out D``
(report.png included); the same with ``--no-report``; with Kafka, ``dispatchkit run
--broker kafka`` (the run starts its workers) and *warm*: ``dispatchkit worker``
processes started beforehand and waited for until they hold the partitions of their
group, then ``dispatchkit dispatch`` and ``dispatchkit collect`` started together and
timed until both have exited.

``fixed`` (on ``fixed_rows`` rows, 20,000): the floor script against ``dispatchkit run``:
what a run costs that has hardly any rows to work on.

Each run's ``results.parquet`` must equal the floor script's (``country, date_hour,
tests, positives``, row for row) or the benchmark stops. Kafka variants get topics of
their own each time (a fresh prefix, and a fresh run id), deleted afterwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from dispatchkit.bench.kafka import stop_workers
from dispatchkit.bench.measure import Measurement, measure
from dispatchkit.errors import RunError

if TYPE_CHECKING:
    from dispatchkit.bench.runner import Plan, _State
    from dispatchkit.brokers.kafka.settings import KafkaSettings

Row = dict[str, Any]
#: Rows of the ``fixed`` section's input: a run with hardly anything to compute.
FIXED_ROWS = 20_000
#: Workers of every ``dispatchkit run`` here: the command's default.
RUN_WORKERS = 2


def dk(*args: str) -> list[str]:
    """``dispatchkit ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "dispatchkit", *args]


def input_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def sample_of(
    m: Measurement,
    *,
    rows: int,
    jobs: int,
    phases: dict[str, float] | None = None,
    extra: dict[str, float] | None = None,
    wall_s: float | None = None,
) -> Row:
    """A sample in the shape :func:`dispatchkit.bench.runner._aggregate` reads."""
    from dispatchkit.bench.runner import _cpu_pressure

    return {
        "variant": "",
        "wall_s": m.wall_s if wall_s is None else wall_s,
        "cpu_s": m.cpu_s,
        "rows": rows,
        "jobs": jobs,
        "phases": phases or {},
        "worker_jobs_per_s": [],
        "extra": extra or {},
        "check": None,
        "run_id": "",
        "outer_wall_s": m.wall_s,
        "process_cpu_s": m.cpu_s,
        "peak_rss_max_mb": m.peak_rss_max_mb,
        "peak_rss_total_mb": m.peak_rss_total_mb,
        "main_rss_mb": m.main_rss_mb,
        "broker_rss_mb": max(m.extra_rss_mb.values(), default=None),
        "broker_cpu_s": sum(m.extra_cpu_s.values()) if m.extra_cpu_s else None,
        "processes": m.processes,
        "load_1m": os.getloadavg()[0],
        "cpu_pressure": _cpu_pressure(),
    }


def run_command(
    cmd: Sequence[str],
    log: Path,
    what: str,
    *,
    env: dict[str, str] | None = None,
    extra_pids: Sequence[int] = (),
    cwd: Path | None = None,
) -> Measurement:
    """``cmd`` measured; :class:`RunError` with the log's tail unless it exits 0."""
    if cwd is not None:  # measure() has no cwd: go through a shell that changes into it
        cmd = ["sh", "-c", f"cd {shlex.quote(str(cwd))} && exec {shlex.join(cmd)}"]
    m = measure(cmd, env=env, log=log, extra_pids=extra_pids, timeout=3600)
    if m.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        raise RunError(f"{what} failed (exit {m.returncode}); see {log}:\n  " + "\n  ".join(tail))
    return m


# -- plans ------------------------------------------------------------------------------


def sections(state: _State) -> Iterator[tuple[str, list[Plan], int]]:
    """The ``commands`` section on the main input, then ``fixed`` on 20,000 rows."""
    from dispatchkit.bench.runner import Plan, _input

    c = state.config
    main_in = _input(state, "commands", c.rows)
    plans = [
        Plan("commands", "script", "polars script", "script", main_in),
        Plan("commands", "run", "dispatchkit run", "run", main_in, workers=RUN_WORKERS),
        Plan(
            "commands",
            "run-no-report",
            "dispatchkit run --no-report",
            "run-no-report",
            main_in,
            workers=RUN_WORKERS,
        ),
    ]
    if state.kafka is not None:
        plans += [
            Plan(
                "commands",
                "run-kafka",
                "dispatchkit run --broker kafka",
                "run-kafka",
                main_in,
                workers=RUN_WORKERS,
                kafka=True,
            ),
            Plan(
                "commands",
                "warm",
                "dispatch + collect, workers running",
                "warm-commands",
                main_in,
                workers=RUN_WORKERS,
                kafka=True,
            ),
        ]
    yield "commands", plans, c.repeats
    if c.rows != FIXED_ROWS:  # otherwise the commands section measured it already
        fixed_in = _input(state, "fixed", FIXED_ROWS)
        yield (
            "fixed",
            [
                Plan("fixed", "script", "polars script", "script", fixed_in),
                Plan("fixed", "run", "dispatchkit run", "run", fixed_in, workers=RUN_WORKERS),
            ],
            c.repeats,
        )


# -- variants ---------------------------------------------------------------------------


def _script(state: _State, plan: Plan, base: Path) -> Row:
    from dispatchkit.bench.variants import normalize

    out = base / "script"
    cmd = [sys.executable, "-m", "dispatchkit.bench.floor_script", str(plan.input), str(out)]
    m = run_command(cmd, base / "log.txt", f"{plan.section}: {plan.label}")
    ref = normalize(pl.read_parquet(out / "results.parquet"))
    state.references[plan.section] = ref
    shutil.rmtree(out, ignore_errors=True)
    return sample_of(m, rows=input_rows(plan.input), jobs=ref.height)


def check_run(state: _State, plan: Plan, out: Path) -> int:
    """The run's results.parquet against the section's floor; the number of jobs."""
    from dispatchkit.bench.runner import compare_results
    from dispatchkit.bench.variants import normalize

    results = out / "results.parquet"
    if not results.exists():
        raise RunError(f"{plan.section}: {plan.label} wrote no {results}")
    got = normalize(pl.read_parquet(results))
    compare_results(got, state.references[plan.section], f"{plan.section}: {plan.label}")
    return got.height


def _run(state: _State, plan: Plan, base: Path, *flags: str) -> Row:
    out = base / "run"
    cmd = dk("run", "-q", str(plan.input), "--out", str(out), "--workers", str(plan.workers))
    m = run_command([*cmd, *flags], base / "log.txt", f"{plan.section}: {plan.label}")
    if "--no-report" not in flags and not (out / "report.png").exists():
        raise RunError(f"{plan.section}: {plan.label} drew no report.png")
    jobs = check_run(state, plan, out)
    shutil.rmtree(out, ignore_errors=True)
    return sample_of(m, rows=input_rows(plan.input), jobs=jobs)


def _run_report(state: _State, plan: Plan, base: Path) -> Row:
    return _run(state, plan, base)


def _run_no_report(state: _State, plan: Plan, base: Path) -> Row:
    return _run(state, plan, base, "--no-report")


def fresh_settings(state: _State) -> KafkaSettings:
    """The bench's broker with a topic prefix of this run's own."""
    assert state.kafka is not None
    s = state.kafka.settings
    return replace(s, topic_prefix=f"{s.topic_prefix}.{uuid.uuid4().hex[:10]}")


def kafka_flags(settings: KafkaSettings) -> list[str]:
    """Topic flags; servers and librdkafka options go in the environment."""
    return ["--topic-prefix", settings.topic_prefix, "--partitions", str(settings.partitions)]


def broker_pids(state: _State) -> list[int]:
    return [state.kafka.broker_pid] if state.kafka and state.kafka.broker_pid else []


def _run_kafka(state: _State, plan: Plan, base: Path) -> Row:
    from dispatchkit.bench.kafka import delete_topics_of
    from dispatchkit.kafka_run import worker_env

    settings = fresh_settings(state)
    out = base / "run"
    cmd = dk("run", "-q", str(plan.input), "--out", str(out), "--workers", str(plan.workers))
    cmd += ["--broker", "kafka", *kafka_flags(settings)]
    try:
        m = run_command(
            cmd,
            base / "log.txt",
            f"{plan.section}: {plan.label}",
            env=worker_env(settings),
            extra_pids=broker_pids(state),
        )
    finally:
        delete_topics_of(settings)
    jobs = check_run(state, plan, out)
    shutil.rmtree(out, ignore_errors=True)
    return sample_of(m, rows=input_rows(plan.input), jobs=jobs)


def start_workers(
    settings: KafkaSettings, count: int, log_dir: Path, *app: str
) -> list[subprocess.Popen[bytes]]:
    """``count`` ``dispatchkit worker`` processes, waited for until their group is stable
    and every one of them holds partitions."""
    from dispatchkit.bench.kafka import _wait_for_group
    from dispatchkit.brokers.kafka.broker import ensure_topics
    from dispatchkit.kafka_run import worker_env, worker_group

    ensure_topics(settings)  # partitions to assign before the first job is sent
    env = worker_env(settings)
    procs = []
    try:
        for i in range(count):
            with open(log_dir / f"worker-{i}.txt", "wb") as log:
                cmd = dk("worker", "-q", *kafka_flags(settings), *app)
                cmd += ["--worker-id", f"bench-{os.getpid()}-{i}"]
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        try:
            _wait_for_group(settings, worker_group(settings), count)
        except SystemExit as exc:  # the child-side helper's way to fail
            raise RunError(f"{exc}; see {log_dir}/worker-*.txt") from None
    except BaseException:
        stop_workers(procs)
        raise
    return procs


def together(*cmds: Sequence[str]) -> list[str]:
    """One shell that starts every command at once, waits for all, and fails if any did."""
    script = " ".join(f"{shlex.join(c)} & p{i}=$!;" for i, c in enumerate(cmds))
    script += " rc=0;" + "".join(f" wait $p{i} || rc=1;" for i in range(len(cmds)))
    return ["sh", "-c", script + " exit $rc"]


def warm_commands(
    state: _State,
    plan: Plan,
    base: Path,
    app: Sequence[str] = (),
    task: Sequence[str] = (),
) -> tuple[Measurement, Path]:
    """Workers started and in their group; then dispatch + collect, timed to both exits."""
    from dispatchkit.bench.kafka import delete_topics_of
    from dispatchkit.kafka_run import worker_env

    settings = fresh_settings(state)
    out = base / "run"
    run_id = f"bench-{uuid.uuid4().hex[:12]}"
    try:
        procs = start_workers(settings, plan.workers, base, *app)
        try:
            dispatch = dk("dispatch", "-q", str(plan.input), "--run-id", run_id, *app, *task)
            dispatch += ["--out", str(base / "dispatch"), *kafka_flags(settings)]
            collect = dk("collect", "-q", "--run-id", run_id, "--out", str(out), *app)
            collect += kafka_flags(settings)
            m = run_command(
                together(dispatch, collect),
                base / "log.txt",
                f"{plan.section}: {plan.label}",
                env=worker_env(settings),
                extra_pids=broker_pids(state),
            )
        finally:
            stop_workers(procs)
    finally:
        delete_topics_of(settings)
    return m, out


def _warm(state: _State, plan: Plan, base: Path) -> Row:
    m, out = warm_commands(state, plan, base)
    jobs = check_run(state, plan, out)
    shutil.rmtree(out, ignore_errors=True)
    return sample_of(m, rows=input_rows(plan.input), jobs=jobs)


VARIANTS: dict[str, Callable[[_State, Plan, Path], Row]] = {
    "script": _script,
    "run": _run_report,
    "run-no-report": _run_no_report,
    "run-kafka": _run_kafka,
    "warm-commands": _warm,
}


# -- tables -----------------------------------------------------------------------------


def _get(rows: list[Row], section: str, key: str) -> Row | None:
    return next((r for r in rows if r["section"] == section and r["key"] == key), None)


def wall(row: Row) -> str:
    return f"{row['wall_median_s']:.2f} ({row['wall_min_s']:.2f}–{row['wall_max_s']:.2f})"


def table(rows: list[Row]) -> list[str]:
    """The ``commands`` and ``fixed`` sections as one Markdown table."""
    out: list[str] = []
    for section, title in (
        ("commands", "Whole commands"),
        ("fixed", "Fixed cost: whole commands"),
    ):
        chosen = [r for r in rows if r["section"] == section]
        floor = _get(rows, section, "script")
        if not chosen or floor is None:
            continue
        out += [
            f"## {title}: {chosen[0]['rows']:,} rows, {floor['jobs']:,} jobs, exec to exit, "
            f"median of {chosen[0]['repeats']}",
            "",
            "| command | wall s (min–max) | × script | largest RSS MB | all RSS MB | CPU s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in chosen:
            x = r["wall_median_s"] / floor["wall_median_s"]
            out.append(
                f"| {r['variant']} | {wall(r)} | {x:.2f}× | {r['peak_rss_max_mb']:,.0f} "
                f"| {r['peak_rss_total_mb']:,.0f} | {r['cpu_s']:.1f} |"
            )
        out.append("")
    if out:
        out += [
            "The script: `python -m dispatchkit.bench.floor_script FILE OUT` (lazy Polars "
            "group-by, Wilson arrays, results.parquet). `dispatchkit run -q FILE --out D "
            f"--workers {RUN_WORKERS}`; on Kafka with `--broker kafka` (it starts its "
            "workers); *workers running*: `dispatchkit dispatch` and `dispatchkit collect` "
            "started together with the workers already in their group, timed until both "
            "exited (report.png included, as in `run`). CPU s: the command's process tree "
            "(not the running workers', nor the broker's).",
            "",
        ]
    return out
