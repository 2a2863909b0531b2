"""Inputs are resolved once and read exactly, or refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dispatchkit.apps.covid import app as covid
from dispatchkit.apps.covid.schema import DEFAULT_END, DEFAULT_START
from dispatchkit.errors import InputError
from dispatchkit.reader import InputReader, resolve_inputs

from .conftest import covid_jobs, reference, sorted_rows

HEADER = "country,test_datetime,result\n"


def rows(country: str, n: int, hour: int = 5) -> str:
    return "".join(
        f"{country},2020-03-01T{hour:02d}:{i % 60:02d}:00Z,{'positive' if i % 3 else 'negative'}\n"
        for i in range(n)
    )


def parquet(path: Path, country: str | list[object], n: int = 3, **types: pa.DataType) -> Path:
    countries = country if isinstance(country, list) else [country] * n
    n = len(countries)
    ts = types.get("ts_type", pa.timestamp("ms", "UTC"))
    table = pa.table(
        {
            "country": pa.array(countries, types.get("country_type")),
            "test_datetime": pa.array(
                [
                    (1583038800 + i) * {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[ts.unit]
                    for i in range(n)
                ],
                pa.int64(),
            ).cast(ts),
            "result": pa.array(["positive"] * n, types.get("result_type")),
        }
    )
    pq.write_table(table, path)
    return path


def counted(paths: list[Path], tmp_path: Path) -> tuple[int, list[str]]:
    """Rows read and the countries of the valid rows."""
    with InputReader(
        paths, covid, start=DEFAULT_START, end=DEFAULT_END, spill_dir=tmp_path / "spill"
    ) as reader:
        counts = reader.counts()
        countries = sorted(sorted_rows(reader)["country"].unique())
        return counts.rows_read, countries


def one_line(source: str | Path, tmp_path: Path, needle: str) -> str:
    """The input is refused with one line (what the CLI prints) holding ``needle``."""
    with pytest.raises(InputError) as err:
        InputReader(resolve_inputs(source), covid, work_dir=tmp_path / "w")
    line = str(err.value)
    assert len(line.splitlines()) == 1, line
    assert needle in line, line
    return line


# -- resolution ------------------------------------------------------------------------


def test_an_existing_name_with_glob_characters_is_taken_literally(tmp_path: Path) -> None:
    lit = parquet(tmp_path / "data[1].parquet", "Literal")
    parquet(tmp_path / "data1.parquet", "Globbed")
    assert resolve_inputs(str(lit)) == [lit]
    assert counted([lit], tmp_path) == (3, ["Literal"])  # DuckDB must not re-glob it

    star = tmp_path / "csv" / "a*b.csv"
    star.parent.mkdir()
    star.write_text(HEADER + rows("Star", 4))
    (tmp_path / "csv" / "axxb.csv").write_text(HEADER + rows("Other", 2))
    assert resolve_inputs(str(star)) == [star]
    both = resolve_inputs(tmp_path / "csv")
    assert [p.name for p in both] == ["a*b.csv", "axxb.csv"]
    assert counted(both, tmp_path) == (6, ["Other", "Star"])
    # A pattern is still a pattern when no such file exists.
    assert [p.name for p in resolve_inputs(str(tmp_path / "data?.parquet"))] == ["data1.parquet"]


def test_output_directory_with_glob_characters(tmp_path: Path) -> None:
    """The staging copies live under ``--out``; its name must not be re-globbed either."""
    src = tmp_path / "in.csv"
    src.write_text(HEADER + rows("Italy", 30))
    out = tmp_path / "out[1]*"
    (tmp_path / "out1x").mkdir()  # what the unescaped pattern would match
    jobs, counts = covid_jobs([src], out / ".spill", out=out)
    assert counts.rows_valid == 30
    assert jobs.equals(reference(src))
    assert pl.read_parquet(out / "quarantine.parquet", glob=False).is_empty()


def test_links_and_loops_read_each_real_file_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub" / "deep").mkdir(parents=True)
    a = parquet(root / "a.parquet", "A")
    parquet(root / "sub" / "b.parquet", "B")
    parquet(root / "sub" / "deep" / "c.parquet", "C")
    os.symlink("..", root / "sub" / "up")  # a link to an ancestor: would loop
    os.symlink(".", root / "self")
    os.symlink("sub", root / "alias")  # the same directory twice
    os.symlink("a.parquet", root / "a-link.parquet")  # the same file twice
    os.link(a, root / "a-hard.parquet")
    (root / ".hidden").mkdir()
    parquet(root / ".hidden" / "h.parquet", "Hidden")
    parquet(root / ".h.parquet", "Hidden")

    for source in (root, f"{root}/**/*.parquet", f"{root}/**", f"{root}/*/*.parquet"):
        paths = resolve_inputs(source)
        real = [os.path.realpath(p) for p in paths]
        assert len(real) == len(set(real)), (source, paths)
        assert paths == sorted(paths)
        n, countries = counted(paths, tmp_path)
        # */*.parquet reaches a.parquet through the link "self", as a shell would.
        want = {"A", "B", "C"} if source != f"{root}/*/*.parquet" else {"A", "B"}
        assert set(countries) == want and n == 3 * len(want), (source, paths)


def test_unreadable_subdirectory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d" / "locked").mkdir(parents=True)
    parquet(tmp_path / "d" / "a.parquet", "A")
    (tmp_path / "d" / "locked").chmod(0)
    if os.geteuid() == 0:  # root reads everything: the kernel's refusal, as a user gets it
        real_scandir = os.scandir
        locked = str(tmp_path / "d" / "locked")

        def scandir(path: object = ".") -> object:
            if os.fspath(path) == locked:  # type: ignore[arg-type]
                raise PermissionError(13, "Permission denied", locked)
            return real_scandir(path)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        with pytest.raises(InputError, match="cannot list directory"):
            resolve_inputs(tmp_path / "d")
    finally:
        (tmp_path / "d" / "locked").chmod(0o755)


# -- CSV headers and several CSV files ---------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [" country , test_datetime ,result \n", "\ufeffcountry,test_datetime,result\n"],
    ids=["spaces", "bom"],
)
def test_csv_header_is_normalized(tmp_path: Path, header: str) -> None:
    path = tmp_path / "h.csv"
    path.write_text(header + rows("Italy", 20), encoding="utf-8")
    clean = tmp_path / "clean.csv"
    clean.write_text(HEADER + rows("Italy", 20))
    jobs, counts = covid_jobs([path], tmp_path / "w")
    assert counts.rows_valid == 20
    assert jobs.equals(reference(clean))


def test_csv_header_case_is_kept_but_named(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("Country,test_datetime,result\n" + rows("Italy", 2))
    one_line(path, tmp_path, "names are case-sensitive")


def test_csv_duplicate_column_after_normalizing(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("country, country,test_datetime,result\nA,B,2020-03-01T05:00:00Z,pos\n")
    one_line(path, tmp_path, "appears more than once")


def test_three_csv_files_with_row_numbers_per_file(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "1.csv").write_text(HEADER + rows("Italy", 50))
    (d / "2.csv").write_text(
        HEADER
        + rows("Spain", 10)
        + "Spain,yesterday,positive\n"  # row 11
        + ",2020-03-01T05:00:00Z,positive\n"  # row 12
        + rows("Spain", 5)
        + "Spain,2020-03-01T05:00:00Z,maybe\n"  # row 18
    )
    (d / "3.csv").write_text(HEADER + rows("Chile", 7, hour=9))
    clean = tmp_path / "clean.csv"
    clean.write_text(HEADER + rows("Italy", 50) + rows("Spain", 10) + rows("Spain", 5))
    clean.write_text(clean.read_text() + rows("Chile", 7, hour=9))

    for source in (str(d), f"{d}/*.csv"):
        out = tmp_path / ("o-dir" if source == str(d) else "o-glob")
        jobs, counts = covid_jobs(resolve_inputs(source), out / ".spill", out=out)
        assert counts.rows_read == 50 + 18 + 7 == counts.rows_valid + counts.rows_bad
        assert jobs.equals(reference(clean))
        q = pl.read_parquet(out / "quarantine.parquet")
        assert q.select("file", "row").rows() == [(str(d / "2.csv"), r) for r in (11, 12, 18)]


# -- schemas per file ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "other", "needle"),
    [
        ("country", pa.int64(), "column country has type int64, but string in"),
        ("test_datetime", pa.string(), "column test_datetime has type string, but timestamp"),
        ("result", pa.bool_(), "column result has type bool, but string in"),
    ],
)
def test_files_disagreeing_on_a_column_type_are_refused(
    tmp_path: Path, column: str, other: pa.DataType, needle: str
) -> None:
    parquet(tmp_path / "a.parquet", "Italy")
    if column == "country":
        parquet(tmp_path / "b.parquet", [1, 2, 3], country_type=other)
    elif column == "result":
        b = tmp_path / "b.parquet"
        pq.write_table(
            pa.table(
                {
                    "country": ["Italy"],
                    "test_datetime": pa.array([1583038800_000], pa.timestamp("ms", "UTC")),
                    "result": [True],
                }
            ),
            b,
        )
    else:
        pq.write_table(
            pa.table(
                {"country": ["Italy"], "test_datetime": ["2020-03-01T05:00:00Z"], "result": ["p"]}
            ),
            tmp_path / "b.parquet",
        )
    line = one_line(f"{tmp_path}/*.parquet", tmp_path, needle)
    assert str(tmp_path / "b.parquet") in line and str(tmp_path / "a.parquet") in line


def test_a_wrong_type_in_one_file_names_it(tmp_path: Path) -> None:
    parquet(tmp_path / "a.parquet", [1, 2], country_type=pa.int64())
    one_line(
        tmp_path / "a.parquet",
        tmp_path,
        f"{tmp_path / 'a.parquet'}: column country has type int64; expected text",
    )


def test_timestamp_units_may_differ_across_files(tmp_path: Path) -> None:
    a = parquet(tmp_path / "a.parquet", "Italy", 4, ts_type=pa.timestamp("ms"))
    b = parquet(tmp_path / "b.parquet", "Spain", 5, ts_type=pa.timestamp("ns", "UTC"))
    c = parquet(
        tmp_path / "c.parquet", "Chile", 6, country_type=pa.dictionary(pa.int32(), pa.string())
    )
    jobs, counts = covid_jobs(resolve_inputs(tmp_path), tmp_path / "w")
    assert counts.rows_valid == 15
    ref = pl.concat([reference(p) for p in (a, b, c)]).sort("country", "date_hour")
    assert jobs.equals(ref)


# -- staging -------------------------------------------------------------------------------


def test_staging_is_private_to_each_reader_and_removed(tmp_path: Path) -> None:
    """Two readers on one spill directory (two processes on one --out) do not collide."""
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "covid.csv").write_text(HEADER + rows("Italy", 10))
    (tmp_path / "y" / "covid.csv").write_text(HEADER + rows("Spain", 3))
    spill = tmp_path / "out" / ".spill"
    kw = {"start": DEFAULT_START, "end": DEFAULT_END, "spill_dir": spill}
    a = InputReader([tmp_path / "x" / "covid.csv"], covid, **kw)  # type: ignore[arg-type]
    b = InputReader([tmp_path / "y" / "covid.csv"], covid, **kw)  # type: ignore[arg-type]
    assert b.counts().rows_read == 3
    b.close()
    assert a.counts().rows_read == 10
    a.close()
    assert list(spill.iterdir()) == []


def test_staging_is_removed_when_the_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1.csv").write_text(HEADER + rows("Italy", 10))
    (tmp_path / "2.csv").write_text("country,result\nItaly,pos\n")
    spill = tmp_path / "spill"
    with pytest.raises(InputError, match="missing column"):
        InputReader(
            [tmp_path / "1.csv", tmp_path / "2.csv"],
            covid,
            start=DEFAULT_START,
            end=DEFAULT_END,
            spill_dir=spill,
        )
    assert list(spill.iterdir()) == []


# -- over-long keys ------------------------------------------------------------------------


def test_over_long_country_is_quarantined_with_its_row(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text(
        HEADER
        + rows("Italy", 5)
        + "é" * 512
        + ",2020-03-01T05:00:00Z,positive\n"  # row 6: 1,024 bytes, valid
        + "é" * 513
        + ",2020-03-01T05:00:00Z,positive\n"  # row 7: 1,026 bytes
        + "x" * 10_000_000
        + ",2020-03-01T05:00:00Z,negative\n"  # row 8: 10 MB
        + rows("Italy", 2),
        encoding="utf-8",
    )
    jobs, counts = covid_jobs([path], tmp_path / "w", out=tmp_path / "o")
    assert counts.rows_read == 10 == counts.rows_valid + counts.rows_bad
    assert counts.bad == {"country_too_long": 2}
    q = pl.read_parquet(tmp_path / "o" / "quarantine.parquet")
    assert q["row"].to_list() == [7, 8]
    assert set(q["reason"]) == {"country is longer than 1024 bytes"}
    assert sorted(jobs["country"].unique()) == sorted(["Italy", "é" * 512])
