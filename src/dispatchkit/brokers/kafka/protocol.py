"""Which consumer-group protocol the workers a ``run`` starts should speak.

The classic protocol (cooperative-sticky) works with every broker; its rebalances are
rounds of join and sync requests that every member takes part in, and two members
leaving at once can make one of them wait out a request timeout (5 s) in ``close()``.
The KIP-848 protocol (``group.protocol=consumer``, Kafka ≥ 4.0) has the broker compute
assignments and hand them out in heartbeats: no such rounds, no such wait. But its
session timeout is the broker's ``group.consumer.session.timeout.ms`` (45 s unless
configured), not the worker's own 10 s, and that is how long a crashed worker's
partitions stay unread.

:func:`run_protocol` picks ``consumer`` only where the cluster offers it with a session
timeout no longer than the classic one's, so recovering from a crash is never slower;
anything it cannot find out means ``classic``.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    ResourceType,
)

from dispatchkit.brokers.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)

#: The classic protocol's session timeout the workers use (``worker --session-timeout-ms``).
CLASSIC_SESSION_MS = 10_000


def run_protocol(settings: KafkaSettings, timeout: float = 5.0) -> str:
    """``"consumer"`` if a broker offers KIP-848 with a session timeout of at most
    :data:`CLASSIC_SESSION_MS`, else ``"classic"``."""
    try:
        admin = AdminClient(settings.client_config())  # type: ignore[arg-type]
        brokers = sorted(admin.list_topics(timeout=timeout).brokers)
        if not brokers:
            return "classic"
        resource = ConfigResource(ResourceType.BROKER, str(brokers[0]))
        entries = admin.describe_configs([resource])[resource].result(timeout=timeout)
    except (KafkaException, TimeoutError, ValueError) as exc:  # no access: the safe choice
        log.debug("group protocol: cannot read the broker's configuration (%s)", exc)
        return "classic"
    return choose(
        _value(entries, "group.coordinator.rebalance.protocols"),
        _value(entries, "group.consumer.session.timeout.ms"),
    )


def choose(protocols: str | None, session_ms: str | None) -> str:
    """The protocol for a broker whose settings are these (``None``: not known)."""
    offered = {p.strip() for p in (protocols or "").split(",")}
    try:
        session = int(session_ms) if session_ms is not None else None
    except ValueError:
        session = None
    if "consumer" in offered and session is not None and session <= CLASSIC_SESSION_MS:
        return "consumer"
    return "classic"


def _value(entries: dict[str, object], name: str) -> str | None:
    entry = entries.get(name)
    value = getattr(entry, "value", None)
    return str(value) if value is not None else None
