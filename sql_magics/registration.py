"""The ``register`` kinds of the statement language.

- ``keras``/``tf``/``sklearn``/``pickle``/``model``: a model file, directory or loaded model
  table, served by Ray workers (``Session.register_model``).
- ``Ray``: MLSQL's ``registerCode``, Python that calls ``UDFBuilder.build(ray_context, ...)``
  with ``from pyjava.api.mlsql import RayContext`` / ``from pyjava.udf import ...`` names
  resolving to this project's classes; its ``apply_func`` is written for one row.
- ``ScriptUDF``: a plain Python function run in-process by DuckDB.

Example:
    >>> session.sql('''register ScriptUDF.`` as plus where lang="python" and returns="BIGINT"
    ...     and code=\\'\\'\\'def apply(a, b): return a + b\\'\\'\\';''')   # doctest: +SKIP
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from sql_magics.errors import ExecutionError
from udf_engine import RayContext, UDFBuildInFunc, UDFBuilder, UDFMaster, UDFWorker

if TYPE_CHECKING:
    from sql_magics.session import RegisteredFunction, Session

MODEL_KINDS = ("keras", "tf", "savedmodel", "sklearn", "pickle", "model")
REGISTER_KINDS = (*MODEL_KINDS, "Ray", "ScriptUDF")
# MLSQL returns a list of lists of doubles from a Ray UDF unless told otherwise.
RAY_DEFAULT_RETURNS = "DOUBLE[][]"
_CODE_OPTIONS = ("registerCode", "predictCode", "code")


def register(session: "Session", kind: str, source: str, function: str, options: dict) -> "RegisteredFunction":
    """Run one ``register <kind>.`<source>` as <function> where <options>``."""
    lowered = kind.lower()
    if lowered in MODEL_KINDS:
        return session.register_model(function, source, format=lowered, **options)
    if lowered == "ray":
        return register_ray(session, function, source, options)
    if lowered == "scriptudf":
        return register_script(session, function, options)
    raise ExecutionError(f"register: kind {kind!r} is not supported (supported: {', '.join(REGISTER_KINDS)})")


@contextmanager
def pyjava_names() -> Iterator[None]:
    """Make Byzer's ``pyjava`` import names resolve to this project's classes, for a while."""
    udf = types.ModuleType("pyjava.udf")
    udf.UDFMaster, udf.UDFWorker, udf.UDFBuilder, udf.UDFBuildInFunc = UDFMaster, UDFWorker, UDFBuilder, UDFBuildInFunc
    mlsql = types.ModuleType("pyjava.api.mlsql")
    mlsql.RayContext = RayContext
    api = types.ModuleType("pyjava.api")
    api.mlsql = mlsql
    pyjava = types.ModuleType("pyjava")
    pyjava.api, pyjava.udf = api, udf
    modules = {"pyjava": pyjava, "pyjava.api": api, "pyjava.api.mlsql": mlsql, "pyjava.udf": udf}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _run_code(code: str, namespace: dict, what: str) -> None:
    try:
        exec(compile(code, f"<{what}>", "exec"), namespace)
    except ExecutionError:
        raise
    except Exception as err:
        cause = getattr(err, "cause", None) or err
        raise ExecutionError(f"{what} failed: {type(cause).__name__}: {cause}") from None


def register_ray(session: "Session", function: str, source: str, options: dict) -> "RegisteredFunction":
    """MLSQL's ``register Ray.`<model table>` as f where registerCode='''...'''``."""
    code = options.get("registerCode")
    if not code:
        raise ExecutionError(f"register Ray {function}: the registerCode option is required")
    rows = session.model_rows(source) if source else []
    conf = {**session.python_conf, **{k: v for k, v in options.items() if k not in _CODE_OPTIONS}}
    context = session.ray_context(function, conf, rows, row_wise=True)
    namespace = {"__name__": f"__rayudf_register_{function}__", "context": context}
    with pyjava_names():
        _run_code(code, namespace, f"registerCode of {function}")
        if context.udf is None:
            raise ExecutionError(f"register Ray {function}: registerCode did not call UDFBuilder.build(ray_context, ...)")
        if options.get("predictCode"):
            _run_code(options["predictCode"], namespace, f"predictCode of {function}")
    returns = options.get("returns", RAY_DEFAULT_RETURNS)
    return session.expose(function, context.udf, kind="Ray", path=source, options={**options, "returns": returns})


def _script_function(function: str, code: str, method: str | None) -> Callable:
    namespace: dict[str, Any] = {"__name__": f"__rayudf_script_{function}__"}
    _run_code(code, namespace, f"code of {function}")
    defined = [v for k, v in namespace.items() if callable(v) and getattr(v, "__module__", None) == namespace["__name__"]]
    if method:
        if not callable(namespace.get(method)):
            raise ExecutionError(f"register ScriptUDF {function}: code defines no function {method!r}")
        return namespace[method]
    if callable(namespace.get("apply")):
        return namespace["apply"]
    if len(defined) == 1:
        return defined[0]
    raise ExecutionError(f"register ScriptUDF {function}: define apply(...) or name the function with methodName=")


def _spark_type(name: str) -> str:
    import sqlglot

    try:
        return sqlglot.exp.DataType.build(name, dialect="spark").sql("duckdb")
    except Exception:  # noqa: BLE001 - any sqlglot failure means the same to the user
        raise ExecutionError(f"returnType {name!r} is not a Spark SQL type") from None


def register_script(session: "Session", function: str, options: dict) -> "RegisteredFunction":
    """``register ScriptUDF.`` as f where lang="python" and code='''def apply(...)'''``."""
    lang = options.get("lang", "python").lower()
    if lang != "python":
        raise ExecutionError(f"register ScriptUDF {function}: lang {lang!r} is not supported (only python)")
    if not options.get("code"):
        raise ExecutionError(f"register ScriptUDF {function}: the code option is required")
    func = _script_function(function, options["code"], options.get("methodName"))
    returns = options.get("returns") or (options.get("returnType") and _spark_type(options["returnType"]))
    if not returns:
        raise ExecutionError(f'register ScriptUDF {function}: declare the result type, e.g. returns="DOUBLE"')
    vectorized = options.get("udfType", "").lower() == "vectorized"
    return session.expose_python(function, func, returns, vectorized=vectorized, options=options)
