"""The results store and run ledger: one DuckDB file per output directory.

Why DuckDB: the results are a table that we append to in bulk (tens of thousands of rows
at a time, straight from Arrow), aggregate (split jobs add their parts up) and export to
Parquet and CSV — DuckDB does all three in-process with no server. SQLite would need
row-by-row inserts and a Parquet writer on the side; plain Parquet files cannot tell
which parts they hold.

Tables:

``runs``   one row per run id — input fingerprint, task, status, totals.
``parts``  one row per job part ``(run_id, job_id, part)``; a part written twice (a
           redone job) is kept once, so storing is idempotent. The store decides which
           parts are new itself (:mod:`dispatchkit.seen`) rather than through a primary
           key, whose index inserts cost more than the rest of storing; and a job counts
           as done only with each of its parts stored exactly once.
``read_positions``  the Kafka collector's next offset per (run, topic, partition), with
           the topic's id: written in the same transaction as the parts they read, so the
           store alone says where its collector goes on (offsets stored with the data).

A job is *done* when all of its parts are stored. Results are buffered in memory and
written by :meth:`ResultStore.flush`; callers commit their input only after a flush.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from dispatchkit import arrays, wire
from dispatchkit import identity as ids
from dispatchkit.app import App, Task
from dispatchkit.errors import RunError, StoreError
from dispatchkit.positions import ReadPositions
from dispatchkit.seen import Fingerprints, first_of_equal, sharing

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
ALTER TABLE runs ADD COLUMN IF NOT EXISTS app VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS parts_table VARCHAR;
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

#: SQL of a part's fingerprint (:mod:`dispatchkit.seen`), the same over any table of parts.
_FINGERPRINT = "hash(CAST(job_id AS VARCHAR), CAST(part AS INTEGER))"

#: Columns of every parts table before the app's key, result and state columns.
_ID_COLUMNS = ("run_id", "job_id", "part", "parts", "state")


@dataclass(frozen=True)
class Layout:
    """How one (app, task)'s job parts are stored: its table and columns."""

    table: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    states: tuple[str, ...]  # without the ``state:`` prefix
    schema: pa.Schema  # every column of the table, in order

    @classmethod
    def of(cls, app: App, task: Task) -> Layout:
        fields = [
            pa.field("run_id", pa.string()),
            pa.field("job_id", pa.string()),
            pa.field("part", pa.int32()),
            pa.field("parts", pa.int32()),
            pa.field("state", pa.bool_()),
        ]
        ks = app.keyspec
        fields += [pa.field(n, t) for n, t in zip(ks.names, ks.types, strict=True)]
        fields += list(task.result)
        states = task.combine.schema if task.combine is not None else pa.schema([])
        fields += [pa.field(wire.STATE_PREFIX + f.name, f.type) for f in states]
        fields += [pa.field("worker", pa.string()), pa.field("stored_at", pa.float64())]
        schema = pa.schema(fields)
        digest = hashlib.blake2b(str(schema).encode(), digest_size=6).hexdigest()
        return cls(
            table=f"parts_{digest}",
            keys=tuple(ks.names),
            values=tuple(task.result.names),
            states=tuple(states.names),
            schema=schema,
        )


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
    app: str | None = None
    parts_table: str | None = None


@dataclass(frozen=True)
class _Stored:
    """Stored parts of one run: of whole jobs, and of split jobs."""

    whole: int = 0
    split: int = 0

    def __add__(self, other: _Stored) -> _Stored:
        return _Stored(self.whole + other.whole, self.split + other.split)


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
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._layouts: dict[str, Layout] = {}
        self._tasks: dict[str, Task] = {}
        self._seen: dict[str, Fingerprints] = {}  # per run: the parts stored
        # per run, beside its fingerprints: stored parts of whole jobs (parts = 1) and of
        # split jobs (parts > 1), so counting done jobs needs no query over every part
        self._stored: dict[str, _Stored] = {}
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
        self,
        run_id: str,
        identity: Mapping[str, str],
        inputs: str,
        *,
        app: App,
        task: Task,
        where: str = "made",
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
            self._use(run_id, app, task)
            return existing
        layout = self._use(run_id, app, task)
        now = time.time()
        self.con.execute(
            "INSERT INTO runs (run_id, input_fingerprint, inputs, task, status, created_at, "
            "updated_at, identity, app, parts_table) "
            "VALUES (?, ?, ?, ?, 'started', ?, ?, ?, ?, ?)",
            [
                run_id,
                identity["input"],
                inputs,
                identity["task"],
                now,
                now,
                ids.dumps(identity),
                app.name,
                layout.table,
            ],
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

    def _use(self, run_id: str, app: App, task: Task) -> Layout:
        """The run's parts table, created if it does not exist yet."""
        layout = Layout.of(app, task)
        empty = arrays.empty_table(layout.schema)
        self.con.register("layout_probe", empty)
        try:
            types = self.con.execute("DESCRIBE SELECT * FROM layout_probe").fetchall()
        finally:
            self.con.unregister("layout_probe")
        cols = ", ".join(f"{_q(str(name))} {kind}" for name, kind, *_ in types)
        # No primary key (see the module's docstring); tables made with one still work.
        self.con.execute(f"CREATE TABLE IF NOT EXISTS {layout.table} ({cols})")
        self._layouts[run_id] = layout
        self._tasks[run_id] = task
        return layout

    def parts_table(self, run_id: str) -> str:
        """The name of the table holding a run's job parts (for tools and tests)."""
        record = self.get_run(run_id)
        if record is None or record.parts_table is None:
            raise RunError(f"run {run_id!r} is not in this store")
        return record.parts_table

    def layout(self, run_id: str) -> Layout:
        try:
            return self._layouts[run_id]
        except KeyError:
            raise RunError(f"run {run_id!r} was not started in this store") from None

    def add(self, msg: wire.ResultMessage) -> int:
        """Buffer a result message's job parts; they are durable after :meth:`flush`.

        Returns the number of parts it held.
        """
        n = len(msg)
        if not n:
            return 0
        layout = self.layout(msg.run_id)
        body = msg.table
        columns: dict[str, pa.Array] = {
            "run_id": arrays.repeat(msg.run_id, n, pa.string()),
            "job_id": msg.index.column(0),
            "part": msg.index.column(1),
            "parts": msg.index.column(2),
            "state": msg.index.column(3),
            "worker": arrays.repeat(msg.worker, n, pa.string()),
            "stored_at": arrays.repeat(time.time(), n, pa.float64()),
        }
        ordered = []
        for f in layout.schema:
            if f.name in columns:
                ordered.append(columns[f.name])
            elif f.name in body.schema.names:
                ordered.append(body.column(f.name).cast(f.type))
            else:  # e.g. no state columns in a message of whole jobs
                ordered.append(pa.nulls(n, f.type))
        self._buffer.append(pa.Table.from_arrays(ordered, schema=layout.schema))
        self._buffered += n
        return n

    @property
    def buffered(self) -> int:
        return self._buffered

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
            new, stored = self._insert_buffer()
            if positions is not None:
                self._write_positions(positions)
            self.con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # a failed COMMIT has rolled back already
                self.con.execute("ROLLBACK")
            raise
        for run_id, fingerprints, counts in stored:  # held once they are on disk
            self._seen[run_id].add(fingerprints)
            self._stored[run_id] += counts
        self.duplicates += self._buffered - new
        self._buffer, self._buffered = [], 0
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

    def _insert_buffer(self) -> tuple[int, list[tuple[str, np.ndarray, _Stored]]]:
        """Insert the buffered parts not stored yet; returns how many were inserted and,
        per run, their fingerprints and counts (held once the transaction commits)."""
        by_run: dict[str, list[pa.Table]] = {}
        for table in self._buffer:
            by_run.setdefault(str(table.column("run_id")[0].as_py()), []).append(table)
        new, stored = 0, []
        for run_id, tables in by_run.items():
            n, fingerprints, counts = self._insert_new(run_id, pa.concat_tables(tables))
            new += n
            stored.append((run_id, fingerprints, counts))
        return new, stored

    def _insert_new(self, run_id: str, incoming: pa.Table) -> tuple[int, np.ndarray, _Stored]:
        """Insert the parts of ``incoming`` (one run) that are not stored and not repeated
        earlier in it (:mod:`dispatchkit.seen`); returns their count, fingerprints and
        counts by kind."""
        name = self.layout(run_id).table
        seen = self._fingerprints(run_id, name)
        self.con.register("incoming", incoming)
        try:
            fingerprints = self.con.execute(
                f"SELECT {_FINGERPRINT} AS h FROM incoming"
            ).fetchnumpy()["h"]
            fingerprints = np.asarray(fingerprints, dtype=np.uint64)
            keep = np.ones(incoming.num_rows, dtype=np.bool_)
            rows = sharing(fingerprints)
            if len(rows):  # repeated in the batch, or a collision: compare the ids
                keep = first_of_equal(
                    incoming.num_rows,
                    rows,
                    incoming.column("job_id").take(rows).to_pylist(),
                    incoming.column("part").take(rows).to_pylist(),
                )
            maybe = np.flatnonzero(keep & seen.holds(fingerprints))
            if len(maybe):  # stored before, or a collision: ask the table
                keep[self._stored_rows(run_id, name, incoming, maybe)] = False
            if keep.all():
                self.con.execute(f"INSERT INTO {name} SELECT * FROM incoming")
            elif keep.any():
                self.con.unregister("incoming")
                self.con.register("incoming", incoming.filter(pa.array(keep)))
                self.con.execute(f"INSERT INTO {name} SELECT * FROM incoming")
        finally:
            self.con.unregister("incoming")
        whole = int(np.count_nonzero(arrays.to_numpy(incoming.column("parts"))[keep] == 1))
        kept = int(keep.sum())
        return kept, fingerprints[keep], _Stored(whole, kept - whole)

    def _fingerprints(self, run_id: str, table: str) -> Fingerprints:
        """The fingerprints of the run's stored parts, read from its table the first time."""
        seen = self._seen.get(run_id)
        if seen is None:
            seen = Fingerprints()
            held = self.con.execute(
                f"SELECT {_FINGERPRINT} AS h FROM {table} WHERE run_id = ?", [run_id]
            ).fetchnumpy()["h"]
            seen.add(np.asarray(held, dtype=np.uint64))
            row = self.con.execute(
                f"SELECT count(*) FILTER (WHERE parts = 1), count(*) FILTER (WHERE parts > 1) "
                f"FROM {table} WHERE run_id = ?",
                [run_id],
            ).fetchall()[0]
            self._stored[run_id] = _Stored(int(row[0]), int(row[1]))
            self._seen[run_id] = seen
        return seen

    def _stored_rows(
        self, run_id: str, table: str, incoming: pa.Table, rows: np.ndarray
    ) -> list[int]:
        """Which of ``rows`` of ``incoming`` have their ``(job_id, part)`` in the table."""
        asked = pa.table(
            {
                "i": pa.array(rows, pa.int64()),
                "job_id": incoming.column("job_id").take(rows),
                "part": incoming.column("part").take(rows),
            }
        )
        self.con.register("asked", asked)
        try:
            found = self.con.execute(
                f"SELECT a.i FROM asked a WHERE EXISTS (SELECT 1 FROM {table} t "
                "WHERE t.run_id = ? AND t.job_id = a.job_id AND t.part = a.part)",
                [run_id],
            ).fetchall()
        finally:
            self.con.unregister("asked")
        return [int(r[0]) for r in found]

    def _complete(self, layout: Layout) -> str:
        """Job parts of complete splits: every part of one ``parts`` count is stored,
        once; parts of different splits never add up (part 0 of 1 and parts 1-9 of 10 is
        no job). One split per job, should a job ever have been cut two ways. A part
        stored twice (which the store does not do) leaves its job not done: refused,
        never counted twice."""
        return f"""
            SELECT * FROM {layout.table}
            WHERE run_id = ? AND (job_id, parts) IN (
                SELECT job_id, parts FROM {layout.table} WHERE run_id = ?
                GROUP BY job_id, parts HAVING count(*) = parts AND count(DISTINCT part) = parts
                QUALIFY row_number() OVER (PARTITION BY job_id ORDER BY parts) = 1
            )"""

    def done_jobs(self, run_id: str) -> set[str]:
        """Ids of every job whose parts are all stored (none for a run not started here)."""
        if run_id not in self._layouts:
            return set()
        layout = self.layout(run_id)
        rows = self.con.execute(
            f"SELECT DISTINCT job_id FROM ({self._complete(layout)})", [run_id, run_id]
        ).fetchall()
        return {str(r[0]) for r in rows}

    def parts_stored(self, run_id: str) -> int:
        """How many job parts of the run are stored (0 for a run not started here)."""
        if run_id not in self._layouts:
            return 0
        row = self.con.execute(
            f"SELECT count(*) FROM {self.layout(run_id).table} WHERE run_id = ?", [run_id]
        ).fetchall()
        return int(row[0][0]) if row else 0

    def jobs_done_counted(self, run_id: str) -> int:
        """:meth:`jobs_done`, counted from the parts this store wrote (no query over every
        stored part: what the collector asks after each flush).

        Every stored part of a whole job (``parts = 1``) is a done job; only split parts
        are grouped. That is :meth:`jobs_done` because a run's ``(job_id, part)`` is
        stored once: a job whose part 0 is stored as a whole job has no split with a part
        0, so no complete split too. A store that has not written the run counts by query.
        A row written by another process is not seen here; :meth:`jobs_done`,
        :meth:`done_jobs` and :meth:`results`, which decide a run's status, read the table.
        """
        stored = self._stored.get(run_id)
        if stored is None:
            return self.jobs_done(run_id)
        if not stored.split:
            return stored.whole
        row = self.con.execute(
            f"SELECT count(*) FROM (SELECT job_id FROM {self.layout(run_id).table} "
            "WHERE run_id = ? AND parts > 1 GROUP BY job_id, parts "
            "HAVING count(*) = parts AND count(DISTINCT part) = parts)",
            [run_id],
        ).fetchall()
        return stored.whole + int(row[0][0])

    def jobs_done(self, run_id: str) -> int:
        """How many jobs of the run have all their parts stored (see :meth:`_complete`)."""
        if run_id not in self._layouts:
            return 0
        layout = self.layout(run_id)
        row = self.con.execute(
            f"SELECT count(DISTINCT job_id) FROM ({self._complete(layout)})", [run_id, run_id]
        ).fetchall()
        return int(row[0][0]) if row else 0

    def results(self, run_id: str) -> pl.DataFrame:
        """One row per complete job: run_id, job_id, the key columns, the result columns,
        sorted by key; split jobs' states merged and finished by the task's combine."""
        layout = self.layout(run_id)
        keys = ", ".join(_q(k) for k in layout.keys)
        values = ", ".join(_q(v) for v in layout.values)
        whole = self.con.sql(
            f"SELECT run_id, job_id, {keys}, {values} FROM ({self._complete(layout)}) "
            "WHERE parts = 1",
            params=[run_id, run_id],
        ).to_arrow_table()
        tables = [whole]
        if layout.states:
            tables += self._finish_split(run_id, layout)
        out = pa.concat_tables([t.cast(whole.schema) for t in tables])
        df = pl.DataFrame(pl.from_arrow(out))
        zoned = [n for n, t in df.schema.items() if isinstance(t, pl.Datetime) and t.time_zone]
        df = df.with_columns([pl.col(n).dt.convert_time_zone("UTC") for n in zoned])
        return df.sort(list(layout.keys))

    def _finish_split(self, run_id: str, layout: Layout) -> list[pa.Table]:
        states = ", ".join(_q(wire.STATE_PREFIX + s) for s in layout.states)
        keys = ", ".join(_q(k) for k in layout.keys)
        split = self.con.sql(
            f"SELECT job_id, {keys}, {states} FROM ({self._complete(layout)}) "
            "WHERE parts > 1 ORDER BY job_id, part",
            params=[run_id, run_id],
        ).to_arrow_table()
        if not split.num_rows:
            return []
        rows = split.to_pylist()
        out: list[dict[str, object]] = []
        task = self._tasks[run_id]
        i = 0
        while i < len(rows):
            j = i
            while j < len(rows) and rows[j]["job_id"] == rows[i]["job_id"]:
                j += 1
            key = {k: rows[i][k] for k in layout.keys}
            parts = [{s: r[wire.STATE_PREFIX + s] for s in layout.states} for r in rows[i:j]]
            result = task.finish_states(key, parts)
            out.append({"run_id": run_id, "job_id": rows[i]["job_id"], **key, **result})
            i = j
        return [pa.Table.from_pylist(out)]


#: The key of results.parquet's metadata holding an incomplete run's banner lines (JSON).
INCOMPLETE_KEY = "dispatchkit.incomplete"


def write_results(
    results: pl.DataFrame, out_dir: Path, incomplete: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write ``results.parquet`` and ``results.csv`` (ISO 8601 UTC hours) atomically.

    ``incomplete``, the lines saying what an incomplete run lacks, is kept in the Parquet
    file's metadata (:data:`INCOMPLETE_KEY`), so a chart redrawn from it says so too.
    Each is written to a temp file beside it and renamed; a failed write (disk full, …)
    removes its temp file and raises :class:`~dispatchkit.errors.OutputError`.
    """
    from dispatchkit.outdir import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    pq_path, csv_path = out_dir / "results.parquet", out_dir / "results.csv"
    metadata = {INCOMPLETE_KEY: json.dumps(list(incomplete))} if incomplete else None
    with atomic_path(pq_path) as tmp:
        results.write_parquet(tmp, metadata=metadata)
    times = [n for n, t in results.schema.items() if isinstance(t, pl.Datetime)]
    with atomic_path(csv_path) as tmp:
        results.with_columns(
            [pl.col(n).dt.strftime("%Y-%m-%dT%H:%M:%SZ") for n in times]
        ).write_csv(tmp)
    return pq_path, csv_path


def incomplete_lines(path: Path) -> list[str]:
    """The banner lines :func:`write_results` kept in a results Parquet file (none if
    the run was complete, or the file is not Parquet or not readable)."""
    import pyarrow.parquet as pq

    if path.suffix != ".parquet":
        return []
    try:
        metadata = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowException):
        return []
    raw = metadata.get(INCOMPLETE_KEY.encode())
    if raw is None:
        return []
    try:
        lines = json.loads(raw)
    except ValueError:
        return []
    return [str(line) for line in lines] if isinstance(lines, list) else []


def same_rows(csv_path: Path, parquet_path: Path) -> bool:
    """Whether ``parquet_path`` exists and holds as many rows as ``csv_path`` (as the two
    files :func:`write_results` writes together do)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(parquet_path).num_rows
        return bool(rows == pl.scan_csv(csv_path).select(pl.len()).collect().item())
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError):
        return False


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
