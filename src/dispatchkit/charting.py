"""The report's chart, drawn in a process of its own that is ready before the results are.

Drawing a chart starts with importing matplotlib (most of a second) and the app's chart
modules. A :class:`ChartProcess` is started with the run: one child process (a fork of
the run's fork server, see :func:`dispatchkit.procs.fork_context`) imports them while the
input is read and the jobs run, on a core the run leaves idle. At the end the results
table is handed over, and the chart is drawn while this process writes the CSV export.

The chart is the app's ``@app.chart`` function, called with the same table as in this
process; an INCOMPLETE banner is added the same way. If the chart process cannot be
started or dies, the chart is drawn here instead: the process is a speed-up, never a
new way to fail. An error of the chart function itself is one line naming the app.
"""

from __future__ import annotations

import gc
import importlib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pyarrow as pa

from dispatchkit import procs
from dispatchkit.app import App, load_app
from dispatchkit.errors import DispatchkitError, RunError

log = logging.getLogger(__name__)

#: Imported by the chart process before any chart is asked of it.
CHART_PRELOAD = ("matplotlib.figure", "matplotlib.backends.backend_agg")

_app: App | None = None  # the chart process's app


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

    def close(self) -> None:
        if self._starter is not None:
            self._starter.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


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
