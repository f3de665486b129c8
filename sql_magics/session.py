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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import duckdb
import pandas as pd

from arrow_bridge.function import ModelFunction, register_model_function, register_python_function, unregister_function
from sql_magics.catalog import relation_kind, yields_rows
from sql_magics.dialect import check_dialect
from sql_magics.errors import ExecutionError, clean_duckdb_error
from sql_magics.executor import Executor
from sql_magics.parser import parse
from sql_magics.statements import Statement
from udf_engine import (
    ConfigError,
    ModelError,
    RayContext,
    RayRuntime,
    RemoteUDF,
    UDFBuildInFunc,
    UDFBuilder,
    detect_format,
    model_meta,
    model_rows,
    put_model,
    read_model_rows,
)
from udf_engine.model_store import rows_from_table

# A model kind names a loader family; the model's own format (from its file) must fit it.
_FAMILIES = {"keras": "tf", "tf": "tf", "savedmodel": "tf", "sklearn": "pickle", "pickle": "pickle"}
_LOADERS = {"tf": UDFBuildInFunc.init_tf, "pickle": UDFBuildInFunc.init_pickle}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Options the bridge and the session read; every other option goes to the engine.
_BRIDGE_OPTIONS = ("returns", "version")


@dataclass
class RegisteredFunction:
    """A model (or Python function) registered as a SQL function in a Session."""

    name: str
    kind: str  # keras, pickle, savedmodel, Ray, ScriptUDF, ...
    path: str
    returns: str  # the DuckDB result type
    udf: RemoteUDF | None  # None for a ScriptUDF, which DuckDB runs in-process
    function: ModelFunction | None = None
    version: str = "1"
    options: dict = field(default_factory=dict)


class Session:
    """A DuckDB connection whose SQL can call models served by Ray actors.

    ``sql(text)`` runs a script of the statement language (SPEC section 5): MLSQL-style
    statements plus any DuckDB SQL.
    """

    def __init__(
        self,
        database: str = ":memory:",
        dialect: str = "duckdb",
        *,
        ray_address: str | None = None,
        ray_init: dict | None = None,
    ) -> None:
        self.con = duckdb.connect(database)  # the session's DuckDB
        # DuckDB tracks a query's progress only when asked; our progress bar reads it, DuckDB prints nothing.
        self.con.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false").fetchall()
        self.dialect = check_dialect(dialect)  # "duckdb" or "spark" (translated by sqlglot)
        self.runtime = RayRuntime(ray_address, **(ray_init or {}))  # started on first registration
        self.id = secrets.token_hex(3)  # keeps this session's actor names apart from others'
        self.functions: dict[str, RegisteredFunction] = {}  # registered functions by SQL name
        self.variables: dict[str, str] = {}  # `set` variables, used as ${key}
        self._pinned: set[str] = set()  # variables given from outside (CLI --set) that `set` leaves alone
        self.python_conf: dict[str, str] = {}  # `!python conf`, reaches registerCode as context.conf
        self.python_env: dict[str, str] = {}  # `!python env`, set in the workers' environment

    # -- scripts ----------------------------------------------------------------------

    def parse(self, text: str, source_name: str = "") -> list[Statement]:
        """Parse a script without running it; raises ParseError with line and column."""
        return parse(text, source_name)

    def sql(
        self, text: str, *, parameters: dict | None = None, source_name: str = "", base_dir: str | Path | None = None
    ) -> pd.DataFrame | None:
        """Run a script; return the rows of the last statement that yields rows (else None).

        The whole script is parsed first, so a malformed statement runs nothing.
        ``parameters`` binds ``$name`` query parameters; ``base_dir`` anchors ``include``.
        """
        statements = parse(text, source_name)
        executor = Executor(self, parameters=parameters)
        return executor.run(statements, base_dir=Path(base_dir or Path.cwd()), source_name=source_name)

    def start_ray_for(self, statements: list[Statement]) -> None:
        """Start (or join) Ray now if these statements may register a model.

        Call it on the main thread before running the statements on another one:
        ``ray.init`` wants the main thread, and the processes it starts die with the
        thread that started them. A ``set ray.address`` among the statements is honoured.
        """
        for statement in statements:
            if statement.kind == "set" and statement.key == "ray.address":
                self.runtime.address = statement.value
        if any(statement.kind in ("register", "include") for statement in statements):
            self.runtime.ensure()

    def run_duckdb(self, query: str, parameters: Any = None) -> pd.DataFrame | None:
        """Run one DuckDB statement; a DataFrame if it yields rows, else None."""
        try:
            cursor = self.con.execute(query, parameters) if parameters else self.con.execute(query)
            if not yields_rows(cursor.description, query):
                cursor.fetchall()
                return None
            return cursor.df()
        except duckdb.Error as err:
            self._wait_until_idle()
            raise ExecutionError(clean_duckdb_error(err), statement=query) from None

    def _wait_until_idle(self, timeout_s: float = 120.0) -> None:
        """Wait for DuckDB to finish the model calls a failed or interrupted query left running.

        DuckDB stops a query at once, but calls already inside a model function run to
        their end and keep the connection busy; DuckDB refuses (not waits) meanwhile, so
        the next statement would fail for no reason of its own.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.con.execute("SELECT 1").fetchall()
                return
            except duckdb.ResourceInUseException:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)

    def pin_variables(self, values: dict[str, str]) -> None:
        """Set variables that a script's own ``set`` statements do not override (``rayudf run --set``)."""
        for key, value in values.items():
            self.set_variable(key, value)
        self._pinned.update(values)

    def set_variable(self, key: str, value: str) -> None:
        """``set key = value``: a ${key} variable, or a setting (sql.dialect, ray.address, DuckDB's own)."""
        if key in self._pinned:
            return
        if key == "sql.dialect":
            self.dialect = check_dialect(value)
        elif key == "ray.address":
            self.runtime.address = value
        elif self.con.execute("SELECT 1 FROM duckdb_settings() WHERE name = ?", [key]).fetchall():
            self._set_duckdb(key, value)
        self.variables[key] = value

    def _set_duckdb(self, key: str, value: str) -> None:
        literal = "'" + value.replace("'", "''") + "'"
        try:
            self.con.execute(f'SET "{key}" = {literal}').fetchall()
        except duckdb.Error as err:
            raise ExecutionError(f"set {key}: {clean_duckdb_error(err)}") from None

    # -- models -----------------------------------------------------------------------

    def model_rows(self, source: str | Path, *, format: str | None = None, version: str = "1") -> list[dict]:
        """A model's chunk rows from a file or directory, a model table on disk, or a loaded table."""
        path = Path(source)
        if not path.exists() and _IDENTIFIER.match(str(source)) and relation_kind(self.con, str(source)):
            arrow = self.con.sql(f'SELECT * FROM "{source}"').to_arrow_table()
            return rows_from_table(arrow, source=f"table {source}")
        if (format or detect_format(path)) == "table":
            return read_model_rows(path)
        return model_rows(path, format=format, version=version)

    def register_model(self, function: str, path: str | Path, *, format: str | None = None, **options: Any) -> RegisteredFunction:
        """Load a model into Ray workers and make it callable from SQL as ``function(...)``.

        ``path`` is a Keras ``.keras``/``.h5`` file, a SavedModel directory, a pickle/joblib
        file, a model table written by ``udf_engine.save_model``, or the name of a table
        loaded in this session. ``format`` is keras, tf, sklearn, pickle or None/"model"
        (detected). Options: ``workers``, ``batch_size``, ``num_cpus``, ``num_gpus``,
        ``resources``, ``returns``, ``version``, ``method`` (``predict_proba``).
        """
        kind = None if format in (None, "model") else format.lower()
        rows = self.model_rows(path, version=str(options.get("version", "1")))
        detected = model_meta(rows)["format"]
        family = _FAMILIES.get(detected)
        if family is None:
            raise ModelError(f"register {function}: no loader for a {detected!r} model")
        if kind is not None and _FAMILIES.get(kind) is None:
            raise ConfigError(f"register {function}: unknown model kind {kind!r} (known: {', '.join(_FAMILIES)}, model)")
        if kind is not None and _FAMILIES[kind] != family:
            raise ModelError(f"register {function}: {path} holds a {detected} model, not {kind}")
        apply = UDFBuildInFunc.predictor(str(options.get("method", "predict")))
        return self.register_udf(function, _LOADERS[family], apply, rows=rows, kind=kind or detected, path=str(path), options=options)

    def register_udf(
        self, function: str, init_func: Callable, apply_func: Callable, *, rows: list[dict], kind: str, path: str, options: dict
    ) -> RegisteredFunction:
        """Build workers with ``init_func``/``apply_func`` over a model's rows and register them."""
        self._check_name(function)
        engine_options = {k: v for k, v in options.items() if k not in _BRIDGE_OPTIONS}
        udf = UDFBuilder.build(self.ray_context(function, engine_options, rows), init_func, apply_func)
        return self.expose(function, udf, kind=kind, path=path, options=options)

    def ray_context(self, function: str, conf: dict, rows: list[dict], *, row_wise: bool = False) -> RayContext:
        """The context to build ``function`` in: this session's Ray and actor names, the model
        rows in the object store, and ``!python env`` for the workers."""
        conf = dict(conf)
        if self.python_env:
            conf.setdefault("env", dict(self.python_env))
        self.runtime.ensure()
        return RayContext(
            function,
            conf=conf,
            model_refs=put_model(rows),
            actor_prefix=self.actor_prefix(function),
            runtime=self.runtime,
            row_wise=row_wise,
        )

    def actor_prefix(self, function: str) -> str:
        """The name prefix of this session's actors for ``function``."""
        return f"rayudf.{self.id}.{function}"

    def expose(self, function: str, udf: RemoteUDF, *, kind: str, path: str, options: dict) -> RegisteredFunction:
        """Make a built UDF callable from SQL; on failure its workers are stopped."""
        self._check_name(function)
        try:
            fn = register_model_function(self.con, function, udf, returns=options.get("returns"))
        except BaseException:
            udf.shutdown()
            raise
        self._forget(function, keep=udf)
        registered = RegisteredFunction(function, kind, path, fn.return_type, udf, fn, str(options.get("version", "1")), dict(options))
        self.functions[function] = registered
        return registered

    def expose_python(self, function: str, func: Callable, returns: str, *, vectorized: bool, options: dict) -> RegisteredFunction:
        """Make a plain Python function callable from SQL (run in-process by DuckDB)."""
        self._check_name(function)
        try:
            register_python_function(self.con, function, func, returns, vectorized=vectorized)
        except duckdb.Error as err:
            raise ExecutionError(f"register {function}: {clean_duckdb_error(err)}") from None
        self._forget(function)
        registered = RegisteredFunction(function, "ScriptUDF", "", returns, None, None, str(options.get("version", "1")), dict(options))
        self.functions[function] = registered
        return registered

    @staticmethod
    def _check_name(function: str) -> None:
        if not _IDENTIFIER.match(function):
            raise ConfigError(f"register: {function!r} is not a valid function name")

    def _forget(self, function: str, keep: RemoteUDF | None = None) -> None:
        old = self.functions.pop(function, None)
        if old is not None and old.udf is not None and old.udf is not keep:
            old.udf.shutdown()

    def unregister(self, function: str) -> None:
        """Remove a function from SQL and stop its workers."""
        if function not in self.functions:
            raise ExecutionError(f"unregister: no function named {function!r}")
        unregister_function(self.con, function)
        self._forget(function)

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop every function's workers, close DuckDB, and stop Ray if this session started it."""
        for name in list(self.functions):
            self._forget(name)
        self.con.close()
        self.runtime.shutdown()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
