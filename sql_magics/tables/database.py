"""The session's DuckDB connection: running one statement, and DuckDB's own settings.

Example:
    >>> db = Database()
    >>> db.query("select 42 as answer")["answer"].tolist()
    [42]
    >>> db.query("create table t as select 1 as x") is None   # no rows for the user
    True
    >>> db.is_setting("threads"), db.is_setting("sql.dialect")
    (True, False)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import duckdb
import pandas as pd

from arrow_bridge.quoting import quote_identifier, quote_literal
from sql_magics.errors import ExecutionError, clean_duckdb_error
from sql_magics.tables.catalog import yields_rows

# After a failed or interrupted query, how long to wait for the model calls it left
# running: a call holds at most a few batches, which take seconds, not minutes. Looking
# every 20 ms costs nothing next to a batch and adds no noticeable delay to the error.
IDLE_TIMEOUT_S = 120.0
IDLE_POLL_S = 0.02


class Planner(Protocol):
    """How a database runs its statements (the session's is ``sql_magics.planner.scans.WorkerScans``)."""

    def __call__(self, con: duckdb.DuckDBPyConnection, sql: str) -> AbstractContextManager[str]:
        """``with planner(con, sql) as statement:`` the statement to run for ``sql``, while the block lasts."""
        ...

    def explain(self, con: duckdb.DuckDBPyConnection, sql: str) -> dict:
        """What ``!plan`` shows of the path ``sql`` would take now (path, reason, statement, ...)."""
        ...


class AsWritten:
    """The planner that runs every statement as it is written."""

    @contextmanager
    def __call__(self, con: duckdb.DuckDBPyConnection, sql: str) -> Iterator[str]:
        yield sql

    def explain(self, con: duckdb.DuckDBPyConnection, sql: str) -> dict:
        raise ExecutionError("!plan: this database runs every statement as written (it was given no planner)")


class Database:
    """One DuckDB connection and how the statement language runs SQL on it.

    The connection runs one statement at a time: DuckDB refuses a second call while one
    runs, so threads sharing a session take turns through :meth:`exclusive`.
    """

    def __init__(self, path: str = ":memory:", *, planner: Planner | None = None) -> None:
        self.con = duckdb.connect(path)
        self._turn = threading.RLock()  # held by whoever runs a statement or changes the catalog's functions
        self.planner: Planner = planner or AsWritten()  # what each statement runs as (a Session's: worker scans)
        # DuckDB tracks a query's progress only when asked; our progress bar reads it, DuckDB prints nothing.
        self.con.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false").fetchall()

    def exclusive(self) -> threading.RLock:
        """``with db.exclusive():`` the connection is this thread's until the block ends (re-entrant)."""
        return self._turn

    def query(self, sql: str, parameters: Any = None) -> pd.DataFrame | None:
        """Run one DuckDB statement (as the planner says), ``$name`` bound from ``parameters``; a
        DataFrame if it yields rows, else None."""
        with self._turn, self.planner(self.con, sql) as statement:
            try:
                cursor = self.con.execute(statement, parameters) if parameters else self.con.execute(statement)
                if yields_rows(cursor.description, sql):
                    return cursor.df()
                cursor.fetchall()
                return None
            except duckdb.Error as err:
                self._wait_until_idle()
                raise ExecutionError(clean_duckdb_error(err), statement=sql) from None

    def _wait_until_idle(self) -> None:
        """Wait for DuckDB to finish the model calls a failed or interrupted query left running.

        DuckDB stops a query at once, but calls already inside a model function run to
        their end and keep the connection busy; DuckDB refuses (not waits) meanwhile, so
        the next statement would fail for no reason of its own.
        """
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            try:
                self.con.execute("SELECT 1").fetchall()
                return
            except duckdb.ResourceInUseException:
                if time.monotonic() > deadline:
                    return
                time.sleep(IDLE_POLL_S)

    def is_setting(self, key: str) -> bool:
        """Whether ``key`` names one of DuckDB's own settings (threads, memory_limit, ...)."""
        return bool(self.con.execute("SELECT 1 FROM duckdb_settings() WHERE name = ?", [key]).fetchall())

    def set_setting(self, key: str, value: str) -> None:
        """``SET key = 'value'``, with DuckDB's complaint as an ExecutionError."""
        try:
            self.con.execute(f"SET {quote_identifier(key)} = {quote_literal(value)}").fetchall()
        except duckdb.Error as err:
            raise ExecutionError(f"set {key}: {clean_duckdb_error(err)}") from None

    def close(self) -> None:
        self.con.close()
