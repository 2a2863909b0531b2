"""Reading input files: resolve paths, check the schema, validate rows, sort out of core.

The reader is the dispatcher's I/O edge. It hands DuckDB the files (Parquet directly;
CSV after a streaming pass through PyArrow that records each row's number) and builds
one SQL view, ``checked``, that normalizes every row and names what is wrong with it
(see :mod:`dispatchkit.schema`). Three queries then run over that view:

1. counts per reason (rows read, rows valid, rows bad);
2. the bad rows, written to ``quarantine.parquet`` and ``quarantine.csv``;
3. the valid rows as ``(country_id, hour, positive)`` sorted by ``(country_id, hour)``,
   streamed back in Arrow record batches.

Memory stays bounded because DuckDB sorts out of core: it is given a memory limit and a
spill directory, and we only ever hold one record batch (plus the rows of the job being
cut) in Python. Input size changes the spill size and the time, not the peak memory.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dispatchkit.errors import BadRowError, InputError
from dispatchkit.schema import NEGATIVE, POSITIVE, REASONS, REQUIRED_COLUMNS

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)


def resolve_inputs(source: str | Path) -> list[Path]:
    """The input files named by a path, a directory or a glob, sorted; errors read as sentences."""
    text = str(source)
    path = Path(text)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise InputError(f"{text}: no files match this pattern")
    elif path.is_dir():
        paths = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES + CSV_SUFFIXES
        )
        if not paths:
            raise InputError(f"{text}: directory holds no .parquet or .csv files")
    elif path.exists():
        paths = [path]
    else:
        raise InputError(f"{text}: no such file or directory")
    kinds = set()
    for p in paths:
        suffix = p.suffix.lower()
        if suffix not in PARQUET_SUFFIXES + CSV_SUFFIXES:
            raise InputError(
                f"{p}: unsupported file type {suffix or '(none)'}; use .parquet or .csv"
            )
        if not os.access(p, os.R_OK):
            raise InputError(f"{p}: file is not readable (permission denied)")
        if p.stat().st_size == 0:
            raise InputError(f"{p}: file is empty")
        kinds.add("csv" if suffix in CSV_SUFFIXES else "parquet")
    if len(kinds) > 1:
        raise InputError(f"{text}: mixes Parquet and CSV files; give one kind per run")
    return paths


def fingerprint(paths: list[Path]) -> str:
    """A content hash of the input files (names excluded, so a copy has the same print)."""
    digest = hashlib.blake2b(digest_size=16)
    for p in paths:
        with p.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\x00")
    return digest.hexdigest()


@dataclass(frozen=True)
class RowCounts:
    """How many rows were read and how many failed each check."""

    rows_read: int
    rows_valid: int
    bad: dict[str, int] = field(default_factory=dict)
    jobs: int = 0  # distinct (country, hour) keys among the valid rows

    @property
    def rows_bad(self) -> int:
        return sum(self.bad.values())


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class InputReader:
    """A DuckDB session over the input files, limited in memory and spilling to disk."""

    def __init__(
        self,
        paths: list[Path],
        *,
        start: datetime,
        end: datetime,
        spill_dir: Path,
        memory_limit: str = "384MB",
        threads: int = 2,
    ) -> None:
        self.paths = paths
        self.start = start
        self.end = end
        self.spill_dir = spill_dir
        spill_dir.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(
            config={
                "memory_limit": memory_limit,
                "threads": threads,
                "temp_directory": str(spill_dir / "duckdb"),
            }
        )
        self.con.execute("SET TimeZone = 'UTC'")
        self._staged: list[Path] = []
        self.countries: list[str] = []
        self._build_view()

    def __enter__(self) -> InputReader:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()
        for p in self._staged:
            p.unlink(missing_ok=True)

    # -- building the view -------------------------------------------------------------

    def _build_view(self) -> None:
        if self.paths[0].suffix.lower() in CSV_SUFFIXES:
            files = [self._stage_csv(p) for p in self.paths]
            source = f"read_parquet({_sql_list(tuple(str(f) for f in files))})"
            self.con.execute(f"CREATE VIEW source AS SELECT * FROM {source}")
        else:
            for p in self.paths:
                self._check_parquet(p)
            files_sql = _sql_list(tuple(str(p) for p in self.paths))
            self.con.execute(
                f"CREATE VIEW source AS SELECT file_row_number + 1 AS row, filename AS file, "
                f"country, test_datetime, result FROM read_parquet([{files_sql}], "
                f"filename = true, file_row_number = true, union_by_name = true)"
            )
        types = {row[0]: row[1] for row in self.con.execute("DESCRIBE source").fetchall()}
        ts, res = self._typed_expressions(types)
        start, end = int(self.start.timestamp()), int(self.end.timestamp())
        reason = (
            "CASE "
            + " ".join(
                f"WHEN {cond} THEN '{code}'"
                for code, cond in (
                    ("country_missing", "country IS NULL"),
                    ("country_empty", "country_t = ''"),
                    ("test_datetime_missing", "test_datetime IS NULL"),
                    ("test_datetime_unparseable", "ts IS NULL"),
                    ("test_datetime_out_of_range", f"ts < {start} OR ts >= {end}"),
                    ("result_missing", "result IS NULL"),
                    ("result_invalid", f"res NOT IN ({_sql_list(POSITIVE + NEGATIVE)})"),
                )
            )
            + " END"
        )
        self.con.execute(
            f"""
            CREATE VIEW normalized AS
              SELECT row, file, country, test_datetime, result,
                     {_strip("country")} AS country_t, {ts} AS ts, {res} AS res
              FROM source;
            CREATE VIEW checked AS SELECT *, {reason} AS reason FROM normalized;
            """
        )

    def _check_parquet(self, path: Path) -> None:
        try:
            schema = pq.read_schema(path)
        except Exception as exc:
            raise InputError(f"{path}: not a readable Parquet file ({_short(exc)})") from None
        _require_columns(path, list(schema.names))

    def _stage_csv(self, path: Path) -> Path:
        """Copy a CSV file's required columns, as text and with row numbers, to Parquet."""
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 text CSV file") from None
        header = [h.strip() for h in header]
        if len(header) == 1 and any(d in header[0] for d in ";\t|"):
            raise InputError(
                f"{path}: header {header[0]!r} is not comma-separated; "
                "dispatchkit reads CSV with ',' as the delimiter"
            )
        _require_columns(path, header)
        staged = self.spill_dir / f"stage-{len(self._staged)}-{path.stem}.parquet"
        self._staged.append(staged)
        opts = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in REQUIRED_COLUMNS},
            include_columns=list(REQUIRED_COLUMNS),
            # An unquoted empty field is a null; a quoted "" is an empty string.
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            null_values=[""],
        )
        row = 1
        try:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=8 << 20),
                parse_options=pacsv.ParseOptions(delimiter=","),
                convert_options=opts,
            )
            with pq.ParquetWriter(staged, _STAGE_SCHEMA) as writer:
                for batch in reader:
                    n = batch.num_rows
                    cols = [
                        pa.array(range(row, row + n), pa.int64()),
                        pa.array([str(path)] * n, pa.string()) if n else pa.array([], pa.string()),
                        *(batch.column(c) for c in REQUIRED_COLUMNS),
                    ]
                    writer.write_batch(pa.record_batch(cols, schema=_STAGE_SCHEMA))
                    row += n
        except pa.ArrowInvalid as exc:
            raise InputError(f"{path}: malformed CSV ({_short(exc)})") from None
        if row == 1:
            raise InputError(f"{path}: CSV file has a header but no rows")
        return staged

    def _typed_expressions(self, types: dict[str, str]) -> tuple[str, str]:
        """SQL for the epoch second of ``test_datetime`` and the normalized ``result``."""
        tt = types["test_datetime"].upper()
        if tt in ("VARCHAR", "STRING"):
            ts = "floor(epoch(TRY_CAST(test_datetime AS TIMESTAMPTZ)))::BIGINT"
        elif tt.startswith("TIMESTAMP"):
            ts = "floor(epoch(CAST(test_datetime AS TIMESTAMPTZ)))::BIGINT"
        else:
            raise InputError(
                f"column test_datetime has type {tt}; expected a timestamp or ISO 8601 text"
            )
        rt = types["result"].upper()
        if rt == "VARCHAR":
            res = f"lower({_strip('result')})"
        elif rt == "BOOLEAN":
            res = "CASE WHEN result THEN 'positive' ELSE 'negative' END"
        else:
            raise InputError(f"column result has type {rt}; expected text or boolean")
        if types["country"].upper() != "VARCHAR":
            raise InputError(f"column country has type {types['country']}; expected text")
        return ts, res

    # -- queries -----------------------------------------------------------------------

    def counts(self) -> RowCounts:
        """Rows read, rows failing each check, and distinct jobs (one full pass)."""
        try:
            rows = self.con.execute(
                "SELECT coalesce(reason, ''), count(*), "
                "count(DISTINCT (country_t, ts // 3600)) FILTER (WHERE reason IS NULL) "
                "FROM checked GROUP BY ALL"
            ).fetchall()
        except duckdb.Error as exc:
            raise InputError(f"cannot read input: {_short(exc)}") from None
        by_reason = {str(r): int(n) for r, n, _ in rows}
        jobs = sum(int(j) for r, _, j in rows if r == "")
        valid = by_reason.pop("", 0)
        return RowCounts(
            rows_read=valid + sum(by_reason.values()), rows_valid=valid, bad=by_reason, jobs=jobs
        )

    def first_bad_row(self) -> None:
        """Raise :class:`BadRowError` for the first invalid row, if there is one."""
        row = self.con.execute(
            "SELECT file, row, reason, country, CAST(test_datetime AS VARCHAR), "
            "CAST(result AS VARCHAR) FROM checked WHERE reason IS NOT NULL "
            "ORDER BY file, row LIMIT 1"
        ).fetchall()
        if not row:
            return
        file, number, code, country, ts, result = row[0]
        fld, why = REASONS[code]
        value = {"country": country, "test_datetime": ts, "result": result}[fld]
        raise BadRowError(f"{file}: row {number}: {why} (value {value!r}); --strict stops here")

    def write_quarantine(self, out_dir: Path, *, any_bad: bool = True) -> tuple[Path, Path]:
        """Write the invalid rows to ``quarantine.parquet`` and ``quarantine.csv``.

        With ``any_bad=False`` (the counts found none) the files are written empty
        without another pass over the input.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        reasons = ", ".join(
            f"('{code}', '{fld}', '{why.replace(chr(39), chr(39) * 2)}')"
            for code, (fld, why) in REASONS.items()
        )
        self.con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE quarantine AS
            SELECT c.file, c.row, r.field, r.why AS reason,
                   CAST(c.country AS VARCHAR) AS country,
                   CAST(c.test_datetime AS VARCHAR) AS test_datetime,
                   CAST(c.result AS VARCHAR) AS result
            FROM checked c JOIN (VALUES {reasons}) r(code, field, why) ON c.reason = r.code
            WHERE {"true" if any_bad else "false"}
            ORDER BY c.file, c.row
            """
        )
        pq_path, csv_path = out_dir / "quarantine.parquet", out_dir / "quarantine.csv"
        self.con.execute(f"COPY quarantine TO '{_esc(pq_path)}' (FORMAT parquet)")
        self.con.execute(f"COPY quarantine TO '{_esc(csv_path)}' (FORMAT csv, HEADER)")
        self.con.execute("DROP TABLE quarantine")
        return pq_path, csv_path

    def sorted_valid(self, rows_per_batch: int = 262_144) -> Iterator[pa.RecordBatch]:
        """Valid rows as ``(key, pos)`` sorted by key = ``cid << 32 | hour since the epoch``.

        One integer sort key sorts twice as fast as two columns; ``self.countries[cid]``
        names the country.
        """
        self.countries[:] = [  # in place: callers may hold the list
            str(r[0])
            for r in self.con.execute(
                "SELECT DISTINCT country_t FROM checked WHERE reason IS NULL ORDER BY 1"
            ).fetchall()
        ]
        self.con.execute(
            "CREATE OR REPLACE TEMP TABLE country_ids AS "
            "SELECT country_t, (row_number() OVER (ORDER BY country_t) - 1)::INTEGER AS cid "
            "FROM (SELECT DISTINCT country_t FROM checked WHERE reason IS NULL)"
        )
        reader: Any = self.con.sql(
            f"""
            SELECT (k.cid::BIGINT << 32) | (c.ts // 3600) AS key,
                   (c.res IN ({_sql_list(POSITIVE)}))::UTINYINT AS pos
            FROM checked c JOIN country_ids k USING (country_t)
            WHERE c.reason IS NULL
            ORDER BY key
            """
        ).to_arrow_reader(rows_per_batch)  # sorted: keep insertion order on
        yield from reader


_STAGE_SCHEMA = pa.schema(
    [("row", pa.int64()), ("file", pa.string())] + [(c, pa.string()) for c in REQUIRED_COLUMNS]
)


def _strip(column: str) -> str:
    """SQL trimming spaces, tabs and line breaks (DuckDB's one-argument trim takes spaces only)."""
    return f"trim({column}, chr(32) || chr(9) || chr(10) || chr(13) || chr(11) || chr(12))"


def _require_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        found = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {found or 'none'})"
        )


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _esc(path: Path) -> str:
    return str(path).replace("'", "''")
