"""Quoting names and values into DuckDB SQL text.

Example:
    >>> print(quote_identifier('a"b'), quote_literal("it's"))
    "a""b" 'it''s'
"""

from __future__ import annotations


def quote_identifier(name: str) -> str:
    """A SQL identifier, quoted (a double quote inside is doubled)."""
    return '"' + str(name).replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A SQL string literal (a single quote inside is doubled)."""
    return "'" + str(value).replace("'", "''") + "'"
