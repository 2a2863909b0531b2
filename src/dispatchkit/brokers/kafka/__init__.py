"""The Kafka transport.

``broker`` (topics, producer, results consumer), ``source`` (the transactional
consumer-group worker) and ``settings`` (librdkafka settings and secrets). The names
below are imported on first use (PEP 562): the command line reads its Kafka flags
without loading the client library.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatchkit.brokers.kafka.broker import KafkaBroker
    from dispatchkit.brokers.kafka.settings import KafkaSettings
    from dispatchkit.brokers.kafka.source import KafkaJobSource

_LAZY: dict[str, str] = {
    "KafkaBroker": "dispatchkit.brokers.kafka.broker",
    "KafkaJobSource": "dispatchkit.brokers.kafka.source",
    "KafkaSettings": "dispatchkit.brokers.kafka.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dispatchkit.brokers.kafka' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["KafkaBroker", "KafkaJobSource", "KafkaSettings"]
