"""Tests for dispatchkit.apps.covid.chart: daily sums, Wilson columns, and the PNGs it writes."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchkit.apps.covid.chart import (
    DEFAULT_TITLE,
    daily_rates,
    plot_report,
    plot_report_file,
)
from dispatchkit.apps.covid.stats import wilson_arrays
from dispatchkit.bench.chart import plot_benchmark

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
START = datetime(2020, 3, 1, tzinfo=UTC)
COUNTRIES = ("Brazil", "Chile", "Argentina")  # deliberately unsorted

Results = Callable[..., pl.DataFrame]


def hourly_counts(country: int, day: int, hour: int) -> tuple[int, int]:
    """(tests, positives) of one synthetic hour.

    Even hours are small and run at 50%; odd hours are nine times busier at ~10%, so the
    tests-weighted daily rate (~14%) is far from the mean of hourly rates (~30%).
    """
    scale = country + 1
    if hour % 2 == 0:
        return 10 * scale, 5 * scale
    return 90 * scale, 9 * scale + day


def results_frame(
    countries: tuple[str, ...] = COUNTRIES, days: int = 3, time_unit: str = "us"
) -> pl.DataFrame:
    """An hourly results table shaped like the store's, with known counts."""
    rows = []
    for c, country in enumerate(countries):
        for d in range(days):
            for h in range(24):
                tests, positives = hourly_counts(c, d, h)
                rows.append(
                    {
                        "run_id": "run-1",
                        "job_id": f"{country}|{d}|{h}",
                        "country": country,
                        "date_hour": START + timedelta(days=d, hours=h),
                        "tests": tests,
                        "positives": positives,
                    }
                )
    frame = pl.DataFrame(rows).with_columns(
        pl.col("date_hour").cast(pl.Datetime(time_unit, "UTC")),  # type: ignore[arg-type]
        pl.col("tests").cast(pl.Int64),
        pl.col("positives").cast(pl.Int64),
    )
    low, high = wilson_arrays(frame["positives"].to_numpy(), frame["tests"].to_numpy())
    return frame.with_columns(
        positive_rate=pl.col("positives") / pl.col("tests"),
        ci_low=pl.Series(low),
        ci_high=pl.Series(high),
    )


def wavy_results(n_countries: int, days: int, seed: int = 7) -> pl.DataFrame:
    """Hourly results with one epidemic wave per country, for rendering tests."""
    rng = np.random.default_rng(seed)
    hours = days * 24
    t = np.arange(hours) / 24.0
    stamps = pl.datetime_range(
        START, START + timedelta(hours=hours - 1), "1h", eager=True, time_zone="UTC"
    )
    frames = []
    for i in range(n_countries):
        peak = rng.uniform(0.1, 0.9) * days
        rate = 0.05 + rng.uniform(0.05, 0.3) * np.exp(-(((t - peak) / (days / 10)) ** 2))
        tests = rng.poisson(15, hours)
        frames.append(
            pl.DataFrame(
                {
                    "country": f"Country {i:02d}",
                    "date_hour": stamps,
                    "tests": tests.astype(np.int64),
                    "positives": rng.binomial(tests, rate).astype(np.int64),
                }
            )
        )
    return pl.concat(frames)


def assert_png(path: Path, *, min_width: int = 600, min_height: int = 300) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert min_width <= width <= 4000
    assert min_height <= height <= 3000
    # Something was drawn: not a blank white canvas.
    assert float(image[..., :3].min()) < 0.5
    # The atomic write leaves no temporary file behind.
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


# --- daily_rates ---------------------------------------------------------------------


def test_daily_rates_sums_hours_into_days() -> None:
    daily = daily_rates(results_frame())

    assert daily.columns == [
        "country",
        "date",
        "tests",
        "positives",
        "positive_rate",
        "ci_low",
        "ci_high",
    ]
    assert daily.schema["date"] == pl.Date
    assert daily.schema["tests"] == pl.Int64
    assert daily.schema["positive_rate"] == pl.Float64
    assert daily.height == 9
    expected_order = [
        (c, START.date() + timedelta(days=d)) for c in sorted(COUNTRIES) for d in range(3)
    ]
    assert list(zip(daily["country"], daily["date"], strict=True)) == expected_order

    for row in daily.iter_rows(named=True):
        c = COUNTRIES.index(row["country"])
        d = (row["date"] - START.date()).days
        hours = [hourly_counts(c, d, h) for h in range(24)]
        tests = sum(t for t, _ in hours)
        positives = sum(p for _, p in hours)
        assert row["tests"] == tests
        assert row["positives"] == positives
        assert row["positive_rate"] == positives / tests
        mean_of_hours = sum(p / t for t, p in hours) / 24
        assert abs(row["positive_rate"] - mean_of_hours) > 0.1


def test_daily_rates_wilson_is_on_the_daily_sums() -> None:
    daily = daily_rates(results_frame())
    low, high = wilson_arrays(daily["positives"].to_numpy(), daily["tests"].to_numpy())

    np.testing.assert_array_equal(daily["ci_low"].to_numpy(), low)
    np.testing.assert_array_equal(daily["ci_high"].to_numpy(), high)
    assert (daily["ci_low"] < daily["positive_rate"]).all()
    assert (daily["positive_rate"] < daily["ci_high"]).all()


def test_daily_rates_ignores_stored_hourly_rates_and_intervals() -> None:
    results = results_frame()
    scrambled = results.with_columns(positive_rate=pl.lit(0.9), ci_low=pl.lit(0.0))

    assert daily_rates(scrambled).equals(daily_rates(results))


@pytest.mark.parametrize("time_unit", ["us", "ms", "ns"])
def test_daily_rates_accepts_any_time_unit(time_unit: str) -> None:
    assert daily_rates(results_frame(time_unit=time_unit)).equals(daily_rates(results_frame()))


def test_daily_rates_groups_by_utc_day_whatever_the_time_zone() -> None:
    results = pl.DataFrame(
        {
            "country": ["X", "X", "X"],
            "date_hour": [
                datetime(2020, 3, 1, 0, tzinfo=UTC),
                datetime(2020, 3, 1, 23, tzinfo=UTC),  # already 2 March in Berlin
                datetime(2020, 3, 2, 0, tzinfo=UTC),
            ],
            "tests": [10, 10, 10],
            "positives": [1, 2, 4],
        }
    ).with_columns(pl.col("date_hour").dt.convert_time_zone("Europe/Berlin"))

    daily = daily_rates(results)

    assert daily["date"].to_list() == [date(2020, 3, 1), date(2020, 3, 2)]
    assert daily["positives"].to_list() == [3, 4]


def test_daily_rates_leaves_out_days_without_tests() -> None:
    results = results_frame().with_columns(
        tests=pl.when(pl.col("date_hour").dt.day() == 2).then(0).otherwise(pl.col("tests")),
        positives=pl.when(pl.col("date_hour").dt.day() == 2).then(0).otherwise(pl.col("positives")),
    )

    daily = daily_rates(results)

    assert daily.height == 6
    assert date(2020, 3, 2) not in daily["date"].to_list()
    assert not daily["ci_low"].is_nan().any()


def test_daily_rates_of_an_empty_table_is_empty() -> None:
    daily = daily_rates(results_frame().head(0))

    assert daily.height == 0
    assert daily.schema["date"] == pl.Date


def test_daily_rates_names_the_missing_column() -> None:
    with pytest.raises(ValueError, match="missing column 'positives'"):
        daily_rates(results_frame().drop("positives"))


def test_daily_rates_rejects_more_positives_than_tests() -> None:
    results = results_frame().with_columns(
        positives=pl.when(pl.col("job_id") == "Chile|1|3")
        .then(pl.col("tests") + 1)
        .otherwise(pl.col("positives"))
    )

    with pytest.raises(ValueError, match="1 row"):
        daily_rates(results)


def test_daily_rates_rejects_text_timestamps() -> None:
    results = results_frame().with_columns(pl.col("date_hour").dt.to_string())

    with pytest.raises(ValueError, match=r"'date_hour'.*datetime"):
        daily_rates(results)


# --- plot_report ---------------------------------------------------------------------


def test_plot_report_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "dir" / "report.png"

    returned = plot_report(results_frame(), out)

    assert returned == out
    assert_png(out)


def test_plot_report_replaces_an_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    out.write_bytes(b"old")

    plot_report(results_frame(), out, title="A custom title")

    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("n_countries", [1, 2, 7, 30])
def test_plot_report_lays_out_any_number_of_countries(tmp_path: Path, n_countries: int) -> None:
    out = plot_report(wavy_results(n_countries, days=40), tmp_path / "report.png")

    assert_png(out)
    height, width = mpimg.imread(out).shape[:2]
    assert width > height  # landscape, whatever the count


def test_plot_report_full_size(tmp_path: Path) -> None:
    out = plot_report(wavy_results(20, days=306), tmp_path / "report.png")

    assert_png(out, min_width=1500, min_height=900)


def test_plot_report_draws_from_several_threads(tmp_path: Path) -> None:
    results = results_frame()
    with ThreadPoolExecutor(max_workers=3) as pool:
        outs = list(pool.map(lambda i: plot_report(results, tmp_path / f"r{i}.png"), range(3)))

    for out in outs:
        assert_png(out)


def test_plot_report_refuses_a_table_without_tests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tests"):
        plot_report(results_frame().head(0), tmp_path / "report.png")
    assert not (tmp_path / "report.png").exists()


def test_default_title_names_the_interval() -> None:
    assert "Wilson" in DEFAULT_TITLE


# --- plot_report_file ----------------------------------------------------------------


def test_plot_report_file_reads_csv_with_iso_timestamps(tmp_path: Path) -> None:
    results = results_frame()
    csv = tmp_path / "results.csv"
    results.with_columns(pl.col("date_hour").dt.strftime("%Y-%m-%dT%H:%M:%SZ")).write_csv(csv)
    assert "2020-03-01T05:00:00Z" in csv.read_text()

    out = plot_report_file(csv, tmp_path / "out" / "report.png")

    assert_png(out)


def test_plot_report_file_reads_csv_written_by_polars(tmp_path: Path) -> None:
    csv = tmp_path / "results.csv"
    results_frame().write_csv(csv)  # date_hour as 2020-03-01T05:00:00.000000+0000

    assert_png(plot_report_file(csv, tmp_path / "report.png"))


def test_plot_report_file_reads_parquet(tmp_path: Path) -> None:
    parquet = tmp_path / "results.parquet"
    results_frame(time_unit="ms").write_parquet(parquet)

    assert_png(plot_report_file(parquet, tmp_path / "report.png"))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_plot_report_file_names_the_missing_column(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"results{suffix}"
    frame = results_frame().drop("tests")
    if suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)

    with pytest.raises(ValueError, match="missing column 'tests'"):
        plot_report_file(path, tmp_path / "report.png")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_plot_report_file_rejects_an_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"results{suffix}"
    path.touch()

    with pytest.raises(ValueError, match="is empty"):
        plot_report_file(path, tmp_path / "report.png")


def test_plot_report_file_rejects_a_header_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("run_id,job_id,country,date_hour,tests,positives\n")

    with pytest.raises(ValueError, match="no rows"):
        plot_report_file(path, tmp_path / "report.png")


def test_plot_report_file_rejects_bad_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("country,date_hour,tests,positives\nPeru,yesterday,10,1\n")

    with pytest.raises(ValueError, match="ISO 8601"):
        plot_report_file(path, tmp_path / "report.png")


def test_plot_report_file_rejects_an_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("{}")

    with pytest.raises(ValueError, match=r"neither \.parquet nor \.csv"):
        plot_report_file(path, tmp_path / "report.png")


def test_plot_report_file_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_report_file(tmp_path / "nope.parquet", tmp_path / "report.png")


# --- plot_benchmark ------------------------------------------------------------------


def benchmark_rows() -> list[dict[str, object]]:
    return [
        {
            "variant": "pandas, one process",
            "wall_median_s": 41.2,
            "wall_min_s": 39.8,
            "wall_max_s": 44.0,
            "peak_rss_max_mb": 2310.0,
            "peak_rss_total_mb": 2310.0,
        },
        {
            "variant": "dispatcher, 4 workers",
            "wall_median_s": 18.7,
            "wall_min_s": 17.2,
            "wall_max_s": 21.5,
            "peak_rss_max_mb": 420.0,
            "peak_rss_total_mb": 1350,
        },
    ]


def test_plot_benchmark_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "benchmark.png"

    returned = plot_benchmark(benchmark_rows(), out, title="With vs without the dispatcher")

    assert returned == out
    assert_png(out, min_height=200)


def test_plot_benchmark_tolerates_an_unmeasured_value(tmp_path: Path) -> None:
    rows = benchmark_rows()
    rows[1]["peak_rss_total_mb"] = float("nan")
    rows[1]["wall_max_s"] = float("nan")

    assert_png(plot_benchmark(rows, tmp_path / "b.png", title="t"), min_height=200)


def test_plot_benchmark_names_the_missing_key(tmp_path: Path) -> None:
    rows = benchmark_rows()
    del rows[1]["peak_rss_max_mb"]

    with pytest.raises(ValueError, match="row 1 is missing key 'peak_rss_max_mb'"):
        plot_benchmark(rows, tmp_path / "b.png", title="t")


def test_plot_benchmark_rejects_text_numbers(tmp_path: Path) -> None:
    rows = benchmark_rows()
    rows[0]["wall_median_s"] = "41.2"

    with pytest.raises(ValueError, match="'wall_median_s' must be a number"):
        plot_benchmark(rows, tmp_path / "b.png", title="t")


def test_plot_benchmark_refuses_no_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no benchmark rows"):
        plot_benchmark([], tmp_path / "b.png", title="t")


@given(
    st.lists(
        st.one_of(st.none(), st.tuples(st.floats(0, 0.5), st.floats(0, 0.5))),
        min_size=1,
        max_size=40,
    )
)
@settings(max_examples=60, deadline=None)
def test_the_band_is_fill_betweens_polygons(days: list[tuple[float, float] | None]) -> None:
    """The chart's band (NumPy slices) draws what ``fill_between`` would: the same
    polygons, one per run of days with values, whatever the gaps."""
    from matplotlib.figure import Figure

    import dispatchkit.apps.covid.chart as chart

    x = np.arange(len(days), dtype=np.float64) + 18_000.0
    low = np.array([np.nan if d is None else min(d) for d in days])
    high = np.array([np.nan if d is None else max(d) for d in days])
    ax = Figure().subplots()
    expected = ax.fill_between(x, low, high, color=chart._BAND, alpha=0.55, linewidth=0)
    chart._band(ax, x, low, high)
    got = ax.collections[-1]
    assert len(got.get_paths()) == len(expected.get_paths())
    for a, b in zip(got.get_paths(), expected.get_paths(), strict=True):
        np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(got.get_facecolor(), expected.get_facecolor())
    np.testing.assert_array_equal(got.get_edgecolor(), expected.get_edgecolor())


# --- drawn in two processes -----------------------------------------------------------


@pytest.fixture
def twin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Executor]:
    """A chart twin as a run's chart process has one: a fork of this process."""
    from dispatchkit import charting

    pool = ProcessPoolExecutor(1, mp_context=mp.get_context("fork"))
    pool.submit(int).result()
    helper = charting._Twin(pool)
    monkeypatch.setattr(charting, "_twin", helper)
    yield helper
    helper.shutdown()


def gappy_results(n_countries: int, days: int, drop: float, seed: int) -> pl.DataFrame:
    """``wavy_results`` with a share ``drop`` of its days left out, country by country."""
    results = wavy_results(n_countries, days=days, seed=seed)
    rng = np.random.default_rng(seed)
    gone = {(c, d) for c in range(n_countries) for d in range(days) if rng.random() < drop}
    keep = [
        (int(name[-2:]), (stamp - START).days) not in gone
        for name, stamp in zip(results["country"], results["date_hour"], strict=True)
    ]
    return results.filter(pl.Series(keep))


@given(
    n_countries=st.integers(2, 31),
    days=st.integers(1, 60),
    drop=st.sampled_from([0.0, 0.3, 0.8]),
    seed=st.integers(0, 2**16),
)
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_chart_drawn_in_halves_is_the_chart_drawn_whole(
    twin: Executor, n_countries: int, days: int, drop: float, seed: int
) -> None:
    """The header and upper rows drawn here, the lower rows in the twin: the very pixels
    one process draws, for any count of countries, any span and any gaps."""
    import dispatchkit.apps.covid.chart as chart

    results = gappy_results(n_countries, days, drop, seed)
    if results.height == 0:
        return
    plan = chart._plan(results, None)
    whole = chart._draw(plan, range(len(plan.panels)), header=True)
    if plan.nrows < 2:  # one row: nothing to split, plot_report draws it whole
        return
    halves = chart._draw_halves(plan, twin)
    assert halves is not None, "the halves met: drawn whole"
    assert halves.shape == whole.shape
    assert int((halves != whole).any(axis=2).sum()) == 0


def test_plot_report_draws_the_lower_rows_in_the_twin(
    twin: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dispatchkit.apps.covid.chart as chart

    results = wavy_results(20, days=50)
    calls: list[int] = []
    real = chart._draw_halves

    def spy(plan: object, helper: Executor) -> object:
        out = real(plan, helper)  # type: ignore[arg-type]
        calls.append(0 if out is None else 1)
        return out

    monkeypatch.setattr(chart, "_draw_halves", spy)
    split = plot_report(results, tmp_path / "split.png")
    monkeypatch.setattr(chart.charting, "_twin", None)
    whole = plot_report(results, tmp_path / "whole.png")

    assert calls == [1]  # drawn in halves, then once in one process
    assert split.read_bytes() == whole.read_bytes()


def test_halves_that_would_meet_are_drawn_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No gap between the rows of panels: the lower titles would be drawn over the upper
    panels, so the halves are refused and the chart is drawn in one process."""
    import dispatchkit.apps.covid.chart as chart
    from dispatchkit import charting

    monkeypatch.setattr(chart, "_GAP_H", 0.0)  # before the twin is forked: it has it too
    pool = ProcessPoolExecutor(1, mp_context=mp.get_context("fork"))
    pool.submit(int).result()
    helper = charting._Twin(pool)
    try:
        results = wavy_results(8, days=30)
        plan = chart._plan(results, None)
        assert chart._draw_halves(plan, helper) is None
        monkeypatch.setattr(charting, "_twin", helper)
        split = plot_report(results, tmp_path / "split.png")
        monkeypatch.setattr(charting, "_twin", None)
        whole = plot_report(results, tmp_path / "whole.png")
    finally:
        helper.shutdown()
    assert split.read_bytes() == whole.read_bytes()


def test_a_dead_twin_leaves_the_chart_to_this_process(
    twin: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The twin killed (kill -9) before the chart: drawn in one process, same bytes."""
    import os
    import signal

    from dispatchkit import charting

    pool = twin._pool  # type: ignore[attr-defined]
    (pid,) = pool._processes
    os.kill(pid, signal.SIGKILL)
    results = wavy_results(12, days=30)
    split = plot_report(results, tmp_path / "split.png")
    monkeypatch.setattr(charting, "_twin", None)
    whole = plot_report(results, tmp_path / "whole.png")
    assert split.read_bytes() == whole.read_bytes()
