"""The whole-process floor: ``python -m dispatchkit.bench.floor_script FILE OUT``.

What someone without dispatchkit would write for the COVID job, timed by the benchmark's
``commands`` section from exec to exit like ``dispatchkit run``: one lazy Polars
``scan_parquet → group_by(country, hour) → len, sum(positive)`` (streaming engine), the
vectorized Wilson interval, and ``OUT/results.parquet``. It does not validate or
quarantine: the generated inputs hold only valid rows, and the benchmark checks that
``dispatchkit run`` found the same jobs and counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dispatchkit.bench.variants import floor


def main(argv: list[str]) -> int:
    source, out = argv[0], Path(argv[1])
    results, _ = floor({"input": source})  # the in-process floor's very query
    out.mkdir(parents=True, exist_ok=True)
    results.write_parquet(out / "results.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
