"""A collector's read positions on a results topic, stored with the results they read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadPositions:
    """Where a collector of ``run_id`` goes on reading ``topic``: the next offset of each
    partition it has read (partitions it has not read are absent)."""

    run_id: str
    topic: str
    offsets: dict[int, int]
    topic_id: str | None = None
