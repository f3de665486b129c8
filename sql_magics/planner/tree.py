"""DuckDB's own parse trees (``json_serialize_sql``): reading them, building nodes, printing them back as SQL.

The planner reads DuckDB's internal JSON, whose shape a DuckDB release may change (setup.cfg
keeps DuckDB below its next major version). A tree of another shape must never fail a query:
indexing it raises one of :data:`SHAPE_ERRORS`, and DuckDB's refusal to print a tree back
becomes :class:`NotEligible`; the planner turns both into the driver path, saying why.

Example:
    >>> con = duckdb.connect()
    >>> node = parse(con, "select a from t where a > 1 and b")
    >>> [c["class"] for c in conjuncts(node["where_clause"])]
    ['COMPARISON', 'COLUMN_REF']
    >>> to_sql(con, select([column(["a"], "x")], table("t", ""), None))
    'SELECT a AS x FROM t'
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import duckdb


class NotEligible(Exception):  # noqa: N818 - a reason to take the driver path, not a failure
    """Why a statement runs as written, the driver calling the model: the message is what ``!plan`` shows."""


# What reading a tree of a shape this planner does not know raises: a key gone, a list where a dict was.
SHAPE_ERRORS = (KeyError, TypeError, IndexError, AttributeError)
# DuckDB's query_location of a node that does not come from the text.
NO_LOCATION = 18446744073709551615
_QUERY_NODES = ("SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE")
_LOCATION_KEYS = ("query_location", "query_location_length", "alias")


def parse(con: duckdb.DuckDBPyConnection, query: str) -> dict | None:
    """The parse tree of one SELECT, or None when DuckDB's parser does not describe it as one."""
    try:
        ((text,),) = con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()
    except duckdb.Error:
        return None
    tree = json.loads(text)
    if tree.get("error") or len(tree["statements"]) != 1:
        return None
    return tree["statements"][0]["node"]


def to_sql(con: duckdb.DuckDBPyConnection, node: dict) -> str:
    """The SQL text of a tree; a tree DuckDB will not print is not eligible."""
    tree = {"error": False, "statements": [{"node": node, "named_param_map": []}]}
    try:
        ((text,),) = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(tree)]).fetchall()
    except duckdb.Error as err:
        raise NotEligible(f"DuckDB does not print the rewritten statement back ({str(err).splitlines()[0]})") from None
    return text


def column(names: Sequence[str], alias: str = "") -> dict:
    """A column reference: ``names`` is the qualified name (``["t", "a"]`` for ``t.a``)."""
    return {
        "class": "COLUMN_REF", "type": "COLUMN_REF", "alias": alias, "query_location": NO_LOCATION,
        "query_location_length": 0, "column_names": list(names),
    }


def table(name: str, alias: str) -> dict:
    """A reference to the table or view ``name``."""
    return {
        "type": "BASE_TABLE", "alias": alias, "sample": None, "query_location": NO_LOCATION, "query_location_length": 0,
        "schema_name": "", "table_name": name, "column_name_alias": [], "catalog_name": "", "at_clause": None,
        "qualified_name": {"path": [name]},
    }


def subquery(node: dict, alias: str) -> dict:
    """``(node) AS alias`` as a table reference."""
    return {
        "type": "SUBQUERY", "alias": alias, "sample": None, "query_location": NO_LOCATION, "query_location_length": 0,
        "subquery": {"node": node, "named_param_map": []}, "column_name_alias": [],
    }


def select(select_list: list[dict], from_table: dict, where: dict | None) -> dict:
    """``SELECT <select_list> FROM <from_table> [WHERE <where>]``."""
    return {
        "type": "SELECT_NODE", "modifiers": [], "cte_map": {"map": []}, "select_list": select_list, "from_table": from_table,
        "where_clause": where, "group_expressions": [], "group_sets": [], "aggregate_handling": "STANDARD_HANDLING",
        "having": None, "sample": None, "qualify": None,
    }


def conjoin(parts: list[dict]) -> dict | None:
    """The conjunction (AND) of some conditions; None for none."""
    if len(parts) <= 1:
        return parts[0] if parts else None
    return {"class": "CONJUNCTION", "type": "CONJUNCTION_AND", "alias": "", "query_location": NO_LOCATION,
            "query_location_length": 0, "children": parts}


def conjuncts(where: dict | None) -> list[dict]:
    """The conditions a WHERE clause ANDs together."""
    if where is None:
        return []
    if where.get("type") == "CONJUNCTION_AND":
        return [c for child in where["children"] for c in conjuncts(child)]
    return [where]


def walk(value: Any) -> Iterator[dict]:
    """Every dict inside a tree, depth first."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from walk(child)


def has(node: Any, predicate: Callable[[dict], bool]) -> bool:
    """Whether some node inside ``node`` satisfies ``predicate``."""
    return any(predicate(v) for v in walk(node))


def is_query(value: dict) -> bool:
    """Whether a node is a query (a SELECT, a set operation, a CTE)."""
    return value.get("type") in _QUERY_NODES


def function_name(value: dict) -> str:
    """The lower-case name a FUNCTION node calls ("" for another node)."""
    return str(value.get("function_name", "")).lower() if value.get("class") == "FUNCTION" else ""


def without_locations(expr: Any) -> Any:
    """An expression without its places in the text (and aliases): two calls of the same arguments compare equal."""
    if isinstance(expr, dict):
        return {k: without_locations(v) for k, v in expr.items() if k not in _LOCATION_KEYS}
    if isinstance(expr, list):
        return [without_locations(v) for v in expr]
    return expr
