"""The results store and run ledger: one DuckDB file per output directory.

Why DuckDB: the results are a table that we upsert in bulk (tens of thousands of rows at
a time, straight from Arrow), aggregate (split jobs add their parts up) and export to
Parquet and CSV — DuckDB does all three in-process with no server, and its primary keys
make the upsert idempotent. SQLite would need row-by-row inserts and a Parquet writer on
the side; plain Parquet files cannot upsert.

Tables:

``runs``   one row per run id — input fingerprint, task, status, totals.
``parts``  one row per job part, primary key ``(run_id, job_id, part)``; a part written
           twice (a redone job) is kept once, so storing is idempotent.
``read_positions``  the Kafka collector's next offset per (run, topic, partition), with
           the topic's id: written in the same transaction as the parts they read, so the
           store alone says where its collector goes on (offsets stored with the data).

A job is *done* when all of its parts are stored. Results are buffered in memory and
written by :meth:`ResultStore.flush`; callers commit their input only after a flush.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import duckdb
import polars as pl

from dispatchkit import identity as ids
from dispatchkit.errors import StoreError
from dispatchkit.message import JobResult
from dispatchkit.task import Task

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    input_fingerprint VARCHAR NOT NULL,
    inputs VARCHAR NOT NULL,
    task VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    rows_read BIGINT DEFAULT 0,
    rows_dispatched BIGINT DEFAULT 0,
    rows_quarantined BIGINT DEFAULT 0,
    total_jobs BIGINT DEFAULT 0,
    total_parts BIGINT DEFAULT 0,
    created_at DOUBLE NOT NULL,
    updated_at DOUBLE NOT NULL
);
ALTER TABLE runs ADD COLUMN IF NOT EXISTS identity VARCHAR;
CREATE TABLE IF NOT EXISTS parts (
    run_id VARCHAR NOT NULL,
    job_id VARCHAR NOT NULL,
    part INTEGER NOT NULL,
    parts INTEGER NOT NULL,
    country VARCHAR NOT NULL,
    date_hour BIGINT NOT NULL,
    tests BIGINT NOT NULL,
    positives BIGINT NOT NULL,
    positive_rate DOUBLE NOT NULL,
    ci_low DOUBLE,
    ci_high DOUBLE,
    worker VARCHAR NOT NULL,
    stored_at DOUBLE NOT NULL,
    PRIMARY KEY (run_id, job_id, part)
);
CREATE TABLE IF NOT EXISTS read_positions (
    run_id VARCHAR NOT NULL,
    topic VARCHAR NOT NULL,
    partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    topic_id VARCHAR,
    updated_at DOUBLE NOT NULL,
    PRIMARY KEY (run_id, topic, partition)
);
"""

_PART_SCHEMA = {
    "run_id": pl.String,
    "job_id": pl.String,
    "part": pl.Int32,
    "parts": pl.Int32,
    "country": pl.String,
    "date_hour": pl.Int64,
    "tests": pl.Int64,
    "positives": pl.Int64,
    "positive_rate": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "worker": pl.String,
    "stored_at": pl.Float64,
}

#: Jobs with every part of one split stored, parts added up: one row per (job, split).
#: A part belongs to the split given by its ``parts`` count; parts of different splits
#: never add up (``part 0 of 1`` plus ``parts 1-9 of 10`` is not a complete job).
_COMPLETE_SPLITS = """
    SELECT run_id, job_id, country, date_hour, parts,
           sum(tests)::BIGINT AS tests, sum(positives)::BIGINT AS positives,
           any_value(positive_rate) AS positive_rate, any_value(ci_low) AS ci_low,
           any_value(ci_high) AS ci_high
    FROM parts WHERE run_id = ?
    GROUP BY run_id, job_id, country, date_hour, parts
    HAVING count(*) = parts
"""

RESULT_COLUMNS = (
    "run_id",
    "job_id",
    "country",
    "date_hour",
    "tests",
    "positives",
    "positive_rate",
    "ci_low",
    "ci_high",
)


@dataclass(frozen=True)
class ReadPositions:
    """Where a collector of ``run_id`` goes on reading ``topic``: the next offset of each
    partition it has read (partitions it has not read are absent)."""

    run_id: str
    topic: str
    offsets: dict[int, int]
    topic_id: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """A row of the run ledger."""

    run_id: str
    input_fingerprint: str
    inputs: str
    task: str
    status: str
    rows_read: int
    rows_dispatched: int
    rows_quarantined: int
    total_jobs: int
    total_parts: int
    created_at: float
    updated_at: float
    identity: str | None = None  # JSON of :func:`dispatchkit.identity.run_identity`


class ResultStore:
    """Results and runs in a DuckDB file (``:memory:`` for a throwaway store)."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(self.path)
        except duckdb.Error as exc:
            raise StoreError(_open_error(self.path, exc)) from None
        try:
            self.con.execute(_SCHEMA)
        except duckdb.Error as exc:
            self.con.close()
            raise StoreError(_open_error(self.path, exc)) from None
        self._buffer: list[tuple[str, str, JobResult]] = []
        self.duplicates = 0

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    # -- run ledger --------------------------------------------------------------------

    def start_run(
        self, run_id: str, identity: Mapping[str, str], inputs: str, *, where: str = "made"
    ) -> RunRecord:
        """Record a new run, or return the existing one if its identity is the same.

        A run recorded with another identity (input, task, range, split size, …) is
        refused with one line naming the parameter: its stored parts belong to another
        computation. Runs recorded before identities existed are compared on input and
        task, the only parameters they recorded.
        """
        existing = self.get_run(run_id)
        if existing is not None:
            recorded = ids.loads(existing.identity) or {
                "input": existing.input_fingerprint,
                "task": existing.task,
            }
            wanted = (
                dict(identity)
                if existing.identity
                else {k: identity.get(k, "(not given)") for k in recorded}
            )
            ids.check_identity(run_id, recorded, wanted, where=where)
            return existing
        now = time.time()
        self.con.execute(
            "INSERT INTO runs (run_id, input_fingerprint, inputs, task, status, created_at, "
            "updated_at, identity) VALUES (?, ?, ?, ?, 'started', ?, ?, ?)",
            [run_id, identity["input"], inputs, identity["task"], now, now, ids.dumps(identity)],
        )
        record = self.get_run(run_id)
        assert record is not None
        return record

    def update_run(self, run_id: str, **fields: object) -> None:
        """Set ledger fields (status, totals) of a run."""
        allowed = set(RunRecord.__dataclass_fields__) - {"run_id", "created_at", "updated_at"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown run fields: {sorted(unknown)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.con.execute(
            f"UPDATE runs SET {sets}, updated_at = ? WHERE run_id = ?",
            [*fields.values(), time.time(), run_id],
        )

    def get_run(self, run_id: str) -> RunRecord | None:
        cur = self.con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        rows = cur.fetchall()
        row = rows[0] if rows else None
        if row is None:
            return None
        names = [d[0] for d in cur.description]
        return RunRecord(**dict(zip(names, row, strict=True)))

    # -- results -----------------------------------------------------------------------

    def add(self, run_id: str, worker: str, results: Iterable[JobResult]) -> None:
        """Buffer results; they are durable after :meth:`flush`."""
        self._buffer.extend((run_id, worker, r) for r in results)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def read_positions(self, run_id: str, topic: str) -> ReadPositions:
        """The positions stored for a run's collector on ``topic`` (empty: from the start)."""
        rows = self.con.execute(
            "SELECT partition, next_offset, topic_id FROM read_positions "
            "WHERE run_id = ? AND topic = ? ORDER BY partition",
            [run_id, topic],
        ).fetchall()
        ids = {str(r[2]) for r in rows if r[2] is not None}
        return ReadPositions(
            run_id,
            topic,
            {int(p): int(o) for p, o, _ in rows},
            topic_id=ids.pop() if len(ids) == 1 else None,
        )

    def flush(self, positions: ReadPositions | None = None) -> int:
        """Write buffered results and, in the same transaction, ``positions`` (which
        replace the run's stored positions on that topic); returns how many parts were new
        (the rest were repeats)."""
        if not self._buffer and positions is None:
            return 0
        self.con.execute("BEGIN TRANSACTION")
        try:
            new = self._insert_buffer()
            if positions is not None:
                self._write_positions(positions)
            self.con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # a failed COMMIT has rolled back already
                self.con.execute("ROLLBACK")
            raise
        self.duplicates += len(self._buffer) - new
        self._buffer = []
        return new

    def _write_positions(self, positions: ReadPositions) -> None:
        self.con.execute(
            "DELETE FROM read_positions WHERE run_id = ? AND topic = ?",
            [positions.run_id, positions.topic],
        )
        now = time.time()
        rows = [
            [positions.run_id, positions.topic, p, o, positions.topic_id, now]
            for p, o in sorted(positions.offsets.items())
        ]
        if rows:
            self.con.executemany("INSERT INTO read_positions VALUES (?, ?, ?, ?, ?, ?)", rows)

    def _insert_buffer(self) -> int:
        if not self._buffer:
            return 0
        rows = self._buffer
        results = [r[2] for r in rows]
        # Polars builds string columns from Python lists far faster than pyarrow does.
        table = pl.DataFrame(
            {
                "run_id": [r[0] for r in rows],
                "job_id": [r.job_id for r in results],
                "part": [r.part for r in results],
                "parts": [r.parts for r in results],
                "country": [r.country for r in results],
                "date_hour": [r.date_hour for r in results],
                "tests": [r.tests for r in results],
                "positives": [r.positives for r in results],
                "positive_rate": [r.positive_rate for r in results],
                "ci_low": [r.ci_low for r in results],
                "ci_high": [r.ci_high for r in results],
                "worker": [r[1] for r in rows],
                "stored_at": [time.time()] * len(rows),
            },
            schema=_PART_SCHEMA,
        ).to_arrow()
        before = self._count_parts()
        self.con.register("incoming", table)
        try:
            # A part already stored, or repeated within the batch, is kept once.
            self.con.execute("INSERT INTO parts SELECT * FROM incoming ON CONFLICT DO NOTHING")
        finally:
            self.con.unregister("incoming")
        return self._count_parts() - before

    def _count_parts(self) -> int:
        row = self.con.execute("SELECT count(*) FROM parts").fetchall()
        return int(row[0][0]) if row else 0

    def done_keys(self, run_id: str) -> set[tuple[str, int]]:
        """``(country, date_hour)`` of every job whose parts are all stored."""
        rows = self.con.execute(
            f"SELECT DISTINCT country, date_hour FROM ({_COMPLETE_SPLITS})", [run_id]
        ).fetchall()
        return {(str(c), int(h)) for c, h in rows}

    def jobs_done(self, run_id: str) -> int:
        row = self.con.execute(
            f"SELECT count(DISTINCT job_id) FROM ({_COMPLETE_SPLITS})", [run_id]
        ).fetchall()
        return int(row[0][0]) if row else 0

    def results(self, run_id: str, task: Task) -> pl.DataFrame:
        """One row per complete job, parts added up, sorted by country and hour."""
        merged_arrow = self.con.sql(
            f"""
            SELECT run_id, job_id, country, date_hour, tests, positives, parts,
                   positive_rate, ci_low, ci_high
            FROM ({_COMPLETE_SPLITS})
            -- one split per job: were a job ever cut two ways, each complete split alone
            -- holds all its rows, and adding both would count them twice
            QUALIFY row_number() OVER (PARTITION BY job_id ORDER BY parts) = 1
            ORDER BY country, date_hour
            """,
            params=[run_id],
        ).to_arrow_table()
        merged = pl.DataFrame(pl.from_arrow(merged_arrow))
        split = merged.filter(pl.col("parts") > 1)
        if split.height:
            fixed = [
                task.merge(j, int(k), int(n))
                for j, k, n in zip(split["job_id"], split["positives"], split["tests"], strict=True)
            ]
            patch = split.select("job_id").with_columns(
                pl.Series("positive_rate_m", [f[0] for f in fixed], pl.Float64),
                pl.Series("ci_low_m", [f[1] for f in fixed], pl.Float64),
                pl.Series("ci_high_m", [f[2] for f in fixed], pl.Float64),
            )
            merged = (
                merged.join(patch, on="job_id", how="left")
                .with_columns(
                    pl.coalesce("positive_rate_m", "positive_rate").alias("positive_rate"),
                    pl.coalesce("ci_low_m", "ci_low").alias("ci_low"),
                    pl.coalesce("ci_high_m", "ci_high").alias("ci_high"),
                )
                .drop("positive_rate_m", "ci_low_m", "ci_high_m")
            )
        return merged.with_columns(
            pl.from_epoch(pl.col("date_hour"), time_unit="s")
            .dt.replace_time_zone("UTC")
            .alias("date_hour")
        ).select(RESULT_COLUMNS)


def write_results(results: pl.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """Write ``results.parquet`` and ``results.csv`` (ISO 8601 UTC hours) atomically.

    Each is written to a temp file beside it and renamed; a failed write (disk full, …)
    removes its temp file and raises :class:`~dispatchkit.errors.OutputError`.
    """
    from dispatchkit.outdir import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    pq_path, csv_path = out_dir / "results.parquet", out_dir / "results.csv"
    with atomic_path(pq_path) as tmp:
        results.write_parquet(tmp)
    with atomic_path(csv_path) as tmp:
        results.with_columns(pl.col("date_hour").dt.strftime("%Y-%m-%dT%H:%M:%SZ")).write_csv(tmp)
    return pq_path, csv_path


def _open_error(path: str, exc: duckdb.Error) -> str:
    """One line: the store file, what is wrong with it, what to do."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    p = Path(path)
    if p.is_dir():
        what = "is a directory, not a results store"
    elif "not a valid DuckDB database" in text:
        what = "is not a DuckDB database (overwritten or not a store)"
    elif "Could not read enough bytes" in text or "truncated" in text.lower():
        what = "is truncated or corrupt"
    elif "Conflicting lock" in text or "Could not set lock" in text:
        return (
            f"{path}: cannot open the results store: another process has it open "
            f"({text}); one writer per output directory"
        )
    else:
        what = f"cannot be opened as a results store ({text})"
    return f"{path} {what}: move it away or use another --out"
