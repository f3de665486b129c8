"""Register a built UDF as a DuckDB vectorized (``type='arrow'``) function.

DuckDB calls the function with at most 2048 rows at a time, from several threads
at once. Each call cuts its rows into ``batch_size`` pieces and fans them out over
the workers through the dispatcher; DuckDB's ``threads`` is raised so that enough
calls are in flight to keep every worker busy.

Example:
    >>> fn = register_model_function(con, "digit", udf)         # doctest: +SKIP
    >>> con.sql("select digit(pixels) from digits").fetchall()  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from arrow_bridge.tensors import features, to_arrow
from arrow_bridge.types import arrow_type, duckdb_type_of
from udf_engine.dispatcher import MAX_IN_FLIGHT_PER_WORKER
from udf_engine.errors import ConfigError


class ModelFunction:
    """The callable DuckDB runs: Arrow columns in, one Arrow array out."""

    def __init__(self, name: str, udf: Any, return_type: str, batch_size: int, width: int | None) -> None:
        self.name = name  # the SQL name
        self.udf = udf  # a RemoteUDF (anything with map(batches) -> list)
        self.return_type = return_type  # DuckDB type, e.g. "FLOAT[10]"
        self.arrow_type = arrow_type(return_type)
        self.batch_size = batch_size  # rows per batch sent to a worker
        self.width = width  # values per input row, when the model says so
        self._lock = threading.Lock()
        self.rows_scored = 0  # rows returned since registration (read by progress bars)

    def __call__(self, *cols: Any) -> pa.Array:
        rows = len(cols[0]) if cols else 0
        if rows == 0:
            return pa.array([], type=self.arrow_type)
        matrix = features(cols, function=self.name, width=self.width)
        step = self.batch_size
        batches = [matrix[i : i + step] for i in range(0, rows, step)]
        result = to_arrow(self.udf.map(batches), self.arrow_type, rows)
        with self._lock:
            self.rows_scored += rows
        return result


def infer_return_type(name: str, udf: Any, width: int | None) -> str:
    """Probe the model once with a zero row and name the DuckDB type of what it returns."""
    if width is None:
        raise ConfigError(
            f"function {name}: cannot infer the return type because the model does not say how many "
            'inputs a row has; declare it, e.g. returns="DOUBLE[10]"'
        )
    # float64 zeros: a model that follows its input dtype (scikit-learn) then declares
    # the wider type, so float64 inputs are never narrowed on the way out.
    return duckdb_type_of(udf.probe(np.zeros((1, width), dtype=np.float64)))


def _ensure_threads(con: duckdb.DuckDBPyConnection, wanted: int) -> None:
    (current,), = con.execute("SELECT current_setting('threads')").fetchall()
    if int(current) < wanted:
        con.execute(f"SET threads = {int(wanted)}")


def register_model_function(
    con: duckdb.DuckDBPyConnection,
    name: str,
    udf: Any,
    *,
    returns: str | None = None,
    batch_size: int | None = None,
) -> ModelFunction:
    """Make ``udf`` callable from SQL as ``name(...)``; replaces a function of that name."""
    width = udf.info.get("input_width")
    return_type = returns or infer_return_type(name, udf, width)
    fn = ModelFunction(name, udf, return_type, batch_size or udf.conf.batch_size, width)
    unregister_function(con, name)
    # parameters=None makes DuckDB accept any number of arguments of any type:
    # f(pixels) and f(a, b, c) both reach __call__ with the columns as they are.
    con.create_function(name, fn, None, return_type, type="arrow")
    _ensure_threads(con, udf.conf.workers * MAX_IN_FLIGHT_PER_WORKER)
    return fn


def register_python_function(
    con: duckdb.DuckDBPyConnection, name: str, func: Any, returns: str, *, vectorized: bool = False
) -> None:
    """Make a plain Python function callable from SQL, run in-process by DuckDB.

    Row-wise (``vectorized=False``) it gets Python values; vectorized it gets one
    NumPy array per argument and returns one array (or list) for the whole call.
    """
    unregister_function(con, name)
    if not vectorized:
        con.create_function(name, lambda *values: func(*values), None, returns, type="native")
        return
    target = arrow_type(returns)

    def call(*cols: Any) -> pa.Array:
        arrays = [c.to_numpy(zero_copy_only=False) for c in cols]
        return to_arrow([func(*arrays)], target, len(cols[0]) if cols else 0)

    con.create_function(name, call, None, returns, type="arrow")


def unregister_function(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Remove a Python function from DuckDB if it is there."""
    try:
        con.remove_function(name)
    except duckdb.Error:
        pass
