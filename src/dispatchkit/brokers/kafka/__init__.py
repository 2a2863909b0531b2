"""The Kafka transport.

``broker`` (topics, producer, results consumer), ``source`` (the transactional
consumer-group worker) and ``settings`` (librdkafka settings and secrets). The names
below are imported on first use (PEP 562): the command line reads its Kafka flags
without loading the client library.
"""

from typing import TYPE_CHECKING

from dispatchkit.lazy import lazy_exports

if TYPE_CHECKING:
    from dispatchkit.brokers.kafka.broker import KafkaBroker
    from dispatchkit.brokers.kafka.settings import KafkaSettings
    from dispatchkit.brokers.kafka.source import KafkaJobSource

_LAZY: dict[str, str] = {
    "KafkaBroker": "dispatchkit.brokers.kafka.broker",
    "KafkaJobSource": "dispatchkit.brokers.kafka.source",
    "KafkaSettings": "dispatchkit.brokers.kafka.settings",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = ["KafkaBroker", "KafkaJobSource", "KafkaSettings"]
