"""``${key}`` substitution of ``set`` variables, and the ``$name`` query parameters a text refers to.

Example:
    >>> substitute("select * from t where d = '${day}'", {"day": "2026-11-22"})
    "select * from t where d = '2026-11-22'"
    >>> substitute("${missing}", {})
    Traceback (most recent call last):
    ...
    sql_magics.errors.ExecutionError: unknown variable ${missing} (set it first: set missing = "...")
    >>> sorted(parameter_names("select $who, ${day}, $$x$$ from t where n = $n"))
    ['n', 'who']
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from sql_magics.errors import ExecutionError

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)\}")
# DuckDB's named parameter: `$` and a name, not part of a word, `${key}` or `$$ quoting $$`.
_PARAMETER = re.compile(r"(?<![\w$])\$([A-Za-z_]\w*)")


def substitute(text: str, variables: Mapping[str, str]) -> str:
    """Replace every ``${key}`` with its value; an unknown key is an error naming it."""

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key not in variables:
            raise ExecutionError(f"unknown variable ${{{key}}} (set it first: set {key} = \"...\")")
        return str(variables[key])

    return _REFERENCE.sub(value, text)


def substitute_options(options: Mapping[str, str], variables: Mapping[str, str]) -> dict[str, str]:
    """The same substitution applied to every option value."""
    return {key: substitute(value, variables) for key, value in options.items()}


def parameter_names(text: str) -> set[str]:
    """The names a text refers to as ``$name`` query parameters."""
    return set(_PARAMETER.findall(text))
