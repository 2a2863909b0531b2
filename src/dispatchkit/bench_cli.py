"""The ``bench`` subcommand (registered by cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Add = Callable[..., argparse.ArgumentParser]
Flags = Callable[..., None]


def register(add: Add, kafka_flags: Flags) -> None:
    """Add ``dispatchkit bench``; see :mod:`dispatchkit.bench`."""
