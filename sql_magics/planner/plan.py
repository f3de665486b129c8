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


def _calls(node: dict, models: frozenset[str], builtin: BuiltinFunctions) -> list[_Call]:
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
    models = frozenset(name.lower() for name in functions)
    try:
        builtin = builtin_functions()
        inline_views(con, node, models)
        calls = _calls(node, models, builtin)
        if not calls:
            return driver(NO_CALL)
        return _plan(con, node, calls, functions=functions, builtin=builtin, models=models, prefix=prefix, suffix=suffix)
    except NotEligible as why:
        return driver(str(why))
    except SHAPE_ERRORS as err:
        return _unread(err)
    except duckdb.Error as err:  # a DESCRIBE or probe of the source refused: running as written, DuckDB says why
        return driver(f"DuckDB refused a question of the planner ({str(err).splitlines()[0]})")


def _unread(err: Exception) -> Plan:
    return driver(f"DuckDB {duckdb.__version__}'s parse tree has a shape this planner does not read ({type(err).__name__}: {err})")


# -- is the query's shape one the worker path keeps -------------------------------------------


def _stars(scope: dict) -> list[dict]:
    """The ``*`` items of a SELECT's list."""
    return [item for item in scope["select_list"] if item.get("class") == "STAR"]


def _called_function(node: dict, calls: list[_Call], aggregates: frozenset[str]) -> str:
    """The one model function ``calls`` call, all in one SELECT whose shape the worker path keeps; else NotEligible."""
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
        {"s": scope["select_list"], "h": scope["having"]}, lambda v: function_name(v) in aggregates
    )
    if aggregating and not all(c.in_aggregate for c in calls):
        raise NotEligible("a model call outside the aggregates of a grouping SELECT")
    stars = _stars(scope)
    if any(s.get("columns") for s in stars) or sum(v.get("class") == "STAR" for v in walk(scope["select_list"])) > len(stars):
        raise NotEligible("COLUMNS(...) or a * inside an expression in the SELECT")
    (function,) = names
    return function


def _model_function(functions: Mapping[str, ModelFunction], name: str) -> ModelFunction:
    """The model function called ``name`` (any case), if the worker path can run it."""
    fn = next(f for n, f in functions.items() if n.lower() == name)
    if fn.udf.conf.batch_timeout_s is not None:
        raise NotEligible("batch_timeout_s is set: it bounds one batch, and a worker's share holds many")
    return fn


# -- the source and what runs where it is read -------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """The one Parquet source of the SELECT, as the workers read it."""

    ref: dict  # the table reference that reads the files (read_parquet(...), 'x.parquet')
    alias: str  # what the statement calls it ("" for nothing)
    files: list[str]
    columns: tuple[str, ...]  # the files' columns, as DuckDB names them, in their order

    def column(self, names: list[str]) -> str | None:
        """The file column a reference (``a``, ``alias.a``) reads, as the files name it; None for any other reference."""
        qualified = len(names) == 2 and names[0].lower() == self.alias.lower()
        if len(names) != 1 and not qualified:
            return None
        wanted = names[-1].lower()
        return next((c for c in self.columns if c.lower() == wanted), None)


def _read_source(con: duckdb.DuckDBPyConnection, scope: dict) -> _Source:
    """The SELECT's one Parquet source, its files and their columns; NotEligible for any other source."""
    ref, paths, alias = parquet_source(con, scope)
    files = files_of(con, paths)
    files_sql = "read_parquet([" + ", ".join(quote_literal(f) for f in files) + "])"
    columns = tuple(row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {files_sql}").fetchall())
    if any(c.lower() == FILE_ROW or c.lower().startswith(PREFIX) for c in columns):
        raise NotEligible(f"the files have a column named {FILE_ROW} or {PREFIX}*")
    return _Source(ref, alias, files, columns)


@dataclass(frozen=True)
class _OnWorkers:
    """What a worker's DuckDB can evaluate over its share of the files: the one rule for the model's arguments
    (else the statement stays with the driver) and for WHERE conditions (else the driver alone filters)."""

    builtin: BuiltinFunctions
    models: frozenset[str]
    source: _Source

    def why_not(self, expr: dict) -> str | None:
        """Why ``expr`` cannot run where the rows are read (None: it can): it may read the source's columns
        and call functions every DuckDB has that give the same value each time, and nothing else."""
        for value in walk(expr):
            cls = value.get("class")
            if cls in ("SUBQUERY", "WINDOW") or is_query(value):
                return "holds a subquery or window"
            if name := function_name(value):
                if name in self.builtin.aggregates:
                    return "holds an aggregate"
                if name in self.builtin.volatile:
                    return f"calls {name}(), which gives other values each time"
                if name in self.models:
                    return f"calls the model function {name}()"
                if name not in self.builtin.names:
                    return f"calls {name}(), which only this session's DuckDB has, not the workers'"
            if cls == "COLUMN_REF" and self.source.column(value["column_names"]) is None:
                return f"reads {'.'.join(value['column_names'])}, not a column of the files"
        return None

    def check_arguments(self, calls: list[_Call]) -> None:
        """NotEligible unless every argument of every call can run on the workers."""
        for call in calls:
            for arg in call.node["arguments"]:
                if why := self.why_not(arg["expression"]):
                    raise NotEligible(f"a model argument {why}")

    def filters(self, scope: dict) -> list[dict]:
        """Copies of the WHERE conditions that run where the rows are read, so that the model sees the rows it would have seen."""
        return [copy.deepcopy(c) for c in conjuncts(scope["where_clause"]) if self.why_not(c) is None]


# -- the rewrite -------------------------------------------------------------------------------


def _score_calls(calls: list[_Call]) -> list[list[dict]]:
    """Replace each call by its score column (calls of equal arguments by one); the arguments of each score column."""
    keys = [call.key_of_args() for call in calls]
    distinct = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    arguments = [copy.deepcopy([a["expression"] for a in calls[keys.index(key)].node["arguments"]]) for key in distinct]
    for call, key in zip(calls, keys, strict=True):
        call.parent[call.key] = column([score_column(distinct[key])], call.node.get("alias", ""))
    return arguments


def _passthrough(scope: dict, source: _Source, star: bool) -> tuple[str, ...]:
    """The file columns the statement reads besides the model's arguments (every one, under a ``*``)."""
    outside = {k: v for k, v in scope.items() if k != "from_table"}
    referenced = {source.column(v["column_names"]) for v in walk(outside) if v.get("class") == "COLUMN_REF"}
    return tuple(c for c in source.columns if star or c in referenced)


@dataclass(frozen=True)
class _WorkerQuery:
    sql: str  # what a worker runs over its share (SHARE_VIEW)
    schema: pa.Schema  # of its passthrough and argument columns, as the driver's DuckDB types them
    picked: tuple[tuple[str, str], ...] | None  # (column, file column) when it only picks columns


def _worker_query(
    con: duckdb.DuckDBPyConnection, *, source: _Source, passthrough: tuple[str, ...], arguments: list[list[dict]], filters: list[dict]
) -> _WorkerQuery:
    """What each worker runs over its share: the passthrough columns, the calls' arguments, the filters pushed."""
    select_list = [column([c], c) for c in passthrough]
    select_list += [{**expr, "alias": arg_column(i, j)} for i, exprs in enumerate(arguments) for j, expr in enumerate(exprs)]
    probe = to_sql(con, select(select_list, {**copy.deepcopy(source.ref), "alias": source.alias}, conjoin(filters)))
    schema = con.sql(f"{probe} LIMIT 0").to_arrow_table().schema
    sql = to_sql(con, select([*select_list, column([FILE_ROW], ROW_COLUMN)], table(SHARE_VIEW, source.alias), conjoin(filters)))
    picked = None  # a query that only picks columns may be read straight from the files (arrow_bridge.share_scan)
    if not filters and all(e.get("class") == "COLUMN_REF" for exprs in arguments for e in exprs):
        picked = tuple((c, c) for c in passthrough) + tuple(
            (arg_column(i, j), source.column(e["column_names"])) for i, exprs in enumerate(arguments) for j, e in enumerate(exprs)
        )
    return _WorkerQuery(sql, schema, picked)


def _plan(
    con: duckdb.DuckDBPyConnection, node: dict, calls: list[_Call], *, functions: Mapping[str, ModelFunction],
    builtin: BuiltinFunctions, models: frozenset[str], prefix: str, suffix: str,
) -> Plan:
    """The worker path's plan of a query whose model calls are ``calls``; NotEligible says why there is none."""
    scope = calls[0].scope
    fn = _model_function(functions, _called_function(node, calls, builtin.aggregates))
    source = _read_source(con, scope)
    on_workers = _OnWorkers(builtin, models, source)
    on_workers.check_arguments(calls)
    filters = on_workers.filters(scope)
    arguments = _score_calls(calls)
    stars = _stars(scope)
    passthrough = _passthrough(scope, source, star=bool(stars))
    for star in stars:  # the score columns are ours, not the user's
        star["exclude_list"] = [*star.get("exclude_list", []), *(score_column(i) for i in range(len(arguments)))]
    worker = _worker_query(con, source=source, passthrough=passthrough, arguments=arguments, filters=filters)
    scan_name = f"{PREFIX}scan_{secrets.token_hex(4)}"
    scope["from_table"] = table(scan_name, source.alias)
    return Plan(
        path=WORKERS, function=fn.name, statement=prefix + to_sql(con, node) + suffix, scan_name=scan_name, worker_query=worker.sql,
        schema=worker.schema, passthrough=passthrough, call_args=tuple(len(a) for a in arguments), files=source.files,
        shares=shares_of(source.files, fn.udf.conf.workers), picked=worker.picked,
    )
