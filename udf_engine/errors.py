"""The project's errors: one root class, one subclass per stage.

Every error a user can cause derives from :class:`RayUDFError`, so a caller
(the CLI, the magics) can tell a user mistake from a bug with one ``except``.

Example:
    >>> try:
    ...     raise ModelError("model 'digits': file not found: models/x.keras")
    ... except RayUDFError as err:
    ...     print(err)
    model 'digits': file not found: models/x.keras
"""

from __future__ import annotations


class RayUDFError(Exception):
    """Root of every error rayudf raises on purpose."""


class ConfigError(RayUDFError, ValueError):
    """An option has a bad name or value (``workers="two"``)."""


class ModelError(RayUDFError):
    """A model is missing, corrupt (sha256) or fails to load or run."""


class RowError(ModelError):
    """The model raised on one row: ``row`` is its index among the ``rows`` scored together.

    Example:
        >>> print(RowError("function f: the model raised ValueError: bad", row=2, rows=10, values="[-1.0]"))
        function f: the model raised ValueError: bad (row 3 of the 10 rows of this call: [-1.0])
    """

    def __init__(self, message: str, *, row: int, rows: int, values: str) -> None:
        self.message, self.row, self.rows, self.values = message, row, rows, values
        super().__init__(f"{message} (row {row + 1} of the {rows} rows of this call: {values})")

    def at(self, row: int, rows: int) -> RowError:
        """The same error, placed at ``row`` of ``rows`` (the call's rows before some were set aside)."""
        return RowError(self.message, row=row, rows=rows, values=self.values)


class WorkerError(RayUDFError):
    """A UDF worker died, or could not be started, beyond what a retry can fix."""


class BatchTimeoutError(WorkerError):
    """A batch ran longer than ``batch_timeout_s``; its worker was stopped and is replaced."""


class ResourceError(WorkerError):
    """The cluster has not the free resources a UDF's workers ask for, and will not get them."""


class UnsafePathError(ModelError):
    """A name taken from data (a model table's row, a tar entry) would lead outside its destination."""


class InputError(RayUDFError):
    """Rows handed to a model function do not fit it (wrong length, wrong type)."""


def remote_cause(err: BaseException) -> BaseException:
    """The exception that user code raised inside a Ray task or actor call, else ``err`` itself.

    Ray wraps it in a ``RayTaskError`` whose ``cause`` is the original exception.

    Example:
        >>> remote_cause(ValueError("bad row"))
        ValueError('bad row')
    """
    return getattr(err, "cause", None) or err
