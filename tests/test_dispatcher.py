"""The dispatcher: jobs cut by key into wire v3 messages, sized by bytes, split exactly."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from dispatchkit import wire
from dispatchkit.apps.covid import app as covid
from dispatchkit.dispatcher import Dispatcher, Outgoing
from dispatchkit.errors import RunError, UsageError
from dispatchkit.keys import job_id
from dispatchkit.reader import InputReader

from .conftest import reference


def cut(path: Path, tmp_path: Path, **kw: object) -> tuple[list[Outgoing], Dispatcher]:
    with InputReader([path], covid, spill_dir=tmp_path) as reader:
        d = Dispatcher(reader, app=covid, run_id="run-a", task="positive-rate", **kw)  # type: ignore[arg-type]
        return list(d.messages()), d


def as_frame(messages: list[Outgoing]) -> pl.DataFrame:
    """Every job part of the messages: key, rows and positives, decoded with the wire API."""
    rows = []
    for m in messages:
        msg = wire.decode_jobs(m.payload)
        for (job, part_rows), key in zip(msg, msg.keys().to_pylist(), strict=True):
            rows.append(
                {
                    "job_id": job.job_id,
                    "part": job.part,
                    "parts": job.parts,
                    "country": key["country"],
                    "date_hour": key["date_hour"],
                    "tests": part_rows.num_rows,
                    "positives": sum(part_rows.column("result").to_pylist()),
                }
            )
    return pl.DataFrame(rows).with_columns(pl.col("date_hour").dt.convert_time_zone("UTC"))


def test_job_ids_are_deterministic_and_distinct() -> None:
    a = job_id("run-1", "covid", "positive-rate", ("Italy", 1583038800 * 10**6))
    assert a == job_id("run-1", "covid", "positive-rate", ("Italy", 1583038800 * 10**6))
    assert a != job_id("run-2", "covid", "positive-rate", ("Italy", 1583038800 * 10**6))
    assert a != job_id("run-1", "covid", "beta-posterior", ("Italy", 1583038800 * 10**6))
    assert a != job_id("run-1", "covid", "positive-rate", ("Spain", 1583038800 * 10**6))
    assert a != job_id("run-1", "covid", "positive-rate", ("Italy", 1583042400 * 10**6))
    assert len(a) == 20


def test_grouping_matches_an_independent_group_by(small_parquet: Path, tmp_path: Path) -> None:
    messages, d = cut(small_parquet, tmp_path)
    got = as_frame(messages).sort("country", "date_hour")
    ref = reference(small_parquet)
    assert got.select("country", "date_hour", "tests", "positives").equals(ref)
    assert got["tests"].sum() == 30_000 == d.stats.rows_cut
    assert got["job_id"].n_unique() == got.height == d.stats.jobs
    assert d.stats.messages == len(messages)


def test_a_job_always_has_one_message_key(small_parquet: Path, tmp_path: Path) -> None:
    """Every message holds jobs of one bucket; the same job gets the same key in every cut."""
    first, _ = cut(small_parquet, tmp_path)
    again, _ = cut(small_parquet, tmp_path, max_message_bytes=4096)
    keys: dict[str, bytes] = {}
    for m in first:
        for j in m.job_ids:
            keys[j] = m.key
    assert len(first) < len(again)
    for m in again:
        assert {keys[j] for j in m.job_ids} == {m.key}
        assert len(m.payload) <= 4096


def test_oversized_keys_are_split_and_add_up(tmp_path: Path) -> None:
    from dispatchkit.apps.covid.generate import GenerateSpec, generate

    path = tmp_path / "hot.parquet"
    generate(GenerateSpec(rows=5_000, seed=3, hot_key_rows=60_000), path)
    messages, d = cut(path, tmp_path, max_message_bytes=2048)
    assert d.stats.split_jobs >= 1
    assert all(len(m.payload) <= 2048 for m in messages)
    frame = as_frame(messages)
    split = frame.filter(pl.col("parts") > 1)
    assert split["job_id"].n_unique() == d.stats.split_jobs
    # A part travels alone, and parts are numbered 0..parts-1 once each.
    assert all(len(m.job_ids) == 1 for m in messages if m.parts[0][1] > 1)
    counts = split.group_by("job_id").agg(pl.len().alias("n"), pl.col("parts").first())
    assert (counts["n"] == counts["parts"]).all()
    merged = (
        frame.group_by("job_id", "country", "date_hour")
        .agg(pl.col("tests").sum(), pl.col("positives").sum())
        .sort("country", "date_hour")
    )
    assert merged.select("country", "date_hour", "tests", "positives").equals(reference(path))
    # The split depends only on the job and the budget: cut again, the same parts.
    again, _ = cut(path, tmp_path, max_message_bytes=2048)
    assert [m.payload for m in again] == [m.payload for m in messages]


def test_a_key_too_big_for_a_task_without_combine_is_refused(tmp_path: Path) -> None:
    import dispatchkit as dk

    app = dk.App("nocombine")
    app.columns(k=dk.Text(), x=dk.Float())
    app.key("k")

    @app.task(result={"n": pa.int64()})
    def count(key: dict[str, object], rows: pa.Table) -> dict[str, int]:
        return {"n": rows.num_rows}

    path = tmp_path / "hot.parquet"
    pa.parquet.write_table(pa.table({"k": ["a"] * 5000 + ["b"], "x": [1.0] * 5001}), path)
    with InputReader([path], app, spill_dir=tmp_path) as reader:
        d = Dispatcher(reader, app=app, run_id="r", task="count", max_message_bytes=4096)
        with pytest.raises(RunError, match=r"job k=a has 5,000 rows.*no combine step"):
            list(d.messages())


def test_skip_leaves_out_done_jobs_but_counts_their_rows(
    small_parquet: Path, tmp_path: Path
) -> None:
    messages, _ = cut(small_parquet, tmp_path)
    jobs = [j for m in messages for j in m.job_ids]
    done = set(jobs[::2])
    with InputReader([small_parquet], covid, spill_dir=tmp_path) as reader:
        d = Dispatcher(reader, app=covid, run_id="run-a", task="positive-rate")
        rest = as_frame(list(d.messages(skip=done)))
    assert set(rest["job_id"]).isdisjoint(done)
    assert rest.height + len(done) == len(jobs)
    assert d.stats.rows_cut == 30_000
    assert d.stats.rows_sent == rest["tests"].sum()


def test_rows_carry_only_what_the_task_reads(tmp_path: Path) -> None:
    path = tmp_path / "tiny.csv"
    path.write_text(
        "country,test_datetime,result,name\n"
        "Italy,2020-03-01T05:10:00Z,positive,a\n"
        "Italy,2020-03-01T05:50:00Z,negative,b\n"
        "Italy,2020-03-01T06:00:00Z,positive,c\n"
        "Spain,2020-03-01T05:00:00Z,pos,d\n"
    )
    messages, _ = cut(path, tmp_path)
    frame = as_frame(messages).sort("country", "date_hour")
    assert frame.select("country", "tests", "positives").rows() == [
        ("Italy", 2, 1),
        ("Italy", 1, 1),
        ("Spain", 1, 1),
    ]
    body = wire.decode_jobs(messages[0].payload).table
    assert body.schema.names == ["result"]
    with pytest.raises(UsageError):
        Dispatcher(
            InputReader([path], covid, spill_dir=tmp_path),
            app=covid,
            run_id="r",
            task="positive-rate",
            max_message_bytes=10,
        )


def test_the_reader_falls_back_to_sorting_by_key_values(
    small_parquet: Path, tmp_path: Path
) -> None:
    """Should two keys share a hash, the reader sorts by their values: the same jobs."""
    with InputReader([small_parquet], covid, spill_dir=tmp_path) as reader:
        reader.counts()
        assert reader._hash_sort  # every key has its own hash here
        reader._hash_sort = False  # as if two keys had the same h >> 8
        d = Dispatcher(reader, app=covid, run_id="run-a", task="positive-rate")
        fallback = as_frame(list(d.messages())).sort("country", "date_hour")
    hashed = as_frame(cut(small_parquet, tmp_path)[0]).sort("country", "date_hour")
    assert fallback.equals(hashed)


class _Rows:
    """A row source yielding given batches as the reader would."""

    def __init__(self, batches: list[pa.RecordBatch]) -> None:
        self.batches = batches

    def sorted_valid(self, columns: object) -> list[pa.RecordBatch]:
        return self.batches


def _batch(bucket: int, countries: list[str]) -> pa.RecordBatch:
    n = len(countries)
    hour = pa.array([1583038800 * 10**6] * n, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    return pa.RecordBatch.from_arrays(
        [pa.array([bucket] * n, pa.int32()), pa.array(countries), hour, pa.array([True] * n)],
        names=["bucket", "country", "date_hour", "result"],
    )


@pytest.mark.parametrize(
    "batches",
    [
        [_batch(3, ["Italy", "Spain", "Italy", "Chile"])],  # a key comes back in a batch
        [_batch(3, ["Italy", "Spain"]), _batch(3, ["Italy", "Chile"])],  # in the next one
    ],
)
def test_a_key_whose_rows_are_not_together_is_refused(batches: list[pa.RecordBatch]) -> None:
    d = Dispatcher(_Rows(batches), app=covid, run_id="run-a", task="positive-rate")
    with pytest.raises(RunError, match=r"internal check failed: the rows of job .*Italy"):
        list(d.messages())


def test_rows_out_of_bucket_order_are_refused() -> None:
    batches = [_batch(5, ["Italy"]), _batch(2, ["Spain"]), _batch(2, ["Chile"])]
    d = Dispatcher(_Rows(batches), app=covid, run_id="run-a", task="positive-rate")
    with pytest.raises(RunError, match="not sorted by bucket"):
        list(d.messages())
