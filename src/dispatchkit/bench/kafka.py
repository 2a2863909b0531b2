"""The benchmark on Kafka: the broker it runs against, and the variants that use it.

Parent side: :func:`kafka_target` yields the broker — the one given, or a local one
started with ``scripts/kafka`` (instance ``bench``, port 45092) and stopped afterwards.

Child side (run by :mod:`dispatchkit.bench.variants`, one process per run, a fresh topic
prefix each time; the topics are deleted afterwards):

``kafka``        :func:`dispatchkit.kafka_run.run_kafka` — what ``dispatchkit run --broker
                 kafka`` does: start the worker processes, dispatch, collect;
``kafka-staged`` dispatch every job first, then start one worker and let it drain, so the
                 dispatcher's and the worker's rates are each measured alone;
``kafka-warm``   workers already running and in their group, the dispatcher's process
                 started: the clock covers dispatch, work, collect and export only — how a
                 deployment with long-running workers sees a run.

A worker's rate comes from the timestamps of the result records it produced
(:func:`worker_rates`), so its start-up and group join are left out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispatchkit.bench.variants import Outcome, require_complete, run_spec_of, settings_of
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.errors import RunError, UsageError

if TYPE_CHECKING:
    from dispatchkit.bench.runner import BenchConfig

BROKER_NAME, BROKER_PORT = "bench", 45092
#: The broker launcher of a source checkout, found from its root (the working directory):
#: an installed package has none and needs a broker given with -b.
SCRIPTS = Path("scripts")


# -- the broker (parent side) ------------------------------------------------------------


@dataclass
class KafkaTarget:
    """The broker the Kafka variants use; ``broker_pid`` when we can see its JVM."""

    settings: KafkaSettings
    broker_pid: int | None
    description: str


@contextlib.contextmanager
def kafka_target(config: BenchConfig, say: Callable[[str], None]) -> Iterator[KafkaTarget | None]:
    """The broker to use: none, the one given, or one started here and stopped after.

    An instance ``bench`` that is already running is used and left running.
    """
    if not config.kafka:
        yield None
        return
    if config.kafka_settings is not None:
        s = config.kafka_settings
        yield KafkaTarget(s, None, f"{s.bootstrap_servers} (given; broker memory not measured)")
        return
    script = SCRIPTS.resolve() / "kafka"
    if not script.is_file():
        raise UsageError(
            "no Kafka broker: give --bootstrap-servers (or DISPATCHKIT_BOOTSTRAP_SERVERS), "
            "or --no-kafka (scripts/kafka starts one from the root of a source checkout)"
        )
    name = ["--name", BROKER_NAME]
    running = subprocess.run([str(script), "status", *name], capture_output=True).returncode == 0
    say("" if running else f"starting a local Kafka broker ({script} start --name {BROKER_NAME})")
    started = subprocess.run(
        [str(script), "start", *name, "--port", str(BROKER_PORT)], capture_output=True, text=True
    )
    if started.returncode != 0:
        raise RunError(f"scripts/kafka start failed: {started.stderr.strip()[-500:]}")
    servers = started.stdout.strip().splitlines()[-1]
    pid = subprocess.run([str(script), "pid", *name], capture_output=True, text=True).stdout
    settings = KafkaSettings(
        servers, topic_prefix=config.topic_prefix, partitions=config.partitions
    )
    version = _kafka_version(script.parent / "kafka-pom.xml")
    try:
        yield KafkaTarget(
            settings,
            int(pid.strip()) if pid.strip().isdigit() else None,
            f"Apache Kafka {version}, one local KRaft node (scripts/kafka, {servers})",
        )
    finally:
        if not running:
            subprocess.run([str(script), "stop", *name, "--purge"], capture_output=True)


def _kafka_version(pom: Path) -> str:
    text = pom.read_text() if pom.is_file() else ""
    start = text.find("<kafka.version>")
    if start < 0:
        return "?"
    return text[start + len("<kafka.version>") : text.find("</kafka.version>")]


# -- the variants (child side) -----------------------------------------------------------


def kafka(spec: dict[str, Any]) -> Outcome:
    from dispatchkit.kafka_run import run_kafka

    settings = settings_of(spec)
    run_spec = run_spec_of(spec)
    summary = run_kafka(run_spec, settings)
    require_complete(summary)
    return Outcome(
        "kafka",
        0.0,
        0.0,
        summary.rows_valid,
        summary.jobs_done,
        dict(summary.seconds),
        run_id=summary.run_id,
    )


def kafka_staged(spec: dict[str, Any]) -> Outcome:
    from dispatchkit.brokers.kafka.protocol import run_protocol
    from dispatchkit.kafka_run import collect, dispatch, spawn_worker

    settings = settings_of(spec)
    run_spec = run_spec_of(spec)
    protocol = ("--group-protocol", run_protocol(settings))  # as run's own workers
    t0 = time.perf_counter()
    sent = dispatch(run_spec, settings)
    t_dispatch = time.perf_counter() - t0
    procs = [
        spawn_worker(settings, f"{os.getpid()}-{i}", "--attempts", "3", *protocol)
        for i in range(spec["workers"])
    ]
    try:
        summary = collect(settings, sent.run_id, run_spec.out, report=False)
    finally:
        stop_workers(procs)
    require_complete(summary)
    phases = {"dispatch": t_dispatch, "drain": time.perf_counter() - t0 - t_dispatch}
    return Outcome(
        "kafka-staged",
        0.0,
        0.0,
        sent.rows_valid,
        summary.jobs_done,
        phases,
        run_id=sent.run_id,
    )


def kafka_warm(spec: dict[str, Any]) -> Outcome:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from dispatchkit.brokers.kafka.broker import ensure_topics
    from dispatchkit.brokers.kafka.protocol import run_protocol
    from dispatchkit.kafka_run import collect, dispatch, spawn_worker, worker_group

    settings = settings_of(spec)
    run_spec = run_spec_of(spec)
    ensure_topics(settings)
    protocol = ("--group-protocol", run_protocol(settings))  # as run's own workers
    procs = [
        spawn_worker(settings, f"{os.getpid()}-{i}", "--attempts", "3", *protocol)
        for i in range(spec["workers"])
    ]
    pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
    try:
        pool.submit(_warm_up).result()
        _wait_for_group(settings, worker_group(settings), spec["workers"])
        c0, t0 = _tree_cpu(), time.perf_counter()
        dispatching = pool.submit(dispatch, run_spec, settings)
        summary = collect(settings, run_spec.run_id, run_spec.out, report=False)
        sent = dispatching.result()
        wall, cpu = time.perf_counter() - t0, _tree_cpu() - c0
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        stop_workers(procs)
    require_complete(summary)
    phases = {"dispatch": sent.seconds.get("dispatch", 0.0), **summary.seconds}
    return Outcome(
        "kafka-warm",
        wall,
        cpu,
        sent.rows_valid,
        summary.jobs_done,
        phases,
        run_id=sent.run_id,
    )


def _warm_up() -> None:
    import dispatchkit.kafka_run  # noqa: F401 - the dispatcher process imports before the clock


def _wait_for_group(settings: Any, group: str, members: int, timeout: float = 90.0) -> None:
    """Until the workers' group is stable with every member holding partitions."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.client_config())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            desc = admin.describe_consumer_groups([group])[group].result(10)
        except Exception:  # the group does not exist yet
            desc = None
        if (
            desc is not None
            and desc.state == ConsumerGroupState.STABLE
            and len(desc.members) == members
            and all(m.assignment.topic_partitions for m in desc.members)
        ):
            return
        time.sleep(0.2)
    raise SystemExit(f"workers' group {group} did not settle with {members} members")


def _tree_cpu() -> float:
    """CPU seconds so far of this process and every live descendant."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running, then wait (kill one that takes over 30 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def worker_rates(spec: dict[str, Any], run_id: str) -> list[float]:
    """Jobs/s of each worker while it worked, from its result records' timestamps.

    A worker's span runs from its first to its last result record (CreateTime, set
    when the worker produced it), so start-up and group joining are left out; the jobs
    of its first batch, finished before the span opens, are left out too.
    """
    from dispatchkit.brokers.kafka.broker import H_RUN, headers_of, scan
    from dispatchkit.wire import decode_results

    settings = settings_of(spec)
    seen: dict[str, list[tuple[float, int]]] = {}
    for msg in scan(settings, settings.results_topic):
        if headers_of(msg).get(H_RUN) != run_id:
            continue
        rb = decode_results(msg.value(), validate=False)
        seen.setdefault(rb.worker, []).append((msg.timestamp()[1] / 1000.0, len(rb)))
    rates = []
    for stamps in seen.values():
        stamps.sort()
        span = stamps[-1][0] - stamps[0][0]
        if len(stamps) > 1 and span > 0:
            rates.append(sum(n for _, n in stamps[1:]) / span)
    return sorted(rates, reverse=True)


def delete_topics(spec: dict[str, Any]) -> None:
    """Drop the run's topics (best effort): a shared cluster should not fill up."""
    from confluent_kafka.admin import AdminClient

    settings = settings_of(spec)
    admin = AdminClient(settings.client_config())
    topics = [
        settings.jobs_topic,
        settings.results_topic,
        settings.manifests_topic,
        settings.dlq_topic,
    ]
    for fut in admin.delete_topics(topics, operation_timeout=30).values():
        try:
            fut.result(30)
        except Exception as exc:  # cleanup only: never fail the bench
            print(f"could not delete a bench topic: {exc}", file=sys.stderr)


def delete_topics_of(settings: KafkaSettings) -> None:
    """Drop the topics of ``settings``' prefix (best effort), from the parent side."""
    from confluent_kafka.admin import AdminClient

    config: Any = settings.client_config()
    admin = AdminClient(config)
    topics = [
        settings.jobs_topic,
        settings.results_topic,
        settings.manifests_topic,
        settings.dlq_topic,
    ]
    for fut in admin.delete_topics(topics, operation_timeout=30).values():
        try:
            fut.result(30)
        except Exception as exc:  # cleanup only: a topic never created, say
            if "UNKNOWN_TOPIC" not in str(exc):
                print(f"could not delete a bench topic: {exc}", file=sys.stderr)


VARIANTS: dict[str, Callable[[dict[str, Any]], Outcome]] = {
    "kafka": kafka,
    "kafka-staged": kafka_staged,
    "kafka-warm": kafka_warm,
}
