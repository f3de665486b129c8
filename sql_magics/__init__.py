"""sql_magics: the user surface of rayudf (Session, statement language, magics, CLI).

Example:
    >>> from sql_magics import Session
    >>> with Session() as s:
    ...     s.sql("select 42 as answer")["answer"][0]
    np.int32(42)
"""

from sql_magics.errors import ExecutionError, ParseError
from sql_magics.session import RegisteredFunction, Session

__all__ = ["ExecutionError", "ParseError", "RegisteredFunction", "Session"]
