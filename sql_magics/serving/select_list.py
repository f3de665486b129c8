"""``/model/predict``'s ``sql``: a select list over the request's rows, and nothing else.

Byzer's endpoint takes a select list (``select f(feature) as p``) that rayudf evaluates with
DuckDB over the request's rows. Pasted before ``FROM`` as text, it could bring its own FROM (a
trailing ``--`` hides ours), a second statement, table functions (``range(1e11)``,
``duckdb_settings()``) or subqueries over them. So the query is read by DuckDB's own parser
(``json_serialize_sql``: the very parser that runs it, so nothing parses differently) and
refused, naming what is wrong, unless: it is one SELECT with no comment in the text, its FROM is
the one we put there, every table anything in it reads is the request's rows (a subquery over
them is fine), it has no CTE, no expression names another's alias (DuckDB's binder pastes it in,
doubling the work of a chain at each step, where no interrupt reaches), and it calls no function
that reads the server's settings or catalog, runs SQL of its own, or builds values far larger
than the request. What stays (a cross product of the request's rows
in a subquery, a slow model) is bounded by the replica: a time limit, a memory limit, an
interrupt when the client goes away, and a cap on the answer's size.

Example:
    >>> query("f(feature) as p, upper(name)")
    'SELECT f(feature) as p, upper(name) FROM "__rayudf_request"'
    >>> query("1 as x from duckdb_settings() --")
    Traceback (most recent call last):
    sql_magics.serving.requests.RequestError: sql: a comment is not taken (give a select list only)
    >>> query("(select count(*) from range(100000000000)) as n")
    Traceback (most recent call last):
    sql_magics.serving.requests.RequestError: sql: the table function range() is not taken: a select list reads the request's rows only
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

import duckdb

from arrow_bridge.quoting import quote_identifier
from sql_magics.errors import clean_duckdb_error
from sql_magics.serving.requests import REQUEST_TABLE, RequestError

# Table references a select list may hold: the request's rows (BASE_TABLE, checked by name), and
# what only combines what is read elsewhere. Anything else (a table function, a PIVOT, a kind a
# newer DuckDB adds) is refused.
_COMBINING = ("JOIN", "SUBQUERY", "EMPTY", "EMPTY_FROM", "EXPRESSION_LIST")
# Scalar functions refused by name: those that read the server's own state rather than the rows
# (settings show paths; a plan serialized with optimize folds current_setting() into its answer),
# and those that build a value far larger than their arguments (repeat('x', 1e9) is a gigabyte
# that DuckDB's memory limit does not count; replace(v, 'x', v) squares v).
_REFUSED = {
    **dict.fromkeys(
        ("current_setting", "getvariable", "json_serialize_sql", "json_serialize_plan", "json_deserialize_sql"),
        "it reads the server's settings or runs SQL of its own",
    ),
    **dict.fromkeys(
        ("repeat", "lpad", "rpad", "printf", "format", "range", "generate_series", "list_resize", "replace", "regexp_replace"),
        "it can build a value far larger than the request",
    ),
}
# Checking a select list costs ~1 ms (DuckDB's parser, to JSON); clients send the same few again and again.
_CACHED = 1024
# One parser for every check: a connection that reads nothing and is only ever asked to parse.
_PARSER = duckdb.connect(config={"enable_external_access": False})


def _refused_names() -> dict[str, str]:
    """:data:`_REFUSED`, with DuckDB's other names for those functions, and the built-in macros whose
    body reads a table (pg_get_viewdef() reads duckdb_views()): what is inside a macro is not checked."""
    with _PARSER.cursor() as cursor:
        rows = cursor.execute(
            "SELECT DISTINCT lower(function_name), lower(alias_of), function_type, macro_definition FROM duckdb_functions()"
        ).fetchall()
    refused = dict(_REFUSED)
    for name, alias_of, kind, body in rows:
        if alias_of in _REFUSED:
            refused[name] = _REFUSED[alias_of]
        elif kind == "macro" and re.search(r"\bFROM\b", body or "", re.I):
            refused[name] = "it reads the database's catalog"
    return refused


_REFUSED_NAMES = _refused_names()


@functools.lru_cache(maxsize=_CACHED)
def query(select: str) -> str:
    """The one statement that evaluates ``select`` over the request's rows; RequestError naming what is refused.
    (Its answer depends on the text alone: a client sending the same select list is checked once.)"""
    tokens = _tokens(select)
    if any(kind == duckdb.token_type.comment for _, kind in tokens):
        raise RequestError("sql: a comment is not taken (give a select list only)")
    if any(kind == duckdb.token_type.operator and select.startswith(";", at) for at, kind in tokens):
        raise RequestError("sql: give one select list, nothing after it")
    statement = f"SELECT {select} FROM {quote_identifier(REQUEST_TABLE)}"
    tree = _parsed(statement)
    statements = tree.get("statements") or []
    if len(statements) != 1 or statements[0].get("node", {}).get("type") != "SELECT_NODE":
        raise RequestError("sql: give one select list, nothing after it")
    top = statements[0]["node"]
    ours = top.get("from_table") or {}
    if ours.get("table_name") != REQUEST_TABLE or ours.get("query_location") != statement.rindex(" FROM ") + len(" FROM "):
        raise RequestError("sql: give a select list only: the rows come from the request (no FROM)")
    for node in _nodes(tree):
        _check(node)
    return statement


def _tokens(text: str) -> list[tuple[int, Any]]:
    try:
        return duckdb.tokenize(text)
    except duckdb.Error as err:
        raise RequestError(f"sql: {clean_duckdb_error(err)}") from None


def _parsed(statement: str) -> dict:
    try:
        with _PARSER.cursor() as cursor:
            tree = json.loads(cursor.execute("SELECT json_serialize_sql(?)", [statement]).fetchone()[0])
    except duckdb.Error as err:
        raise RequestError(f"sql: {clean_duckdb_error(err)}") from None
    if tree.get("error"):
        message = str(tree.get("error_message") or "does not parse")
        if "Only SELECT" in message:
            raise RequestError("sql: give one select list, nothing after it")
        raise RequestError(f"sql: {message}")
    return tree


def _nodes(tree: Any) -> Iterator[dict]:
    """Every object of the parse tree, depth first."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _tables(node: dict) -> Iterator[dict]:
    """The table references of a query node's FROM: it, and the sides of each join in it."""
    stack = [node.get("from_table")]
    while stack:
        ref = stack.pop()
        if isinstance(ref, dict):
            yield ref
            if ref.get("type") == "JOIN":
                stack += [ref.get("left"), ref.get("right")]


def _check(node: dict) -> None:
    if (node.get("cte_map") or {}).get("map"):
        raise RequestError("sql: WITH is not taken: a select list reads the request's rows only")
    if node.get("class") == "FUNCTION" and (why := _REFUSED_NAMES.get(str(node.get("function_name", "")).lower())):
        raise RequestError(f"sql: {node['function_name']}() is not taken: {why}")
    if node.get("type") == "SELECT_NODE":
        _check_aliases(node)
    for ref in _tables(node):
        kind = ref.get("type")
        if kind == "TABLE_FUNCTION":
            name = (ref.get("function") or {}).get("function_name") or "?"
            raise RequestError(f"sql: the table function {name}() is not taken: a select list reads the request's rows only")
        if kind == "BASE_TABLE":
            if ref.get("table_name") != REQUEST_TABLE or ref.get("schema_name") or ref.get("catalog_name"):
                shown = ".".join(p for p in (ref.get("catalog_name"), ref.get("schema_name"), ref.get("table_name")) if p)
                raise RequestError(f"sql: the table {shown} is not taken: a select list reads the request's rows only")
        elif kind not in _COMBINING:
            raise RequestError(f"sql: {str(kind).lower().replace('_', ' ')} is not taken: a select list reads the request's rows only")


def _check_aliases(node: dict) -> None:
    """Refuse an expression that names another expression's alias in the same select list (or in its
    WHERE, GROUP BY, HAVING): DuckDB pastes the aliased expression in when it binds, so a chain of
    them (`x||x as a1, a1||a1 as a2, ...`) doubles the work at each step, in a binder no interrupt
    reaches."""
    aliases = {str(e["alias"]).lower() for e in node.get("select_list") or [] if e.get("alias")}
    if not aliases:
        return
    parts = [(e, str(e.get("alias") or "").lower()) for e in node.get("select_list") or []]
    parts += [(node.get(key), "") for key in ("where_clause", "group_expressions", "having", "qualify")]
    for expression, own in parts:
        for ref in _within(expression):
            names = ref.get("column_names") or []
            if ref.get("class") == "COLUMN_REF" and len(names) == 1 and str(names[0]).lower() in aliases - {own}:
                raise RequestError(
                    f"sql: {names[0]} names an alias of the same select list; write its expression again "
                    "(an alias used in the list is not taken: a chain of them doubles the work at each step)"
                )


def _within(expression: Any) -> Iterator[dict]:
    """The objects of an expression, not those of the subqueries in it (they have select lists of their own)."""
    stack = [expression]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(v for k, v in node.items() if k != "subquery")
        elif isinstance(node, list):
            stack.extend(node)
