"""Judging a run: is its input good enough to run, is it complete, and what is missing.

Two checks, shared by every app and both transports:

* **Before any job is sent** (:func:`check_rows`, called once the quarantine files are
  written): a run with no valid row fails, and so does one whose bad rows exceed the
  bad-row budget (:class:`BadRowBudget`, ``--max-bad-rows``), like BigQuery's
  ``max_bad_records``. The user gets one line pointing at the quarantine file.
* **Once the results are stored** (:func:`mark_chart`): the chart of a run that is not
  complete gets a visible INCOMPLETE banner naming the missing jobs' keys (or their
  count), whatever app drew it, so a picture never passes for a whole one.

Counts always carry their unit: *rows* of input, *jobs* (one per key), *job parts* (a
job too big for one message is split), *messages* (batches of jobs or results).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dispatchkit.errors import InputRejectedError, UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from dispatchkit.reader import RowCounts

#: ``--max-bad-rows`` by default: a run whose input is more than 10 % bad rows fails.
DEFAULT_MAX_BAD_ROWS = "10%"

_FRACTION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(%?)")


@dataclass(frozen=True)
class BadRowBudget:
    """How many bad (quarantined) rows a run may have: a count, or a fraction of the rows read.

    ``BadRowBudget.parse`` reads ``--max-bad-rows``: an integer is a count of rows (``0``
    allows none), a number with a point or a ``%`` is a fraction of the rows read
    (``0.1`` and ``10%`` allow 10 %; ``1.0`` and ``100%`` allow any number).
    """

    rows: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> BadRowBudget:
        text = text.strip()
        if text.isdigit():
            return cls(rows=int(text))
        m = _FRACTION.fullmatch(text)
        if m is None:
            raise UsageError(
                f"--max-bad-rows {text!r}: give a number of rows (100) or a fraction "
                "of the rows read (0.1 or 10%)"
            )
        value = float(m.group(1)) / (100 if m.group(2) else 1)
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"--max-bad-rows {text!r}: a fraction is between 0 and 1 (100%)")
        return cls(fraction=value)

    def limit(self, rows_read: int) -> int:
        """The most bad rows allowed among ``rows_read``."""
        if self.rows is not None:
            return self.rows
        assert self.fraction is not None
        return math.floor(self.fraction * rows_read + 1e-9)

    def describe(self) -> str:
        if self.rows is not None:
            return f"{self.rows:,} rows"
        assert self.fraction is not None
        return f"{self.fraction:.4g} of the rows read ({self.fraction * 100:.4g} %)"


def check_rows(run_id: str, counts: RowCounts, budget: BadRowBudget, quarantine: Path) -> None:
    """Refuse a run with no valid row, or with more bad rows than ``budget``.

    Called after the quarantine files are written, so the line can point at them.
    Raises :class:`~dispatchkit.errors.InputRejectedError` (exit code 1).
    """
    rows_read, rows_bad = counts.rows_read, counts.rows_bad
    top = sorted(counts.bad.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in top)
    why = f" ({reasons})" if reasons else ""
    if counts.rows_valid == 0 and rows_read > 0:
        raise InputRejectedError(
            f"run {run_id}: no valid row: all {rows_read:,} rows read were quarantined{why}; "
            f"see {quarantine}"
        )
    allowed = budget.limit(rows_read)
    if rows_bad > allowed:
        raise InputRejectedError(
            f"run {run_id}: {rows_bad:,} of {rows_read:,} rows read are bad{why}, more than "
            f"--max-bad-rows {budget.describe()} allows; nothing was sent; see {quarantine} "
            "(or raise --max-bad-rows)"
        )


def missing_lines(
    jobs_total: int, jobs_done: int, failed: list[str], limit: int = 5, *, keys: bool = True
) -> list[str]:
    """What an incomplete run lacks, in a few lines: the count, then the known keys.

    ``failed`` holds ``"key: error"`` of the dead-lettered jobs; jobs missing without a
    dead letter (a collect that timed out) are only counted.
    """
    missing = jobs_total - jobs_done
    lines = [f"INCOMPLETE: {missing:,} of {jobs_total:,} jobs missing, no result for them"]
    dead = [f.partition(": ")[0] for f in failed]
    if dead and keys:
        lines.append(f"{len(dead):,} dead-lettered jobs: {_key_summary(dead, limit)}")
    unknown = missing - len(dead)
    if unknown > 0:
        lines.append(f"{unknown:,} jobs not done yet (no dead letter)")
    return lines


def _key_summary(keys: list[str], limit: int) -> str:
    """A few keys as text; many that share their first part (``country=Italy …``) as
    that part and a count, so one lost country reads as one name, not 600 hours."""
    if len(keys) <= limit:
        return ", ".join(keys)
    groups: dict[str, int] = {}
    for key in keys:
        first = key.split(" ", 1)[0]
        groups[first] = groups.get(first, 0) + 1
    if len(groups) < len(keys):
        top = sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{part} ({n:,} jobs)" for part, n in top[:limit])
        rest = sum(n for _, n in top[limit:])
        return shown + (f" and {rest:,} more jobs" if rest else "")
    return ", ".join(keys[:limit]) + f" and {len(keys) - limit:,} more"


def mark_chart(path: Path, lines: list[str]) -> None:
    """Put a red INCOMPLETE banner of ``lines`` above the chart at ``path``, in place.

    Works on any app's PNG: the picture is kept pixel for pixel below the banner.
    """
    import matplotlib.image as mpimg
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dispatchkit.outdir import atomic_path

    with Path(path).open("rb") as fh:  # a temp name: the format cannot come from it
        image = mpimg.imread(fh, format="png")
    height, width = image.shape[:2]
    dpi = 100
    banner = int(28 + 22 * len(lines))
    fig = Figure(figsize=(width / dpi, (height + banner) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.figimage(image, xo=0, yo=0, origin="upper")
    top = 1 - 8 / (height + banner)
    fits = max(20, width // 8)  # characters of a 10-point line across the picture
    for i, line in enumerate(lines):
        line = line if len(line) <= fits else line[: fits - 1] + "…"
        fig.text(
            8 / width,
            top - i * 22 / (height + banner),
            line,
            ha="left",
            va="top",
            color="white",
            fontsize=13 if i == 0 else 10,
            weight="bold" if i == 0 else "normal",
            bbox={"facecolor": "#b00020", "edgecolor": "none", "pad": 3},
        )
    fig.patches.append(_band(fig, banner / (height + banner)))
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi, facecolor="white", pil_kwargs={"compress_level": 1})


def _band(fig: Figure, fraction: float) -> Rectangle:
    """The pale red strip behind the banner, across the top of the figure."""
    from matplotlib.patches import Rectangle

    return Rectangle(
        (0, 1 - fraction),
        1,
        fraction,
        transform=fig.transFigure,
        figure=fig,
        facecolor="#fbe3e6",
        edgecolor="#b00020",
        linewidth=2,
        zorder=0,
    )
