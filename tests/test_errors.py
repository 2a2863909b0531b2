"""The CLI's one line for every expected failure of the libraries underneath."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import duckdb
import pytest

from dispatchkit.cli import _one_line
from dispatchkit.errors import RET_BROKER, RET_FAILED, OutputError, UsageError
from dispatchkit.outdir import atomic_path


def test_duckdb_write_failure_names_the_file() -> None:
    exc = duckdb.TransactionException(
        'TransactionContext Error: Failed to commit: Could not write file "/o/dispatchkit.duckdb'
        '.wal": No space left on device'
    )
    assert _one_line(exc) == (
        "cannot write /o/dispatchkit.duckdb.wal: No space left on device",
        RET_FAILED,
    )


def test_other_duckdb_errors_are_one_line() -> None:
    line, code = _one_line(duckdb.IOException("IO Error: something\nwith a second line"))
    assert line == "DuckDB: IO Error: something with a second line" and code == RET_FAILED


def test_oserror_names_its_path() -> None:
    exc = OSError(errno.EROFS, os.strerror(errno.EROFS), "/o/results.csv")
    assert _one_line(exc) == ("/o/results.csv: Read-only file system", RET_FAILED)


def test_dispatchkit_errors_keep_their_code_and_bugs_their_traceback() -> None:
    assert _one_line(UsageError("bad")) == ("bad", 2)
    assert _one_line(ValueError("a bug")) == (None, 0)
    assert RET_BROKER == 3


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])
def test_atomic_path_removes_its_temp_file_and_names_the_target(tmp_path: Path, code: int) -> None:
    target = tmp_path / "results.parquet"
    target.write_text("old")
    expected = f"cannot write {target}: {os.strerror(code)}"
    with pytest.raises(OutputError, match=expected), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise OSError(code, os.strerror(code))
    assert target.read_text() == "old"  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]


def test_atomic_path_maps_library_errors_that_wrap_enospc(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="No space left on device"), atomic_path(tmp_path / "x"):
        raise RuntimeError("No space left on device (os error 28)")  # as polars words it
    assert list(tmp_path.iterdir()) == []
