"""Prometheus metrics and health endpoints: the server, the hooks, and a Kafka worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, Histogram
from prometheus_client.parser import text_string_to_metric_families

from dispatchkit import metrics
from dispatchkit.app import load_app
from dispatchkit.apps.covid.generate import GenerateSpec, generate
from dispatchkit.cli import main
from dispatchkit.runner import RunSpec, run_embedded

from .kafka_helpers import cli, kafka_args, new_settings, start, stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str] | None:
    """``(status, body)`` of a GET, or ``None`` if nothing answers on the port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: ``(name, sorted labels) → value``."""
    answer = get(port, "/metrics")
    assert answer is not None and answer[0] == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer[1])
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_for(what: str, check: object, seconds: float = 120) -> None:
    """Poll ``check()`` until true (a wait for the processes, not a timed assertion)."""
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.2)


def quarantined(app: str) -> dict[str, float]:
    """``reason → rows`` of the quarantine counter, in this process."""
    return {
        s.labels["reason"]: s.value
        for family in REGISTRY.collect()
        if family.name == "dispatchkit_rows_quarantined"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["app"] == app
    }


@pytest.fixture
def fresh_health() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


# -- the endpoint -------------------------------------------------------------------------


def test_health_endpoints_follow_readiness_and_draining(fresh_health: None) -> None:
    with metrics.serve(free_port(), version="9.9") as server:
        port = server.port
        assert get(port, "/healthz/live") == (200, "live\n")
        assert get(port, "/healthz/ready") == (503, "not ready\n")  # no role is ready yet
        metrics.set_ready("collector", True)
        assert get(port, "/healthz/ready") == (200, "ready\n")
        metrics.set_draining()  # SIGTERM: draining
        assert get(port, "/healthz/ready") == (503, "not ready\n")
        assert get(port, "/healthz/live") == (200, "live\n")
        samples = scrape(port)
        assert samples[("dispatchkit_ready", ())] == 0
        assert samples[("dispatchkit_build_info", (("version", "9.9"),))] == 1
        answer = get(port, "/nothing")
        assert answer is not None and answer[0] == 404
    assert get(port, "/healthz/live") is None  # closed: the port is free again


def test_a_taken_port_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main(["collect", "-b", "127.0.0.1:1", "--run-id", "x", "--metrics-port", str(port)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dispatchkit: error: --metrics-port {port}: ")


def test_a_bad_port_in_the_environment_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHKIT_METRICS_PORT", "http")
    code = main(["collect", "-b", "127.0.0.1:1", "--run-id", "x"])
    assert code == 2
    assert "$DISPATCHKIT_METRICS_PORT: 'http' is not a port number" in capsys.readouterr().err


def test_observe_many_is_count_observations_of_one_value() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    a = Histogram("a_seconds", "a", buckets=(0.1, 1.0), registry=registry)
    b = Histogram("b_seconds", "b", buckets=(0.1, 1.0), registry=registry)
    for v, n in ((0.05, 3), (0.5, 7), (5.0, 2)):
        metrics.observe_many(a, v, n)
        for _ in range(n):
            b.observe(v)
    for suffix, labels in (("_count", {}), ("_sum", {}), ("_bucket", {"le": "0.1"})):
        assert registry.get_sample_value(f"a_seconds{suffix}", labels) == pytest.approx(
            registry.get_sample_value(f"b_seconds{suffix}", labels)
        )
    assert registry.get_sample_value("a_seconds_bucket", {"le": "1.0"}) == 10


# -- the hooks of an embedded run ---------------------------------------------------------


def test_embedded_run_counts_rows_jobs_and_messages(tmp_path: Path) -> None:
    data = tmp_path / "dirty.parquet"
    generate(GenerateSpec(rows=20_000, seed=5, dirty_fraction=0.03), data)
    app = load_app(None).name
    names = [
        ("dispatchkit_rows_read_total", {"app": app}),
        ("dispatchkit_jobs_dispatched_total", {"app": app, "task": "positive-rate"}),
        ("dispatchkit_messages_total", {"role": "dispatcher", "kind": "job"}),
        ("dispatchkit_messages_total", {"role": "collector", "kind": "result"}),
    ]
    before = [value(n, **labels) for n, labels in names]
    quarantined_before = quarantined(app)
    s = run_embedded(RunSpec(input=str(data), out=tmp_path / "out", workers=2, run_id="m1"))
    assert s.status == "complete" and s.rows_quarantined > 0
    rows, jobs, sent, received = (
        value(n, **labels) - b for (n, labels), b in zip(names, before, strict=True)
    )
    assert rows == s.rows_read == s.rows_valid + s.rows_quarantined
    after = quarantined(app)
    assert {r: after[r] - quarantined_before.get(r, 0.0) for r in after} == s.bad_rows
    assert jobs == s.jobs_sent == s.jobs
    assert sent == s.batches
    assert 0 < received <= s.batches  # a message whose jobs all failed returns no results
    assert value("dispatchkit_run_jobs", state="total") == s.jobs
    assert value("dispatchkit_run_jobs", state="done") == s.jobs
    assert value("dispatchkit_run_parts", state="done") == value(
        "dispatchkit_run_parts", state="total"
    )


def test_run_serves_while_it_runs_and_frees_the_port(
    small_parquet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    args = ["run", str(small_parquet), "--out", str(tmp_path), "--workers", "1", "-q"]
    assert main([*args, "--metrics-port", str(port), "--no-report"]) == 0
    with socket.socket() as s:  # closed with the command
        s.bind(("", port))


# -- a Kafka worker -----------------------------------------------------------------------

kafka = pytest.mark.kafka


def _collect(
    kargs: list[str], run_id: str, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(
            "collect",
            *kargs,
            "--run-id",
            run_id,
            "--out",
            str(out),
            "--timeout",
            "120",
            "--no-report",
            *extra,
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )


@kafka
def test_kafka_workers_processed_counters_add_up_to_the_runs_jobs(
    small_parquet: Path, tmp_path: Path
) -> None:
    settings = new_settings()
    kargs = kafka_args(settings)
    ports = [free_port(), free_port()]
    workers = [
        start(["worker", *kargs, "--worker-id", f"m{i}", "-q", "--metrics-port", str(p)])
        for i, p in enumerate(ports)
    ]
    try:
        for p in ports:  # both in the group before any job: no rebalance mid-run
            wait_for(
                f"worker on {p} ready", lambda p=p: get(p, "/healthz/ready") == (200, "ready\n")
            )
        d = subprocess.run(
            cli(
                "dispatch",
                str(small_parquet),
                *kargs,
                "--run-id",
                "met",
                "--out",
                str(tmp_path),
                "-q",
                "--metrics-port",
                str(free_port()),
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert d.returncode == 0, d.stderr
        c = _collect(kargs, "met", tmp_path, "--metrics-port", str(free_port()))
        assert c.returncode == 0, c.stderr + c.stdout
        import polars as pl

        jobs = pl.read_parquet(tmp_path / "results.parquet").height
        scraped = [scrape(p) for p in ports]
        processed = sum(total(s, "dispatchkit_jobs_processed_total") for s in scraped)
        assert processed == jobs
        assert sum(total(s, "dispatchkit_jobs_dead_lettered_total") for s in scraped) == 0
        for s in scraped:
            key = (("kind", "job"), ("role", "worker"))
            results = (("kind", "result"), ("role", "worker"))
            assert (
                s[("dispatchkit_messages_total", key)] == s[("dispatchkit_messages_total", results)]
            )
            assert (
                s[
                    (
                        "dispatchkit_batch_duration_seconds_count",
                        (("app", load_app(None).name), ("task", "positive-rate")),
                    )
                ]
                == s[("dispatchkit_messages_total", key)]
            )
            assert s[("dispatchkit_jobs_in_progress", ())] == 0
        # The lag gauge comes down to 0 once the topic is drained (it is sampled every 2 s).
        for p in ports:
            wait_for("lag 0", lambda p=p: scrape(p)[("dispatchkit_consumer_lag_messages", ())] == 0)
    finally:
        codes = stop(workers)
    assert codes == [0, 0]


@kafka
def test_a_worker_not_in_its_group_yet_is_live_not_ready(tmp_path: Path) -> None:
    # Nothing listens on the bootstrap port: the worker never joins a group.
    dead = free_port()
    port = free_port()
    w = start(
        [
            "worker",
            "-b",
            f"127.0.0.1:{dead}",
            "--topic-prefix",
            "nowhere",
            "-q",
            "--metrics-port",
            str(port),
        ]
    )
    try:
        wait_for("the endpoint", lambda: get(port, "/healthz/live") is not None)
        ready = get(port, "/healthz/ready")
        assert get(port, "/healthz/live") == (200, "live\n")
        assert w.poll() is None  # the answers were the running worker's
        assert ready == (503, "not ready\n")
    finally:
        stop([w])


@kafka
def test_a_draining_worker_is_not_ready(small_parquet: Path, tmp_path: Path) -> None:
    from dispatchkit.kafka_run import dispatch

    settings = new_settings(partitions=1)
    port = free_port()
    w = start(
        ["worker", *kafka_args(settings), "-q", "--metrics-port", str(port)],
        env={"DISPATCHKIT_TEST_FAULTS": "slow:4"},
    )
    try:
        wait_for("ready", lambda: get(port, "/healthz/ready") == (200, "ready\n"))
        dispatch(RunSpec(input=str(small_parquet), out=tmp_path, run_id="drain"), settings)
        wait_for(
            "a job in progress", lambda: scrape(port)[("dispatchkit_jobs_in_progress", ())] > 0
        )
        w.send_signal(signal.SIGTERM)
        # The worker finishes its (slow) job: live, and not ready, meanwhile. (The signal
        # is handled between two polls of the consumer: wait for it.)
        wait_for("not ready", lambda: get(port, "/healthz/ready") == (503, "not ready\n"))
        assert get(port, "/healthz/live") == (200, "live\n")
        assert w.poll() is None
        assert w.wait(120) == 0
    finally:
        stop([w])


@kafka
def test_run_on_kafka_serves_metrics_and_its_workers_keep_off_the_port(
    small_parquet: Path, tmp_path: Path
) -> None:
    settings = new_settings()
    port = free_port()
    env = dict(os.environ, DISPATCHKIT_METRICS_PORT=str(port))
    r = subprocess.run(
        cli(
            "run",
            str(small_parquet),
            "--broker",
            "kafka",
            *kafka_args(settings),
            "--out",
            str(tmp_path),
            "--workers",
            "2",
            "--no-report",
            "--run-id",
            "kport",
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert "complete" in r.stdout
    # A worker given the parent's port would exit at start with this line, and again
    # after every restart. (A restart for another reason, a worker fenced on a loaded
    # broker, is the supervisor doing its job: the run above is still complete.)
    assert f"--metrics-port {port}" not in r.stderr, r.stderr
    assert "Address already in use" not in r.stderr, r.stderr
