"""The app API: declarations, loading by import path, fingerprints, running and checking tasks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import dispatchkit as dk
from dispatchkit.app import AppError, ResultError, Task
from dispatchkit.errors import TaskError, UsageError

DAY = datetime(2020, 3, 1, tzinfo=UTC)


def sales_app() -> tuple[dk.App, Task, Task]:
    app = dk.App("sales", version="1")
    app.columns(
        store_id=dk.Int(min=0),
        ts=dk.Timestamp(run_range=True),
        amount=dk.Float(min=0.0),
        channel=dk.Text(allowed=("web", "shop"), lower=True, required=False),
    )
    app.key("store_id", dk.floor("ts", "day", name="day"))

    @app.task(
        result={"n": pa.int64(), "total": pa.float64(), "top": pa.float64()}, reads=("amount",)
    )
    def totals(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
        amounts = rows["amount"]
        return {
            "n": rows.num_rows,
            "total": pc.sum(amounts).as_py() or 0.0,
            "top": pc.max(amounts).as_py(),
        }

    @totals.vectorized
    def totals_all(jobs: dk.Jobs) -> dict[str, Any]:
        amounts = jobs.rows["amount"].to_numpy()
        starts, sizes = jobs.offsets[:-1], np.diff(jobs.offsets)
        total = np.add.reduceat(amounts, starts) if len(amounts) else np.zeros(len(jobs))
        top = np.maximum.reduceat(amounts, starts) if len(amounts) else np.zeros(len(jobs))
        return {"n": sizes, "total": np.where(sizes > 0, total, 0.0), "top": top}

    @app.task(
        result={"n": pa.int64(), "mean": pa.float64()},
        reads=("amount",),
        combine=dk.Combine(
            state={"n": pa.int64(), "total": pa.float64()},
            create=lambda: {"n": 0, "total": 0.0},
            add=lambda s, rows: {
                "n": s["n"] + rows.num_rows,
                "total": s["total"] + (pc.sum(rows["amount"]).as_py() or 0.0),
            },
            merge=lambda a, b: {"n": a["n"] + b["n"], "total": a["total"] + b["total"]},
            finish=lambda key, s: {"n": s["n"], "mean": s["total"] / s["n"]},
        ),
    )
    def mean(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
        return {"n": rows.num_rows, "mean": pc.mean(rows["amount"]).as_py()}

    return app, totals, mean


def make_jobs(app: dk.App, groups: list[list[float]]) -> dk.Jobs:
    items = [
        ({"store_id": i, "day": DAY}, pa.table({"amount": pa.array(g, pa.float64())}))
        for i, g in enumerate(groups)
    ]
    return dk.Jobs.from_groups(app.keyspec.schema, items, pa.schema([("amount", pa.float64())]))


# -- declarations -----------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: dk.App(""), "a name is letters"),
        (lambda: dk.App("a b"), "a name is letters"),
        (lambda: dk.App("x", version=""), "version must be text"),
        (lambda: dk.Int(min=1.5), r"Int\(min=1.5\): expected an integer"),
        (lambda: dk.Int(min=True), "expected an integer"),
        (lambda: dk.Int(min=3, max=1), "min is above max"),
        (lambda: dk.Int(max=1 << 63), "outside the 64-bit integer range"),
        (lambda: dk.Float(min=float("nan")), "bounds must be finite"),
        (lambda: dk.Float(min="0"), "expected a number"),
        (lambda: dk.Text(allowed="web"), "expected a tuple of strings"),
        (lambda: dk.Text(allowed=("Web",), lower=True), "'Web' can never match"),
        (lambda: dk.Text(allowed=(" web",)), "can never match, values are compared trimmed"),
        (lambda: dk.Text(allowed=()), "no value could ever be accepted"),
        (lambda: dk.Text(allowed=("a", "a")), "appears twice"),
        (lambda: dk.Text(max_bytes=0), "must be at least 1"),
        (lambda: dk.Bool(true=("yes",), false=("yes", "no")), "'yes' is a spelling of both"),
        (lambda: dk.Bool(true=("YES",)), "'YES' can never match"),
        (lambda: dk.Bool(true=()), "at least one spelling"),
        (lambda: dk.Timestamp(min="soon"), "not an ISO 8601"),
        (lambda: dk.Timestamp(min=3), "expected a datetime"),
        (lambda: dk.Timestamp(min="2021-01-01", max="2020-01-01"), "min is not before max"),
    ],
)
def test_column_declaration_errors(make: Callable[[], object], message: str) -> None:
    with pytest.raises(AppError, match=message) as info:
        make()
    _one_line(info.value)


def test_column_normalization() -> None:
    t = dk.Timestamp(min="2020-01-01", max=datetime(2021, 1, 1, 1, tzinfo=UTC))
    assert t.min == datetime(2020, 1, 1, tzinfo=UTC)
    assert t.min_ns == 1_577_836_800 * 10**9
    assert dk.Timestamp(min="2020-01-01T02:00:00+02:00").min == datetime(2020, 1, 1, tzinfo=UTC)
    assert dk.Text(allowed=["a", "b"]).allowed == ("a", "b")  # type: ignore[arg-type]
    assert hash(dk.Text(allowed=("a",))) == hash(dk.Text(allowed=("a",)))


def _app() -> dk.App:
    app = dk.App("s")
    app.columns(a=dk.Int(), t=dk.Timestamp(), x=dk.Float())
    return app


def _task(app: dk.App, **kw: Any) -> Task:
    kw.setdefault("result", {"n": pa.int64()})

    def f(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
        return {"n": 1}

    return app.task(**kw)(f)


@pytest.mark.parametrize(
    ("act", "message"),
    [
        (lambda app: app.columns(), "needs at least one column"),
        (lambda app: app.columns(a=dk.Int()), "column a is declared twice"),
        (lambda app: app.columns(b=int), "column b: expected dk.Int"),
        (
            lambda app: app.columns(u=dk.Timestamp(run_range=True), v=dk.Timestamp(run_range=True)),
            "u and v both have run_range=True",
        ),
        (lambda app: (app.key("a"), app.key("a")), "key\\(\\) is declared twice"),
        (lambda app: app.keyspec, "no key declared"),
        (lambda app: _task(app, result={}), "needs at least one column"),
        (lambda app: _task(app, result={"n": int}), "expected a pyarrow type"),
        (lambda app: _task(app, result=[1]), "expected a dict of pyarrow types"),
        (lambda app: _task(app, format="pandas"), "use one of arrow, polars, numpy"),
        (lambda app: _task(app, reads=("zz",)), "reads 'zz', which is not a declared column"),
        (lambda app: _task(app, reads="x"), "expected a tuple of column names"),
        (lambda app: _task(app, reads=("x", "x")), "reads a column twice"),
        (lambda app: _task(app, combine=lambda: 0), "expected dk.Combine"),
        (lambda app: _task(app, name="bad name"), "task name 'bad name'"),
        (lambda app: (_task(app), _task(app)), "task f is declared twice"),
        (lambda app: (app.key("a"), _task(app, result={"a": pa.int64()})), "a is also a key"),
        (lambda app: (_task(app, result={"a": pa.int64()}), app.key("a")), "a is also a key"),
        (lambda app: app.task(result={"n": pa.int64()})(3), "must decorate a function"),
        (lambda app: app.chart(3), "must decorate a function"),
        (lambda app: (app.chart(print), app.chart(print)), "chart is declared twice"),
    ],
)
def test_app_declaration_errors(act: Callable[[dk.App], object], message: str) -> None:
    with pytest.raises(AppError, match=message) as info:
        act(_app())
    assert _one_line(info.value).startswith("app s: ")


def test_tasks_need_columns_first() -> None:
    with pytest.raises(AppError, match="declare columns\\(\\) before tasks"):
        _task(dk.App("e"))


def test_combine_errors() -> None:
    with pytest.raises(AppError, match=r"Combine\(merge=\.\.\.\): expected a function"):
        dk.Combine(state={"n": pa.int64()}, create=dict, add=dict, merge=1, finish=dict)  # type: ignore[arg-type]
    with pytest.raises(AppError, match="needs at least one column"):
        dk.Combine(state={}, create=dict, add=dict, merge=dict, finish=dict)  # type: ignore[arg-type]


def test_vectorized_declared_once() -> None:
    _, totals, _ = sales_app()
    with pytest.raises(AppError, match="vectorized form declared twice"):
        totals.vectorized(lambda jobs: {})


def test_reads_default_to_the_non_key_columns() -> None:
    app, _, _ = sales_app()
    t = _task(app)
    assert t.reads == ("ts", "amount", "channel")
    assert app.get_task("f") is t
    with pytest.raises(UsageError, match=r"unknown task 'g' \(known: f, mean, totals\)"):
        app.get_task("g")
    assert app.run_range_column == "ts"
    assert "sales" in repr(app) and "totals" in repr(app.tasks["totals"])


def test_chart_is_registered() -> None:
    app = _app()

    @app.chart
    def picture(results: pa.Table, path: Path) -> None:
        pass

    assert app.chart_fn is picture


# -- loading ------------------------------------------------------------------------------

APP_SOURCE = """
import dispatchkit as dk
import pyarrow as pa

app = dk.App("loaded", version="2")
app.columns(k=dk.Text(), v=dk.Float())
app.key("k")
not_an_app = 42

@app.task(result={"n": pa.int64()})
def count(key, rows):
    return {"n": rows.num_rows}
"""


def test_load_app_from_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mypkg_apps"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "shop.py").write_text(APP_SOURCE + "\nother = app\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        app = dk.load_app("mypkg_apps.shop")
        assert app.name == "loaded" and app.spec == "mypkg_apps.shop:app"
        assert dk.load_app("mypkg_apps.shop:other") is app
        monkeypatch.setenv("DISPATCHKIT_APP", "mypkg_apps.shop:app")
        assert dk.load_app() is app
        with pytest.raises(UsageError, match=r"\(from \$DISPATCHKIT_APP\)"):
            monkeypatch.setenv("DISPATCHKIT_APP", "mypkg_apps.nope")
            dk.load_app()
    finally:
        for name in [n for n in sys.modules if n.startswith("mypkg_apps")]:
            del sys.modules[name]


def test_load_app_from_a_file_outside_the_package(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "my_app.py"
    path.parent.mkdir()
    path.write_text(APP_SOURCE)
    app = dk.load_app(str(path))
    assert app.name == "loaded" and list(app.tasks) == ["count"]
    assert app.spec == f"{path}:app"
    assert dk.load_app(f"{path}:app").name == "loaded"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{tmp}/missing.py", "no such file {tmp}/missing.py"),
        ("{tmp}", "is a directory, not a Python file"),
        ("no_such_module_xyz:app", "no module named 'no_such_module_xyz'"),
        ("no_such_module_xyz.sub", "no module named 'no_such_module_xyz'"),
        ("dispatchkit.no_such_mod", "no module named 'dispatchkit.no_such_mod'"),
        ("not a module", "is neither a module name nor a path"),
        ("{tmp}/app.py:missing", "has no attribute 'missing' \\(its apps: app\\)"),
        ("{tmp}/app.py:not_an_app", "not_an_app is a int, not a dispatchkit App"),
        (
            "dispatchkit.errors:app",
            "dispatchkit.errors has no attribute 'app' \\(it defines no App\\)",
        ),
        ("{tmp}/broken.py", "running .*broken.py failed: ZeroDivisionError: division by zero"),
        ("{tmp}/syntax.py", "running .*syntax.py failed: SyntaxError"),
        ("{tmp}/needs.py", "failed: ModuleNotFoundError: No module named 'absent_dependency_q'"),
        (":app", "expected module:attr"),
    ],
)
def test_load_app_errors(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "app.py").write_text(APP_SOURCE)
    (tmp_path / "broken.py").write_text("1 / 0\n")
    (tmp_path / "syntax.py").write_text("def (:\n")
    (tmp_path / "needs.py").write_text("import absent_dependency_q\n")
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(UsageError, match=message.format(tmp=tmp_path)) as info:
        dk.load_app(spec)
    assert _one_line(info.value).startswith(f"cannot load app {spec!r}: ")


def test_load_app_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPATCHKIT_APP", raising=False)
    try:
        app = dk.load_app()
    except UsageError as exc:  # until the built-in app exists
        assert "'dispatchkit.apps.covid:app' (the default)" in _one_line(exc)
    else:
        assert isinstance(app, dk.App)


# -- fingerprint --------------------------------------------------------------------------


def test_fingerprint_follows_the_code(tmp_path: Path) -> None:
    path = tmp_path / "fp_app.py"
    path.write_text(APP_SOURCE)
    first = dk.load_app(str(path)).fingerprint
    assert first.startswith("2:") and len(first.split(":")[1]) == 16
    assert dk.load_app(str(path)).fingerprint == first  # same code, same print
    path.write_text(APP_SOURCE.replace("rows.num_rows}", "rows.num_rows + 0}"))
    changed = dk.load_app(str(path)).fingerprint
    assert changed != first
    path.write_text(APP_SOURCE.replace('version="2"', 'version="3"'))
    bumped = dk.load_app(str(path)).fingerprint
    assert bumped.startswith("3:") and bumped.split(":")[1] == first.split(":")[1]


def _fp_app(vectorized: bool, finish: Callable[[Any, Any], Any]) -> dk.App:
    app = dk.App("fp", version="1")
    app.columns(k=dk.Int(), amount=dk.Float())
    combine = dk.Combine(
        state={"n": pa.int64()},
        create=lambda: {"n": 0},
        add=lambda s, rows: {"n": s["n"] + rows.num_rows},
        merge=lambda a, b: {"n": a["n"] + b["n"]},
        finish=finish,
    )

    @app.task(result={"n": pa.int64()}, combine=combine)
    def f(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
        return {"n": rows.num_rows}

    if vectorized:

        @f.vectorized
        def f_all(jobs: dk.Jobs) -> dict[str, Any]:
            return {"n": np.diff(jobs.offsets)}

    return app


def finish_a(key: Any, s: Any) -> Any:
    return {"n": s["n"]}


def finish_b(key: Any, s: Any) -> Any:
    return {"n": int(s["n"])}


def test_fingerprint_covers_vectorized_and_combine() -> None:
    assert sales_app()[0].fingerprint == sales_app()[0].fingerprint
    plain = _fp_app(False, finish_a).fingerprint
    assert _fp_app(False, finish_a).fingerprint == plain
    assert _fp_app(True, finish_a).fingerprint != plain
    assert _fp_app(False, finish_b).fingerprint != plain


# -- running ------------------------------------------------------------------------------

GROUPS = [[1.0, 2.0, 3.0], [5.5], [0.25, 0.25], [10.0, 0.0, 4.0, 2.0]]


def test_run_jobs_vectorized_agrees_with_per_job() -> None:
    app, totals, _ = sales_app()
    jobs = make_jobs(app, GROUPS)
    vectorized = totals.run_jobs(jobs)
    totals.vectorized_fn, saved = None, totals.vectorized_fn
    try:
        looped = totals.run_jobs(jobs)
    finally:
        totals.vectorized_fn = saved
    assert vectorized.schema == totals.result == looped.schema
    assert vectorized.equals(looped)
    assert vectorized.column("n").to_pylist() == [3, 1, 2, 4]
    one = totals.run_one({"store_id": 1, "day": DAY}, jobs.rows_of(1))
    assert one == {"n": 1, "total": 5.5, "top": 5.5}


def test_jobs_iteration_and_checks() -> None:
    app, _, _ = sales_app()
    jobs = make_jobs(app, GROUPS)
    assert len(jobs) == 4 and jobs.offsets.tolist() == [0, 3, 4, 6, 10]
    keys = [k for k, _ in jobs]
    assert keys[2] == {"store_id": 2, "day": DAY} == jobs.key(2)
    assert [r.num_rows for _, r in jobs] == [3, 1, 2, 4]
    with pytest.raises(ValueError, match="4 keys need 5 offsets"):
        dk.Jobs(jobs.keys, jobs.rows, np.array([0, 10]))
    with pytest.raises(ValueError, match="rise from 0 to 10"):
        dk.Jobs(jobs.keys, jobs.rows, np.array([0, 5, 4, 6, 10]))
    empty = dk.Jobs.from_groups(app.keyspec.schema, [], pa.schema([("amount", pa.float64())]))
    assert len(empty) == 0
    assert app.tasks["totals"].run_jobs(empty).num_rows == 0


@pytest.mark.parametrize("fmt", ["arrow", "polars", "numpy"])
def test_formats(fmt: str) -> None:
    app = dk.App("f")
    app.columns(k=dk.Int(), v=dk.Float())
    app.key("k")
    seen: list[type] = []

    @app.task(result={"total": pa.float64()}, format=fmt)
    def total(key: dict[str, Any], rows: Any) -> dict[str, Any]:
        seen.append(type(rows))
        if fmt == "polars":
            return {"total": float(rows["v"].sum())}
        if fmt == "numpy":
            return {"total": float(np.sum(rows["v"]))}
        return {"total": pc.sum(rows["v"]).as_py()}

    items = [({"k": 1}, pa.table({"v": [1.0, 2.0]})), ({"k": 2}, pa.table({"v": [4.0]}))]
    jobs = dk.Jobs.from_groups(app.keyspec.schema, items)
    assert total.run_jobs(jobs).column("total").to_pylist() == [3.0, 4.0]
    expected = {"arrow": pa.Table, "polars": pl.DataFrame, "numpy": dict}[fmt]
    assert all(t is expected for t in seen)


def test_rows_must_hold_the_read_columns() -> None:
    _, totals, _ = sales_app()
    with pytest.raises(TaskError, match="task totals: rows lack column\\(s\\) amount"):
        totals.run_one({}, pa.table({"other": [1]}))
    # extra columns are dropped before the task sees them
    assert totals.run_one({}, pa.table({"x": [1], "amount": [2.0]}))["n"] == 1


def test_combine_parts_agree_with_the_whole() -> None:
    _, _, mean = sales_app()
    rows = pa.table({"amount": [1.0, 2.0, 3.0, 4.0, 6.0]})
    key = {"store_id": 1, "day": DAY}
    states = [mean.part_state(rows.slice(0, 2)), mean.part_state(rows.slice(2))]
    assert states[0] == {"n": 2, "total": 3.0}
    assert mean.finish_states(key, states) == mean.run_one(key, rows)
    with pytest.raises(TaskError, match="no part states"):
        mean.finish_states(key, [])
    _, totals, _ = sales_app()
    with pytest.raises(TaskError, match="task totals has no combine"):
        totals.part_state(rows)


# -- checking results ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"n": 1, "total": 2.0}, "result has no column top \\(double in the result schema\\)"),
        ({"n": 1, "total": 2.0, "top": 1.0, "x": 1}, "result has column x, which is not in"),
        (
            {"n": "1", "total": 2.0, "top": 1.0},
            "column n is int64 in the result schema, but the task returned str \\('1'\\)",
        ),
        ({"n": 1.0, "total": 2.0, "top": 1.0}, "column n is int64 .* returned float"),
        ({"n": True, "total": 2.0, "top": 1.0}, "column n is int64 .* returned bool"),
        ({"n": 1, "total": "2", "top": 1.0}, "column total is double .* returned str"),
        ({"n": 1 << 64, "total": 2.0, "top": 1.0}, "column n is int64 .* returned int"),
        ([1, 2], "returned list; expected a dict"),
    ],
)
def test_check_result_rows(row: object, message: str) -> None:
    _, totals, _ = sales_app()
    with pytest.raises(ResultError, match="task totals: " + message) as info:
        totals.check_result(row)
    _one_line(info.value)


def test_check_result_accepts_numpy_scalars_and_none() -> None:
    _, totals, _ = sales_app()
    row = {"n": np.int64(3), "total": np.float32(1.5), "top": None}
    assert totals.check_result(row) == {"n": 3, "total": 1.5, "top": None}


def test_check_result_tables() -> None:
    _, totals, _ = sales_app()
    ok = pa.table({"top": [1.0], "n": pa.array([1], pa.int32()), "total": [2]})
    table = totals.check_result(ok)
    assert table.schema == totals.result  # reordered, widened losslessly
    with pytest.raises(
        ResultError,
        match=r"column total is double in the result schema, but the task returned string",
    ):
        totals.check_result(pa.table({"n": [1], "total": ["x"], "top": [1.0]}))
    with pytest.raises(ResultError, match=r"column n is int64 .* returned double"):
        totals.check_result(pa.table({"n": [1.0], "total": [1.0], "top": [1.0]}))
    with pytest.raises(ResultError, match="result has no column top"):
        totals.check_result(pa.table({"n": [1], "total": [1.0]}))
    with pytest.raises(ResultError, match="does not fit"):
        totals.check_result(
            pa.table({"n": pa.array([1 << 63], pa.uint64()), "total": [1.0], "top": [1.0]})
        )
    batch = pa.record_batch({"n": [1], "total": [1.0], "top": [1.0]})
    assert totals.check_result(batch).num_rows == 1


def test_vectorized_result_errors() -> None:
    app = dk.App("v")
    app.columns(k=dk.Int(), v=dk.Float())
    app.key("k")
    out: dict[str, Any] = {}

    @app.task(result={"total": pa.float64()})
    def total(key: dict[str, Any], rows: pa.Table) -> dict[str, Any]:
        return {"total": 0.0}

    @total.vectorized
    def total_all(jobs: dk.Jobs) -> Any:
        return out["value"]

    jobs = dk.Jobs.from_groups(app.keyspec.schema, [({"k": 1}, pa.table({"v": [1.0]}))])
    out["value"] = {"total": [1.0, 2.0]}
    with pytest.raises(ResultError, match="vectorized form returned 2 rows for 1 jobs"):
        total.run_jobs(jobs)
    out["value"] = {"total": ["x"]}
    with pytest.raises(ResultError, match=r"column total is double .* returned string"):
        total.run_jobs(jobs)
    out["value"] = {"total": [1, "x"]}
    with pytest.raises(ResultError, match="cannot be made an Arrow array"):
        total.run_jobs(jobs)
    out["value"] = [1.0]
    with pytest.raises(ResultError, match="vectorized form returned list"):
        total.run_jobs(jobs)
    out["value"] = pl.DataFrame({"total": [7.0]})
    assert total.run_jobs(jobs).column("total").to_pylist() == [7.0]
