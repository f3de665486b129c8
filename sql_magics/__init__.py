"""sql_magics: the user surface of rayudf (Session, statement language, magics, CLI).

Example:
    >>> from sql_magics import Session
    >>> with Session() as s:
    ...     s.sql("select 42 as answer from range(1)")["answer"].tolist()
    [42]
"""

from sql_magics.errors import ExecutionError, ParseError
from sql_magics.executor import ScriptResult
from sql_magics.models.registry import RegisteredFunction
from sql_magics.session import Session

__all__ = [
    "ExecutionError", "ParseError", "RegisteredFunction", "ScriptResult", "Session", "load_ipython_extension", "unload_ipython_extension",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext sql_magics``: register %sql / %%sql."""
    from sql_magics.front.magics import SqlMagic

    ipython.register_magics(SqlMagic)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext sql_magics``: stop the session's workers."""
    magic = ipython.magics_manager.registry.get("SqlMagic")
    if magic is not None:
        magic.close()
