"""Reading input files: resolve paths, check the schema, validate rows, sort out of core.

The reader is the dispatcher's I/O edge, driven by an :class:`~dispatchkit.app.App`: its
declared columns are the input contract, its key cuts the rows into jobs. It hands
DuckDB the files (Parquet directly, one scan per group of files whose declared columns
have the same types; CSV after a streaming pass through PyArrow that records each row's
number) and builds one SQL view, ``checked``, holding each row's file and row number,
its declared columns as text (for the quarantine), their normalized values and the code
of the first rule it fails (:mod:`dispatchkit.rules`). Queries over that view give

1. :meth:`InputReader.counts`: rows read, rows failing each rule, jobs, the largest job;
2. :meth:`InputReader.write_quarantine`: the bad rows, to ``quarantine.parquet`` and
   ``quarantine.csv``;
3. :meth:`InputReader.sorted_valid`: the valid rows with their ``bucket`` and key columns
   and the columns a task reads, sorted by bucket, then key, streamed back in Arrow
   record batches.

``bucket`` is a hash of the key, the same in every process, machine and DuckDB
version: the MD5 digest of the key's values as text (joined by ``chr(31)``; a floored
time as integer epoch microseconds, a boolean as ``true``/``false``), read as an
unsigned little-endian 128-bit integer, modulo the run's bucket count (see
:func:`key_bucket`): :func:`bucket_count` of its jobs, about :data:`JOBS_PER_BUCKET`
jobs a bucket, a power of two up to :data:`NBUCKETS`. A small run so gets few messages,
a big one spreads over many partitions; a given input always gets the same count.

The digest is computed once per key, not per row: the counting pass keeps the valid keys
in a table (``dk_keys``) with the digest's first 8 bytes as an unsigned little-endian
integer ``h`` (so ``h mod buckets`` is the bucket). The sort joins each row to its key
and orders by one integer, ``bucket << 56 | h >> 8``, then file and row: a bucket's keys
come in the order of their hash, each key's rows together and in input order. That
needs every key to have its own ``h >> 8``, which the counting pass checks; should two
keys of a run share one (a chance of about one in 10^7 at 100,000 keys) the sort falls
back to ordering by bucket, the key's values, file and row.

Memory stays bounded because DuckDB sorts out of core: it is given a memory limit and a
spill directory, and we only ever hold one record batch in Python. Input size changes
the spill size and the time, not the peak memory.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dispatchkit.app import App, Bool, Column, Float, Int, Text, Timestamp
from dispatchkit.errors import BadRowError, InputError, UsageError
from dispatchkit.keys import Floor, KeySpec, epoch_us, floor_us_sql
from dispatchkit.limits import DEFAULT_SORT_MEMORY
from dispatchkit.rules import (
    SESSION_SQL,
    alias,
    arrow_kind,
    check_input_type,
    compile_rules,
    literal,
    quote,
    reason_case_sql,
    reasons,
)

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
GLOB_CHARS = "*?["

#: Buckets of the key hash; the dispatcher uses a job's bucket as its message key.
#: A power of two (the SQL takes the hash's low bits).
NBUCKETS: Final = 256
assert NBUCKETS & (NBUCKETS - 1) == 0
#: Jobs a bucket aims at. A message costs about a millisecond from the dispatcher to the
#: store whatever it holds, so a small run gets few (20,000 one-row jobs: 32 buckets);
#: from 262,144 jobs on a run has all NBUCKETS, to spread over partitions and workers.
JOBS_PER_BUCKET: Final = 1024


def bucket_count(jobs: int) -> int:
    """Buckets of a run of ``jobs`` jobs: a power of two, at most :data:`NBUCKETS`."""
    n = 1
    while n < NBUCKETS and n * JOBS_PER_BUCKET < jobs:
        n *= 2
    return n


#: Separates a key's values in the text that is hashed into its bucket.
KEY_SEPARATOR: Final = chr(31)

#: Quarantine columns before the declared ones; a declared column may not take them.
QUARANTINE_COLUMNS: Final = ("file", "row", "field", "reason")

#: Arrow types of the normalized non-key columns in :meth:`InputReader.sorted_valid`.
VALUE_TYPES: Final[dict[type[Column], pa.DataType]] = {
    Int: pa.int64(),
    Float: pa.float64(),
    Text: pa.string(),
    Bool: pa.bool_(),
    Timestamp: pa.timestamp("ns", tz="UTC"),
}

# Columns of the ``checked`` view that are not declared columns. A declared column NAME is
# in the view as ``dk:NAME`` (its value) and ``raw:NAME`` (its text), so these take a
# ``dk.`` prefix: a column called fid or row would otherwise be the file id or the row.
_FID, _ROW, _FILE, _REASON = '"dk.fid"', '"dk.row"', '"dk.file"', '"dk.reason"'
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _raw(name: str) -> str:
    """The quoted name of a declared column's input value as text, in ``checked``."""
    return quote("raw:" + name)


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


def key_bucket(
    keyspec: KeySpec, key: Mapping[str, object] | Sequence[object], buckets: int = NBUCKETS
) -> int:
    """The bucket of a key (a dict by key name, or its values in key order).

    The same number :meth:`InputReader.sorted_valid` gives its rows, computed in Python.
    """
    values = keyspec.values(key) if isinstance(key, Mapping) else tuple(key)
    parts = []
    for v in values:
        if isinstance(v, bool):
            parts.append("true" if v else "false")
        elif isinstance(v, datetime):
            parts.append(str(epoch_us(v)))
        else:
            parts.append(str(v))
    digest = hashlib.md5(KEY_SEPARATOR.join(parts).encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest, "little") % buckets


@dataclass(frozen=True)
class RowCounts:
    """How many rows were read, how many failed each rule, the jobs and the largest one.

    ``largest_job`` is ``(key, rows, bytes)`` of the job whose read columns are the most
    bytes by estimate (8 per integer, float or timestamp value, 1 per boolean, the UTF-8
    length + 4 per text), or None when no row is valid.
    """

    rows_read: int
    rows_valid: int
    bad: dict[str, int] = field(default_factory=dict)
    jobs: int = 0  # distinct keys among the valid rows
    largest_job: tuple[dict[str, Any], int, int] | None = None

    @property
    def rows_bad(self) -> int:
        return sum(self.bad.values())


class InputReader:
    """A DuckDB session over the input files of an app, limited in memory, spilling to disk.

    ``start``/``end`` replace the bounds of the app's ``run_range=True`` Timestamp column
    (an app without one refuses them); None keeps the column's own ``min``/``max``. With
    ``strict``, :meth:`counts` raises :class:`BadRowError` for the first invalid row.

    Its files (CSV staging copies, DuckDB's spill files) live in a directory of its own,
    :attr:`work_dir`, made unique per reader under ``work_dir`` (the argument; also
    accepted as ``spill_dir``, its former name; default: the system's temporary
    directory) and removed by :meth:`close` — also when the constructor fails — so two
    processes can share an output directory's spill directory.
    """

    def __init__(
        self,
        paths: list[Path],
        app: App,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        strict: bool = False,
        work_dir: Path | None = None,
        spill_dir: Path | None = None,
        memory_limit: str = DEFAULT_SORT_MEMORY,
        threads: int = 2,
    ) -> None:
        if not paths:
            raise InputError("no input files")
        if work_dir is not None and spill_dir is not None and work_dir != spill_dir:
            raise UsageError("InputReader: give work_dir or spill_dir, not both")
        self.paths = list(paths)
        self.app = app
        self.keyspec = app.keyspec
        self.start = start
        self.end = end
        self.strict = strict
        self.run_range = None if start is None and end is None else (start, end)
        if self.run_range is not None and app.run_range_column is None:
            raise UsageError(
                f"--start/--end: app {app.name} has no Timestamp column with run_range=True"
            )
        taken = [c for c in QUARANTINE_COLUMNS if c in app.input_columns]
        if taken:
            raise UsageError(
                f"app {app.name}: column {taken[0]} clashes with a quarantine column "
                f"({', '.join(QUARANTINE_COLUMNS)}); rename it"
            )
        if "bucket" in self.keyspec.names:
            raise UsageError(f"app {app.name}: a key column may not be named bucket")
        base = work_dir or spill_dir or Path(tempfile.gettempdir())
        self.spill_dir = base
        base.mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(tempfile.mkdtemp(prefix="reader-", dir=base))
        self._staged: list[Path] = []
        self._reasons: dict[str, tuple[str, str]] = {}
        self._counts: dict[tuple[str, ...], RowCounts] = {}
        self._hash_sort = False  # every valid key has its own h >> 8 (see counts())
        self.con: duckdb.DuckDBPyConnection | None = None
        try:
            self.con = duckdb.connect(
                config={
                    "memory_limit": memory_limit,
                    "threads": threads,
                    "temp_directory": str(self.work_dir / "duckdb"),
                }
            )
            self._con.execute(SESSION_SQL)
            self._con.execute("SET enable_progress_bar = false")
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
            self.con = None
        shutil.rmtree(self.work_dir, ignore_errors=True)

    @property
    def _con(self) -> duckdb.DuckDBPyConnection:
        assert self.con is not None
        return self.con

    @property
    def columns(self) -> tuple[str, ...]:
        """The app's declared columns, in declaration order."""
        return tuple(self.app.input_columns)

    @property
    def reasons(self) -> dict[str, tuple[str, str]]:
        """``code -> (field, reason)`` of every rule the input's rows are checked against."""
        return dict(self._reasons)

    # -- building the view -------------------------------------------------------------

    def _build_view(self) -> None:
        cols = ", ".join(quote(c) for c in self.columns)
        if self.paths[0].suffix.lower() in CSV_SUFFIXES:
            files = [self._stage_csv(i, p) for i, p in enumerate(self.paths)]
            where = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (and others)"
            scans = [(where, f"SELECT * FROM read_parquet([{_duck_paths(files)}])")]
        else:
            index = {p: i for i, p in enumerate(self.paths)}
            scans = []
            for group in self._parquet_groups():
                fids = ", ".join(str(index[p]) for p in group)
                where = group[0] if len(group) == 1 else f"{group[0]} (and files like it)"
                scans.append(
                    (
                        where,
                        f"SELECT [{fids}][CAST(file_index AS BIGINT) + 1] AS {_FID}, "
                        f"CAST(file_row_number AS BIGINT) + 1 AS {_ROW}, filename AS {_FILE}, "
                        f"{cols} FROM read_parquet([{_duck_paths(group)}], union_by_name = true)",
                    )
                )
        branches = [self._branch(where, scan) for where, scan in scans]
        self._con.execute(f"CREATE VIEW checked AS {' UNION ALL '.join(branches)}")

    def _branch(self, where: object, scan: str) -> str:
        """One scan's rows: file, row, the declared columns as text, normalized, checked."""
        try:
            described = self._con.execute(f"DESCRIBE {scan}").fetchall()
        except duckdb.Error as exc:
            raise InputError(f"{where}: cannot read input ({_short(exc)})") from None
        types = {str(r[0]): str(r[1]) for r in described}
        compiled = compile_rules(
            self.app.input_columns, types, where=where, run_range=self.run_range
        )
        self._reasons.update(reasons(compiled))
        values = ", ".join(f"{c.value} AS {c.alias}" for c in compiled)
        raws = ", ".join(f"CAST({quote(c.name)} AS VARCHAR) AS {_raw(c.name)}" for c in compiled)
        aliases = ", ".join(c.alias for c in compiled)
        return (
            f"SELECT {_FID}, {_ROW}, {_FILE}, {raws}, {aliases}, "
            f"{reason_case_sql(compiled)} AS {_REASON} "
            f"FROM (SELECT *, {values} FROM ({scan}))"
        )

    def _parquet_groups(self) -> list[list[Path]]:
        """The Parquet files grouped by the exact types of their declared columns.

        Each group is read by one scan, so DuckDB never casts a column from one file's
        type to another's; files whose types differ in kind (text against a number, a
        timestamp against text) are refused, naming the file, the column and both types,
        and so is a type no rule of the column can read.
        """
        groups: dict[tuple[str, ...], list[Path]] = {}
        first: dict[str, tuple[Path, str, str]] = {}  # column -> (file, type, kind)
        for p in self.paths:
            try:
                schema = pq.read_schema(p)
            except Exception as exc:
                raise InputError(f"{p}: not a readable Parquet file ({_short(exc)})") from None
            _require_columns(p, list(schema.names), self.columns)
            types = []
            for col, rule in self.app.input_columns.items():
                if schema.names.count(col) > 1:
                    raise InputError(f"{p}: column {col} appears more than once")
                t = schema.field(col).type
                kind = arrow_kind(t)
                f0, t0, k0 = first.setdefault(col, (p, str(t), kind))
                if kind != k0:
                    raise InputError(
                        f"{p}: column {col} has type {t}, but {t0} in {f0}; "
                        "every input file must give it the same kind of type"
                    )
                check_input_type(p, col, rule, t)
                types.append(str(t))
            groups.setdefault(tuple(types), []).append(p)
        return list(groups.values())

    def _stage_csv(self, fid: int, path: Path) -> Path:
        """Copy a CSV file's declared columns, as text and with row numbers, to Parquet.

        Header names are read by us and normalized: a UTF-8 byte order mark and spaces
        around a name are dropped. Case is kept (``Country`` is not ``country``, as in
        Parquet), but named in the error.
        """
        columns = self.columns
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
        _require_columns(path, header, columns)
        for col in columns:
            if header.count(col) > 1:
                raise InputError(f"{path}: column {col} appears more than once in the header")
        # Our names for pyarrow: the declared ones, and unique placeholders for the rest.
        names = [h if h in columns else f"\x00{i}" for i, h in enumerate(header)]
        staged = self.work_dir / f"stage-{len(self._staged)}.parquet"
        self._staged.append(staged)
        stage_schema = pa.schema(
            [("dk.fid", pa.int64()), ("dk.row", pa.int64()), ("dk.file", pa.string())]
            + [(c, pa.string()) for c in columns]
        )
        opts = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in columns},
            include_columns=list(columns),
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
            with pq.ParquetWriter(staged, stage_schema) as writer:
                for batch in reader:
                    n = batch.num_rows
                    cols = [
                        pa.array([fid] * n, pa.int64()),
                        pa.array(range(row, row + n), pa.int64()),
                        pa.array([str(path)] * n, pa.string()),
                        *(batch.column(c) for c in columns),
                    ]
                    writer.write_batch(pa.record_batch(cols, schema=stage_schema))
                    row += n
        except pa.ArrowInvalid as exc:
            raise InputError(f"{path}: malformed CSV ({_short(exc)})") from None
        if row == 1:
            raise InputError(f"{path}: CSV file has a header but no rows")
        return staged

    # -- SQL over ``checked`` -------------------------------------------------------------

    def _key_exprs(self) -> list[str]:
        """SQL of each key column over ``checked``: the value, or a floor in epoch µs."""
        out = []
        for part in self.keyspec.parts:
            if isinstance(part, Floor):
                out.append(floor_us_sql(alias(part.column), part.unit))
            else:
                out.append(alias(part))
        return out

    @property
    def buckets(self) -> int:
        """The run's bucket count (:func:`bucket_count` of its jobs)."""
        return bucket_count(self.counts().jobs)

    @staticmethod
    def _hash_expr(keys: Sequence[str]) -> str:
        """SQL of a key's hash ``h`` (UBIGINT): the first 8 bytes of the MD5 digest of
        its values as text, little-endian, i.e. the low 64 bits of ``md5_number``."""
        text = f" || {literal(KEY_SEPARATOR)} || ".join(f"CAST({k} AS VARCHAR)" for k in keys)
        return f"CAST(md5_number({text}) & {2**64 - 1} AS UBIGINT)"

    def _value_columns(self, columns: Sequence[str] | None) -> list[str]:
        """The requested columns that are not key columns (default: the non-key columns)."""
        declared = self.app.input_columns
        if columns is None:
            plain = {p for p in self.keyspec.parts if isinstance(p, str)}
            return [c for c in declared if c not in plain]
        if isinstance(columns, str):
            raise UsageError(f"columns={columns!r}: expected a sequence of column names")
        unknown = [c for c in columns if c not in declared]
        if unknown:
            raise UsageError(
                f"app {self.app.name} has no column {unknown[0]!r} (columns: {', '.join(declared)})"
            )
        out: list[str] = []
        for c in columns:
            if c not in self.keyspec.names and c not in out:
                out.append(c)
        return out

    def _bytes_agg(self, columns: Sequence[str]) -> str:
        """SQL aggregate of a group's estimated bytes (see :class:`RowCounts`).

        Fixed-width columns count as the row count times their width, so only text
        columns are summed row by row.
        """
        fixed, texts = 0, []
        for c in columns:
            rule = self.app.input_columns[c]
            if isinstance(rule, Text):
                texts.append(f"(coalesce(strlen({alias(c)}), 0) + 4)")
            else:
                fixed += 1 if isinstance(rule, Bool) else 8
        agg = f"count(*) * {fixed}"
        if texts:
            agg += f" + sum({' + '.join(texts)})"
        return f"CAST({agg} AS BIGINT)"

    def _key_values(self, values: Sequence[object]) -> dict[str, Any]:
        key: dict[str, Any] = {}
        for part, name, v in zip(self.keyspec.parts, self.keyspec.names, values, strict=True):
            if isinstance(part, Floor) and v is not None:
                key[name] = _EPOCH + timedelta(microseconds=int(str(v)))
            else:
                key[name] = v
        return key

    # -- queries -----------------------------------------------------------------------

    def counts(self, columns: Sequence[str] | None = None) -> RowCounts:
        """Rows read, rows failing each rule, jobs and the largest job (one full pass).

        ``columns`` are the columns a job's size is estimated over (default: every
        declared column that is not a key column as is, what a task reads by default).
        With ``strict``, raises :class:`BadRowError` for the first invalid row instead.
        """
        value_cols = tuple(self._value_columns(columns))
        cached = self._counts.get(value_cols)
        if cached is None:
            cached = self._count(value_cols)
            self._counts[value_cols] = cached
        if self.strict and cached.rows_bad:
            self.first_bad_row()
        return cached

    def _count(self, value_cols: Sequence[str]) -> RowCounts:
        keys = self._key_exprs()
        ks = [f"k{i}" for i in range(len(keys))]
        grouped = ", ".join(
            f"CASE WHEN {_REASON} IS NULL THEN {k} END AS {n}"
            for k, n in zip(keys, ks, strict=True)
        )
        try:
            self._con.execute(
                f"""
                CREATE OR REPLACE TEMP TABLE dk_jobs AS
                SELECT {_REASON} AS reason, {grouped}, count(*) AS n,
                       {self._bytes_agg(value_cols)} AS b
                FROM checked GROUP BY ALL
                """
            )
            by_reason = self._con.execute(
                "SELECT coalesce(reason, ''), sum(n), count(*) FROM dk_jobs GROUP BY 1"
            ).fetchall()
            # The valid keys and their hash, for the sort (see the module's docstring).
            self._con.execute(
                f"CREATE OR REPLACE TEMP TABLE dk_keys AS SELECT {', '.join(ks)}, "
                f"{self._hash_expr(ks)} AS h FROM dk_jobs WHERE reason IS NULL"
            )
            distinct = self._con.execute(
                "SELECT count(*), count(DISTINCT h >> 8) FROM dk_keys"
            ).fetchall()
            self._hash_sort = bool(distinct) and distinct[0][0] == distinct[0][1]
            largest = self._con.execute(
                f"SELECT n, b, {', '.join(ks)} FROM dk_jobs WHERE reason IS NULL "
                f"ORDER BY b DESC, n DESC, {', '.join(ks)} LIMIT 1"
            ).fetchall()
        except duckdb.Error as exc:
            raise InputError(f"cannot read input: {_short(exc)}") from None
        finally:
            if self.con is not None:
                self._con.execute("DROP TABLE IF EXISTS dk_jobs")
        bad = {str(r): int(n) for r, n, _ in by_reason if r != ""}
        valid = sum(int(n) for r, n, _ in by_reason if r == "")
        jobs = sum(int(j) for r, _, j in by_reason if r == "")
        top = None
        if largest:
            n, b, *values = largest[0]
            top = (self._key_values(values), int(n), int(b))
        return RowCounts(
            rows_read=valid + sum(bad.values()),
            rows_valid=valid,
            bad=dict(sorted(bad.items())),
            jobs=jobs,
            largest_job=top,
        )

    def first_bad_row(self) -> None:
        """Raise :class:`BadRowError` for the first invalid row, if there is one."""
        raws = ", ".join(_raw(c) for c in self.columns)
        row = self._con.execute(
            f"SELECT {_FILE}, {_ROW}, {_REASON}, {raws} FROM checked "
            f"WHERE {_REASON} IS NOT NULL ORDER BY {_FID}, {_ROW} LIMIT 1"
        ).fetchall()
        if not row:
            return
        file, number, code, *values = row[0]
        fld, why = self._reasons[code]
        value = dict(zip(self.columns, values, strict=True))[fld]
        raise BadRowError(f"{file}: row {number}: {why} (value {value!r}); --strict stops here")

    def write_quarantine(self, out_dir: Path, *, any_bad: bool = True) -> tuple[Path, Path]:
        """Write the invalid rows to ``quarantine.parquet`` and ``quarantine.csv``.

        Columns: ``file``, ``row``, ``field``, ``reason``, then each declared column's
        input value as text. With ``any_bad=False`` (the counts found none) the files are
        written empty without another pass over the input.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        table = ", ".join(
            f"({literal(code)}, {literal(fld)}, {literal(why)})"
            for code, (fld, why) in self._reasons.items()
        )
        if not table:  # no rule at all: no row can be bad
            table, any_bad = "(NULL, NULL, NULL)", False
        raws = ", ".join(f"c.{_raw(c)} AS {quote(c)}" for c in self.columns)
        self._con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE quarantine AS
            SELECT c.{_FILE} AS file, c.{_ROW} AS row, r.field, r.why AS reason, {raws}
            FROM checked c JOIN (VALUES {table}) r(code, field, why) ON c.{_REASON} = r.code
            WHERE {"true" if any_bad else "false"}
            ORDER BY c.{_FID}, c.{_ROW}
            """
        )
        pq_path, csv_path = out_dir / "quarantine.parquet", out_dir / "quarantine.csv"
        self._con.execute(f"COPY quarantine TO {literal(str(pq_path))} (FORMAT parquet)")
        self._con.execute(f"COPY quarantine TO {literal(str(csv_path))} (FORMAT csv, HEADER)")
        self._con.execute("DROP TABLE quarantine")
        return pq_path, csv_path

    def batch_schema(self, columns: Sequence[str] | None = None) -> pa.Schema:
        """The schema of :meth:`sorted_valid`'s batches for ``columns``."""
        fields = [pa.field("bucket", pa.int32(), nullable=False)]
        fields += list(self.keyspec.schema)
        for c in self._value_columns(columns):
            rule = self.app.input_columns[c]
            fields.append(pa.field(c, VALUE_TYPES[type(rule)], nullable=not rule.required))
        return pa.schema(fields)

    def sorted_valid(
        self, columns: Sequence[str] | None = None, rows_per_batch: int = 262_144
    ) -> Iterator[pa.RecordBatch]:
        """The valid rows in Arrow batches of :meth:`batch_schema`, sorted by bucket.

        Each batch has ``bucket`` (int32), the key columns in the key's Arrow types, and
        the requested non-key ``columns`` normalized (default: every column not in the
        key as is). Within a bucket, keys come in the order of their hash (see the
        module's docstring); a job's rows are contiguous, in input order (file, then row).
        """
        value_cols = self._value_columns(columns)
        schema = self.batch_schema(value_cols)
        self.counts()  # the keys table and the bucket count
        keys = self._key_exprs()
        ks = [f"k{i}" for i in range(len(keys))]
        names = [quote(n) for n in self.keyspec.names]
        mask = self.buckets - 1
        # The rows' key values are named dk.k0, ... beside the requested columns (which
        # keep their declared names); dk_keys names them k0, ...
        rk = [quote("dk." + k) for k in ks]
        rows = [f"{k} AS {n}" for k, n in zip(keys, rk, strict=True)]
        rows += [f"{alias(c)} AS {quote(c)}" for c in value_cols]
        rows += [_FID, _ROW]
        select = [f"CAST(k.h & {mask} AS INTEGER) AS bucket"]
        select += [f"r.{k} AS {n}" for k, n in zip(rk, names, strict=True)]
        select += [f"r.{quote(c)}" for c in value_cols]
        on = " AND ".join(f"r.{a} = k.{b}" for a, b in zip(rk, ks, strict=True))
        if self._hash_sort:
            order = f"((k.h & {mask}) << 56) | (k.h >> 8), r.{_FID}, r.{_ROW}"
        else:
            order = f"bucket, {', '.join(f'r.{k}' for k in rk)}, r.{_FID}, r.{_ROW}"
        try:
            reader: Any = self._con.sql(
                f"SELECT {', '.join(select)} FROM "
                f"(SELECT {', '.join(rows)} FROM checked WHERE {_REASON} IS NULL) r "
                f"JOIN dk_keys k ON {on} ORDER BY {order}"
            ).to_arrow_reader(rows_per_batch)  # sorted: insertion order is kept
        except duckdb.Error as exc:
            raise InputError(f"cannot read input: {_short(exc)}") from None
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (duckdb.Error, OSError) as exc:  # DuckDB's error, through Arrow's stream
                raise InputError(f"cannot read input: {_short(exc)}") from None
            yield _conform(batch, schema)


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` in ``schema``'s types: epoch integers viewed as timestamps, casts if needed."""
    arrays = []
    for i, f in enumerate(schema):
        col = batch.column(i)
        if col.type != f.type:
            if pa.types.is_timestamp(f.type) and pa.types.is_int64(col.type):
                col = col.view(f.type)
            else:
                col = col.cast(f.type)
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _duck_paths(paths: list[Path]) -> str:
    """SQL list items naming ``paths`` literally: DuckDB globs ``*?[``, so they are escaped."""
    return ", ".join(
        literal("".join(f"[{c}]" if c in GLOB_CHARS else c for c in str(p))) for p in paths
    )


def _require_columns(path: Path, names: list[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        found = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        lower = {n.lower() for n in names}
        hint = "; names are case-sensitive" if any(c.lower() in lower for c in missing) else ""
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {found or 'none'}{hint})"
        )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, duckdb.OutOfMemoryException) or text.startswith("Out of Memory"):
        text += "; give the reader more memory with --sort-memory"
    return text
