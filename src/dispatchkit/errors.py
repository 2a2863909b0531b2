"""Every error dispatchkit raises on purpose, and the CLI exit code each maps to.

::

    DispatchkitError                  base; ``exit_code`` tells the CLI what to return
    ├── UsageError                    a bad flag value or combination            (2)
    │   └── OutDirBusyError           --out is held by another dispatchkit process (2)
    ├── InputError                    missing/empty/corrupt input, wrong schema  (2)
    │   └── BadRowError               --strict: the first invalid row            (2)
    ├── RunError                      a run id reused with another input, …      (1)
    │   ├── StoreError                the store file is corrupt or unreadable     (1)
    │   └── InputRejectedError        no valid row, or more bad rows than
    │                                 --max-bad-rows allows (quarantine written)  (1)
    ├── OutputError                   a file under --out cannot be written (disk
    │                                 full, quota, I/O error, read-only)          (1)
    ├── DecodeError                   bytes that are not a valid message         (1)
    ├── TaskError                     a task raised while computing a job         (1)
    ├── MisdeployedError              a job for another app, task or fingerprint  (4)
    └── BrokerError                   the transport failed                       (3)
        ├── DeliveryError             a message was not delivered
        └── FatalBrokerError          the client cannot go on (fenced, fatal)

The CLI prints ``str(error)`` as one line on stderr and exits with ``exit_code``. It
also turns the *expected* failures of libraries into one line: ``duckdb.Error`` and
``OSError`` (1), ``KeyboardInterrupt``/SIGINT (130), SIGTERM (143) and a closed stdout
(``| head``: 141, quietly). Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

#: Exit codes, named as dramatiq names them.
RET_OK = 0
RET_FAILED = 1
RET_USAGE = 2
RET_BROKER = 3
RET_MISDEPLOYED = 4  # a worker that lacks the task or runs other code than the run's
RET_INTERRUPTED = 130  # 128 + SIGINT
RET_BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout was closed (``| head``)
RET_TERMINATED = 143  # 128 + SIGTERM


class DispatchkitError(Exception):
    """Base of every error dispatchkit raises on purpose."""

    exit_code = RET_FAILED


class UsageError(DispatchkitError):
    """A flag value or combination that cannot work."""

    exit_code = RET_USAGE


class InputError(DispatchkitError):
    """The input file(s) cannot be read as a dataset of test records."""

    exit_code = RET_USAGE


class BadRowError(InputError):
    """A row failed validation and the run is ``--strict``."""


class OutDirBusyError(UsageError):
    """Another dispatchkit process writes to this output directory."""


class RunError(DispatchkitError):
    """A run cannot start or finish as asked (e.g. a run id reused for another input)."""


class StoreError(RunError):
    """The results store cannot be opened: not a DuckDB file, truncated, a directory."""


class InputRejectedError(RunError):
    """The input was read and its bad rows quarantined, but it is not worth running:
    no row is valid, or more are bad than ``--max-bad-rows`` allows."""


class OutputError(DispatchkitError):
    """A file under the output directory cannot be written (disk full, I/O error, …)."""


class DecodeError(DispatchkitError):
    """Bytes that do not decode to a supported message."""


class TaskError(DispatchkitError):
    """The task raised while computing a job."""


class MisdeployedError(DispatchkitError):
    """A worker was handed a job of an app, task or app version it does not run.

    It neither computes nor dead-letters the job: it leaves it for a worker deployed
    with the right code, and exits.
    """

    exit_code = RET_MISDEPLOYED


class BrokerError(DispatchkitError):
    """The message transport failed."""

    exit_code = RET_BROKER


class DeliveryError(BrokerError):
    """A produced message was not acknowledged by the broker."""


class FatalBrokerError(BrokerError):
    """The client is fenced or hit a fatal error; the process must restart."""
