"""The store keeps each job part once without a primary key (``dispatchkit.seen``).

The reference is a plain Python set of ``(job_id, part)`` pairs, first one wins; the
store is checked by reading its table back with SQL, including with fingerprints that
collide on purpose (so every decision goes through the exact comparison).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchkit import store as store_module
from dispatchkit.seen import Fingerprints, first_of_equal, sharing
from dispatchkit.store import ResultStore

from .conftest import result_message, started_store

u64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(st.lists(st.lists(u64, max_size=40), max_size=12), st.lists(u64, max_size=60))
def test_fingerprints_hold_exactly_what_was_added(
    batches: list[list[int]], asked: list[int]
) -> None:
    held = Fingerprints()
    reference: set[int] = set()
    for batch in batches:
        held.add(np.array(batch, dtype=np.uint64))
        reference.update(batch)
    probe = asked + sorted(reference)[:20]
    found = held.holds(np.array(probe, dtype=np.uint64))
    assert found.tolist() == [v in reference for v in probe]
    assert len(held) == len(reference)


@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 2)), max_size=30),
    st.integers(1, 4),
)
def test_first_of_equal_keeps_the_first_of_each_pair(rows: list[tuple[str, int]], k: int) -> None:
    """A fingerprint is a function of the pair; taken from a tiny range it collides
    often: equal pairs are kept once, colliding different pairs both."""
    fingerprints = np.array([(ord(job) + part) % k for job, part in rows], dtype=np.uint64)
    shared = sharing(fingerprints)
    keep = first_of_equal(
        len(rows), shared, [rows[i][0] for i in shared], [rows[i][1] for i in shared]
    )
    firsts = {pair: i for i, pair in reversed(list(enumerate(rows)))}
    assert keep.tolist() == [firsts[pair] == i for i, pair in enumerate(rows)]


# -- the store ----------------------------------------------------------------------------

Flush = list[tuple[str, int, int]]  # (job_id, part, parts) in arrival order

parts_of = st.sampled_from([(0, 1)] + [(p, 2) for p in range(2)] + [(p, 3) for p in range(3)])
flushes = st.lists(
    st.lists(st.tuples(st.sampled_from(["j1", "j2", "j3", "j4", "j5"]), parts_of), max_size=12),
    min_size=1,
    max_size=6,
)

COLLIDING = {
    "real": None,
    "by part only": "CAST(hash(CAST(part AS INTEGER)) AS UBIGINT)",
    "all equal": "CAST(7 AS UBIGINT)",
}


def _stored(store: ResultStore, run_id: str = "r") -> list[tuple[str, int, int]]:
    table = store.parts_table(run_id)
    rows = store.con.execute(
        f'SELECT job_id, part, coalesce(tests, "state:tests") FROM {table} '
        "WHERE run_id = ? ORDER BY job_id, part",
        [run_id],
    ).fetchall()
    return [(str(j), int(p), int(t)) for j, p, t in rows]


def _done(reference: dict[tuple[str, int], tuple[int, int]]) -> int:
    """Jobs with every part 0..n-1 of one split into n parts stored (n = 1: whole)."""
    splits: dict[tuple[str, int], set[int]] = {}
    for (job, part), (_, n) in reference.items():
        splits.setdefault((job, n), set()).add(part)
    return len({job for (job, n), got in splits.items() if got == set(range(n))})


def _replay(
    store_path: Path, batches: list[list[tuple[str, tuple[int, int]]]], reopen_at: int
) -> None:
    """Store ``batches`` (one flush each), reopening the store at ``reopen_at``; check
    after every flush against the reference."""
    reference: dict[tuple[str, int], tuple[int, int]] = {}  # pair → its first (tests, parts)
    counter = 0
    store = ResultStore(store_path)
    try:
        started_store(store)
        for i, batch in enumerate(batches):
            if i == reopen_at:  # a resumed collector: what is held is read from the table
                store.close()
                store = ResultStore(store_path)
                started_store(store)
            new = 0
            parts = []
            for job, (part, n) in batch:
                counter += 1
                parts.append((job, part, n, counter + 10, 1))
                if (job, part) not in reference:
                    reference[(job, part)] = (counter + 10, n)
                    new += 1
            # Each job part as a message of its own, then one flush of them all.
            for p in parts:
                store.add(result_message("r", [p]))  # type: ignore[arg-type]
            assert store.flush() == new
            expected = sorted((j, p, t) for (j, p), (t, _) in reference.items())
            assert _stored(store) == expected
            done = _done(reference)
            assert store.jobs_done("r") == done
            assert store.jobs_done_counted("r") == done
    finally:
        store.close()


@pytest.mark.parametrize("fingerprint", list(COLLIDING), ids=list(COLLIDING))
@settings(max_examples=40, deadline=None)
@given(batches=flushes, reopen_at=st.integers(0, 6))
def test_the_store_keeps_each_part_once_and_the_first_wins(
    tmp_path_factory: pytest.TempPathFactory,
    fingerprint: str,
    batches: list[list[tuple[str, tuple[int, int]]]],
    reopen_at: int,
) -> None:
    path = tmp_path_factory.mktemp("seen") / "store.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        if COLLIDING[fingerprint] is not None:
            mp.setattr(store_module, "_FINGERPRINT", COLLIDING[fingerprint])
        _replay(path, batches, reopen_at)


def test_a_part_stored_twice_by_someone_else_leaves_its_job_not_done(tmp_path: Path) -> None:
    """The table has no key: should a part be there twice (not written by this store),
    its job is not done, so it is never counted twice, even when another part of a
    split job is missing and the count of rows matches."""
    with ResultStore(tmp_path / "s.duckdb") as store:
        started_store(store)
        store.add(result_message("r", [("whole", 0, 1, 5, 1)]))  # type: ignore[arg-type]
        store.add(result_message("r", [("split", 0, 3, 5, 1), ("split", 1, 3, 5, 1)]))  # type: ignore[arg-type]
        store.flush()
        assert store.done_jobs("r") == {"whole"}
        table = store.parts_table("r")
        # Another writer repeats part 1 of the split job (3 rows for 3 parts, part 2
        # missing) and the whole job.
        store.con.execute(
            f"INSERT INTO {table} SELECT * FROM {table} WHERE job_id IN ('split', 'whole') "
            "AND part = (CASE WHEN job_id = 'split' THEN 1 ELSE 0 END)"
        )
        assert store.jobs_done("r") == 0
        assert store.done_jobs("r") == set()
        assert store.results("r").height == 0
