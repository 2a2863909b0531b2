"""What a run did: the counts behind the printed summary, for tests and library callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunSummary:
    """What a run (or one of its commands: dispatch, collect) did."""

    run_id: str
    status: str = "started"
    rows_read: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    jobs: int = 0
    jobs_done: int = 0
    jobs_sent: int = 0
    jobs_skipped: int = 0
    split_jobs: int = 0
    batches: int = 0
    duplicates_ignored: int = 0
    failed_jobs: list[str] = field(default_factory=list)
    worker_restarts: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    #: Things the user should know that are not counts (an app without a chart, …).
    notes: list[str] = field(default_factory=list)
