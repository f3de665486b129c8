"""Which path a statement takes, and for the worker path the rewrite that runs it.

A statement qualifies for the worker path when one SELECT of it calls model functions (one
function, any number of calls) over a single Parquet source (``read_parquet('glob')``,
``'x.parquet'``, or a view of one, such as ``load parquet`` makes), with no LIMIT or SAMPLE
anywhere, no ``$parameters``, arguments computed from that source's columns by functions any
DuckDB has, and, when that SELECT aggregates, the calls inside aggregates. Then the driver's
statement reads the scan of the results (:mod:`sql_magics.planner.scans`) in place of the
source, each call replaced by its score column, and the workers run :attr:`Plan.worker_query`
over their shares: the needed columns, the calls' arguments, and the filters on the source's
columns alone, so the model sees the rows it would have seen. Anything else runs as written,
the driver calling the model; :attr:`Plan.reason` says why, and ``!plan '''<query>'''`` shows it.

Example:
    >>> con = duckdb.connect()
    >>> plan(con, "select 42", {}).reason
    'no model function call'
    >>> planned = plan(con, "select id, f(image) as p from read_parquet('t/*.parquet') where id > 5", functions)  # doctest: +SKIP
    >>> planned.path, planned.statement                                                                            # doctest: +SKIP
    ('workers', 'SELECT id, __rayudf_s0 AS p FROM __rayudf_scan_1f2e3d WHERE (id > 5)')
"""

from __future__ import annotations

import copy
import functools
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from arrow_bridge.function import ModelFunction
from arrow_bridge.quoting import quote_literal
from arrow_bridge.share_scan import FILE_ROW, PREFIX, ROW_COLUMN, SHARE_VIEW, arg_column, score_column
from sql_magics.errors import ParseError
from sql_magics.language.tokens import OP, WORD, tokenize
from sql_magics.planner.parquet import files_of, inline_views, parquet_source
from sql_magics.planner.shares import Share, shares_of
from sql_magics.planner.tree import (
    SHAPE_ERRORS,
    NotEligible,
    column,
    conjoin,
    conjuncts,
    function_name,
    has,
    is_query,
    parse,
    select,
    table,
    to_sql,
    walk,
    without_locations,
)

WORKERS = "workers"
DRIVER = "driver"
NO_CALL = "no model function call"
PLAN_COLUMNS = ["path", "reason", "function", "files", "shares", "rows", "statement"]


@dataclass
class Plan:
    """How a statement runs: ``path`` is WORKERS or DRIVER (``reason`` says why)."""

    path: str
    reason: str = ""
    function: str = ""
    statement: str = ""  # what the driver's DuckDB runs (the source and the calls replaced)
    scan_name: str = ""  # the name the stream of results is registered under
    worker_query: str = ""
    schema: pa.Schema | None = None  # passthrough and argument columns, as the driver's DuckDB types them
    passthrough: tuple[str, ...] = ()
    call_args: tuple[int, ...] = ()
    files: list[str] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)
    picked: tuple[tuple[str, str], ...] | None = None  # (column, file column) when worker_query only picks columns

    def describe(self) -> dict:
        """What ``!plan`` shows: one value per PLAN_COLUMNS."""
        return {
            "path": self.path, "reason": self.reason, "function": self.function, "files": len(self.files),
            "shares": len(self.shares), "rows": sum(s.rows for s in self.shares), "statement": self.statement,
        }


def driver(reason: str) -> Plan:
    """The plan that runs a statement as written, for ``reason``."""
    return Plan(DRIVER, reason)


@dataclass(frozen=True)
class BuiltinFunctions:
    """What a new DuckDB connection, such as a worker's, says of its functions (lower-case names)."""

    names: frozenset[str]  # every function it has: a name not here was made on the session's connection
    aggregates: frozenset[str]
    volatile: frozenset[str]  # other values each call: random(), uuid(), ...


@functools.cache
def builtin_functions() -> BuiltinFunctions:
    """Read once per process (asking costs ~12 ms, more than a small query): DuckDB's own functions do
    not change, and the functions a session makes (macros, Python functions) are simply the names
    missing here, which a worker's DuckDB lacks, so arguments and filters that call them stay with the driver."""
    with duckdb.connect() as fresh:
        rows = fresh.execute("SELECT DISTINCT lower(function_name), function_type, stability FROM duckdb_functions()").fetchall()
    return BuiltinFunctions(
        frozenset(name for name, _, _ in rows),
        frozenset(name for name, kind, _ in rows if kind == "aggregate"),
        frozenset(name for name, _, stability in rows if stability == "VOLATILE"),
    )


# -- the statement around the query --------------------------------------------------------


def split_statement(sql: str) -> tuple[str, str, str]:
    """(prefix, query, suffix) of a SELECT, ``COPY (query) TO ...``, ``CREATE TABLE t AS query`` or
    ``INSERT INTO t [BY NAME] query``; the query is "" for any other statement.

    Example:
        >>> split_statement("COPY (select f(x) from t) TO 'o.parquet' (FORMAT parquet)")
        ('COPY (', 'select f(x) from t', ") TO 'o.parquet' (FORMAT parquet)")
        >>> split_statement("create or replace table s as select 1")[1], split_statement("create view v as select 1")[1]
        ('select 1', '')
        >>> split_statement("select 'unterminated")
        Traceback (most recent call last):
        sql_magics.planner.tree.NotEligible: our tokenizer does not read it (line 1, col 8: unterminated string); DuckDB says what is wrong
    """
    try:
        tokens = tokenize(sql)
    except ParseError as err:  # left to DuckDB, which says what is wrong in its own words
        raise NotEligible(f"our tokenizer does not read it ({err}); DuckDB says what is wrong") from None
    words = [t.value.lower() if t.kind == WORD else t.value for t in tokens]
    if not tokens:
        return sql, "", ""
    if words[0] in ("select", "with", "from"):
        return "", sql.strip().rstrip(";"), ""
    if words[0] == "copy" and len(tokens) > 1 and words[1] == "(":
        depth = 0
        for token, word in zip(tokens[1:], words[1:], strict=True):
            depth += (word == "(") - (word == ")")
            if depth == 0 and token.kind == OP:
                return sql[: tokens[1].end], sql[tokens[1].end : token.start], sql[token.start :]
        return sql, "", ""
    creates_table = words[0] == "create" and "as" in words and "table" in words[: words.index("as")]
    if words[0] == "insert" or creates_table:  # not CREATE VIEW: a view outlives the stream it would read
        depth = 0
        start = 1 if words[0] == "insert" else words.index("as") + 1
        for token, word in zip(tokens[start:], words[start:], strict=False):
            depth += (word == "(") - (word == ")")
            if depth == 0 and word in ("select", "with", "from") and token.kind == WORD:
                return sql[: token.start], sql[token.start :].strip().rstrip(";"), ""
    return sql, "", ""


# -- finding the model calls -----------------------------------------------------------------


@dataclass
class _Call:
    scope: dict  # the SELECT_NODE the call is in
    parent: Any  # the dict or list holding it
    key: Any  # where in the parent
    node: dict
    in_aggregate: bool
    in_window: bool

    def key_of_args(self) -> str:
        """The call's arguments, wherever they stand in the text: two calls with equal keys are scored once."""
        return json.dumps([without_locations(a["expression"]) for a in self.node["arguments"]], sort_keys=True)


def _calls(node: dict, models: set[str], builtin: BuiltinFunctions) -> list[_Call]:
    found: list[_Call] = []

    def visit(value: Any, parent: Any, key: Any, scope: dict, in_aggregate: bool, in_window: bool) -> None:
        if isinstance(value, list):
            for i, child in enumerate(value):
                visit(child, value, i, scope, in_aggregate, in_window)
            return
        if not isinstance(value, dict):
            return
        if value.get("type") == "SELECT_NODE":
            scope, in_aggregate, in_window = value, False, False
        if name := function_name(value):
            if name in models and not value.get("schema"):
                found.append(_Call(scope, parent, key, value, in_aggregate, in_window))
            in_aggregate = in_aggregate or name in builtin.aggregates
        in_window = in_window or value.get("class") == "WINDOW"
        for k, child in value.items():
            visit(child, value, k, scope, in_aggregate, in_window)

    visit(node, None, None, node, False, False)
    return found


# -- the plan ---------------------------------------------------------------------------------


def plan(con: duckdb.DuckDBPyConnection, sql: str, functions: Mapping[str, ModelFunction]) -> Plan:
    """The path a statement takes, and for the worker path everything needed to run it."""
    if not functions:
        return driver(NO_CALL)
    try:
        prefix, query, suffix = split_statement(sql)
        if not query:
            return driver("not a query (SELECT, COPY (...) TO, CREATE TABLE AS, INSERT ... SELECT)")
        node = parse(con, query)
    except NotEligible as why:
        return driver(str(why))
    except SHAPE_ERRORS as err:
        return _unread(err)
    if node is None:
        return driver("not a query DuckDB's parser describes")
    return plan_query(con, node, functions, prefix=prefix, suffix=suffix)


def plan_query(
    con: duckdb.DuckDBPyConnection, node: dict, functions: Mapping[str, ModelFunction], *, prefix: str = "", suffix: str = ""
) -> Plan:
    """The plan of a query's parse tree, inside ``prefix`` and ``suffix`` (``COPY (`` and ``) TO ...``).

    ``node`` is rewritten in place, whichever path the plan ends on: give a copy to keep it. A tree
    this planner cannot read, or a question DuckDB will not answer on the way, runs as written."""
    models = {name.lower() for name in functions}
    try:
        builtin = builtin_functions()
        inline_views(con, node, models)
        calls = _calls(node, models, builtin)
        if not calls:
            return driver(NO_CALL)
        return _plan(con, node, calls, builtin, models, functions, prefix, suffix)
    except NotEligible as why:
        return driver(str(why))
    except SHAPE_ERRORS as err:
        return _unread(err)
    except duckdb.Error as err:  # a DESCRIBE or probe of the source refused: running as written, DuckDB says why
        return driver(f"DuckDB refused a question of the planner ({str(err).splitlines()[0]})")


def _unread(err: Exception) -> Plan:
    return driver(f"DuckDB {duckdb.__version__}'s parse tree has a shape this planner does not read ({type(err).__name__}: {err})")


def _plan(con, node, calls, builtin, models, functions, prefix, suffix) -> Plan:
    scope = calls[0].scope
    names = {function_name(c.node) for c in calls}
    if any(c.scope is not scope for c in calls):
        raise NotEligible("model calls in more than one SELECT")
    if len(names) > 1:
        raise NotEligible(f"calls of {len(names)} model functions ({', '.join(sorted(names))})")
    if has(node, lambda v: v.get("type") in ("LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER") or v.get("sample")):
        raise NotEligible("LIMIT or SAMPLE: DuckDB stops calling the model once it has the rows it needs")
    if has(node, lambda v: v.get("class") == "PARAMETER"):
        raise NotEligible("the query has $parameters, which DuckDB binds where it runs: in the driver")
    if any(c.in_window for c in calls):
        raise NotEligible("a model call inside a window function")
    aggregating = bool(scope["group_expressions"]) or has(
        {"s": scope["select_list"], "h": scope["having"]}, lambda v: function_name(v) in builtin.aggregates
    )
    if aggregating and not all(c.in_aggregate for c in calls):
        raise NotEligible("a model call outside the aggregates of a grouping SELECT")
    stars = [item for item in scope["select_list"] if item.get("class") == "STAR"]
    if any(s.get("columns") for s in stars) or sum(v.get("class") == "STAR" for v in walk(scope["select_list"])) > len(stars):
        raise NotEligible("COLUMNS(...) or a * inside an expression in the SELECT")
    (function,) = names
    fn = next(f for n, f in functions.items() if n.lower() == function)
    if fn.udf.conf.batch_timeout_s is not None:
        raise NotEligible("batch_timeout_s is set: it bounds one batch, and a worker's share holds many")
    source, paths, alias = parquet_source(con, scope)
    files = files_of(con, paths)
    source_sql = "read_parquet([" + ", ".join(quote_literal(f) for f in files) + "])"
    described = con.execute(f"DESCRIBE SELECT * FROM {source_sql}").fetchall()
    columns = {row[0].lower(): row[0] for row in described}
    if FILE_ROW in columns or any(c.startswith(PREFIX) for c in columns):
        raise NotEligible(f"the files have a column named {FILE_ROW} or {PREFIX}*")
    for call in calls:
        _check_args(call, builtin, set(columns), alias, models)

    # the distinct calls, each becoming one score column
    keys = [call.key_of_args() for call in calls]
    distinct = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    arg_exprs = [copy.deepcopy([a["expression"] for a in calls[keys.index(key)].node["arguments"]]) for key in distinct]
    # filters on the source's columns alone run where the rows are read: the model sees the rows it would have seen
    pushed = [copy.deepcopy(c) for c in conjuncts(scope["where_clause"]) if _pushable(c, builtin, set(columns), alias, models)]
    for call, key in zip(calls, keys, strict=True):
        call.parent[call.key] = column([score_column(distinct[key])], call.node.get("alias", ""))
    # the columns the statement reads besides the model's arguments
    referenced = {
        v["column_names"][-1].lower() for v in walk({k: v for k, v in scope.items() if k != "from_table"})
        if v.get("class") == "COLUMN_REF" and _is_source_column(v["column_names"], set(columns), alias)
    }
    passthrough = tuple(row[0] for row in described if stars or row[0].lower() in referenced)
    for star in stars:  # the score columns are ours, not the user's
        star["exclude_list"] = [*star.get("exclude_list", []), *(score_column(i) for i in range(len(arg_exprs)))]

    select_list = [column([c], c) for c in passthrough]
    select_list += [{**expr, "alias": arg_column(i, j)} for i, exprs in enumerate(arg_exprs) for j, expr in enumerate(exprs)]
    probe = to_sql(con, select(select_list, {**copy.deepcopy(source), "alias": alias}, conjoin(pushed)))
    schema = con.sql(f"{probe} LIMIT 0").to_arrow_table().schema
    worker_query = to_sql(con, select([*select_list, column([FILE_ROW], ROW_COLUMN)], table(SHARE_VIEW, alias), conjoin(pushed)))
    picked = None  # a query that only picks columns may be read straight from the files (arrow_bridge.share_scan)
    if not pushed and all(e.get("class") == "COLUMN_REF" for exprs in arg_exprs for e in exprs):
        picked = tuple((c, c) for c in passthrough) + tuple(
            (arg_column(i, j), columns[e["column_names"][-1].lower()]) for i, exprs in enumerate(arg_exprs) for j, e in enumerate(exprs)
        )

    scan_name = f"{PREFIX}scan_{secrets.token_hex(4)}"
    scope["from_table"] = table(scan_name, alias)
    return Plan(
        WORKERS, "", fn.name, prefix + to_sql(con, node) + suffix, scan_name, worker_query, schema, passthrough,
        tuple(len(e) for e in arg_exprs), files, shares_of(files, fn.udf.conf.workers), picked,
    )


def _check_args(call: _Call, builtin: BuiltinFunctions, columns: set[str], alias: str, models: set[str]) -> None:
    for arg in call.node["arguments"]:
        for value in walk(arg["expression"]):
            cls = value.get("class")
            if cls in ("SUBQUERY", "WINDOW") or is_query(value):
                raise NotEligible("a model argument holds a subquery or window")
            if name := function_name(value):
                if name in builtin.aggregates:
                    raise NotEligible("a model argument holds an aggregate")
                if name in builtin.volatile:
                    raise NotEligible(f"a model argument calls {name}(), which gives other values each time")
                if name in models:
                    raise NotEligible("a model call inside another")
                if name not in builtin.names:
                    raise NotEligible(f"a model argument calls {name}(), which only this session's DuckDB has, not the workers'")
            if cls == "COLUMN_REF" and not _is_source_column(value["column_names"], columns, alias):
                raise NotEligible(f"a model argument reads {'.'.join(value['column_names'])}, not a column of the files")


def _is_source_column(names: list[str], columns: set[str], alias: str) -> bool:
    if len(names) == 1:
        return names[0].lower() in columns
    return len(names) == 2 and names[0].lower() == alias.lower() and names[1].lower() in columns


def _pushable(conjunct: dict, builtin: BuiltinFunctions, columns: set[str], alias: str, models: set[str]) -> bool:
    """Whether a WHERE condition can run where the rows are read: source columns, and functions a worker's DuckDB has."""
    for value in walk(conjunct):
        cls = value.get("class")
        if cls in ("SUBQUERY", "WINDOW") or is_query(value):
            return False
        name = function_name(value)
        if name and (name in models or name in builtin.aggregates or name in builtin.volatile or name not in builtin.names):
            return False
        if cls == "COLUMN_REF" and not _is_source_column(value["column_names"], columns, alias):
            return False
    return True
