"""Poison messages, failing jobs, dead letters and replay on a real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import polars as pl
import pytest
from confluent_kafka import Producer

from dispatchkit.brokers.kafka.broker import ensure_topics
from dispatchkit.dlq import list_dead, replay
from dispatchkit.kafka_run import collect, dispatch, status
from dispatchkit.runner import RunSpec

from .conftest import assert_exact, reference
from .kafka_helpers import committed_result_job_ids, kafka_args, new_settings, read_all, start, stop

pytestmark = pytest.mark.kafka

SALES = "examples/sales/app.py:app"

POISON = [
    b"\x00\x01garbage that is not msgpack",
    msgpack.packb(
        {
            "v": 99,
            "kind": "jobs",
            "run_id": "poison",
            "batch_id": "x",
            "task": "positive-rate",
            "jobs": [],
        }
    ),
    msgpack.packb(
        {
            "v": 1,
            "kind": "jobs",
            "run_id": "poison",
            "batch_id": "y",
            "task": "positive-rate",
            "jobs": [
                {
                    "job_id": "j",
                    "country": "Italy",
                    "date_hour": 1583038800,
                    "part": 0,
                    "parts": 1,
                    "n": 50,
                    "outcomes": b"\x01",
                }
            ],
        }
    ),
    msgpack.packb(
        {
            "v": 1,
            "kind": "jobs",
            "run_id": "poison",
            "batch_id": "z",
            "task": "no-such-task",
            "jobs": [],
        }
    ),
    b"",
]


def test_poison_messages_are_dead_lettered_at_once(small_parquet: Path, tmp_path: Path) -> None:
    settings = new_settings()
    ensure_topics(settings)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i, value in enumerate(POISON):
        producer.produce(
            settings.jobs_topic,
            value=value,
            key=f"poison-{i}".encode(),
            headers=[("dk-run", b"poison")],
        )
    producer.flush(10)
    dispatch(RunSpec(input=str(small_parquet), out=tmp_path, run_id="poison"), settings)
    workers = [
        start(["worker", *kafka_args(settings), "--worker-id", f"p{i}", "-q"]) for i in range(2)
    ]
    try:
        summary = collect(settings, "poison", tmp_path, timeout=120)
        alive = [w.poll() is None for w in workers]
    finally:
        codes = stop(workers)
    assert alive == [True, True], "a worker died on a poison message"
    assert codes == [0, 0]
    assert summary.status == "complete"
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))

    dead = list(read_all(settings, settings.dlq_topic))
    assert len(dead) == len(POISON)
    by_key = {m.key(): m for m in dead}  # type: ignore[attr-defined]
    for i, value in enumerate(POISON):
        msg = by_key[f"poison-{i}".encode()]
        assert (msg.value() or b"") == value  # type: ignore[attr-defined]
        h = {k: v.decode() for k, v in msg.headers()}  # type: ignore[attr-defined]
        assert h["dk-original-topic"] == settings.jobs_topic
        assert int(h["dk-original-offset"]) >= 0 and int(h["dk-original-partition"]) >= 0
        assert int(h["dk-original-timestamp"]) > 0
        assert h["dk-group"] == f"{settings.topic_prefix}.workers"
        assert h["dk-worker"] in ("p0", "p1")
        assert h["dk-error-class"] == "DecodeError" and h["dk-error"]
        assert h["dk-attempts"] == "1"
        assert float(h["dk-first-failure"]) > 0


def test_failing_job_is_dead_lettered_then_replayed(small_parquet: Path, tmp_path: Path) -> None:
    settings = new_settings()
    kargs = kafka_args(settings)
    ref = reference(small_parquet)
    failing = ref.filter(pl.col("country") == "Portugal").height
    assert failing > 0
    dispatch(RunSpec(input=str(small_parquet), out=tmp_path, run_id="dl"), settings)
    broken = [
        start(
            ["worker", *kargs, "--worker-id", "b0", "--attempts", "2", "-q"],
            {"DISPATCHKIT_TEST_FAULTS": "fail:Portugal"},
        )
    ]
    try:
        summary = collect(settings, "dl", tmp_path, timeout=120, dead_grace=3)
    finally:
        stop(broken)
    assert summary.status == "incomplete"
    assert len(summary.failed_jobs) == failing
    assert all(f.startswith("country=Portugal ") for f in summary.failed_jobs)
    assert_exact(
        pl.read_parquet(tmp_path / "results.parquet"), ref.filter(pl.col("country") != "Portugal")
    )
    entries = list_dead(settings, run_id="dl")
    assert sum(len(e.jobs) for e in entries) == failing
    assert all(e.headers["dk-attempts"] == "2" for e in entries)
    assert all(e.headers["dk-error-class"] == "RuntimeError" for e in entries)

    # The cause is fixed: healthy workers, replay, collect again.
    listed = subprocess.run(
        [sys.executable, "-m", "dispatchkit", "dlq", "list", *kargs, "--run-id", "dl"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and "Portugal" in listed.stdout
    # Workers of another app could not take them: a replay under it is refused, whole.
    cmd = ["dlq", "replay", *kargs, "--run-id", "dl", "--app", SALES]
    other = subprocess.run(
        [sys.executable, "-m", "dispatchkit", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    err = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(err) == 1, other.stderr
    assert "made by app 'covid'" in err[0] and "'sales'" in err[0], err
    assert replay(settings, run_id="dl") == (failing, 0)
    # Replayed and still pending: a second replay publishes nothing.
    assert replay(settings, run_id="dl") == (0, failing)

    # The cause was not fixed after all: the replayed jobs are dead-lettered again...
    broken = [
        start(
            ["worker", *kargs, "--worker-id", "b0", "--attempts", "2", "-q"],
            {"DISPATCHKIT_TEST_FAULTS": "fail:Portugal"},
        )
    ]
    try:
        deadline = time.monotonic() + 120
        while sum(len(e.jobs) for e in list_dead(settings, run_id="dl")) < 2 * failing:
            assert time.monotonic() < deadline, "replayed jobs were not dead-lettered again"
            time.sleep(1)
    finally:
        stop(broken)
    # ... so they are replayed once more, to healthy workers this time.
    healthy = [start(["worker", *kargs, "--worker-id", "h0", "-q"])]
    try:
        assert replay(settings, run_id="dl") == (failing, failing)
        summary = collect(settings, "dl", tmp_path, timeout=120)
    finally:
        stop(healthy)
    assert summary.status == "complete"
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), ref)
    assert max(committed_result_job_ids(settings, "dl").values()) == 1
    # Done: a further replay finds nothing left to do.
    assert replay(settings, run_id="dl")[0] == 0


def test_status_shows_progress(small_parquet: Path, tmp_path: Path) -> None:
    settings = new_settings()
    kargs = kafka_args(settings)
    dispatch(RunSpec(input=str(small_parquet), out=tmp_path, run_id="st"), settings)
    before = subprocess.run(
        [sys.executable, "-m", "dispatchkit", "status", *kargs, "--run-id", "st"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert before.returncode == 0, before.stderr
    total = reference(small_parquet).height
    assert f"0 done of {total:,}" in before.stdout
    assert "workers none in the group" in before.stdout
    # Jobs pending and no result for longer than --stall-seconds: stalled, and where.
    cmd = ["status", *kargs, "--run-id", "st", "--stall-seconds", "0"]
    stalled = subprocess.run(
        [sys.executable, "-m", "dispatchkit", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stalled.stdout.startswith("run st: stalled"), stalled.stdout
    assert "STALLED partition" in stalled.stdout and "no result yet" in stalled.stdout
    # A live member of the group is listed with its partitions.
    w = [start(["worker", *kargs, "--worker-id", "s0", "-q"])]
    try:
        deadline = time.monotonic() + 120
        while True:
            st = status(settings, "st")
            if st.state == "complete" and st.members:
                break
            assert time.monotonic() < deadline, st
            time.sleep(1)
    finally:
        assert stop(w) == [0]
    assert st.jobs_done == st.jobs_total == total and st.jobs_dead == 0
    assert [m.client_id for m in st.members] == ["s0"]
    assert sorted(st.members[0].partitions) == sorted(st.lag)
    assert not st.stalled and sum(st.lag.values()) == 0
    # Throughput is over a window ending now: it is 0 once nothing moves.
    assert status(settings, "st", now=time.time() + 60).jobs_per_second == 0

    # A later run's status reads the topics from its creation on: none of this run's
    # records (the clock slack set to 0 here: the runs are seconds apart).
    time.sleep(1.5)
    dispatch(RunSpec(input=str(small_parquet), out=tmp_path / "later", run_id="st2"), settings)
    later = status(settings, "st2", clock_slack_ms=0)
    mine = sum(
        1
        for m in read_all(settings, settings.jobs_topic)
        if dict(m.headers() or []).get("dk-run") == b"st2"  # type: ignore[attr-defined]
    )
    assert later.state != "unknown" and later.records_read == mine, (later.records_read, mine)
    assert status(settings, "st2").records_read > mine  # with the default slack: both runs
    after = subprocess.run(
        [sys.executable, "-m", "dispatchkit", "status", *kargs, "--run-id", "st"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"{total:,} done of {total:,}" in after.stdout, after.stdout
    assert after.stdout.startswith("run st: complete"), after.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "dispatchkit", "status", *kargs, "--run-id", "st", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    got = json.loads(as_json.stdout)
    assert got["state"] == "complete" and got["jobs_done"] == total, got
    assert "lag" in after.stdout and "[0] 0" in after.stdout
    assert "app     covid " in after.stdout and "not the app given" not in after.stdout
    other = subprocess.run(
        [sys.executable, "-m", "dispatchkit", "status", *kargs, "--run-id", "st", "--app", SALES],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 0, other.stderr
    assert "not the app given (sales " in other.stdout, other.stdout
