"""The collector on a real broker: its read positions belong to its store, fatal errors end
it, and a run that was never dispatched is waited for within a bound.

Issue 10 ("exact or refused"): whatever the sequence of collectors, output directories,
kills and restarts, every store ends complete and exact.
"""

from __future__ import annotations

import logging
import random
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewPartitions  # type: ignore[attr-defined]

from dispatchkit import cli
from dispatchkit.brokers.kafka.broker import KafkaBroker, consumer_error, ensure_topics, is_fatal
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.errors import RET_BROKER, FatalBrokerError
from dispatchkit.kafka_run import collect, dispatch
from dispatchkit.runner import STORE_NAME, RunSpec, RunSummary

from .fault_helpers import (
    SMALL_MESSAGES,
    Fleet,
    assert_run_exact,
    make_input,
    python_cli,
    spawn,
    store_duplicates,
    store_parts,
    wait_for,
)
from .kafka_helpers import kafka_args, new_settings

kafka = pytest.mark.kafka

#: Each batch takes 30 ms more: 300 batches over 2 workers take about 5 s.
SLOW = {"DISPATCHKIT_TEST_FAULTS": "slow:0.03"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30,000 rows, 20 countries × 15 days: about 5,600 jobs in 300 job batches."""
    path = tmp_path_factory.mktemp("collector") / "in300.parquet"
    return make_input(path, rows=30_000, days=15, seed=404)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(new_settings(), tmp_path / "logs", env=SLOW)
    try:
        yield f
    finally:
        codes = f.terminate()
        assert set(codes.values()) <= {0}, f.tails()


def collect_args(settings: KafkaSettings, run_id: str, out: Path, *extra: str) -> list[str]:
    return ["collect", *kafka_args(settings), "--run-id", run_id, "--out", str(out), *extra]


def run_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        python_cli(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


def stored_positions(out: Path, run_id: str) -> dict[int, int]:
    con = duckdb.connect(str(out / STORE_NAME), read_only=True)
    try:
        rows = con.execute(
            "SELECT partition, next_offset FROM read_positions WHERE run_id = ?", [run_id]
        ).fetchall()
    finally:
        con.close()
    return {int(p): int(o) for p, o in rows}


def dispatched(data: Path, out: Path, run_id: str, settings: KafkaSettings) -> RunSummary:
    # Small messages (~300 for this input, instead of 9): a collector dies mid-run.
    spec = RunSpec(
        input=str(data), out=out, run_id=run_id, report=False, max_message_bytes=SMALL_MESSAGES
    )
    return dispatch(spec, settings)


# -- the store owns the collector's positions ---------------------------------------------


@kafka
def test_killed_collector_resumes_exact_after_another_store_collected_the_run(
    data: Path, tmp_path: Path, fleet: Fleet
) -> None:
    """Collector A (dir A) dies mid-run; B collects the whole run into dir B; A resumed
    completes dir A. Before: A resumed from B's committed group offsets and stayed short."""
    settings = fleet.settings
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    dispatched(data, tmp_path, "ab", settings)
    fleet.start_many(2)
    a1 = spawn(
        [*collect_args(settings, "ab", dir_a), "--no-report", "-q"],
        tmp_path / "collect-a1.log",
        {"DISPATCHKIT_TEST_FAULTS": "crash:collector.after_store@3"},
    )
    assert a1.wait(180) == 137, (tmp_path / "collect-a1.log").read_text()
    short = store_parts(dir_a, "ab")
    assert 0 < short < 5_000
    b = run_cli([*collect_args(settings, "ab", dir_b, "--timeout", "60"), "--no-report"], 240)
    assert b.returncode == 0, b.stderr
    a2 = run_cli([*collect_args(settings, "ab", dir_a, "--timeout", "30"), "--no-report"], 240)
    assert a2.returncode == 0, a2.stderr + a2.stdout
    for out in (dir_a, dir_b):
        assert store_duplicates(out, "ab") == 0
        assert_run_exact(data, out, "ab", settings)


@kafka
def test_two_collectors_into_different_dirs_at_once_both_finish_exact(
    data: Path, tmp_path: Path, fleet: Fleet
) -> None:
    """Before: both joined one group with one static member id; one was fenced and looped
    on "commit failed (Local: Fatal error)"."""
    settings = fleet.settings
    dispatched(data, tmp_path, "two", settings)
    fleet.start_many(2)
    outs = [tmp_path / "x", tmp_path / "y"]
    procs = [
        spawn(
            [*collect_args(settings, "two", out, "--timeout", "60"), "--no-report", "-q"],
            tmp_path / f"collect-{out.name}.log",
        )
        for out in outs
    ]
    codes = [p.wait(240) for p in procs]
    logs = [(tmp_path / f"collect-{out.name}.log").read_text() for out in outs]
    assert codes == [0, 0], logs
    assert not any("Fatal" in text for text in logs), logs
    for out in outs:
        assert_run_exact(data, out, "two", settings)


@kafka
def test_collectors_killed_at_random_and_restarted_end_exact(
    data: Path, tmp_path: Path, fleet: Fleet
) -> None:
    """kill -9 two collectors (dirs A and B, running at once) at random moments, three
    rounds, restart them; both stores end complete and exact, each part stored once."""
    settings = fleet.settings
    rng = random.Random(10)
    dispatched(data, tmp_path, "storm", settings)
    fleet.start_many(2)
    outs = {"a": tmp_path / "a", "b": tmp_path / "b"}

    def start(name: str) -> subprocess.Popen[bytes]:
        args = [*collect_args(settings, "storm", outs[name], "--timeout", "60"), "--no-report"]
        return spawn([*args, "-q"], tmp_path / f"collect-{name}.log")

    procs = {name: start(name) for name in outs}
    kills = 0
    for _ in range(3):
        time.sleep(rng.uniform(0.5, 2.5))
        for name in rng.sample(sorted(outs), rng.randint(1, 2)):
            if procs[name].poll() is None:
                procs[name].send_signal(signal.SIGKILL)
                procs[name].wait(30)
                kills += 1
            procs[name] = start(name)
    codes = {name: p.wait(240) for name, p in procs.items()}
    logs = {name: (tmp_path / f"collect-{name}.log").read_text() for name in outs}
    assert codes == {"a": 0, "b": 0}, logs
    assert kills >= 2, "the collectors finished before the kills: make the run slower"
    for out in outs.values():
        assert store_duplicates(out, "storm") == 0
        assert_run_exact(data, out, "storm", settings)


@kafka
def test_partitions_added_to_the_results_topic_are_read(
    data: Path, tmp_path: Path, fleet: Fleet
) -> None:
    """Partitions added while the collector runs (results land on them once the workers
    see them): the collector assigns them itself and reads them from their beginning."""
    settings = fleet.settings
    dispatched(data, tmp_path, "grow", settings)
    admin = AdminClient(settings.client_config())
    grown: list[float] = []

    def on_tick() -> None:
        if not grown:
            for fut in admin.create_partitions([NewPartitions(settings.results_topic, 9)]).values():
                fut.result(30)
            grown.append(time.monotonic())
            fleet.start_many(2)  # their producers see 9 partitions

    summary = collect(settings, "grow", tmp_path / "o", report=False, timeout=60, on_tick=on_tick)
    assert summary.status == "complete"
    positions = stored_positions(tmp_path / "o", "grow")
    assert set(positions) == set(range(9)) or max(positions) >= 6, positions
    assert any(p >= 6 and n > 0 for p, n in positions.items()), positions
    assert_run_exact(data, tmp_path / "o", "grow", settings)


@kafka
def test_a_recreated_results_topic_is_read_again_and_said_so(
    data: Path, tmp_path: Path, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Positions beyond the end of a recreated results topic: one line says so and the
    topic is read from its beginning (not silently nothing)."""
    settings = fleet.settings
    dispatched(data, tmp_path, "re", settings)
    fleet.start_many(2)
    out = tmp_path / "o"
    assert collect(settings, "re", out, report=False, timeout=60).status == "complete"
    assert fleet.terminate() == {"w0": 0, "w1": 0}
    before = stored_positions(out, "re")
    assert sum(before.values()) > 0
    admin = AdminClient(settings.client_config())
    admin.delete_topics([settings.results_topic])[settings.results_topic].result(30)
    wait_for(
        lambda: settings.results_topic not in admin.list_topics(timeout=10).topics,
        60,
        "the results topic to go",
    )
    ensure_topics(settings)
    # One record of the run in the new topic, as a re-dispatched run's worker would write.
    producer = Producer(settings.client_config())
    producer.produce(settings.results_topic, b"x", key=b"k", headers=[("dk-run", b"other")])
    producer.flush(30)
    with caplog.at_level(logging.WARNING, logger="dispatchkit"):
        again = collect(settings, "re", out, report=False, timeout=30)
    assert again.status == "complete"
    said = [r.getMessage() for r in caplog.records if "recreated" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0], caplog.text
    after = stored_positions(out, "re")
    assert sum(after.values()) < sum(before.values()), (before, after)
    assert_run_exact(data, out, "re")


# -- the store writes results and positions in one transaction -----------------------------


def test_store_writes_results_and_positions_together_and_counts_repeats() -> None:
    from dispatchkit.store import ReadPositions, ResultStore

    from .conftest import result_message, started_store

    def result(*jobs: str) -> object:
        return result_message("r", [(j, 0, 1, 2, 1) for j in jobs])

    with ResultStore(":memory:") as store:
        started_store(store)
        assert store.read_positions("r", "t").offsets == {}
        store.add(result("a", "b"))  # type: ignore[arg-type]
        assert store.flush(ReadPositions("r", "t", {0: 5, 1: 2}, "id1")) == 2
        assert store.read_positions("r", "t") == ReadPositions("r", "t", {0: 5, 1: 2}, "id1")
        assert store.read_positions("other", "t").offsets == {}
        store.add(result("a"))  # type: ignore[arg-type]  # read again: ignored, counted
        assert store.flush(ReadPositions("r", "t", {0: 6}, "id2")) == 0
        assert store.duplicates == 1
        # The positions given replace the stored ones (a topic read again from the start).
        assert store.read_positions("r", "t") == ReadPositions("r", "t", {0: 6}, "id2")
        # A write that fails stores neither the results nor the positions.
        store.add(result("c"))  # type: ignore[arg-type]
        store.con.execute("DROP TABLE read_positions")
        with pytest.raises(duckdb.CatalogException):
            store.flush(ReadPositions("r", "t", {0: 9}))
        assert store.jobs_done("r") == 2


# -- fatal errors end the collector -------------------------------------------------------


def test_fatal_error_classification_with_real_kafka_errors() -> None:
    assert is_fatal(KafkaError(KafkaError._FATAL))  # what librdkafka returns after one
    assert is_fatal(KafkaError(KafkaError.FENCED_INSTANCE_ID, fatal=True))
    assert is_fatal(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "x", fatal=True))
    assert not is_fatal(KafkaError(KafkaError._TRANSPORT))
    assert not is_fatal(KafkaError(KafkaError._TIMED_OUT, retriable=True))
    err = consumer_error(KafkaError(KafkaError._FATAL, "gone\nfor good"), "collector")
    assert isinstance(err, FatalBrokerError) and err.exit_code == RET_BROKER == 3
    assert "\n" not in str(err)


def _fenced_consumer(settings: KafkaSettings) -> Consumer:
    """A real consumer that librdkafka made fatal: a static member fenced by a newer
    instance of the same ``group.instance.id``."""
    ensure_topics(settings)
    conf = settings.client_config(
        **{
            "group.id": f"fence-{uuid.uuid4().hex[:8]}",
            "group.instance.id": "same",
            "session.timeout.ms": 6000,
        }
    )
    old = Consumer(conf)
    old.subscribe([settings.results_topic])
    wait_for(lambda: bool(old.poll(0.2) or old.assignment()), 60, "the first member")
    new = Consumer(conf)
    new.subscribe([settings.results_topic])
    wait_for(lambda: bool(new.poll(0.2) or new.assignment()), 60, "the second member")
    new.close()
    return old


@kafka
def test_a_fatal_consumer_ends_the_collector_with_one_line_and_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collector's broker, given a consumer that is really fatal, raises
    FatalBrokerError on its next read (no retry loop); the CLI turns that into one line
    on stderr and exit 3."""
    settings = new_settings()
    fenced = _fenced_consumer(settings)
    broker = KafkaBroker(settings, collector_group="c")
    broker._consumer = fenced  # the real fenced client, as the collector would hold it
    deadline = time.monotonic() + 60
    with pytest.raises(FatalBrokerError) as caught:
        while time.monotonic() < deadline:
            broker.results(0.5)
    assert "\n" not in str(caught.value)
    broker.close()

    def fatal_collect(*args: object, **kw: object) -> RunSummary:
        raise caught.value

    monkeypatch.setattr("dispatchkit.kafka_run.collect", fatal_collect)
    code = cli.main(["collect", *kafka_args(settings), "--run-id", "r", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert len(err) == 1 and err[0].startswith("dispatchkit: error: "), err


# -- a run that was never dispatched --------------------------------------------------------


@kafka
def test_collect_of_an_unknown_run_exits_1_within_the_bound(tmp_path: Path) -> None:
    settings = new_settings()
    t0 = time.monotonic()
    done = run_cli(
        [*collect_args(settings, "never-dispatched", tmp_path), "--wait-for-dispatch", "4"], 60
    )
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stderr
    assert took < 30, took
    lines = done.stderr.strip().splitlines()
    assert re.fullmatch(
        r"dispatchkit: error: run 'never-dispatched' was not dispatched: no manifest on "
        + re.escape(settings.manifests_topic)
        + r" after 4 s \(.*\)",
        lines[-1],
    ), done.stderr
    assert any("waiting" in line and settings.manifests_topic in line for line in lines), lines


def test_collect_waits_60_s_for_a_dispatch_by_default() -> None:
    args = cli.build_parser().parse_args(["collect", "-b", "x:1", "--run-id", "r"])
    assert args.wait_for_dispatch == 60
    args = cli.build_parser().parse_args(
        ["collect", "-b", "x:1", "--run-id", "r", "--wait-for-dispatch", "0"]
    )
    assert args.wait_for_dispatch == 0


@kafka
def test_collect_started_before_its_dispatch_waits_for_it(data: Path, tmp_path: Path) -> None:
    """The manifest arrives while the collector waits (as in ``run --broker kafka``)."""
    settings = new_settings()
    proc = spawn(
        [*collect_args(settings, "late", tmp_path / "o", "--wait-for-dispatch", "120"), "-q"],
        tmp_path / "collect.log",
    )
    fleet = Fleet(settings, tmp_path / "logs")
    try:
        time.sleep(3)
        dispatched(data, tmp_path, "late", settings)
        fleet.start_many(2)
        assert proc.wait(180) == 0, (tmp_path / "collect.log").read_text()
    finally:
        assert set(fleet.terminate().values()) <= {0}, fleet.tails()
    assert_run_exact(data, tmp_path / "o", "late", settings)
