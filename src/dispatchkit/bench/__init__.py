"""The benchmark behind ``dispatchkit bench`` (the ``bench`` extra: psutil, pandas).

``runner`` (sections, plans, repeats, checks against the floor), ``variants`` (one
variant per child process), ``kafka`` (the Kafka variants), ``measure`` (process-tree
wall time, CPU and peak memory), ``tables`` (bench.json, bench.md, the targets) and
``chart`` (bench.png). The names below are imported on first use (PEP 562): a variant's
child process, timed from its start, loads only what that variant needs.
"""

from typing import TYPE_CHECKING

from dispatchkit.lazy import lazy_exports

if TYPE_CHECKING:
    from dispatchkit.bench.runner import SECTIONS, BenchConfig, compare_results, run_benchmarks

_LAZY: dict[str, str] = {
    "SECTIONS": "dispatchkit.bench.runner",
    "BenchConfig": "dispatchkit.bench.runner",
    "compare_results": "dispatchkit.bench.runner",
    "run_benchmarks": "dispatchkit.bench.runner",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = ["SECTIONS", "BenchConfig", "compare_results", "run_benchmarks"]
