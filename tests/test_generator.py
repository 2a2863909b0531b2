"""Tests for the fake COVID-19 test dataset generator."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faker.providers.address.it_IT import Provider as ItalianAddresses

from dispatchkit.apps.covid.generate import (
    BAD_ROW_KINDS,
    COLUMNS,
    DEFAULT_COUNTRIES,
    DEFAULT_END,
    DEFAULT_START,
    HOT_KEY_END,
    HOT_KEY_START,
    GenerateSpec,
    generate,
)

ROWS = 20_000
ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
SRC = Path(__file__).resolve().parents[1] / "src"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clean_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "tests.parquet"
    report = generate(GenerateSpec(rows=ROWS), path)
    assert report.path == path and report.rows == ROWS and report.bad_rows == {}
    return path


@pytest.fixture(scope="module")
def clean(clean_parquet: Path) -> pl.DataFrame:
    return pl.read_parquet(clean_parquet)


def test_parquet_schema_via_pyarrow(clean_parquet: Path) -> None:
    schema = pq.read_schema(clean_parquet)
    assert tuple(schema.names) == COLUMNS
    for column in ("name", "city", "country", "result"):
        assert schema.field(column).type == pa.string()
    assert schema.field("date_of_birth").type == pa.date32()
    tested = schema.field("test_datetime").type
    assert pa.types.is_timestamp(tested) and tested.tz == "UTC"
    assert tested.unit in ("s", "ms")  # Parquet has no seconds unit: whole seconds as ms
    assert pq.ParquetFile(clean_parquet).metadata.num_rows == ROWS


def test_parquet_schema_via_polars(clean: pl.DataFrame) -> None:
    assert tuple(clean.columns) == COLUMNS
    assert clean.schema["name"] == pl.String
    assert clean.schema["city"] == pl.String
    assert clean.schema["country"] == pl.String
    assert clean.schema["result"] == pl.String
    assert clean.schema["date_of_birth"] == pl.Date
    tested = clean.schema["test_datetime"]
    assert isinstance(tested, pl.Datetime) and tested.time_zone == "UTC"
    assert clean.null_count().sum_horizontal().item() == 0
    assert set(clean["result"].unique()) == {"positive", "negative"}
    assert set(clean["country"].unique()) == set(DEFAULT_COUNTRIES)


def test_times_and_birth_dates_in_range(clean: pl.DataFrame) -> None:
    tested = clean["test_datetime"]
    assert tested.min() >= DEFAULT_START  # type: ignore[operator]
    assert tested.max() < DEFAULT_END  # type: ignore[operator]
    assert (tested.dt.truncate("1s") == tested).all(), "times are whole seconds"
    born = clean["date_of_birth"]
    assert born.min() >= date(1930, 1, 1)  # type: ignore[operator]
    assert born.max() <= date(2015, 12, 31)  # type: ignore[operator]
    # Spread over the whole range, not bunched: every month has tests.
    assert tested.dt.month().n_unique() == 10


def test_times_stay_inside_an_odd_range(tmp_path: Path) -> None:
    start = datetime(2020, 5, 3, 10, 30, 15, 500_000, tzinfo=UTC)
    end = datetime(2020, 5, 3, 12, 10, 0, 500_000, tzinfo=UTC)
    path = tmp_path / "narrow.parquet"
    generate(GenerateSpec(rows=5_000, start=start, end=end, row_group_size=1_000), path)
    tested = pl.read_parquet(path)["test_datetime"]
    assert tested.min() >= datetime(2020, 5, 3, 10, 30, 16, tzinfo=UTC)  # type: ignore[operator]
    assert tested.max() <= datetime(2020, 5, 3, 12, 10, 0, tzinfo=UTC)  # type: ignore[operator]
    assert tested.dt.hour().n_unique() == 3  # the partial hours at both ends are used


def test_countries_have_unequal_volumes(clean: pl.DataFrame) -> None:
    counts = dict(clean["country"].value_counts().iter_rows())
    assert counts["United States"] > 10 * counts["Israel"]


def test_same_spec_gives_identical_bytes(tmp_path: Path) -> None:
    spec = GenerateSpec(rows=ROWS, row_group_size=7_000)
    first = generate(spec, tmp_path / "a.parquet").path
    second = generate(spec, tmp_path / "b.parquet").path
    assert sha256(first) == sha256(second)
    csv_first = generate(spec, tmp_path / "a.csv").path
    csv_second = generate(spec, tmp_path / "b.csv").path
    assert sha256(csv_first) == sha256(csv_second)


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    a = generate(GenerateSpec(rows=ROWS, seed=1), tmp_path / "a.parquet").path
    b = generate(GenerateSpec(rows=ROWS, seed=2), tmp_path / "b.parquet").path
    assert sha256(a) != sha256(b)
    left, right = pl.read_parquet(a), pl.read_parquet(b)
    assert (left["test_datetime"] != right["test_datetime"]).mean() > 0.99  # type: ignore[operator]


def test_identical_bytes_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    # Italy's Faker cities come from a set, whose order follows PYTHONHASHSEED.
    script = (
        "import sys; from pathlib import Path; "
        "from dispatchkit.apps.covid.generate import GenerateSpec, generate; "
        "generate(GenerateSpec(rows=3000, countries={'Italy': 'it_IT', 'Japan': 'ja_JP'}), "
        "Path(sys.argv[1]))"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}.parquet"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(SRC)}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env)
        digests.add(sha256(out))
    assert len(digests) == 1


def test_csv_round_trip_matches_parquet(tmp_path: Path, clean: pl.DataFrame) -> None:
    path = generate(GenerateSpec(rows=ROWS), tmp_path / "tests.csv").path
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header == ",".join(f'"{column}"' for column in COLUMNS)

    from_csv = pl.read_csv(path, try_parse_dates=True)
    assert from_csv.height == ROWS
    assert tuple(from_csv.columns) == COLUMNS
    tested = from_csv.schema["test_datetime"]
    assert isinstance(tested, pl.Datetime) and tested.time_zone == "UTC"
    assert from_csv.schema["date_of_birth"] == pl.Date
    # Same spec, same rows: the CSV holds exactly the Parquet file's values.
    unit = clean.schema["test_datetime"].time_unit  # type: ignore[attr-defined]
    aligned = from_csv.with_columns(pl.col("test_datetime").dt.cast_time_unit(unit))
    assert aligned.equals(clean)

    duck = duckdb.sql(f"SELECT * FROM read_csv('{path}')")
    assert duck is not None
    types = dict(zip(duck.columns, (str(t) for t in duck.types), strict=True))
    assert types["test_datetime"] == "TIMESTAMP WITH TIME ZONE"
    assert types["date_of_birth"] == "DATE"
    assert duck.shape[0] == ROWS


def test_locales_shape_names_and_cities(clean: pl.DataFrame) -> None:
    italy = clean.filter(pl.col("country") == "Italy")
    japan = clean.filter(pl.col("country") == "Japan")
    assert italy.height > 100 and japan.height > 100
    assert set(italy["city"]) <= set(ItalianAddresses.cities)
    assert not set(italy["city"]) & set(japan["city"])
    assert not set(italy["name"]) & set(japan["name"])
    assert all(not name.isascii() for name in japan["name"])
    assert all(not city.isascii() for city in japan["city"])
    # Pools are big enough to look varied.
    assert italy["name"].n_unique() > 0.8 * italy.height


def monthly_positive_rate(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.group_by("country", pl.col("test_datetime").dt.month().alias("month")).agg(
        rate=(pl.col("result") == "positive").mean(), tests=pl.len()
    )


def test_positive_rate_comes_in_waves(clean: pl.DataFrame) -> None:
    monthly = monthly_positive_rate(clean)
    big = ["United States", "India", "Brazil", "Russia", "Japan"]
    for country in big:
        rates = monthly.filter(pl.col("country") == country).sort("month")
        by_month = dict(zip(rates["month"], rates["rate"], strict=True))
        assert max(by_month.values()) / min(by_month.values()) > 1.5, country
        # Spring and autumn waves stand above the summer lull.
        assert max(by_month[3], by_month[4]) > 1.5 * by_month[6], country
        assert max(by_month[10], by_month[11]) > 1.5 * by_month[6], country
    overall = (clean["result"] == "positive").mean()
    assert 0.05 < overall < 0.25  # type: ignore[operator]


def test_positive_rate_differs_between_countries(tmp_path: Path) -> None:
    countries = {"Italy": "it_IT", "Japan": "ja_JP", "Brazil": "pt_BR"}
    report = generate(GenerateSpec(rows=30_000, countries=countries), tmp_path / "three.pq")
    frame = pl.read_parquet(report.path)
    monthly = monthly_positive_rate(frame)
    spread = monthly.group_by("month").agg(gap=pl.col("rate").max() - pl.col("rate").min())
    assert spread["gap"].max() > 0.1  # type: ignore[operator]
    peaks = monthly.sort("rate", descending=True).group_by("country").first()
    assert peaks["month"].n_unique() >= 2, "every country peaked in the same month"
    # Each wave's peak week reaches the 15-35% band.
    weekly = frame.group_by("country", pl.col("test_datetime").dt.truncate("1w")).agg(
        rate=(pl.col("result") == "positive").mean()
    )
    peak_weeks = weekly.group_by("country").agg(pl.col("rate").max())
    assert peak_weeks["rate"].min() >= 0.15  # type: ignore[operator]
    assert peak_weeks["rate"].max() <= 0.5  # type: ignore[operator]


def count_defects(frame: pl.DataFrame) -> pl.DataFrame:
    """One boolean column per defect kind, recomputed from the text alone."""
    country, tested, result = pl.col("country"), pl.col("test_datetime"), pl.col("result")
    parsed = tested.str.to_datetime(ISO_FORMAT, time_zone="UTC", strict=False)
    normalized = result.str.strip_chars().str.to_lowercase()
    valid = normalized.is_in(["positive", "negative", "pos", "neg"]).fill_null(False)
    return frame.select(
        country_missing=country.is_null(),
        country_empty=country.is_not_null() & (country.str.strip_chars() == ""),
        test_datetime_missing=tested.is_null(),
        test_datetime_unparseable=tested.is_not_null() & parsed.is_null(),
        test_datetime_out_of_range=(parsed < DEFAULT_START) | (parsed >= DEFAULT_END),
        result_invalid=~valid,
    ).fill_null(False)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_dirty_mode_counts_are_exact(tmp_path: Path, suffix: str) -> None:
    spec = GenerateSpec(rows=ROWS, dirty_fraction=0.05, row_group_size=7_000)
    report = generate(spec, tmp_path / f"dirty{suffix}")
    assert tuple(report.bad_rows) == BAD_ROW_KINDS
    assert sum(report.bad_rows.values()) == ROWS * 5 // 100
    assert max(report.bad_rows.values()) - min(report.bad_rows.values()) <= 1

    if suffix == ".csv":
        frame = pl.read_csv(report.path, infer_schema=False)
    else:
        frame = pl.read_parquet(report.path)
    assert frame.height == ROWS
    assert all(dtype == pl.String for dtype in frame.schema.values())
    defects = count_defects(frame)
    assert defects.sum().row(0, named=True) == report.bad_rows
    assert defects.sum_horizontal().max() == 1, "a bad row carries exactly one defect"

    good = frame.filter(defects.sum_horizontal() == 0)
    spellings = set(good["result"])
    assert {"positive", "negative", " NEGATIVE ", "Positive", "pos", "neg"} <= spellings
    assert (good["result"].is_in(["positive", "negative"])).mean() > 0.8  # type: ignore[operator]
    born = good["date_of_birth"].str.to_date("%Y-%m-%d")
    assert born.null_count() == 0 and born.min() >= date(1930, 1, 1)  # type: ignore[operator]


def test_dirty_csv_spells_empty_countries_with_whitespace(tmp_path: Path) -> None:
    spec = GenerateSpec(rows=ROWS, dirty_fraction=0.1)
    report = generate(spec, tmp_path / "dirty.csv")
    empties = pl.read_csv(report.path, infer_schema=False).filter(
        pl.col("country").str.strip_chars() == ""
    )
    assert empties.height == report.bad_rows["country_empty"]
    assert (empties["country"].str.len_chars() > 0).all()


def test_hot_key_rows_pile_into_one_key(tmp_path: Path) -> None:
    spec = GenerateSpec(rows=ROWS, hot_key_rows=5_000, row_group_size=6_000)
    report = generate(spec, tmp_path / "hot.parquet")
    assert report.rows == ROWS + 5_000
    frame = pl.read_parquet(report.path)
    assert frame.height == report.rows
    keys = (
        frame.group_by("country", pl.col("test_datetime").dt.truncate("1h").alias("hour"))
        .len()
        .sort("len", descending=True)
    )
    top, runner_up = keys.row(0, named=True), keys.row(1, named=True)
    assert top["country"] == next(iter(DEFAULT_COUNTRIES))
    assert top["hour"] == HOT_KEY_START
    assert top["len"] >= 5_000 and top["len"] > 100 * runner_up["len"]
    assert frame["test_datetime"].max() < DEFAULT_END  # type: ignore[operator]
    # Spread over the chunks rather than one giant chunk at the end.
    parquet = pq.ParquetFile(report.path)
    for group in range(parquet.num_row_groups):
        tested = pl.from_arrow(parquet.read_row_group(group, columns=["test_datetime"]))
        assert isinstance(tested, pl.DataFrame)
        in_hot_hour = tested["test_datetime"].is_between(HOT_KEY_START, HOT_KEY_END, "left")
        assert in_hot_hour.sum() >= tested.height // 5  # hot rows are a fifth of all


def test_on_rows_reports_each_chunk(tmp_path: Path) -> None:
    seen: list[int] = []
    spec = GenerateSpec(rows=ROWS, hot_key_rows=5_000, row_group_size=6_000)
    report = generate(spec, tmp_path / "chunks.parquet", on_rows=seen.append)
    assert seen == [6_000, 6_000, 6_000, 6_000, 1_000]
    assert sum(seen) == report.rows
    metadata = pq.ParquetFile(report.path).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sizes == seen


@pytest.mark.parametrize("name", ["tests.json", "tests", "tests.parquet.gz"])
def test_unknown_extension_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"\.parquet, \.pq or \.csv"):
        generate(GenerateSpec(rows=10), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_pq_extension_and_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "tests.pq"
    generate(GenerateSpec(rows=100), path)
    assert pq.read_table(path).num_rows == 100


def test_writes_atomically(tmp_path: Path) -> None:
    path = tmp_path / "tests.parquet"
    path.write_bytes(b"old")

    def fail(rows: int) -> None:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(GenerateSpec(rows=ROWS, row_group_size=5_000), path, on_rows=fail)
    assert path.read_bytes() == b"old", "a failed run leaves the old file alone"
    assert list(tmp_path.iterdir()) == [path], "and no temporary file behind"

    generate(GenerateSpec(rows=100), path)
    assert pq.read_table(path).num_rows == 100
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rows": -1}, "must not be negative"),
        ({"row_group_size": 0}, "row_group_size"),
        ({"dirty_fraction": 1.5}, "dirty_fraction"),
        ({"countries": {}}, "at least one country"),
        ({"countries": {"Atlantis": "xx_XX"}}, "no locale xx_XX"),
        ({"start": datetime(2020, 3, 1)}, "timezone-aware"),
        ({"end": DEFAULT_START}, "after start"),
        ({"hot_key_rows": 5, "start": datetime(2020, 6, 1, tzinfo=UTC)}, "hot_key_rows"),
    ],
)
def test_bad_specs_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerateSpec(**{"rows": 10, **changes})  # type: ignore[arg-type]
