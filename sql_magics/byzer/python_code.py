"""Running the Python code a script carries (registerCode, ScriptUDF code, Byzer-python code).

Example:
    >>> namespace = {}
    >>> run_code("x = 6 * 7", namespace, "code of f")
    >>> namespace["x"]
    42
    >>> run_code("1 / 0", {}, "code of f")
    Traceback (most recent call last):
    ...
    sql_magics.errors.ExecutionError: code of f failed: ZeroDivisionError: division by zero
"""

from __future__ import annotations

from sql_magics.errors import ExecutionError
from udf_engine.errors import RayUDFError, remote_cause


def run_code(code: str, namespace: dict, what: str) -> None:
    """``exec`` the code in ``namespace``; its errors become one line naming ``what`` failed."""
    try:
        exec(compile(code, f"<{what}>", "exec"), namespace)
    except RayUDFError:
        raise  # ours (UDFBuilder.build's, say): it names the function and what went wrong
    except Exception as err:  # noqa: BLE001 - the user's code may raise anything
        cause = remote_cause(err)
        raise ExecutionError(f"{what} failed: {type(cause).__name__}: {cause}") from None
