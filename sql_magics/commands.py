"""The ``!`` commands, in one table: ``!python conf|env``, ``!workers``, ``!models``, ``!delta``, ``!ray``, ``!plan``,
``!serve``, ``!streams``, ``!kill stream``, ``!show progress/<stream>``.

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
from sql_magics.serving.options import SERVE_OPTIONS
from sql_magics.serving.server import Serving
from sql_magics.state import ScriptState
from sql_magics.streaming.streams import Streams
from sql_magics.tables import lake
from sql_magics.tables.database import Database

WORKER_COLUMNS = [
    "function", "version", "worker", "node", "gpu_ids", "device", "batches", "scans", "rows", "mean_ms_per_batch", "errors", "replaced",
    "alive", "batch_running_s", "most_held", "bounced", "truncated", "generated_tokens", "occupancy", "last_error",
]
MODEL_COLUMNS = ["function", "kind", "path", "version", "since", "workers", "batch_size", "returns", "model", "nulled_rows", "traffic"]
# Ray node ids are 56 hex digits; the first 12 tell the nodes of a cluster apart.
_NODE_ID_CHARS = 12


class Context(Protocol):
    """What a command works on: the executor running it."""

    db: Database
    registry: FunctionRegistry
    state: ScriptState
    serving: Serving | None
    streams: Streams

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
    """``!workers``: one row per worker of every version of every Ray-served function."""
    rows = []
    for name, fn in context.registry.model_functions().items():
        for version, _ in fn.live_versions():
            for s in version.udf.stats():
                mean_ms = 1000.0 * s["busy_s"] / s["batches"] if s["batches"] else 0.0
                node = (s["node"] or "")[:_NODE_ID_CHARS]
                rows.append({**s, "function": name, "version": version.label, "mean_ms_per_batch": round(mean_ms, 3), "node": node})
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
            "model": described(r.udf.info.get("model") or {}) if r.udf else "",
            "nulled_rows": r.model_function.nulled.value if r.model_function else 0,
            "traffic": traffic(r.model_function.live_versions()) if r.model_function else "",
        }
        for name, r in context.registry.functions.items()
    ]
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


def described(loaded: dict) -> str:
    """What a model's loader recorded, in one line (a text model's task says where it was read).

    Example:
        >>> described({"task": "text-classification", "task_from": "config.json: BertForSequenceClassification", "device": "cpu"})
        'task=text-classification (config.json: BertForSequenceClassification), device=cpu'
    """
    shown = {k: v for k, v in loaded.items() if k != "task_from"}
    if "task_from" in loaded and "task" in shown:
        shown["task"] = f"{shown['task']} ({loaded['task_from']})"
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def traffic(versions: list) -> str:
    """How the answers split between a function's versions: ``1=0.9, 2=0.1`` (``2=1`` for one version).

    Example:
        >>> from types import SimpleNamespace as V
        >>> traffic([(V(label="1"), 0.9), (V(label="2"), 0.1)])
        '1=0.9, 2=0.1'
    """
    return ", ".join(f"{version.label}={share:g}" for version, share in versions)


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


SERVE_COLUMNS = ["url", "functions", "warning"]


def serve(context: Context, args: list[str]) -> pd.DataFrame | None:
    """``!serve [key=value ...]`` (the options of SERVE_OPTIONS: ``!serve port=8001 allow_scripts=true``):
    answer HTTP for the session's functions in the background; ``!serve status`` says where, and warns
    of a change the replicas have not confirmed; ``!serve stop`` stops it (the requests in flight finish)."""
    serving = context.serving
    if serving is None:
        raise ExecutionError("!serve: this executor has no server to start (run it in a Session)")
    word = args[0].lower() if len(args) == 1 else ""
    if word == "stop":
        serving.stop()
        return None
    if word != "status":
        serving.start(_serve_options(args))
    handle = serving.handle
    rows = [{"url": handle.url, "functions": ", ".join(handle.functions), "warning": serving.warning}] if handle else []
    return pd.DataFrame(rows, columns=SERVE_COLUMNS)


def _serve_options(args: list[str]) -> dict[str, str]:
    """The ``key=value`` words of ``!serve``, as given: the server reads them by SERVE_OPTIONS."""
    options: dict[str, str] = {}
    for word in args:
        key, eq, value = word.partition("=")
        if not eq or not key:
            keys = ", ".join(option.name for option in SERVE_OPTIONS)
            raise ExecutionError(f"!serve: expected key=value with a key of {keys}, or stop or status; got {word!r}")
        options[key] = value
    return options


def streams(context: Context, args: list[str]) -> pd.DataFrame:
    """``!streams``: the session's streams, running or not (name, state, batches, rows, rows/s, input lag, last error)."""
    if args:
        raise ExecutionError("!streams: takes no arguments (!show progress/<name> shows one stream)")
    return context.streams.frame()


def kill(context: Context, args: list[str]) -> pd.DataFrame:
    """``!kill stream <name>``: stop a stream after its batch in progress commits; its row of ``!streams``, stopped."""
    if len(args) != 2 or args[0].lower() != "stream":
        raise ExecutionError("!kill: expected !kill stream <name>")
    name = context.substituted(args[1])
    context.streams.kill(name)
    return context.streams.frame([name])


def show(context: Context, args: list[str]) -> pd.DataFrame:
    """Byzer's ``!show progress/<name>``: one stream's row of ``!streams``."""
    word = args[0] if len(args) == 1 else ""
    kind, _, name = word.partition("/")
    if kind.lower() != "progress" or not name:
        raise ExecutionError("!show: only !show progress/<stream name> is supported here (!streams lists the streams)")
    context.streams.get(name)
    return context.streams.frame([name])


COMMANDS: dict[str, Callable[[Context, list[str]], pd.DataFrame | None]] = {
    "python": python,
    "workers": workers_frame,
    "models": models_frame,
    "delta": delta,
    "ray": ray,
    "plan": plan,
    "serve": serve,
    "streams": streams,
    "kill": kill,
    "show": show,
}


def run_command(context: Context, name: str, args: list[str]) -> pd.DataFrame | None:
    """Run ``!name args...``; a table for the commands that show one."""
    command = COMMANDS.get(name)
    if command is None:
        raise ExecutionError(f"!{name}: unknown command (supported: {', '.join('!' + c for c in COMMANDS)})")
    return command(context, args)
