"""Session: one DuckDB connection, the models registered in it, and the Ray they run on.

Example:
    >>> from sql_magics import Session
    >>> with Session() as s:                                                   # doctest: +SKIP
    ...     s.register_model("digit", "models/digits.keras", workers=2, batch_size=512)
    ...     df = s.sql("select id, digit(pixels) as probs from read_parquet('data/*.parquet') order by id")
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from arrow_bridge.function import ModelFunction, register_model_function, unregister_function
from sql_magics.errors import ExecutionError
from udf_engine import (
    ConfigError,
    RayContext,
    RayRuntime,
    RayUDFError,
    RemoteUDF,
    UDFBuildInFunc,
    UDFBuilder,
    detect_format,
    model_meta,
    model_rows,
    put_model,
    read_model_rows,
)

_LOADERS = {
    "keras": UDFBuildInFunc.init_tf,
    "tf": UDFBuildInFunc.init_tf,
    "savedmodel": UDFBuildInFunc.init_tf,
    "pickle": UDFBuildInFunc.init_pickle,
    "sklearn": UDFBuildInFunc.init_pickle,
}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OWN_ERROR_PREFIX = re.compile(r"^(RayUDFError|ConfigError|ModelError|WorkerError|InputError): ")
# Options the bridge and the session read; every other option goes to the engine.
_BRIDGE_OPTIONS = ("returns", "version")


@dataclass
class RegisteredFunction:
    """A model registered as a SQL function in a Session."""

    name: str
    kind: str  # keras, pickle, savedmodel, Ray, ...
    path: str
    udf: RemoteUDF
    function: ModelFunction
    version: str = "1"
    options: dict = field(default_factory=dict)


def _clean_duckdb_error(err: duckdb.Error) -> str:
    """DuckDB's message without the wrapper it adds around a Python UDF's exception."""
    text = str(err)
    marker = "Python exception occurred while executing the UDF:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
        # our own errors already say what went wrong; their class name adds nothing
        text = _OWN_ERROR_PREFIX.sub("", text, count=1)
    return text.splitlines()[0] if text else type(err).__name__


class Session:
    """A DuckDB connection whose SQL can call models served by Ray actors."""

    def __init__(
        self,
        database: str = ":memory:",
        dialect: str = "duckdb",
        *,
        ray_address: str | None = None,
        ray_init: dict | None = None,
    ) -> None:
        self.con = duckdb.connect(database)  # the session's DuckDB
        self.dialect = dialect  # "duckdb" or "spark" (select text translated by sqlglot)
        self.runtime = RayRuntime(ray_address, **(ray_init or {}))  # started on first registration
        self.id = secrets.token_hex(3)  # keeps this session's actor names apart from others'
        self.functions: dict[str, RegisteredFunction] = {}  # registered models by SQL name

    # -- models ---------------------------------------------------------------------

    def register_model(self, function: str, path: str | Path, *, format: str | None = None, **options: Any) -> RegisteredFunction:
        """Load a model into Ray workers and make it callable from SQL as ``function(...)``.

        ``path`` is a Keras ``.keras``/``.h5`` file, a SavedModel directory, a pickle/joblib
        file, or a model table written by ``udf_engine.save_model``. Options: ``workers``,
        ``batch_size``, ``num_cpus``, ``num_gpus``, ``resources``, ``returns``, ``version``,
        ``method`` (``predict_proba`` for classifiers).
        """
        fmt = None if format in (None, "model") else format
        fmt = fmt or detect_format(path)
        if fmt == "table":
            rows = read_model_rows(path)
            fmt = model_meta(rows)["format"]
        else:
            rows = model_rows(path, format=fmt, version=str(options.get("version", "1")))
        loader = _LOADERS.get(fmt)
        if loader is None:
            raise ConfigError(f"register {function}: unknown model format {fmt!r} (known: {', '.join(_LOADERS)})")
        apply = UDFBuildInFunc.predictor(str(options.get("method", "predict")))
        return self.register_udf(function, loader, apply, rows=rows, kind=fmt, path=str(path), options=options)

    def register_udf(
        self,
        function: str,
        init_func: Any,
        apply_func: Any,
        *,
        rows: list[dict],
        kind: str,
        path: str,
        options: dict,
    ) -> RegisteredFunction:
        """Build workers with ``init_func``/``apply_func`` over a model's rows and register them."""
        if not _IDENTIFIER.match(function):
            raise ConfigError(f"register: {function!r} is not a valid function name")
        engine_options = {k: v for k, v in options.items() if k not in _BRIDGE_OPTIONS}
        self.runtime.ensure()
        ctx = RayContext(
            function,
            conf=engine_options,
            model_refs=put_model(rows),
            actor_prefix=f"rayudf.{self.id}.{function}",
            runtime=self.runtime,
        )
        udf = UDFBuilder.build(ctx, init_func, apply_func)
        return self._expose(function, udf, kind=kind, path=path, options=options)

    def _expose(self, function: str, udf: RemoteUDF, *, kind: str, path: str, options: dict) -> RegisteredFunction:
        try:
            fn = register_model_function(self.con, function, udf, returns=options.get("returns"))
        except BaseException:
            udf.shutdown()
            raise
        registered = RegisteredFunction(function, kind, path, udf, fn, str(options.get("version", "1")), dict(options))
        self.functions[function] = registered
        return registered

    def unregister(self, function: str) -> None:
        """Remove a function from SQL and stop its workers."""
        registered = self.functions.pop(function, None)
        if registered is None:
            raise ExecutionError(f"unregister: no function named {function!r}")
        unregister_function(self.con, function)
        registered.udf.shutdown()

    # -- SQL --------------------------------------------------------------------------

    def sql(self, text: str) -> pd.DataFrame | None:
        """Run one or more statements; return the rows of the last one that yields rows."""
        result = None
        try:
            statements = duckdb.extract_statements(text)
        except duckdb.Error as err:
            raise ExecutionError(_clean_duckdb_error(err)) from None
        for statement in statements:
            frame = self.run_duckdb(statement.query)
            if frame is not None:
                result = frame
        return result

    def run_duckdb(self, query: str, parameters: Any = None) -> pd.DataFrame | None:
        """Run one DuckDB statement; a DataFrame if it yields rows, else None."""
        try:
            cursor = self.con.execute(query, parameters) if parameters else self.con.execute(query)
            if cursor.description is None:
                return None
            return cursor.df()
        except duckdb.Error as err:
            raise ExecutionError(_clean_duckdb_error(err), statement=query) from None
        except RayUDFError:
            raise

    # -- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Stop every function's workers, close DuckDB, and stop Ray if this session started it."""
        for name in list(self.functions):
            self.functions.pop(name).udf.shutdown()
        self.con.close()
        self.runtime.shutdown()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
