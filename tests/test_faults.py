"""Exact results through crashes: fault injection against real Kafka brokers.

Every scenario runs a real pipeline — dispatcher, worker processes, collector — injects
one kind of fault, and then checks the same three things (:func:`assert_run_exact`):

* ``results.parquet`` equals the independent reference (a plain DuckDB group-by),
* every job part has exactly one *committed* result record on the results topic,
* the tests of all jobs add up to the valid input rows.

Worker, collector and dispatcher faults use the shared test broker (each test has its
own topics and groups). Broker faults — restart, freeze, the loss of one of three
brokers — use brokers of their own, started here with ``scripts/kafka`` and purged
afterwards, so the shared broker is never touched. The only timed assertion is the
SIGTERM deadline of the scale-in test. docs/reliability.md maps scenarios to tests.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.kafka_run import collect, dispatch, worker_group
from dispatchkit.runner import RunSpec, RunSummary, run_embedded

from .conftest import reference
from .fault_helpers import (
    SMALL_MESSAGES,
    Fleet,
    OwnKafka,
    assert_run_exact,
    job_parts_published,
    make_input,
    python_cli,
    result_records,
    spawn,
    store_duplicates,
    store_parts,
    wait_for,
)
from .kafka_helpers import kafka_args, new_settings

pytestmark = pytest.mark.kafka

#: Seconds a collector may go without progress before it gives up. A worker killed
#: without a restart leaves a transaction open that the broker aborts only after the
#: worker's transaction.timeout.ms (60 s) plus up to 10 s: its partitions wait that long.
COLLECT_TIMEOUT = 100
SLOW = {"DISPATCHKIT_TEST_FAULTS": "slow:0.05"}


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30,000 rows, 20 countries × 15 days: about 5,600 jobs in 300 job batches."""
    path = tmp_path_factory.mktemp("faults") / "in300.parquet"
    return make_input(path, rows=30_000, days=15, seed=404)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One country over 3 days: 70 jobs in a few messages (for long jobs)."""
    path = tmp_path_factory.mktemp("faults") / "tiny.parquet"
    return make_input(path, rows=600, days=3, countries=1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30,000 rows, 20 countries × 60 days: 1,200 job batches, enough for the dispatcher to
    be mid-delivery (not only mid-queue) when it crashes after 600."""
    path = tmp_path_factory.mktemp("faults") / "in1200.parquet"
    return make_input(path, rows=30_000, days=60, seed=405)


@pytest.fixture(scope="module")
def own_single() -> Iterator[OwnKafka]:
    kafka = OwnKafka(brokers=1)
    try:
        kafka.start()
        yield kafka
    finally:
        kafka.purge()


@pytest.fixture
def single(own_single: OwnKafka) -> OwnKafka:
    """The module's own broker, running (a failed test may have left it stopped)."""
    if not own_single.running():
        own_single.start()
    return own_single


@pytest.fixture(scope="module")
def cluster() -> Iterator[OwnKafka]:
    kafka = OwnKafka(brokers=3)
    try:
        kafka.start()
        yield kafka
    finally:
        kafka.purge()


# -- the pipeline -----------------------------------------------------------------------


ProgressHook = Callable[[int, int], None]


def dispatch_quiet(data: Path, out: Path, run_id: str, settings: KafkaSettings) -> RunSummary:
    # Small messages (~300 for this input, instead of 9): the faults land mid-run.
    spec = RunSpec(
        input=str(data), out=out, run_id=run_id, report=False, max_message_bytes=SMALL_MESSAGES
    )
    return dispatch(spec, settings)


def collect_with(
    settings: KafkaSettings,
    run_id: str,
    out: Path,
    *,
    on_progress: ProgressHook | None = None,
    on_tick: Callable[[], None] | None = None,
) -> RunSummary:
    return collect(
        settings,
        run_id,
        out,
        report=False,
        timeout=COLLECT_TIMEOUT,
        on_progress=on_progress,
        on_tick=on_tick,
    )


def at_half(action: Callable[[], None]) -> tuple[ProgressHook, list[float]]:
    """An ``on_progress`` hook that runs ``action`` once, when half of the jobs are done."""
    fired: list[float] = []

    def hook(done: int, total: int) -> None:
        if not fired and done >= total / 2:
            fired.append(done / total)
            action()

    return hook, fired


def in_background(action: Callable[[], None]) -> tuple[Callable[[], None], list[BaseException]]:
    """``action`` as a thread starter, so the collector lives through the fault meanwhile."""
    errors: list[BaseException] = []

    def go() -> None:
        try:
            action()
        except BaseException as exc:
            errors.append(exc)

    return lambda: threading.Thread(target=go, daemon=True).start(), errors


def end_offsets(settings: KafkaSettings, topic: str) -> int:
    """Sum of a topic's high watermarks (records plus transaction markers)."""
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "faults-probe"})
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        return sum(
            c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in md.partitions
        )
    finally:
        c.close()


def worker_done_batches(log: str) -> list[int]:
    """Messages each run of a worker reported on exit (``worker done: N messages``)."""
    return [int(n.replace(",", "")) for n in re.findall(r"worker done: ([\d,]+) messages", log)]


# -- workers crash ----------------------------------------------------------------------


@pytest.mark.slow
def test_kill_one_of_three_workers_mid_run(data: Path, tmp_path: Path) -> None:
    """kill -9 one worker at ~50%, no restart: the other two take over its partitions.

    Its open transaction blocks its partitions (read_committed, and the offsets it sent)
    until the broker aborts it after transaction.timeout.ms: this test takes over a minute.
    """
    settings = new_settings()
    fleet = Fleet(settings, tmp_path / "logs", env=SLOW)
    dispatch_quiet(data, tmp_path, "kill1", settings)
    fleet.start_many(3)
    hook, fired = at_half(lambda: fleet.kill("w1"))
    try:
        summary = collect_with(settings, "kill1", tmp_path, on_progress=hook)
    finally:
        codes = fleet.terminate()
    assert fired, "the run finished before the kill"
    assert summary.status == "complete", fleet.tails()
    assert codes == {"w0": 0, "w1": -signal.SIGKILL, "w2": 0}, fleet.tails()
    assert_run_exact(data, tmp_path, "kill1", settings)


def test_kill_all_workers_and_restart_them(data: Path, tmp_path: Path) -> None:
    """kill -9 every worker at ~50%, restart the same worker ids: the run resumes."""
    settings = new_settings()
    fleet = Fleet(settings, tmp_path / "logs", env=SLOW)
    dispatch_quiet(data, tmp_path, "killall", settings)
    ids = fleet.start_many(3)

    def kill_all() -> None:
        for wid in ids:
            fleet.kill(wid)
        for wid in ids:
            fleet.restart(wid)

    hook, fired = at_half(kill_all)
    try:
        summary = collect_with(settings, "killall", tmp_path, on_progress=hook)
        fleet.wait_ready(ids)  # the run may end before the restarted workers are up
    finally:
        codes = fleet.terminate()
    assert fired and fleet.kills == 3
    assert summary.status == "complete", fleet.tails()
    assert set(codes.values()) == {0}, fleet.tails()
    assert_run_exact(data, tmp_path, "killall", settings)


@pytest.mark.slow
def test_kill_storm(data: Path, tmp_path: Path) -> None:
    """kill -9 a random worker every 3 s (6 kills), each restarted at once with its id."""
    settings = new_settings()
    fleet = Fleet(settings, tmp_path / "logs", env={"DISPATCHKIT_TEST_FAULTS": "slow:0.15"})
    dispatch_quiet(data, tmp_path, "storm", settings)
    ids = fleet.start_many(3)
    rng = random.Random(4)
    victims: list[str] = []
    progress = [0]
    next_kill = [0.0]

    def on_progress(done: int, total: int) -> None:
        progress[0] = done

    def on_tick() -> None:
        now = time.monotonic()
        if progress[0] > 0 and len(victims) < 6 and now >= next_kill[0]:
            victims.append(rng.choice(ids))
            fleet.kill(victims[-1])
            fleet.restart(victims[-1])
            next_kill[0] = now + 3.0

    try:
        summary = collect_with(
            settings, "storm", tmp_path, on_progress=on_progress, on_tick=on_tick
        )
    finally:
        codes = fleet.terminate()
    assert len(victims) >= 5, f"only {len(victims)} kills before the run completed"
    assert summary.status == "complete", fleet.tails()
    assert set(codes.values()) == {0}, fleet.tails()
    assert_run_exact(data, tmp_path, "storm", settings)


def test_crash_inside_a_transaction(data: Path, tmp_path: Path) -> None:
    """A worker dies after producing results, before committing: they are never seen."""
    settings = new_settings()
    fleet = Fleet(settings, tmp_path / "logs", env=SLOW)
    dispatch_quiet(data, tmp_path, "txn", settings)
    # w1 starts alone, so it surely reaches its crash point on a loaded machine; w0 joins
    # once it crashed (or after 5 s).
    fleet.start("w1", env={"DISPATCHKIT_TEST_FAULTS": "slow:0.05,crash:worker.after_produce@25"})
    crashes: list[int] = []
    started = time.monotonic()

    def supervise() -> None:
        if "w0" not in fleet.procs and (crashes or time.monotonic() - started > 5):
            fleet.start("w0")
        code = fleet.procs["w1"].poll()
        if code is not None and not crashes:
            crashes.append(code)
            fleet.restart("w1")  # the same worker id fences the dead one: its txn aborts

    try:
        summary = collect_with(settings, "txn", tmp_path, on_tick=supervise)
    finally:
        codes = fleet.terminate()
    assert crashes == [137], fleet.tails()
    assert summary.status == "complete", fleet.tails()
    assert set(codes.values()) == {0}, fleet.tails()
    assert_run_exact(data, tmp_path, "txn", settings)
    # The aborted transaction's records are in the log; only read_uncommitted sees them.
    committed = result_records(settings, "txn")
    everything = result_records(settings, "txn", committed=False)
    assert len(everything) > len(committed)


# -- the collector and the dispatcher crash ---------------------------------------------


def test_collector_crash_after_store_write(data: Path, tmp_path: Path) -> None:
    """The collector dies right after a store write; the rerun goes on from the read
    positions stored in that same write: nothing stored is read again, nothing is missed."""
    settings = new_settings()
    fleet = Fleet(settings, tmp_path / "logs", env={"DISPATCHKIT_TEST_FAULTS": "slow:0.03"})
    dispatch_quiet(data, tmp_path, "coll", settings)
    fleet.start_many(2)
    args = ["collect", *kafka_args(settings), "--run-id", "coll", "--out", str(tmp_path)]
    try:
        crashed = spawn(
            [*args, "--no-report", "-q"],
            tmp_path / "collect-1.log",
            {"DISPATCHKIT_TEST_FAULTS": "crash:collector.after_store@2"},
        )
        assert crashed.wait(180) == 137, (tmp_path / "collect-1.log").read_text()
        assert store_parts(tmp_path, "coll") > 0
        summary = collect_with(settings, "coll", tmp_path)
    finally:
        codes = fleet.terminate()
    assert summary.status == "complete", fleet.tails()
    assert set(codes.values()) == {0}, fleet.tails()
    # The positions were stored with the results: the rerun reads none of them again.
    assert summary.duplicates_ignored == 0
    assert store_duplicates(tmp_path, "coll") == 0
    assert store_parts(tmp_path, "coll") == reference(data).height
    assert_run_exact(data, tmp_path, "coll", settings)


def test_dispatcher_crash_mid_publish_and_rerun(wide: Path, tmp_path: Path) -> None:
    """The dispatcher dies after queueing 600 of about 1,000 messages; the rerun publishes
    only the ones that did not reach the broker.

    The producer's queue is kept to 50 messages, so the dispatcher can only queue batch
    600 once most of the ones before it were sent. Otherwise a fast machine queues all
    600 before the producer has even connected, the crash loses them all, and the rerun
    publishes everything, which proves little.
    """
    settings = new_settings()
    fleet = Fleet(settings, tmp_path / "logs")
    fleet.start_many(2)
    # Small messages (about 1,000 of them), so the crash comes mid-run.
    args = ["dispatch", str(wide), *kafka_args(settings), "--run-id", "disp"]
    args += ["--out", str(tmp_path), "--max-message-bytes", "2560"]
    try:
        first = spawn(
            [*args, "-q"],
            tmp_path / "dispatch-1.log",
            {
                "DISPATCHKIT_TEST_FAULTS": "crash:dispatch.mid_publish@600",
                "DISPATCHKIT_KAFKA_QUEUE_BUFFERING_MAX_MESSAGES": "50",
            },
        )
        assert first.wait(120) == 137, (tmp_path / "dispatch-1.log").read_text()
        delivered = len(job_parts_published(settings, "disp"))
        second = subprocess.run(
            python_cli(*args), capture_output=True, text=True, timeout=120, check=False
        )
        assert second.returncode == 0, second.stderr
        summary = collect_with(settings, "disp", tmp_path)
    finally:
        codes = fleet.terminate()
    said = re.search(r"\(([\d,]+) published now, ([\d,]+) already there\)", second.stdout)
    assert said is not None, second.stdout
    already = int(said.group(2).replace(",", ""))
    assert 0 < delivered < summary.jobs, "the crash should leave a partly published run"
    assert already > 0, second.stdout
    assert summary.status == "complete", fleet.tails()
    assert set(codes.values()) == {0}, fleet.tails()
    assert_run_exact(wide, tmp_path, "disp", settings)
    # No job part was published twice, so none was computed twice.
    published = job_parts_published(settings, "disp")
    assert len({job for job, _ in published}) == summary.jobs
    assert max(published.values()) == 1


# -- brokers fail -----------------------------------------------------------------------


@pytest.mark.slow
def test_broker_restart_mid_run(data: Path, tmp_path: Path, single: OwnKafka) -> None:
    """Stop the (only) broker at ~50% and start it again: no worker exits, results exact."""
    settings = new_settings(single.bootstrap)
    fleet = Fleet(settings, tmp_path / "logs", env=SLOW)
    dispatch_quiet(data, tmp_path, "brestart", settings)
    fleet.start_many(3)

    def bounce() -> None:
        single.stop_node(1)
        time.sleep(3)
        single.start_node(1)

    start, errors = in_background(bounce)
    hook, fired = at_half(start)
    try:
        summary = collect_with(settings, "brestart", tmp_path, on_progress=hook)
        exited = fleet.exited()
    finally:
        codes = fleet.terminate()
    assert fired and not errors, errors
    assert summary.status == "complete", fleet.tails()
    assert exited == {}, fleet.tails()
    assert codes == {"w0": 0, "w1": 0, "w2": 0}, fleet.tails()
    assert_run_exact(data, tmp_path, "brestart", settings)


@pytest.mark.slow
def test_broker_freeze(data: Path, tmp_path: Path, single: OwnKafka) -> None:
    """SIGSTOP the broker for 15 s at ~50%, then SIGCONT: no worker is left stuck, the run
    completes exactly. A worker that exits on a fatal error is restarted (a supervisor's
    job, by design); one that hangs fails the test."""
    settings = new_settings(single.bootstrap)
    fleet = Fleet(settings, tmp_path / "logs", env=SLOW)
    dispatch_quiet(data, tmp_path, "freeze", settings)
    fleet.start_many(3)

    def freeze() -> None:
        pid = single.pid(1)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(15)
        finally:
            os.kill(pid, signal.SIGCONT)

    start, errors = in_background(freeze)
    hook, fired = at_half(start)
    try:
        summary = collect_with(
            settings, "freeze", tmp_path, on_progress=hook, on_tick=fleet.supervise
        )
    finally:
        codes = fleet.terminate()
    assert fired and not errors, errors
    assert summary.status == "complete", fleet.tails()
    assert codes == {"w0": 0, "w1": 0, "w2": 0}, fleet.tails()
    assert len(fleet.exit_codes) <= 3, f"crash loop: {fleet.exit_codes}"
    assert_run_exact(data, tmp_path, "freeze", settings)


@pytest.mark.slow
def test_broker_loss_in_a_three_broker_cluster(
    data: Path, tmp_path: Path, cluster: OwnKafka
) -> None:
    """RF 3, min ISR 2: kill -9 the workers' group coordinator at ~50%; the run goes on.
    Workers that exit on a fatal error are restarted, as in the freeze test."""
    settings = KafkaSettings(
        bootstrap_servers=cluster.bootstrap,
        topic_prefix=new_settings(cluster.bootstrap).topic_prefix,
        partitions=6,
        replication_factor=3,
    )
    fleet = Fleet(settings, tmp_path / "logs", env=SLOW)
    dispatch_quiet(data, tmp_path, "cluster", settings)
    assert set(topic_replication(settings).values()) == {3}
    fleet.start_many(3)
    victim: list[int] = []

    def kill_coordinator() -> None:
        victim.append(group_coordinator(settings, worker_group(settings)))
        os.kill(cluster.pid(victim[0]), signal.SIGKILL)

    hook, fired = at_half(kill_coordinator)
    try:
        summary = collect_with(
            settings, "cluster", tmp_path, on_progress=hook, on_tick=fleet.supervise
        )
    finally:
        codes = fleet.terminate()
    assert fired and victim, "the run finished before the kill"
    assert summary.status == "complete", fleet.tails()
    assert set(codes.values()) == {0}, fleet.tails()
    assert len(fleet.exit_codes) <= 3, f"crash loop: {fleet.exit_codes}"
    assert_run_exact(data, tmp_path, "cluster", settings)


def topic_replication(settings: KafkaSettings) -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    md = admin.list_topics(timeout=10).topics
    return {
        name: min(len(p.replicas) for p in t.partitions.values())
        for name, t in md.items()
        if name.startswith(settings.topic_prefix + ".")
    }


def group_coordinator(settings: KafkaSettings, group: str) -> int:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    desc = admin.describe_consumer_groups([group])[group].result(10)
    return int(desc.coordinator.id)


# -- long jobs and scale-in -------------------------------------------------------------


@pytest.mark.slow
def test_job_longer_than_max_poll_interval(tiny: Path, tmp_path: Path) -> None:
    """Each job takes 8 s, max.poll.interval.ms is 6 s (librdkafka only asks that it is at
    least session.timeout.ms, 6 s here): the worker stays in its group, each job runs once."""
    settings = new_settings()
    fleet = Fleet(
        settings,
        tmp_path / "logs",
        "--max-poll-interval-ms",
        "6000",
        env={"DISPATCHKIT_TEST_FAULTS": "slow:8"},
    )
    sent = dispatch_quiet(tiny, tmp_path, "long", settings)
    n = sent.batches  # 70 jobs: a few buckets, one message each
    assert 2 <= n <= 8, n
    fleet.start("w0")
    try:
        summary = collect_with(settings, "long", tmp_path)
    finally:
        codes = fleet.terminate()
    log = fleet.log("w0").read_text()
    assert summary.status == "complete", log
    assert codes == {"w0": 0}, log
    assert_run_exact(tiny, tmp_path, "long", settings)
    # Each batch ran once: no rebalance took a partition away mid-job, nothing aborted.
    assert worker_done_batches(log) == [n], log
    assert log.count("long job at") == n, log
    assert " lost " not in log and "aborting" not in log, log
    assert len(result_records(settings, "long", committed=False)) == n


def test_sigterm_mid_job_finishes_the_job_and_exits(tiny: Path, tmp_path: Path) -> None:
    """Scale in: SIGTERM a worker 1 s into a 3 s job; it finishes and commits that job and
    exits 0 within job time + 5 s; another worker does the rest."""
    settings = new_settings()
    fleet = Fleet(settings, tmp_path / "logs", env={"DISPATCHKIT_TEST_FAULTS": "slow:3"})
    dispatch_quiet(tiny, tmp_path, "scalein", settings)
    fleet.start("w0")
    try:
        wait_for(lambda: "long job at" in fleet.log("w0").read_text(), 60, "w0's first job")
        time.sleep(1.0)
        t0 = time.monotonic()
        fleet.procs["w0"].send_signal(signal.SIGTERM)
        code = fleet.procs["w0"].wait(60)
        seconds = time.monotonic() - t0
        fleet.start("w1")
        summary = collect_with(settings, "scalein", tmp_path)
    finally:
        codes = fleet.terminate()
    log = fleet.log("w0").read_text()
    assert code == 0, log
    assert seconds <= 3 + 5, f"took {seconds:.1f} s to stop"
    assert summary.status == "complete", fleet.tails()
    assert codes == {"w0": 0, "w1": 0}, fleet.tails()
    assert_run_exact(tiny, tmp_path, "scalein", settings)
    # The job w0 was in the middle of is w0's committed result, not dropped and redone.
    by_worker = [b["worker"] for b in result_records(settings, "scalein")]
    assert by_worker.count("w0") == 1 and worker_done_batches(log) == [1], log


# -- reruns -----------------------------------------------------------------------------


def test_rerun_of_a_complete_embedded_run_does_nothing(data: Path, tmp_path: Path) -> None:
    spec = RunSpec(input=str(data), out=tmp_path, run_id="again", workers=2, report=False)
    first = run_embedded(spec)
    assert first.status == "complete"
    parts = store_parts(tmp_path, "again")
    second = run_embedded(spec)
    assert second.status == "complete"
    assert second.jobs_sent == 0 and second.jobs_skipped == first.jobs
    assert second.duplicates_ignored == 0
    assert store_parts(tmp_path, "again") == parts
    assert_run_exact(data, tmp_path, "again")


def test_rerun_of_a_complete_kafka_run_does_nothing(data: Path, tmp_path: Path) -> None:
    settings = new_settings()
    fleet = Fleet(settings, tmp_path / "logs")
    dispatch_quiet(data, tmp_path, "again", settings)
    fleet.start_many(2)
    try:
        first = collect_with(settings, "again", tmp_path)
        assert first.status == "complete", fleet.tails()
        parts = store_parts(tmp_path, "again")
        jobs_end = end_offsets(settings, settings.jobs_topic)
        results_end = end_offsets(settings, settings.results_topic)

        again = dispatch_quiet(data, tmp_path, "again", settings)
        second = collect_with(settings, "again", tmp_path)
        time.sleep(2)  # time for the workers to (wrongly) do something
        assert end_offsets(settings, settings.jobs_topic) == jobs_end
        assert end_offsets(settings, settings.results_topic) == results_end
    finally:
        codes = fleet.terminate()
    assert set(codes.values()) == {0}, fleet.tails()
    assert again.jobs_sent == 0 and again.jobs_skipped == first.jobs
    assert second.status == "complete"
    assert second.duplicates_ignored == 0
    assert store_parts(tmp_path, "again") == parts
    assert_run_exact(data, tmp_path, "again", settings)
    assert pl.read_parquet(tmp_path / "results.parquet")["job_id"].n_unique() == first.jobs
