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
import fnmatch
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dispatchkit.errors import BadRowError, InputError
from dispatchkit.schema import MAX_KEY_BYTES, NEGATIVE, POSITIVE, REASONS, REQUIRED_COLUMNS

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
GLOB_CHARS = "*?["

#: Added to an hour since the epoch in the sort key, so that hours before 1970 sort and
#: decode too: every hour of the years 1-9999 (all ``--start``/``--end`` can name) plus
#: the bias lies in ``[0, 2**32)``.
HOUR_BIAS = 1 << 31

_UNIT_PER_HOUR = {"us": 3_600_000_000, "ns": 3_600_000_000_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64 = (-(1 << 63), (1 << 63) - 1)


def resolve_inputs(source: str | Path) -> list[Path]:
    """The input files named by a path, a directory or a glob: sorted, each real file once.

    An existing path is taken literally, even when its name holds ``*?[``; only a name
    that does not exist is expanded as a pattern. Directories are walked following
    symbolic links, but each real directory once (a link to an ancestor cannot loop),
    and a file reached twice (through links) is read once. Names starting with ``.``
    are left out of directory walks and wildcard matches, as in a shell.
    """
    text = str(source)
    path = Path(text)
    if path.exists():
        if path.is_dir():
            paths = _walk_files(path)
            if not paths:
                raise InputError(f"{text}: directory holds no .parquet or .csv files")
        else:
            paths = [path]
    elif any(ch in text for ch in GLOB_CHARS):
        paths = [p for p in _glob(text) if p.is_file()]
        if not paths:
            raise InputError(f"{text}: no files match this pattern")
    else:
        raise InputError(f"{text}: no such file or directory")
    paths = _unique_files(paths)
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


def _unique_files(paths: list[Path]) -> list[Path]:
    """``paths`` without the files already listed under another name (links), in order."""
    seen: set[tuple[int, int]] = set()
    out = []
    for p in paths:
        st = p.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(p)
    return out


def _dirs_below(root: str) -> Iterator[str]:
    """``root`` and every directory below it, following links, each real directory once."""

    def fail(exc: OSError) -> None:
        raise InputError(f"{exc.filename}: cannot list directory ({exc.strerror})") from None

    seen: set[tuple[int, int]] = set()
    for top, dirs, _ in os.walk(root or ".", onerror=fail, followlinks=True):
        st = os.stat(top)
        seen.add((st.st_dev, st.st_ino))
        keep = []
        for d in sorted(dirs):
            try:
                sd = os.stat(os.path.join(top, d))
            except OSError:
                continue  # a dangling link
            if not d.startswith(".") and (sd.st_dev, sd.st_ino) not in seen:
                seen.add((sd.st_dev, sd.st_ino))
                keep.append(d)
        dirs[:] = keep
        yield top if root else os.path.relpath(top)


def _walk_files(root: Path) -> list[Path]:
    suffixes = PARQUET_SUFFIXES + CSV_SUFFIXES
    return sorted(
        Path(top, name)
        for top in _dirs_below(str(root))
        for name in os.listdir(top)
        if not name.startswith(".")
        and name.lower().endswith(suffixes)
        and os.path.isfile(os.path.join(top, name))
    )


def _glob(pattern: str) -> list[Path]:
    """Expand a shell pattern (``**`` = any depth) without looping through directory links."""
    comps = [c for c in pattern.split("/") if c not in ("", ".")]
    found: set[str] = set()

    def expand(cur: str, i: int) -> None:
        if i == len(comps):
            found.add(cur)
            return
        comp, last = comps[i], i == len(comps) - 1
        if comp == "**":
            for d in list(_dirs_below(cur)):
                d = "" if d == "." and not cur else d
                if last:  # a final ** matches everything below, files too
                    found.update(
                        os.path.join(d, n) for n in os.listdir(d or ".") if not n.startswith(".")
                    )
                expand(d, i + 1)
            return
        if not any(ch in comp for ch in GLOB_CHARS):
            names = [comp]
        else:
            try:
                names = sorted(os.listdir(cur or "."))
            except OSError:
                return
            hidden_ok = comp.startswith(".")
            names = [
                n
                for n in names
                if (hidden_ok or not n.startswith(".")) and fnmatch.fnmatchcase(n, comp)
            ]
        for name in names:
            nxt = os.path.join(cur, name)
            if last:
                if os.path.exists(nxt):
                    found.add(nxt)
            elif os.path.isdir(nxt):
                expand(nxt, i + 1)

    expand("/" if pattern.startswith("/") else "", 0)
    return [Path(p) for p in sorted(found)]


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
    """A DuckDB session over the input files, limited in memory and spilling to disk.

    Its files (CSV staging copies, DuckDB's spill files) live in a directory of its own
    under ``spill_dir``, made unique per reader and removed by :meth:`close` — also when
    the constructor fails — so two processes can share an output directory's spill dir.
    """

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
        self.work_dir = Path(tempfile.mkdtemp(prefix="reader-", dir=spill_dir))
        self._staged: list[Path] = []
        self.countries: list[str] = []
        self.con: duckdb.DuckDBPyConnection | None = None
        try:
            self.con = duckdb.connect(
                config={
                    "memory_limit": memory_limit,
                    "threads": threads,
                    "temp_directory": str(self.work_dir / "duckdb"),
                }
            )
            self._con.execute("SET TimeZone = 'UTC'")
            self._build_view()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> InputReader:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    @property
    def _con(self) -> duckdb.DuckDBPyConnection:
        assert self.con is not None
        return self.con

    # -- building the view -------------------------------------------------------------

    def _build_view(self) -> None:
        if self.paths[0].suffix.lower() in CSV_SUFFIXES:
            files = [self._stage_csv(p) for p in self.paths]
            scans = [(self.paths[0], f"SELECT * FROM read_parquet([{_duck_paths(files)}])")]
        else:
            scans = [
                (
                    group[0],
                    f"SELECT file_row_number + 1 AS row, filename AS file, country, "
                    f"test_datetime, result FROM read_parquet([{_duck_paths(group)}], "
                    f"filename = true, file_row_number = true, union_by_name = true)",
                )
                for group in self._parquet_groups()
            ]
        branches = [self._branch(first, scan) for first, scan in scans]
        reason = (
            "CASE "
            + " ".join(
                f"WHEN {cond} THEN '{code}'"
                for code, cond in (
                    ("country_missing", "country_t IS NULL"),
                    ("country_empty", "country_t = ''"),
                    ("country_too_long", f"strlen(country_t) > {MAX_KEY_BYTES}"),
                    ("test_datetime_missing", "ts_missing"),
                    ("test_datetime_unparseable", "hour IS NULL"),
                    ("test_datetime_out_of_range", "NOT in_range"),
                    ("result_missing", "res IS NULL"),
                    ("result_invalid", f"res NOT IN ({_sql_list(POSITIVE + NEGATIVE)})"),
                )
            )
            + " END"
        )
        self._con.execute(
            f"""
            CREATE VIEW normalized AS {" UNION ALL ".join(branches)};
            CREATE VIEW checked AS SELECT *, {reason} AS reason FROM normalized;
            """
        )

    def _parquet_groups(self) -> list[list[Path]]:
        """The Parquet files grouped by the exact types of their three columns.

        Each group is read by one scan, so DuckDB never casts a column from one file's
        type to another's; files whose types differ in kind (text against a number, a
        timestamp against text) are refused, naming the file, the column and both types.
        """
        groups: dict[tuple[str, ...], list[Path]] = {}
        first: dict[str, tuple[Path, str, str]] = {}  # column -> (file, type, kind)
        for p in self.paths:
            try:
                schema = pq.read_schema(p)
            except Exception as exc:
                raise InputError(f"{p}: not a readable Parquet file ({_short(exc)})") from None
            _require_columns(p, list(schema.names))
            types = []
            for col in REQUIRED_COLUMNS:
                if schema.names.count(col) > 1:
                    raise InputError(f"{p}: column {col} appears more than once")
                t = schema.field(col).type
                kind = _kind(t)
                f0, t0, k0 = first.setdefault(col, (p, str(t), kind))
                if kind != k0:
                    raise InputError(
                        f"{p}: column {col} has type {t}, but {t0} in {f0}; "
                        "every input file must give it the same kind of type"
                    )
                if kind not in _ACCEPTED[col]:
                    raise InputError(f"{p}: column {col} has type {t}; expected {_EXPECTED[col]}")
                types.append(str(t))
            groups.setdefault(tuple(types), []).append(p)
        return list(groups.values())

    def _branch(self, first: Path, scan: str) -> str:
        """One scan's rows normalized: the key, the hour floored exactly, the range check.

        ``ts`` is the instant as an exact integer: microseconds, or nanoseconds for a
        nanosecond column (never rounded to microseconds), text parsed with offsets to
        microseconds (DuckDB truncates further digits, which floors a civil time). The
        range is compared in that unit against ``start``/``end`` converted exactly, and the
        hour is a true floor division for instants before 1970 too.
        """
        types = {
            row[0]: str(row[1]).upper() for row in self._con.execute(f"DESCRIBE {scan}").fetchall()
        }
        where = first if len(self.paths) == 1 else f"{first} (and files like it)"
        tt = types["test_datetime"]
        if tt in ("VARCHAR", "STRING"):
            ts, unit = "epoch_us(TRY_CAST(test_datetime AS TIMESTAMPTZ))", "us"
        elif tt.startswith("TIMESTAMP") and "NS" in tt:
            ts, unit = "epoch_ns(test_datetime)", "ns"
        elif tt.startswith("TIMESTAMP"):
            ts, unit = "epoch_us(test_datetime)", "us"
        else:
            raise InputError(
                f"{where}: column test_datetime has type {tt}; "
                "expected a timestamp or ISO 8601 text"
            )
        rt = types["result"]
        if rt == "VARCHAR":
            res = f"lower({_strip('result')})"
        elif rt == "BOOLEAN":
            res = "CASE WHEN result THEN 'positive' WHEN NOT result THEN 'negative' END"
        else:
            raise InputError(f"{where}: column result has type {rt}; expected text or boolean")
        if types["country"] != "VARCHAR":
            raise InputError(f"{where}: column country has type {types['country']}; expected text")
        lo, hi = _in_unit(self.start, unit), _in_unit(self.end, unit)
        per_hour = _UNIT_PER_HOUR[unit]
        # Floor division whatever the sign convention of // and %: DuckDB truncates.
        hour = f"(ts // {per_hour} - (ts % {per_hour} < 0)::BIGINT)"
        return f"""
            SELECT row, file, country, test_datetime, result, country_t, ts_missing, res,
                   {hour} AS hour, (ts >= {lo} AND ts < {hi}) AS in_range
            FROM (
              SELECT row, file, country,
                     CAST(test_datetime AS VARCHAR) AS test_datetime,
                     CAST(result AS VARCHAR) AS result,
                     {_strip("country")} AS country_t, test_datetime IS NULL AS ts_missing,
                     {ts} AS ts, {res} AS res
              FROM ({scan})
            )"""

    def _stage_csv(self, path: Path) -> Path:
        """Copy a CSV file's required columns, as text and with row numbers, to Parquet.

        Header names are read by us and normalized: a UTF-8 byte order mark and spaces
        around a name are dropped. Case is kept (``Country`` is not ``country``, as in
        Parquet), but named in the error.
        """
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), [])
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 text CSV file") from None
        except csv.Error as exc:
            raise InputError(f"{path}: malformed CSV header ({_short(exc)})") from None
        header = [h.strip() for h in header]
        if len(header) == 1 and any(d in header[0] for d in ";\t|"):
            raise InputError(
                f"{path}: header {header[0]!r} is not comma-separated; "
                "dispatchkit reads CSV with ',' as the delimiter"
            )
        _require_columns(path, header)
        for col in REQUIRED_COLUMNS:
            if header.count(col) > 1:
                raise InputError(f"{path}: column {col} appears more than once in the header")
        # Our names for pyarrow: the required ones, and unique placeholders for the rest.
        names = [h if h in REQUIRED_COLUMNS else f"\x00{i}" for i, h in enumerate(header)]
        staged = self.work_dir / f"stage-{len(self._staged)}.parquet"
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
                read_options=pacsv.ReadOptions(block_size=8 << 20, column_names=names, skip_rows=1),
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

    # -- queries -----------------------------------------------------------------------

    def counts(self) -> RowCounts:
        """Rows read, rows failing each check, and distinct jobs (one full pass)."""
        try:
            rows = self._con.execute(
                "SELECT coalesce(reason, ''), count(*), "
                "count(DISTINCT (country_t, hour)) FILTER (WHERE reason IS NULL) "
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
        row = self._con.execute(
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
        self._con.execute(
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
        self._con.execute(f"COPY quarantine TO '{_esc(pq_path)}' (FORMAT parquet)")
        self._con.execute(f"COPY quarantine TO '{_esc(csv_path)}' (FORMAT csv, HEADER)")
        self._con.execute("DROP TABLE quarantine")
        return pq_path, csv_path

    def sorted_valid(self, rows_per_batch: int = 262_144) -> Iterator[pa.RecordBatch]:
        """Valid rows as ``(key, pos)`` sorted by key = ``cid << 32 | hour + HOUR_BIAS``.

        One integer sort key sorts twice as fast as two columns; ``self.countries[cid]``
        names the country, ``(key & 0xFFFFFFFF) - HOUR_BIAS`` is the hour since the epoch
        (negative before 1970).
        """
        self.countries[:] = [  # in place: callers may hold the list
            str(r[0])
            for r in self._con.execute(
                "SELECT DISTINCT country_t FROM checked WHERE reason IS NULL ORDER BY 1"
            ).fetchall()
        ]
        self._con.execute(
            "CREATE OR REPLACE TEMP TABLE country_ids AS "
            "SELECT country_t, (row_number() OVER (ORDER BY country_t) - 1)::INTEGER AS cid "
            "FROM (SELECT DISTINCT country_t FROM checked WHERE reason IS NULL)"
        )
        reader: Any = self._con.sql(
            f"""
            SELECT (k.cid::BIGINT << 32) | (c.hour + {HOUR_BIAS}) AS key,
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


#: Kinds of Arrow type accepted per column; files must agree on the kind.
_ACCEPTED = {
    "country": ("text",),
    "test_datetime": ("timestamp", "text"),
    "result": ("text", "boolean"),
}
_EXPECTED = {
    "country": "text",
    "test_datetime": "a timestamp or ISO 8601 text",
    "result": "text or boolean",
}


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_boolean(t):
        return "boolean"
    return str(t)


def _in_unit(when: datetime, unit: str) -> int:
    """``when`` as an exact integer count of ``unit`` since the epoch, clamped to int64."""
    us = (when - _EPOCH) // timedelta(microseconds=1)
    value = us * 1000 if unit == "ns" else us
    return min(max(value, _INT64[0]), _INT64[1])


def _duck_paths(paths: list[Path]) -> str:
    """SQL list items naming ``paths`` literally: DuckDB globs ``*?[``, so they are escaped."""
    return _sql_list(
        tuple("".join(f"[{c}]" if c in GLOB_CHARS else c for c in str(p)) for p in paths)
    )


def _strip(column: str) -> str:
    """SQL trimming spaces, tabs and line breaks (DuckDB's one-argument trim takes spaces only)."""
    return f"trim({column}, chr(32) || chr(9) || chr(10) || chr(13) || chr(11) || chr(12))"


def _require_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        found = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        lower = {n.lower() for n in names}
        hint = "; names are case-sensitive" if any(c in lower for c in missing) else ""
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {found or 'none'}{hint})"
        )


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _esc(path: Path) -> str:
    return str(path).replace("'", "''")
