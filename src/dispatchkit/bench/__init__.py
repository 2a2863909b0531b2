"""The benchmark behind ``dispatchkit bench`` (the ``bench`` extra: psutil, pandas).

``runner`` (sections, plans, repeats, checks against the floor), ``variants`` (one
variant per child process), ``kafka`` (the Kafka variants), ``measure`` (process-tree
wall time, CPU and peak memory), ``tables`` (bench.json, bench.md, the targets) and
``chart`` (bench.png). The names below are imported on first use (PEP 562): a variant's
child process, timed from its start, loads only what that variant needs.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatchkit.bench.runner import SECTIONS, BenchConfig, compare_results, run_benchmarks

_LAZY: dict[str, str] = {
    "SECTIONS": "dispatchkit.bench.runner",
    "BenchConfig": "dispatchkit.bench.runner",
    "compare_results": "dispatchkit.bench.runner",
    "run_benchmarks": "dispatchkit.bench.runner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dispatchkit.bench' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["SECTIONS", "BenchConfig", "compare_results", "run_benchmarks"]
