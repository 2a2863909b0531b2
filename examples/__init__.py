"""Example dispatchkit apps: ``sales`` (quantiles and exact stats per store-day) and
``sensors`` (a least-squares trend per sensor-hour). See ``examples/README.md``."""
