"""Fake COVID-19 test results: the input dataset the dispatcher cuts into jobs.

Every row is one test: who was tested (``name``, ``city``, ``country``,
``date_of_birth``), when (``test_datetime``, UTC, whole seconds) and the ``result``
(``"positive"`` or ``"negative"``). The dispatcher reads such a file, keys rows by
(country, hour) and fans the keys out as jobs; the report charts the daily positive rate
per country. The data is shaped to make those steps visible: countries have unequal test
volumes, tests follow a daily and weekly rhythm, and each country's positive rate is a
baseline of 2-8% plus epidemic waves (spring and autumn, peaking at 15-35%, and for about
half the countries a smaller summer wave) whose timing and height differ by country. The
waves are placed by day of year and repeat every year, so any ``start``/``end`` gets them.
Two knobs bend the data on purpose: ``dirty_fraction`` writes every column as text and
corrupts that share of rows in six counted ways (for the validation tests), and
``hot_key_rows`` piles extra rows into one (country, hour) key (for the oversized-job
tests).

Speed. Faker makes about 9k rows/s, far too slow for millions of rows. So Faker only fills
a pool per country once (2,000 full names and 300 cities, duplicates kept so common names
stay common) and numpy draws every row: the country by test volume, the hour by the daily
and weekly rhythm, name and city as indices into the country's pools, the result as a
uniform draw below the country's positive rate in that hour. Arrow ``take`` turns indices
into strings, and ISO 8601 text is built by arithmetic on a byte matrix. Rows are made and
written ``row_group_size`` at a time (one Parquet row group each), so memory stays flat
however many rows are asked for; 2,000,000 rows take about 3 s on two cores.

Determinism. The same spec gives a byte-identical file for the same installed numpy, Faker
and pyarrow (Parquet files carry no timestamps; only ``created_by`` names the pyarrow
version). Chunk ``k`` draws from its own PCG64 stream, ``SeedSequence(seed,
spawn_key=(k,))``; country volumes outside the built-in table and the epidemic curves come
from ``SeedSequence(seed)`` itself; the ``i``-th country's Faker pool is seeded with ``seed
+ i``. A different ``row_group_size`` moves the chunk boundaries and so, legitimately,
changes the rows drawn.

Formats. ``.parquet``/``.pq`` is written as Parquet (zstd), ``.csv`` as CSV with a header
row. Parquet has no seconds unit, so ``test_datetime`` reads back as
``timestamp[ms, tz=UTC]`` holding whole seconds. In CSV, and in dirty mode everywhere,
``test_datetime`` is RFC 3339 text in UTC (``2020-03-01T05:06:07Z``) and ``date_of_birth``
is ``2020-03-01``; Polars (``read_csv(try_parse_dates=True)``) and DuckDB (``read_csv``)
both parse the clean form back as UTC timestamps and dates. CSV cannot carry the
difference between null and ``""`` portably (DuckDB reads ``""`` as NULL, pyarrow reads an
empty field as ``""``), so a dirty CSV spells empty countries with whitespace only, and
should be read with Polars or DuckDB, which both read an unquoted empty field as null.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from faker.config import AVAILABLE_LOCALES

from dispatchkit.apps.covid.world import (
    COLUMNS,
    TEXT_SCHEMA,
    TYPED_SCHEMA,
    IntArray,
    World,
    seconds,
)

DEFAULT_START = datetime(2020, 3, 1, tzinfo=UTC)
DEFAULT_END = datetime(2021, 1, 1, tzinfo=UTC)

#: Country name -> the Faker locale of its names and cities.
DEFAULT_COUNTRIES: dict[str, str] = {
    "United States": "en_US",
    "India": "en_IN",
    "Brazil": "pt_BR",
    "Russia": "ru_RU",
    "Japan": "ja_JP",
    "Mexico": "es_MX",
    "Germany": "de_DE",
    "Turkey": "tr_TR",
    "United Kingdom": "en_GB",
    "France": "fr_FR",
    "Italy": "it_IT",
    "South Korea": "ko_KR",
    "Spain": "es_ES",
    "Poland": "pl_PL",
    "Canada": "en_CA",
    "Australia": "en_AU",
    "Netherlands": "nl_NL",
    "Sweden": "sv_SE",
    "Portugal": "pt_PT",
    "Israel": "he_IL",
}

#: The defects dirty mode injects, one per bad row: the keys of ``GenerateReport.bad_rows``.
BAD_ROW_KINDS = (
    "country_missing",  # null
    "country_empty",  # "" or whitespace
    "test_datetime_missing",  # null
    "test_datetime_unparseable",  # text that is no ISO 8601 instant
    "test_datetime_out_of_range",  # a valid instant before start or at/after end
    "result_invalid",  # not positive/negative/pos/neg after strip().lower()
)

#: ``hot_key_rows`` extra rows all fall in this hour, in the first country.
HOT_KEY_START = datetime(2020, 4, 1, 12, tzinfo=UTC)
HOT_KEY_END = HOT_KEY_START + timedelta(hours=1)

_MAX_ROW_GROUP = 1 << 20  # pyarrow's largest Parquet row group

# Dirty mode's empty countries; CSV has no portable "" (see the module docstring).
_EMPTY_COUNTRIES = {"parquet": ("", " ", "   ", "\t"), "csv": (" ", "   ", "\t")}

__all__ = [
    "BAD_ROW_KINDS",
    "COLUMNS",
    "DEFAULT_COUNTRIES",
    "DEFAULT_END",
    "DEFAULT_START",
    "HOT_KEY_END",
    "HOT_KEY_START",
    "GenerateReport",
    "GenerateSpec",
    "generate",
]


@dataclass(frozen=True)
class GenerateSpec:
    """What to generate; the same spec always gives the same file.

    ``rows`` ordinary rows fall in ``[start, end)``; ``hot_key_rows`` more go to the first
    country in the hour from :data:`HOT_KEY_START`, spread evenly over the chunks. Rows
    are generated and written ``row_group_size`` at a time (at most 1,048,576).
    ``dirty_fraction`` > 0 writes every column as text and corrupts that share of all rows
    (rounded down), with the kinds of :data:`BAD_ROW_KINDS` in turn.
    """

    rows: int
    seed: int = 42
    countries: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_COUNTRIES))
    start: datetime = DEFAULT_START
    end: datetime = DEFAULT_END
    row_group_size: int = 250_000
    dirty_fraction: float = 0.0
    hot_key_rows: int = 0

    def __post_init__(self) -> None:
        if self.rows < 0 or self.hot_key_rows < 0 or self.seed < 0:
            raise ValueError("rows, hot_key_rows and seed must not be negative.")
        if not 1 <= self.row_group_size <= _MAX_ROW_GROUP:
            raise ValueError(f"row_group_size must be between 1 and {_MAX_ROW_GROUP:,}.")
        if not 0.0 <= self.dirty_fraction <= 1.0:
            raise ValueError(f"dirty_fraction must be in [0, 1], not {self.dirty_fraction}.")
        if not self.countries:
            raise ValueError("countries must name at least one country.")
        unknown = sorted(set(self.countries.values()) - set(AVAILABLE_LOCALES))
        if unknown:
            raise ValueError(f"Faker has no locale {', '.join(unknown)}.")
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware datetimes.")
        if seconds(self.end) <= seconds(self.start):
            raise ValueError(f"end ({self.end}) must come after start ({self.start}).")
        if self.hot_key_rows and not self.start <= HOT_KEY_START < HOT_KEY_END <= self.end:
            raise ValueError(f"hot_key_rows need the hour from {HOT_KEY_START} in [start, end).")


@dataclass(frozen=True)
class GenerateReport:
    """What :func:`generate` wrote; ``rows`` includes the hot-key rows and the bad rows."""

    path: Path
    rows: int
    bad_rows: dict[str, int]  # kind -> rows with that defect; empty when clean


def generate(
    spec: GenerateSpec, path: Path, on_rows: Callable[[int], None] | None = None
) -> GenerateReport:
    """Write the dataset ``spec`` describes to ``path`` (``.parquet``, ``.pq`` or ``.csv``).

    The file appears whole or not at all: it is written beside ``path`` under a temporary
    name, synced, then renamed. Parent directories are created. ``on_rows`` gets each
    chunk's row count once the chunk is written.
    """
    path = Path(path)
    fmt = _format_of(path)
    dirty = spec.dirty_fraction > 0.0
    schema = TEXT_SCHEMA if dirty or fmt == "csv" else TYPED_SCHEMA
    bad_rows = dict.fromkeys(BAD_ROW_KINDS, 0) if dirty else {}
    world = World.build(spec.seed, spec.countries, spec.start, spec.end)
    tables = _tables(spec, world, fmt, bad_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write(tmp, fmt, schema, tables, on_rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return GenerateReport(path=path, rows=spec.rows + spec.hot_key_rows, bad_rows=bad_rows)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise ValueError(f"Cannot tell the format of {path}: name it .parquet, .pq or .csv.")


def _write(
    tmp: Path,
    fmt: str,
    schema: pa.Schema,
    tables: Iterator[pa.Table],
    on_rows: Callable[[int], None] | None,
) -> None:
    writer: Any
    if fmt == "parquet":
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
    else:
        writer = pacsv.CSVWriter(tmp, schema)
    try:
        for table in tables:
            if fmt == "parquet":
                writer.write_table(table, row_group_size=table.num_rows)
            else:
                writer.write_table(table)
            if on_rows is not None:
                on_rows(table.num_rows)
    finally:
        writer.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def _tables(
    spec: GenerateSpec, world: World, fmt: str, bad_rows: dict[str, int]
) -> Iterator[pa.Table]:
    """The file's chunks in order; in dirty mode, adds each chunk's defects to ``bad_rows``.

    Hot-key rows and bad rows are shared out so that the first ``m`` rows hold
    ``floor(m * share)`` of them, whatever the chunking.
    """
    total = spec.rows + spec.hot_key_rows
    done = hot_done = bad_done = 0
    for k in range(math.ceil(total / spec.row_group_size)):
        n = min(spec.row_group_size, total - done)
        n_hot = spec.hot_key_rows * (done + n) // total - hot_done
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(spec.seed, spawn_key=(k,)))
        )
        rows = world.draw(rng, n - n_hot, n_hot, seconds(HOT_KEY_START))
        if spec.dirty_fraction > 0.0:
            n_bad = math.floor(spec.dirty_fraction * (done + n)) - bad_done
            kinds = _pick_defects(rng, n, n_bad, first_kind=bad_done)
            for code, name in enumerate(BAD_ROW_KINDS):
                bad_rows[name] += int(np.count_nonzero(kinds == code))
            yield world.dirty_table(rng, rows, kinds, _EMPTY_COUNTRIES[fmt])
            bad_done += n_bad
        else:
            yield world.clean_table(rows, text=fmt == "csv")
        done += n
        hot_done += n_hot


def _pick_defects(rng: np.random.Generator, n: int, n_bad: int, first_kind: int) -> IntArray:
    """A defect for ``n_bad`` of ``n`` random rows, as an index into ``BAD_ROW_KINDS``.

    Kinds are dealt in turn from ``first_kind``, so a file's counts differ by at most one.
    Good rows get -1.
    """
    kinds = np.full(n, -1, dtype=np.int64)
    kinds[rng.choice(n, size=n_bad, replace=False)] = (first_kind + np.arange(n_bad)) % 6
    return kinds
