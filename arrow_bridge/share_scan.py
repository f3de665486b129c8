"""One worker's share of a query's Parquet source: read it with DuckDB, score it with the model
in the same process, and hand back only what the query needs.

When the query only picks columns (no filter, arguments that are columns), the share's row
groups (up to ARROW_READ_BYTES) are read with Arrow's Parquet reader instead, which decodes a
list column in half the time DuckDB takes to read and convert it. It is done only for types both
readers give alike (see :func:`read_alike`), so the values are the same either way; any other
column goes through DuckDB.

The driver (``sql_magics.planner``) cuts the files into shares of whole row groups and
sends one :class:`ShareScan` per share to a model worker, whose ``scan`` calls :meth:`ShareScan.run`
with the model's batch scorer. The result holds the columns the query reads besides the model
calls, and one score column per model call: a few bytes a row instead of the model's input.

Example:
    >>> task = ShareScan(function="f", returns="DOUBLE", query=f"SELECT x AS {arg_column(0, 0)}, file_row_number AS {ROW_COLUMN} "
    ...                  f"FROM {SHARE_VIEW}", schema=pa.schema([(arg_column(0, 0), pa.float64())]), passthrough=(),
    ...                  call_args=(1,), file="t.parquet", rows=(0, 9), width=None)  # doctest: +SKIP
    >>> task.run(lambda matrix: [matrix.sum(axis=1)]).table.column_names   # doctest: +SKIP
    ['__rayudf_s0']
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from arrow_bridge.quoting import quote_literal
from arrow_bridge.scoring import score_columns
from arrow_bridge.types import arrow_type
from udf_engine.errors import ModelError, RowError

# What a worker's query reads from: the share's rows of one file, with their row numbers in it
# (DuckDB's own column, FILE_ROW, which read_parquet gives when asked).
SHARE_VIEW = "__rayudf_share"
FILE_ROW = "file_row_number"
# The row number (in its file) of each row read, to name a row the model fails on.
ROW_COLUMN = "__rayudf_row"
# Names no user column takes: ours start with this.
PREFIX = "__rayudf_"
# Row groups larger than this (uncompressed, as the footer says) are read by DuckDB even when the
# query only picks columns: its buffer manager keeps its memory, while Arrow's reader allocates a
# whole group's columns again for each share, which for a 100k-row group of FLOAT[784] (300 MB) in
# a worker that has scored costs more than decoding it (0.9-1.8 s against DuckDB's 1.2 s, here;
# 10k-row groups: 0.11 s against 0.15 s).
ARROW_READ_BYTES = 64 << 20


def arg_column(call: int, arg: int) -> str:
    """The worker query's column holding argument ``arg`` of model call ``call``."""
    return f"{PREFIX}a{call}_{arg}"


def score_column(call: int) -> str:
    """The column holding the scores of model call ``call``, in the share's result and the driver's scan."""
    return f"{PREFIX}s{call}"


@dataclass
class ShareResult:
    """A share's rows as the driver's query reads them, and what scoring them did."""

    table: pa.Table  # the passthrough columns, then one score column per model call
    rows: int  # rows read and scored
    nulled: int = 0  # rows left NULL because the model raised on them (on_error="null")
    reason: str = ""  # what the model raised on the latest of those


# One DuckDB connection per thread: a connection runs one query at a time, and a share's view
# (SHARE_VIEW) must not be replaced by another thread's share while its query reads it.
_local = threading.local()


def _duckdb() -> duckdb.DuckDBPyConnection:
    con = getattr(_local, "connection", None)
    if con is None:
        con = _local.connection = duckdb.connect()
    return con


def read_alike(read: pa.DataType, target: pa.DataType) -> bool:
    """Whether a column Arrow's Parquet reader reads as ``read`` holds the values DuckDB reads from it
    as ``target``: integers, floats, booleans, text, dates, timestamps of one unit, and lists of them.

    Example:
        >>> read_alike(pa.list_(pa.float32(), 784), pa.list_(pa.float32())), read_alike(pa.timestamp("ms"), pa.timestamp("us"))
        (True, False)
    """
    if _is_list(read) and _is_list(target):
        return read_alike(read.value_type, target.value_type)
    if pa.types.is_timestamp(read) and pa.types.is_timestamp(target):
        return read.unit == target.unit and (read.tz is None) == (target.tz is None)  # the same instants, zone names aside
    if _is_text(read) and _is_text(target):
        return True
    plain = pa.types.is_integer, pa.types.is_float32, pa.types.is_float64, pa.types.is_boolean, pa.types.is_date32
    return read == target and any(kind(read) for kind in plain)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def read_picked(
    file: str, rows: tuple[int, int], picked: Sequence[tuple[str, str]], schema: pa.Schema, threads: int = 1
) -> pa.Table | None:
    """Rows ``rows`` (first, last) of ``file``, column ``source`` as ``name`` for each (name, source) picked,
    typed as ``schema``, with their row numbers as ROW_COLUMN; None when a column is not :func:`read_alike`,
    the row groups hold more than ARROW_READ_BYTES, or Arrow's reader fails (or finds text that is not
    UTF-8): DuckDB then reads it, or says in its words what is wrong."""
    parquet = pq.ParquetFile(file)
    stored = parquet.schema_arrow
    for name, source in picked:
        if stored.get_field_index(source) < 0 or "." in source:  # not there, there twice, or a nested path to Arrow
            return None
        if not read_alike(stored.field(source).type, schema.field(name).type):
            return None
    first, last = rows
    groups, start, offset = [], None, 0
    for group in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        if offset <= last and offset + size > first:
            groups.append(group)
            start = offset if start is None else start
        offset += size
    if not groups or sum(parquet.metadata.row_group(g).total_byte_size for g in groups) > ARROW_READ_BYTES:
        return None
    try:  # what Arrow's reader cannot read (some files DuckDB writes), DuckDB reads or names as wrong
        read = parquet.read_row_groups(groups, columns=list(dict.fromkeys(s for _, s in picked)), use_threads=threads > 1)
        read = read.slice(first - start, last - first + 1)
        table = pa.table({name: read[source] for name, source in picked}).cast(schema)
        for column in table.columns:
            if _is_text(column.type):
                column.validate(full=True)
    except (pa.ArrowException, OSError):
        return None
    return table.append_column(ROW_COLUMN, pa.array(range(first, first + table.num_rows), pa.int64()))


@dataclass(frozen=True)
class ShareScan:
    """Read rows ``rows`` (first, last; file row numbers) of one Parquet file and score them."""

    function: str  # the SQL name, for messages
    returns: str  # DuckDB type of the scores
    query: str  # over SHARE_VIEW: the passthrough columns, arg_column(i, j) and ROW_COLUMN
    schema: pa.Schema  # the passthrough and argument columns as the driver's DuckDB types them
    passthrough: tuple[str, ...]  # columns the query reads besides the model calls
    call_args: tuple[int, ...]  # how many arguments each model call has
    file: str
    rows: tuple[int, int]
    width: int | None  # values per input row, when the model says so
    picked: tuple[tuple[str, str], ...] | None = None  # (column, file column) when ``query`` only picks columns

    def __len__(self) -> int:
        """The rows of the share (before filters), as a batch's length counts its rows."""
        return self.rows[1] - self.rows[0] + 1

    def run(self, score: Callable[[Any], list[Any]], threads: int = 1) -> ShareResult:
        """Read the share with DuckDB (``threads`` of it: the worker's share of the cores), score each
        model call's arguments with ``score(matrix)`` (the worker cuts it into its batches), return the result."""
        read = self._read(threads)
        row_numbers = read[ROW_COLUMN]
        # the driver's types: a file of a glob may store a column narrower than the first file does
        table = read.drop_columns([ROW_COLUMN]).cast(self.schema)
        columns = {name: table[name] for name in self.passthrough}
        result = ShareResult(pa.table({}), rows=table.num_rows)
        target = arrow_type(self.returns)
        for call, count in enumerate(self.call_args):
            args = [table[arg_column(call, j)].combine_chunks() for j in range(count)]
            try:
                scored = score_columns(args, function=self.function, width=self.width, arrow_type=target, score=score)
            except RowError as err:
                place = f"row {row_numbers[err.row].as_py() + 1} of {self.file}"
                raise ModelError(f"{err.message} ({place}: {err.values})") from None
            columns[score_column(call)] = scored.array
            result.nulled += scored.nulled
            result.reason = scored.reason or result.reason
        result.table = pa.table(columns)
        return result

    def _read(self, threads: int) -> pa.Table:
        """The share's rows as ``query`` gives them."""
        if self.picked is not None and (read := read_picked(self.file, self.rows, self.picked, self.schema, threads)) is not None:
            return read
        con = _duckdb()
        con.execute(f"SET threads = {int(threads)}")
        first, last = self.rows
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {SHARE_VIEW} AS SELECT * FROM read_parquet({quote_literal(self.file)}, "
            f"{FILE_ROW} = true) WHERE {FILE_ROW} BETWEEN {int(first)} AND {int(last)}"
        )
        return con.sql(self.query).to_arrow_table()
