"""``dispatchkit bench``: the same input through every way of computing the job, measured.

Sections, each on its own generated input (cached under ``data_dir``):

``main``        pandas monolith, the single-process Polars floor, dispatchkit embedded
                (``workers``) and on Kafka (``kafka_workers``: ``run --broker kafka``,
                worker processes started by the run; ``warm_workers``: workers already
                running in their group, as in a deployment), on ``rows`` rows;
``components``  the dispatcher alone (no transport), and Kafka *staged*: dispatch every
                job first, then start one worker and let it drain — the dispatcher's
                rows/s and a worker's jobs/s, each measured without the other running;
``heavy``       the CPU-heavy ``beta-posterior`` task on ``heavy_rows`` rows: pandas
                monolith against dispatchkit embedded with 1, 2, … workers, and on Kafka
                with 1 and 2;
``memory``      at each of ``memory_scales`` rows, once: peak memory of the pandas
                monolith (up to 20M rows) against dispatchkit embedded (off unless asked
                for: it takes minutes);
``commands``    whole commands timed from exec to exit — ``dispatchkit run`` with and
                without the report, on Kafka, with workers already running — against a
                whole-process Polars script; and the same on 20,000 rows (``fixed``):
                :mod:`dispatchkit.bench.commands`;
``overhead``    a no-op task on ``overhead_jobs`` one-row jobs: the worker's µs per job
                on top of the function, and the dispatcher's jobs/s
                (:mod:`dispatchkit.bench.overhead`);
``apps``        every example app's task, a whole ``dispatchkit run --app`` against that
                statistic's own Polars floor (:mod:`dispatchkit.bench.apps`).

Every variant runs in a process of its own (:mod:`dispatchkit.bench.variants`) that
:func:`dispatchkit.bench.measure.measure` samples. Repeats are interleaved (round ``r``
runs every variant once) so a noisy neighbour slows all variants alike. Before a run
counts, its ``(country, date_hour, tests, positives)`` must equal the floor's, row for
row, or the benchmark stops with :class:`~dispatchkit.errors.RunError`.

``sections`` picks some of them. Without ``kafka_settings`` and with ``kafka`` on, a
local broker is started (:mod:`dispatchkit.bench.kafka`); its JVM's memory and CPU are
reported apart and never added to a variant's.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl

from dispatchkit.app import load_app
from dispatchkit.bench.kafka import KafkaTarget, kafka_target
from dispatchkit.bench.measure import measure
from dispatchkit.brokers.kafka.settings import KafkaSettings
from dispatchkit.errors import RunError, UsageError

Row = dict[str, Any]
SECTIONS = ("main", "components", "heavy", "memory", "commands", "overhead", "apps", "peers")
#: The pandas monolith is left out of memory runs bigger than this (~200 bytes a row).
PANDAS_MAX_ROWS = 20_000_000


@dataclass(frozen=True)
class BenchConfig:
    """What to run; :meth:`quick` is the CI smoke test's shape."""

    out: Path
    rows: int = 2_000_000
    repeats: int = 3
    workers: tuple[int, ...] = (1, 2)
    kafka_workers: tuple[int, ...] = (1, 2, 4)
    warm_workers: tuple[int, ...] = (1, 2)
    kafka: bool = True
    kafka_settings: KafkaSettings | None = None
    topic_prefix: str = "dkbench"
    partitions: int = 12
    task: str = "positive-rate"
    heavy_rows: int = 20_000
    memory_scales: tuple[int, ...] = ()
    memory_workers: int = 2
    sections: tuple[str, ...] = SECTIONS
    seed: int = 42
    data_dir: Path | None = None
    overhead_jobs: int = 1_000_000
    command: str = ""
    # The peers section (dispatchkit.bench.peers): only with peers=True, never in quick.
    peers: bool = False
    peers_rows: int = 0  # 0: rows
    peers_slow_rows: int = 0  # 0: peers_rows
    peers_slow_repeats: int = 0  # repeats of Dask, Spark, Celery per job; 0: repeats

    @classmethod
    def quick(cls, out: Path, **changes: Any) -> BenchConfig:
        quick = cls(out=out, rows=20_000, repeats=1, heavy_rows=2_000, overhead_jobs=5_000)
        return replace(quick, **changes)

    def check(self) -> None:
        """Raise :class:`UsageError` for settings that cannot work."""
        load_app(None).get_task(self.task)
        if self.rows < 1 or self.repeats < 1:
            raise UsageError("--rows and --repeats must be at least 1")
        counts = (*self.workers, *self.kafka_workers, *self.warm_workers, self.memory_workers)
        if any(w < 1 for w in counts):
            raise UsageError("worker counts must be at least 1")
        if self.heavy_rows < 0 or any(s < 1 for s in self.memory_scales):
            raise UsageError("--heavy-rows cannot be negative, --memory-scale must be positive")
        if self.overhead_jobs < 1:
            raise UsageError("--overhead-jobs must be at least 1")
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown or not self.sections:
            raise UsageError(
                f"--sections: unknown {', '.join(unknown) or 'none given'} "
                f"(choose from {', '.join(SECTIONS)})"
            )
        if self.sections == ("memory",) and not self.memory_scales:
            raise UsageError("--sections memory needs --memory-scale ROWS")
        if "peers" in self.sections and self.sections != SECTIONS and not self.peers:
            raise UsageError("--sections peers needs --peers")
        if min(self.peers_rows, self.peers_slow_rows, self.peers_slow_repeats) < 0:
            raise UsageError("--peers-rows, --peers-slow-rows and --peers-slow-repeats >= 0")
        if "apps" in self.sections:
            from dispatchkit.bench.apps import checkout

            checkout()  # the example apps live in a source checkout
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file, not a directory")


@dataclass(frozen=True)
class Plan:
    """One variant of one section: what to run, and how to label it."""

    section: str
    key: str
    label: str
    variant: str
    input: Path
    task: str = "positive-rate"
    workers: int = 0
    kafka: bool = False
    shown: bool = True
    repeats: int = 0  # run in the first this many rounds only; 0: every round


@dataclass
class _State:
    config: BenchConfig
    kafka: KafkaTarget | None
    say: Callable[[str], None]
    samples: dict[str, list[Row]] = field(default_factory=dict)
    references: dict[str, pl.DataFrame] = field(default_factory=dict)
    inputs: dict[str, Row] = field(default_factory=dict)
    shown: list[Plan] = field(default_factory=list)


def run_benchmarks(config: BenchConfig, say: Callable[[str], None] | None = None) -> list[Row]:
    """Run every section ``config`` asks for; write bench.json/.md/.png; return the rows."""
    from dispatchkit.bench.tables import code_version, machine, write_outputs

    config.check()
    config.out.mkdir(parents=True, exist_ok=True)
    code_at_start = code_version()
    state = _State(config, None, say or (lambda _: None))
    _compile_bytecode(state.say)
    with kafka_target(config, state.say) as target:
        state.kafka = target
        for section, plans, repeats in _sections(state):
            _run_section(state, section, plans, repeats)
    rows = [_aggregate(plan, state.samples[f"{plan.section}/{plan.key}"]) for plan in state.shown]
    info = machine(target.description if target else "not run")
    if info["code"] != code_at_start:  # someone changed the code under the benchmark
        info["code"] = f"{code_at_start} at the start, {info['code']} at the end"
    write_outputs(config, rows, info, state.inputs)
    return rows


def _compile_bytecode(say: Callable[[str], None]) -> None:
    """Compile dispatchkit's bytecode now, as installing a wheel does, so that no timing
    includes compiling it (an editable install under ``PYTHONDONTWRITEBYTECODE`` would
    compile every module at every start of every process)."""
    import compileall

    import dispatchkit

    package = Path(dispatchkit.__file__).parent
    if not compileall.compile_dir(package, quiet=2):
        say(f"could not compile the bytecode under {package}: timings include compiling it")


def _sections(state: _State) -> Iterator[tuple[str, list[Plan], int]]:
    """Each section's plans; the first, a floor, is the reference its results must equal."""
    c = state.config
    wanted = set(c.sections)
    if wanted & {"main", "components"}:
        main_in = _input(state, "main", c.rows)
    if "main" in wanted:
        main = [Plan("main", "floor", "polars floor", "floor", main_in)]
        main.append(Plan("main", "pandas", "pandas monolith", "pandas", main_in, c.task))
        main += [
            Plan("main", f"embedded-{w}", f"embedded ×{w}", "embedded", main_in, c.task, w)
            for w in c.workers
        ]
        if state.kafka is not None:
            main += [
                Plan("main", f"kafka-{w}", f"kafka ×{w}", "kafka", main_in, c.task, w, True)
                for w in c.kafka_workers
            ]
            main += [
                Plan(
                    "main", f"warm-{w}", f"kafka ×{w}, warm", "kafka-warm", main_in, c.task, w, True
                )
                for w in c.warm_workers
            ]
        yield "main", main, c.repeats
    if "components" in wanted:
        comp = [
            Plan("components", "floor", "polars floor", "floor", main_in, shown=False),
            Plan("components", "dispatcher", "dispatcher only", "dispatcher", main_in, c.task),
        ]
        if state.kafka is not None:
            label = "kafka staged ×1"
            comp.append(
                Plan("components", "staged-1", label, "kafka-staged", main_in, c.task, 1, True)
            )
        yield "components", comp, c.repeats
    if "heavy" in wanted and c.heavy_rows:
        heavy_in = _input(state, "heavy", c.heavy_rows)
        task = "beta-posterior"
        heavy = [Plan("heavy", "floor", "polars floor", "floor", heavy_in, shown=False)]
        heavy.append(Plan("heavy", "pandas", "pandas monolith", "pandas", heavy_in, task))
        heavy += [
            Plan("heavy", f"embedded-{w}", f"embedded ×{w}", "embedded", heavy_in, task, w)
            for w in sorted({1, 2, *c.workers})
        ]
        if state.kafka is not None:
            heavy += [
                Plan("heavy", f"kafka-{w}", f"kafka ×{w}", "kafka", heavy_in, task, w, True)
                for w in (1, 2)
            ]
        yield "heavy", heavy, c.repeats
    if "memory" in wanted:
        # One group per scale, each with its floor first; keys carry the scale when
        # there are several.
        w = c.memory_workers
        many = len(c.memory_scales) > 1
        for scale in sorted(set(c.memory_scales)):
            mem_in = _input(state, f"memory-{scale}" if many else "memory", scale)
            at, of = (f"@{scale}", f", {scale:,} rows") if many else ("", "")
            mem = [Plan("memory", f"floor{at}", f"polars floor{of}", "floor", mem_in)]
            if scale <= PANDAS_MAX_ROWS:
                mem.append(Plan("memory", f"pandas{at}", f"pandas monolith{of}", "pandas", mem_in))
            mem.append(
                Plan(
                    "memory",
                    f"embedded-{w}{at}",
                    f"embedded ×{w}{of}",
                    "embedded",
                    mem_in,
                    workers=w,
                )
            )
            yield "memory", mem, 1
    if "commands" in wanted:
        from dispatchkit.bench import commands

        yield from commands.sections(state)
    if "overhead" in wanted:
        from dispatchkit.bench import overhead

        yield from overhead.sections(state)
    if "apps" in wanted:
        from dispatchkit.bench import apps

        yield from apps.sections(state)
    if "peers" in wanted and c.peers:
        from dispatchkit.bench import peers

        def peer_input(section: str, rows: int) -> Path:
            return _input(state, section, rows)

        yield from peers.plans(c, peer_input, state.kafka is not None, state.say)


def _input(state: _State, section: str, rows: int) -> Path:
    from dispatchkit.apps.covid.generate import GenerateSpec, generate

    c = state.config
    path = (c.data_dir or c.out / "data") / f"covid_{rows}_seed{c.seed}.parquet"
    info: Row = {"rows": rows, "path": str(path), "generate_s": None}
    if not path.exists():
        state.say(f"generating {rows:,} rows → {path}")
        t0 = time.perf_counter()
        generate(GenerateSpec(rows=rows, seed=c.seed), path)
        info["generate_s"] = time.perf_counter() - t0
    info["bytes"] = path.stat().st_size
    state.inputs[section] = info
    return path


def _run_section(state: _State, section: str, plans: list[Plan], repeats: int) -> None:
    state.shown.extend(p for p in plans if p.shown)
    for r in range(repeats):
        for plan in plans:
            if plan.repeats and r >= plan.repeats:
                continue
            sample = _run_once(state, plan, r)
            state.samples.setdefault(f"{section}/{plan.key}", []).append(sample)
            state.say(
                f"[{section} {r + 1}/{repeats}] {plan.label:<18} {sample['wall_s']:8.2f} s  "
                f"{sample['peak_rss_max_mb']:7.0f} MB largest  "
                f"{sample['peak_rss_total_mb']:7.0f} MB all  {sample['cpu_s']:7.1f} CPU s"
            )


def _run_once(state: _State, plan: Plan, repeat: int) -> Row:
    c = state.config
    base = c.out / "runs" / plan.section / f"{plan.key}-r{repeat + 1}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    own = _own_variants().get(plan.variant)
    if own is not None:  # whole commands and in-process figures, measured by their module
        return own(state, plan, base)
    spec: Row = {
        "variant": plan.variant,
        "input": str(plan.input),
        "task": plan.task,
        "workers": plan.workers,
        "run_dir": str(base / "run"),
        "check": str(base / "check.parquet"),
        "outcome": str(base / "outcome.json"),
    }
    env = dict(os.environ)
    extra: list[int] = []
    if plan.kafka:
        from dispatchkit.kafka_run import worker_env

        assert state.kafka is not None
        settings = state.kafka.settings
        spec["topic_prefix"] = f"{settings.topic_prefix}.{uuid.uuid4().hex[:10]}"
        spec["partitions"] = settings.partitions
        env = worker_env(settings)
        extra = [state.kafka.broker_pid] if state.kafka.broker_pid else []
    (base / "spec.json").write_text(json.dumps(spec, indent=1))
    log = base / "log.txt"
    cmd = [sys.executable, "-m", "dispatchkit.bench.variants", str(base / "spec.json")]
    m = measure(cmd, env=env, log=log, extra_pids=extra)
    if m.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        raise RunError(
            f"{plan.section}: {plan.label} failed (exit {m.returncode}); see {log}:\n  "
            + "\n  ".join(tail)
        )
    outcome = json.loads((base / "outcome.json").read_text())
    _check(state, plan, outcome)
    shutil.rmtree(base / "run", ignore_errors=True)
    return {
        **outcome,
        "outer_wall_s": m.wall_s,
        "process_cpu_s": m.cpu_s,
        "peak_rss_max_mb": m.peak_rss_max_mb,
        "peak_rss_total_mb": m.peak_rss_total_mb,
        "main_rss_mb": m.main_rss_mb,
        "broker_rss_mb": max(m.extra_rss_mb.values(), default=None),
        "broker_cpu_s": sum(m.extra_cpu_s.values()) if m.extra_cpu_s else None,
        "processes": m.processes,
        # Other work on the machine skews a run: keep the load next to its numbers.
        "load_1m": os.getloadavg()[0],
        "cpu_pressure": _cpu_pressure(),
    }


def _own_variants() -> dict[str, Callable[[_State, Plan, Path], Row]]:
    """The variants the ``commands``, ``overhead`` and ``apps`` modules run themselves."""
    from dispatchkit.bench import apps, commands, overhead

    return {**commands.VARIANTS, **overhead.VARIANTS, **apps.VARIANTS}


def _cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some runnable task waited for a CPU."""
    try:
        first = Path("/proc/pressure/cpu").read_text().split()
        return float(first[1].partition("=")[2])
    except (OSError, IndexError, ValueError):
        return None


def _check(state: _State, plan: Plan, outcome: Row) -> None:
    """The run's results must equal the floor's (each section runs its floor first)."""
    if plan.variant == "floor":
        state.references[plan.section] = pl.read_parquet(outcome["check"])
        return
    ref = state.references[plan.section]
    if plan.variant == "dispatcher":
        if outcome["jobs"] != ref.height:
            raise RunError(f"dispatcher cut {outcome['jobs']:,} jobs; the floor has {ref.height:,}")
        return
    if outcome["check"] is None:
        raise RunError(f"{plan.section}: {plan.label} wrote no results")
    got = pl.read_parquet(outcome["check"])
    compare_results(got, ref, f"{plan.section}: {plan.label}")
    Path(outcome["check"]).unlink()


def compare_results(got: pl.DataFrame, expected: pl.DataFrame, what: str) -> None:
    """Raise :class:`RunError` unless ``got`` equals ``expected`` row for row."""
    if got.equals(expected):
        return
    keys = ["country", "date_hour"]
    missing = expected.join(got, on=keys, how="anti").height
    extra = got.join(expected, on=keys, how="anti").height
    both = got.join(expected, on=keys, suffix="_floor")
    wrong = both.filter(
        (pl.col("tests") != pl.col("tests_floor"))
        | (pl.col("positives") != pl.col("positives_floor"))
    )
    first = wrong.row(0, named=True) if wrong.height else None
    raise RunError(
        f"{what}: results differ from the floor's — {got.height:,} keys vs {expected.height:,}, "
        f"{missing:,} missing, {extra:,} extra, {wrong.height:,} with other counts"
        + (f" (first: {first})" if first else "")
    )


def _aggregate(plan: Plan, samples: list[Row]) -> Row:
    walls = [s["wall_s"] for s in samples]
    median = statistics.median(walls)
    phases: dict[str, float] = {}
    for name in samples[0]["phases"]:
        phases[name] = statistics.median(s["phases"].get(name, 0.0) for s in samples)
    rates = [r for s in samples for r in s["worker_jobs_per_s"]]
    brokers = [s["broker_rss_mb"] for s in samples if s["broker_rss_mb"] is not None]
    broker_cpu = [s["broker_cpu_s"] for s in samples if s["broker_cpu_s"] is not None]
    return {
        "section": plan.section,
        "key": plan.key,
        "variant": plan.label,
        "task": plan.task,
        "workers": plan.workers,
        "rows": samples[0]["rows"],
        "jobs": samples[0]["jobs"],
        "repeats": len(samples),
        "wall_s": walls,
        "wall_median_s": median,
        "wall_min_s": min(walls),
        "wall_max_s": max(walls),
        "rows_per_s": samples[0]["rows"] / median,
        "jobs_per_s": samples[0]["jobs"] / median,
        "cpu_s": statistics.median(s["cpu_s"] for s in samples),
        "peak_rss_max_mb": max(s["peak_rss_max_mb"] for s in samples),
        "peak_rss_total_mb": max(s["peak_rss_total_mb"] for s in samples),
        "main_rss_mb": max(s["main_rss_mb"] for s in samples),
        "broker_rss_mb": max(brokers) if brokers else None,
        "broker_cpu_s": statistics.median(broker_cpu) if broker_cpu else None,
        "phases": phases,
        "worker_jobs_per_s": statistics.median(rates) if rates else None,
        "extra": samples[0]["extra"],
        "load_1m": [round(s["load_1m"], 2) for s in samples],
        "cpu_pressure": [s["cpu_pressure"] for s in samples],
        "results_match": True,
    }
