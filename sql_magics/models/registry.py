"""The functions registered in one DuckDB connection, and the Ray workers behind them: their lifecycle.

A model becomes a function in two steps once its rows are read (``sql_magics.models.kinds``,
``udf_engine.models.sources``): ``UDFBuilder.build`` starts workers that load it, and the bridge
makes it callable from SQL.

A name registered again is a rolling swap: the new version's workers start while the old
ones keep serving, then the new version becomes current. Every statement of the session
pins, when it starts, the versions current then (:meth:`FunctionRegistry.statement`), so a
query runs on one version from its first row to its last, and the old workers stop once
no statement uses them. DuckDB's own functions are only created or removed between the
session's statements (``Database.exclusive``): DuckDB crashes when a function a running
query calls is removed.

The session's warm spares are the engine's business (``udf_engine.actors.spares``): the
registry holds the policy (``registry.spares``), and each build asks it for the pool.

Example:
    >>> registry = FunctionRegistry(Database(), RayRuntime(), session_id="ab12", worker_env={})
    >>> registry.actor_prefix("digit")
    'rayudf.ab12.digit'
    >>> registry.register_udf("digit", UDFBuildInFunc.init_tf, UDFBuildInFunc.predict, rows=model_rows("digits.keras"),
    ...                       kind="keras", path="digits.keras", options={"workers": 2})                       # doctest: +SKIP
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import duckdb

from arrow_bridge.function import ModelFunction, RowCounter, Version, add_function, add_python_function, keep_workers_busy, return_type_of
from sql_magics.errors import ExecutionError, clean_duckdb_error
from sql_magics.models.options import RegisterOptions
from sql_magics.tables.database import Database
from udf_engine import ConfigError, RayContext, RayRuntime, RemoteUDF, UDFBuilder, WorkerError, put_model
from udf_engine.actors.spares import SparesPolicy
from udf_engine.errors import ResourceError
from udf_engine.models.generation import DECLARED_RETURNS
from udf_engine.models.store import DEFAULT_VERSION
from udf_engine.ray_runtime import actor_name
from udf_engine.settings import UDFConf

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class RegisteredFunction:
    """A model (or Python function) registered as a SQL function: its current version."""

    name: str
    kind: str  # keras, pickle, savedmodel, Ray, ScriptUDF, ...
    path: str
    returns: str  # the DuckDB result type
    udf: RemoteUDF | None  # None for a ScriptUDF, which DuckDB runs in-process
    model_function: ModelFunction | None = None  # what DuckDB calls; None for a ScriptUDF
    version: str = DEFAULT_VERSION  # the label given, else the count of registrations of this name
    options: dict = field(default_factory=dict)
    since: datetime = field(default_factory=lambda: datetime.now().replace(microsecond=0))  # when it became current


def _check_name(function: str) -> None:
    if not _IDENTIFIER.match(function):
        raise ConfigError(f"register: {function!r} is not a valid function name")


def _stop(version: Version) -> None:
    """Stop the workers of a version nobody uses any more."""
    version.udf.shutdown()


class FunctionRegistry:
    """Registers models and Python functions in one DuckDB connection.

    Its methods may be called from several threads: changes to DuckDB's functions wait
    for the session's running statement, and readers (progress bars, ``!models``) get
    consistent copies.
    """

    def __init__(self, db: Database, runtime: RayRuntime, *, session_id: str, worker_env: Mapping[str, str]) -> None:
        self.runtime = runtime  # the Ray the workers run on; started on the first registration. Set once: no lock
        self.db = db  # whose connection the functions are created in. Set once: no lock
        self._session_id = session_id  # keeps this session's actor names apart from others'. Set once: no lock
        # environment of every worker unless a registration names one. The session's `!python env` writes it; builds and
        # warm-ups read it with no lock, as dict() copies it in one step under the GIL
        self._worker_env = worker_env
        # Guards _functions, _registrations, _attempts, _unbusy and _watchers; held for no DuckDB or Ray call.
        self._lock = threading.Lock()
        self._functions: dict[str, RegisteredFunction] = {}  # by SQL name; _lock
        self._registrations: Counter[str] = Counter()  # registrations of each name so far: the default version labels; _lock
        self._attempts: Counter[str] = Counter()  # builds of each name so far: unique actor names; _lock
        self._unbusy: list[RemoteUDF] = []  # versions swapped in since the last statement: DuckDB's threads may need raising; _lock
        self._watchers: list[Callable[[], None]] = []  # told after each change of the functions (a server publishes them); _lock
        # Guards no field: one registration or removal at a time, each whole; taken before Database.exclusive and _lock.
        self._changes = threading.RLock()
        self._scored = RowCounter()  # rows scored by every model function of this registry; its own lock
        # which spares wait in the session's warm pool, and the pool itself (its own locks): `set warm`, a script's
        # later registrations, and the pool's name handed to every RayContext
        self.spares = SparesPolicy(runtime, actor_name(session_id, "pool"), complete=self._with_env)

    # -- what is registered -------------------------------------------------------------

    @property
    def functions(self) -> dict[str, RegisteredFunction]:
        """A copy of the registered functions by SQL name."""
        with self._lock:
            return dict(self._functions)

    def model_functions(self) -> dict[str, ModelFunction]:
        """The functions served by Ray workers, by SQL name."""
        return {name: f.model_function for name, f in self.functions.items() if f.model_function is not None}

    @property
    def pool_name(self) -> str:
        """The name of the session's warm pool actor (udf_engine.actors.warm_pool)."""
        return self.spares.pool_name

    @property
    def rows_scored(self) -> int:
        """Rows scored by model functions so far (progress bars read the difference)."""
        return self._scored.value

    def watch(self, changed: Callable[[], None]) -> None:
        """Call ``changed()`` after every registration, swap and removal (from the thread that made it)."""
        with self._lock:
            self._watchers.append(changed)

    def unwatch(self, changed: Callable[[], None]) -> None:
        with self._lock:
            self._watchers.remove(changed)

    def _changed(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for changed in watchers:
            changed()

    def actor_prefix(self, function: str) -> str:
        """The name prefix of the actors serving ``function`` (each version adds ``.r<n>``)."""
        return actor_name(self._session_id, function)

    @contextmanager
    def statement(self) -> Iterator[None]:
        """Pin, for one statement, the version of every model function current as it starts.

        Called holding ``Database.exclusive``, which is also when DuckDB's threads can be raised
        for versions swapped in meanwhile.
        """
        with self._lock:
            swapped_in, self._unbusy = self._unbusy, []
        for udf in swapped_in:
            keep_workers_busy(self.db.con, udf)
        functions = [f.model_function for f in self.functions.values() if f.model_function is not None]
        for fn in functions:
            fn.pin()
        try:
            yield
        finally:
            for fn in functions:
                fn.unpin()

    # -- registering --------------------------------------------------------------------

    def register_udf(
        self, function: str, init_func: Callable, apply_func: Callable, *, rows: list[dict], kind: str, path: str,
        options: RegisterOptions,
    ) -> RegisteredFunction:
        """Build workers with ``init_func``/``apply_func`` over a model's rows and register them. A declared
        ``returns`` goes to the loader too: a generation model answers with its usage when it is a STRUCT."""
        _check_name(function)
        settings = options.settings
        if options.returns:
            settings = replace(settings, extra={**settings.extra, DECLARED_RETURNS: options.returns})
        return self.build_and_add(
            function,
            lambda: UDFBuilder.build(self.ray_context(function, settings, rows), init_func, apply_func),
            lambda udf: self.add_udf(function, udf, kind=kind, path=path, options=options),
        )

    def build_and_add(
        self, function: str, build: Callable[[], RemoteUDF], add: Callable[[RemoteUDF], RegisteredFunction]
    ) -> RegisteredFunction:
        """``add(build())``, as a rolling swap when ``function`` exists, or as a replacement when the
        cluster cannot hold both versions: then the session's running statement finishes, the old
        version stops and the new one starts, while the session's statements wait."""
        try:
            udf = build()
        except ResourceError:
            if function not in self.functions:
                raise
            with self._changes, self.db.exclusive():
                self.unregister(function)
                return add(build())
        return add(udf)

    def ray_context(self, function: str, settings: UDFConf, rows: list[dict], *, conf: dict | None = None, **more: Any) -> RayContext:
        """The context to build ``function`` in: its typed ``settings`` with the workers' environment, this
        registry's Ray and actor names, and the model rows in the object store; ``conf`` is what MLSQL code
        reads as ``context.conf`` (the settings' own by default); ``more`` are RayContext's other fields
        (``row_wise``, ``names``)."""
        settings = self._with_env(settings)
        self.runtime.ensure()
        pool = self.spares.ready()  # spares placed for this registration are there before it asks for workers
        return RayContext(
            function,
            conf=conf if conf is not None else settings.as_conf(),
            settings=settings,
            model_refs=put_model(rows),
            actor_prefix=f"{self.actor_prefix(function)}.r{self._next_registration(function)}",
            runtime=self.runtime,
            warm_pool=pool,
            **more,
        )

    def _with_env(self, settings: UDFConf) -> UDFConf:
        """A function's settings with the session's worker environment (``!python env``), unless it set its own."""
        if not self._worker_env or settings.env:
            return settings
        return replace(settings, env=dict(self._worker_env))

    def add_udf(self, function: str, udf: RemoteUDF, *, kind: str, path: str, options: RegisterOptions) -> RegisteredFunction:
        """Make a built UDF callable from SQL, as a new version if the name exists; on failure its workers stop."""
        try:
            _check_name(function)
            returns = return_type_of(function, udf, options.returns, self._sample(function, options.sample))
            version = self._version(function, options.version)
            registered = RegisteredFunction(function, kind, path, returns, udf, None, version, dict(options.given))
            self._install_model(registered)
        except BaseException:
            udf.shutdown()
            raise
        return registered

    def _sample(self, function: str, query: str | None) -> list | None:
        """The argument columns of the ``sample="select ..."`` rows a model's return type is probed with."""
        if not query:
            return None
        try:
            with self.db.exclusive():  # the session's connection: it sees registered frames and temp views
                table = self.db.con.sql(query).to_arrow_table()
        except duckdb.Error as err:
            raise ExecutionError(f"register {function}: sample query failed: {clean_duckdb_error(err)}") from None
        if table.num_rows == 0:
            raise ExecutionError(f"register {function}: the sample query gave no rows to try the model on")
        return table.columns

    def _install_model(self, registered: RegisteredFunction) -> None:
        with self._changes:
            old = self.functions.get(registered.name)
            if old is not None and old.model_function is not None and old.returns == registered.returns:
                # A rolling swap: DuckDB keeps the function; the running statement finishes on the old version
                # (which, under a canary's traffic share, goes on answering the rest).
                registered.model_function = old.model_function
                old.model_function.switch(registered.udf, label=registered.version, share=registered.udf.conf.traffic)
                with self._lock:
                    self._unbusy.append(registered.udf)
                self._add(registered)
            else:
                fn = ModelFunction(
                    registered.name, registered.returns, self._scored, registered.udf, retire=_stop, label=registered.version
                )
                registered.model_function = fn
                self._install(registered, lambda: add_function(self.db.con, fn))
                return
        self._changed()

    def add_python(
        self, function: str, func: Callable, returns: str, *, kind: str, vectorized: bool, version: str | None, given: Mapping[str, Any]
    ) -> RegisteredFunction:
        """Make a plain Python function callable from SQL (run in-process by DuckDB)."""
        _check_name(function)
        registered = RegisteredFunction(function, kind, "", returns, None, None, self._version(function, version), dict(given))
        self._install(registered, lambda: add_python_function(self.db.con, function, func, returns, vectorized=vectorized))
        return registered

    def _install(self, registered: RegisteredFunction, create: Callable[[], None]) -> None:
        """Create a DuckDB function in place of the one this registry holds under that name, which goes."""
        function = registered.name
        with self._changes, self.db.exclusive():  # no statement of the session runs while DuckDB's functions change
            with self._lock:
                old = self._functions.pop(function, None)  # gone from DuckDB below, whatever happens next
            try:
                if old is not None:
                    self.db.con.remove_function(function)
                create()
            except duckdb.Error as err:  # e.g. a function of that name made on the connection directly
                raise ExecutionError(f"register {function}: {clean_duckdb_error(err)}") from None
            else:
                self._add(registered)
            finally:
                # watchers first: a server stops answering with the old one, and lets go of it, before it retires
                self._changed()
                if old is not None:
                    self._retire(old)

    def _add(self, registered: RegisteredFunction) -> None:
        with self._lock:
            self._functions[registered.name] = registered

    def _next_registration(self, function: str) -> int:
        """Count one more attempt to register ``function``: its workers' actor names carry the count."""
        with self._lock:
            self._attempts[function] += 1
            return self._attempts[function]

    def _version(self, function: str, label: str | None) -> str:
        """The label the registration gives, else how many times the name has been registered."""
        with self._lock:
            self._registrations[function] += 1
            return str(label or self._registrations[function])

    # -- removing -----------------------------------------------------------------------

    def unregister(self, function: str) -> None:
        """Remove a function from SQL and stop its workers, once the session's running statement is done."""
        with self._changes, self.db.exclusive():
            with self._lock:
                registered = self._functions.pop(function, None)
            if registered is None:
                raise ExecutionError(f"unregister: no function named {function!r}")
            try:
                self.db.con.remove_function(function)
            finally:
                self._changed()  # a server stops answering with it, and lets go of it, before it retires
                self._retire(registered)

    def close(self) -> None:
        """Stop every function's workers (DuckDB's functions go with its connection)."""
        with self._lock:
            registered, self._functions = list(self._functions.values()), {}
        failures = []
        for function in registered:
            try:
                self._retire(function)
            except Exception as err:  # noqa: BLE001 - the other functions' workers must stop all the same
                failures.append(f"{function.name}: {err}")
        self.spares.close()
        if failures:
            raise WorkerError("could not stop the workers of " + "; ".join(failures))

    @staticmethod
    def _retire(registered: RegisteredFunction) -> None:
        """Stop the workers of every version of a function DuckDB no longer has."""
        if registered.model_function is not None:
            registered.model_function.close()

