"""Errors of the statement language: parsing and executing scripts.

Both derive from :class:`udf_engine.errors.RayUDFError`; only the magics turn
them into IPython's ``UsageError`` and only the CLI into exit codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from udf_engine.errors import RayUDFError


@dataclass
class ParseError(RayUDFError):
    """A statement could not be parsed.

    ``line`` and ``col`` are 1-based; ``source_line`` is the text of that line.

    Example:
        >>> err = ParseError("expected 'as'", line=1, col=8, source_line="load x.`p`")
        >>> print(err.highlight())
        line 1, col 8: expected 'as'
          load x.`p`
                 ^
    """

    message: str
    line: int = 0
    col: int = 0
    source_line: str = ""
    source_name: str = ""

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        where = f"{self.source_name}: " if self.source_name else ""
        return f"{where}line {self.line}, col {self.col}: {self.message}"

    def highlight(self) -> str:
        """Render the error with the offending line and a caret under the column."""
        if not self.source_line:
            return str(self)
        caret = " " * (max(self.col, 1) - 1) + "^"
        return f"{self}\n  {self.source_line}\n  {caret}"


class ExecutionError(RayUDFError):
    """A parsed statement failed while running; the message names the script and line.

    Example:
        >>> print(ExecutionError("unknown table t", line=3, source="score.sql"))
        score.sql: line 3: unknown table t
    """

    def __init__(self, message: str, *, line: int = 0, source: str = "", statement: str = "") -> None:
        self.message = message
        self.line = line
        self.source = source
        self.statement = statement
        where = (f"{source}: " if source else "") + (f"line {line}: " if line else "")
        super().__init__(where + message)


_WRAPPED_UDF_ERROR = "Python exception occurred while executing the UDF:"
_ERROR_NAME = re.compile(r"^(\w+): ")


def _own_error_names() -> set[str]:
    """The class names of every project error (RayUDFError and its subclasses, however deep)."""
    names, todo = set(), [RayUDFError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def clean_duckdb_error(err: Exception) -> str:
    """DuckDB's message in one line, without the wrapper it puts around a Python UDF's exception.

    Example:
        >>> clean_duckdb_error(Exception("Invalid Input Error: Python exception occurred while executing the UDF: "
        ...                              "RowError: function f: the model raised ValueError: bad (row 3 of ...)"))
        'function f: the model raised ValueError: bad (row 3 of ...)'
    """
    text = str(err)
    if _WRAPPED_UDF_ERROR in text:
        text = text.split(_WRAPPED_UDF_ERROR, 1)[1].strip()
        name = _ERROR_NAME.match(text)
        if name and name.group(1) in _own_error_names():  # our errors say what went wrong; their class name adds nothing
            text = text[name.end() :]
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__
