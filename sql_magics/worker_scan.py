"""Scans on the workers: a query whose model input comes from Parquet files reads them where
the model runs, and only the columns the query needs and the scores travel back.

A statement qualifies when one SELECT of it calls model functions (one function, any number
of calls) over a single Parquet source (``read_parquet('glob')``, ``'x.parquet'``, or a view
of one, such as ``load parquet`` makes), with no LIMIT or SAMPLE anywhere, arguments computed
from that source's columns alone, and, when that SELECT aggregates, the calls inside
aggregates. Then the files are cut into shares of whole row groups; each model worker reads
its shares with DuckDB (filters on the source's columns applied there, so the model sees
the rows it would have seen) and scores them; the driver's DuckDB runs the same statement
with the source replaced by the stream of results, in file order, and each call by its score
column. Anything else (in-memory tables, joins feeding the model, volatile arguments, files
the workers do not see alike) runs as before, the driver calling the model: the path taken,
and why, is what ``!plan '''<query>'''`` shows.

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
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from arrow_bridge.function import ModelFunction
from arrow_bridge.quoting import quote_literal
from arrow_bridge.share_scan import PREFIX, ROW_COLUMN, SHARE_VIEW, ShareScan, arg_column, score_column
from sql_magics.script_state import WORKER_SCAN
from sql_magics.tokens import OP, WORD, tokenize

WORKERS = "workers"
DRIVER = "driver"
# Shares per worker when the row groups allow: enough that a fast worker takes a slow one's
# work and each worker has its next share queued, few enough that a share's fixed cost
# (a call, a DuckDB query) stays small next to scoring its rows.
SHARES_PER_WORKER = 4
# And no bigger than this (unless one row group is): a worker lost mid-share costs at most this
# much work again, and a share is short enough not to be caught by one worker death after another
# (each death counts against the share running on it, as against a batch: max_retries).
MAX_SHARE_ROWS = 8192
_READERS = ("read_parquet", "parquet_scan")
_NO_LOCATION = 18446744073709551615  # DuckDB's "not from the text" query_location
_VIEW_SQL = re.compile(r'^CREATE\s+(?:TEMP\s+|TEMPORARY\s+)?VIEW\s+(?:"(?:[^"]|"")*"|[^\s(]+)\s+AS\s+(.*?);?\s*$', re.I | re.S)
_GLOB = re.compile(r"[*?\[{]")
_MAX_VIEW_DEPTH = 8  # views of views inlined, at most


@dataclass
class Share:
    """Rows ``first`` to ``last`` (file row numbers) of one file: whole row groups."""

    file: str
    first: int
    last: int


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


    def describe(self) -> dict:
        """What ``!plan`` shows: one value per PLAN_COLUMNS."""
        rows = sum(s.last - s.first + 1 for s in self.shares)
        return {
            "path": self.path, "reason": self.reason, "function": self.function, "files": len(self.files),
            "shares": len(self.shares), "rows": rows, "statement": self.statement,
        }


PLAN_COLUMNS = ["path", "reason", "function", "files", "shares", "rows", "statement"]


def driver(reason: str) -> Plan:
    return Plan(DRIVER, reason)


class _NotEligible(Exception):  # noqa: N818 - a reason to take the driver path, not a failure
    pass


# -- DuckDB's parse trees ------------------------------------------------------------------


def _parse(con: duckdb.DuckDBPyConnection, query: str) -> dict | None:
    """The parse tree of one SELECT (DuckDB's json_serialize_sql), or None."""
    try:
        ((text,),) = con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()
    except duckdb.Error:
        return None
    tree = json.loads(text)
    if tree.get("error") or len(tree["statements"]) != 1:
        return None
    return tree["statements"][0]["node"]


def _to_sql(con: duckdb.DuckDBPyConnection, node: dict) -> str:
    tree = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
    ((text,),) = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(tree)]).fetchall()
    return text


def _column(names: Sequence[str], alias: str = "") -> dict:
    return {
        "class": "COLUMN_REF", "type": "COLUMN_REF", "alias": alias, "query_location": _NO_LOCATION,
        "query_location_length": 0, "column_names": list(names),
    }


def _table(name: str, alias: str) -> dict:
    return {
        "type": "BASE_TABLE", "alias": alias, "sample": None, "query_location": _NO_LOCATION, "query_location_length": 0,
        "schema_name": "", "table_name": name, "column_name_alias": [], "catalog_name": "", "at_clause": None,
        "qualified_name": {"path": [name]},
    }


def _select(select_list: list[dict], from_table: dict, where: dict | None) -> dict:
    return {
        "type": "SELECT_NODE", "modifiers": [], "cte_map": {"map": []}, "select_list": select_list, "from_table": from_table,
        "where_clause": where, "group_expressions": [], "group_sets": [], "aggregate_handling": "STANDARD_HANDLING",
        "having": None, "sample": None, "qualify": None,
    }


def _and(conjuncts: list[dict]) -> dict | None:
    if len(conjuncts) <= 1:
        return conjuncts[0] if conjuncts else None
    return {"class": "CONJUNCTION", "type": "CONJUNCTION_AND", "alias": "", "query_location": _NO_LOCATION,
            "query_location_length": 0, "children": conjuncts}


def _walk(value: Any) -> Iterator[dict]:
    """Every dict inside a parse tree, depth first."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)


def _is_query(value: dict) -> bool:
    return value.get("type") in ("SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE")


# -- the statement around the query --------------------------------------------------------


def split_statement(sql: str) -> tuple[str, str, str]:
    """(prefix, query, suffix) of a SELECT, ``COPY (query) TO ...``, ``CREATE TABLE t AS query`` or
    ``INSERT INTO t [BY NAME] query``; the query is "" for any other statement.

    Example:
        >>> split_statement("COPY (select f(x) from t) TO 'o.parquet' (FORMAT parquet)")
        ('COPY (', 'select f(x) from t', ") TO 'o.parquet' (FORMAT parquet)")
        >>> split_statement("create or replace table s as select 1")[1]
        'select 1'
        >>> split_statement("create view v as select 1")[1]
        ''
    """
    try:
        tokens = tokenize(sql)
    except Exception:  # noqa: BLE001 - a text our tokenizer refuses is left to DuckDB
        return sql, "", ""
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


class _Catalog:
    """What DuckDB says of its function names: aggregates and volatile ones (read once: DuckDB's own
    functions do not change, and asking costs ~15 ms, more than a small query)."""

    _known: _Catalog | None = None

    @classmethod
    def of(cls, con: duckdb.DuckDBPyConnection) -> _Catalog:
        if cls._known is None:
            cls._known = cls(con)
        return cls._known

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        rows = con.execute(
            "SELECT DISTINCT function_name, function_type, stability FROM duckdb_functions() "
            "WHERE function_type = 'aggregate' OR stability = 'VOLATILE'"
        ).fetchall()
        self.aggregates = {name.lower() for name, kind, _ in rows if kind == "aggregate"}
        self.volatile = {name.lower() for name, _, stability in rows if stability == "VOLATILE"}


def _calls(node: dict, models: set[str], catalog: _Catalog) -> list[_Call]:
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
        if value.get("class") == "FUNCTION":
            name = str(value.get("function_name", "")).lower()
            if name in models and not value.get("schema"):
                found.append(_Call(scope, parent, key, value, in_aggregate, in_window))
            in_aggregate = in_aggregate or name in catalog.aggregates
        in_window = in_window or value.get("class") == "WINDOW"
        for k, child in value.items():
            visit(child, value, k, scope, in_aggregate, in_window)

    visit(node, None, None, node, False, False)
    return found


def _view_sql(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    rows = con.execute(
        "SELECT sql FROM duckdb_views() WHERE view_name = ? AND NOT internal "
        "AND database_name = current_database() AND schema_name = current_schema()",
        [name],
    ).fetchall()
    if not rows:
        return None
    match = _VIEW_SQL.match(rows[0][0] or "")
    return match.group(1) if match else None


def _inline_views(con: duckdb.DuckDBPyConnection, node: dict, models: set[str], depth: int = 0) -> None:
    """Replace references to views whose SQL names a model function by the views' queries."""
    if depth > _MAX_VIEW_DEPTH:
        return
    for ref in list(_walk(node)):
        if ref.get("type") != "BASE_TABLE" or ref.get("schema_name") or ref.get("catalog_name"):
            continue
        name = ref["table_name"]
        sql = _view_sql(con, name)
        if sql is None or not any(m in sql.lower() for m in models):
            continue
        inner = _parse(con, sql)
        if inner is None:
            continue
        _inline_views(con, inner, models, depth + 1)
        alias = ref.get("alias") or name
        ref.clear()
        ref.update({
            "type": "SUBQUERY", "alias": alias, "sample": None, "query_location": _NO_LOCATION, "query_location_length": 0,
            "subquery": {"node": inner, "named_param_map": []}, "column_name_alias": [],
        })


# -- the source ------------------------------------------------------------------------------


def _string(expr: dict) -> str | None:
    if expr.get("class") == "CONSTANT" and expr.get("literal", {}).get("kind") == "STRING":
        return expr["literal"]["text"]
    return None


def _source_paths(ref: dict) -> list[str] | None:
    """The paths (or globs) a Parquet table reference reads, or None if it is not one we split."""
    if ref.get("type") == "BASE_TABLE" and not ref.get("schema_name") and not ref.get("catalog_name"):
        name = ref["table_name"]
        return [name] if name.lower().endswith(".parquet") else None
    if ref.get("type") != "TABLE_FUNCTION" or ref.get("column_name_alias"):
        return None
    function = ref["function"]
    if str(function.get("function_name", "")).lower() not in _READERS or len(function["arguments"]) != 1:
        return None
    (arg,) = function["arguments"]
    expr = arg["expression"]
    if arg.get("name"):
        return None
    if (text := _string(expr)) is not None:
        return [text]
    if expr.get("class") == "FUNCTION" and expr.get("function_name") == "list_value":
        paths = [_string(a["expression"]) for a in expr["arguments"]]
        return paths if all(p is not None for p in paths) and paths else None
    return None


def _star_source(inner: dict | None) -> dict | None:
    """The source of ``SELECT * FROM <source>`` with nothing else (a ``load parquet`` view), else None."""
    if inner is None or inner.get("type") != "SELECT_NODE" or len(inner["select_list"]) != 1:
        return None
    star = inner["select_list"][0]
    bare = not (star.get("exclude_list") or star.get("replace_list") or star.get("columns") or star.get("rename_list"))
    clauses = (inner["modifiers"], inner["cte_map"]["map"], inner["where_clause"], inner["group_expressions"], inner["having"],
               inner["qualify"], inner["sample"])
    return inner["from_table"] if star.get("class") == "STAR" and bare and not any(clauses) else None


def _source(con: duckdb.DuckDBPyConnection, scope: dict) -> tuple[dict, list[str], str]:
    """(table reference, paths, alias) of the one Parquet source of a SELECT; a view or subquery of
    ``SELECT * FROM <parquet>`` counts."""
    ref = scope["from_table"]
    alias = ref.get("alias", "")
    if ref.get("type") == "SUBQUERY" and not ref.get("column_name_alias"):
        ref = _star_source(ref["subquery"]["node"]) or ref
    elif ref.get("type") == "BASE_TABLE" and not ref.get("schema_name") and (view := _view_sql(con, ref["table_name"])):
        ref = _star_source(_parse(con, view)) or ref
        alias = alias or scope["from_table"]["table_name"]
    paths = _source_paths(ref)
    if paths is None:
        raise _NotEligible("the model's rows do not come from Parquet files alone (a table, a join, a subquery or reader options)")
    if any("://" in p for p in paths):
        raise _NotEligible("the Parquet source is a URL; workers read local paths only")
    return ref, paths, alias


def _files(con: duckdb.DuckDBPyConnection, paths: list[str]) -> list[str]:
    """The files read_parquet reads, in its order: the paths in turn, each glob's matches sorted."""
    files: list[str] = []
    for path in paths:
        if _GLOB.search(path):
            files.extend(f for (f,) in con.execute("SELECT file FROM glob(?)", [path]).fetchall())
        else:
            files.append(path)
    if not files:
        raise _NotEligible(f"no file matches {', '.join(paths)}")
    return [os.path.abspath(f) for f in files]


def shares_of(files: list[str], workers: int) -> list[Share]:
    """Whole row groups of each file, gathered into shares of about total / (workers * SHARES_PER_WORKER) rows, at most MAX_SHARE_ROWS."""
    groups = []
    for file in files:
        meta = pq.read_metadata(file)
        groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    total = sum(sum(g) for g in groups)
    target = max(1, min(MAX_SHARE_ROWS, total // max(1, workers * SHARES_PER_WORKER)))
    shares = []
    for file, sizes in zip(files, groups, strict=True):
        start = rows = 0
        for size in sizes:
            rows += size
            if rows - start >= target:
                shares.append(Share(file, start, rows - 1))
                start = rows
        if rows > start:
            shares.append(Share(file, start, rows - 1))
    return shares


# -- the plan ---------------------------------------------------------------------------------


def _check_args(call: _Call, catalog: _Catalog, columns: set[str], alias: str, models: set[str]) -> None:
    for arg in call.node["arguments"]:
        for value in _walk(arg["expression"]):
            cls = value.get("class")
            if cls in ("SUBQUERY", "WINDOW") or _is_query(value):
                raise _NotEligible("a model argument holds a subquery or window")
            if cls == "FUNCTION":
                name = str(value.get("function_name", "")).lower()
                if name in catalog.aggregates:
                    raise _NotEligible("a model argument holds an aggregate")
                if name in catalog.volatile:
                    raise _NotEligible(f"a model argument calls {name}(), which gives other values each time")
                if name in models:
                    raise _NotEligible("a model call inside another")
            if cls == "COLUMN_REF" and not _is_source_column(value["column_names"], columns, alias):
                raise _NotEligible(f"a model argument reads {'.'.join(value['column_names'])}, not a column of the files")


def _is_source_column(names: list[str], columns: set[str], alias: str) -> bool:
    if len(names) == 1:
        return names[0].lower() in columns
    return len(names) == 2 and names[0].lower() == alias.lower() and names[1].lower() in columns


def _has(node: dict, predicate) -> bool:
    return any(predicate(v) for v in _walk(node))


def plan(con: duckdb.DuckDBPyConnection, sql: str, functions: Mapping[str, ModelFunction]) -> Plan:
    """The path a statement takes, and for the worker path everything needed to run it."""
    models = {name.lower() for name in functions}
    if not models:
        return driver("no model function call")
    prefix, query, suffix = split_statement(sql)
    if not query:
        return driver("not a query (SELECT, COPY (...) TO, CREATE TABLE AS, INSERT ... SELECT)")
    node = _parse(con, query)
    if node is None:
        return driver("not a query DuckDB's parser describes")
    try:
        _inline_views(con, node, models)
        catalog = _Catalog.of(con)
        calls = _calls(node, models, catalog)
        if not calls:
            return driver("no model function call")
        return _plan(con, node, calls, catalog, models, functions, prefix, suffix)
    except _NotEligible as why:
        return driver(str(why))


def _plan(con, node, calls, catalog, models, functions, prefix, suffix) -> Plan:
    scope = calls[0].scope
    names = {c.node["function_name"].lower() for c in calls}
    if any(c.scope is not scope for c in calls):
        raise _NotEligible("model calls in more than one SELECT")
    if len(names) > 1:
        raise _NotEligible(f"calls of {len(names)} model functions ({', '.join(sorted(names))})")
    if _has(node, lambda v: v.get("type") in ("LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER") or v.get("sample")):
        raise _NotEligible("LIMIT or SAMPLE: DuckDB stops calling the model once it has the rows it needs")
    if any(c.in_window for c in calls):
        raise _NotEligible("a model call inside a window function")
    aggregating = bool(scope["group_expressions"]) or _has(
        {"s": scope["select_list"], "h": scope["having"]},
        lambda v: v.get("class") == "FUNCTION" and str(v.get("function_name", "")).lower() in catalog.aggregates,
    )
    if aggregating and not all(c.in_aggregate for c in calls):
        raise _NotEligible("a model call outside the aggregates of a grouping SELECT")
    stars = [item for item in scope["select_list"] if item.get("class") == "STAR"]
    if any(s.get("columns") for s in stars) or sum(v.get("class") == "STAR" for v in _walk(scope["select_list"])) > len(stars):
        raise _NotEligible("COLUMNS(...) or a * inside an expression in the SELECT")
    source, paths, alias = _source(con, scope)
    files = _files(con, paths)
    source_sql = "read_parquet([" + ", ".join(quote_literal(f) for f in files) + "])"
    described = con.execute(f"DESCRIBE SELECT * FROM {source_sql}").fetchall()
    columns = {row[0].lower(): row[0] for row in described}
    if "file_row_number" in columns or any(c.startswith(PREFIX) for c in columns):
        raise _NotEligible("the files have a column named file_row_number or __rayudf_*")
    for call in calls:
        _check_args(call, catalog, set(columns), alias, models)

    # the distinct calls, each becoming one score column
    keys = [_args_key(call) for call in calls]
    distinct = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    arg_exprs = [copy.deepcopy([a["expression"] for a in calls[keys.index(key)].node["arguments"]]) for key in distinct]
    # filters on the source's columns alone run where the rows are read: the model sees the rows it would have seen
    pushed = [copy.deepcopy(c) for c in _conjuncts(scope["where_clause"]) if _pushable(c, catalog, set(columns), alias, models)]
    for call, key in zip(calls, keys, strict=True):
        call.parent[call.key] = _column([score_column(distinct[key])], call.node.get("alias", ""))
    # the columns the statement reads besides the model's arguments
    referenced = {
        v["column_names"][-1].lower() for v in _walk({k: v for k, v in scope.items() if k != "from_table"})
        if v.get("class") == "COLUMN_REF" and _is_source_column(v["column_names"], set(columns), alias)
    }
    passthrough = tuple(row[0] for row in described if stars or row[0].lower() in referenced)
    for star in stars:  # the score columns are ours, not the user's
        star["exclude_list"] = [*star.get("exclude_list", []), *(score_column(i) for i in range(len(arg_exprs)))]

    select_list = [_column([c], c) for c in passthrough]
    select_list += [{**expr, "alias": arg_column(i, j)} for i, exprs in enumerate(arg_exprs) for j, expr in enumerate(exprs)]
    probe = _to_sql(con, _select(select_list, {**copy.deepcopy(source), "alias": alias}, _and(pushed)))
    schema = con.sql(f"{probe} LIMIT 0").to_arrow_table().schema
    worker_query = _to_sql(con, _select([*select_list, _column(["file_row_number"], ROW_COLUMN)], _table(SHARE_VIEW, alias), _and(pushed)))

    scan_name = f"{PREFIX}scan_{secrets.token_hex(4)}"
    scope["from_table"] = _table(scan_name, alias)
    (function,) = names
    fn = next(f for n, f in functions.items() if n.lower() == function)
    if fn.udf.conf.batch_timeout_s is not None:
        raise _NotEligible("batch_timeout_s is set: it bounds one batch, and a worker's share holds many")
    return Plan(
        WORKERS, "", fn.name, prefix + _to_sql(con, node) + suffix, scan_name, worker_query, schema, passthrough,
        tuple(len(e) for e in arg_exprs), files, shares_of(files, fn.udf.conf.workers),
    )


def _located_free(expr: dict) -> Any:
    """An expression without its places in the text: two calls with the same arguments are one."""
    if isinstance(expr, dict):
        return {k: _located_free(v) for k, v in expr.items() if k not in ("query_location", "query_location_length", "alias")}
    if isinstance(expr, list):
        return [_located_free(v) for v in expr]
    return expr


def _args_key(call: _Call) -> str:
    return json.dumps([_located_free(a["expression"]) for a in call.node["arguments"]], sort_keys=True)


def _conjuncts(where: dict | None) -> list[dict]:
    if where is None:
        return []
    if where.get("type") == "CONJUNCTION_AND":
        return [c for child in where["children"] for c in _conjuncts(child)]
    return [where]


def _pushable(conjunct: dict, catalog: _Catalog, columns: set[str], alias: str, models: set[str]) -> bool:
    for value in _walk(conjunct):
        cls = value.get("class")
        if cls in ("SUBQUERY", "WINDOW") or _is_query(value):
            return False
        if cls == "FUNCTION":
            name = str(value.get("function_name", "")).lower()
            if name in models or name in catalog.aggregates or name in catalog.volatile:
                return False
        if cls == "COLUMN_REF" and not _is_source_column(value["column_names"], columns, alias):
            return False
    return True


# -- running it --------------------------------------------------------------------------------


class _Stream:
    """The shares' results in file order, as Arrow batches for DuckDB; remembers what failed."""

    def __init__(self, results: Iterator[Any], schema: pa.Schema, fn: ModelFunction) -> None:
        self._results = results
        self.schema = schema
        self._fn = fn
        self.error: BaseException | None = None  # what stopped the stream (re-raised instead of DuckDB's wrapping)

    def batches(self) -> Iterator[pa.RecordBatch]:
        try:
            for result in self._results:
                self._fn.count(result.rows, result.nulled, result.reason)
                yield from result.table.cast(self.schema).to_batches()
        except GeneratorExit:  # DuckDB stopped reading (the query failed or was interrupted elsewhere)
            raise
        except BaseException as err:
            self.error = err
            raise


def readable(fn: ModelFunction, files: list[str]) -> bool:
    """Whether every worker of ``fn`` sees each file as the driver does (same path, same size)."""
    return fn.udf.can_read([(f, os.path.getsize(f)) for f in files])


@contextmanager
def running(con: duckdb.DuckDBPyConnection, planned: Plan, fn: ModelFunction) -> Iterator[str]:
    """Register the stream of the shares' results; yield the statement to run on it (while it runs)."""
    with fn.using() as version:
        tasks = [
            ShareScan(
                function=fn.name, returns=fn.return_type, query=planned.worker_query, schema=planned.schema,
                passthrough=planned.passthrough, call_args=planned.call_args, file=share.file,
                rows=(share.first, share.last), width=version.width, batch_size=version.batch_size,
            )
            for share in planned.shares
        ]
        out_schema = pa.schema(
            [planned.schema.field(c) for c in planned.passthrough]
            + [pa.field(score_column(i), fn.arrow_type) for i in range(len(planned.call_args))]
        )
        stream = _Stream(version.udf.scan(tasks), out_schema, fn)
        con.register(planned.scan_name, pa.RecordBatchReader.from_batches(out_schema, stream.batches()))
        try:
            yield planned.statement
        except Exception:
            if stream.error is not None:
                raise stream.error from None
            raise
        finally:
            con.unregister(planned.scan_name)


class WorkerScans:
    """The session's planner: runs a statement on the worker path when it can (see the module).

    ``functions()`` gives the model functions registered now; ``enabled()`` is False when
    ``set worker_scan = "off"``.
    """

    def __init__(self, functions: Callable[[], Mapping[str, ModelFunction]], enabled: Callable[[], bool]) -> None:
        self._functions = functions
        self._enabled = enabled

    def explain(self, con: duckdb.DuckDBPyConnection, sql: str) -> Plan:
        """The path ``sql`` would take now, and why."""
        if not self._enabled():
            return driver(f'set {WORKER_SCAN} = "off"')
        functions = self._functions()
        planned = plan(con, sql, functions)
        if planned.path == WORKERS and not readable(functions[planned.function], planned.files):
            return driver("the workers do not see the files as the driver does (another file system?)")
        return planned

    @contextmanager
    def __call__(self, con: duckdb.DuckDBPyConnection, sql: str) -> Iterator[str]:
        """``with scans(con, sql) as statement:`` run ``statement``, on the worker path if ``sql`` qualifies."""
        planned = self.explain(con, sql)
        if planned.path != WORKERS:
            yield sql
            return
        with running(con, planned, self._functions()[planned.function]) as statement:
            yield statement
