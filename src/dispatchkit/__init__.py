"""dispatchkit: the Dispatcher pattern for data jobs, on local processes or Apache Kafka."""

__version__ = "0.1.0"
