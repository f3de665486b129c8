"""One worker's share of a query's Parquet source: read it with DuckDB, score it with the model
in the same process, and hand back only what the query needs.

The driver (``sql_magics.planner``) cuts the files into shares of whole row groups and
sends one :class:`ShareScan` per share to a model worker, whose ``scan`` calls :meth:`ShareScan.run`
with the model's batch scorer. The result holds the columns the query reads besides the model
calls, and one score column per model call: a few bytes a row instead of the model's input.

Example:
    >>> task = ShareScan(function="f", returns="DOUBLE", query=f"SELECT x AS {arg_column(0, 0)}, file_row_number AS {ROW_COLUMN} "
    ...                  f"FROM {SHARE_VIEW}", schema=pa.schema([(arg_column(0, 0), pa.float64())]), passthrough=(),
    ...                  call_args=(1,), file="t.parquet", rows=(0, 9), width=None, batch_size=4)  # doctest: +SKIP
    >>> task.run(lambda batches: [b.sum(axis=1) for b in batches]).table.column_names   # doctest: +SKIP
    ['__rayudf_s0']
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

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
    batch_size: int

    def __len__(self) -> int:
        """The rows of the share (before filters), as a batch's length counts its rows."""
        return self.rows[1] - self.rows[0] + 1

    def run(self, score: Callable[[list], list[Any]], threads: int = 1) -> ShareResult:
        """Read the share with DuckDB (``threads`` of it: the worker's share of the cores), score each
        model call's arguments with ``score(batches)``, return the result."""
        con = _duckdb()
        con.execute(f"SET threads = {int(threads)}")
        first, last = self.rows
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {SHARE_VIEW} AS SELECT * FROM read_parquet({quote_literal(self.file)}, "
            f"{FILE_ROW} = true) WHERE {FILE_ROW} BETWEEN {int(first)} AND {int(last)}"
        )
        read = con.sql(self.query).to_arrow_table()
        row_numbers = read[ROW_COLUMN]
        # the driver's types: a file of a glob may store a column narrower than the first file does
        table = read.drop_columns([ROW_COLUMN]).cast(self.schema)
        columns = {name: table[name] for name in self.passthrough}
        result = ShareResult(pa.table({}), rows=table.num_rows)
        target = arrow_type(self.returns)
        for call, count in enumerate(self.call_args):
            args = [table[arg_column(call, j)].combine_chunks() for j in range(count)]
            try:
                scored = score_columns(
                    args, function=self.function, width=self.width, batch_size=self.batch_size, arrow_type=target, map_batches=score
                )
            except RowError as err:
                place = f"row {row_numbers[err.row].as_py() + 1} of {self.file}"
                raise ModelError(f"{err.message} ({place}: {err.values})") from None
            columns[score_column(call)] = scored.array
            result.nulled += scored.nulled
            result.reason = scored.reason or result.reason
        result.table = pa.table(columns)
        return result
