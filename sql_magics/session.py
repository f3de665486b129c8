"""Session: the public front that wires a DuckDB connection, its planner, a function registry and a script state.

The executor runs statements on those; the Session only builds them, hands them over, and
offers the Python twins of the statements.

Example:
    >>> from sql_magics import Session
    >>> with Session() as s:                                                   # doctest: +SKIP
    ...     s.register_model("digit", "models/digits.keras", workers=2, batch_size=512)
    ...     df = s.sql("select id, digit(pixels) as probs from read_parquet('data/*.parquet') order by id")
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from sql_magics.executor import Executor, ScriptResult
from sql_magics.handoff import on_waiting_thread
from sql_magics.language.parser import parse
from sql_magics.language.statements import Statement
from sql_magics.models.kinds import register_model
from sql_magics.models.registry import FunctionRegistry, RegisteredFunction
from sql_magics.planner.scans import WorkerScans
from sql_magics.state import ScriptState
from sql_magics.tables.database import Database
from udf_engine import RayRuntime


class Session:
    """A DuckDB connection whose SQL can call models served by Ray actors.

    ``sql(text)`` runs a script of the statement language (docs/statements.md):
    MLSQL-style statements plus any DuckDB SQL.
    """

    def __init__(
        self,
        database: str = ":memory:",
        dialect: str = "duckdb",
        *,
        ray_address: str | None = None,
        ray_init: dict | None = None,
    ) -> None:
        self.state = ScriptState(dialect)
        # The planner reads the registry's model functions as each statement starts; the registry is made next.
        planner = WorkerScans(lambda: self.registry.model_functions(), enabled=self.state.worker_scans)
        self.db = Database(database, planner=planner)
        runtime = RayRuntime(ray_address, starter=on_waiting_thread, **(ray_init or {}))  # started on first registration
        self.registry = FunctionRegistry(self.db, runtime, session_id=secrets.token_hex(3), worker_env=self.state.python_env)

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The session's DuckDB connection."""
        return self.db.con

    @property
    def functions(self) -> dict[str, RegisteredFunction]:
        """The registered functions by SQL name (a copy)."""
        return self.registry.functions

    @property
    def rows_scored(self) -> int:
        """Rows scored by this session's model functions so far."""
        return self.registry.rows_scored

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
        return self.run(text, parameters=parameters, source_name=source_name, base_dir=base_dir).frame

    def run(
        self, text: str, *, parameters: dict | None = None, source_name: str = "", base_dir: str | Path | None = None
    ) -> ScriptResult:
        """Like :meth:`sql`, with the line to show when the script yields no rows."""
        statements = parse(text, source_name)
        return self._executor(parameters).run(statements, base_dir=Path(base_dir or Path.cwd()), source_name=source_name)

    def pin_variables(self, values: dict[str, str]) -> None:
        """Set variables that a script's own ``set`` statements do not override (``rayudf run --set``)."""
        executor = self._executor()
        for key, value in values.items():
            executor.assign(key, value)
        self.state.pinned.update(values)

    def _executor(self, parameters: dict | None = None) -> Executor:
        return Executor(self.db, self.registry, self.state, parameters=parameters)

    # -- models -----------------------------------------------------------------------

    def register_model(self, function: str, path: str | Path, *, format: str | None = None, **options: Any) -> RegisteredFunction:
        """Load a model into Ray workers and make it callable from SQL as ``function(...)``.

        ``path`` is a Keras ``.keras``/``.h5`` file, a SavedModel directory, a pickle/joblib
        file, an ``.onnx`` graph, an xgboost (``.ubj``/``.json``) or LightGBM (``.txt``) booster,
        a model table written by ``udf_engine.save_model``, or the name of a table loaded in
        this session. ``format`` is the model kind, as in ``register <kind>.``: keras, tf,
        savedmodel, sklearn, pickle, onnx, xgboost, lightgbm, or None/"model" (read from the
        model; ``.json``/``.txt`` boosters need their kind). Options: ``workers``,
        ``batch_size``, ``num_cpus``, ``num_gpus``, ``resources``, ``returns``, ``version``,
        ``method`` (``predict_proba``), and for ONNX ``inputs``/``output``.
        """
        return register_model(self.registry, function, path, kind=format, **options)

    def unregister(self, function: str) -> None:
        """Remove a function from SQL and stop its workers."""
        self.registry.unregister(function)

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop every function's workers, close DuckDB, and stop Ray if this session started it."""
        try:
            self.registry.close()
        finally:
            try:
                self.db.close()
            finally:
                self.registry.runtime.shutdown()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
