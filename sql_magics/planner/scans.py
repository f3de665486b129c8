"""Running a statement on the worker path, and the session's planner that decides it.

:class:`WorkerScans` is what ``Database(planner=...)`` runs every statement through: it plans
the statement (:mod:`sql_magics.planner.plan`), and for the worker path has the shares read and
scored by the model's workers (``RemoteUDF.scan``), registers the stream of their results with
DuckDB in file order, and hands back the rewritten statement that reads it.

Example:
    >>> con = duckdb.connect()
    >>> scans = WorkerScans(functions=dict, enabled=lambda: True)
    >>> with scans(con, "select 42 as x") as statement:   # no model function: as written
    ...     con.sql(statement).fetchall()
    [(42,)]
    >>> scans.explain(con, "select 42")["reason"]
    'no model function call'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import duckdb
import pyarrow as pa

from arrow_bridge.function import ModelFunction
from arrow_bridge.share_scan import ShareScan, score_column
from sql_magics.planner.plan import WORKERS, Plan, driver, plan
from sql_magics.state import WORKER_SCAN


class _Stream:
    """The shares' results in file order, as Arrow batches for DuckDB; remembers what failed."""

    def __init__(self, results: Iterator[Any], schema: pa.Schema, fn: ModelFunction) -> None:
        self._results = results
        self.schema = schema
        self._fn = fn
        self.error: BaseException | None = None  # what stopped the stream (re-raised instead of DuckDB's wrapping)

    def batches(self) -> Iterator[pa.RecordBatch]:
        try:
            for result in self._results:
                self._fn.count(result.rows, result.nulled, result.reason)
                yield from result.table.cast(self.schema).to_batches()
        except GeneratorExit:  # DuckDB stopped reading (the query failed or was interrupted elsewhere)
            raise
        except BaseException as err:
            self.error = err
            raise


def readable(fn: ModelFunction, files: list[str]) -> bool:
    """Whether every worker of ``fn`` sees each file as the driver does (same path, same size)."""
    return fn.udf.can_read([(f, os.path.getsize(f)) for f in files])


@contextmanager
def running(con: duckdb.DuckDBPyConnection, planned: Plan, fn: ModelFunction) -> Iterator[str]:
    """Register the stream of the shares' results; yield the statement to run on it (while it runs)."""
    with fn.using() as version:
        tasks = [
            ShareScan(
                function=fn.name, returns=fn.return_type, query=planned.worker_query, schema=planned.schema,
                passthrough=planned.passthrough, call_args=planned.call_args, file=share.file,
                rows=(share.first, share.last), width=version.width, picked=planned.picked,
            )
            for share in planned.shares
        ]
        out_schema = pa.schema(
            [planned.schema.field(c) for c in planned.passthrough]
            + [pa.field(score_column(i), fn.arrow_type) for i in range(len(planned.call_args))]
        )
        stream = _Stream(version.udf.scan(tasks), out_schema, fn)
        con.register(planned.scan_name, pa.RecordBatchReader.from_batches(out_schema, stream.batches()))
        try:
            yield planned.statement
        except Exception:
            if stream.error is not None:
                raise stream.error from None
            raise
        finally:
            con.unregister(planned.scan_name)


class WorkerScans:
    """The planner of one connection: runs a statement on the worker path when it can (see the module).

    ``functions()`` gives the model functions registered now; ``enabled()`` is False when
    ``set worker_scan = "off"``.
    """

    def __init__(self, functions: Callable[[], Mapping[str, ModelFunction]], enabled: Callable[[], bool]) -> None:
        self._functions = functions
        self._enabled = enabled

    def explain(self, con: duckdb.DuckDBPyConnection, sql: str) -> dict:
        """What ``!plan`` shows of the path ``sql`` would take now: one value per PLAN_COLUMNS."""
        return self._plan(con, sql).describe()

    @contextmanager
    def __call__(self, con: duckdb.DuckDBPyConnection, sql: str) -> Iterator[str]:
        """``with scans(con, sql) as statement:`` run ``statement``, on the worker path if ``sql`` qualifies."""
        planned = self._plan(con, sql)
        if planned.path != WORKERS:
            yield sql
            return
        with running(con, planned, self._functions()[planned.function]) as statement:
            yield statement

    def _plan(self, con: duckdb.DuckDBPyConnection, sql: str) -> Plan:
        if not self._enabled():
            return driver(f'set {WORKER_SCAN} = "off"')
        functions = self._functions()
        planned = plan(con, sql, functions)
        if planned.path == WORKERS and not readable(functions[planned.function], planned.files):
            return driver("the workers do not see the files as the driver does (another file system?)")
        return planned
