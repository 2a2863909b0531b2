"""``dispatchkit check``: an app's declarations, and its task forms agreeing on a sample."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SRC = str(Path(__file__).resolve().parents[1] / "src")

APP = """
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import dispatchkit as dk

app = dk.App("tally", version="1")
app.columns(shop=dk.Text(), ts=dk.Timestamp(), amount=dk.Float(min=0.0))
app.key("shop", dk.floor("ts", "day", name="day"))

@app.task(
    result={"n": pa.int64(), "total": pa.float64()},
    reads=("amount",),
    combine=dk.Combine(
        state={"n": pa.int64(), "total": pa.float64()},
        create=lambda: {"n": 0, "total": 0.0},
        add=lambda s, rows: {"n": s["n"] + rows.num_rows,
                             "total": s["total"] + (pc.sum(rows["amount"]).as_py() or 0.0)},
        merge=lambda a, b: {"n": a["n"] + b["n"], "total": a["total"] + b["total"]},
        finish=lambda key, s: {"n": s["n"], "total": s["total"]},
    ),
)
def tally(key, rows):
    return {"n": rows.num_rows, "total": pc.sum(rows["amount"]).as_py() or 0.0}

@tally.vectorized
def tally_all(jobs):
    n = np.diff(jobs.offsets)
    cum = np.concatenate(([0.0], np.cumsum(jobs.rows["amount"].to_numpy())))
    total = cum[jobs.offsets[1:]] - cum[jobs.offsets[:-1]]
    return {"n": n, "total": total + (BUG if len(n) > 1 else 0.0)}

BUG = 0.0
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "dispatchkit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def _sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.parquet"
    ts = pa.array([i * 3_600_000_000 * 7 for i in range(60)], pa.timestamp("us", tz="UTC"))
    pq.write_table(
        pa.table({"shop": [f"s{i % 3}" for i in range(60)], "ts": ts, "amount": [1.5] * 60}), path
    )
    return path


def test_check_shows_the_app_and_finds_its_forms_agree(tmp_path: Path) -> None:
    (tmp_path / "tally.py").write_text(APP)
    proc = _cli("check", "--app", f"{tmp_path / 'tally.py'}:app", str(_sample(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "app tally 1:" in out
    assert "key (shop string, day timestamp[us, tz=UTC])" in out
    assert "task tally [per job, vectorized, combine] reads amount" in out
    assert "chart: none" in out
    assert "task tally: " in out and "split in 3 parts: ok" in out


def test_check_names_the_job_where_the_vectorized_form_differs(tmp_path: Path) -> None:
    (tmp_path / "tally.py").write_text(APP.replace("BUG = 0.0", "BUG = 0.5"))
    proc = _cli("check", "--app", f"{tmp_path / 'tally.py'}:app", str(_sample(tmp_path)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "vectorized form differs: total" in proc.stdout
    assert "shop=s0 day=" in proc.stdout
