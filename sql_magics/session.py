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
import threading
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from arrow_bridge.quoting import quote_identifier
from sql_magics.executor import Executor, ScriptResult
from sql_magics.handoff import on_waiting_thread
from sql_magics.language.parser import parse
from sql_magics.language.statements import Statement
from sql_magics.models.kinds import register_model
from sql_magics.models.options import RegisterOptions
from sql_magics.models.registry import FunctionRegistry, RegisteredFunction
from sql_magics.planner.scans import WorkerScans
from sql_magics.serving.options import with_serve_keywords
from sql_magics.serving.server import ServerHandle, Serving
from sql_magics.state import ScriptState, warm_framework
from sql_magics.streaming.streams import Streams
from sql_magics.tables.database import Database
from udf_engine import RayRuntime
from udf_engine.models.loaders import MODEL_KINDS


class Session:
    """A DuckDB connection whose SQL can call models served by Ray actors.

    ``sql(text)`` runs a script of the statement language (docs/statements.md):
    MLSQL-style statements plus any DuckDB SQL. A new session starts Ray and warm spares of
    ``warm``'s framework in the background (see :func:`warm_framework`), so that its first
    registration finds workers with the framework imported; ``warm="none"`` (or
    ``RAYUDF_WARM=none``) starts Ray only when a statement needs it.
    """

    def __init__(
        self,
        database: str = ":memory:",
        dialect: str = "duckdb",
        *,
        ray_address: str | None = None,
        ray_init: dict | None = None,
        warm: str | bool | None = None,
    ) -> None:
        framework = warm_framework(warm)
        self.state = ScriptState(dialect)
        # The planner reads the registry's model functions as each statement starts; the registry is made next.
        planner = WorkerScans(lambda: self.registry.model_functions(), enabled=self.state.worker_scans)
        self.db = Database(database, planner=planner)
        runtime = RayRuntime(ray_address, starter=on_waiting_thread, **(ray_init or {}))  # started on first registration
        session_id = secrets.token_hex(3)
        self.registry = FunctionRegistry(self.db, runtime, session_id=session_id, worker_env=self.state.python_env)
        self.serving = Serving(self.registry, session_id=session_id, run_script=self.answer_script)  # serves nothing until started
        self._owners: dict[str, Session] = {}  # /run/script's sessions per owner (sessionPerUser), made on first use
        self._script_locks: dict[str | None, threading.Lock] = {}  # per owner (None: this session): one script at a time
        self._owners_lock = threading.Lock()  # guards _owners and _script_locks
        self.streams = Streams()  # the streams its stream scripts started (docs/streaming.md)
        if framework:  # Ray and spares start now, in the background: the first registration finds them ready
            self.registry.spares.warm(framework)

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
        return Executor(self.db, self.registry, self.state, parameters=parameters, serving=self.serving, streams=self.streams)

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
        fmt = MODEL_KINDS.get(str(format).lower()) if format else None
        typed = RegisterOptions.of(options, f"register_model({function!r}, {str(path)!r})", fmt=fmt)  # typed before anything starts
        return register_model(self.registry, function, path, typed, kind=format)

    def unregister(self, function: str) -> None:
        """Remove a function from SQL and stop its workers."""
        self.registry.unregister(function)

    # -- serving ----------------------------------------------------------------------

    @with_serve_keywords
    def serve(self, **options: Any) -> ServerHandle:
        """Answer HTTP for the session's model functions on Ray Serve (docs/serving.md) until ``.stop()``.

        ``options`` are the serve options (``SERVE_OPTIONS`` of :mod:`sql_magics.serving.options`; the signature
        shows them with their defaults, docs/serving.md explains them). ``token`` (else ``RAYUDF_TOKEN``) is then
        required as ``Authorization: Bearer <token>``; binding beyond loopback needs one, and so does
        ``allow_scripts`` (Byzer's ``/run/script``, JSON POSTs only). Registering a name again while
        serving swaps it for requests too (``traffic="0.1"``: a canary).

        Example:
            >>> with Session() as s:                                                        # doctest: +SKIP
            ...     s.register_model("digit", "models/digits.keras")
            ...     server = s.serve(port=8000)
            ...     server.url
            'http://127.0.0.1:8000'
        """
        return self.serving.start(options)

    def answer_script(self, sql: str, owner: str | None) -> pd.DataFrame | None:
        """Run a script for Byzer's ``/run/script``, in this session or in ``owner``'s own (sharing this
        Ray): the rows of its last statement, or of what it made (``select ... as t``, as Byzer answers)."""
        with self._owners_lock:
            if owner is not None and owner not in self._owners:
                self._owners[owner] = Session(ray_address=self.registry.runtime.address, warm=False)  # on this Ray, already up
            session = self if owner is None else self._owners[owner]
            lock = self._script_locks.setdefault(owner, threading.Lock())
        with lock:  # the table a script made is read before another script of its session can replace it
            result = session.run(sql)
            if result.made is None:
                return result.frame
            return session.sql(f"SELECT * FROM {quote_identifier(result.made)}")

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Stop streams (each after its batch in progress) and serving, then every function's workers, close
        DuckDB, and stop Ray if this session started it."""
        try:
            self.streams.close()
            self.serving.stop()
            for owned in self._owners.values():
                owned.close()
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
