"""Spark SQL -> DuckDB SQL with sqlglot, for scripts written for Byzer/Spark.

Example:
    >>> to_duckdb("select cast(x as array<double>) as y, array(z) from t", "spark")
    'SELECT TRY_CAST(x AS DOUBLE[]) AS y, [z] FROM t'
    >>> to_duckdb("select 1", "duckdb")
    'select 1'
"""

from __future__ import annotations

from sql_magics.errors import ExecutionError

DIALECTS = ("duckdb", "spark")


def check_dialect(dialect: str) -> str:
    """The dialect name in lower case, or an error naming the supported ones."""
    name = dialect.lower()
    if name not in DIALECTS:
        raise ExecutionError(f"unknown sql.dialect {dialect!r} (supported: {', '.join(DIALECTS)})")
    return name


def to_duckdb(sql: str, dialect: str) -> str:
    """Translate ``sql`` written in ``dialect`` to DuckDB SQL (unchanged for duckdb)."""
    if dialect == "duckdb":
        return sql
    import sqlglot
    from sqlglot.errors import ParseError as SqlglotParseError

    try:
        statements = sqlglot.transpile(sql, read=dialect, write="duckdb")
    except SqlglotParseError as err:
        raise ExecutionError(f"cannot read this as {dialect} SQL: {str(err).splitlines()[0]}") from None
    return ";\n".join(statements)
