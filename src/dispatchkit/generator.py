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

import functools
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from faker import Faker
from faker.config import AVAILABLE_LOCALES

DEFAULT_START = datetime(2020, 3, 1, tzinfo=UTC)
DEFAULT_END = datetime(2021, 1, 1, tzinfo=UTC)
COLUMNS = ("name", "city", "country", "date_of_birth", "test_datetime", "result")

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

# Relative test volumes: about population in millions, India damped (it tested less per
# head). Countries not listed get a seeded log-normal volume.
_TEST_VOLUME = {
    "United States": 331, "India": 300, "Brazil": 212, "Russia": 144, "Mexico": 128,
    "Japan": 126, "Turkey": 84, "Germany": 83, "United Kingdom": 67, "France": 67,
    "Italy": 60, "South Korea": 52, "Spain": 47, "Poland": 38, "Canada": 38,
    "Australia": 25, "Netherlands": 17, "Sweden": 10, "Portugal": 10, "Israel": 9,
}  # fmt: skip
_NAMES_PER_COUNTRY = 2_000
_CITIES_PER_COUNTRY = 300
_MAX_ROW_GROUP = 1 << 20  # pyarrow's largest Parquet row group
_EPOCH = date(1970, 1, 1)
_DOB_FIRST = (date(1930, 1, 1) - _EPOCH).days
_DOB_LAST = (date(2015, 12, 31) - _EPOCH).days
_HOUR = 3_600
_DAY = 86_400

# Dirty mode. Valid results in several spellings (normalize with strip().lower(); pos and
# neg are accepted abbreviations) drawn with _SPELLING_WEIGHTS, then the invalid ones.
_NEGATIVES = ("negative", "Negative", " NEGATIVE ", "neg")
_POSITIVES = ("positive", "Positive", " POSITIVE ", "pos")
_SPELLING_WEIGHTS = (0.85, 0.05, 0.05, 0.05)
_INVALID_RESULTS = ("maybe", "", "unknown", "inconclusive", "N/A", "posneg")
_EMPTY_COUNTRIES = {"parquet": ("", " ", "   ", "\t"), "csv": (" ", "   ", "\t")}
_UNPARSEABLE = ("not-a-date", "2020-13-45", "2020-02-30T10:00:00Z", "2020-06-01T25:61:00Z", "N/A")

_TYPED_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("city", pa.string()),
        ("country", pa.string()),
        ("date_of_birth", pa.date32()),
        ("test_datetime", pa.timestamp("s", tz="UTC")),
        ("result", pa.string()),
    ]
)
_TEXT_SCHEMA = pa.schema([(column, pa.string()) for column in COLUMNS])

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


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
        if _seconds(self.end) <= _seconds(self.start):
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
    schema = _TEXT_SCHEMA if dirty or fmt == "csv" else _TYPED_SCHEMA
    bad_rows = dict.fromkeys(BAD_ROW_KINDS, 0) if dirty else {}
    tables = _tables(spec, _World.build(spec), fmt, bad_rows)
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
    spec: GenerateSpec, world: _World, fmt: str, bad_rows: dict[str, int]
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
        rows = world.draw(rng, n - n_hot, n_hot)
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


def _seconds(moment: datetime) -> int:
    """Whole seconds since the epoch, rounded up so ``start`` itself stays in range."""
    return math.ceil(moment.timestamp())


@functools.lru_cache(maxsize=64)
def _faker_pool(locale: str, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Seeded full names and cities in ``locale`` (cached: tests generate many times)."""
    fake = Faker(locale)
    for provider in fake.get_providers():
        # it_IT builds its city list from a set, so its order, and with it every seeded
        # draw, would follow PYTHONHASHSEED. Sorted, it is the same in every process.
        cities = getattr(provider, "cities", None)
        if isinstance(cities, list):
            provider.cities = sorted(cities)
    fake.seed_instance(seed)
    names = tuple(fake.name() for _ in range(_NAMES_PER_COUNTRY))
    return names, tuple(fake.city() for _ in range(_CITIES_PER_COUNTRY))


@dataclass(frozen=True)
class _Pool:
    """Per-country string pools end to end: country ``c`` owns ``count[c]`` from ``start[c]``."""

    values: pa.Array
    start: IntArray
    count: IntArray

    @classmethod
    def of(cls, pools: list[tuple[str, ...]]) -> _Pool:
        count = np.array([len(pool) for pool in pools], dtype=np.int64)
        values = pa.array([value for pool in pools for value in pool], pa.string())
        return cls(values, np.cumsum(count) - count, count)

    def draw(self, rng: np.random.Generator, country: IntArray) -> IntArray:
        offset = (rng.random(len(country)) * self.count[country]).astype(np.int64)
        return self.start[country] + offset


@dataclass(frozen=True)
class _Rows:
    """One chunk's draws as numbers; strings are made only when the table is built."""

    country: IntArray
    name: IntArray  # index into _World.names.values
    city: IntArray
    birth_day: IntArray  # days since 1970-01-01
    second: IntArray  # seconds since the epoch, UTC
    positive: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class _World:
    """What every chunk shares: pools, test volumes, the hourly rhythm, positive rates.

    Time is cut into slots: the hours of ``[start, end)``, the first and last clipped.
    """

    start: int  # seconds since the epoch
    end: int
    countries: pa.Array
    names: _Pool
    cities: _Pool
    country_cdf: FloatArray
    slot_start: IntArray
    slot_length: IntArray
    slot_cdf: FloatArray  # by slot length times the daily and weekly rhythm
    rate: FloatArray  # positive rate by (country, slot)

    @classmethod
    def build(cls, spec: GenerateSpec) -> _World:
        params = np.random.Generator(np.random.PCG64(np.random.SeedSequence(spec.seed)))
        countries = list(spec.countries)
        pools = [_faker_pool(loc, spec.seed + i) for i, loc in enumerate(spec.countries.values())]
        fallback = params.lognormal(math.log(50.0), 1.0, size=len(countries))
        volume = [_TEST_VOLUME.get(c, v) for c, v in zip(countries, fallback, strict=True)]

        start, end = _seconds(spec.start), _seconds(spec.end)
        bounds = np.arange(start // _HOUR * _HOUR, end + _HOUR, _HOUR, dtype=np.int64)
        bounds = np.unique(np.clip(bounds, start, end))
        slot_start, slot_length = bounds[:-1], np.diff(bounds)
        hour = slot_start // _HOUR % 24
        weekday = (slot_start // _DAY + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
        rhythm = 0.25 + np.exp(-0.5 * ((hour - 13) / 4.0) ** 2)  # busiest at 13:00 UTC
        rhythm *= np.select([weekday == 5, weekday == 6], [0.8, 0.6], 1.0)  # quiet weekends

        midpoint = slot_start + slot_length / 2
        rate = np.stack([_positive_rate(params, midpoint, spec) for _ in countries])
        return cls(
            start=start,
            end=end,
            countries=pa.array(countries, pa.string()),
            names=_Pool.of([names for names, _ in pools]),
            cities=_Pool.of([cities for _, cities in pools]),
            country_cdf=_cdf(np.array(volume, dtype=np.float64)),
            slot_start=slot_start,
            slot_length=slot_length,
            slot_cdf=_cdf(slot_length * rhythm),
            rate=rate,
        )

    def draw(self, rng: np.random.Generator, n: int, n_hot: int) -> _Rows:
        """``n`` ordinary rows, then ``n_hot`` rows in the hot (first country, hour) key."""
        country = np.searchsorted(self.country_cdf, rng.random(n), side="right")
        slot = np.searchsorted(self.slot_cdf, rng.random(n), side="right")
        second = self.slot_start[slot] + (rng.random(n) * self.slot_length[slot]).astype(np.int64)
        if n_hot:
            hot = _seconds(HOT_KEY_START) + rng.integers(0, _HOUR, n_hot, dtype=np.int64)
            country = np.concatenate([country, np.zeros(n_hot, dtype=country.dtype)])
            second = np.concatenate([second, hot])
            slot = np.searchsorted(self.slot_start, second, side="right") - 1
        country = country.astype(np.int64)
        return _Rows(
            country=country,
            name=self.names.draw(rng, country),
            city=self.cities.draw(rng, country),
            birth_day=rng.integers(_DOB_FIRST, _DOB_LAST + 1, n + n_hot, dtype=np.int64),
            second=second,
            positive=rng.random(n + n_hot) < self.rate[country, slot],
        )

    def clean_table(self, rows: _Rows, *, text: bool) -> pa.Table:
        """Typed columns, or (``text``, for CSV) the same values with ISO 8601 dates."""
        birth: pa.Array
        tested: pa.Array
        if text:
            birth, tested = _iso_dates(rows.birth_day), _iso_seconds(rows.second)
        else:
            birth = pa.array(rows.birth_day.astype(np.int32), pa.date32())
            tested = pa.array(rows.second, pa.timestamp("s", tz="UTC"))
        columns = [
            self.names.values.take(rows.name),
            self.cities.values.take(rows.city),
            self.countries.take(rows.country),
            birth,
            tested,
            pa.array(["negative", "positive"]).take(rows.positive.astype(np.int8)),
        ]
        return pa.Table.from_arrays(columns, schema=_TEXT_SCHEMA if text else _TYPED_SCHEMA)

    def dirty_table(
        self, rng: np.random.Generator, rows: _Rows, kinds: IntArray, empties: tuple[str, ...]
    ) -> pa.Table:
        """All-text columns carrying the defects ``kinds`` asks for.

        Each corruptible column is a ``take`` from its good values followed by bad ones; a
        masked (null) index gives a null.
        """
        n = len(kinds)
        country_text = pa.concat_arrays([self.countries, pa.array(empties, pa.string())])
        empty = len(self.countries) + rng.integers(0, len(empties), n)
        country = np.where(kinds == 1, empty, rows.country)

        # Out-of-range instants: up to 400 days before start or from end on (end included).
        shift = rng.integers(0, 400 * _DAY, n, dtype=np.int64)
        outside = np.where(rng.random(n) < 0.5, self.start - 1 - shift, self.end + shift)
        second = np.where(kinds == 4, outside, rows.second)
        tested_text = pa.concat_arrays([_iso_seconds(second), pa.array(_UNPARSEABLE)])
        garbage = n + rng.integers(0, len(_UNPARSEABLE), n)
        tested = np.where(kinds == 3, garbage, np.arange(n))

        spelling = rng.choice(len(_SPELLING_WEIGHTS), size=n, p=_SPELLING_WEIGHTS)
        result = np.where(rows.positive, len(_NEGATIVES), 0) + spelling
        invalid = len(_NEGATIVES) + len(_POSITIVES) + rng.integers(0, len(_INVALID_RESULTS), n)
        result = np.where(kinds == 5, invalid, result)

        columns = [
            self.names.values.take(rows.name),
            self.cities.values.take(rows.city),
            country_text.take(pa.array(country, mask=kinds == 0)),
            _iso_dates(rows.birth_day),
            tested_text.take(pa.array(tested, mask=kinds == 2)),
            pa.array(_NEGATIVES + _POSITIVES + _INVALID_RESULTS).take(result),
        ]
        return pa.Table.from_arrays(columns, schema=_TEXT_SCHEMA)


def _pick_defects(rng: np.random.Generator, n: int, n_bad: int, first_kind: int) -> IntArray:
    """A defect for ``n_bad`` of ``n`` random rows, as an index into ``BAD_ROW_KINDS``.

    Kinds are dealt in turn from ``first_kind``, so a file's counts differ by at most one.
    Good rows get -1.
    """
    kinds = np.full(n, -1, dtype=np.int64)
    kinds[rng.choice(n, size=n_bad, replace=False)] = (first_kind + np.arange(n_bad)) % 6
    return kinds


def _cdf(weights: FloatArray) -> FloatArray:
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    cdf[-1] = 1.0  # a draw in [0, 1) then never searches past the last bin
    return cdf


def _positive_rate(
    params: np.random.Generator, second: FloatArray, spec: GenerateSpec
) -> FloatArray:
    """One country's positive rate at ``second``: a baseline plus yearly Gaussian waves.

    A wave is (day of year of its peak, width in days, rate at the peak).
    """
    baseline = params.uniform(0.02, 0.08)
    spring = (params.uniform(75, 115), params.uniform(10, 22), params.uniform(0.15, 0.35))
    autumn = (params.uniform(285, 330), params.uniform(15, 30), params.uniform(0.15, 0.35))
    summer = (params.uniform(190, 230), params.uniform(10, 20), params.uniform(0.08, 0.15))
    waves = [spring, autumn, summer] if params.random() < 0.5 else [spring, autumn]
    rate = np.full(second.shape, baseline)
    for year in range(spec.start.year - 1, spec.end.year + 2):
        new_year = datetime(year, 1, 1, tzinfo=UTC).timestamp()
        for peak_day, width_days, peak in waves:
            z = (second - new_year - peak_day * _DAY) / (width_days * _DAY)
            rate += (peak - baseline) * np.exp(-0.5 * z * z)
    clipped: FloatArray = np.clip(rate, 0.0, 0.6)
    return clipped


def _civil(days: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """Year, month and day of days since 1970-01-01 (Howard Hinnant's civil_from_days)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1_460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    return yoe + era * 400 + (month <= 2), month, day


def _fixed_width(template: str, fields: list[tuple[int, int, IntArray]]) -> pa.Array:
    """Strings like ``template`` with ``(offset, digits, values)`` written in, zero-padded.

    Arithmetic on an (n, width) byte matrix, then one Arrow string array over its bytes:
    several times faster than ``strftime`` (years must have four digits).
    """
    n, width = len(fields[0][2]), len(template)
    out = np.empty((n, width), dtype=np.uint8)
    out[:] = np.frombuffer(template.encode("ascii"), dtype=np.uint8)
    for offset, digits, values in fields:
        for i in range(digits):
            out[:, offset + i] = values // 10 ** (digits - 1 - i) % 10 + ord("0")
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(out)])


def _iso_dates(days: IntArray) -> pa.Array:
    year, month, day = _civil(days)
    return _fixed_width("0000-00-00", [(0, 4, year), (5, 2, month), (8, 2, day)])


def _iso_seconds(seconds: IntArray) -> pa.Array:
    days, rest = np.divmod(seconds, _DAY)
    year, month, day = _civil(days)
    fields = [(0, 4, year), (5, 2, month), (8, 2, day)]
    fields += [(11, 2, rest // _HOUR), (14, 2, rest // 60 % 60), (17, 2, rest % 60)]
    return _fixed_width("0000-00-00T00:00:00Z", fields)
