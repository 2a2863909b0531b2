"""A deterministic sales dataset for the ``sales`` example app.

``python -m examples.sales.generate --rows 200000 --out data/sales.parquet`` writes
Parquet with the columns ``store_id`` (int64), ``ts`` (timestamp[us, UTC]) and
``amount`` (float64, cents). ``--dirty`` is the fraction of rows spoiled (a negative
amount, a missing store id or a NaN amount, in turn); ``--hot-rows`` adds that many sales
of store 0 on the first day, one store-day bigger than the rest. The same arguments
give the same file.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

START = datetime(2024, 3, 1, tzinfo=UTC)
US_PER_DAY = 86_400_000_000
SCHEMA = pa.schema(
    [
        pa.field("store_id", pa.int64()),
        pa.field("ts", pa.timestamp("us", tz="UTC")),
        pa.field("amount", pa.float64()),
    ]
)


def generate(
    rows: int,
    *,
    seed: int = 7,
    stores: int = 20,
    days: int = 14,
    dirty: float = 0.02,
    hot_rows: int = 0,
) -> pa.Table:
    """``rows + hot_rows`` sales, shuffled; the same arguments give the same table."""
    rng = np.random.default_rng(seed)
    start_us = int(START.timestamp()) * 1_000_000
    store = rng.integers(0, stores, size=rows, dtype=np.int64)
    ts = start_us + rng.integers(0, days * US_PER_DAY, size=rows, dtype=np.int64)
    if hot_rows:
        store = np.concatenate([store, np.zeros(hot_rows, dtype=np.int64)])
        ts = np.concatenate([ts, start_us + rng.integers(0, US_PER_DAY, size=hot_rows)])
    n = len(store)
    amount = np.round(rng.lognormal(mean=3.0, sigma=0.8, size=n), 2)
    valid_store = np.ones(n, dtype=np.bool_)
    spoiled = rng.choice(n, size=int(n * dirty), replace=False)
    for i, row in enumerate(spoiled):
        match i % 3:
            case 0:
                amount[row] = -amount[row] - 0.01
            case 1:
                valid_store[row] = False
            case _:
                amount[row] = np.nan
    order = rng.permutation(n)
    return pa.table(
        {
            "store_id": pa.array(store[order], mask=~valid_store[order]),
            "ts": pa.array(ts[order], pa.timestamp("us", tz="UTC")),
            "amount": pa.array(amount[order], pa.float64()),
        },
        schema=SCHEMA,
    )


def write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.sales.generate", description=__doc__)
    p.add_argument("--rows", type=int, required=True, help="sales to generate")
    p.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--stores", type=int, default=20)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--dirty", type=float, default=0.02, help="fraction of spoiled rows")
    p.add_argument("--hot-rows", type=int, default=0, help="extra sales of store 0 on day 1")
    a = p.parse_args(argv)
    table = generate(
        a.rows, seed=a.seed, stores=a.stores, days=a.days, dirty=a.dirty, hot_rows=a.hot_rows
    )
    write(table, a.out)
    print(f"{table.num_rows:,} rows written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
