"""The ``!`` commands, in one table: ``!python conf|env``, ``!workers``, ``!models``, ``!delta``, ``!ray``, ``!plan``.

Each command is a function of the executor running it (a :class:`Context`: the session's
database, registry and script state) and of its words.

Example:
    >>> from sql_magics.executor import Executor
    >>> from sql_magics.tables.database import Database
    >>> from udf_engine import RayRuntime
    >>> db, state = Database(), ScriptState()
    >>> executor = Executor(db, FunctionRegistry(db, RayRuntime(), session_id="ab12", worker_env=state.python_env), state)
    >>> run_command(executor, "python", ["conf", "rayAddress=auto"])
    >>> state.python_conf
    {'rayAddress': 'auto'}
    >>> run_command(executor, "models", []).empty   # nothing registered yet
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import pandas as pd

from sql_magics.errors import ExecutionError
from sql_magics.models.registry import FunctionRegistry
from sql_magics.planner.plan import PLAN_COLUMNS
from sql_magics.state import ScriptState
from sql_magics.tables import lake
from sql_magics.tables.database import Database

WORKER_COLUMNS = [
    "function", "worker", "node", "gpu_ids", "batches", "scans", "rows", "mean_ms_per_batch", "errors", "replaced", "alive",
    "batch_running_s", "last_error",
]
MODEL_COLUMNS = ["function", "kind", "path", "version", "since", "workers", "batch_size", "returns", "nulled_rows"]
# Ray node ids are 56 hex digits; the first 12 tell the nodes of a cluster apart.
_NODE_ID_CHARS = 12


class Context(Protocol):
    """What a command works on: the executor running it."""

    db: Database
    registry: FunctionRegistry
    state: ScriptState

    def substituted(self, text: str) -> str:
        """Text with its ${key} variables substituted."""
        ...

    def as_duckdb(self, text: str) -> str:
        """Statement text as DuckDB SQL (substituted, translated from the script's dialect)."""
        ...

    def run_byzer_python(self, input_table: str, output: str, options: dict[str, str]) -> pd.DataFrame | None:
        """Byzer-python over a table, its output a table."""
        ...


def _key_value(args: list[str], usage: str) -> tuple[str, str]:
    if len(args) != 2 or "=" not in args[1]:
        raise ExecutionError(f"usage: {usage}")
    key, value = args[1].split("=", 1)
    if not key.strip():
        raise ExecutionError(f"usage: {usage}")
    return key.strip(), value


def python(context: Context, args: list[str]) -> None:
    """``!python conf "k=v"`` (reaches registerCode as ``context.conf``) or ``!python env "K=V"``."""
    sub = args[0].lower() if args else ""
    if sub == "conf":
        key, value = _key_value(args, '!python conf "key=value"')
        context.state.python_conf[key] = value
    elif sub == "env":
        key, value = _key_value(args, '!python env "NAME=value"')
        context.state.python_env[key] = value
    else:
        raise ExecutionError(f"!python {sub}: unknown sub-command (supported: conf, env)")


def workers_frame(context: Context, args: list[str]) -> pd.DataFrame:
    """``!workers``: one row per worker of every Ray-served function."""
    rows = []
    for name, registered in context.registry.functions.items():
        if registered.udf is None:
            continue
        for s in registered.udf.stats():
            mean_ms = 1000.0 * s["busy_s"] / s["batches"] if s["batches"] else 0.0
            rows.append({**s, "function": name, "mean_ms_per_batch": round(mean_ms, 3), "node": (s["node"] or "")[:_NODE_ID_CHARS]})
    return pd.DataFrame(rows, columns=WORKER_COLUMNS)


def models_frame(context: Context, args: list[str]) -> pd.DataFrame:
    """``!models``: one row per registered function."""
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
        for name, r in context.registry.functions.items()
    ]
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


def delta(context: Context, args: list[str]) -> pd.DataFrame:
    """``!delta show tables``, ``!delta info <table>``: the lake's tables and a table's history."""
    return lake.command(args, root=context.state.variables.get(lake.ROOT_VARIABLE))


def ray(context: Context, args: list[str]) -> pd.DataFrame | None:
    """Byzer's ``!ray on <table> '''code''' named <output>``: ``run`` in short."""
    if len(args) != 5 or args[0].lower() != "on" or args[3].lower() != "named":
        raise ExecutionError("!ray: expected !ray on <table> '''<code>''' named <output>")
    _, table, code, _, output = args
    return context.run_byzer_python(context.substituted(table), context.substituted(output), {"code": code})


def plan(context: Context, args: list[str]) -> pd.DataFrame:
    """``!plan '''<query>'''``: the path the query would take now (driver or workers), and why."""
    if len(args) != 1:
        raise ExecutionError("!plan: expected !plan '''<query>'''")
    db = context.db
    with db.exclusive():
        planned = db.planner.explain(db.con, context.as_duckdb(args[0]))
    return pd.DataFrame([planned], columns=PLAN_COLUMNS)


COMMANDS: dict[str, Callable[[Context, list[str]], pd.DataFrame | None]] = {
    "python": python,
    "workers": workers_frame,
    "models": models_frame,
    "delta": delta,
    "ray": ray,
    "plan": plan,
}


def run_command(context: Context, name: str, args: list[str]) -> pd.DataFrame | None:
    """Run ``!name args...``; a table for the commands that show one."""
    command = COMMANDS.get(name)
    if command is None:
        raise ExecutionError(f"!{name}: unknown command (supported: {', '.join('!' + c for c in COMMANDS)})")
    return command(context, args)
