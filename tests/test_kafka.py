"""The Kafka backend on a real broker: same exact results as embedded and the reference."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import polars as pl
import pytest

from dispatchkit.apps.covid.generate import GenerateSpec, generate
from dispatchkit.kafka_run import collect, dispatch, run_kafka
from dispatchkit.runner import RunSpec, run_embedded

from .conftest import assert_exact, reference
from .kafka_helpers import (
    committed_result_job_ids,
    kafka_args,
    new_settings,
    read_all,
    start,
    stop,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def data_200k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kdata") / "k200k.parquet"
    generate(GenerateSpec(rows=200_000, seed=21), path)
    return path


def test_run_on_kafka_with_3_workers_equals_embedded_and_reference(
    data_200k: Path, tmp_path: Path
) -> None:
    settings = new_settings()
    spec = RunSpec(input=str(data_200k), out=tmp_path / "k", workers=3, run_id="k3")
    summary = run_kafka(spec, settings)
    assert summary.status == "complete"
    kafka_results = pl.read_parquet(tmp_path / "k" / "results.parquet")
    ref = reference(data_200k)
    assert_exact(kafka_results, ref)
    assert kafka_results["tests"].sum() == 200_000

    run_embedded(RunSpec(input=str(data_200k), out=tmp_path / "e", workers=2, run_id="k3"))
    embedded = pl.read_parquet(tmp_path / "e" / "results.parquet")
    assert embedded.drop("ci_low", "ci_high").equals(kafka_results.drop("ci_low", "ci_high"))
    np.testing.assert_allclose(embedded["ci_low"], kafka_results["ci_low"])

    counts = committed_result_job_ids(settings, "k3")
    assert len(counts) == ref.height
    assert max(counts.values()) == 1, "a job has two committed results"


def test_separate_processes_dispatch_workers_collect(small_parquet: Path, tmp_path: Path) -> None:
    settings = new_settings()
    kargs = kafka_args(settings)
    workers = [start(["worker", *kargs, "--worker-id", f"w{i}", "-q"]) for i in range(3)]
    try:
        d = subprocess.run(
            [
                sys.executable,
                "-m",
                "dispatchkit",
                "dispatch",
                str(small_parquet),
                *kargs,
                "--run-id",
                "sep",
                "--out",
                str(tmp_path),
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert d.returncode == 0, d.stderr
        c = subprocess.run(
            [
                sys.executable,
                "-m",
                "dispatchkit",
                "collect",
                *kargs,
                "--run-id",
                "sep",
                "--out",
                str(tmp_path),
                "--timeout",
                "120",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert c.returncode == 0, c.stderr + c.stdout
        assert "complete" in c.stdout
    finally:
        codes = stop(workers)
    assert codes == [0, 0, 0]
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))
    assert max(committed_result_job_ids(settings, "sep").values()) == 1
    # Collecting the finished run into a fresh directory reads every result again.
    again = collect(settings, "sep", tmp_path / "again", timeout=60)
    assert again.status == "complete"
    assert_exact(pl.read_parquet(tmp_path / "again" / "results.parquet"), reference(small_parquet))


def test_scale_out_and_in_mid_run(small_parquet: Path, tmp_path: Path) -> None:
    """Start 3 workers, add a 4th mid-run, SIGTERM one mid-run: still exact."""
    settings = new_settings()
    kargs = kafka_args(settings)
    slow = {"DISPATCHKIT_TEST_FAULTS": "slow:0.01"}
    spec = RunSpec(input=str(small_parquet), out=tmp_path, run_id="scale")
    dispatch(spec, settings)
    workers = [start(["worker", *kargs, "--worker-id", f"s{i}", "-q"], slow) for i in range(3)]
    progress: list[int] = []
    events: dict[str, float] = {}

    def on_progress(done: int, total: int) -> None:
        progress.append(done)
        if done > total * 0.2 and "added" not in events:
            workers.append(start(["worker", *kargs, "--worker-id", "s3", "-q"], slow))
            events["added"] = time.monotonic()
        if done > total * 0.4 and "stopped" not in events:
            workers[0].send_signal(signal.SIGTERM)
            events["stopped"] = time.monotonic()

    try:
        summary = collect(settings, "scale", tmp_path, on_progress=on_progress, timeout=120)
    finally:
        codes = stop(workers)
    assert "added" in events and "stopped" in events, progress[-5:]
    assert summary.status == "complete"
    assert codes == [0] * len(workers)
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))
    assert max(committed_result_job_ids(settings, "scale").values()) == 1


def test_a_plain_client_decodes_jobs_from_the_documented_format(
    small_parquet: Path, tmp_path: Path
) -> None:
    """docs/wire-format.md is enough: confluent-kafka, msgpack and pyarrow, no dispatchkit
    decoder."""
    import pyarrow as pa

    settings = new_settings()
    dispatch(RunSpec(input=str(small_parquet), out=tmp_path, run_id="wire"), settings)
    total_tests = 0
    keys = set()
    for msg in read_all(settings, settings.jobs_topic):
        headers = {k: v.decode() for k, v in msg.headers()}  # type: ignore[attr-defined]
        assert headers["dk-kind"] == "jobs" and headers["dk-v"] == "3"
        assert headers["dk-run"] == "wire"
        batch = msgpack.unpackb(msg.value())  # type: ignore[attr-defined]
        assert batch["kind"] == "jobs" and batch["v"] == 3
        assert batch["key_names"] == ["country", "date_hour"]
        body = pa.ipc.open_stream(batch["body"]).read_all()
        assert body.column_names == ["result"]
        index = pa.ipc.open_stream(batch["index"]).read_all()
        start = 0
        for job in index.to_pylist():
            rows = body.slice(start, job["rows"])
            assert rows.num_rows == job["rows"] > 0
            start += job["rows"]
            total_tests += rows.num_rows
            keys.add((job["key:country"], job["key:date_hour"]))
        assert start == body.num_rows
        assert msg.key().decode().startswith("b")  # type: ignore[attr-defined]
    ref = reference(small_parquet)
    assert total_tests == 30_000
    assert len(keys) == ref.height
    manifests = [
        msgpack.unpackb(m.value())
        for m in read_all(settings, settings.manifests_topic)  # type: ignore[attr-defined]
    ]
    assert manifests[-1]["status"] == "dispatched"
    assert manifests[-1]["total_jobs"] == ref.height


def test_one_key_always_lands_in_one_partition(small_parquet: Path, tmp_path: Path) -> None:
    settings = new_settings()
    dispatch(RunSpec(input=str(small_parquet), out=tmp_path, run_id="p1"), settings)
    where: dict[bytes, set[int]] = {}
    for msg in read_all(settings, settings.jobs_topic):
        where.setdefault(msg.key(), set()).add(msg.partition())  # type: ignore[attr-defined]
    assert where and all(len(p) == 1 for p in where.values())
    assert len({p for ps in where.values() for p in ps}) > 1


def test_skewed_key_is_split_and_exact_on_kafka(tmp_path: Path) -> None:
    path = tmp_path / "skew.parquet"
    generate(GenerateSpec(rows=8_000, seed=5, hot_key_rows=100_000), path)
    settings = new_settings()
    summary = run_kafka(
        RunSpec(
            input=str(path), out=tmp_path / "o", workers=2, max_message_bytes=4096, run_id="skew"
        ),
        settings,
    )
    assert summary.split_jobs >= 1 and summary.status == "complete"
    results = pl.read_parquet(tmp_path / "o" / "results.parquet")
    assert_exact(results, reference(path))
    assert results["tests"].max() >= 100_000
    assert all(len(m.value()) <= 4096 for m in read_all(settings, settings.jobs_topic))  # type: ignore[attr-defined]


def test_burst_worker_exits_on_an_empty_and_on_a_drained_topic(
    small_parquet: Path, tmp_path: Path
) -> None:
    """``worker --burst`` ends once nothing is left: on a fresh topic, and on one whose
    jobs another member already did (its partitions were never fetched from by this one,
    so only the group's committed offsets say that they are done)."""
    settings = new_settings(partitions=3)
    kargs = kafka_args(settings)

    def burst(worker_id: str) -> subprocess.CompletedProcess[str]:
        # The timeout only keeps a hanging worker from hanging the suite.
        return subprocess.run(
            [sys.executable, "-m", "dispatchkit", "worker", *kargs, "--burst",
             "--worker-id", worker_id],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    empty = burst("empty")
    assert empty.returncode == 0, empty.stderr
    assert "0 jobs done" in empty.stdout

    spec = RunSpec(input=str(small_parquet), out=tmp_path / "out", run_id="burst")
    sent = dispatch(spec, settings)
    first = burst("first")
    assert first.returncode == 0, first.stderr
    assert f"{sent.jobs:,} jobs done" in first.stdout
    assert collect(settings, "burst", tmp_path / "out", timeout=60).status == "complete"

    drained = burst("drained")
    assert drained.returncode == 0, drained.stderr
    assert "0 messages, 0 jobs done" in drained.stdout


def test_run_kafka_refuses_a_mistyped_input_or_task_before_starting_workers(
    small_parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dispatchkit.kafka_run as kafka_run
    from dispatchkit.brokers.kafka.settings import KafkaSettings
    from dispatchkit.errors import InputError, UsageError
    from dispatchkit.runner import RunSpec

    spawned: list[str] = []
    monkeypatch.setattr(kafka_run, "spawn_worker", lambda *a, **k: spawned.append("worker"))
    # No broker is needed to refuse them: nothing is asked of one first.
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(InputError, match="no such file"):
        kafka_run.run_kafka(RunSpec(input=str(tmp_path / "nope.parquet"), out=tmp_path), settings)
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        kafka_run.run_kafka(RunSpec(input=str(small_parquet), out=tmp_path, task="nope"), settings)
    assert spawned == []
