"""What an input row must look like, and the one-line reasons given when it does not.

The dispatcher reads three columns (others, such as ``name`` or ``city``, may be present
and are ignored): ``country`` (text), ``test_datetime`` (a timestamp, or ISO 8601 text in
CSV files) and ``result``. A row is valid when

* ``country`` is present, not blank (surrounding spaces are trimmed) and at most
  :data:`MAX_KEY_BYTES` long in UTF-8 (a job key travels in every message of the job);
* ``test_datetime`` is present, parses as a timestamp (text without an offset is UTC),
  and falls inside the run's range ``[start, end)``;
* ``result``, trimmed and lower-cased, is one of :data:`POSITIVE` or :data:`NEGATIVE`
  (a boolean column is accepted too: true = positive).

A row that fails gets the first failing check's field and reason, in that order.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

REQUIRED_COLUMNS: Final = ("country", "test_datetime", "result")

#: Accepted spellings, compared after trimming and lower-casing.
POSITIVE: Final = ("positive", "pos", "p", "+", "1", "true", "yes", "detected")
NEGATIVE: Final = ("negative", "neg", "n", "-", "0", "false", "no", "not detected")

#: The longest ``country`` (UTF-8 bytes, after trimming) a job key may carry.
MAX_KEY_BYTES: Final = 1024

DEFAULT_START: Final = datetime(2020, 3, 1, tzinfo=UTC)
DEFAULT_END: Final = datetime(2021, 1, 1, tzinfo=UTC)

#: (field, reason) for every way a row can fail, keyed by a short code.
REASONS: Final = {
    "country_missing": ("country", "country is missing"),
    "country_empty": ("country", "country is empty"),
    "country_too_long": ("country", f"country is longer than {MAX_KEY_BYTES} bytes"),
    "test_datetime_missing": ("test_datetime", "test_datetime is missing"),
    "test_datetime_unparseable": ("test_datetime", "test_datetime is not a valid timestamp"),
    "test_datetime_out_of_range": ("test_datetime", "test_datetime is outside the run's range"),
    "result_missing": ("result", "result is missing"),
    "result_invalid": ("result", "result is not an accepted spelling of positive/negative"),
}
