"""Arrow arrays built from buffers: the same arrays as pyarrow's, and no pandas import."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatchkit import arrays
from dispatchkit.dispatcher import Dispatcher

CASES = [
    ([1, -2, 3], pa.int64()),
    ([1, 2], pa.int32()),
    ([1.5, float("nan"), -0.0], pa.float64()),
    ([True, False, True, True, False, False, True, False, True], pa.bool_()),
    (["a", "", "é", "🙂"], pa.string()),
    ([], pa.string()),
    ([], pa.int64()),
    ([1, None, 3], pa.int64()),
    (["x", None], pa.string()),
]


@pytest.mark.parametrize(("values", "type_"), CASES)
def test_array_is_what_pyarrow_builds(values: list[object], type_: pa.DataType) -> None:
    got = arrays.array(values, type_)
    got.validate(full=True)
    assert got.type == type_
    assert got.to_pylist() == pa.array(values, type_).to_pylist() or (
        type_ == pa.float64() and str(got) == str(pa.array(values, type_))  # NaN != NaN
    )


@given(st.lists(st.text(), max_size=40))
def test_strings_ascii_or_not_are_what_pyarrow_builds(values: list[str]) -> None:
    got = arrays.strings(values)
    got.validate(full=True)
    assert got.equals(pa.array(values, pa.string()))


@given(
    st.one_of(
        st.tuples(st.text(max_size=12), st.just(pa.string())),
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.just(pa.int64())),
        st.tuples(st.integers(-(2**31), 2**31 - 1), st.just(pa.int32())),
        st.tuples(st.floats(allow_nan=False), st.just(pa.float64())),
        st.tuples(st.booleans(), st.just(pa.bool_())),
        st.tuples(st.integers(0, 2**50), st.just(pa.timestamp("us", tz="UTC"))),
    ),
    st.integers(0, 70),
)
def test_repeat_is_n_copies(value_type: tuple[object, pa.DataType], n: int) -> None:
    value, type_ = value_type
    got = arrays.repeat(value, n, type_)
    got.validate(full=True)
    storage = pa.int64() if pa.types.is_timestamp(type_) else type_
    assert got.equals(pa.array([value] * n, storage).cast(type_))


def test_timestamps_are_given_as_their_storage() -> None:
    t = pa.timestamp("us", tz="UTC")
    got = arrays.array([0, 3_600_000_000], t)
    assert got.to_pylist() == [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1970, 1, 1, 1, tzinfo=UTC),
    ]


def test_from_numpy_and_back() -> None:
    for values in (np.arange(5, dtype=np.int64), np.array([0.5, 2.0]), np.array([True, False])):
        got = arrays.from_numpy(values)
        assert got.to_pylist() == values.tolist()
        assert arrays.to_numpy(got).tolist() == values.tolist()
    sliced = arrays.array(list(range(10)), pa.int32()).slice(3, 4)
    assert arrays.to_numpy(sliced).tolist() == [3, 4, 5, 6]
    bits = arrays.array([i % 3 == 0 for i in range(20)], pa.bool_()).slice(5, 9)
    assert arrays.to_numpy(bits).tolist() == bits.to_pylist()
    chunked = pa.chunked_array([sliced, sliced])
    assert arrays.to_numpy(chunked).tolist() == [3, 4, 5, 6] * 2
    with_nulls = pa.array([1, None], pa.int64())  # falls back to pyarrow
    assert np.isnan(arrays.to_numpy(with_nulls)[1])


@given(
    st.lists(st.none() | st.text(max_size=8), max_size=30),
    st.sampled_from([pa.string(), pa.binary(), pa.large_string(), pa.large_binary()]),
    st.integers(0, 30),
    st.integers(0, 30),
    st.integers(1, 3),
)
def test_byte_lengths_are_pyarrows_with_zero_for_null(
    values: list[str | None], type_: pa.DataType, start: int, length: int, chunks: int
) -> None:
    import pyarrow.compute as pc

    raw = [
        v
        if v is None or pa.types.is_unicode(type_) or pa.types.is_large_unicode(type_)
        else v.encode()
        for v in values
    ]
    column = pa.array(raw, type_).slice(start, length)
    reference = pc.fill_null(pc.binary_length(column), 0).to_pylist()
    assert arrays.byte_lengths(column).tolist() == reference
    chunked = pa.chunked_array([column] * chunks, type_)
    assert arrays.byte_lengths(chunked).tolist() == reference * chunks


def test_empty_tables_and_batches_keep_the_schema() -> None:
    schema = pa.schema([("a", pa.string()), ("b", pa.int64())])
    assert arrays.empty_table(schema).schema == schema
    assert arrays.empty_batch(schema).schema == schema
    assert arrays.empty_batch(schema).num_rows == 0


WORKER = """
import sys
from pathlib import Path
from dispatchkit.app import load_app
from dispatchkit.worker import Worker
handled = Worker("w", app=load_app(None)).handle(Path(sys.argv[1]).read_bytes())
assert handled.jobs == 1, handled
print(sorted(m for m in ("pandas", "pyarrow.compute") if m in sys.modules))
"""


class _Rows:
    def sorted_valid(self, columns: object) -> list[pa.RecordBatch]:
        n = 6
        hour = pa.array([1583038800 * 10**6] * n, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        return [
            pa.RecordBatch.from_arrays(
                [
                    pa.array([0] * n, pa.int32()),
                    pa.array(["Chile"] * 3 + ["Italy"] * 3),
                    hour,
                    pa.array([True, False] * 3),
                ],
                names=["bucket", "country", "date_hour", "result"],
            )
        ]


def test_a_worker_imports_neither_pandas_nor_pyarrow_compute(tmp_path: Path) -> None:
    """pyarrow imports pandas on a first pa.array or to_numpy (0.3-0.8 s a process), and
    pyarrow.compute takes 0.15-0.3 s: a worker running a vectorized task needs neither."""
    from dispatchkit.apps.covid import app

    message = next(iter(Dispatcher(_Rows(), app=app, task="positive-rate", run_id="r").messages()))
    path = tmp_path / "message"
    path.write_bytes(message.payload)
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


RUN = """
import sys
from dispatchkit.cli import main
try:
    rc = main(["run", sys.argv[1], "--out", sys.argv[2], "-q", "--workers", "1"])
except SystemExit as exc:
    rc = exc.code
print(rc, sorted(m for m in ("pandas",) if m in sys.modules))
"""


def test_a_whole_run_imports_no_pandas_in_its_main_process(
    small_parquet: Path, tmp_path: Path
) -> None:
    """Reading, cutting, storing and exporting a run: pandas (installed here, with the
    benchmark's extra) is never imported by the dispatcher and collector's process."""
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(small_parquet), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout
