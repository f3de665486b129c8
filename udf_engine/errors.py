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


class RayUDFError(Exception):
    """Root of every error rayudf raises on purpose."""


class ConfigError(RayUDFError, ValueError):
    """An option has a bad name or value (``workers="two"``)."""


class ModelError(RayUDFError):
    """A model is missing, corrupt (sha256) or fails to load or run."""


class WorkerError(RayUDFError):
    """A UDF worker died, or could not be started, beyond what a retry can fix."""


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
