"""Secrets: SCRAM on a real broker, over plain TCP and over TLS, and no password in any output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from dispatchkit.brokers.kafka.settings import Secret, load_settings, redact
from dispatchkit.cli import build_parser
from dispatchkit.errors import UsageError

from .conftest import IN_CI, assert_exact, reference
from .fault_helpers import reserve_base_port
from .kafka_helpers import REPO

PASSWORD = "s3cr3t-Pa55w0rd-xyzzy"
USER = "dkuser"


def start_failure(stderr: str) -> str:
    """What a failed ``scripts/kafka start`` said: its ERROR lines first, then its tail."""
    errors = [line for line in stderr.splitlines() if " ERROR " in line or "FATAL" in line]
    return "\n".join([*errors[:10], "…", stderr[-1500:]])


@pytest.fixture(scope="module")
def scram_broker() -> Iterator[str]:
    if not os.environ.get("DISPATCHKIT_BOOTSTRAP_SERVERS") and not IN_CI:
        pytest.skip("Kafka tests run with `make test`")
    env = dict(os.environ, KAFKA_SCRAM_PASSWORD=PASSWORD)
    # Ports below the ephemeral range, reserved: a fixed port up there can be taken by
    # one of the suite's own client connections.
    port, lock = reserve_base_port(1)
    try:
        proc = subprocess.run(
            [
                str(REPO / "scripts" / "kafka"),
                "start",
                "--name",
                "scramtest",
                "--port",
                str(port),
                "--scram",
                USER,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
        assert proc.returncode == 0, start_failure(proc.stderr)
        assert PASSWORD not in proc.stdout + proc.stderr
        yield proc.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(
            [str(REPO / "scripts" / "kafka"), "stop", "--name", "scramtest", "--purge"],
            capture_output=True,
            timeout=120,
        )
        os.close(lock)


def sasl_env(password: str) -> dict[str, str]:
    return dict(
        os.environ,
        DISPATCHKIT_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        DISPATCHKIT_KAFKA_SASL_MECHANISM="SCRAM-SHA-256",
        DISPATCHKIT_KAFKA_SASL_USERNAME=USER,
        DISPATCHKIT_KAFKA_SASL_PASSWORD=password,
    )


@pytest.mark.kafka
def test_scram_right_password_runs_wrong_password_fails_fast(
    scram_broker: str, small_parquet: Path, tmp_path: Path
) -> None:
    env = sasl_env(PASSWORD)
    env.pop("DISPATCHKIT_BOOTSTRAP_SERVERS", None)
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "dispatchkit",
            "run",
            str(small_parquet),
            "--out",
            str(tmp_path),
            "--broker",
            "kafka",
            "-b",
            scram_broker,
            "--workers",
            "2",
            "--topic-prefix",
            "sec",
            "-vv",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))

    wrong = "not-the-" + PASSWORD
    t0 = time.monotonic()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dispatchkit",
            "dispatch",
            str(small_parquet),
            "--out",
            str(tmp_path / "bad"),
            "-b",
            scram_broker,
            "--topic-prefix",
            "sec2",
            "-vv",
        ],
        capture_output=True,
        text=True,
        env=sasl_env(wrong),
        timeout=60,
    )
    took = time.monotonic() - t0
    assert bad.returncode == 3
    assert "authentication failed" in bad.stderr.lower()
    assert took < 15 + 10  # the 15 s budget plus interpreter start-up on a busy machine
    everything = ok.stdout + ok.stderr + bad.stdout + bad.stderr
    assert everything.count(PASSWORD) == 0
    assert PASSWORD not in " ".join(Path(tmp_path).rglob("*").__repr__())


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[tuple[str, Path]]:
    """A SASL_SSL (SCRAM over TLS) broker: its bootstrap and the CA that signed its cert."""
    if not os.environ.get("DISPATCHKIT_BOOTSTRAP_SERVERS") and not IN_CI:
        pytest.skip("Kafka tests run with `make test`")
    kafka = str(REPO / "scripts" / "kafka")
    env = dict(os.environ, KAFKA_SCRAM_PASSWORD=PASSWORD)
    port, lock = reserve_base_port(1)  # client, controller (+100), internal (+200)
    try:
        proc = subprocess.run(
            [
                kafka,
                "start",
                "--name",
                "tlstest",
                "--port",
                str(port),
                "--scram",
                USER,
                "--tls",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
        assert proc.returncode == 0, start_failure(proc.stderr)
        assert PASSWORD not in proc.stdout + proc.stderr
        ca = subprocess.run(
            [kafka, "ca", "--name", "tlstest"], capture_output=True, text=True, timeout=60
        )
        assert ca.returncode == 0, ca.stderr
        yield proc.stdout.strip().splitlines()[-1], Path(ca.stdout.strip())
    finally:
        subprocess.run(
            [kafka, "stop", "--name", "tlstest", "--purge"], capture_output=True, timeout=120
        )
        os.close(lock)


def tls_flags(ca: Path | None, mechanism: str = "SCRAM-SHA-512") -> list[str]:
    """-X flags for SCRAM over TLS; the password comes from the environment."""
    flags = ["security.protocol=SASL_SSL", f"sasl.mechanism={mechanism}", f"sasl.username={USER}"]
    if ca is not None:
        flags.append(f"ssl.ca.location={ca}")
    return [arg for flag in flags for arg in ("-X", flag)]


def password_env() -> dict[str, str]:
    env = dict(os.environ, DISPATCHKIT_KAFKA_SASL_PASSWORD=PASSWORD)
    env.pop("DISPATCHKIT_BOOTSTRAP_SERVERS", None)
    return env


@pytest.mark.kafka
def test_sasl_ssl_run_is_exact(
    tls_broker: tuple[str, Path], small_parquet: Path, tmp_path: Path
) -> None:
    servers, ca = tls_broker
    ok = subprocess.run(
        [
            *(sys.executable, "-m", "dispatchkit", "run", str(small_parquet), "-vv"),
            *("--out", str(tmp_path)),
            *("--broker", "kafka", "-b", servers, "--workers", "2", "--topic-prefix", "tls"),
            *tls_flags(ca),
        ],
        capture_output=True,
        text=True,
        env=password_env(),
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert_exact(pl.read_parquet(tmp_path / "results.parquet"), reference(small_parquet))
    assert PASSWORD not in ok.stdout + ok.stderr


def other_ca(directory: Path) -> Path:
    """A CA of its own, which never signed the broker's certificate."""
    directory.mkdir()
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=not the broker's CA", "-keyout", str(directory / "ca.key")),
            *("-out", str(directory / "ca.pem")),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory / "ca.pem"


@pytest.mark.kafka
@pytest.mark.parametrize("trust", ["other-ca", "system-cas"])
def test_untrusted_certificate_fails_fast_in_one_line(
    trust: str, tls_broker: tuple[str, Path], small_parquet: Path, tmp_path: Path
) -> None:
    servers, _ = tls_broker
    ca = other_ca(tmp_path / "ca") if trust == "other-ca" else None
    t0 = time.monotonic()
    bad = subprocess.run(
        [
            *(sys.executable, "-m", "dispatchkit", "run", str(small_parquet)),
            *("--out", str(tmp_path)),
            *("--broker", "kafka", "-b", servers, "--workers", "1", "--topic-prefix", "tlsbad"),
            *tls_flags(ca, "SCRAM-SHA-256"),
        ],
        capture_output=True,
        text=True,
        env=password_env(),
        timeout=120,
    )
    took = time.monotonic() - t0
    assert bad.returncode == 3, bad.stderr[-3000:]
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr[-3000:]
    assert lines[0].startswith("dispatchkit: error: Kafka TLS handshake failed:"), lines[0]
    assert "certificate verify failed" in lines[0]
    assert "Traceback" not in bad.stdout + bad.stderr
    assert PASSWORD not in bad.stdout + bad.stderr
    # Not the 15 s reach-timeout: seconds, plus interpreter start-up on a busy machine.
    assert took < 30


def test_secrets_never_print(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "kafka.properties"
    cfg.write_text(
        f"security.protocol=SASL_SSL\nsasl.password={PASSWORD}\nssl.key.password={PASSWORD}2\n"
    )
    settings = load_settings(
        bootstrap_servers="h:1",
        options=["sasl.username=u"],
        config_file=str(cfg),
        topic_prefix="p",
        partitions=3,
        environ={"DISPATCHKIT_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "tok3n"},
    )
    shown = repr(settings) + str(settings.describe()) + str(settings.options)
    assert PASSWORD not in shown and "tok3n" not in shown
    assert settings.client_config()["sasl.password"] == PASSWORD
    assert isinstance(settings.options["sasl.password"], Secret)
    assert redact(f"boom {PASSWORD} boom", settings.secrets()) == "boom *** boom"
    assert settings.redact(f"x{PASSWORD}2y") == "x***y"
    build_parser().format_help()
    with pytest.raises(UsageError) as err:
        load_settings(
            bootstrap_servers="h:1",
            options=[f"{PASSWORD}"],
            config_file=None,
            topic_prefix="p",
            partitions=1,
            environ={},
        )
    assert PASSWORD not in str(err.value)


def test_help_shows_no_secret_from_the_environment() -> None:
    env = dict(os.environ, DISPATCHKIT_KAFKA_SASL_PASSWORD=PASSWORD)
    for cmd in ("run", "worker", "dispatch", "collect", "status", "dlq"):
        out = subprocess.run(
            [sys.executable, "-m", "dispatchkit", cmd, "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 0
        assert PASSWORD not in out.stdout + out.stderr
