"""The benchmark chart: wall time and peak memory per variant, side by side.

Built like the report (:mod:`dispatchkit.apps.covid.chart`): a :class:`~matplotlib.figure.Figure`
on an Agg canvas, never ``pyplot``, written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dispatchkit.apps.covid.chart import quoted_names, save_png

__all__ = ["BENCHMARK_KEYS", "plot_benchmark"]

#: The benchmark row keys that :func:`plot_benchmark` reads.
BENCHMARK_KEYS: tuple[str, ...] = (
    "variant",
    "wall_median_s",
    "wall_min_s",
    "wall_max_s",
    "peak_rss_max_mb",
    "peak_rss_total_mb",
)

_DPI = 120
_GRID = "#e3e3e3"
_WALL = "#1f5fa6"
_RSS_MAX = "#e08a2c"
_RSS_TOTAL = "#f3c58f"


def plot_benchmark(rows: Sequence[Mapping[str, object]], path: Path, *, title: str) -> Path:
    """Draw wall time and peak memory per benchmark variant, two panels side by side.

    Left: median wall time with a min–max whisker. Right: peak resident memory of the
    largest process and of all processes together. Variants are drawn top to bottom in
    the order given; a NaN value (not measured) leaves out its bar and label. Returns
    ``path``.
    """
    if not rows:
        raise ValueError("no benchmark rows to plot")
    variants: list[str] = []
    values: dict[str, list[float]] = {key: [] for key in BENCHMARK_KEYS[1:]}
    for i, row in enumerate(rows):
        missing = [key for key in BENCHMARK_KEYS if key not in row]
        if missing:
            raise ValueError(f"benchmark row {i} is missing {quoted_names(missing, 'key')}")
        variants.append(str(row["variant"]))
        for key, column in values.items():
            column.append(_number(row[key], key, i))

    n = len(variants)
    y = np.arange(n, dtype=np.float64)
    fig = Figure(figsize=(12.0, 1.6 + 0.75 * n), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    wall_ax, rss_ax = fig.subplots(1, 2, sharey=True)

    median = np.array(values["wall_median_s"])
    low = np.array(values["wall_min_s"])
    high = np.array(values["wall_max_s"])
    # A missing min or max (NaN) just drops that whisker.
    xerr = np.nan_to_num(
        np.vstack([np.clip(median - low, 0, None), np.clip(high - median, 0, None)])
    )
    wall_ax.barh(y, median, height=0.6, color=_WALL, xerr=xerr, capsize=4, ecolor="#333333")
    for yi, m, hi in zip(y, median, high, strict=True):
        if not math.isfinite(m):
            continue
        wall_ax.annotate(
            _seconds(m),
            (max(m, hi) if math.isfinite(hi) else m, yi),
            xytext=(5, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
        )
    wall_ax.set_title("Wall time, median of runs (whisker: min–max)", loc="left", fontsize=11)
    wall_ax.set_xlabel("seconds")
    wall_ax.set_xlim(0, _headroom(np.concatenate([median, high])))

    rss_max = np.array(values["peak_rss_max_mb"])
    rss_total = np.array(values["peak_rss_total_mb"])
    h = 0.36
    rss_ax.barh(y - h / 2, rss_max, height=h, color=_RSS_MAX, label="largest process")
    rss_ax.barh(y + h / 2, rss_total, height=h, color=_RSS_TOTAL, label="all processes")
    for yi, a, b in zip(y, rss_max, rss_total, strict=True):
        for offset, v in ((-h / 2, a), (h / 2, b)):
            if not math.isfinite(v):
                continue
            rss_ax.annotate(
                f"{v:,.0f} MB",
                (v, yi + offset),
                xytext=(5, 0),
                textcoords="offset points",
                va="center",
                fontsize=9,
            )
    rss_ax.set_title("Peak memory (RSS)", loc="left", fontsize=11)
    rss_ax.set_xlabel("MB")
    rss_ax.set_xlim(0, _headroom(np.concatenate([rss_max, rss_total])))
    # Above the panel, right of its title: inside it would cover the longest bar.
    rss_ax.legend(
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=2,
        fontsize=9,
        frameon=False,
        borderaxespad=0.2,
    )

    wall_ax.set_yticks(y, variants)
    wall_ax.invert_yaxis()
    for ax in (wall_ax, rss_ax):
        ax.grid(axis="x", color=_GRID, linewidth=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(axis="y", length=0)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=14, fontweight="bold")
    return save_png(fig, path)


def _headroom(values: npt.NDArray[np.float64]) -> float:
    """An x limit that leaves room for the value labels right of the longest bar."""
    top = float(np.nanmax(values)) if values.size and np.isfinite(values).any() else 0.0
    return top * 1.22 if top > 0 else 1.0


def _seconds(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f} s"
    if value >= 10:
        return f"{value:.1f} s"
    return f"{value:.2f} s"


def _number(value: object, key: str, row: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"benchmark row {row}: '{key}' must be a number, not {value!r}")
    return float(value)
