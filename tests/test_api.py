"""The public API, settings precedence and the pure helpers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import dispatchkit
from dispatchkit.brokers.kafka.settings import Secret, load_settings
from dispatchkit.errors import UsageError
from dispatchkit.worker import RetryPolicy, compute_backoff


def test_all_names_exist_once() -> None:
    assert len(set(dispatchkit.__all__)) == len(dispatchkit.__all__)
    for name in dispatchkit.__all__:
        assert hasattr(dispatchkit, name), name


def test_settings_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "k.properties"
    cfg.write_text("# comment\nlinger.ms=1\nclient.id=from-file\nacks=1\n")
    s = load_settings(
        bootstrap_servers=None,
        options=["acks=all"],
        config_file=str(cfg),
        topic_prefix="p",
        partitions=12,
        environ={"DISPATCHKIT_BOOTSTRAP_SERVERS": "env:9092", "DISPATCHKIT_KAFKA_CLIENT_ID": "env"},
    )
    assert s.bootstrap_servers == "env:9092"
    assert s.options == {"linger.ms": "1", "client.id": "env", "acks": "all"}
    assert s.jobs_topic == "p.jobs" and s.dlq_topic == "p.dlq"


def test_settings_errors_are_sentences(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no Kafka bootstrap servers"):
        load_settings(
            bootstrap_servers=None,
            options=[],
            config_file=None,
            topic_prefix="p",
            partitions=1,
            environ={},
        )
    with pytest.raises(UsageError, match="config file not found"):
        load_settings(
            bootstrap_servers="h:1",
            options=[],
            config_file=str(tmp_path / "nope"),
            topic_prefix="p",
            partitions=1,
            environ={},
        )


def test_secret_hides_its_value() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in f"{s} {s!r} {[s]}"
    assert s.get() == "hunter2" and s == Secret("hunter2")


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(attempts=10, base_delay=0.1, max_delay=1.0)
    rng = random.Random(1)
    for attempt in range(1, 10):
        ceiling = min(1.0, 0.1 * 2 ** (attempt - 1))
        draws = [compute_backoff(attempt, policy, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # jitter spreads over the whole range
