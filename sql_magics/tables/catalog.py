"""What DuckDB holds under a name, and replacing it with a view or a table of a query.

Example:
    >>> import duckdb
    >>> con = duckdb.connect()
    >>> replace_relation(con, "t", "select 1 as x, 2 as y")
    'view'
    >>> relation_kind(con, "t"), relation_kind(con, "missing"), column_count(con, "t")
    ('view', None, 2)
    >>> replace_relation(con, "t", "select $v as x", {"v": 2})   # parameters: a table
    'table'
    >>> relation_kind(con, "t"), con.execute("select x from t").fetchall()
    ('table', [(2,)])
    >>> _ = con.execute("create view v as select x from t")
    >>> view_sql(con, "v"), loaded_table(con, "v").column_names
    ('SELECT x FROM t', ['x'])
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from arrow_bridge.quoting import quote_identifier

# DuckDB answers DDL, COPY and SET with one status column; those yield no rows for the user.
_STATUS_COLUMNS = (["Count"], ["Success"])
_ROW_STATEMENTS = ("SELECT", "EXPLAIN", "PRAGMA", "CALL")
# Where unqualified names resolve: a table of that name in an attached database or another schema is not it.
_HERE = "database_name = current_database() AND schema_name = current_schema()"
# DuckDB keeps a view's SQL as written: CREATE [TEMP] VIEW <name> AS <query>.
_VIEW_SQL = re.compile(r'^CREATE\s+(?:TEMP\s+|TEMPORARY\s+)?VIEW\s+(?:"(?:[^"]|"")*"|[^\s(]+)\s+AS\s+(.*?);?\s*$', re.I | re.S)


def relation_kind(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    """'table', 'view' or None for what ``name`` is in the current database and schema."""
    rows = con.execute(
        f"SELECT 'table' FROM duckdb_tables() WHERE table_name = ? AND {_HERE} "
        f"UNION ALL SELECT 'view' FROM duckdb_views() WHERE view_name = ? AND NOT internal AND {_HERE}",
        [name, name],
    ).fetchall()
    return rows[0][0] if rows else None


def view_sql(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    """The query of the view ``name`` of the current database and schema, or None (no such view, or a
    view with a column list)."""
    rows = con.execute(f"SELECT sql FROM duckdb_views() WHERE view_name = ? AND NOT internal AND {_HERE}", [name]).fetchall()
    match = _VIEW_SQL.match(rows[0][0] or "") if rows else None
    return match.group(1) if match else None


def loaded_table(con: duckdb.DuckDBPyConnection, name: str) -> pa.Table | None:
    """The rows of the table or view ``name`` as Arrow, read through a cursor of its own (a query
    running on the connection is no obstacle), or None when there is none of that name."""
    with con.cursor() as cursor:
        if relation_kind(cursor, name) is None:
            return None
        return cursor.sql(f"SELECT * FROM {quote_identifier(name)}").to_arrow_table()


def column_count(con: duckdb.DuckDBPyConnection, name: str) -> int:
    """How many columns the table or view ``name`` of the current database and schema has."""
    (count,), = con.execute(f"SELECT count(*) FROM duckdb_columns() WHERE table_name = ? AND {_HERE}", [name]).fetchall()
    return count


def replace_relation(
    con: duckdb.DuckDBPyConnection, name: str, query: str, parameters: dict | None = None, *, table: bool = False
) -> str:
    """Make ``name`` a view of ``query`` (lazy), or a table of its rows (``table=True``).

    A view cannot hold parameter values, so a parameterised query is always a table.
    Whatever ``name`` was before (view or table) is replaced. Returns what ``name`` is now.
    """
    kind = "table" if parameters or table else "view"
    existing = relation_kind(con, name)
    if existing and existing != kind:
        con.execute(f"DROP {existing.upper()} {quote_identifier(name)}").fetchall()
    statement = f"CREATE OR REPLACE {kind.upper()} {quote_identifier(name)} AS {query}"
    (con.execute(statement, parameters) if parameters else con.execute(statement)).fetchall()
    return kind


def table_from_arrow(con: duckdb.DuckDBPyConnection, name: str, arrow) -> None:
    """Make ``name`` a table holding an Arrow table's rows (whatever ``name`` was before)."""
    scratch = f"__rayudf_arrow_{name}"
    con.register(scratch, arrow)
    try:
        replace_relation(con, name, f"SELECT * FROM {quote_identifier(scratch)}", table=True)
    finally:
        con.unregister(scratch)


def yields_rows(description: list | None, query: str) -> bool:
    """Whether a statement's result is rows for the user rather than a status."""
    if description is None:
        return False
    if [d[0] for d in description] not in _STATUS_COLUMNS:
        return True
    statement_type = duckdb.extract_statements(query)[-1].type.name
    return statement_type in _ROW_STATEMENTS
