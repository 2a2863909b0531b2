"""On Kafka: a re-dispatch that changes the run's identity is refused; one dispatcher per run."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dispatchkit.brokers.kafka.broker import KafkaBroker
from dispatchkit.errors import RunError
from dispatchkit.kafka_run import dispatch
from dispatchkit.message import SCHEMA_VERSION, Manifest
from dispatchkit.reader import fingerprint, resolve_inputs
from dispatchkit.runner import RunSpec, spec_identity

from .kafka_helpers import cli, kafka_args, new_settings

pytestmark = pytest.mark.kafka


def test_redispatch_with_another_range_is_refused_in_one_line(
    small_parquet: Path, tmp_path: Path
) -> None:
    settings = new_settings()
    base = [*cli("dispatch", str(small_parquet)), *kafka_args(settings)]
    base += ["--run-id", "r", "--out", str(tmp_path), "-q"]
    first = subprocess.run(base, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    quarantine = (tmp_path / "quarantine.csv").read_bytes()
    again = subprocess.run(
        [*base, "--start", "2020-06-01"], capture_output=True, text=True, timeout=120, check=False
    )
    assert again.returncode == 1, again.stderr
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1, again.stderr
    assert "--start 2020-03-01T00:00:00Z, not 2020-06-01T00:00:00Z" in lines[0]
    assert (tmp_path / "quarantine.csv").read_bytes() == quarantine


def test_a_second_dispatcher_waits_for_a_live_holder_then_is_refused(
    small_parquet: Path, tmp_path: Path
) -> None:
    settings = new_settings()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = f"{socket.gethostname()}:{holder.pid}:{uuid.uuid4().hex[:8]}"
        spec = RunSpec(input=str(small_parquet), out=tmp_path, run_id="held")
        print_ = fingerprint(resolve_inputs(spec.input))
        broker = KafkaBroker(settings)
        try:
            broker.publish_manifest(
                Manifest(
                    v=SCHEMA_VERSION,
                    run_id="held",
                    status="dispatching",
                    task="positive-rate",
                    input_fingerprint=print_,
                    identity=spec_identity(spec, print_),
                    owner=owner,
                    heartbeat_at=time.time(),
                )
            )
        finally:
            broker.close()
        t0 = time.monotonic()
        with pytest.raises(RunError, match=rf"being dispatched by pid {holder.pid} on host"):
            dispatch(spec, settings, wait_for_holder=3)
        assert 3 <= time.monotonic() - t0 < 60
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (dead on this host): the next dispatcher takes over at once.
    summary = dispatch(spec, settings, wait_for_holder=3)
    assert summary.status == "dispatched" and summary.jobs_sent == summary.jobs > 0
