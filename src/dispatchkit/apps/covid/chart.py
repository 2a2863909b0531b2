"""The chart for people: the daily positive rate per country, with its Wilson band.

This is the last step of the data flow. Workers compute one row per (country, hour);
once those rows are stored, the run calls :func:`plot_report` on the results table, and
``dispatchkit report`` calls :func:`plot_report_file` to redraw the same chart later from
a stored ``results.parquet`` or ``results.csv`` without rerunning anything.

Hours are summed into UTC days before plotting (:func:`daily_rates`): the daily rate is
positives / tests over the day, so busy hours weigh more than quiet ones, and the Wilson
interval is recomputed from the daily sums rather than averaged from the hourly ones.

The chart is small multiples — one panel per country on shared axes — because twenty
lines on one axes cannot be told apart. Figures are built from
:class:`matplotlib.figure.Figure` on an Agg canvas, never through ``pyplot``, so drawing
touches no global state and is safe from worker threads and headless machines. Files are
written to a temporary name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final

import matplotlib.dates as mdates
import numpy as np
import numpy.typing as npt
import polars as pl
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import (
    FixedFormatter,
    FixedLocator,
    MaxNLocator,
    NullLocator,
    PercentFormatter,
)

from dispatchkit import charting
from dispatchkit.apps.covid.stats import wilson_arrays

__all__ = [
    "DEFAULT_TITLE",
    "REQUIRED_COLUMNS",
    "daily_rates",
    "plot_report",
    "plot_report_file",
    "quoted_names",
    "save_png",
]

#: Columns of the results table that the report reads; the others are ignored.
REQUIRED_COLUMNS: tuple[str, ...] = ("country", "date_hour", "tests", "positives")

DEFAULT_TITLE = "Daily COVID-19 test positive rate by country (95% Wilson interval)"

_DPI = 120
#: Pillow's PNG options for every chart written (see :func:`save_png`).
PNG_OPTIONS: dict[str, int] = {"compress_level": 1}
_LINE = "#1f5fa6"
_BAND = "#8fb3e0"
_POOLED = "#9a9a9a"
_GRID = "#e3e3e3"
_MUTED = "#555555"
# Small-multiple geometry, in inches.
_PANEL_W, _PANEL_H = 2.9, 1.7
_GAP_W, _GAP_H = 0.25, 0.45
_MARGIN_LEFT, _MARGIN_RIGHT = 0.6, 0.25
_MARGIN_TOP, _MARGIN_BOTTOM = 1.3, 0.4
#: Narrowest figure, so the title, subtitle and key fit on one line each.
_MIN_WIDTH = 10.0

log = logging.getLogger(__name__)


def daily_rates(results: pl.DataFrame) -> pl.DataFrame:
    """Sum hourly results into one row per (country, UTC day).

    Returns columns ``country``, ``date`` (``pl.Date``), ``tests``, ``positives``,
    ``positive_rate`` (daily positives / daily tests, i.e. weighted by tests, not a mean
    of the hourly rates), ``ci_low`` and ``ci_high`` (Wilson 95% on the daily sums),
    sorted by country then date. Days without tests have no row.
    """
    _check_results(results, "the results table")
    day = _utc_day(results.schema["date_hour"])
    daily = (
        results.lazy()
        .select(
            pl.col("country").cast(pl.String),
            day.alias("date"),
            pl.col("tests").cast(pl.Int64),
            pl.col("positives").cast(pl.Int64),
        )
        .group_by("country", "date")
        .agg(pl.col("tests").sum(), pl.col("positives").sum())
        .filter(pl.col("tests") > 0)
        .sort("country", "date")
        .collect()
    )
    tests = daily["tests"].to_numpy()
    positives = daily["positives"].to_numpy()
    low, high = wilson_arrays(positives, tests)
    return daily.with_columns(
        positive_rate=pl.Series(positives / np.maximum(tests, 1), dtype=pl.Float64),
        ci_low=pl.Series(low, dtype=pl.Float64),
        ci_high=pl.Series(high, dtype=pl.Float64),
    )


def plot_report(results: pl.DataFrame, path: Path, *, title: str | None = None) -> Path:
    """Draw the daily positive rate of every country as small multiples and save a PNG.

    One panel per country (alphabetical), all on the same date and percent axes: the line
    is the daily rate, the shaded band its 95% Wilson interval, and the thin grey line
    the rate of all countries pooled, for comparison. Returns ``path``.

    In a run's chart process the lower rows of panels are drawn by its twin
    (:func:`dispatchkit.charting.twin`) while this process draws the header and the upper
    rows; the two images meet in the white gap between two rows of panels, so the PNG is
    the very one a single process draws (which it does when there is no twin, one row,
    or the halves would touch).
    """
    plan = _plan(results, title)
    twin = charting.twin() if plan.nrows > 1 else None
    image = _draw_halves(plan, twin) if twin is not None else None
    if image is None:
        image = _draw(plan, range(len(plan.panels)), header=True)
    return save_png(image, path)


@dataclass(frozen=True)
class _Panel:
    """One country's panel: its title, overall rate and daily values on the day axis."""

    name: str
    overall: float
    rate: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]


@dataclass(frozen=True)
class _Plan:
    """Everything drawn, computed once (and sent to the twin): plain arrays and text."""

    nrows: int
    ncols: int
    x: npt.NDArray[np.float64]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    pooled_rate: npt.NDArray[np.float64] | None
    panels: list[_Panel]
    title: str
    subtitle: str


def _plan(results: pl.DataFrame, title: str | None) -> _Plan:
    daily = daily_rates(results)
    if daily.height == 0:
        raise ValueError("the results table has no tests to plot")

    countries: list[str] = daily["country"].unique().sort().to_list()
    first: date = daily["date"].min()  # type: ignore[assignment]
    last: date = daily["date"].max()  # type: ignore[assignment]
    n_days = (last - first).days + 1
    # Every panel shares one day axis; a day without tests stays NaN so the line breaks
    # there instead of drawing a straight segment across the gap.
    days = np.datetime64(first, "D") + np.arange(n_days)
    # matplotlib.dates ships without type hints, hence the ignores on its calls.
    x: npt.NDArray[np.float64] = mdates.date2num(days)  # type: ignore[no-untyped-call]

    pooled = daily.group_by("date").agg(pl.col("tests").sum(), pl.col("positives").sum())
    pooled_rate = _on_days(pooled, first, n_days, pl.col("positives") / pl.col("tests"))

    panels = []
    for one in daily.partition_by("country", maintain_order=True):
        panels.append(
            _Panel(
                name=str(one["country"][0]),
                overall=int(one["positives"].sum()) / int(one["tests"].sum()),
                rate=_on_days(one, first, n_days, pl.col("positive_rate")),
                low=_on_days(one, first, n_days, pl.col("ci_low")),
                high=_on_days(one, first, n_days, pl.col("ci_high")),
            )
        )
    assert [p.name for p in panels] == countries
    nrows, ncols = _grid(len(countries))
    total = int(daily["tests"].sum())
    span = f"{first:%d %b %Y} – {last:%d %b %Y}" if n_days > 1 else f"{first:%d %b %Y}"
    places = "country" if len(countries) == 1 else "countries"
    return _Plan(
        nrows=nrows,
        ncols=ncols,
        x=x,
        xlim=(x[0] - 0.5, x[-1] + 0.5),
        ylim=(0.0, _y_top(daily)),
        pooled_rate=pooled_rate if len(countries) > 1 else None,
        panels=panels,
        title=title if title is not None else DEFAULT_TITLE,
        subtitle=f"{total:,} tests in {len(countries)} {places}, {span} (UTC days)",
    )


def _draw(plan: _Plan, which: Sequence[int], *, header: bool) -> npt.NDArray[np.uint8]:
    """The whole figure's pixels with the panels ``which`` (and the header)."""
    fig, axes = _panel_figure(plan.nrows, plan.ncols, which)
    ticks = _ticks(axes[0], plan.xlim, plan.ylim)
    pixels, _ = _render(plan, fig, axes, which, ticks, header=header)
    return pixels


def _render(
    plan: _Plan,
    fig: Figure,
    axes: Sequence[Axes],
    which: Sequence[int],
    ticks: Ticks,
    *,
    header: bool,
) -> tuple[npt.NDArray[np.uint8], int]:
    """Draw the panels ``which`` on their ``axes`` (and the header): the figure's pixels
    (RGBA, top row first; white where nothing is drawn) and the pixel row of the
    highest axes' top edge."""
    for i, ax in zip(which, axes, strict=True):
        _draw_panel(plan, i, ax, ticks)
    if header:
        _header(fig, plan.title, plan.subtitle, pooled=plan.pooled_rate is not None)
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()  # type: ignore[no-untyped-call]
    pixels = np.asarray(canvas.buffer_rgba())  # type: ignore[no-untyped-call]
    top = max(ax.get_window_extent().y1 for ax in axes)  # display units: up from the bottom
    return pixels, max(0, math.floor(pixels.shape[0] - top) - 1)


def _draw_panel(plan: _Plan, i: int, ax: Axes, ticks: Ticks) -> None:
    panel, x, n = plan.panels[i], plan.x, len(plan.panels)
    ax.set_xlim(*plan.xlim)
    ax.set_ylim(*plan.ylim)
    rate, low, high = panel.rate, panel.low, panel.high
    if plan.pooled_rate is not None:
        ax.plot(x, plan.pooled_rate, color=_POOLED, linewidth=0.8, zorder=2)
    _band(ax, x, low, high)
    ax.plot(x, rate, color=_LINE, linewidth=1.1, zorder=3)
    # A day between two days without tests has no segment to draw: mark it instead.
    alone = _isolated(rate)
    if alone.any():
        ax.vlines(x[alone], low[alone], high[alone], color=_BAND, alpha=0.55, lw=2.5, zorder=1)
        ax.plot(x[alone], rate[alone], "o", color=_LINE, markersize=2.5, zorder=3)
    # y given: matplotlib then skips placing titles above top tick labels (there are
    # none), a third of the drawing time of twenty panels.
    ax.set_title(_short(panel.name), loc="left", fontsize=10, fontweight="bold", pad=3, y=1.0)
    ax.set_title(
        f"{panel.overall:.1%} overall", loc="right", fontsize=8, color=_MUTED, pad=3, y=1.0
    )
    # Dates under the lowest panel of each column, percentages left of each row.
    _style_panel(ax, ticks, dates=i + plan.ncols >= n, percents=i % plan.ncols == 0)


def _draw_halves(plan: _Plan, twin: Executor) -> npt.NDArray[np.uint8] | None:
    """The figure drawn in two processes: the header and upper rows here, the lower rows
    in ``twin``; None when the two halves' pixels would meet (then one process draws).

    The lower half's pixels come back through a file in memory (``/dev/shm``): a few
    megabytes through the executor's pipe take a third as long as drawing them.
    """
    split = (plan.nrows + 1) // 2 * plan.ncols  # the first panel of the lower half
    upper, lower = range(split), range(split, len(plan.panels))
    fig, axes = _panel_figure(plan.nrows, plan.ncols, upper)
    ticks = _ticks(axes[0], plan.xlim, plan.ylim)
    try:
        with tempfile.NamedTemporaryFile(dir=_scratch_dir(), prefix="dk-chart-") as scratch:
            below = twin.submit(_draw_lower, plan, lower, ticks, scratch.name)
            top, _ = _render(plan, fig, axes, upper, ticks, header=True)
            first = below.result()
            pixels = np.fromfile(scratch.name, dtype=np.uint8)
    except (BrokenExecutor, OSError) as exc:  # the twin is a speed-up, not a way to fail
        log.debug("chart twin unavailable (%s); drawing in one process", exc)
        return None
    rows, width = top.shape[:2]
    if pixels.size != (rows - first) * width * 4:
        log.debug("chart twin drew %d bytes, not %d rows", pixels.size, rows - first)
        return None
    # From row ``first`` down the image is the lower half's: white above it there, so
    # nothing of the upper half may reach it.
    if _drawn_rows(top[first:]).any():
        return None
    image = top.copy()
    image[first:] = pixels.reshape(rows - first, width, 4)
    return image


def _draw_lower(plan: _Plan, which: Sequence[int], ticks: Ticks, scratch: str) -> int:
    """In the twin: draw the lower panels and write their pixels to ``scratch`` from the
    first row they touch, whose index is returned: the first non-white row, or the row of
    their axes' top edge if higher (an axes' white face would cover what is under it)."""
    fig, axes = _panel_figure(plan.nrows, plan.ncols, which)
    pixels, axes_top = _render(plan, fig, axes, which, ticks, header=False)
    drawn = np.flatnonzero(_drawn_rows(pixels[:axes_top]))
    first = int(drawn[0]) if drawn.size else axes_top
    np.ascontiguousarray(pixels[first:]).tofile(scratch)
    return first


def _scratch_dir() -> str | None:
    """Where a file is only memory: ``/dev/shm`` if there is one, else the temp dir."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _drawn_rows(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Which rows of an RGBA image hold a pixel that is not opaque white."""
    rows, width = pixels.shape[:2]
    words = np.ascontiguousarray(pixels).view(np.uint32).reshape(rows, width)
    drawn: npt.NDArray[np.bool_] = (words != _WHITE).any(axis=1)
    return drawn


#: An opaque white RGBA pixel read as one 32-bit word.
_WHITE: Final = 0xFFFFFFFF


def plot_report_file(results_path: Path, out: Path, *, title: str | None = None) -> Path:
    """Redraw the report from a stored ``results.parquet`` or ``results.csv``.

    In CSV the ``date_hour`` column is ISO 8601 text (``2020-03-01T05:00:00Z``); times
    without an offset are taken as UTC. Raises ``ValueError`` for an empty file, an
    unknown format or missing columns. Returns ``out``.
    """
    results = _read_results(Path(results_path))
    return plot_report(results, out, title=title)


# --- helpers -------------------------------------------------------------------------


def _check_results(results: pl.DataFrame, where: str) -> None:
    """Raise ``ValueError`` unless ``results`` has the columns and types the report needs."""
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(
            f"{where} is missing {quoted_names(missing)}; "
            f"the report needs {quoted_names(REQUIRED_COLUMNS)}"
        )
    schema = results.schema
    if not isinstance(schema["date_hour"], pl.Datetime | pl.Date):
        raise ValueError(
            f"column 'date_hour' in {where} must be a datetime, not {schema['date_hour']}"
        )
    for name in ("tests", "positives"):
        if not schema[name].is_integer():
            raise ValueError(f"column '{name}' in {where} must hold integers, not {schema[name]}")
    nulls = results.select(pl.any_horizontal(pl.col(*REQUIRED_COLUMNS).is_null()).sum()).item()
    if nulls:
        raise ValueError(
            f"{where} has {nulls} row(s) with an empty {quoted_names(REQUIRED_COLUMNS)}"
        )
    bad = results.select(
        ((pl.col("positives") < 0) | (pl.col("positives") > pl.col("tests"))).sum()
    ).item()
    if bad:
        raise ValueError(f"{where} has {bad} row(s) where positives is not within 0..tests")


def _utc_day(dtype: pl.DataType) -> pl.Expr:
    """The UTC calendar day of ``date_hour``; naive datetimes are taken as UTC."""
    col = pl.col("date_hour")
    if isinstance(dtype, pl.Date):
        return col
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        return col.dt.convert_time_zone("UTC").dt.date()
    return col.dt.date()


def _on_days(
    frame: pl.DataFrame, first: date, n_days: int, value: pl.Expr
) -> npt.NDArray[np.float64]:
    """``value`` per row of ``frame`` spread onto ``n_days`` days from ``first``; NaN elsewhere."""
    out = np.full(n_days, np.nan)
    index = (frame["date"] - first).dt.total_days().to_numpy()
    out[index] = frame.select(value.cast(pl.Float64)).to_series().to_numpy()
    return out


def _isolated(values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Where ``values`` is finite but both neighbours are NaN (or the edge)."""
    known: npt.NDArray[np.bool_] = np.isfinite(values)
    padded = np.pad(known, 1, constant_values=False)
    alone: npt.NDArray[np.bool_] = known & ~padded[:-2] & ~padded[2:]
    return alone


def _grid(n: int) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels: landscape, with as few empty slots as can be.

    Twenty gives 4×5, thirty 5×6, seven 2×4, three 1×3.
    """
    widest = math.ceil(math.sqrt(2 * n))
    ncols = min(
        range(math.ceil(math.sqrt(n)), widest + 1),
        key=lambda cols: (math.ceil(n / cols) * cols - n, cols),
    )
    return math.ceil(n / ncols), ncols


def _header(fig: Figure, title: str, subtitle: str, *, pooled: bool) -> None:
    """Title, subtitle and the key, left-aligned with the panels in the top margin."""
    left = _MARGIN_LEFT / fig.get_figwidth()
    height = fig.get_figheight()
    fig.text(left, 1 - 0.2 / height, title, ha="left", va="top", fontsize=15, weight="bold")
    fig.text(left, 1 - 0.55 / height, subtitle, ha="left", va="top", fontsize=10, color=_MUTED)
    key: list[Artist] = [
        Line2D([], [], color=_LINE, linewidth=1.6),
        Patch(color=_BAND, alpha=0.55, linewidth=0),
    ]
    labels = ["daily positive rate", "95% Wilson interval"]
    if pooled:
        key.append(Line2D([], [], color=_POOLED, linewidth=1.2))
        labels.append("all countries pooled")
    fig.legend(
        key,
        labels,
        loc="upper left",
        bbox_to_anchor=(left, 1 - 0.8 / height),
        borderaxespad=0,
        borderpad=0,
        ncols=3,
        frameon=False,
        fontsize=9,
        handlelength=1.8,
        columnspacing=1.8,
    )


def _y_top(daily: pl.DataFrame) -> float:
    """Upper y limit shared by all panels.

    Every daily rate stays in view, but a handful of near-empty days, whose Wilson band
    reaches far up, may not flatten all the other panels: their band is clipped instead.
    """
    high = daily["ci_high"].to_numpy()
    top = max(float(daily["positive_rate"].max()), float(np.nanquantile(high, 0.99)))  # type: ignore[arg-type]
    return min(1.0, top * 1.08) if top > 0 else 0.01


def _panel_figure(nrows: int, ncols: int, which: Sequence[int]) -> tuple[Figure, list[Axes]]:
    """A figure laid out for ``nrows`` × ``ncols`` panels, in inches, with the axes of
    the panels ``which`` (row by row from the top left).

    Fixed margins instead of constrained layout: the header needs a known place, and
    the layout solver costs more than drawing twenty panels. Few panels are widened
    (and heightened) so the header still fits across the figure. The panels are not
    shared axes: each gets the same limits, and ticks only where it shows their labels
    (its grid is drawn as two line collections), because a tick costs more to make and
    draw than a panel's data.
    """
    frame = _MARGIN_LEFT + (ncols - 1) * _GAP_W + _MARGIN_RIGHT
    panel_w = max(_PANEL_W, (_MIN_WIDTH - frame) / ncols)
    panel_h = max(_PANEL_H, min(0.45 * panel_w, 3.6))
    width = frame + ncols * panel_w
    height = _MARGIN_TOP + nrows * panel_h + (nrows - 1) * _GAP_H + _MARGIN_BOTTOM
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        nrows,
        ncols,
        left=_MARGIN_LEFT / width,
        right=1 - _MARGIN_RIGHT / width,
        bottom=_MARGIN_BOTTOM / height,
        top=1 - _MARGIN_TOP / height,
        wspace=_GAP_W / panel_w,
        hspace=_GAP_H / panel_h,
    )
    axes = [fig.add_subplot(grid[divmod(i, ncols)]) for i in which]
    for ax in axes:  # the limits are set once for all; no autoscaling per artist
        ax.set_autoscale_on(False)
    return fig, axes


Ticks = tuple[tuple[list[float], list[str]], tuple[list[float], list[str]]]


def _ticks(ax: Axes, xlim: tuple[float, float], ylim: tuple[float, float]) -> Ticks:
    """The date ticks and the percent ticks every panel has, placed and labelled once
    (on ``ax``, whose limits they are): ``((x, labels), (y, labels))``."""
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    # matplotlib.dates ships without type hints, hence the ignores on its calls.
    locator = mdates.AutoDateLocator(minticks=3, maxticks=6)  # type: ignore[no-untyped-call]
    formatter = mdates.ConciseDateFormatter(locator, show_offset=False)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(formatter)
    top = ylim[1]
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0 if top >= 0.05 else 1))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
    out = []
    for axis, (lo, hi) in ((ax.xaxis, xlim), (ax.yaxis, ylim)):
        locs = [float(v) for v in axis.get_majorticklocs() if lo <= v <= hi]
        out.append((locs, list(axis.get_major_formatter().format_ticks(locs))))
    return out[0], out[1]


def _style_panel(ax: Axes, ticks: Ticks, *, dates: bool, percents: bool) -> None:
    (xs, xlabels), (ys, ylabels) = ticks
    for axis, locs, labels, shown in (
        (ax.xaxis, xs, xlabels, dates),
        (ax.yaxis, ys, ylabels, percents),
    ):
        if shown:
            axis.set_major_locator(FixedLocator(locs))
            axis.set_major_formatter(FixedFormatter(labels))
        else:
            axis.set_major_locator(NullLocator())
    ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), colors=_GRID, lw=0.7, zorder=0.5)
    ax.hlines(ys, 0, 1, transform=ax.get_yaxis_transform(), colors=_GRID, lw=0.7, zorder=0.5)
    # Only an axis that shows labels has ticks (the others have a NullLocator): styling
    # the others' would make and restyle ticks that are never drawn.
    style = {"labelsize": 8, "length": 2.5, "color": "#999999"}
    if dates:
        ax.tick_params(axis="x", **style)
    if percents:
        ax.tick_params(axis="y", **style)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#999999")


def _band(
    ax: Axes,
    x: npt.NDArray[np.float64],
    low: npt.NDArray[np.float64],
    high: npt.NDArray[np.float64],
) -> None:
    """The 95% band between ``low`` and ``high``: ``ax.fill_between(x, low, high)``'s
    polygons (one per run of days with values), made with NumPy slices instead of
    fill_between's masked arrays, which cost more than the rest of a sparse panel."""
    ok = np.isfinite(x) & np.isfinite(low) & np.isfinite(high)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], ok.view(np.int8), [0]))))
    verts = []
    for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        t, f1, f2 = x[a:b], low[a:b], high[a:b]
        # fill_between's vertices: down the first edge, along f1, up, back along f2
        verts.append(
            np.concatenate(
                (
                    [[t[0], f2[0]]],
                    np.column_stack((t, f1)),
                    [[t[-1], f2[-1]]],
                    np.column_stack((t, f2))[::-1],
                )
            )
        )
    band = PolyCollection(verts, color=_BAND, alpha=0.55, linewidths=0, zorder=1)
    ax.add_collection(band, autolim=False)


def _short(name: str, limit: int = 22) -> str:
    """``name`` cut to fit a panel title beside the overall rate."""
    return name if len(name) <= limit else name[: limit - 1].rstrip() + "…"


def quoted_names(names: Sequence[str], noun: str = "column") -> str:
    """``column 'a'`` or ``columns 'a', 'b'``, for error messages."""
    quoted = ", ".join(f"'{name}'" for name in names)
    return f"{noun} {quoted}" if len(names) == 1 else f"{noun}s {quoted}"


def _read_results(path: Path) -> pl.DataFrame:
    """Read a results file written by the store, with ``date_hour`` as a UTC datetime."""
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"results file {path} is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            results = pl.read_parquet(path)
        elif suffix == ".csv":
            # Read date_hour as text and parse it ourselves: every ISO 8601 spelling
            # (Z, +00:00, +0000, none) lands on the same UTC instant.
            text = {"date_hour": pl.String, "country": pl.String}
            results = pl.read_csv(path, schema_overrides=text)
        else:
            raise ValueError(
                f"results file {path} is neither .parquet nor .csv; cannot tell how to read it"
            )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ValueError(f"cannot read results file {path}: {exc}") from exc
    where = f"results file {path}"
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(
            f"{where} is missing {quoted_names(missing)}; "
            f"the report needs {quoted_names(REQUIRED_COLUMNS)}"
        )
    if results.height == 0:
        raise ValueError(f"{where} has a header but no rows")
    if results.schema["date_hour"] == pl.String:
        try:
            results = results.with_columns(
                pl.col("date_hour").str.to_datetime(time_unit="us", time_zone="UTC")
            )
        except pl.exceptions.PolarsError as exc:
            raise ValueError(
                f"column 'date_hour' in {where} is not ISO 8601 text such as "
                f"2020-03-01T05:00:00Z: {exc}"
            ) from exc
    _check_results(results, where)
    return results


def save_png(fig: Figure | npt.NDArray[np.uint8], path: Path) -> Path:
    """Write ``fig`` (a figure, or a figure's RGBA pixels) as PNG to ``path`` atomically:
    a temp file beside it, then a rename.

    The file gets the mode every output file gets (``0666 & ~umask``); a failed write
    removes the temp file and raises :class:`~dispatchkit.errors.OutputError`. zlib's
    fastest level: a fifth bigger than its default and a third of the time to write.
    Pixels are written as ``savefig`` writes a figure's (``imsave``).
    """
    from matplotlib.image import imsave

    from dispatchkit.outdir import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        if isinstance(fig, Figure):
            fig.savefig(fh, format="png", dpi=_DPI, facecolor="white", pil_kwargs=PNG_OPTIONS)
        else:
            imsave(fh, fig, format="png", origin="upper", dpi=_DPI, pil_kwargs=dict(PNG_OPTIONS))
    return path
