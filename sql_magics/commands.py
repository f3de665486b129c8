"""The ``!`` commands: ``!python conf``, ``!python env``, ``!workers``, ``!models``, ``!delta`` (the lake).

Example:
    >>> from sql_magics.database import Database
    >>> from udf_engine import RayRuntime
    >>> state = ScriptState()
    >>> registry = FunctionRegistry(Database(), RayRuntime(), session_id="ab12", worker_env=state.python_env)
    >>> run_command("python", ["conf", "rayAddress=auto"], registry=registry, state=state)
    >>> state.python_conf
    {'rayAddress': 'auto'}
    >>> run_command("models", [], registry=registry, state=state).empty   # nothing registered yet
    True
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from sql_magics import lake
from sql_magics.errors import ExecutionError
from sql_magics.registry import FunctionRegistry
from sql_magics.script_state import ScriptState

WORKER_COLUMNS = [
    "function", "worker", "node", "gpu_ids", "batches", "scans", "rows", "mean_ms_per_batch", "errors", "replaced", "alive",
    "batch_running_s", "last_error",
]
MODEL_COLUMNS = ["function", "kind", "path", "version", "since", "workers", "batch_size", "returns", "nulled_rows"]
# Ray node ids are 56 hex digits; the first 12 tell the nodes of a cluster apart.
_NODE_ID_CHARS = 12


def _key_value(args: list[str], usage: str) -> tuple[str, str]:
    if len(args) != 2 or "=" not in args[1]:
        raise ExecutionError(f"usage: {usage}")
    key, value = args[1].split("=", 1)
    if not key.strip():
        raise ExecutionError(f"usage: {usage}")
    return key.strip(), value


def python(state: ScriptState, args: list[str]) -> None:
    """``!python conf "k=v"`` (reaches registerCode as ``context.conf``) or ``!python env "K=V"``."""
    sub = args[0].lower() if args else ""
    if sub == "conf":
        key, value = _key_value(args, '!python conf "key=value"')
        state.python_conf[key] = value
    elif sub == "env":
        key, value = _key_value(args, '!python env "NAME=value"')
        state.python_env[key] = value
    else:
        raise ExecutionError(f"!python {sub}: unknown sub-command (supported: conf, env)")


def workers_frame(registry: FunctionRegistry) -> pd.DataFrame:
    """One row per worker of every Ray-served function."""
    rows = []
    for name, registered in registry.functions.items():
        if registered.udf is None:
            continue
        for s in registered.udf.stats():
            mean_ms = 1000.0 * s["busy_s"] / s["batches"] if s["batches"] else 0.0
            rows.append({**s, "function": name, "mean_ms_per_batch": round(mean_ms, 3), "node": (s["node"] or "")[:_NODE_ID_CHARS]})
    return pd.DataFrame(rows, columns=WORKER_COLUMNS)


def models_frame(registry: FunctionRegistry) -> pd.DataFrame:
    """One row per registered function."""
    rows = [
        {
            "function": name,
            "kind": r.kind,
            "path": r.path,
            "version": r.version,
            "since": r.since,
            "workers": r.udf.conf.workers if r.udf else 0,
            "batch_size": r.udf.conf.batch_size if r.udf else None,
            "returns": r.returns,
            "nulled_rows": r.model_function.nulled.value if r.model_function else 0,
        }
        for name, r in registry.functions.items()
    ]
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


_COMMANDS: dict[str, Callable[[FunctionRegistry, ScriptState, list[str]], pd.DataFrame | None]] = {
    "python": lambda registry, state, args: python(state, args),
    "workers": lambda registry, state, args: workers_frame(registry),
    "models": lambda registry, state, args: models_frame(registry),
    "delta": lambda registry, state, args: lake.command(args, root=state.variables.get(lake.ROOT_VARIABLE)),
}
# Commands the executor runs itself: `!ray` runs code on a table, `!plan` plans a query on the session's database.
EXECUTOR_COMMANDS = ("ray", "plan")
COMMANDS = (*_COMMANDS, *EXECUTOR_COMMANDS)


def run_command(name: str, args: list[str], *, registry: FunctionRegistry, state: ScriptState) -> pd.DataFrame | None:
    """Run ``!name args...``; a table for ``!workers``, ``!models`` and ``!delta``."""
    command = _COMMANDS.get(name)
    if command is None:
        raise ExecutionError(f"!{name}: unknown command (supported: {', '.join('!' + c for c in COMMANDS)})")
    return command(registry, state, args)
