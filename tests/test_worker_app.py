"""Workers and the user's code: the right app or none, schemas checked, failures per job."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dispatchkit import wire
from dispatchkit.app import load_app
from dispatchkit.errors import MisdeployedError
from dispatchkit.worker import RetryPolicy, Worker

SRC = str(Path(__file__).resolve().parents[1] / "src")

APP = """
import pyarrow as pa
import pyarrow.compute as pc
import dispatchkit as dk

app = dk.App("shops", version="VERSION")
app.columns(shop=dk.Text(), ts=dk.Timestamp(), amount=dk.Float())
app.key("shop", dk.floor("ts", "day", name="day"))

@app.task(result={"n": pa.int64(), "total": pa.float64()}, reads=("amount",))
def total(key, rows):
    if key["shop"] == "broken":
        raise ValueError("no total for a broken shop")
    return {"n": rows.num_rows, "total": pc.sum(rows["amount"]).as_py()}

@app.task(result={"n": pa.int64()}, reads=("amount",))
def wrong(key, rows):
    return {"n": "many"}
"""


def write_app(where: Path, version: str = "1", name: str = "shops.py") -> str:
    path = where / name
    path.write_text(APP.replace("VERSION", version))
    return f"{path}:app"


def sample(where: Path) -> Path:
    path = where / "sales.parquet"
    day = 86_400_000_000
    pq.write_table(
        pa.table(
            {
                "shop": ["a", "a", "b", "broken", "b"],
                "ts": pa.array([0, day // 2, day, day, 3 * day], pa.timestamp("us", tz="UTC")),
                "amount": [1.0, 2.0, 3.0, 4.0, 5.0],
            }
        ),
        path,
    )
    return path


def job_messages(app_spec: str, task: str, where: Path) -> list[bytes]:
    from dispatchkit.dispatcher import Dispatcher
    from dispatchkit.reader import InputReader

    app = load_app(app_spec)
    with InputReader([sample(where)], app, spill_dir=where) as reader:
        d = Dispatcher(reader, app=app, task=task, run_id="r")
        return [m.payload for m in d.messages()]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = dict(env or os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("DISPATCHKIT_TEST_FAULTS", None)
    return subprocess.run(
        [sys.executable, "-m", "dispatchkit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=e,
        check=False,
    )


def test_a_worker_with_other_code_refuses_the_batch(tmp_path: Path) -> None:
    payload = job_messages(write_app(tmp_path, "1"), "total", tmp_path)[0]
    other = load_app(write_app(tmp_path, "2", "shops_v2.py"))
    with pytest.raises(MisdeployedError, match=r"was made by app 'shops' 1:.*runs 2:") as exc:
        Worker("w", app=other).handle(payload)
    assert exc.value.exit_code == 4
    covid = load_app(None)
    with pytest.raises(MisdeployedError, match="is for app 'shops'; this worker runs app 'covid'"):
        Worker("w", app=covid).handle(payload)


def test_a_worker_without_the_task_refuses_the_batch(tmp_path: Path) -> None:
    payload = job_messages(write_app(tmp_path), "total", tmp_path)[0]
    app = load_app(write_app(tmp_path))
    del app.tasks["total"]  # deployed without that task
    with pytest.raises(MisdeployedError, match=r"asks for task 'total'.*it has: wrong"):
        Worker("w", app=app).handle(payload)


def test_a_raising_task_is_retried_then_dead_lettered_per_job(tmp_path: Path) -> None:
    spec = write_app(tmp_path)
    worker = Worker("w", RetryPolicy(attempts=2, base_delay=0.0), app=load_app(spec))
    dead_shops, shops = [], []
    for payload in job_messages(spec, "total", tmp_path):
        handled = worker.handle(payload)
        shops += wire.decode_results(handled.result).values().column("shop").to_pylist()
        if handled.failed is not None:
            assert handled.rejection is not None
            assert handled.rejection.error_class == "ValueError"
            assert handled.rejection.attempts == 2
            dead = wire.decode_jobs(handled.failed)
            dead_shops += [k["shop"] for k in dead.keys().to_pylist()]
    assert dead_shops == ["broken"]
    assert sorted(shops) == ["a", "b", "b"]  # every other job computed once


def test_a_result_off_its_schema_is_one_line_and_dead_lettered(tmp_path: Path) -> None:
    spec = write_app(tmp_path)
    out = tmp_path / "out"
    data = str(sample(tmp_path))
    proc = cli("run", data, "--app", spec, "--task", "wrong", "--out", str(out), "-q")
    assert proc.returncode == 1, proc.stderr
    failures = [line.strip() for line in proc.stdout.splitlines() if "ResultError" in line]
    assert len(failures) == 4  # every job, each named once, not retried
    assert failures[0].endswith(
        "ResultError: task wrong: column n is int64 in the result schema, "
        "but the task returned str ('many')"
    )


def test_an_app_outside_the_package_runs_exact_and_resumes(tmp_path: Path) -> None:
    spec = write_app(tmp_path)
    out = tmp_path / "out"
    args = ["run", str(sample(tmp_path)), "--app", spec, "--task", "total", "--out", str(out)]
    proc = cli(*args, "-q", "--attempts", "1")
    assert proc.returncode == 1  # the broken shop is dead-lettered
    got = pl.read_parquet(out / "results.parquet").sort("shop", "day")
    assert got.columns == ["run_id", "job_id", "shop", "day", "n", "total"]
    assert got.select("shop", "n", "total").rows() == [("a", 2, 3.0), ("b", 1, 3.0), ("b", 1, 5.0)]
    assert str(got.schema["day"]) == "Datetime(time_unit='us', time_zone='UTC')"


@pytest.mark.kafka
def test_a_misdeployed_kafka_worker_exits_4_and_leaves_the_batch(tmp_path: Path) -> None:
    bootstrap = os.environ.get("DISPATCHKIT_BOOTSTRAP_SERVERS")
    if not bootstrap:
        if os.environ.get("CI"):
            pytest.fail("DISPATCHKIT_BOOTSTRAP_SERVERS is not set")
        pytest.skip("no Kafka broker (set DISPATCHKIT_BOOTSTRAP_SERVERS)")
    good, bad = write_app(tmp_path, "1"), write_app(tmp_path, "2", "shops_v2.py")
    prefix = f"mis{uuid.uuid4().hex[:8]}"
    common = ["-b", bootstrap, "--topic-prefix", prefix, "--partitions", "2"]
    data = str(sample(tmp_path))
    sent = cli("dispatch", data, "--app", good, "--task", "total", "--run-id", "m",
               "--out", str(tmp_path / "d"), "-q", *common)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    refused = cli("worker", "--app", bad, "--burst", "-q", *common)
    assert refused.returncode == 4, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "deploy the same code" in lines[0], refused.stderr
    # The batch is still there for a worker with the right code.
    done = cli("worker", "--app", good, "--burst", "-q", "--attempts", "1", *common)
    assert done.returncode == 0, done.stderr
    collected = cli("collect", "--app", good, "--run-id", "m", "--out", str(tmp_path / "c"),
                    "-q", "--no-report", "--timeout", "30", *common)  # fmt: skip
    assert collected.returncode == 1  # the broken shop is dead-lettered, the rest exact
    got = pl.read_parquet(tmp_path / "c" / "results.parquet").sort("shop", "day")
    assert got.select("shop", "n", "total").rows() == [("a", 2, 3.0), ("b", 1, 3.0), ("b", 1, 5.0)]
