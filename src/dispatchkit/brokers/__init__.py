"""Transports behind the :mod:`dispatchkit.brokers.base` interface."""

from dispatchkit.brokers.base import Broker, Delivery, JobSource, Rejection

__all__ = ["Broker", "Delivery", "JobSource", "Rejection"]
