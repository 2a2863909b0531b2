"""The synthetic world the generator draws its rows from.

A :class:`World` holds what every chunk of a generated file shares: each country's pools
of Faker names and cities, its test volume, the hourly and weekly rhythm of testing, and
its positive rate in every hour (a baseline plus yearly epidemic waves). ``draw`` makes a
chunk's rows as numbers; ``clean_table`` and ``dirty_table`` turn them into Arrow tables,
building ISO 8601 text by arithmetic on a byte matrix. :mod:`dispatchkit.apps.covid.generate` owns
the spec, the chunking and the files.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from faker import Faker

COLUMNS = ("name", "city", "country", "date_of_birth", "test_datetime", "result")

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
_UNPARSEABLE = ("not-a-date", "2020-13-45", "2020-02-30T10:00:00Z", "2020-06-01T25:61:00Z", "N/A")


TYPED_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("city", pa.string()),
        ("country", pa.string()),
        ("date_of_birth", pa.date32()),
        ("test_datetime", pa.timestamp("s", tz="UTC")),
        ("result", pa.string()),
    ]
)
TEXT_SCHEMA = pa.schema([(column, pa.string()) for column in COLUMNS])

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def seconds(moment: datetime) -> int:
    """Whole seconds since the epoch, rounded up so ``start`` itself stays in range."""
    return math.ceil(moment.timestamp())


@functools.lru_cache(maxsize=64)
def faker_pool(locale: str, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
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
class Pool:
    """Per-country string pools end to end: country ``c`` owns ``count[c]`` from ``start[c]``."""

    values: pa.Array
    start: IntArray
    count: IntArray

    @classmethod
    def of(cls, pools: list[tuple[str, ...]]) -> Pool:
        count = np.array([len(pool) for pool in pools], dtype=np.int64)
        values = pa.array([value for pool in pools for value in pool], pa.string())
        return cls(values, np.cumsum(count) - count, count)

    def draw(self, rng: np.random.Generator, country: IntArray) -> IntArray:
        offset = (rng.random(len(country)) * self.count[country]).astype(np.int64)
        return self.start[country] + offset


@dataclass(frozen=True)
class Rows:
    """One chunk's draws as numbers; strings are made only when the table is built."""

    country: IntArray
    name: IntArray  # index into World.names.values
    city: IntArray
    birth_day: IntArray  # days since 1970-01-01
    second: IntArray  # seconds since the epoch, UTC
    positive: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class World:
    """What every chunk shares: pools, test volumes, the hourly rhythm, positive rates.

    Time is cut into slots: the hours of ``[start, end)``, the first and last clipped.
    """

    start: int  # seconds since the epoch
    end: int
    countries: pa.Array
    names: Pool
    cities: Pool
    country_cdf: FloatArray
    slot_start: IntArray
    slot_length: IntArray
    slot_cdf: FloatArray  # by slot length times the daily and weekly rhythm
    rate: FloatArray  # positive rate by (country, slot)

    @classmethod
    def build(
        cls, seed: int, locales: Mapping[str, str], start_at: datetime, end_at: datetime
    ) -> World:
        """The world of ``locales`` (country -> Faker locale) in ``[start_at, end_at)``."""
        params = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        countries = list(locales)
        pools = [faker_pool(loc, seed + i) for i, loc in enumerate(locales.values())]
        fallback = params.lognormal(math.log(50.0), 1.0, size=len(countries))
        volume = [_TEST_VOLUME.get(c, v) for c, v in zip(countries, fallback, strict=True)]

        start, end = seconds(start_at), seconds(end_at)
        bounds = np.arange(start // _HOUR * _HOUR, end + _HOUR, _HOUR, dtype=np.int64)
        bounds = np.unique(np.clip(bounds, start, end))
        slot_start, slot_length = bounds[:-1], np.diff(bounds)
        hour = slot_start // _HOUR % 24
        weekday = (slot_start // _DAY + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
        rhythm = 0.25 + np.exp(-0.5 * ((hour - 13) / 4.0) ** 2)  # busiest at 13:00 UTC
        rhythm *= np.select([weekday == 5, weekday == 6], [0.8, 0.6], 1.0)  # quiet weekends

        midpoint = slot_start + slot_length / 2
        years = range(start_at.year - 1, end_at.year + 2)
        rate = np.stack([positive_rate(params, midpoint, years) for _ in countries])
        return cls(
            start=start,
            end=end,
            countries=pa.array(countries, pa.string()),
            names=Pool.of([names for names, _ in pools]),
            cities=Pool.of([cities for _, cities in pools]),
            country_cdf=cdf(np.array(volume, dtype=np.float64)),
            slot_start=slot_start,
            slot_length=slot_length,
            slot_cdf=cdf(slot_length * rhythm),
            rate=rate,
        )

    def draw(self, rng: np.random.Generator, n: int, n_hot: int, hot_start: int) -> Rows:
        """``n`` ordinary rows, then ``n_hot`` rows in the first country's hour from
        ``hot_start`` (seconds since the epoch)."""
        country = np.searchsorted(self.country_cdf, rng.random(n), side="right")
        slot = np.searchsorted(self.slot_cdf, rng.random(n), side="right")
        second = self.slot_start[slot] + (rng.random(n) * self.slot_length[slot]).astype(np.int64)
        if n_hot:
            hot = hot_start + rng.integers(0, _HOUR, n_hot, dtype=np.int64)
            country = np.concatenate([country, np.zeros(n_hot, dtype=country.dtype)])
            second = np.concatenate([second, hot])
            slot = np.searchsorted(self.slot_start, second, side="right") - 1
        country = country.astype(np.int64)
        return Rows(
            country=country,
            name=self.names.draw(rng, country),
            city=self.cities.draw(rng, country),
            birth_day=rng.integers(_DOB_FIRST, _DOB_LAST + 1, n + n_hot, dtype=np.int64),
            second=second,
            positive=rng.random(n + n_hot) < self.rate[country, slot],
        )

    def clean_table(self, rows: Rows, *, text: bool) -> pa.Table:
        """Typed columns, or (``text``, for CSV) the same values with ISO 8601 dates."""
        birth: pa.Array
        tested: pa.Array
        if text:
            birth, tested = iso_dates(rows.birth_day), _isoseconds(rows.second)
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
        return pa.Table.from_arrays(columns, schema=TEXT_SCHEMA if text else TYPED_SCHEMA)

    def dirty_table(
        self, rng: np.random.Generator, rows: Rows, kinds: IntArray, empties: tuple[str, ...]
    ) -> pa.Table:
        """All-text columns carrying the defects ``kinds`` asks for: an index into
        :data:`dispatchkit.apps.covid.generate.BAD_ROW_KINDS` per row, -1 for a good row.

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
        tested_text = pa.concat_arrays([_isoseconds(second), pa.array(_UNPARSEABLE)])
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
            iso_dates(rows.birth_day),
            tested_text.take(pa.array(tested, mask=kinds == 2)),
            pa.array(_NEGATIVES + _POSITIVES + _INVALID_RESULTS).take(result),
        ]
        return pa.Table.from_arrays(columns, schema=TEXT_SCHEMA)


def cdf(weights: FloatArray) -> FloatArray:
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    cdf[-1] = 1.0  # a draw in [0, 1) then never searches past the last bin
    return cdf


def positive_rate(params: np.random.Generator, second: FloatArray, years: range) -> FloatArray:
    """One country's positive rate at ``second``: a baseline plus yearly Gaussian waves.

    A wave is (day of year of its peak, width in days, rate at the peak).
    """
    baseline = params.uniform(0.02, 0.08)
    spring = (params.uniform(75, 115), params.uniform(10, 22), params.uniform(0.15, 0.35))
    autumn = (params.uniform(285, 330), params.uniform(15, 30), params.uniform(0.15, 0.35))
    summer = (params.uniform(190, 230), params.uniform(10, 20), params.uniform(0.08, 0.15))
    waves = [spring, autumn, summer] if params.random() < 0.5 else [spring, autumn]
    rate = np.full(second.shape, baseline)
    for year in years:
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


def iso_dates(days: IntArray) -> pa.Array:
    year, month, day = _civil(days)
    return _fixed_width("0000-00-00", [(0, 4, year), (5, 2, month), (8, 2, day)])


def _isoseconds(seconds: IntArray) -> pa.Array:
    days, rest = np.divmod(seconds, _DAY)
    year, month, day = _civil(days)
    fields = [(0, 4, year), (5, 2, month), (8, 2, day)]
    fields += [(11, 2, rest // _HOUR), (14, 2, rest // 60 % 60), (17, 2, rest % 60)]
    return _fixed_width("0000-00-00T00:00:00Z", fields)
