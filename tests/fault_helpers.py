"""Helpers for the fault-injection suite: own brokers, worker fleets, inputs and checks.

Scenarios that stop, kill or freeze a broker never touch the shared test broker: they
start their own instance with ``scripts/kafka`` (:class:`OwnKafka`) and purge it at the
end. Worker processes log to files (never to a pipe nobody reads, which would block a
chatty worker during a broker outage) so a failing test can show what they did.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import msgpack
import polars as pl

from dispatchkit.apps.covid.generate import DEFAULT_COUNTRIES, GenerateSpec, generate
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.runner import STORE_NAME

from .conftest import assert_exact, reference
from .kafka_helpers import REPO, committed_result_job_ids, index_entries, kafka_args, read_all

KAFKA = str(REPO / "scripts" / "kafka")
#: Exit code :meth:`Fleet.terminate` reports for a worker that ignored SIGTERM.
STUCK = -999
#: Short group timeouts, so a killed member's partitions move on within seconds.
SESSION_MS = 6000
WORKER_FLAGS = ("--session-timeout-ms", str(SESSION_MS), "-v")
#: ``max_message_bytes`` of runs whose faults must land mid-run: a 30,000-row fault
#: input (about 5,600 jobs) goes in about 300 messages instead of the default's 9.
SMALL_MESSAGES = 3_000


# -- inputs -----------------------------------------------------------------------------


def make_input(path: Path, *, rows: int, days: int, countries: int = 20, seed: int = 1) -> Path:
    """A clean file of ``rows`` rows over ``countries`` × ``days``: one job batch per pair."""
    start = datetime(2020, 3, 1, tzinfo=UTC)
    chosen = dict(list(DEFAULT_COUNTRIES.items())[:countries])
    generate(
        GenerateSpec(
            rows=rows,
            seed=seed,
            countries=chosen,
            start=start,
            end=start + timedelta(days=days),
        ),
        path,
    )
    return path


# -- brokers of our own -----------------------------------------------------------------


#: First ports for our own instances: 300 apart, all ports below the ephemeral range
#: (32768+), clear of the shared test broker (39092) and the usual instances (9092,
#: 29092, 45092, 49092).
BASE_PORTS = [p for p in range(20092, 32400, 300) if p != 29092]
#: Lock files that reserve a first port for as long as the process that took it lives,
#: across every test run on this machine (another checkout's suite included): a broker
#: stopped for a restart test leaves its ports free for a few seconds, and must find
#: them free again.
PORT_LOCKS = Path(tempfile.gettempdir()) / "dispatchkit-test-ports"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reserve_base_port(brokers: int) -> tuple[int, int]:
    """A first port whose client, controller and internal ports are free, reserved with a
    lock file; returns ``(port, lock fd)`` (closing the fd releases it)."""
    PORT_LOCKS.mkdir(exist_ok=True)
    for base in random.sample(BASE_PORTS, len(BASE_PORTS)):
        fd = os.open(PORT_LOCKS / f"{base}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        ports = [base + off + i for off in (0, 100, 200) for i in range(brokers)]
        if all(_port_free(p) for p in ports):
            return base, fd
        os.close(fd)
    raise RuntimeError("no free port range for a Kafka instance")


def _kafka(*args: str, timeout: float = 150) -> str:
    done = subprocess.run(
        [KAFKA, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/kafka {' '.join(args)} failed: {done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


@dataclass
class OwnKafka:
    """A broker instance (1 or 3 nodes) that belongs to one test module."""

    brokers: int = 1
    name: str = field(default_factory=lambda: f"faults-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    bootstrap: str = ""
    _lock: int = -1

    def start(self) -> str:
        """Create and start the instance (on reserved free ports), or start it again."""
        if self.bootstrap:
            return _kafka("start", "--name", self.name)
        port, self._lock = reserve_base_port(self.brokers)
        self.bootstrap = ",".join(f"127.0.0.1:{port + i}" for i in range(self.brokers))
        _kafka("start", "--name", self.name, "--port", str(port), "--brokers", str(self.brokers))
        return self.bootstrap

    def purge(self) -> None:
        """Stop the nodes and delete the instance (also after a start that failed)."""
        try:
            subprocess.run(
                [KAFKA, "stop", "--name", self.name, "--purge"],
                capture_output=True,
                timeout=150,
                check=False,
            )
        finally:
            if self._lock >= 0:
                os.close(self._lock)
                self._lock = -1

    def pid(self, node: int = 1) -> int:
        return int(_kafka("pid", "--name", self.name, "--node", str(node)))

    def stop_node(self, node: int = 1, *, kill: bool = False) -> None:
        _kafka("stop-node", "--name", self.name, "--node", str(node), *(["--kill"] if kill else []))

    def start_node(self, node: int = 1) -> None:
        _kafka("start-node", "--name", self.name, "--node", str(node))

    def running(self) -> bool:
        done = subprocess.run(
            [KAFKA, "status", "--name", self.name], capture_output=True, timeout=30, check=False
        )
        return done.returncode == 0


# -- worker processes -------------------------------------------------------------------


def python_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dispatchkit", *args]


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full = dict(os.environ)
    full.pop("DISPATCHKIT_TEST_FAULTS", None)
    full.update(env or {})
    with log.open("ab") as fh:
        fh.write(f"\n=== {' '.join(args)} env={env or {}} at {time.time():.1f}\n".encode())
        fh.flush()
        return subprocess.Popen(python_cli(*args), env=full, stdout=fh, stderr=subprocess.STDOUT)


class Fleet:
    """Worker processes by worker id; a restart reuses the id (fencing the old instance)."""

    def __init__(
        self, settings: KafkaSettings, logs: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.logs = logs
        self.extra = list(extra)
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills = 0
        self.restarts = 0
        self.exit_codes: list[tuple[str, int]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def log(self, wid: str) -> Path:
        return self.logs / f"worker-{wid}.log"

    def start(self, wid: str, *extra: str, env: dict[str, str] | None = None) -> None:
        args = [
            "worker",
            *kafka_args(self.settings),
            "--worker-id",
            wid,
            *WORKER_FLAGS,
            *self.extra,
            *extra,
        ]
        self.procs[wid] = spawn(args, self.log(wid), {**self.env, **(env or {})})

    def start_many(self, n: int, prefix: str = "w") -> list[str]:
        ids = [f"{prefix}{i}" for i in range(n)]
        for wid in ids:
            self.start(wid)
        return ids

    def kill(self, wid: str) -> None:
        """``kill -9`` and reap (no cleanup at all, as a crashed host would)."""
        p = self.procs[wid]
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        self.kills += 1
        self.exit_codes.append((wid, p.returncode))

    def restart(self, wid: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.restarts += 1
        self.start(wid, *extra, env=env)

    def wait_ready(self, wids: list[str], timeout: float = 60) -> None:
        """Wait until each worker's latest start has joined the group (logged an
        assignment): a worker signalled while still starting exits on the signal."""
        deadline = time.monotonic() + timeout
        for wid in wids:
            while time.monotonic() < deadline:
                text = self.log(wid).read_text(errors="replace") if self.log(wid).exists() else ""
                if " assigned " in text.rsplit("=== worker", 1)[-1]:
                    break
                if self.procs[wid].poll() is not None:
                    break
                time.sleep(0.2)

    def supervise(self) -> None:
        """Restart, with its id, every worker that exited (as any supervisor would)."""
        for wid, p in list(self.procs.items()):
            if p.poll() is not None:
                self.exit_codes.append((wid, p.returncode))
                self.restart(wid)

    def exited(self) -> dict[str, int]:
        return {w: p.returncode for w, p in self.procs.items() if p.poll() is not None}

    def terminate(self, timeout: float = 30) -> dict[str, int]:
        """SIGTERM every live worker and wait; each worker's exit code, ``STUCK`` for one
        that did not stop within ``timeout`` (it is killed)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = {}
        for wid, p in self.procs.items():
            try:
                codes[wid] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                codes[wid] = STUCK
        return codes

    def tails(self, chars: int = 3000) -> str:
        out = []
        for wid in self.procs:
            text = self.log(wid).read_text(errors="replace") if self.log(wid).exists() else ""
            out.append(f"--- worker {wid} ---\n{text[-chars:]}")
        return "\n".join(out)


# -- checks -----------------------------------------------------------------------------


def result_records(settings: KafkaSettings, run_id: str, *, committed: bool = True) -> list[dict]:
    """The run's result batches, decoded with msgpack (no dispatchkit code)."""
    out = []
    for msg in read_all(settings, settings.results_topic, committed=committed):
        batch = msgpack.unpackb(msg.value())  # type: ignore[attr-defined]
        if batch["run_id"] == run_id:
            out.append(batch)
    return out


def job_parts_published(settings: KafkaSettings, run_id: str) -> Counter[tuple[str, int]]:
    """(job_id, part) → how many job records of the run carry it on the jobs topic."""
    counts: Counter[tuple[str, int]] = Counter()
    for msg in read_all(settings, settings.jobs_topic):
        batch = msgpack.unpackb(msg.value())  # type: ignore[attr-defined]
        if batch["run_id"] == run_id:
            counts.update(index_entries(batch["index"]))
    return counts


def _parts_table(con: duckdb.DuckDBPyConnection, run_id: str) -> str:
    """The table holding the run's job parts (named in the run ledger)."""
    return str(
        con.execute("SELECT parts_table FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0]
    )


def store_duplicates(out: Path, run_id: str) -> int:
    """(job_id, part) pairs stored more than once in the DuckDB store (read-only)."""
    con = duckdb.connect(str(out / STORE_NAME), read_only=True)
    try:
        parts = _parts_table(con, run_id)
        row = con.execute(
            f"SELECT count(*) FROM (SELECT job_id, part FROM {parts} WHERE run_id = ? "
            "GROUP BY job_id, part HAVING count(*) > 1)",
            [run_id],
        ).fetchall()
        return int(row[0][0])
    finally:
        con.close()


def store_parts(out: Path, run_id: str) -> int:
    con = duckdb.connect(str(out / STORE_NAME), read_only=True)
    try:
        parts = _parts_table(con, run_id)
        return int(
            con.execute(f"SELECT count(*) FROM {parts} WHERE run_id = ?", [run_id]).fetchall()[0][0]
        )
    finally:
        con.close()


def assert_run_exact(
    data: Path, out: Path, run_id: str, settings: KafkaSettings | None = None
) -> Counter[tuple[str, int]] | None:
    """results.parquet equals the reference, tests add up to the valid rows, and (on Kafka)
    every job part has exactly one committed result record."""
    ref = reference(data)
    results = pl.read_parquet(out / "results.parquet")
    assert_exact(results, ref)
    assert results["tests"].sum() == pl.read_parquet(data).height
    if settings is None:
        return None
    counts = committed_result_job_ids(settings, run_id)
    assert len({j for j, _ in counts}) == ref.height, "committed results miss jobs"
    dupes = {k: n for k, n in counts.items() if n > 1}
    assert not dupes, f"{len(dupes)} job parts have more than one committed result"
    return counts


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)
