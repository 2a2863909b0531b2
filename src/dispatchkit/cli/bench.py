"""The ``bench`` subcommand (registered by :mod:`dispatchkit.cli`): flags to a config, run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dispatchkit.cli.args import kafka_settings_from_args, positive_int
from dispatchkit.cli.progress import Bars
from dispatchkit.errors import RET_OK, UsageError

if TYPE_CHECKING:
    from dispatchkit.bench import BenchConfig

#: The benchmark's sections (kept here too: --help must not import the benchmark).
SECTIONS = ("main", "components", "heavy", "memory", "commands", "overhead", "apps", "peers")

Add = Callable[..., argparse.ArgumentParser]
Flags = Callable[..., None]

EXAMPLES = """examples:
  dispatchkit bench --out bench-out                 # everything, 2M rows, 3 repeats
  dispatchkit bench --quick --no-kafka --out /tmp/b # smoke test, a minute
  dispatchkit bench --rows 500000 --repeats 5 --workers 1,2 --kafka-workers 2
  dispatchkit bench --sections heavy --heavy-rows 50000 --repeats 5
  dispatchkit bench --sections memory --memory-scale 20000000,100000000
  dispatchkit bench --sections commands,overhead,apps --repeats 3   # the targets' ratios
  dispatchkit bench -b 127.0.0.1:9092 --partitions 24   # an existing cluster
  dispatchkit bench --sections peers --peers --no-kafka  # vs Dask, Spark, Celery, DuckDB

Without -b (or $DISPATCHKIT_BOOTSTRAP_SERVERS) the Kafka variants start a local broker
with scripts/kafka (instance 'bench', port 45092) and stop it afterwards; that needs the
root of a source checkout as the working directory.
Writes bench.json, bench.md and bench.png (plus bench-heavy.png, bench-memory.png).
--peers needs the peers extra (pip install 'dispatchkit[peers]'), Java for PySpark and
redis-server for Celery; a peer without them is skipped with a line saying so.
"""


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give worker counts of at least 1, e.g. 1,2")
    return values


def _sizes(text: str) -> tuple[int, ...]:
    """Row counts, comma-separated; "0" or "" for none."""
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of row counts"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: row counts cannot be negative")
    return tuple(v for v in values if v)


def _count(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be negative")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def register(add: Add, kafka_flags: Flags) -> None:
    """Add ``dispatchkit bench``; see :mod:`dispatchkit.bench`."""
    b = add(
        "bench",
        "benchmark pandas, a Polars floor, dispatchkit embedded and on Kafka on one input",
        EXAMPLES,
        cmd_bench,
    )
    b.add_argument("--out", default="bench-out", help="directory for bench.json/.md/.png")
    # "%(default).0s" prints nothing; it only stops the formatter adding "(default: None)"
    # to options whose default depends on --quick.
    b.add_argument(
        "--rows",
        type=positive_int,
        help="rows of the main input (default: 2000000; 20000 with --quick)%(default).0s",
    )
    b.add_argument(
        "--repeats",
        type=positive_int,
        help="runs of every variant (default: 3; 1 with --quick)%(default).0s",
    )
    b.add_argument("--workers", type=_counts, default="1,2", help="embedded worker counts")
    b.add_argument(
        "--kafka-workers",
        type=_counts,
        default="1,2,4",
        help="Kafka worker counts, workers started by the run",
    )
    b.add_argument(
        "--warm-workers",
        type=_counts,
        default="1,2",
        help="Kafka worker counts, workers running before the clock starts",
    )
    b.add_argument(
        "--kafka",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the Kafka variants",
    )
    b.add_argument("--task", default="positive-rate", help="task of the main section")
    b.add_argument(
        "--heavy-rows",
        type=_count,
        help="rows for the CPU-heavy beta-posterior section, 0 to skip it "
        "(default: 20000; 2000 with --quick)%(default).0s",
    )
    b.add_argument(
        "--memory-scale",
        type=_sizes,
        default=(),
        help="also compare peak memory at these row counts, once each "
        "(e.g. 20000000,100000000; slow)",
    )
    b.add_argument(
        "--memory-workers", type=positive_int, default=2, help="embedded workers at scale"
    )
    b.add_argument(
        "--sections",
        type=_names,
        default=",".join(SECTIONS),
        help="which sections to run (memory only with --memory-scale)",
    )
    b.add_argument(
        "--overhead-jobs",
        type=positive_int,
        help="one-row jobs of the overhead section (default: 1000000; 5000 with --quick)"
        "%(default).0s",
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 20,000 rows, 1 repeat, 2,000 heavy rows, 5,000 tiny jobs",
    )
    b.add_argument(
        "--peers",
        action="store_true",
        help="also run the peers section: DuckDB, Dask, PySpark and Celery+Redis doing the "
        "same job (the peers extra; slow; not with --quick)",
    )
    b.add_argument("--peers-rows", type=_count, default=0, help="rows of the peers' input [--rows]")
    b.add_argument(
        "--peers-slow-rows",
        type=_count,
        default=0,
        help="rows for PySpark and Celery one task per job (ms a job), on an input of "
        "their own [--peers-rows]",
    )
    b.add_argument(
        "--peers-slow-repeats",
        type=_count,
        default=0,
        help="repeats of the slow peers (Dask, Spark, Celery per job) [--repeats]",
    )
    b.add_argument("--seed", type=int, default=42, help="seed of the generated inputs")
    b.add_argument("--data-dir", help="where generated inputs are kept and reused [OUT/data]")
    kafka_flags(b, required=False)


def cmd_bench(args: argparse.Namespace, bars: Bars) -> int:
    missing = [m for m in ("pandas", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"dispatchkit bench needs {' and '.join(missing)}: pip install 'dispatchkit[bench]'"
        )
    if args.peers and args.quick:
        raise UsageError("--peers is not part of --quick: give --rows instead")
    from dispatchkit.bench import BenchConfig, run_benchmarks

    settings = None
    if args.kafka and (
        args.bootstrap_servers
        or args.kafka_config
        or os.environ.get("DISPATCHKIT_BOOTSTRAP_SERVERS")
        or os.environ.get("DISPATCHKIT_KAFKA_CONFIG")
    ):
        settings = kafka_settings_from_args(args)
    base = BenchConfig.quick(Path(args.out)) if args.quick else BenchConfig(out=Path(args.out))
    config = BenchConfig(
        out=Path(args.out),
        rows=args.rows or base.rows,
        repeats=args.repeats or base.repeats,
        workers=args.workers,
        kafka_workers=args.kafka_workers,
        warm_workers=args.warm_workers,
        kafka=args.kafka,
        kafka_settings=settings,
        topic_prefix=args.topic_prefix,
        partitions=args.partitions,
        task=args.task,
        heavy_rows=base.heavy_rows if args.heavy_rows is None else args.heavy_rows,
        memory_scales=args.memory_scale,
        memory_workers=args.memory_workers,
        sections=args.sections,
        seed=args.seed,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        peers=args.peers,
        peers_rows=args.peers_rows,
        peers_slow_rows=args.peers_slow_rows,
        peers_slow_repeats=args.peers_slow_repeats,
        overhead_jobs=args.overhead_jobs or base.overhead_jobs,
    )
    config = dataclasses.replace(config, command=_command(config))

    def say(line: str) -> None:
        if line and not args.quiet:
            print(line, file=sys.stderr, flush=True)

    run_benchmarks(config, say)
    if not args.quiet:
        print((config.out / "bench.md").read_text())
    return RET_OK


def _command(c: BenchConfig) -> str:
    """The command that reproduces ``c``, flags in canonical form."""
    parts = [
        "dispatchkit bench",
        f"--out {c.out}",
        f"--rows {c.rows}",
        f"--repeats {c.repeats}",
        "--workers " + ",".join(map(str, c.workers)),
    ]
    if c.kafka:
        parts.append("--kafka-workers " + ",".join(map(str, c.kafka_workers)))
        parts.append("--warm-workers " + ",".join(map(str, c.warm_workers)))
        parts.append(f"--partitions {c.partitions}")
    else:
        parts.append("--no-kafka")
    parts += [f"--task {c.task}", f"--heavy-rows {c.heavy_rows}"]
    if c.memory_scales:
        parts.append("--memory-scale " + ",".join(map(str, c.memory_scales)))
        parts.append(f"--memory-workers {c.memory_workers}")
    parts.append(f"--overhead-jobs {c.overhead_jobs}")
    if c.sections != SECTIONS:
        parts.append("--sections " + ",".join(c.sections))
    if c.seed != 42:
        parts.append(f"--seed {c.seed}")
    if c.peers:
        parts.append("--peers")
        for flag, value in (
            ("--peers-rows", c.peers_rows),
            ("--peers-slow-rows", c.peers_slow_rows),
            ("--peers-slow-repeats", c.peers_slow_repeats),
        ):
            if value:
                parts.append(f"{flag} {value}")
    return " ".join(parts)
