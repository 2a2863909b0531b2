"""dispatchkit: the Dispatcher pattern for data jobs, on local processes or Apache Kafka.

An app declares its input columns, its key and its tasks (:mod:`dispatchkit.app`)::

    app = dispatchkit.App("sales", version="1")
    app.columns(store_id=dispatchkit.Int(min=0), ts=dispatchkit.Timestamp())
    app.key("store_id", dispatchkit.floor("ts", "day", name="day"))

The library API — everything the CLI does is one of these calls::

    from dispatchkit import GenerateSpec, RunSpec, generate, run_embedded

    generate(GenerateSpec(rows=200_000), Path("data/covid.parquet"))
    summary = run_embedded(RunSpec(input="data/covid.parquet", out=Path("out"), workers=4))

In a script, call ``run_embedded`` under ``if __name__ == "__main__":``: its workers are
multiprocessing forkserver children, which import the main module.
"""

from typing import TYPE_CHECKING

from dispatchkit.lazy import lazy_exports

if TYPE_CHECKING:
    from dispatchkit.app import (
        App,
        AppError,
        Bool,
        Combine,
        Float,
        Int,
        Jobs,
        Task,
        Text,
        Timestamp,
        load_app,
    )
    from dispatchkit.apps.covid.generate import GenerateSpec, generate
    from dispatchkit.brokers.base import Broker, Delivery, JobSource, Rejection
    from dispatchkit.brokers.embedded import EmbeddedBroker
    from dispatchkit.brokers.kafka.settings import KafkaSettings, Secret, load_settings
    from dispatchkit.dispatcher import Dispatcher
    from dispatchkit.errors import (
        BrokerError,
        DecodeError,
        DispatchkitError,
        InputError,
        RunError,
        UsageError,
    )
    from dispatchkit.keys import Floor, floor, job_id
    from dispatchkit.message import Manifest
    from dispatchkit.reader import InputReader
    from dispatchkit.runner import RunSpec, RunSummary, run_embedded
    from dispatchkit.store import ResultStore
    from dispatchkit.worker import RetryPolicy, Worker

# Every name of the API, and the module that defines it. Imported on first use (PEP 562):
# a worker process that only needs the worker loop must not pay for DuckDB, Faker and
# matplotlib (about 1 s of CPU per process start).
_LAZY: dict[str, str] = {
    "App": "dispatchkit.app",
    "AppError": "dispatchkit.app",
    "Bool": "dispatchkit.app",
    "Combine": "dispatchkit.app",
    "Float": "dispatchkit.app",
    "Floor": "dispatchkit.keys",
    "Int": "dispatchkit.app",
    "Jobs": "dispatchkit.app",
    "Text": "dispatchkit.app",
    "Timestamp": "dispatchkit.app",
    "floor": "dispatchkit.keys",
    "load_app": "dispatchkit.app",
    "Broker": "dispatchkit.brokers.base",
    "BrokerError": "dispatchkit.errors",
    "DecodeError": "dispatchkit.errors",
    "Delivery": "dispatchkit.brokers.base",
    "Dispatcher": "dispatchkit.dispatcher",
    "DispatchkitError": "dispatchkit.errors",
    "EmbeddedBroker": "dispatchkit.brokers.embedded",
    "GenerateSpec": "dispatchkit.apps.covid.generate",
    "InputError": "dispatchkit.errors",
    "InputReader": "dispatchkit.reader",
    "JobSource": "dispatchkit.brokers.base",
    "KafkaSettings": "dispatchkit.brokers.kafka.settings",
    "Manifest": "dispatchkit.message",
    "Rejection": "dispatchkit.brokers.base",
    "ResultStore": "dispatchkit.store",
    "RetryPolicy": "dispatchkit.worker",
    "RunError": "dispatchkit.errors",
    "RunSpec": "dispatchkit.runner",
    "RunSummary": "dispatchkit.runner",
    "Secret": "dispatchkit.brokers.kafka.settings",
    "Task": "dispatchkit.app",
    "UsageError": "dispatchkit.errors",
    "Worker": "dispatchkit.worker",
    "generate": "dispatchkit.apps.covid.generate",
    "job_id": "dispatchkit.keys",
    "load_settings": "dispatchkit.brokers.kafka.settings",
    "run_embedded": "dispatchkit.runner",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__version__ = "0.1.0"

__all__ = [
    "App",
    "AppError",
    "Bool",
    "Broker",
    "BrokerError",
    "Combine",
    "DecodeError",
    "Delivery",
    "Dispatcher",
    "DispatchkitError",
    "EmbeddedBroker",
    "Float",
    "Floor",
    "GenerateSpec",
    "InputError",
    "InputReader",
    "Int",
    "JobSource",
    "Jobs",
    "KafkaSettings",
    "Manifest",
    "Rejection",
    "ResultStore",
    "RetryPolicy",
    "RunError",
    "RunSpec",
    "RunSummary",
    "Secret",
    "Task",
    "Text",
    "Timestamp",
    "UsageError",
    "Worker",
    "__version__",
    "floor",
    "generate",
    "job_id",
    "load_app",
    "load_settings",
    "run_embedded",
]
