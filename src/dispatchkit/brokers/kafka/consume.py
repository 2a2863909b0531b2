"""Taking the records a consumer has, without waiting for more than are coming.

``Consumer.consume(num_messages=n, timeout=t)`` returns when it has ``n`` records or
``t`` has passed: asked for up to 1000 with 500 records at hand, it waits the whole
``t`` first. Every dispatchkit loop wants the opposite: whatever is there now, or the
first record to arrive within ``t`` and what came with it. :func:`ready` does that.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition


def ready(consumer: Consumer, limit: int, timeout: float) -> list[Any]:
    """Up to ``limit`` records (or events) the consumer has now; if it has none, wait up
    to ``timeout`` seconds for one, then take the ones that arrived with it."""
    got: list[Any] = consumer.consume(num_messages=limit, timeout=0)
    if got or timeout <= 0:
        return got
    # consume(), not poll(): the same callbacks served the same way as the call above.
    first: list[Any] = consumer.consume(num_messages=1, timeout=timeout)
    if not first or limit == 1:
        return first
    return first + consumer.consume(num_messages=limit - 1, timeout=0)


def watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """A partition's watermarks, retrying while its leader moves (or is still being elected)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            return int(low), int(high)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal() or (not err.retriable() and err.code() not in _LEADER_ERRORS):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


_LEADER_ERRORS = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}
