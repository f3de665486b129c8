"""sql_magics: the user surface of rayudf (Session, statement language, magics, CLI).

Example:
    >>> from sql_magics import Session
    >>> with Session() as s:
    ...     s.sql("select 42 as answer")["answer"][0]
    np.int32(42)
"""

from sql_magics.errors import ExecutionError, ParseError
from sql_magics.session import RegisteredFunction, Session

__all__ = ["ExecutionError", "ParseError", "RegisteredFunction", "Session", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython):  # noqa: ANN001 - IPython's hook
    """``%load_ext sql_magics``: register %sql / %%sql."""
    from sql_magics.magics import SqlMagic

    ipython.register_magics(SqlMagic)


def unload_ipython_extension(ipython):  # noqa: ANN001 - IPython's hook
    """``%unload_ext sql_magics``: stop the session's workers."""
    magic = ipython.magics_manager.registry.get("SqlMagic")
    if magic is not None:
        magic.close()
