"""Sensor readings per (sensor, UTC hour): a least-squares linear trend of the values."""
