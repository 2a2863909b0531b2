from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dispatchkit.task import positive_rate

from dispatchkit.dispatcher import Dispatcher, batch_key, job_id
from dispatchkit.message import JobBatch, decode, encode
from dispatchkit.reader import InputReader
from dispatchkit.schema import DEFAULT_END, DEFAULT_START

from .conftest import reference


def cut(path: Path, tmp_path: Path, **kw: object) -> tuple[list[JobBatch], Dispatcher]:
    reader = InputReader([path], start=DEFAULT_START, end=DEFAULT_END, spill_dir=tmp_path)
    with reader:
        d = Dispatcher(reader, run_id="run-a", task="positive-rate", **kw)  # type: ignore[arg-type]
        batches = list(d.batches())
    return batches, d


def as_frame(batches: list[JobBatch]) -> pl.DataFrame:
    rows = [positive_rate(j) for b in batches for j in b.jobs]
    return pl.DataFrame(
        {
            "job_id": [r.job_id for r in rows],
            "country": [r.country for r in rows],
            "date_hour": [r.date_hour * 1_000_000 for r in rows],
            "tests": [r.tests for r in rows],
            "positives": [r.positives for r in rows],
        }
    ).with_columns(pl.col("date_hour").cast(pl.Datetime("us", "UTC")))


def test_job_ids_are_deterministic_and_distinct() -> None:
    a = job_id("run-1", "Italy", 1583038800)
    assert a == job_id("run-1", "Italy", 1583038800)
    assert a != job_id("run-2", "Italy", 1583038800)
    assert a != job_id("run-1", "Spain", 1583038800)
    assert a != job_id("run-1", "Italy", 1583042400)
    assert len(a) == 20


def test_grouping_matches_an_independent_group_by(small_parquet: Path, tmp_path: Path) -> None:
    batches, d = cut(small_parquet, tmp_path)
    got = as_frame(batches).sort("country", "date_hour")
    ref = reference(small_parquet)
    assert got.select("country", "date_hour", "tests", "positives").equals(ref)
    assert got["tests"].sum() == 30_000 == d.stats.rows_cut
    assert got["job_id"].n_unique() == got.height == d.stats.jobs


def test_batches_are_one_country_and_day_and_key_is_stable(
    small_parquet: Path, tmp_path: Path
) -> None:
    batches, _ = cut(small_parquet, tmp_path)
    for b in batches:
        keys = {batch_key(JobBatch(1, "r", "b", "t", [j])) for j in b.jobs}
        assert keys == {batch_key(b)}
        assert decode(encode(b), JobBatch) == b


def test_oversized_keys_are_split_and_add_up(tmp_path: Path) -> None:
    from dispatchkit.generator import GenerateSpec, generate

    path = tmp_path / "hot.parquet"
    generate(GenerateSpec(rows=5_000, seed=3, hot_key_rows=60_000), path)
    batches, d = cut(path, tmp_path, max_message_bytes=2048)
    assert d.stats.split_jobs >= 1
    assert all(len(encode(b)) <= 2048 for b in batches)
    parts = [j for b in batches for j in b.jobs if j.parts > 1]
    assert len({j.job_id for j in parts}) == d.stats.split_jobs
    merged = (
        as_frame(batches)
        .group_by("job_id", "country", "date_hour")
        .agg(pl.col("tests").sum(), pl.col("positives").sum())
        .sort("country", "date_hour")
    )
    assert merged.select("country", "date_hour", "tests", "positives").equals(reference(path))


def test_skip_leaves_out_done_keys_but_counts_their_rows(
    small_parquet: Path, tmp_path: Path
) -> None:
    all_batches, _ = cut(small_parquet, tmp_path)
    jobs = [j for b in all_batches for j in b.jobs]
    done = {(j.country, j.date_hour) for j in jobs[::2]}
    reader = InputReader([small_parquet], start=DEFAULT_START, end=DEFAULT_END, spill_dir=tmp_path)
    with reader:
        d = Dispatcher(reader, run_id="run-a", task="positive-rate")
        rest = [j for b in d.batches(skip=done) for j in b.jobs]
    assert {(j.country, j.date_hour) for j in rest}.isdisjoint(done)
    assert len(rest) + len(done) == len(jobs)
    assert d.stats.rows_cut == 30_000
    assert d.stats.rows_sent == sum(j.n for j in rest)


def test_outcome_bits_are_the_rows_results(tmp_path: Path) -> None:
    path = tmp_path / "tiny.csv"
    path.write_text(
        "country,test_datetime,result\n"
        "Italy,2020-03-01T05:10:00Z,positive\n"
        "Italy,2020-03-01T05:50:00Z,negative\n"
        "Italy,2020-03-01T06:00:00Z,positive\n"
        "Spain,2020-03-01T05:00:00Z,pos\n"
    )
    batches, _ = cut(path, tmp_path)
    jobs = sorted((j for b in batches for j in b.jobs), key=lambda j: (j.country, j.date_hour))
    assert [(j.country, j.n) for j in jobs] == [("Italy", 2), ("Italy", 1), ("Spain", 1)]
    bits = np.unpackbits(np.frombuffer(jobs[0].outcomes, np.uint8))[:2]
    assert sorted(bits.tolist()) == [0, 1]
    assert jobs[0].date_hour == 1583038800
    with pytest.raises(ValueError):
        Dispatcher(
            InputReader([path], start=DEFAULT_START, end=DEFAULT_END, spill_dir=tmp_path),
            run_id="r",
            task="t",
            max_message_bytes=10,
        )
