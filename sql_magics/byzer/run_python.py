"""Byzer-python: ``run command as Ray.`` where inputTable="t" and outputTable="o" and code='''...'''``.

The code runs in this process (Byzer's ``runIn=driver``) with a global ``context`` (a
``udf_engine.PythonContext``: ``.conf`` holds the ``!python conf`` values and the
statement's options), Byzer's ``pyjava`` imports resolving to rayudf's, and the session's
Ray behind ``RayContext.connect(globals(), None)``. What the code hands to
``build_result`` (or what ``foreach``/``map_iter`` produce on Ray workers) becomes table
``o``, typed by the ``schema`` conf (``st(field(a,long),...)``, DDL, JSON, ``file``) or
inferred from the rows.

Example:
    >>> from sql_magics.tables.database import Database
    >>> from udf_engine import RayRuntime
    >>> db = Database()
    >>> _ = db.con.execute("create table t as select range as a from range(3)")
    >>> code = "context.build_result({'b': r['a'] * 10} for r in context.rayContext.collect())"
    >>> run_python(db, RayRuntime(), {"schema": "st(field(b,long))"}, code=code, input_table="t", output_table="o")
    >>> db.con.execute("select b from o").fetchall()
    [(0,), (10,), (20,)]
"""

from __future__ import annotations

from sql_magics.byzer.python_code import run_code
from sql_magics.byzer.schemas import SchemaError, parse_schema, table_from_rows
from sql_magics.errors import ExecutionError
from sql_magics.language.statements import NO_INPUT
from sql_magics.tables.catalog import loaded_table, table_from_arrow
from sql_magics.tables.database import Database
from udf_engine import PythonContext, RayRuntime
from udf_engine.byzer.pyjava_compat import pyjava_modules

# Options that say what to run rather than how: they stay out of the code's context.conf.
STATEMENT_OPTIONS = ("code", "inputTable", "outputTable")


def run_python(db: Database, runtime: RayRuntime, conf: dict, *, code: str, input_table: str, output_table: str) -> None:
    """Run Byzer-python ``code`` over ``input_table`` (or none: "" or "command"); its result becomes ``output_table``."""
    what = f"code of run {output_table}"
    if not output_table:
        raise ExecutionError("run as Ray: name the output table (outputTable=\"...\" or 'as <table>')")
    if not code:
        raise ExecutionError(f"run {output_table}: the code option is required")
    schema = _schema(conf.get("schema"), output_table)
    table = None
    if input_table and input_table != NO_INPUT:
        table = loaded_table(db.con, input_table)
        if table is None:
            raise ExecutionError(f"run {output_table}: input table {input_table!r} does not exist")
    context = PythonContext(conf, input_table=table, name=output_table, runtime=runtime, names=pyjava_modules)
    namespace = {"__name__": f"__rayudf_run_{output_table}__", "context": context}
    with pyjava_modules():
        run_code(code, namespace, what)
        result = _result(context, schema, output_table, what)
    with db.exclusive():
        table_from_arrow(db.con, output_table, result)


def _result(context: PythonContext, schema, output_table: str, what: str):
    if context.output() is None:
        raise ExecutionError(
            f"run {output_table}: the code gave no result; end it with context.build_result(rows) "
            "(or ray_context.build_result, foreach, map_iter)"
        )
    try:
        result = table_from_rows(context.output(), schema)
    except SchemaError as err:
        raise ExecutionError(f"run {output_table}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a generator the code handed over runs the user's code now
        raise ExecutionError(f"{what} failed: {type(err).__name__}: {err}") from None
    if result.num_columns == 0:
        raise ExecutionError(f'run {output_table}: the code gave no rows, so nothing says its columns; declare them with schema="..."')
    return result


def _schema(text: str | None, output_table: str):
    if not text:
        return None
    try:
        return parse_schema(text)
    except SchemaError as err:
        raise ExecutionError(f"run {output_table}: {err}") from None
