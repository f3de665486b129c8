"""The Parquet files a SELECT's model rows come from: views that call a model inlined, the one Parquet source found, and its files.

Example:
    >>> import tempfile
    >>> con, data = duckdb.connect(), tempfile.mkdtemp()
    >>> _ = con.execute(f"copy (select 1 as x) to '{data}/part-0.parquet'")
    >>> _ = con.execute(f"create view raw as select * from read_parquet('{data}/*.parquet')")  # as `load parquet` makes
    >>> ref, paths, alias = parquet_source(con, parse(con, "select f(x) from raw"))
    >>> paths == [f"{data}/*.parquet"], alias, [os.path.basename(f) for f in files_of(con, paths)]
    (True, 'raw', ['part-0.parquet'])
"""

from __future__ import annotations

import os
import re

import duckdb

from sql_magics.planner.tree import NotEligible, parse, subquery, walk
from sql_magics.tables.catalog import view_sql

_READERS = ("read_parquet", "parquet_scan")
_GLOB = re.compile(r"[*?\[{]")
# Views of views inlined, at most: deeper nesting stays a view, as written.
MAX_VIEW_DEPTH = 8


def inline_views(con: duckdb.DuckDBPyConnection, node: dict, models: frozenset[str], depth: int = 0) -> None:
    """Replace references to views whose SQL names a model function by the views' queries."""
    if depth > MAX_VIEW_DEPTH:
        return
    for ref in list(walk(node)):
        if ref.get("type") != "BASE_TABLE" or ref.get("schema_name") or ref.get("catalog_name"):
            continue
        name = ref["table_name"]
        sql = view_sql(con, name)
        if sql is None or not any(m in sql.lower() for m in models):
            continue
        inner = parse(con, sql)
        if inner is None:
            continue
        inline_views(con, inner, models, depth + 1)
        alias = ref.get("alias") or name
        ref.clear()
        ref.update(subquery(inner, alias))


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


def parquet_source(con: duckdb.DuckDBPyConnection, scope: dict) -> tuple[dict, list[str], str]:
    """(table reference, paths, alias) of the one Parquet source of a SELECT; a view or subquery of
    ``SELECT * FROM <parquet>`` counts."""
    ref = scope["from_table"]
    alias = ref.get("alias", "")
    if ref.get("type") == "SUBQUERY" and not ref.get("column_name_alias"):
        ref = _star_source(ref["subquery"]["node"]) or ref
    elif ref.get("type") == "BASE_TABLE" and not ref.get("schema_name") and (view := view_sql(con, ref["table_name"])):
        ref = _star_source(parse(con, view)) or ref
        alias = alias or scope["from_table"]["table_name"]
    paths = _source_paths(ref)
    if paths is None:
        raise NotEligible("the model's rows do not come from Parquet files alone (a table, a join, a subquery or reader options)")
    if any("://" in p for p in paths):
        raise NotEligible("the Parquet source is a URL; workers read local paths only")
    return ref, paths, alias


def files_of(con: duckdb.DuckDBPyConnection, paths: list[str]) -> list[str]:
    """The files read_parquet reads, in its order, as absolute paths: the paths in turn, each glob's matches sorted."""
    files: list[str] = []
    for path in paths:
        if _GLOB.search(path):
            files.extend(f for (f,) in con.execute("SELECT file FROM glob(?)", [path]).fetchall())
        else:
            files.append(path)
    if not files:
        raise NotEligible(f"no file matches {', '.join(paths)}")
    return [os.path.abspath(f) for f in files]
