"""The report's chart, drawn in a process of its own that is ready before the results are.

Drawing a chart starts with importing matplotlib (most of a second) and the app's chart
modules. A :class:`ChartProcess` is started with the run: one child process (a fork of
the run's fork server, see :func:`dispatchkit.procs.fork_context`) imports them while the
input is read and the jobs run, on a core the run leaves idle. At the end the results
table is handed over, and the chart is drawn while this process writes the CSV export.

The chart is the app's ``@app.chart`` function, called with the same table as in this
process; an INCOMPLETE banner is added the same way. In the chart process, :func:`twin`
is a second process, forked from it once warmed up, that the chart function may hand
part of its drawing to (the COVID chart draws its lower rows of panels there). If the
chart process cannot be started or dies, the chart is drawn here instead: the process
is a speed-up, never a new way to fail. An error of the chart function itself is one
line naming the app.
"""

from __future__ import annotations

import gc
import importlib
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import util as mp_util
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyarrow as pa

from dispatchkit import procs
from dispatchkit.app import App, load_app
from dispatchkit.errors import DispatchkitError, RunError

log = logging.getLogger(__name__)

#: Imported by the chart process before any chart is asked of it.
CHART_PRELOAD = ("matplotlib.figure", "matplotlib.backends.backend_agg")

_app: App | None = None  # the chart process's app
_twin: _Twin | None = None  # the chart process's twin

P = ParamSpec("P")
T = TypeVar("T")


class ChartProcess:
    """One warmed-up process drawing ``app``'s chart (see the module's docstring)."""

    def __init__(self, app: App, app_spec: str | None) -> None:
        self.app = app
        self._spec = app.spec if app.spec is not None else app_spec
        self._pool: ProcessPoolExecutor | None = None
        self._starter: threading.Thread | None = None

    def start_soon(self) -> None:
        """Start the process and its imports in the background (returns at once)."""
        if self.app.chart_fn is None or self._starter is not None:
            return
        if self._spec is None:  # an app built in this process: no other process has it
            return
        preload = (*CHART_PRELOAD, *self.app.chart_preload)

        def start() -> None:
            try:
                pool = ProcessPoolExecutor(
                    1,
                    mp_context=procs.fork_context(),
                    initializer=_warm,
                    initargs=(self._spec, preload, procs.Origin.here()),
                )
                pool.submit(_ready)  # starts the process and its imports now
                self._pool = pool
            except Exception as exc:  # drawn here instead
                log.debug("no chart process (%s); the chart is drawn in this process", exc)

        self._starter = threading.Thread(target=start, name="dispatchkit-chart-start")
        self._starter.start()

    def submit(self, results: pa.Table, path: Path, banner: Sequence[str]) -> Drawing:
        """Start drawing the chart of ``results`` to ``path``; :meth:`Drawing.wait` ends it."""
        if self._starter is not None:
            self._starter.join()
        future = None
        if self._pool is not None:
            try:
                future = self._pool.submit(_draw, results, path, list(banner))
            except (BrokenProcessPool, RuntimeError) as exc:
                log.debug("chart process gone (%s); drawing here", exc)
        return Drawing(self.app, results, path, list(banner), future)

    def close(self, *, wait: bool = True) -> None:
        """End the process once its drawing is done, or (``wait=False``: the run failed)
        at once, without waiting for its imports to end (its twin dies with it)."""
        if self._starter is not None:
            self._starter.join()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if not wait:
            processes: dict[int, Any] = getattr(pool, "_processes", None) or {}
            for process in list(processes.values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


class Drawing:
    """A chart being drawn (in the chart process, or here on :meth:`wait`)."""

    def __init__(
        self,
        app: App,
        results: pa.Table,
        path: Path,
        banner: list[str],
        future: Future[None] | None,
    ) -> None:
        self.app, self.results, self.path, self.banner = app, results, path, banner
        self.future = future

    def wait(self) -> None:
        """Until the chart is written; an error of the chart function is raised here as
        one :class:`RunError` naming the app (the results files are written by then)."""
        try:
            if self.future is not None:
                try:
                    self.future.result()
                    return
                except BrokenProcessPool as exc:
                    log.debug("chart process died (%s); drawing here", exc)
            draw(self.app, self.results, self.path, self.banner)
        except DispatchkitError:
            raise
        except Exception as exc:
            raise RunError(
                f"app {self.app.name!r}: its chart failed ({type(exc).__name__}: {exc}); "
                "results.parquet and results.csv are written, report.png is not"
            ) from exc


def draw(app: App, results: pa.Table, path: Path, banner: Sequence[str]) -> None:
    """The app's chart of ``results`` at ``path``, with an INCOMPLETE banner if given."""
    assert app.chart_fn is not None
    app.chart_fn(results, path)
    if banner:
        from dispatchkit.outcome import mark_chart

        mark_chart(path, list(banner))


def _warm(spec: str | None, preload: Sequence[str], origin: procs.Origin) -> None:
    """In the chart process: take the run's environment, load the app, import ahead."""
    global _app
    origin.enter()
    _app = load_app(spec)
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # the chart itself will say what is missing
            log.debug("chart preload %s: %s", name, exc)
    gc.freeze()  # what is imported stays: no collection walks it again
    _start_twin()


def twin() -> Executor | None:
    """In a run's chart process: an executor of one process, a fork of this one made when
    its imports were done, that a chart function may give part of its drawing to (what
    it is given is pickled: plain data and module-level functions). None in any other
    process, where a chart is drawn by one process."""
    return _twin


class _Twin(Executor):
    """The chart process's twin: calls run there without garbage collection (see _draw)."""

    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self._pool = pool

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return self._pool.submit(_without_gc, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def _start_twin() -> None:
    """Fork the twin now, while this process has drawn nothing (no thread of its own)."""
    global _twin
    if "fork" not in mp.get_all_start_methods():
        return
    try:
        pool = ProcessPoolExecutor(
            1, mp_context=mp.get_context("fork"), initializer=_enter_twin, initargs=(os.getpid(),)
        )
        pool.submit(_ready)  # forked here, before the pool's thread starts
    except Exception as exc:  # the chart is drawn by this process alone
        log.debug("no chart twin (%s)", exc)
        return
    _twin = _Twin(pool)
    # At this process's exit, before multiprocessing joins its children: and before the
    # pool's queue closes its feeder thread (a finalizer of priority 10), which must
    # still be there to send the twin its stop.
    mp_util.Finalize(None, _twin.shutdown, kwargs={"cancel_futures": True}, exitpriority=100)


def _enter_twin(parent: int) -> None:
    global _twin
    _twin = None  # the twin's own copy of the chart process's
    procs.die_with_parent(parent)


def _without_gc(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    gc.disable()
    try:
        return fn(*args, **kwargs)
    finally:
        gc.enable()


def _ready() -> None:
    """Nothing: submitted first, so the process starts (and warms up) at once."""


def _draw(results: pa.Table, path: Path, banner: list[str]) -> None:
    assert _app is not None
    # A figure is tens of thousands of objects that all live until it is saved: the
    # collections their allocation triggers find nothing to free, and cost a fifth of
    # the drawing. Its cycles are collected after.
    gc.disable()
    try:
        draw(_app, results, path, banner)
    finally:
        gc.enable()
