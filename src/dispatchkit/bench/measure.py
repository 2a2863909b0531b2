"""Measuring one benchmark process: wall time, peak memory of its process tree, CPU time.

:func:`measure` starts a command in its own process group and samples the whole tree
(the process and every descendant: worker processes, Kafka worker CLIs) every
``interval`` seconds with psutil until it exits:

* ``peak_rss_total_mb`` — the largest sum of resident set sizes seen at one sample, so
  a peak shorter than the interval can be missed, and pages shared between processes
  (libraries, copy-on-write) are counted once per process;
* ``peak_rss_max_mb`` — the largest single process's high-water mark. Each sample reads
  ``VmHWM`` from ``/proc/PID/status`` (the kernel's exact peak, not a sample), and the
  ``wait4`` rusage of the root adds the peak of every descendant it reaped, so nothing
  between samples is missed;
* ``main_rss_mb`` — the root process's own high-water mark (for dispatchkit: the
  dispatcher, collector and store, with DuckDB's threads);
* ``cpu_s`` — user + system seconds of the tree, from ``wait4`` (children are counted
  once reaped; every variant reaps its workers before it exits);
* ``extra_rss_mb`` and ``extra_cpu_s`` — the peak RSS and the CPU seconds used meanwhile
  by processes outside the tree that are named by pid (the Kafka broker's JVM), never
  added to the totals.

Memory sizes are in MB of 10**6 bytes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MB = 1_000_000


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` saw of one process tree."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_max_mb: float
    peak_rss_total_mb: float
    main_rss_mb: float
    processes: int
    extra_rss_mb: dict[int, float] = field(default_factory=dict)
    extra_cpu_s: dict[int, float] = field(default_factory=dict)


def _hwm_bytes(pid: int) -> int | None:
    """The kernel's peak RSS of ``pid`` (``VmHWM``), or ``None`` off Linux or once gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Tree:
    """Sampler state: the processes seen so far and the largest values seen."""

    def __init__(self, root: int, extra: Sequence[int]) -> None:
        self.root = root
        self.procs: dict[int, psutil.Process] = {}
        self.peak: dict[int, int] = {}
        self.peak_total = 0
        self.extra = {pid: 0 for pid in extra}
        self._extra_procs: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            self.procs[root] = psutil.Process(root)
        self.extra_cpu0: dict[int, float] = {}
        for pid in extra:
            with contextlib.suppress(psutil.Error):
                self._extra_procs[pid] = psutil.Process(pid)
                self.extra_cpu0[pid] = _cpu_of(self._extra_procs[pid])

    def extra_cpu(self) -> dict[int, float]:
        out = {}
        for pid, proc in self._extra_procs.items():
            with contextlib.suppress(psutil.Error):
                out[pid] = _cpu_of(proc) - self.extra_cpu0[pid]
        return out

    def sample(self) -> None:
        root = self.procs.get(self.root)
        if root is not None:
            try:
                for child in root.children(recursive=True):
                    self.procs.setdefault(child.pid, child)
            except psutil.Error:
                pass
        total = 0
        for pid, proc in list(self.procs.items()):
            try:
                rss = int(proc.memory_info().rss)
            except psutil.Error:
                continue
            hwm = _hwm_bytes(pid) or rss
            total += rss
            self.peak[pid] = max(self.peak.get(pid, 0), hwm, rss)
        self.peak_total = max(self.peak_total, total)
        for pid, proc in self._extra_procs.items():
            with contextlib.suppress(psutil.Error):
                self.extra[pid] = max(self.extra[pid], int(proc.memory_info().rss))


def measure(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    interval: float = 0.05,
    extra_pids: Sequence[int] = (),
    timeout: float | None = None,
) -> Measurement:
    """Run ``cmd`` to its end while sampling its process tree; see the module docstring.

    Output goes to ``log`` (or nowhere). On ``KeyboardInterrupt`` or ``timeout`` the
    whole process group is killed before the exception propagates.
    """
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]
    tree = _Tree(proc.pid, extra_pids)
    deadline = None if timeout is None else t0 + timeout
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree.sample()
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"{cmd[0]} ran longer than {timeout:.0f} s")
            time.sleep(interval)
    except BaseException:
        _kill_group(proc)
        raise
    wall = time.perf_counter() - t0
    extra_cpu = tree.extra_cpu()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Descendants reaped by the root count in ru_maxrss (KiB on Linux, bytes on macOS).
    scale = 1 if os.uname().sysname == "Darwin" else 1024
    reaped = int(usage.ru_maxrss) * scale
    largest = max([reaped, *tree.peak.values()])
    return Measurement(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=float(usage.ru_utime + usage.ru_stime),
        peak_rss_max_mb=largest / MB,
        peak_rss_total_mb=max(tree.peak_total, largest) / MB,
        main_rss_mb=tree.peak.get(proc.pid, reaped) / MB,
        processes=len(tree.procs),
        extra_rss_mb={pid: v / MB for pid, v in tree.extra.items() if v},
        extra_cpu_s=extra_cpu,
    )


def _cpu_of(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        proc.wait(10)
