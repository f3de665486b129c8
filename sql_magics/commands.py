"""The ``!`` commands: ``!python conf``, ``!python env``, ``!workers``, ``!models``.

Example:
    >>> session.sql('!python conf "rayAddress=auto"; !workers;')   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pandas as pd

from sql_magics.errors import ExecutionError

if TYPE_CHECKING:
    from sql_magics.session import Session

WORKER_COLUMNS = ["function", "worker", "node", "gpu_ids", "batches", "rows", "mean_ms_per_batch", "errors", "replaced", "alive"]
MODEL_COLUMNS = ["function", "kind", "path", "version", "workers", "batch_size", "returns"]


def _key_value(args: list[str], usage: str) -> tuple[str, str]:
    if len(args) != 2 or "=" not in args[1]:
        raise ExecutionError(f"usage: {usage}")
    key, value = args[1].split("=", 1)
    if not key.strip():
        raise ExecutionError(f"usage: {usage}")
    return key.strip(), value


def python(session: "Session", args: list[str]) -> None:
    """``!python conf "k=v"`` (reaches registerCode as ``context.conf``) or ``!python env "K=V"``."""
    sub = args[0].lower() if args else ""
    if sub == "conf":
        key, value = _key_value(args, '!python conf "key=value"')
        session.python_conf[key] = value
    elif sub == "env":
        key, value = _key_value(args, '!python env "NAME=value"')
        session.python_env[key] = value
    else:
        raise ExecutionError(f"!python {sub}: unknown sub-command (supported: conf, env)")


def workers_frame(session: "Session") -> pd.DataFrame:
    """One row per worker of every Ray-served function."""
    rows = []
    for name, registered in session.functions.items():
        if registered.udf is None:
            continue
        for s in registered.udf.stats():
            mean_ms = 1000.0 * s["busy_s"] / s["batches"] if s["batches"] else 0.0
            rows.append({**s, "function": name, "mean_ms_per_batch": round(mean_ms, 3), "node": (s["node"] or "")[:12]})
    return pd.DataFrame(rows, columns=WORKER_COLUMNS)


def models_frame(session: "Session") -> pd.DataFrame:
    """One row per registered function."""
    rows = [
        {
            "function": name,
            "kind": r.kind,
            "path": r.path,
            "version": r.version,
            "workers": r.udf.conf.workers if r.udf else 0,
            "batch_size": r.udf.conf.batch_size if r.udf else None,
            "returns": r.returns,
        }
        for name, r in session.functions.items()
    ]
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


_COMMANDS: dict[str, Callable[["Session", list[str]], pd.DataFrame | None]] = {
    "python": python,
    "workers": lambda session, args: workers_frame(session),
    "models": lambda session, args: models_frame(session),
}
COMMANDS = tuple(_COMMANDS)


def run_command(session: "Session", name: str, args: list[str]) -> pd.DataFrame | None:
    """Run ``!name args...``; a table for ``!workers`` and ``!models``."""
    command = _COMMANDS.get(name)
    if command is None:
        raise ExecutionError(f"!{name}: unknown command (supported: {', '.join('!' + c for c in COMMANDS)})")
    return command(session, args)
