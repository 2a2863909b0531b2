"""Kafka settings: bootstrap servers, topics and any librdkafka option, with secrets typed.

Settings come, lowest precedence first, from a config file of ``key=value`` lines
(``--kafka-config`` or ``$DISPATCHKIT_KAFKA_CONFIG``), from environment variables
(``DISPATCHKIT_BOOTSTRAP_SERVERS``, and ``DISPATCHKIT_KAFKA_<KEY>`` for any librdkafka key,
with dots written as underscores: ``DISPATCHKIT_KAFKA_SASL_PASSWORD`` → ``sasl.password``)
and from flags (``-b``, ``-X key=value``). Environment variables are read here, at the
CLI's edge, and nowhere else.

Values of secret keys (passwords, private keys, client secrets) are wrapped in
:class:`Secret`, which never prints its value; :func:`redact` also scrubs any text that
might carry one (an exception message, a log line) before it is shown.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dispatchkit.errors import UsageError

_SECRET_KEY = re.compile(r"(password|secret|\.pem$|key\.pem|private|token|sasl\.jaas)", re.I)
_ENV_PREFIX = "DISPATCHKIT_KAFKA_"
_LIBRDKAFKA_LOG = logging.getLogger("dispatchkit.librdkafka")


class Secret:
    """A secret string: ``str()`` and ``repr()`` show ``'***'``; ``get()`` returns the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


@dataclass(frozen=True)
class KafkaSettings:
    """Where the cluster is, what the topics are called, and extra librdkafka options."""

    bootstrap_servers: str
    options: Mapping[str, str | Secret] = field(default_factory=dict)
    topic_prefix: str = "dispatchkit"
    partitions: int = 12
    replication_factor: int = -1  # the broker's default

    @property
    def jobs_topic(self) -> str:
        return f"{self.topic_prefix}.jobs"

    @property
    def results_topic(self) -> str:
        return f"{self.topic_prefix}.results"

    @property
    def manifests_topic(self) -> str:
        return f"{self.topic_prefix}.manifests"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    def client_config(self, **overrides: object) -> dict[str, object]:
        """The librdkafka dict for a client, secrets unwrapped (never log this)."""
        conf: dict[str, object] = {
            "bootstrap.servers": self.bootstrap_servers,
            # librdkafka's own log lines go through logging, not straight to stderr.
            "logger": _LIBRDKAFKA_LOG,
        }
        for key, value in self.options.items():
            conf[key] = value.get() if isinstance(value, Secret) else value
        conf.update(overrides)
        return conf

    def describe(self) -> dict[str, str]:
        """The settings with secrets masked, for display and logs."""
        out = {"bootstrap.servers": self.bootstrap_servers}
        out.update({k: str(v) for k, v in self.options.items()})
        return out

    def secrets(self) -> list[str]:
        return [v.get() for v in self.options.values() if isinstance(v, Secret) and v.get()]

    def redact(self, text: str) -> str:
        return redact(text, self.secrets())


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def parse_options(items: list[str], origin: str) -> dict[str, str | Secret]:
    """``key=value`` strings to options, secrets wrapped; a malformed item is a UsageError."""
    out: dict[str, str | Secret] = {}
    for item in items:
        line = item.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            # Never echo the item: it may hold a secret.
            raise UsageError(f"{origin}: expected key=value, got an item without '='")
        out[key] = Secret(value) if is_secret_key(key) else value
    return out


def load_settings(
    *,
    bootstrap_servers: str | None,
    options: list[str],
    config_file: str | None,
    topic_prefix: str,
    partitions: int,
    environ: Mapping[str, str] | None = None,
) -> KafkaSettings:
    """Merge file, environment and flags (that order of precedence, lowest first)."""
    env = os.environ if environ is None else environ
    merged: dict[str, str | Secret] = {}
    path = config_file or env.get("DISPATCHKIT_KAFKA_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{path}: Kafka config file not found")
        merged.update(parse_options(p.read_text().splitlines(), str(path)))
    for name, value in env.items():
        if name.startswith(_ENV_PREFIX) and name != "DISPATCHKIT_KAFKA_CONFIG":
            key = name[len(_ENV_PREFIX) :].lower().replace("_", ".")
            merged[key] = Secret(value) if is_secret_key(key) else value
    merged.update(parse_options(options, "-X"))
    servers = (
        bootstrap_servers
        or env.get("DISPATCHKIT_BOOTSTRAP_SERVERS")
        or _plain(merged.pop("bootstrap.servers", None))
    )
    merged.pop("bootstrap.servers", None)
    if not servers:
        raise UsageError(
            "no Kafka bootstrap servers: give --bootstrap-servers HOST:PORT "
            "or set DISPATCHKIT_BOOTSTRAP_SERVERS"
        )
    return KafkaSettings(
        bootstrap_servers=servers,
        options=merged,
        topic_prefix=topic_prefix,
        partitions=partitions,
    )


def _plain(value: str | Secret | None) -> str | None:
    return value.get() if isinstance(value, Secret) else value
