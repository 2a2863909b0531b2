#!/usr/bin/env python3
"""The pipeline benchmark: the commands a user types, timed as they run.

In one run, on this machine:

1. ``dispatchkit generate --rows 2000000``: wall time (target ≤ 10 s);
2. ``dispatchkit run FILE --workers 2`` on that existing file: wall time (target ≤ 10 s)
   and its ratio to a single-process Polars group-by script over the same file, each
   measured as a whole command (interpreter start-up and imports included, target ≤ 5×);
3. the dispatcher's peak RSS — the ``dispatchkit run`` process itself, without its
   worker processes — on 2M rows and on 20M rows (targets: 20M ≤ 1 GiB and ≤ 2× 2M).

Repeats are interleaved and reported as medians. Writes pipeline.json and pipeline.md to
--out and prints the Markdown.

    python benchmarks/pipeline.py --out bench-out/pipeline
    python benchmarks/pipeline.py --scale-rows 0      # skip the 20M-row run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from dispatchkit.bench.measure import Measurement, measure

GiB_MB = 2**30 / 1e6

FLOOR = """
import sys, polars as pl
from dispatchkit.apps.covid.stats import wilson_arrays
df = (
    pl.scan_parquet(sys.argv[1])
    .group_by("country", pl.col("test_datetime").dt.truncate("1h").alias("date_hour"))
    .agg(pl.len().alias("tests"), (pl.col("result") == "positive").sum().alias("positives"))
    .sort("country", "date_hour")
    .collect(engine="streaming")
)
low, high = wilson_arrays(df["positives"].to_numpy(), df["tests"].to_numpy())
df.with_columns(ci_low=low, ci_high=high).write_parquet(sys.argv[2])
"""


def dk(*args: str) -> list[str]:
    return [sys.executable, "-m", "dispatchkit", *args]


def run(cmd: list[str], log: Path, what: str) -> Measurement:
    m = measure(cmd, log=log)
    if m.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
        raise SystemExit(f"{what} failed (exit {m.returncode}):\n{tail}")
    return m


def generate(rows: int, path: Path, log: Path) -> Measurement:
    return run(dk("generate", "-q", "--rows", str(rows), "--out", str(path)), log, "generate")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out/pipeline"))
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--scale-rows", type=int, default=20_000_000, help="0 skips the scale run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data-dir", type=Path, help="inputs, shared with dispatchkit bench [OUT/data]")
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data: Path = args.data_dir or out / "data"
    data.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)

    samples: dict[str, list[Measurement]] = {"generate": [], "run": [], "floor": []}
    # The name dispatchkit bench uses too (seed 42 is generate's default): one file, shared.
    main_input = data / f"covid_{args.rows}_seed42.parquet"
    fresh = out / "generated.parquet"
    for r in range(args.repeats):
        fresh.unlink(missing_ok=True)
        samples["generate"].append(generate(args.rows, fresh, logs / f"generate-{r}.txt"))
        if not main_input.exists():
            fresh.replace(main_input)
        run_dir = out / f"run-{r}"
        shutil.rmtree(run_dir, ignore_errors=True)
        samples["run"].append(
            run(
                dk(
                    "run",
                    "-q",
                    str(main_input),
                    "--out",
                    str(run_dir),
                    "--workers",
                    str(args.workers),
                ),
                logs / f"run-{r}.txt",
                "dispatchkit run",
            )
        )
        shutil.rmtree(run_dir, ignore_errors=True)
        samples["floor"].append(
            run(
                [sys.executable, "-c", FLOOR, str(main_input), str(out / "floor.parquet")],
                logs / f"floor-{r}.txt",
                "polars floor",
            )
        )
    scale: Measurement | None = None
    if args.scale_rows:
        big = data / f"covid_{args.scale_rows}_seed42.parquet"
        if not big.exists():
            generate(args.scale_rows, big, logs / "generate-scale.txt")
        run_dir = out / "run-scale"
        shutil.rmtree(run_dir, ignore_errors=True)
        scale = run(
            dk("run", "-q", str(big), "--out", str(run_dir), "--workers", str(args.workers)),
            logs / "run-scale.txt",
            "dispatchkit run at scale",
        )
        shutil.rmtree(run_dir, ignore_errors=True)

    fresh.unlink(missing_ok=True)
    doc = report(args, samples, scale)
    (out / "pipeline.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(args, doc)
    (out / "pipeline.md").write_text(md)
    print(md)
    return 0


def _median(ms: list[Measurement], key: str) -> float:
    return float(statistics.median(getattr(m, key) for m in ms))


def report(
    args: argparse.Namespace, samples: dict[str, list[Measurement]], scale: Measurement | None
) -> dict[str, Any]:
    gen, run_, floor = (_median(samples[k], "wall_s") for k in ("generate", "run", "floor"))
    disp_2m = max(m.main_rss_mb for m in samples["run"])
    targets: list[dict[str, Any]] = [
        {"target": f"generate {args.rows:,} rows ≤ 10 s", "measured": gen, "met": gen <= 10},
        {
            "target": f"dispatchkit run, {args.workers} workers ≤ 10 s",
            "measured": run_,
            "met": run_ <= 10,
        },
        {
            "target": "dispatchkit run ≤ 5× a single-process Polars group-by",
            "measured": run_ / floor,
            "met": run_ / floor <= 5,
        },
    ]
    if scale is not None:
        targets += [
            {
                "target": f"dispatcher peak RSS at {args.scale_rows:,} rows ≤ 1 GiB",
                "measured": scale.main_rss_mb,
                "met": scale.main_rss_mb <= GiB_MB,
            },
            {
                "target": f"... and ≤ 2× its peak at {args.rows:,} rows",
                "measured": scale.main_rss_mb / disp_2m,
                "met": scale.main_rss_mb <= 2 * disp_2m,
            },
        ]
    return {
        "rows": args.rows,
        "scale_rows": args.scale_rows,
        "workers": args.workers,
        "samples": {k: [vars(m) for m in v] for k, v in samples.items()},
        "scale": vars(scale) if scale else None,
        "medians": {"generate_s": gen, "run_s": run_, "floor_s": floor},
        "dispatcher_rss_mb": {"main": disp_2m, "scale": scale.main_rss_mb if scale else None},
        "targets": targets,
    }


def markdown(args: argparse.Namespace, doc: dict[str, Any]) -> str:
    m = doc["medians"]
    lines = [
        f"# Pipeline benchmark ({args.rows:,} rows, median of {args.repeats})",
        "",
        "| step | wall s (median) | min–max | peak RSS MB: dispatcher / largest / all |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (
        ("generate", f"`dispatchkit generate --rows {args.rows}`"),
        ("run", f"`dispatchkit run FILE --workers {args.workers}`"),
        ("floor", "Polars group-by script"),
    ):
        ws = [s["wall_s"] for s in doc["samples"][key]]
        rss = doc["samples"][key]
        lines.append(
            f"| {label} | {m[key + '_s']:.2f} | {min(ws):.2f}–{max(ws):.2f} | "
            f"{max(s['main_rss_mb'] for s in rss):,.0f} / "
            f"{max(s['peak_rss_max_mb'] for s in rss):,.0f} / "
            f"{max(s['peak_rss_total_mb'] for s in rss):,.0f} |"
        )
    if doc["scale"]:
        s = doc["scale"]
        lines.append(
            f"| `dispatchkit run` on {args.scale_rows:,} rows | {s['wall_s']:.1f} | one run | "
            f"{s['main_rss_mb']:,.0f} / {s['peak_rss_max_mb']:,.0f} / "
            f"{s['peak_rss_total_mb']:,.0f} |"
        )
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for t in doc["targets"]:
        unit = "×" if "×" in t["target"] else (" MB" if "RSS" in t["target"] else " s")
        lines.append(
            f"| {t['target']} | {t['measured']:.2f}{unit} | {'yes' if t['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
