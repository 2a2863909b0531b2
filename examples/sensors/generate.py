"""A deterministic sensor dataset for the ``sensors`` example app.

``python -m examples.sensors.generate --rows 200000 --out data/sensors.parquet`` writes
Parquet with the columns ``sensor`` (text), ``ts`` (timestamp[ns, UTC]) and ``value``
(float64): each sensor drifts linearly within each hour, plus noise. ``--dirty`` is the
fraction of rows spoiled (an empty, blank or missing sensor, a NaN value or a missing
time, in turn; some valid names carry spaces the app trims); ``--hot-rows`` adds that many
readings of sensor ``s-01`` in the first hour. Two degenerate sensor-hours are always
there: ``lone`` (one reading: no line) and ``flat`` (three equal values: r2 = 1). The
same arguments give the same file.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

START = datetime(2024, 5, 1, tzinfo=UTC)
NS_PER_HOUR = 3_600_000_000_000
SCHEMA = pa.schema(
    [
        pa.field("sensor", pa.string()),
        pa.field("ts", pa.timestamp("ns", tz="UTC")),
        pa.field("value", pa.float64()),
    ]
)
SPOILED_NAMES = ("", "   ", None)


def generate(
    rows: int,
    *,
    seed: int = 11,
    sensors: int = 8,
    hours: int = 48,
    dirty: float = 0.02,
    hot_rows: int = 0,
) -> pa.Table:
    """``rows + hot_rows + 4`` readings, shuffled; the same arguments give the same table."""
    rng = np.random.default_rng(seed)
    start_ns = int(START.timestamp()) * 1_000_000_000
    sensor = rng.integers(0, sensors, size=rows, dtype=np.int64)
    ts = start_ns + rng.integers(0, hours * NS_PER_HOUR, size=rows, dtype=np.int64)
    if hot_rows:
        sensor = np.concatenate([sensor, np.zeros(hot_rows, dtype=np.int64)])
        ts = np.concatenate([ts, start_ns + rng.integers(0, NS_PER_HOUR, size=hot_rows)])
    n = len(sensor)
    hour = (ts - start_ns) // NS_PER_HOUR
    x = (ts % NS_PER_HOUR) / NS_PER_HOUR
    drift = rng.normal(0.0, 3.0, size=(sensors, hours))  # per sensor-hour, units per hour
    value = 20.0 + sensor + drift[sensor, hour] * x + rng.normal(0.0, 0.5, size=n)
    names: list[str | None] = [f"s-{i + 1:02d}" for i in sensor]
    valid_ts = np.ones(n, dtype=np.bool_)
    for i, row in enumerate(rng.choice(n, size=int(n * dirty), replace=False)):
        match i % 4:
            case 0:
                names[row] = SPOILED_NAMES[(i // 4) % 3]
            case 1:
                value[row] = np.nan
            case 2:
                valid_ts[row] = False
            case _:
                names[row] = f"  {names[row]} "  # valid: trimmed by the app
    order = rng.permutation(n)
    body = pa.table(
        {
            "sensor": pa.array([names[i] for i in order], pa.string()),
            "ts": pa.array(ts[order], pa.timestamp("ns", tz="UTC"), mask=~valid_ts[order]),
            "value": pa.array(value[order], pa.float64()),
        },
        schema=SCHEMA,
    )
    h0 = start_ns + NS_PER_HOUR
    degenerate = pa.table(
        {
            "sensor": ["lone", "flat", "flat", "flat"],
            "ts": pa.array(
                [h0 + 5, h0 + 1, h0 + 2_000_000, h0 + 9_000_000_001], pa.timestamp("ns", tz="UTC")
            ),
            "value": [1.5, 7.25, 7.25, 7.25],
        },
        schema=SCHEMA,
    )
    return pa.concat_tables([body, degenerate])


def write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.sensors.generate", description=__doc__)
    p.add_argument("--rows", type=int, required=True, help="readings to generate")
    p.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--sensors", type=int, default=8)
    p.add_argument("--hours", type=int, default=48)
    p.add_argument("--dirty", type=float, default=0.02, help="fraction of spoiled rows")
    p.add_argument("--hot-rows", type=int, default=0, help="extra readings of s-01, hour 1")
    a = p.parse_args(argv)
    table = generate(
        a.rows, seed=a.seed, sensors=a.sensors, hours=a.hours, dirty=a.dirty, hot_rows=a.hot_rows
    )
    write(table, a.out)
    print(f"{table.num_rows:,} rows written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
