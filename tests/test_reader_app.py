"""The reader driven by an app that is not the COVID one, against plain Python.

The app here has two Int columns, a Float with a min, a Text with allowed values, an
optional Bool and a Timestamp floored to the day in a two-column key. Every expectation
(the rule a row fails, the counts, the largest job, the buckets, the values) is computed
in Python from the rows as written, never by the SQL under test.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dispatchkit as dk
import dispatchkit.reader as reader_module
from dispatchkit.errors import BadRowError, InputError, UsageError
from dispatchkit.reader import NBUCKETS, InputReader, bucket_count, key_bucket

from .conftest import iso_to_ns, sorted_rows

app = dk.App("shop-test", version="1")
app.columns(
    store=dk.Int(min=0),
    seq=dk.Int(),
    ts=dk.Timestamp(),
    amount=dk.Float(min=0.0),
    channel=dk.Text(allowed=("web", "shop"), lower=True),
    returned=dk.Bool(required=False),
)
app.key("store", dk.floor("ts", "day", name="day"))

NS_PER_DAY = 86_400 * 10**9
T0 = iso_to_ns("1969-12-28T00:00:00Z")  # days on both sides of 1970
TRUE = ("true", "t", "yes", "y", "1")
FALSE = ("false", "f", "no", "n", "0")

Row = dict[str, Any]


def make_rows(n: int = 3_000, seed: int = 5) -> list[Row]:
    """Rows as Python values (None = null); a few of them break one rule each."""
    rng = random.Random(seed)
    rows: list[Row] = []
    for i in range(n):
        store = rng.choice([0, 1, 2, 3, 7, 12])
        if i % 7 == 0:
            store = 999  # a hot store: one day of it is the largest job
        ts = T0 + rng.randrange(0, 9 * NS_PER_DAY)
        if store == 999:
            ts = T0 + 5 * NS_PER_DAY + rng.randrange(0, NS_PER_DAY)
        row: Row = {
            "store": store,
            "seq": i,
            "ts": ts,
            "amount": round(rng.uniform(0, 500), 2),
            "channel": rng.choice(["web", "shop", " Web ", "SHOP"]),
            "returned": rng.choice([True, False, None]),
        }
        defect = rng.random()
        if defect < 0.12:
            column, value = rng.choice(
                [
                    ("store", None),
                    ("store", -3),
                    ("seq", None),
                    ("ts", None),
                    ("amount", None),
                    ("amount", -0.5),
                    ("amount", math.nan),
                    ("channel", None),
                    ("channel", "  "),
                    ("channel", "phone"),
                ]
            )
            row[column] = value
        rows.append(row)
    rows[1]["amount"] = 0.0  # min is inclusive
    rows[2]["ts"] = T0 + 4 * NS_PER_DAY - 1  # 1 ns before midnight: the day before
    rows[3]["ts"] = iso_to_ns("1970-01-01T00:00:00Z") - 1  # 1969-12-31
    return rows


def write_parquet(rows: list[Row], path: Path) -> Path:
    table = pa.table(
        {
            "note": ["ignored"] * len(rows),  # an undeclared column
            **{c: [r[c] for r in rows] for c in ("store", "seq", "amount", "channel")},
            "ts": pa.array([r["ts"] for r in rows], pa.int64()).cast(pa.timestamp("ns", "UTC")),
            "returned": pa.array([r["returned"] for r in rows], pa.bool_()),
        }
    )
    pq.write_table(table, path)
    return path


def iso(ns: int) -> str:
    """ISO 8601 with nine fractional digits (the reader keeps six, floored)."""
    secs, frac = divmod(ns, 10**9)
    return f"{datetime(1970, 1, 1) + timedelta(seconds=secs):%Y-%m-%dT%H:%M:%S}.{frac:09d}Z"


def csv_rows(rows: list[Row]) -> list[dict[str, str | None]]:
    """The rows as CSV text; some get text defects a typed column cannot have."""
    out: list[dict[str, str | None]] = []
    for i, r in enumerate(rows):
        text: dict[str, str | None] = {
            "store": None if r["store"] is None else str(r["store"]),
            "seq": None if r["seq"] is None else str(r["seq"]),
            "ts": None if r["ts"] is None else iso(r["ts"]),
            "amount": None if r["amount"] is None else repr(r["amount"]),
            "channel": r["channel"],
            "returned": None if r["returned"] is None else ("yes" if r["returned"] else "0"),
        }
        if i % 151 == 7:
            text["store"] = "3.5"
        elif i % 151 == 20:
            text["ts"] = "yesterday"
        elif i % 151 == 33:
            text["amount"] = "12 euros"
        elif i % 151 == 46:
            text["returned"] = "maybe"
        elif i % 151 == 59:
            text["store"] = " +4 "  # trimmed: a valid integer
        out.append(text)
    return out


def write_csv(rows: list[dict[str, str | None]], path: Path) -> Path:
    def field(v: str | None) -> str:
        if v is None:
            return ""
        return '"' + v.replace('"', '""') + '"' if (v == "" or v != v.strip()) else v

    cols = ("seq", "store", "ts", "amount", "channel", "returned")
    lines = ["note, " + ",".join(cols)]  # header spaces are trimmed
    lines += ["x," + ",".join(field(r[c]) for c in cols) for r in rows]
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the reference --------------------------------------------------------------------

_INT = re.compile(r"[+-]?[0-9]+")


def check(row: Row, text: bool) -> tuple[str | None, Row]:
    """The code of the first rule ``row`` fails (or None) and its normalized values."""
    v: Row = {}
    for c in ("store", "seq"):
        raw = row[c]
        if raw is None:
            return f"{c}_missing", v
        if text:
            if not _INT.fullmatch(raw.strip()):
                return f"{c}_unparseable", v
            raw = int(raw.strip())
        if c == "store" and raw < 0:
            return "store_out_of_range", v
        v[c] = raw
    if row["ts"] is None:
        return "ts_missing", v
    if text:
        try:
            v["ts"] = iso_to_ns(row["ts"]) // 1000 * 1000  # text is read to the µs
        except ValueError:
            return "ts_unparseable", v
    else:
        v["ts"] = row["ts"]
    amount = row["amount"]
    if amount is None:
        return "amount_missing", v
    if text:
        try:
            amount = float(amount)
        except ValueError:
            return "amount_unparseable", v
    if not math.isfinite(amount):
        return "amount_invalid", v
    if amount < 0:
        return "amount_out_of_range", v
    v["amount"] = amount
    channel = row["channel"]
    if channel is None:
        return "channel_missing", v
    channel = channel.strip().lower()
    if channel == "":
        return "channel_empty", v
    if channel not in ("web", "shop"):
        return "channel_not_allowed", v
    v["channel"] = channel
    returned = row["returned"]
    if text and returned is not None:
        spelled = returned.strip().lower()
        if spelled not in TRUE + FALSE:
            return "returned_invalid", v
        returned = spelled in TRUE
    v["returned"] = returned
    v["day"] = v["ts"] // NS_PER_DAY * NS_PER_DAY // 1000  # epoch µs, floored
    return None, v


def reference(rows: list[Any], text: bool) -> tuple[list[tuple[int, str]], list[Row]]:
    """(row number, code) of every bad row, and the valid rows' values."""
    bad, good = [], []
    for i, row in enumerate(rows, start=1):
        code, values = check(row, text)
        if code is None:
            good.append(values)
        else:
            bad.append((i, code))
    return bad, good


def md5_bucket(store: int, day_us: int, buckets: int = NBUCKETS) -> int:
    digest = hashlib.md5(f"{store}\x1f{day_us}".encode()).digest()
    return int.from_bytes(digest, "little") % buckets


def md5_order(store: int, day_us: int, buckets: int) -> int:
    """Where a key's rows come in the reader's order: its bucket, then ``h >> 8``."""
    h = int.from_bytes(hashlib.md5(f"{store}\x1f{day_us}".encode()).digest()[:8], "little")
    return (h % buckets) << 56 | h >> 8


def row_bytes(v: Row) -> int:
    """The reader's estimate of a valid row's default read columns (all but store)."""
    return 8 + 8 + 8 + (len(v["channel"].encode()) + 4) + 1  # seq, ts, amount, channel, returned


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def day_of(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Any], bool]]:
    d = tmp_path_factory.mktemp("shop")
    rows = make_rows()
    text = csv_rows(rows)
    return {
        "parquet": (write_parquet(rows, d / "shop.parquet"), rows, False),
        "csv": (write_csv(text, d / "shop.csv"), text, True),
    }


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_rules_counts_and_quarantine_match_python(
    inputs: dict[str, tuple[Path, list[Any], bool]], tmp_path: Path, fmt: str
) -> None:
    path, rows, text = inputs[fmt]
    bad, good = reference(rows, text)
    assert len(bad) > 100 and len(good) > 2_000
    if text:
        assert {c for _, c in bad} >= {
            "store_unparseable",
            "ts_unparseable",
            "amount_unparseable",
            "returned_invalid",
        }
    with InputReader([path], app, work_dir=tmp_path / "w") as reader:
        counts = reader.counts()
        reader.write_quarantine(tmp_path / "out")
        reasons = reader.reasons
    assert counts.rows_read == len(rows) == counts.rows_valid + counts.rows_bad
    assert counts.rows_valid == len(good)
    assert counts.bad == dict(Counter(c for _, c in bad))

    jobs: dict[tuple[int, int], list[int]] = {}
    for v in good:
        j = jobs.setdefault((v["store"], v["day"]), [0, 0])
        j[0] += 1
        j[1] += row_bytes(v)
    assert counts.jobs == len(jobs)
    (store, day), (n, size) = min(jobs.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))
    assert store == 999
    assert counts.largest_job == ({"store": 999, "day": day_of(day)}, n, size)

    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert q.columns == ["file", "row", "field", "reason", *app.input_columns]
    assert q.select("row").to_series().to_list() == [r for r, _ in bad]
    assert set(q["file"]) == {str(path)}
    want_reason = [reasons[c][1] for _, c in bad]
    assert q["reason"].to_list() == want_reason
    assert q["field"].to_list() == [reasons[c][0] for _, c in bad]
    assert all(dt == pl.String for dt in q.select(*app.input_columns).dtypes)
    assert reasons["store_out_of_range"] == ("store", "store is below 0")
    assert reasons["channel_not_allowed"] == ("channel", "channel is not one of web, shop")
    assert reasons["amount_invalid"] == ("amount", "amount is not a finite number")
    assert pl.read_csv(tmp_path / "out" / "quarantine.csv", infer_schema=False).height == q.height
    if text:  # the raw text as written, untrimmed
        by_row = dict(zip(q["row"], q["store"], strict=True))
        assert by_row[8] == "3.5"


def test_largest_job_over_the_read_columns(
    inputs: dict[str, tuple[Path, list[Any], bool]], tmp_path: Path
) -> None:
    path, rows, _ = inputs["parquet"]
    _, good = reference(rows, False)
    jobs = Counter((v["store"], v["day"]) for v in good)
    (store, day), n = min(jobs.items(), key=lambda kv: (-kv[1], kv[0]))
    with InputReader([path], app, work_dir=tmp_path / "w") as reader:
        assert reader.counts(("amount",)).largest_job == (
            {"store": store, "day": day_of(day)},
            n,
            8 * n,
        )
        # A key column asked for is a key column: it adds nothing to the estimate.
        assert (
            reader.counts(("store", "amount")).largest_job == reader.counts(("amount",)).largest_job
        )
        assert reader.counts(()).largest_job is not None
        with pytest.raises(UsageError, match="no column 'price'"):
            reader.counts(("price",))


def test_sorted_rows_are_typed_bucketed_and_contiguous(
    inputs: dict[str, tuple[Path, list[Any], bool]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small buckets, so that this small input has more than one.
    monkeypatch.setattr(reader_module, "JOBS_PER_BUCKET", 32)
    frames = {}
    for fmt, (path, rows, text) in inputs.items():
        _, good = reference(rows, text)
        with InputReader([path], app, work_dir=tmp_path / fmt) as reader:
            schema = reader.batch_schema()
            assert schema.names == [
                *("bucket", "store", "day"),
                *("seq", "ts", "amount", "channel", "returned"),
            ]
            assert schema.types == [
                pa.int32(),
                pa.int64(),
                pa.timestamp("us", tz="UTC"),
                pa.int64(),
                pa.timestamp("ns", tz="UTC"),
                pa.float64(),
                pa.string(),
                pa.bool_(),
            ]
            frame = sorted_rows(reader, tuple(app.input_columns))  # sorted, jobs contiguous
            spec = reader.keyspec
            nb = reader.buckets
            assert nb == bucket_count(len({(v["store"], v["day"]) for v in good}))
        assert frame.columns == schema.names  # store (a key) is not repeated
        got = frame.with_columns(
            pl.col("day").dt.epoch("us"), pl.col("ts").cast(pl.Int64)
        ).to_dicts()
        want = sorted(
            good,
            key=lambda v: (md5_order(v["store"], v["day"], nb), v["seq"]),
        )
        # Within a job the rows keep the input order (seq rises with the row number).
        assert [r["seq"] for r in got] == [v["seq"] for v in want]
        for r, v in zip(got, want, strict=True):
            assert r["bucket"] == md5_bucket(v["store"], v["day"], nb)
            key = {"store": v["store"], "day": day_of(v["day"])}
            assert key_bucket(spec, key, nb) == r["bucket"]
            assert {k: r[k] for k in v} == v
        frames[fmt] = frame
    # The same keys get the same buckets from another reader on another file.
    a, b = (
        f.select("store", "day", "bucket").unique().sort("store", "day") for f in frames.values()
    )
    shared = a.join(b, on=["store", "day"], suffix="_b")
    assert shared.height > 40
    assert shared["bucket"].equals(shared["bucket_b"], check_names=False)
    # About 32 jobs a bucket (as patched): this input's ~60 jobs use both of its 2 buckets.
    assert frames["parquet"]["bucket"].n_unique() == 2


def test_requested_columns_only(
    inputs: dict[str, tuple[Path, list[Any], bool]], tmp_path: Path
) -> None:
    path, _, _ = inputs["parquet"]
    with InputReader([path], app, work_dir=tmp_path / "w") as reader:
        batches = list(reader.sorted_valid(["amount"], rows_per_batch=500))
        assert len(batches) > 1
        assert all(b.schema.names == ["bucket", "store", "day", "amount"] for b in batches)
        assert sum(b.num_rows for b in batches) == reader.counts().rows_valid
        with pytest.raises(UsageError, match="no column 'nope'"):
            list(reader.sorted_valid(["nope"]))


def test_strict_names_the_first_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "store,seq,ts,amount,channel,returned\n"
        "1,1,2020-01-01T00:00:00Z,3.5,web,\n"
        "1,2,2020-01-01T00:00:00Z,3.5,fax,\n"
        "-1,3,2020-01-01T00:00:00Z,3.5,web,\n"
    )
    with (
        InputReader([path], app, strict=True, work_dir=tmp_path / "w") as reader,
        pytest.raises(BadRowError) as err,
    ):
        reader.counts()
    assert str(err.value) == (
        f"{path}: row 2: channel is not one of web, shop (value 'fax'); --strict stops here"
    )


def test_refusals_name_the_file_column_and_types(tmp_path: Path) -> None:
    rows = make_rows(20)
    a = write_parquet(rows, tmp_path / "a.parquet")
    b = tmp_path / "b.parquet"
    table = pq.read_table(a)
    pq.write_table(table.set_column(1, "store", table["store"].cast(pa.float64())), b)
    with pytest.raises(InputError) as err:
        InputReader([a, b], app, work_dir=tmp_path / "w")
    assert str(err.value) == (
        f"{b}: column store has type double, but int64 in {a}; "
        "every input file must give it the same kind of type"
    )
    with pytest.raises(InputError) as err:
        InputReader([b], app, work_dir=tmp_path / "w")
    assert str(err.value) == (
        f"{b}: column store has type double; expected an integer or integer text"
    )
    c = tmp_path / "c.parquet"
    pq.write_table(table.drop_columns(["amount"]), c)
    with pytest.raises(InputError, match=r"c.parquet: missing column\(s\) amount \(found: note,"):
        InputReader([c], app, work_dir=tmp_path / "w")
    with pytest.raises(UsageError, match="no Timestamp column with run_range=True"):
        InputReader([a], app, start=datetime(2020, 1, 1, tzinfo=UTC), work_dir=tmp_path / "w")
    assert list((tmp_path / "w").iterdir()) == []  # every refused reader cleaned up


def test_two_parquet_groups_keep_exact_time(tmp_path: Path) -> None:
    """Files with ts in µs and in ns are two scans: no ns is rounded to a µs."""
    rows = [r for r in make_rows(400) if check(r, False)[0] is None]
    ns_file = write_parquet(rows, tmp_path / "a.parquet")
    us_rows = [{**r, "ts": r["ts"] // 1000 * 1000} for r in rows]
    t = pq.read_table(write_parquet(us_rows, tmp_path / "b.parquet"))
    i = t.schema.get_field_index("ts")
    pq.write_table(t.set_column(i, "ts", t["ts"].cast(pa.timestamp("us"))), tmp_path / "b.parquet")
    with InputReader([ns_file, tmp_path / "b.parquet"], app, work_dir=tmp_path / "w") as reader:
        frame = sorted_rows(reader, ("ts",))
    got = sorted(frame["ts"].cast(pl.Int64).to_list())
    assert got == sorted([r["ts"] for r in rows] + [r["ts"] for r in us_rows])
    assert any(r["ts"] % 1000 for r in rows)  # nanoseconds were there to lose


def test_columns_named_like_the_sort_helpers_are_read(tmp_path: Path) -> None:
    """Columns called k0, fid or h do not clash with the sort's own columns."""
    named = dk.App("helpers", version="1")
    named.columns(k0=dk.Text(), fid=dk.Int(), h=dk.Int())
    named.key("k0")
    path = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"k0": ["b", "a", "b", "a"], "fid": [1, 2, 3, 4], "h": [10, 20, 30, 40]}),
        path,
    )
    with InputReader([path], named, work_dir=tmp_path) as reader:
        frame = sorted_rows(reader, ("fid", "h"))
    by_key = {k: frame.filter(pl.col("k0") == k)["fid"].to_list() for k in ("a", "b")}
    assert by_key == {"a": [2, 4], "b": [1, 3]}
    assert frame["h"].to_list() == [f * 10 for f in frame["fid"].to_list()]
