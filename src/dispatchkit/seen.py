"""Which job parts a store already holds: exact, without an index on disk.

A primary key on ``(run_id, job_id, part)`` would make every stored part an index
insert, most of the cost of storing results. The store keeps instead, per run, the 64-bit
fingerprints of the parts it holds (:class:`Fingerprints`, 8 bytes a part), and decides
for each incoming part:

1. a part whose fingerprint repeats within the incoming batch is compared with the
   others by ``(job_id, part)``; the first of equal ones is kept;
2. a part whose fingerprint is not held is new: it is stored;
3. a part whose fingerprint is held (a part stored again, or a rare collision of two
   parts' fingerprints) is looked up on disk by ``(job_id, part)``, and kept only if it
   is not there.

So a part is never stored twice and never dropped for a collision. The fingerprints
are built when a run is first written in a process (from its stored parts) and grow
with each flush; they are held by the one process writing the store.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
Mask = npt.NDArray[np.bool_]


class Fingerprints:
    """A set of uint64 values held as a few sorted arrays whose sizes halve.

    Adding a batch appends a sorted array and merges the last two while the older one
    is at most twice the size of the newer one, so adding ``n`` values in all costs
    ``O(n log n)`` and a lookup searches ``O(log n)`` arrays.
    """

    def __init__(self) -> None:
        self._levels: list[U64] = []

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    def add(self, values: U64) -> None:
        """Hold ``values`` too (any order, repeats allowed)."""
        values = np.unique(values.astype(np.uint64, copy=False))
        values = values[~self.holds(values)]  # the arrays stay disjoint
        if not len(values):
            return
        self._levels.append(values)
        while len(self._levels) > 1 and len(self._levels[-2]) <= 2 * len(self._levels[-1]):
            newer = self._levels.pop()
            older = self._levels.pop()
            # Two sorted, disjoint arrays: a stable sort (timsort) merges the two runs in
            # linear time, where np.union1d would sort them again.
            self._levels.append(np.sort(np.concatenate((older, newer)), kind="stable"))

    def holds(self, values: U64) -> Mask:
        """For each of ``values``: whether it is held."""
        values = values.astype(np.uint64, copy=False)
        found: Mask = np.zeros(len(values), dtype=np.bool_)
        for level in self._levels:
            at = np.searchsorted(level, values)
            at[at == len(level)] = len(level) - 1
            found |= level[at] == values
        return found


def sharing(fingerprints: U64) -> npt.NDArray[np.intp]:
    """The rows (in order) whose fingerprint another row of the batch has too."""
    if len(fingerprints) < 2:
        return np.empty(0, dtype=np.intp)
    _, inverse, counts = np.unique(fingerprints, return_inverse=True, return_counts=True)
    return np.flatnonzero(counts[inverse.ravel()] > 1)


def first_of_equal(
    n: int, rows: npt.NDArray[np.intp], job_ids: list[str], parts: list[int]
) -> Mask:
    """Which of a batch's ``n`` rows to keep: all but the repeats of an earlier
    ``(job_id, part)``. Only ``rows`` (:func:`sharing`, in order) are compared; their
    ``job_ids`` and ``parts`` are given in the same order."""
    keep: Mask = np.ones(n, dtype=np.bool_)
    kept: set[tuple[str, int]] = set()
    for row, pair in zip(rows.tolist(), zip(job_ids, parts, strict=True), strict=True):
        if pair in kept:
            keep[row] = False
        else:
            kept.add(pair)
    return keep
