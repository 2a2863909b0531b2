"""Default bounds of a run's resources, shared by the library and the command line."""

from __future__ import annotations

#: DuckDB's memory for reading and sorting the input (its ``memory_limit``): the largest
#: allocation of a run's process. Beyond it the sort spills to disk under the output
#: directory, so the input's size does not raise it; but merging the spilled runs needs
#: some of it: 256MB is too little for 100M rows of the COVID input, 320MB is enough
#: (measured: the largest process 635 MB at 20M rows, 671 MB at 100M). A bigger input
#: may need more; a limit too small ends the run with one line naming ``--sort-memory``.
DEFAULT_SORT_MEMORY = "320MB"
