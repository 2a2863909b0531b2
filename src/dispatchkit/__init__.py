"""dispatchkit: the Dispatcher pattern for data jobs, on local processes or Apache Kafka.

The library API — everything the CLI does is one of these calls::

    from dispatchkit import GenerateSpec, RunSpec, generate, run_embedded

    generate(GenerateSpec(rows=200_000), Path("data/covid.parquet"))
    summary = run_embedded(RunSpec(input="data/covid.parquet", out=Path("out"), workers=4))
"""

from dispatchkit.brokers.base import Broker, Delivery, JobSource, Rejection
from dispatchkit.brokers.embedded import EmbeddedBroker
from dispatchkit.config import KafkaSettings, Secret, load_settings
from dispatchkit.dispatcher import Dispatcher, job_id
from dispatchkit.errors import (
    BrokerError,
    DecodeError,
    DispatchkitError,
    InputError,
    RunError,
    UsageError,
)
from dispatchkit.generator import GenerateSpec, generate
from dispatchkit.message import Job, JobBatch, JobResult, Manifest, ResultBatch, decode, encode
from dispatchkit.reader import InputReader
from dispatchkit.runner import RunSpec, RunSummary, run_embedded
from dispatchkit.store import ResultStore
from dispatchkit.task import TASKS, Task, positive_rate
from dispatchkit.worker import RetryPolicy, Worker

__version__ = "0.1.0"

__all__ = [
    "TASKS",
    "Broker",
    "BrokerError",
    "DecodeError",
    "Delivery",
    "Dispatcher",
    "DispatchkitError",
    "EmbeddedBroker",
    "GenerateSpec",
    "InputError",
    "InputReader",
    "Job",
    "JobBatch",
    "JobResult",
    "JobSource",
    "KafkaSettings",
    "Manifest",
    "Rejection",
    "ResultBatch",
    "ResultStore",
    "RetryPolicy",
    "RunError",
    "RunSpec",
    "RunSummary",
    "Secret",
    "Task",
    "UsageError",
    "Worker",
    "__version__",
    "decode",
    "encode",
    "generate",
    "job_id",
    "load_settings",
    "positive_rate",
    "run_embedded",
]
