"""Which errors reading a stream's file say the file is bad, and which may pass: the one place that tells them apart.

A file source skips (``on_bad_file="skip"``) or stops at a file only for an error that says
the file itself is malformed: not Parquet/CSV/JSON, corrupt, truncated, or of another schema
(:class:`BadFileError`). Anything else while reading it (EIO, ESTALE, too many open files,
out of memory, an interrupt, or an error not known here) is taken as transient: the batch is
tried again (:class:`TransientReadError`, sql_magics/streaming/query.py), never recorded as
skipped. Being wrong that way costs a stream that stops naming the file; the other way would
lose its rows for good.

What DuckDB 2.0 raises, found by reading ~1,500 mutated Parquet files and broken CSV/JSON
files, and by starving a reader of memory and of file descriptors:

- ``InvalidInputException``: no Parquet magic bytes, a file too small, a decompression
  failure, bad string encoding, malformed JSON, a CSV it cannot sniff or whose row has too
  many columns.
- ``ConversionException``: a CSV value that is not its column's type.
- ``duckdb.Error`` itself (no subclass): the Parquet and Thrift decoders' own errors
  ("Parquet file is likely corrupted", "Out of buffer", "Prefetch registered for bytes
  outside file", "TProtocolException: Invalid data"); a failed allocation is an
  ``OutOfMemoryException``, not this.
- ``IOException``: a failed open or read ("Too many open files", "Input/output error", a file
  removed), except for a read past the end of a truncated Parquet file, which says
  :data:`SHORT_READ`.

Example:
    >>> import duckdb
    >>> malformed(duckdb.InvalidInputException("No magic bytes found at end of file 'a.parquet'"))
    True
    >>> malformed(duckdb.IOException('Cannot open file "a.parquet": Too many open files'))
    False
"""

from __future__ import annotations

import duckdb

from sql_magics.errors import ExecutionError, clean_duckdb_error

MALFORMED = (duckdb.InvalidInputException, duckdb.ConversionException)
"""DuckDB's error classes that say a file's content cannot be read as its format."""
SHORT_READ = "Could not read enough bytes"
"""The one IOException about the file, not the reading: its footer points past its end (truncated)."""
TRANSIENT = (duckdb.IOException, duckdb.OutOfMemoryException, duckdb.InterruptException, OSError, MemoryError)
"""Errors that say a read failed, not what it read: where one is behind a failed batch, the batch is tried again."""


class BadFileError(ExecutionError):
    """A file of a file source that cannot be read as the stream's rows (corrupt, or another schema)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"bad file {path}: {reason}")
        self.path = path
        self.reason = reason


class TransientReadError(ExecutionError):
    """Reading ``what`` (a file, or a batch's files) failed in a way that may pass: try the batch again."""

    def __init__(self, what: str, error: BaseException) -> None:
        super().__init__(f"reading {what} failed: {clean_duckdb_error(error)}")
        self.what = what
        self.error = error


def malformed(err: BaseException) -> bool:
    """Whether an error reading one file says the file itself is malformed (see the module's docstring)."""
    if isinstance(err, BadFileError):
        return True
    if isinstance(err, MALFORMED) or type(err) is duckdb.Error:
        return True
    return isinstance(err, duckdb.IOException) and SHORT_READ in str(err)


def transient(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from (a DuckDB error the session wrapped in an
    ExecutionError), is a failed read rather than a bad file or a bad query."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, TransientReadError) or (isinstance(err, TRANSIENT) and not malformed(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def read_failure(path: str, err: Exception) -> BadFileError | TransientReadError:
    """What an error reading the file ``path`` alone means: a bad file, or (when unsure too) one to read again."""
    if malformed(err):
        return err if isinstance(err, BadFileError) else BadFileError(path, clean_duckdb_error(err))
    return TransientReadError(path, err)
