"""The COVID app's default run range, for the command line's ``--start``/``--end``.

What an input row must look like is now the app's declaration (its columns and their
rules, see :mod:`dispatchkit.app` and :mod:`dispatchkit.rules`); the built-in COVID app
(:mod:`dispatchkit.apps.covid`) declares ``country``, ``test_datetime`` and ``result``.
Its ``test_datetime`` range is ``[DEFAULT_START, DEFAULT_END)`` unless the run says
otherwise.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

DEFAULT_START: Final = datetime(2020, 3, 1, tzinfo=UTC)
DEFAULT_END: Final = datetime(2021, 1, 1, tzinfo=UTC)
