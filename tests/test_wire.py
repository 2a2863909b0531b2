"""Wire format v3 (dispatchkit.wire): round trips, the byte budget, plain decoders, refusals."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchkit import wire
from dispatchkit.errors import DecodeError, UsageError

from .wire_v1 import V1, Job, JobBatch, JobResult, ResultBatch, encode

UTC_US = pa.timestamp("us", tz="UTC")
HOUR_US = 3_600_000_000


def covid_batch(jobs: int = 48, rows: int = 15, seed: int = 0) -> dict[str, Any]:
    """A typical COVID job batch: one country, ``jobs`` hours of ``rows`` tests each."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(rows - 5, rows + 6, jobs)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    outcomes = rng.random(int(offsets[-1])) < 0.1
    hours = 1_583_020_800 // 3600 + np.arange(jobs)
    return {
        "table": pa.table({"positive": pa.array(outcomes)}),
        "offsets": offsets,
        "keys": pa.table(
            {
                "country": pa.array(["Italy"] * jobs),
                "hour": pa.array(hours * HOUR_US, pa.int64()).cast(UTC_US),
            }
        ),
        "job_ids": [f"{i:020x}" for i in range(jobs)],
        "hours": hours,
        "outcomes": outcomes,
    }


def cut(data: dict[str, Any], **kw: Any) -> list[bytes]:
    return wire.cut_jobs(
        data["table"],
        data["offsets"],
        job_ids=data["job_ids"],
        keys=data["keys"],
        run_id="run-1",
        app="covid",
        task="positive-rate",
        fingerprint="1:abc",
        **kw,
    )


def one_job_message(compression: wire.Compression = "lz4") -> bytes:
    messages = cut(covid_batch(), compression=compression)
    assert len(messages) == 1
    return messages[0]


def result_message(**kw: Any) -> bytes:
    entries = [
        wire.ResultEntry("a" * 20, 0, 1),
        wire.ResultEntry("b" * 20, 0, 2, state=True),
        wire.ResultEntry("c" * 20, 0, 1),
    ]
    keys = pa.table({"store": pa.array([1, 2, 3], pa.int64()), "day": pa.array(["x", "y", "z"])})
    values = pa.table({"n": pa.array([5, 7], pa.int64()), "mean": pa.array([0.5, None])})
    states = pa.table({"n": pa.array([11], pa.int64()), "total": pa.array([2.5])})
    failed = [wire.Failure("d" * 20, 1, 3, "RuntimeError", "boom", 3, 1.5e9)]
    return wire.encode_results(
        run_id="run-1",
        batch_id="b1",
        worker="w1",
        app="sales",
        task="stats",
        fingerprint="1:abc",
        results=entries,
        keys=keys,
        values=values,
        states=states,
        failed=failed,
        **kw,
    )


# --------------------------------------------------------------------------- round trips


@st.composite
def tables_and_jobs(draw: st.DrawFn) -> tuple[pa.Table, np.ndarray, np.ndarray, int]:
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=30))
    if draw(st.booleans()):  # a hot key, bigger than most budgets
        sizes.insert(draw(st.integers(0, len(sizes))), draw(st.integers(100, 600)))
    n = sum(sizes)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    nulls = rng.random(n) < draw(st.sampled_from([0.0, 0.2]))
    words = np.array(["", "a", "Zürich", "naïve text", "x" * 30, "\u2603"])
    strings = words[rng.integers(0, words.size, n)]
    table = pa.table(
        {
            "i": pa.array(rng.integers(-(2**62), 2**62, n), pa.int64(), mask=nulls),
            "f": pa.array(rng.random(n)),
            "s": pa.array(strings.tolist(), pa.string(), mask=nulls),
            "b": pa.array(rng.random(n) < 0.5, mask=nulls),
            "ts": pa.array(rng.integers(-(2**52), 2**52, n), pa.int64()).cast(UTC_US),
        }
    )
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    groups = np.sort(rng.integers(0, 4, len(sizes)))
    budget = draw(st.integers(5_000, 40_000))
    return table, offsets, groups, budget


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tables_and_jobs(),
    st.sampled_from(["lz4", "zstd", "none"]),
    st.booleans(),
    st.sampled_from([None, 1, 5]),
)
def test_every_row_lands_in_exactly_one_part_and_messages_keep_the_budget(
    case: tuple[pa.Table, np.ndarray, np.ndarray, int],
    compression: wire.Compression,
    use_groups: bool,
    max_jobs: int | None,
) -> None:
    table, offsets, groups, budget = case
    n_jobs = offsets.size - 1
    keys = pa.table(
        {
            "k": pa.array(np.arange(n_jobs), pa.int64()),
            "name": pa.array([f"key-{i}" for i in range(n_jobs)]),
            "flag": pa.array(np.arange(n_jobs) % 2 == 0),
            "day": pa.array(np.arange(n_jobs) * 86_400_000_000 - 10**15, pa.int64()).cast(UTC_US),
        }
    )
    ids = [f"{i:020x}" for i in range(n_jobs)]
    messages = wire.cut_jobs(
        table,
        offsets,
        job_ids=ids,
        keys=keys,
        run_id="r",
        app="a",
        task="t",
        fingerprint="f",
        max_message_bytes=budget,
        compression=compression,
        groups=groups if use_groups else None,
        max_jobs=max_jobs,
    )
    assert all(len(m) <= budget for m in messages)
    seen: list[tuple[int, int, int]] = []  # (job, part, parts) in message order
    pieces: dict[int, list[pa.RecordBatch]] = {}
    for payload in messages:
        message = wire.decode_jobs(payload)
        assert message.offsets[0] == 0 and message.offsets[-1] == message.table.num_rows
        if max_jobs is not None:
            assert len(message) <= max_jobs
        if use_groups:
            assert len({int(groups[int(j.job_id, 16)]) for j in message.jobs}) == 1
        message_keys = message.keys()
        assert message_keys.schema == keys.schema
        for i, (job, rows) in enumerate(message):
            j = int(job.job_id, 16)
            assert message_keys.slice(i, 1).equals(keys.slice(j, 1))
            seen.append((j, job.part, job.parts))
            pieces.setdefault(j, []).append(rows)
            if job.parts > 1:
                assert len(message) == 1  # a part of a split job travels alone
    # Jobs in order; each job's parts 0..parts-1 in order, contiguous in the message stream.
    expected = []
    for j in dict.fromkeys(s[0] for s in seen):
        parts = next(s[2] for s in seen if s[0] == j)
        expected += [(j, p, parts) for p in range(parts)]
    assert seen == expected
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    assert set(pieces) == set(range(n_jobs))
    for j, batches in pieces.items():
        start, stop = int(offsets[j]), int(offsets[j + 1])
        got = pa.Table.from_batches(batches).combine_chunks()
        assert got.equals(table.slice(start, stop - start).combine_chunks())


def test_whole_jobs_stay_whole_and_only_hot_keys_split() -> None:
    data = covid_batch(jobs=200, rows=15)
    sizes = np.diff(data["offsets"])
    messages = cut(data, max_message_bytes=4_000, compression="none")
    entries = [job for m in messages for job in wire.decode_jobs(m).jobs]
    assert all(job.parts == 1 for job in entries)
    assert [job.end - job.start for job in entries] == sizes.tolist()
    assert len(messages) > 1 and all(len(m) <= 4_000 for m in messages)

    hot = covid_batch(jobs=3, rows=15)
    big = np.random.default_rng(1).random(100_000) < 0.5
    hot["table"] = pa.table({"positive": pa.array(np.concatenate(([True] * 15, big)))})
    hot["offsets"] = np.array([0, 15, 15 + 50_000, 15 + 100_000])
    parts = [j for m in cut(hot, max_message_bytes=4_000) for j in wire.decode_jobs(m).jobs]
    assert [(j.job_id[-1], j.parts) for j in parts][:2] == [("0", 1), ("1", parts[1].parts)]
    assert parts[1].parts > 1 and sum(j.end - j.start for j in parts) == 100_015


def test_plan_cuts_is_pure_numpy_over_offsets() -> None:
    offsets = np.array([0, 3, 5, 20, 21])
    cuts = wire.plan_cuts(offsets, np.ones(21), 1.0, capacity=8.0)
    described = [(c.row_start, c.row_end, c.job.tolist(), c.part.tolist()) for c in cuts]
    assert described == [
        (0, 5, [0, 1], [0, 0]),
        (5, 12, [2], [0]),
        (12, 19, [2], [1]),
        (19, 20, [2], [2]),
        (20, 21, [3], [0]),
    ]
    assert all(c.parts.tolist() == [3] for c in cuts[1:4])
    with pytest.raises(UsageError, match="larger than the message budget"):
        wire.plan_cuts(offsets, np.full(21, 10.0), 1.0, capacity=8.0)
    with pytest.raises(UsageError, match="offsets"):
        wire.plan_cuts(np.array([0, 2, 2]), np.ones(2), 1.0, capacity=8.0)


def test_an_optimistic_ratio_is_corrected_by_encoding() -> None:
    """Planned for 20x compression, random floats do not compress: planned again, within budget."""
    rng = np.random.default_rng(3)
    data = covid_batch(jobs=100, rows=30)
    data["table"] = pa.table({"x": rng.random(data["table"].num_rows)})
    messages = cut(data, max_message_bytes=5_000, expected_ratio=0.05)
    assert all(len(m) <= 5_000 for m in messages)
    decoded = [wire.decode_jobs(m) for m in messages]
    assert sum(m.table.num_rows for m in decoded) == data["table"].num_rows
    # The vectorized form: the whole batch and its offsets, as numpy.
    first = decoded[0]
    assert first.offsets.dtype == np.int64 and first.offsets.size == len(first) + 1
    assert np.array_equal(np.diff(first.offsets), np.diff(data["offsets"])[: len(first)])


def test_a_budget_too_small_for_the_envelope_is_refused() -> None:
    with pytest.raises(UsageError, match="cannot carry one job"):
        cut(covid_batch(), max_message_bytes=200)


def test_size_helpers() -> None:
    data = covid_batch()
    body = wire.encode_body(data["table"])
    assert wire.encoded_size(data["table"]) == len(body)
    assert wire.estimated_batch_size(data["table"]) > 0
    assert wire.row_bytes(data["table"]).sum() == pytest.approx(data["table"].num_rows * 0.25)
    s = pa.table({"s": pa.array(["ab", None, "cde"])})
    assert wire.row_bytes(s).tolist() == [6.125, 4.125, 7.125]


def test_result_round_trip_with_values_states_and_failures() -> None:
    message = wire.decode_results(result_message())
    assert (message.worker, message.app, message.task) == ("w1", "sales", "stats")
    assert [e.state for e in message.results] == [False, True, False]
    assert message.failed[0].error == "boom" and message.failed[0].part == 1
    assert message.table.schema.names == ["store", "day", "n", "mean", "state:n", "state:total"]
    values = message.values()
    assert values.column_names == ["job_id", "part", "parts", "store", "day", "n", "mean"]
    assert values.to_pydict()["n"] == [5, 7] and values.to_pydict()["store"] == [1, 3]
    assert values.to_pydict()["mean"] == [0.5, None]
    states = message.states()
    assert states.to_pylist() == [
        {"job_id": "b" * 20, "part": 0, "parts": 2, "store": 2, "day": "y", "n": 11, "total": 2.5}
    ]


def test_results_of_whole_jobs_only_have_no_state_columns() -> None:
    payload = wire.encode_results(
        run_id="r",
        batch_id="b",
        worker="w",
        app="a",
        task="t",
        fingerprint="f",
        results=[wire.ResultEntry("a", 0, 1)],
        keys=pa.table({"k": pa.array([1])}),
        values=pa.table({"x": pa.array([2.0])}),
    )
    message = wire.decode_results(payload)
    assert message.table.schema.names == ["k", "x"]
    assert message.states().num_rows == 0 and message.values().num_rows == 1


def test_result_tables_must_match_the_entries() -> None:
    with pytest.raises(UsageError, match="rows given for"):
        wire.encode_results(
            run_id="r",
            batch_id="b",
            worker="w",
            app="a",
            task="t",
            fingerprint="f",
            results=[wire.ResultEntry("a", 0, 1)],
            keys=pa.table({"k": pa.array([1])}),
            values=pa.table({"x": pa.array([2.0, 3.0])}),
        )


# --------------------------------------------------------------------------- plain decoders


def test_plain_msgpack_and_pyarrow_read_a_job_message() -> None:
    """Another client needs only msgpack, pyarrow and docs/wire-format.md."""
    data = covid_batch()
    raw = msgpack.unpackb(one_job_message())
    assert (raw["v"], raw["kind"], raw["app"], raw["task"]) == (3, "jobs", "covid", "positive-rate")
    assert raw["key_names"] == ["country", "hour"]
    assert raw["key_types"] == ["string", "timestamp[us, tz=UTC]"]
    table = pa.ipc.open_stream(raw["body"]).read_all()
    assert table.column_names == ["positive"]
    index = pa.ipc.open_stream(raw["index"]).read_all()
    assert index.column_names == ["job_id", "part", "parts", "rows", "key:country", "key:hour"]
    start = 0
    for i, job in enumerate(index.to_pylist()):
        assert job["key:country"] == "Italy"
        assert job["key:hour"].timestamp() == int(data["hours"][i]) * 3600
        assert (job["job_id"], job["part"], job["parts"]) == (data["job_ids"][i], 0, 1)
        rows = table.slice(start, job["rows"])
        lo, hi = data["offsets"][i], data["offsets"][i + 1]
        assert rows.column("positive").to_pylist() == data["outcomes"][lo:hi].tolist()
        start += job["rows"]
    assert start == table.num_rows


def test_plain_msgpack_and_pyarrow_read_a_result_message() -> None:
    raw = msgpack.unpackb(result_message())
    assert (raw["v"], raw["kind"], raw["worker"]) == (3, "results", "w1")
    index = pa.ipc.open_stream(raw["index"]).read_all()
    assert index.column("state").to_pylist() == [False, True, False]
    assert index.column("job_id").to_pylist() == ["a" * 20, "b" * 20, "c" * 20]
    assert raw["failed"][0]["error_class"] == "RuntimeError"
    body = pa.ipc.open_stream(raw["body"]).read_all().to_pylist()
    assert body[0] == {
        "store": 1,
        "day": "x",
        "n": 5,
        "mean": 0.5,
        "state:n": None,
        "state:total": None,
    }
    assert body[1]["state:n"] == 11 and body[1]["n"] is None


def test_a_message_of_python_entries_equals_one_of_an_index() -> None:
    """Both ways of writing the entries (cold paths, the dispatcher) give the same bytes."""
    message = wire.decode_jobs(one_job_message())
    common: dict[str, Any] = {
        "run_id": message.run_id,
        "batch_id": message.batch_id,
        "app": message.app,
        "task": message.task,
        "fingerprint": message.fingerprint,
        "key_names": message.key_names,
        "key_types": message.key_types,
        "table": message.table,
    }
    from_entries = wire.encode_jobs(jobs=message.jobs, **common)
    from_index = wire.encode_jobs(jobs=message.index, **common)
    assert from_entries == from_index
    again = wire.decode_jobs(from_entries)
    assert again.jobs == message.jobs and again.keys().equals(message.keys())
    assert message.entries().to_pylist()[0] == {
        "job_id": message.jobs[0].job_id,
        "part": 0,
        "parts": 1,
        "state": False,
    }


# --------------------------------------------------------------------------- compression


def test_lz4_is_the_default_and_compresses() -> None:
    column = pa.table({"s": pa.array(["the same words again"] * 20_000)})
    lz4, zstd, plain = (wire.encode_body(column, c) for c in ("lz4", "zstd", "none"))
    assert wire.encode_body(column) == lz4
    assert b"\x04\x22\x4d\x18" in lz4  # the lz4 frame magic number
    assert b"\x28\xb5\x2f\xfd" in zstd  # the zstd frame magic number
    assert b"\x04\x22\x4d\x18" not in plain
    assert len(lz4) * 4 < len(plain) and len(zstd) * 4 < len(plain)
    for body in (lz4, zstd, plain):
        assert wire.decode_body(body).equals(column.to_batches()[0])
    # A small body is left uncompressed: a frame per buffer costs more than it saves.
    raw = msgpack.unpackb(one_job_message())
    assert raw["body"] == wire.encode_body(wire.decode_body(raw["body"]), "none")
    small = pa.table({"x": pa.array(range(100), pa.int64())})
    assert wire.encode_body(small) == wire.encode_body(small, "none")


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(UsageError, match="compression"):
        wire.encode_body(pa.table({"x": [1]}), "snappy")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- refusals


def v1_job_batch() -> bytes:
    job = Job("j" * 20, "Italy", 1583038800, 0, 1, 3, bytes([0b10100000]))
    return encode(JobBatch(V1, "r", "b", "positive-rate", [job]))


def v1_result_batch() -> bytes:
    result = JobResult("j" * 20, "Italy", 1583038800, 0, 1, 3, 2, 2 / 3, 0.2, 0.9)
    return encode(ResultBatch(V1, "r", "b", "w", [result]))


def test_v1_messages_are_refused_in_one_line() -> None:
    for payload, decode in (
        (v1_job_batch(), wire.decode_jobs),
        (v1_result_batch(), wire.decode_results),
    ):
        with pytest.raises(DecodeError, match=r"^wire format v1 message; this worker reads v3$"):
            decode(payload)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (msgpack.packb({"v": 2, "kind": "jobs"}), "wire format v2 message; this worker reads v3"),
        (msgpack.packb({"v": 4, "kind": "jobs"}), "wire format v4 message; this worker reads v3"),
        (msgpack.packb({"kind": "jobs"}), "no schema version"),
        (msgpack.packb([2, "jobs"]), "not a dispatchkit message"),
        (b"\xc1garbage", "not a dispatchkit message"),
        (b"", "not a dispatchkit message"),
        (msgpack.packb({"v": 3, "kind": "manifest"}), "'manifest' message where 'jobs'"),
        (msgpack.packb({"v": 3, "kind": "jobs", "run_id": "r"}), "not a valid v3 job message"),
    ],
)
def test_other_messages_are_refused(payload: bytes, needle: str) -> None:
    with pytest.raises(DecodeError, match=needle):
        wire.decode_jobs(payload)


def test_a_result_message_is_not_a_job_message_and_back() -> None:
    with pytest.raises(DecodeError, match="'results' message where 'jobs'"):
        wire.decode_jobs(result_message())
    with pytest.raises(DecodeError, match="'jobs' message where 'results'"):
        wire.decode_results(one_job_message())


def test_oversized_and_non_bytes_payloads_are_refused() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        wire.decode_jobs(one_job_message(), max_bytes=100)
    with pytest.raises(DecodeError, match="expected bytes"):
        wire.decode_jobs("text")  # type: ignore[arg-type]


def with_body(payload: bytes, body: bytes, **changes: Any) -> bytes:
    raw = msgpack.unpackb(payload)
    raw["body"] = body
    raw.update(changes)
    return bytes(msgpack.packb(raw))


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_every_corrupted_or_truncated_body_is_a_decode_error(compression: str) -> None:
    """Flip each byte of the body, and cut it at each length: DecodeError or a valid batch."""
    payload = one_job_message(compression)  # type: ignore[arg-type]
    body = msgpack.unpackb(payload)["body"]
    for i in range(len(body)):
        for bad in (body[:i], body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]):
            try:
                wire.decode_jobs(with_body(payload, bad))
            except DecodeError as exc:
                assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_damage_to_any_payload_is_a_decode_error(data: st.DataObject) -> None:
    payload = bytearray(data.draw(st.sampled_from([one_job_message(), result_message()])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    for decode in (wire.decode_jobs, wire.decode_results):
        with contextlib.suppress(DecodeError):
            decode(bytes(payload))


def test_bodies_that_disagree_with_the_envelope_are_refused() -> None:
    payload = one_job_message()
    raw = msgpack.unpackb(payload)
    two = pa.BufferOutputStream()
    batch = pa.record_batch({"positive": pa.array([True])})
    with pa.ipc.new_stream(two, batch.schema) as writer:
        writer.write_batch(batch)
        writer.write_batch(batch)
    none = pa.BufferOutputStream()
    with pa.ipc.new_stream(none, batch.schema):
        pass
    cases = [
        (with_body(payload, two.getvalue().to_pybytes()), "more than one record batch"),
        (with_body(payload, none.getvalue().to_pybytes()), "no record batch"),
        (with_body(payload, b""), "corrupt Arrow body"),
        (with_body(payload, raw["body"], index=index_of(raw, lambda t: t.slice(1))), "cover"),
        (with_body(payload, raw["body"], index=index_of(raw, with_rows(0))), "0 rows"),
        (with_body(payload, raw["body"], index=index_of(raw, with_part(2, 2))), "invalid part 2"),
        (with_body(payload, raw["body"], index=index_of(raw, drop_rows)), "are not"),
        (with_body(payload, raw["body"], index=b""), "corrupt Arrow index"),
        (with_body(payload, raw["body"], key_types=["string", "float"]), "unknown key type"),
        (with_body(payload, raw["body"], key_types=["string", "int64"]), "are not"),
    ]
    for bad, needle in cases:
        with pytest.raises(DecodeError, match=needle):
            wire.decode_jobs(bad)


def index_of(raw: dict[str, Any], change: Any) -> bytes:
    """A job message's index, changed by ``change`` (a table → table function)."""
    table = change(pa.ipc.open_stream(raw["index"]).read_all())
    return wire.encode_body(table, "none")


def drop_rows(t: pa.Table) -> pa.Table:
    return t.drop(["rows"])


def with_rows(n: int) -> Any:
    def change(t: pa.Table) -> pa.Table:
        rows = t.column("rows").to_pylist()
        rows[0], rows[1] = n, rows[0] + rows[1] - n
        return t.set_column(3, "rows", pa.array(rows, pa.int32()))

    return change


def with_part(part: int, parts: int) -> Any:
    def change(t: pa.Table) -> pa.Table:
        n = t.num_rows
        t = t.set_column(1, "part", pa.array([part] * n, pa.int32()))
        return t.set_column(2, "parts", pa.array([parts] * n, pa.int32()))

    return change


def test_invalid_utf8_in_a_body_is_caught_by_full_validation() -> None:
    data = pa.Array.from_buffers(
        pa.string(), 1, [None, pa.py_buffer(np.array([0, 2], np.int32)), pa.py_buffer(b"\xff\xfe")]
    )
    body = wire.encode_body(pa.record_batch({"s": data}), "none")
    with pytest.raises(DecodeError, match="corrupt Arrow body"):
        wire.decode_body(body)
    assert wire.decode_body(body, full=False).num_rows == 1


def test_covid_sizes_against_v1() -> None:
    sizes = covid_sizes()
    # Arrow's booleans are bit-packed like v1's outcomes; the schema costs a few hundred bytes.
    assert sizes["v3 jobs"] < 1.5 * sizes["v1 jobs"]


# --------------------------------------------------------------------------- measurements


def covid_sizes(jobs: int = 48, rows: int = 15) -> dict[str, int]:
    """Encoded bytes of a typical COVID job batch and its results, v1 and v3."""
    data = covid_batch(jobs, rows)
    offsets, outcomes = data["offsets"], data["outcomes"]
    v1_jobs, v1_results = [], []
    for i in range(jobs):
        bits = outcomes[offsets[i] : offsets[i + 1]]
        hour = int(data["hours"][i]) * 3600
        jid = data["job_ids"][i]
        v1_jobs.append(Job(jid, "Italy", hour, 0, 1, bits.size, np.packbits(bits).tobytes()))
        pos = int(bits.sum())
        v1_results.append(
            JobResult(jid, "Italy", hour, 0, 1, bits.size, pos, pos / bits.size, 0.1, 0.9)
        )
    v1j = len(encode(JobBatch(V1, "run-1", "b" * 22, "positive-rate", v1_jobs)))
    v1r = len(encode(ResultBatch(V1, "run-1", "b" * 22, "worker-1", v1_results)))
    out = {"v1 jobs": v1j, "v1 results": v1r}
    for compression in ("lz4", "none"):
        (v2j,) = cut(data, compression=compression)
        tests = np.diff(offsets)
        positives = np.add.reduceat(outcomes.astype(np.int64), offsets[:-1])
        values = pa.table(
            {
                "tests": tests,
                "positives": positives,
                "positive_rate": positives / tests,
                "ci_low": np.full(jobs, 0.1),
                "ci_high": np.full(jobs, 0.9),
            }
        )
        v2r = wire.encode_results(
            run_id="run-1",
            batch_id="b" * 22,
            worker="worker-1",
            app="covid",
            task="positive-rate",
            fingerprint="1:0123456789abcdef",
            results=[wire.ResultEntry(j, 0, 1) for j in data["job_ids"]],
            keys=data["keys"],
            values=values,
            compression=compression,  # type: ignore[arg-type]
        )
        out[f"v3 jobs ({compression})"] = len(v2j)
        out[f"v3 results ({compression})"] = len(v2r)
    out["v3 jobs"] = out["v3 jobs (lz4)"]
    return out


def benchmark(rows: int = 1_000_000, jobs: int = 100_000, repeat: int = 3) -> dict[str, float]:
    """Print encode/decode throughput of ``rows`` rows in ``jobs`` jobs (not a test)."""
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, rows), jobs - 1, replace=False))
    offsets = np.concatenate(([0], cuts, [rows])).astype(np.int64)
    table = pa.table(
        {
            "amount": pa.array(np.round(rng.random(rows) * 100, 2)),
            "ok": pa.array(rng.random(rows) < 0.1),
            "ts": pa.array(rng.integers(0, 10**15, rows), pa.int64()).cast(UTC_US),
        }
    )
    keys = pa.table(
        {
            "store": pa.array(np.arange(jobs) // 24, pa.int64()),
            "hour": pa.array((np.arange(jobs) % 24) * HOUR_US, pa.int64()).cast(UTC_US),
        }
    )
    ids = [f"{i:020x}" for i in range(jobs)]
    out: dict[str, float] = {}
    for compression in ("lz4", "zstd", "none"):
        best_enc = best_dec = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            messages = wire.cut_jobs(
                table,
                offsets,
                job_ids=ids,
                keys=keys,
                run_id="run-1",
                app="bench",
                task="t",
                fingerprint="f",
                compression=compression,  # type: ignore[arg-type]
            )
            t1 = time.perf_counter()
            total = 0
            for payload in messages:
                message = wire.decode_jobs(payload)
                total += int(pc.sum(message.table.column("ok")).as_py() or 0)
            t2 = time.perf_counter()
            best_enc, best_dec = min(best_enc, t1 - t0), min(best_dec, t2 - t1)
        size = sum(len(m) for m in messages)
        print(
            f"{compression:>4}: {len(messages)} messages, {size / 1e6:.1f} MB; "
            f"cut+encode {rows / best_enc / 1e6:.2f} M rows/s "
            f"({jobs / best_enc / 1e3:.0f} k jobs/s), "
            f"decode {rows / best_dec / 1e6:.2f} M rows/s ({jobs / best_dec / 1e3:.0f} k jobs/s)"
        )
        out[f"{compression} encode rows/s"] = rows / best_enc
        out[f"{compression} decode rows/s"] = rows / best_dec
    return out


def test_the_benchmark_runs() -> None:
    assert benchmark(rows=20_000, jobs=2_000, repeat=1)["lz4 decode rows/s"] > 0


if __name__ == "__main__":
    for name, value in covid_sizes().items():
        print(f"{name}: {value} bytes")
    benchmark()
