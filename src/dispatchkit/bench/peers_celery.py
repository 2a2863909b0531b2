"""The Celery app of the ``peers`` section: ``celery -A dispatchkit.bench.peers_celery worker``.

One task, ``dkbench.job``: a job's ``result`` values (the list of ``"positive"`` /
``"negative"`` strings of its rows, as a task gets its job's rows) → ``[tests, positives,
positive_rate, ci_low, ci_high]``. Broker and result backend are the Redis server that
the benchmark starts (``$DKBENCH_REDIS_URL``, default ``redis://127.0.0.1:46379/0``).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from dispatchkit.bench.peers_tasks import job_row

REDIS_URL = os.environ.get("DKBENCH_REDIS_URL", "redis://127.0.0.1:46379/0")

app = Celery("dkbench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
)


@app.task(name="dkbench.job")  # type: ignore[untyped-decorator]
def job(results: list[str]) -> list[Any]:
    """One job: its rows' results → tests, positives, rate, Wilson interval."""
    return list(job_row(results))
