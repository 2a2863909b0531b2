"""Issue 10, "exact or refused": one writer per output directory, every failure one line.

Subprocesses of the real CLI wherever processes, signals or the OS are involved.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dispatchkit import outdir
from dispatchkit.apps.covid.generate import GenerateSpec, generate
from dispatchkit.errors import OutDirBusyError

from .conftest import assert_exact, reference

SRC = str(Path(__file__).resolve().parents[1] / "src")


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("DISPATCHKIT_TEST_FAULTS", None)
    e.update(extra)
    return e


def start(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dispatchkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kw.pop("env", None) or env(),  # type: ignore[arg-type]
        **kw,  # type: ignore[call-overload]
    )


def cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    p = start(*args, **kw)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def one_line(stderr: str, needle: str = "") -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def wait_for(cond: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def holder_written(out: Path) -> bool:
    try:
        return bool((out / ".dispatchkit.lock").read_text().strip())
    except OSError:
        return False


def no_temp_files(out: Path) -> None:
    left = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not left, left


def descendants_gone(procs: list[psutil.Process], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"children outlived their parent: {[p.pid for p in alive]}")


@pytest.fixture(scope="module")
def medium_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "medium.parquet"
    generate(GenerateSpec(rows=400_000, seed=3), path)
    return path


# -- one output directory, one writer ---------------------------------------------------


def test_two_runs_into_one_dir_the_second_is_refused_the_first_exact(
    small_parquet: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = start(
        "run", str(small_parquet), "--out", str(out), "--workers", "2", "-q",
        env=env(DISPATCHKIT_TEST_FAULTS="slow:0.01"),
    )  # fmt: skip
    wait_for(lambda: holder_written(out), what="the first run's lock")
    second = cli("run", str(small_parquet), "--out", str(out), "--workers", "2", "-q")
    assert first.poll() is None, "the first run ended too soon for this test"
    assert second.returncode == 2, second.stderr
    line = one_line(second.stderr, f"{out} is in use by dispatchkit pid {first.pid}")
    assert "one writer per output directory" in line and "(run " in line
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_exact(pl.read_parquet(out / "results.parquet"), reference(small_parquet))


def test_lock_roles_dispatch_and_collect_share_a_dir_two_collects_do_not(
    tmp_path: Path,
) -> None:
    probe = (
        "import sys; from pathlib import Path; from dispatchkit import outdir\n"
        "from dispatchkit.errors import OutDirBusyError\n"
        "try:\n"
        "    with outdir.hold(Path(sys.argv[1]), sys.argv[2]): print('got it')\n"
        "except OutDirBusyError as e: print('busy:', e)\n"
    )

    def other(command: str) -> str:
        p = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path), command],
            capture_output=True, text=True, env=env(), timeout=60,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    with outdir.hold(tmp_path, "collect"):
        assert other("dispatch") == "got it"  # disjoint files: allowed
        assert other("collect").startswith(f"busy: {tmp_path} is in use by dispatchkit pid")
        assert other("run").startswith("busy:")
        with outdir.hold(tmp_path, "collect"):  # re-entrant within the process
            pass
        info = json.loads((tmp_path / ".dispatchkit.lock").read_text())
        assert info["pid"] == os.getpid()
    assert other("collect") == "got it"  # released
    with outdir.hold(tmp_path, "dispatch"):
        assert other("collect") == "got it"
        assert other("dispatch").startswith("busy:")


def test_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from dispatchkit import outdir\n"
         "with outdir.hold(Path(sys.argv[1]), 'run'): print('held', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(OutDirBusyError, match=f"pid {holder.pid}"), outdir.hold(tmp_path, "run"):
        pass
    holder.kill()
    holder.wait()
    holder.stdout.close()
    with outdir.hold(tmp_path, "run"):  # no stale lock after kill -9
        pass


# -- --out itself -----------------------------------------------------------------------


def test_out_that_is_a_file_is_refused_before_any_work(small_parquet: Path, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    proc = cli("run", str(small_parquet), "--out", str(target), "-q")
    assert proc.returncode == 2
    one_line(proc.stderr, f"--out {target} is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unwritable_out_is_refused_before_any_work(
    small_parquet: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.geteuid() != 0:
            proc = cli("run", str(small_parquet), "--out", str(out), "-q")
            code, stderr = proc.returncode, proc.stderr
        else:  # root writes anywhere: the permission check answers as it would for a user
            from dispatchkit.cli import main

            real_access = os.access

            def access(path: object, mode: int, **kw: object) -> bool:
                if os.fspath(path) == str(out) and mode & os.W_OK:  # type: ignore[arg-type]
                    return False
                return real_access(path, mode, **kw)  # type: ignore[arg-type]

            monkeypatch.setattr(os, "access", access)
            code = main(["run", str(small_parquet), "--out", str(out), "-q"])
            stderr = capsys.readouterr().err
        assert code == 2
        one_line(stderr, "not writable")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p: p.write_bytes(b"garbage" * 100), "is not a DuckDB database"),
        (None, "is truncated or corrupt"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
    ids=["garbage", "truncated", "directory"],
)
def test_corrupt_store_is_one_line_naming_the_file(
    small_parquet: Path, tmp_path: Path, make: Callable[[Path], None] | None, what: str
) -> None:
    out = tmp_path / "out"
    store = out / "dispatchkit.duckdb"
    if make is None:  # a real store, cut short
        good = cli("run", str(small_parquet), "--out", str(tmp_path / "good"), "-q")
        assert good.returncode == 0, good.stderr
        data = (tmp_path / "good" / "dispatchkit.duckdb").read_bytes()
        out.mkdir()
        store.write_bytes(data[:20_000])
    else:
        out.mkdir()
        make(store)
    proc = cli("run", str(small_parquet), "--out", str(out), "-q")
    assert proc.returncode == 1
    line = one_line(proc.stderr, f"{store} {what}")
    assert "move it away or use another --out" in line


# -- disk full --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["results.parquet", "results.csv", "report.png"])
def test_disk_full_while_writing_an_output_is_one_line_and_leaves_no_temp_file(
    small_parquet: Path, tmp_path: Path, name: str
) -> None:
    out = tmp_path / "out"
    proc = cli(
        "run", str(small_parquet), "--out", str(out), "-q", "--workers", "1",
        env=env(DISPATCHKIT_TEST_FAULTS=f"enospc:{name}"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    one_line(proc.stderr, f"cannot write {out / name}: No space left on device")
    no_temp_files(out)
    # Freed space: the rerun resumes and is exact.
    again = cli("run", str(small_parquet), "--out", str(out), "-q", "--workers", "1")
    assert again.returncode == 0, again.stderr
    assert_exact(pl.read_parquet(out / "results.parquet"), reference(small_parquet))


def test_file_size_limit_hit_by_the_store_is_one_line(small_parquet: Path, tmp_path: Path) -> None:
    """A real kernel error (EFBIG from RLIMIT_FSIZE), no root needed."""
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = cli(
        "run", str(small_parquet), "--out", str(out), "-q", "--workers", "1",
        preexec_fn=limit,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr, "cannot write ")
    assert "File too large" in line
    no_temp_files(out)


def test_disk_full_on_a_real_tiny_file_system(small_parquet: Path, tmp_path: Path) -> None:
    """A 5 MB tmpfs: the store or the results run out of space (needs mount rights)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "out"
        proc = cli("run", str(small_parquet), "--out", str(out), "-q", "--workers", "1")
        assert proc.returncode == 1, proc.stderr
        one_line(proc.stderr, "No space left on device")
        no_temp_files(out)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- signals ----------------------------------------------------------------------------


def _interrupt(
    data: Path, out: Path, sig: int, when: Callable[[subprocess.Popen[str]], bool], **env_: str
) -> tuple[subprocess.Popen[str], str, list[psutil.Process]]:
    proc = start(
        "run", str(data), "--out", str(out), "--workers", "2", "-q", "--run-id", "sig",
        env=env(**env_),
    )  # fmt: skip
    wait_for(lambda: when(proc) or proc.poll() is not None, what="the moment to signal")
    assert proc.poll() is None, "the run ended before the signal"
    kids = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err, kids


def _children(n: int) -> Callable[[subprocess.Popen[str]], bool]:
    def cond(proc: subprocess.Popen[str]) -> bool:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        # The fork server and the workers forked from it (not the resource tracker).
        lines = [" ".join(k.cmdline()) for k in kids]
        return (
            sum("multiprocessing.forkserver" in c or "multiprocessing.spawn" in c for c in lines)
            >= n
        )

    return cond


@pytest.mark.parametrize(
    "phase", ["prepare", "worker-start-up", "mid-run"], ids=lambda p: f"sigint-{p}"
)
def test_ctrl_c_in_any_phase_is_one_line_130_no_child_left_and_rerun_is_exact(
    medium_parquet: Path, tmp_path: Path, phase: str
) -> None:
    out = tmp_path / "out"
    when = {
        "prepare": lambda p: holder_written(out),
        "worker-start-up": _children(1),
        "mid-run": lambda p: _children(2)(p) and (out / "quarantine.csv").exists(),
    }[phase]
    delay = 1.5 if phase == "mid-run" else 0.0
    faults = {"DISPATCHKIT_TEST_FAULTS": "slow:0.003"} if phase == "mid-run" else {}

    def moment(p: subprocess.Popen[str]) -> bool:
        if not when(p):
            return False
        time.sleep(delay)
        return True

    proc, err, kids = _interrupt(medium_parquet, out, signal.SIGINT, moment, **faults)
    assert proc.returncode == 130, err
    assert one_line(err) == "dispatchkit: interrupted"
    descendants_gone(kids)
    again = cli("run", str(medium_parquet), "--out", str(out), "-q", "--run-id", "sig")
    assert again.returncode == 0, again.stderr
    assert_exact(pl.read_parquet(out / "results.parquet"), reference(medium_parquet))


def test_sigterm_mid_run_is_one_line_143(small_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, err, kids = _interrupt(
        small_parquet, out, signal.SIGTERM, _children(2), DISPATCHKIT_TEST_FAULTS="slow:0.01"
    )
    assert proc.returncode == 143, err
    assert one_line(err) == "dispatchkit: terminated"
    descendants_gone(kids)


def test_kill_9_of_the_embedded_parent_leaves_no_worker_and_rerun_is_exact(
    small_parquet: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # Slow jobs: without PR_SET_PDEATHSIG a worker would sit in a job, not notice.
    proc, err, kids = _interrupt(
        small_parquet, out, signal.SIGKILL, _children(2), DISPATCHKIT_TEST_FAULTS="slow:0.5"
    )
    assert proc.returncode == -signal.SIGKILL
    assert kids
    descendants_gone(kids)
    assert "Traceback" not in err
    again = cli("run", str(small_parquet), "--out", str(out), "-q", "--run-id", "sig")
    assert again.returncode == 0, again.stderr
    assert_exact(pl.read_parquet(out / "results.parquet"), reference(small_parquet))


# -- small things -----------------------------------------------------------------------


def test_too_small_max_message_bytes_for_the_run_id_is_refused_up_front(
    small_parquet: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = cli(
        "run", str(small_parquet), "--out", str(out), "--run-id", "r" * 800,
        "--max-message-bytes", "1024",
    )  # fmt: skip
    assert proc.returncode == 2
    line = one_line(proc.stderr, "--max-message-bytes 1,024 is too small")
    assert "--run-id of 800 bytes" in line
    needed = int(re.search(r"needs at least ([\d,]+) bytes", line)[1].replace(",", ""))  # type: ignore[index]
    assert needed > 1024 + 800  # the envelope carries the run id, and more
    assert not out.exists()


def test_stdout_closed_early_exits_quietly(small_parquet: Path, tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone, as after `| head -1`
    proc = subprocess.run(
        [sys.executable, "-m", "dispatchkit", "run", str(small_parquet), "--out",
         str(tmp_path / "out"), "--workers", "1"],
        stdout=w, stderr=subprocess.PIPE, text=True, timeout=300,
        env=env(DISPATCHKIT_PROGRESS_SECONDS="3600"),  # no progress line on a slow machine
    )  # fmt: skip
    os.close(w)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_report_png_has_the_mode_of_the_other_outputs(small_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = cli("run", str(small_parquet), "--out", str(out), "-q", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    modes = {n: stat.S_IMODE((out / n).stat().st_mode) for n in ("results.parquet", "report.png")}
    assert modes["report.png"] == modes["results.parquet"], modes
    umask = os.umask(0)
    os.umask(umask)
    assert modes["report.png"] == 0o666 & ~umask


# -- run --broker kafka -----------------------------------------------------------------


def _kafka_run(data: Path, out: Path, prefix_args: list[str], **env_: str) -> subprocess.Popen[str]:
    return start(
        "run", str(data), "--out", str(out), "--workers", "2", "-q", "--broker", "kafka",
        "--run-id", "k", *prefix_args, env=env(**env_),
    )  # fmt: skip


def _kafka_children_up(proc: subprocess.Popen[str]) -> bool:
    """Both workers and the dispatcher child are running."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    lines = [" ".join(k.cmdline()) for k in kids]
    return sum(" worker " in c for c in lines) >= 2 and any("spawn_main" in c for c in lines)


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGINT, 130, "dispatchkit: interrupted"),
        (signal.SIGTERM, 143, "dispatchkit: terminated"),
        (signal.SIGKILL, -9, None),
    ],
    ids=["sigint", "sigterm", "kill-9"],
)
def test_kafka_run_stopped_by_a_signal_leaves_no_child_and_rerun_is_exact(
    medium_parquet: Path, tmp_path: Path, sig: int, code: int, line: str | None
) -> None:
    from .kafka_helpers import kafka_args, new_settings

    settings = new_settings()
    out = tmp_path / "out"
    proc = _kafka_run(medium_parquet, out, kafka_args(settings))
    wait_for(lambda: _kafka_children_up(proc) or proc.poll() is not None, what="children")
    assert proc.poll() is None, proc.communicate()[1]
    time.sleep(1.0)  # mid-dispatch
    kids = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode == code
    descendants_gone(kids, timeout=10)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.stdout is not None
    proc.stdout.close()
    if line is not None:
        assert one_line(err) == line
    again = _kafka_run(medium_parquet, out, kafka_args(settings))
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert_exact(pl.read_parquet(out / "results.parquet"), reference(medium_parquet))


def test_every_output_file_gets_the_same_mode_from_the_umask(
    small_parquet: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        ["sh", "-c", 'umask 027 && exec "$0" -m dispatchkit "$@"', sys.executable,
         "run", str(small_parquet), "--out", str(out), "-q", "--workers", "1"],
        capture_output=True, text=True, env=env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = ["results.parquet", "results.csv", "report.png", "quarantine.parquet",
             "quarantine.csv", "dispatchkit.duckdb"]  # fmt: skip
    modes = {n: oct(stat.S_IMODE((out / n).stat().st_mode)) for n in names}
    assert set(modes.values()) == {oct(0o640)}, modes


CHART_FAILS = """
import pyarrow as pa
import dispatchkit as dk

app = dk.App("cf")
app.columns(id=dk.Int(), x=dk.Float())
app.key("id")

@app.task(result={"y": pa.int64()}, reads=("x",))
def t(key, rows):
    return {"y": rows.num_rows}

@app.chart
def chart(results, path):
    raise ValueError("the chart cannot be drawn")
"""


def test_a_failing_chart_is_one_line_exit_1_with_the_results_written(tmp_path: Path) -> None:
    (tmp_path / "cf.py").write_text(CHART_FAILS)
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "x": [1.0, 2.0, 3.0]}), data)
    out = tmp_path / "out"
    proc = cli("run", str(data), "--app", f"{tmp_path / 'cf.py'}:app", "--task", "t",
               "--out", str(out), "-q")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    one_line(proc.stderr, "app 'cf': its chart failed (ValueError: the chart cannot be drawn)")
    assert pq.read_table(out / "results.parquet").num_rows == 3
    assert not (out / "report.png").exists()
    no_temp_files(out)
