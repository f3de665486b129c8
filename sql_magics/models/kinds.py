"""The ``register`` kinds of the statement language.

- ``keras``/``tf``/``savedmodel``/``sklearn``/``pickle``/``onnx``/``xgboost``/``lightgbm``/``mlflow``/``model``:
  a model file, directory, MLflow URI or loaded model table, served by Ray workers
  (:func:`register_model`; where models come from is ``udf_engine.models.sources``, the
  loaders are ``udf_engine.models.loaders.LOADERS``).
- ``Ray``: MLSQL's ``registerCode``, Python that calls ``UDFBuilder.build(ray_context, ...)``
  with ``from pyjava.api.mlsql import RayContext`` / ``from pyjava.udf import ...`` names
  resolving to this project's classes; its ``apply_func`` is written for one row.
- ``ScriptUDF``: a plain Python function run in-process by DuckDB.

Example:
    >>> from sql_magics.tables.database import Database
    >>> from udf_engine import RayRuntime
    >>> registry = FunctionRegistry(Database(), RayRuntime(), session_id="ab12", worker_env={})
    >>> fn = register(registry, ScriptState(), "ScriptUDF", "", "plus",
    ...               {"returns": "BIGINT", "code": "def apply(a, b): return a + b"})
    >>> fn.kind, fn.returns
    ('ScriptUDF', 'BIGINT')
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sql_magics.byzer.python_code import run_code
from sql_magics.errors import ExecutionError
from sql_magics.language.statements import RAY
from sql_magics.models.options import TRACKING_URI, RegisterOptions, script_options
from sql_magics.models.registry import FunctionRegistry, RegisteredFunction
from sql_magics.state import ScriptState
from sql_magics.tables.catalog import loaded_table
from udf_engine import ConfigError, RemoteUDF, UDFBuildInFunc
from udf_engine.byzer.pyjava_compat import pyjava_modules
from udf_engine.errors import RayUDFError
from udf_engine.models import sources
from udf_engine.models.loaders import LOADERS, MODEL_KINDS
from udf_engine.models.store import DEFAULT_VERSION, detect_format
from udf_engine.settings import DEFAULT_METHOD, UDFConf

# `register model.`path``: the kind is the model's own format, read from the path or the table.
DETECTED_KIND = "model"
SCRIPT_KIND = "ScriptUDF"
REGISTER_KINDS = (*MODEL_KINDS, DETECTED_KIND, RAY, SCRIPT_KIND)
# The `set` key naming the MLflow tracking server that `register mlflow.` resolves models with.
MLFLOW_TRACKING_URI = "mlflow.tracking_uri"
# MLSQL returns a list of lists of doubles from a Ray UDF unless told otherwise.
RAY_DEFAULT_RETURNS = "DOUBLE[][]"
_CODE_OPTIONS = ("registerCode", "predictCode", "code")


def register(registry: FunctionRegistry, state: ScriptState, kind: str, source: str, function: str, options: dict) -> RegisteredFunction:
    """Run one ``register <kind>.`<source>` as <function> where <options>``: its options typed first, before anything starts."""
    lowered = kind.lower()
    what = f"register {kind}.`{source}` as {function}"
    if lowered in MODEL_KINDS or lowered == DETECTED_KIND:
        if MLFLOW_TRACKING_URI in state.variables:  # `set mlflow.tracking_uri = "..."`; a where-option wins
            options = {TRACKING_URI: state.variables[MLFLOW_TRACKING_URI], **options}
        typed = RegisterOptions.of(options, what, fmt=MODEL_KINDS.get(lowered))
        return register_model(registry, function, source, typed, kind=lowered)
    if lowered == RAY.lower():
        return register_ray(registry, state, function, source, options, what)
    if lowered == SCRIPT_KIND.lower():
        return register_script(registry, function, options, what)
    raise ExecutionError(f"register: kind {kind!r} is not supported (supported: {', '.join(REGISTER_KINDS)})")


def prepare(registry: FunctionRegistry, kind: str, source: str, options: dict) -> None:
    """Have spares ready for ``register <kind>.`<source>` where <options>``, a later statement of the
    running script, when it loads a model from a file of a framework worth importing ahead
    (``SparesPolicy.prepare``); anything else, or options it would refuse, is left to that statement."""
    lowered = kind.lower()
    try:
        if lowered in MODEL_KINDS:
            fmt = MODEL_KINDS[lowered]
        elif lowered == DETECTED_KIND and Path(source).is_file():
            fmt = detect_format(source)
        else:
            return
        registry.spares.prepare(LOADERS[fmt], RegisterOptions.of(options, f"register {kind}", fmt=fmt).settings)
    except (RayUDFError, KeyError, OSError):
        pass


def register_model(
    registry: FunctionRegistry, function: str, source: str | Path, options: RegisterOptions, *, kind: str | None = None
) -> RegisteredFunction:
    """Load a model into Ray workers and make it callable from SQL as ``function(...)`` (``Session.register_model``).

    ``kind`` is a key of MODEL_KINDS, or None/"model" to read it from the model; ``options`` are typed
    already (:meth:`RegisterOptions.of`), for that kind's format or for any.
    """
    kind = None if kind in (None, DETECTED_KIND) else kind.lower()
    if kind is not None and kind not in MODEL_KINDS:
        raise ConfigError(f"register {function}: unknown model kind {kind!r} (known: {', '.join(MODEL_KINDS)}, {DETECTED_KIND})")
    model = model_source(registry, str(source), kind=kind, version=options.version or DEFAULT_VERSION, tracking_uri=options.tracking_uri)
    if kind is None:  # the format is known now
        options = options.checked_for(model.format, f"register {function}")
    loader = sources.loader_of(function, model, kind=kind)
    apply = UDFBuildInFunc.predictor(options.settings.extra.get("method", DEFAULT_METHOD))
    return registry.register_udf(function, loader, apply, rows=model.rows, kind=kind or model.format, path=model.shown, options=options)


def model_source(
    registry: FunctionRegistry, source: str, *, kind: str | None = None, version: str = DEFAULT_VERSION, tracking_uri: str | None = None
) -> sources.ModelSource:
    """The model ``source`` names: a table loaded in the session when no file of that name exists, else a path or an MLflow URI."""
    table = None if Path(source).exists() else loaded_table(registry.db.con, source)
    if table is not None:
        return sources.from_table(table, source)
    return sources.from_path(source, kind=kind, version=version, tracking_uri=tracking_uri)


def register_ray(
    registry: FunctionRegistry, state: ScriptState, function: str, source: str, options: dict, what: str
) -> RegisteredFunction:
    """MLSQL's ``register Ray.`<model table>` as f where registerCode='''...'''``: any option reaches the
    code in ``context.conf``; the engine's are typed first all the same."""
    code = options.get("registerCode")
    if not code:
        raise ExecutionError(f"register Ray {function}: the registerCode option is required")
    conf = {**state.python_conf, **{k: v for k, v in options.items() if k not in _CODE_OPTIONS}}
    try:
        settings = UDFConf.from_options(conf)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None
    rows = model_source(registry, source).rows if source else []

    def build() -> RemoteUDF:
        # MLSQL's apply_func is written for one row; foreach/map_iter tasks of the code see the pyjava names
        context = registry.ray_context(function, settings, rows, conf=conf, row_wise=True, names=pyjava_modules)
        namespace = {"__name__": f"__rayudf_register_{function}__", "context": context}
        try:
            with pyjava_modules():
                run_code(code, namespace, f"registerCode of {function}")
                if context.udf is None:
                    raise ExecutionError(f"register Ray {function}: registerCode did not call UDFBuilder.build(ray_context, ...)")
                if options.get("predictCode"):
                    run_code(options["predictCode"], namespace, f"predictCode of {function}")
        except BaseException:
            if context.udf is not None:
                context.udf.shutdown()  # built, but never registered: nobody else would stop its workers
            raise
        return context.udf

    typed = RegisterOptions(
        settings, returns=options.get("returns", RAY_DEFAULT_RETURNS), sample=options.get("sample"), version=options.get("version"),
        given=options,
    )
    return registry.build_and_add(function, build, lambda udf: registry.add_udf(function, udf, kind=RAY, path=source, options=typed))


def _script_function(function: str, code: str, method: str | None) -> Callable:
    namespace: dict[str, Any] = {"__name__": f"__rayudf_script_{function}__"}
    run_code(code, namespace, f"code of {function}")
    defined = {k: v for k, v in namespace.items() if callable(v) and getattr(v, "__module__", None) == namespace["__name__"]}
    if method:
        if not callable(namespace.get(method)):
            raise ExecutionError(f"register ScriptUDF {function}: code defines no function {method!r}")
        name = method
    elif callable(namespace.get("apply")):
        name = "apply"
    elif len(defined) == 1:
        name = next(iter(defined))
    else:
        raise ExecutionError(f"register ScriptUDF {function}: define apply(...) or name the function with methodName=")
    if not _takes_self(namespace[name]):
        return namespace[name]
    # Byzer runs a Python ScriptUDF's functions as methods (`def apply(self, m)`): make them
    # methods of one object, so SQL's f(x) calls apply(self, x) and self.helper(...) works.
    methods = {k: v for k, v in defined.items() if _takes_self(v)} | {name: namespace[name]}
    return getattr(type(f"ScriptUDF_{function}", (), methods)(), name)


def _takes_self(func: Callable) -> bool:
    """True for a function whose first parameter is named ``self``."""
    import inspect

    try:
        parameters = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return bool(parameters) and parameters[0] == "self"


def _spark_type(name: str, function: str) -> str:
    """A Spark SQL type (``map(string,string)``, ``array<double>``) as DuckDB names it."""
    import duckdb
    import sqlglot

    try:
        return str(duckdb.sqltype(sqlglot.exp.DataType.build(name, dialect="spark").sql("duckdb")))
    except Exception:  # noqa: BLE001 - any sqlglot or DuckDB failure means the same to the user
        raise ExecutionError(f"register ScriptUDF {function}: dataType {name!r} is not a Spark SQL type") from None


def register_script(registry: FunctionRegistry, function: str, options: dict, what: str) -> RegisteredFunction:
    """``register ScriptUDF.`` as f where lang="python" and code='''def apply(...)'''``.

    The result type is ``returns`` (DuckDB's name) or, as in Byzer, ``dataType`` (alias
    ``returnType``): a Spark SQL type such as ``map(string,string)``.
    """
    typed = script_options(options, what)
    if typed["lang"].lower() != "python":
        raise ExecutionError(f"register ScriptUDF {function}: lang {typed['lang']!r} is not supported (only python)")
    if not typed["code"]:
        raise ExecutionError(f"register ScriptUDF {function}: the code option is required")
    func = _script_function(function, typed["code"], typed["methodName"])
    returns = typed["returns"] or (typed["dataType"] and _spark_type(typed["dataType"], function))
    if not returns:
        raise ExecutionError(f'register ScriptUDF {function}: declare the result type, e.g. dataType="double" or returns="DOUBLE"')
    vectorized = typed["udfType"].lower() == "vectorized"
    return registry.add_python(function, func, returns, kind=SCRIPT_KIND, vectorized=vectorized, version=typed["version"], given=options)
