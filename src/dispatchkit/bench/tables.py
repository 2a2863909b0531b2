"""Writing a benchmark's results: bench.json, bench.md (tables and targets), PNG charts.

The rows come from :func:`dispatchkit.bench.run_benchmarks`; the targets are the ones the
project set itself (docs/benchmarks.md), each judged from rows of the same invocation.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispatchkit import __version__
from dispatchkit.bench.chart import plot_benchmark

if TYPE_CHECKING:
    from dispatchkit.bench.runner import BenchConfig

Row = dict[str, Any]


def machine(kafka: str) -> dict[str, str]:
    """Where the benchmark ran: CPU, cores, memory, Python and library versions."""
    import psutil

    model = platform.processor() or "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    libs = ["numpy", "polars", "pandas", "duckdb", "pyarrow", "msgspec", "confluent-kafka"]
    versions = {}
    for name in libs:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    try:
        import confluent_kafka

        versions["librdkafka"] = str(confluent_kafka.libversion()[0])
    except ImportError:
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "dispatchkit": __version__,
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "kafka": kafka,
        "code": code_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def code_version() -> str:
    """The git commit measured, ``+dirty`` if the package has uncommitted changes."""
    src = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    if head.returncode != 0:
        return __version__
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_outputs(
    config: BenchConfig, rows: list[Row], info: dict[str, str], inputs: dict[str, Row]
) -> None:
    """bench.json, bench.md and one chart per section into ``config.out``."""
    out = config.out
    judged = targets(rows)
    doc = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(config).items()
            if k != "kafka_settings"
        },
        "machine": info,
        "inputs": inputs,
        "rows": rows,
        "targets": judged,
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "bench.md").write_text(markdown(config, rows, info, judged))
    titles = {
        "main": f"{_rows_of(rows, 'main')} rows, {config.task}: median of {config.repeats}",
        "heavy": f"CPU-heavy task (beta-posterior), {_rows_of(rows, 'heavy')} rows",
        "memory": f"Memory at {_scales_of(rows)} rows (one run each)",
    }
    for section, title in titles.items():
        chosen = [r for r in rows if r["section"] == section]
        if chosen:
            name = "bench.png" if section == "main" else f"bench-{section}.png"
            plot_benchmark(chosen, out / name, title=f"dispatchkit bench — {title}")
    from dispatchkit.bench.peers import plot as plot_peers

    plot_peers(rows, out / "bench-peers.png")


def _scales_of(rows: list[Row]) -> str:
    return ", ".join(
        f"{n:,}" for n in sorted({r["rows"] for r in rows if r["section"] == "memory"})
    )


def _rows_of(rows: list[Row], section: str) -> str:
    found = [r["rows"] for r in rows if r["section"] == section]
    return f"{found[0]:,}" if found else "?"


def _get(rows: list[Row], section: str, key: str) -> Row | None:
    return next((r for r in rows if r["section"] == section and r["key"] == key), None)


def _best(rows: list[Row], section: str, prefix: str) -> Row | None:
    chosen = [r for r in rows if r["section"] == section and r["key"].startswith(prefix)]
    return min(chosen, key=lambda r: r["wall_median_s"]) if chosen else None


def targets(rows: list[Row]) -> list[Row]:
    """Each target with its measured figure and whether it is met (None: not measured);
    see :mod:`dispatchkit.bench.goals`."""
    from dispatchkit.bench.goals import judge

    return judge(rows)


# -- Markdown -----------------------------------------------------------------------------


def markdown(config: BenchConfig, rows: list[Row], info: dict[str, str], judged: list[Row]) -> str:
    lines = [
        "# dispatchkit bench",
        "",
        f"`{config.command or 'dispatchkit bench'}` — {info['date']}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; {info['os']}; "
        f"Python {info['python']}; {info['libraries']}. Kafka: {info['kafka']}. "
        f"Code: {info['code']}.",
        "",
    ]
    lines += _main_table(rows, config)
    lines += _components_table(rows)
    lines += _heavy_table(rows)
    lines += _memory_table(rows)
    from dispatchkit.bench import apps, commands, overhead

    lines += commands.table(rows)
    lines += overhead.table(rows)
    lines += apps.table(rows)

    from dispatchkit.bench.peers import table as peers_table

    lines += peers_table(rows, config)
    lines += ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
    for t in judged:
        met = "n/a" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    lines += [
        "",
        "Wall time of the main, components, heavy and memory sections is measured inside "
        "each variant's process, libraries already imported, "
        "from reading the input to results in memory (single process) or exported and "
        "stored (dispatchkit, report.png off). Peak RSS: the largest process's kernel "
        "high-water mark, and the largest sampled (50 ms) sum over the process tree; the "
        "worst of the repeats. CPU s: user + system of the tree over the timed part. "
        "Every variant's (country, date_hour, tests, positives) equals the floor's.",
        "",
    ]
    return "\n".join(lines)


def _phases(row: Row) -> str:
    return " · ".join(f"{k} {v:.2f}" for k, v in row["phases"].items()) or "–"


def _wall(row: Row) -> str:
    return f"{row['wall_median_s']:.2f} ({row['wall_min_s']:.2f}–{row['wall_max_s']:.2f})"


def _main_table(rows: list[Row], config: BenchConfig) -> list[str]:
    chosen = [r for r in rows if r["section"] == "main"]
    if not chosen:
        return []
    floor, pandas = _get(rows, "main", "floor"), _get(rows, "main", "pandas")
    out = [
        f"## End to end: {chosen[0]['rows']:,} rows, {chosen[0]['jobs']:,} jobs, "
        f"{config.task}, median of {config.repeats}",
        "",
        "| variant | wall s (min–max) | × floor | speed vs pandas | rows/s | jobs/s "
        "| largest RSS MB | all RSS MB | CPU s | phases s | jobs/s per worker |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in chosen:
        x = r["wall_median_s"] / floor["wall_median_s"] if floor else float("nan")
        v = pandas["wall_median_s"] / r["wall_median_s"] if pandas else float("nan")
        per = f"{r['worker_jobs_per_s']:,.0f}" if r["worker_jobs_per_s"] else "–"
        out.append(
            f"| {r['variant']} | {_wall(r)} | {x:.1f}× | {v:.2f}× | {r['rows_per_s']:,.0f} "
            f"| {r['jobs_per_s']:,.0f} | {r['peak_rss_max_mb']:,.0f} "
            f"| {r['peak_rss_total_mb']:,.0f} | {r['cpu_s']:.1f} | {_phases(r)} | {per} |"
        )
    brokers = [r for r in chosen if r["broker_rss_mb"]]
    if brokers:
        cpu = ", ".join(
            f"{r['variant']} {r['broker_cpu_s']:.1f} s" for r in brokers if r["broker_cpu_s"]
        )
        out += [
            "",
            f"Kafka broker JVM, not in the table: peak RSS "
            f"{max(r['broker_rss_mb'] for r in brokers):,.0f} MB; CPU s during the run: {cpu}.",
        ]
    return [*out, ""]


def _components_table(rows: list[Row]) -> list[str]:
    d, s = _get(rows, "components", "dispatcher"), _get(rows, "components", "staged-1")
    if not d and not s:
        return []
    out = ["## Components", "", "| component | wall s | measured |", "| --- | --- | --- |"]
    if d:
        cut = d["phases"]["sort_cut_encode"]
        out.append(
            f"| dispatcher alone: read, validate, sort, cut, encode (no transport) | {_wall(d)} "
            f"| {d['rows_per_s']:,.0f} rows/s overall; the sorted stream, cut and encoded, "
            f"{cut:.2f} s = {d['rows'] / cut:,.0f} rows/s, {d['jobs'] / cut:,.0f} jobs/s |"
        )
    if s:
        dispatch, drain = s["phases"]["dispatch"], s["phases"]["drain"]
        per = f"{s['worker_jobs_per_s']:,.0f}" if s["worker_jobs_per_s"] else "?"
        out.append(
            f"| Kafka staged: dispatch all, then 1 worker drains | {_wall(s)} "
            f"| dispatch {dispatch:.2f} s = {s['rows'] / dispatch:,.0f} rows/s to Kafka; "
            f"drain {drain:.2f} s (with start-up); worker {per} jobs/s while working |"
        )
    return [*out, ""]


def _heavy_table(rows: list[Row]) -> list[str]:
    chosen = [r for r in rows if r["section"] == "heavy"]
    if not chosen:
        return []
    one, pandas = _get(rows, "heavy", "embedded-1"), _get(rows, "heavy", "pandas")
    out = [
        f"## CPU-heavy task: beta-posterior, {chosen[0]['rows']:,} rows, "
        f"{chosen[0]['jobs']:,} jobs",
        "",
        "| variant | wall s (min–max) | work phase s | speedup vs ×1 | speed vs pandas "
        "| largest RSS MB | all RSS MB | CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in chosen:
        work = r["phases"].get("work")
        up = one["phases"]["work"] / work if one and work else None
        v = pandas["wall_median_s"] / r["wall_median_s"] if pandas else float("nan")
        out.append(
            f"| {r['variant']} | {_wall(r)} | {f'{work:.2f}' if work else '–'} "
            f"| {f'{up:.2f}×' if up else '–'} | {v:.2f}× | {r['peak_rss_max_mb']:,.0f} "
            f"| {r['peak_rss_total_mb']:,.0f} | {r['cpu_s']:.1f} |"
        )
    return [*out, ""]


def _memory_table(rows: list[Row]) -> list[str]:
    chosen = [r for r in rows if r["section"] == "memory"]
    if not chosen:
        return []
    out = [
        f"## Memory at {_scales_of(rows)} rows (one run each)",
        "",
        "| variant | rows | wall s | ns per row | largest RSS MB | main process RSS MB "
        "| all RSS MB | CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in chosen:
        out.append(
            f"| {r['variant']} | {r['rows']:,} | {r['wall_median_s']:.1f} "
            f"| {r['wall_median_s'] / r['rows'] * 1e9:,.0f} | {r['peak_rss_max_mb']:,.0f} "
            f"| {r['main_rss_mb']:,.0f} | {r['peak_rss_total_mb']:,.0f} | {r['cpu_s']:.1f} |"
        )
    return [*out, ""]
