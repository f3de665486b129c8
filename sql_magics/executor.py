"""Runs parsed statements: one handler per statement kind.

The executor works on three things it is given: the :class:`Database` that runs SQL, the
:class:`FunctionRegistry` that registers models, and the :class:`ScriptState` that
statements leave for the ones after them. Every error leaves here as an ExecutionError
naming the script and the statement's line; nothing runs before the whole script has parsed.

Example:
    >>> from udf_engine import RayRuntime
    >>> db = Database()
    >>> state = ScriptState()
    >>> executor = Executor(db, FunctionRegistry(db, RayRuntime(), session_id="ab12", worker_env=state.python_env), state)
    >>> script = parse('set n = "3"; select range as i from range(${n}) as output;')
    >>> executor.run(script, base_dir=Path(".")).frame["i"].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from arrow_bridge.quoting import quote_identifier
from sql_magics import formats, registration
from sql_magics.catalog import column_count, replace_relation
from sql_magics.commands import run_command
from sql_magics.database import Database
from sql_magics.dialect import check_dialect, to_duckdb
from sql_magics.errors import ExecutionError, ParseError, clean_duckdb_error
from sql_magics.parser import parse
from sql_magics.registry import FunctionRegistry
from sql_magics.script_state import ScriptState
from sql_magics.statements import Command, Include, Load, Register, Save, Select, Set, Sql, Statement, Unregister
from sql_magics.variables import parameter_names, substitute, substitute_options
from udf_engine.errors import RayUDFError

SET_TYPES = ("text", "sql", "shell")
# Statements that run SQL on the session's connection: they take turns with other threads'
# statements, and each runs on the model versions current when it starts. The others
# (commands, register, include's own statements) take the connection only if they need it.
_RUNS_SQL = ("load", "select", "save", "set", "sql")
# Byzer statements that run Spark ML algorithms; there is no Spark here.
UNSUPPORTED_BYZER = ("train", "run", "predict")
# The table a named select shows its rows under (MLSQL's convention).
OUTPUT_TABLE = "output"
# How much of a failed `set ... where type="shell"` command's stderr the error quotes:
# enough for its message, not a whole usage text.
_SHELL_ERROR_CHARS = 200


@dataclass
class ScriptResult:
    """What a script gives back: the rows of its last statement that yields rows, a line to
    show when it yields none (what its last statement made, and how to see it), and
    warnings to show in any case (rows a model function left NULL)."""

    frame: pd.DataFrame | None
    notice: str | None = None
    warnings: list[str] = field(default_factory=list)


class Executor:
    """Executes one script (and the files it includes)."""

    def __init__(
        self, db: Database, registry: FunctionRegistry, state: ScriptState, *, parameters: dict | None = None
    ) -> None:
        self.db = db
        self.registry = registry
        self.state = state
        self.parameters = parameters or {}  # values for $name query parameters
        self._including: list[Path] = []  # include stack, to refuse cycles
        self._notice: str | None = None  # what the statement that ran last says when it yields no rows
        self._warnings: list[str] = []  # for the whole script, included files too

    def run(self, statements: list[Statement], *, base_dir: Path, source_name: str = "") -> ScriptResult:
        """Run statements in order."""
        frame = None
        for statement in statements:
            self._notice = None
            nulled_before = self._nulled()
            try:
                with self._turn(statement):
                    result = _HANDLERS[statement.kind](self, statement, base_dir=base_dir)
            except (ParseError, ExecutionError) as err:
                if isinstance(err, ParseError) or err.line:
                    raise  # already placed (an included file's statement)
                raise ExecutionError(str(err), line=statement.line, source=source_name) from None
            except RayUDFError as err:
                raise ExecutionError(str(err), line=statement.line, source=source_name) from None
            except duckdb.Error as err:
                raise ExecutionError(clean_duckdb_error(err), line=statement.line, source=source_name) from None
            finally:
                if statement.kind != "include":  # the included statements warned for themselves
                    self._warn_nulled(nulled_before, statement, source_name)
            if result is not None:
                frame = result
        return ScriptResult(frame, None if frame is not None else self._notice, self._warnings)

    def assign(self, key: str, value: str) -> None:
        """``set key = value``: a ${key} variable, or a setting (sql.dialect, ray.address, DuckDB's own)."""
        state = self.state
        if key in state.pinned:
            return
        if key == "sql.dialect":
            state.dialect = check_dialect(value)
        elif key == "ray.address":
            self.registry.runtime.address = value
        elif self.db.is_setting(key):
            self.db.set_setting(key, value)
        state.variables[key] = value

    # -- helpers ---------------------------------------------------------------------

    @contextmanager
    def _turn(self, statement: Statement) -> Iterator[None]:
        """For a statement that runs SQL: the connection to itself, and the model versions pinned."""
        if statement.kind not in _RUNS_SQL:
            yield
            return
        with self.db.exclusive(), self.registry.statement():
            yield

    def _nulled(self) -> dict[str, int]:
        """Rows each model function has left NULL so far."""
        return {name: f.model_function.nulled.value for name, f in self.registry.functions.items() if f.model_function}

    def _warn_nulled(self, before: dict[str, int], statement: Statement, source_name: str) -> None:
        where = (f"{source_name}: " if source_name else "") + f"line {statement.line}"
        for name, fn in self.registry.functions.items():
            rows = fn.model_function.nulled.value - before.get(name, 0) if fn.model_function else 0
            if rows > 0:
                plural = "" if rows == 1 else "s"
                self._warnings.append(f'{where}: {rows:,} row{plural} NULL (on_error="null"): {fn.model_function.null_reason}')

    def _substitute(self, text: str) -> str:
        return substitute(text, self.state.variables)

    def _to_duckdb(self, text: str) -> str:
        """Statement text as DuckDB SQL: ${key} substituted, translated from the script's dialect."""
        return to_duckdb(self._substitute(text), self.state.dialect)

    def _bound(self, query: str) -> dict | None:
        """The parameters a query refers to as $name (None when it refers to none)."""
        wanted = parameter_names(query)
        return {name: value for name, value in self.parameters.items() if name in wanted} or None

    def _frame(self, query: str) -> pd.DataFrame | None:
        return self.db.query(query, self._bound(query))

    # -- one handler per statement kind ------------------------------------------------

    def load(self, stmt: Load, **_: object) -> None:
        path, options = self._substitute(stmt.path), substitute_options(stmt.options, self.state.variables)
        fmt = stmt.format.lower()
        con = self.db.con
        if fmt == "jsonstr":
            self._load_json_lines(stmt.table, path)
        elif fmt in formats.TABLE_FORMATS:
            replace_relation(con, stmt.table, f"SELECT * FROM {quote_identifier(path)}")
        else:
            replace_relation(con, stmt.table, f"SELECT * FROM {formats.reader_sql(fmt, path, options)}")

    def _load_json_lines(self, table: str, variable: str) -> None:
        import pyarrow.json as pajson

        if variable not in self.state.variables:
            raise ExecutionError(f"load jsonStr: no variable named {variable!r} (set {variable} = '''...''' first)")
        text = self.state.variables[variable].strip()
        try:
            arrow = pajson.read_json(io.BytesIO(text.encode()))
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for bad JSON
            raise ExecutionError(f"load jsonStr: variable {variable} is not JSON lines: {err}") from None
        con = self.db.con
        scratch = f"__rayudf_json_{table}"
        con.register(scratch, arrow)
        try:
            replace_relation(con, table, f"SELECT * FROM {quote_identifier(scratch)}", table=True)
        finally:
            con.unregister(scratch)

    def select(self, stmt: Select, **_: object) -> pd.DataFrame | None:
        query = self._to_duckdb(stmt.sql)
        kind = replace_relation(self.db.con, stmt.table, query, self._bound(query))
        if stmt.table == OUTPUT_TABLE:
            return self._frame(f"SELECT * FROM {quote_identifier(stmt.table)}")
        columns = column_count(self.db.con, stmt.table)
        self._notice = (
            f"{kind} {stmt.table} created: {columns} column{'' if columns == 1 else 's'}; "
            f"end with 'as {OUTPUT_TABLE}' to see rows"
        )
        return None

    def save(self, stmt: Save, **_: object) -> None:
        path, options = self._substitute(stmt.path), substitute_options(stmt.options, self.state.variables)
        fmt = stmt.format.lower()
        if fmt in formats.TABLE_FORMATS:
            formats.save_table(self.db.con, stmt.table, path, stmt.mode)
        else:
            formats.save_file(self.db.con, stmt.table, fmt, path, stmt.mode, options, stmt.partition_by)

    def register(self, stmt: Register, **_: object) -> None:
        path, options = self._substitute(stmt.path), substitute_options(stmt.options, self.state.variables)
        registration.register(self.registry, self.state, stmt.model_kind, path, stmt.function, options)

    def unregister(self, stmt: Unregister, **_: object) -> None:
        self.registry.unregister(stmt.function)

    def set(self, stmt: Set, **_: object) -> None:
        value = self._substitute(stmt.value)
        kind = stmt.options.get("type", "text").lower()
        if kind == "sql":
            rows = self.db.con.execute(to_duckdb(value, self.state.dialect)).fetchall()
            value = "" if not rows else str(rows[0][0])
        elif kind == "shell":
            done = subprocess.run(value, shell=True, capture_output=True, text=True)
            if done.returncode != 0:
                stderr = done.stderr.strip()[:_SHELL_ERROR_CHARS]
                raise ExecutionError(f"set {stmt.key}: shell command exited {done.returncode}: {stderr}")
            value = done.stdout.strip()
        elif kind != "text":
            raise ExecutionError(f"set {stmt.key}: type {kind!r} is not supported (supported: {', '.join(SET_TYPES)})")
        self.assign(stmt.key, value)

    def command(self, stmt: Command, **_: object) -> pd.DataFrame | None:
        return run_command(stmt.name, stmt.args, registry=self.registry, state=self.state)

    def include(self, stmt: Include, *, base_dir: Path, **_: object) -> pd.DataFrame | None:
        if stmt.format.lower() != "local":
            raise ExecutionError(f"include: format {stmt.format!r} is not supported (only local)")
        path = (base_dir / self._substitute(stmt.path)).resolve()
        if path in self._including:
            raise ExecutionError(f"include: {path} includes itself")
        try:
            text = path.read_text()
        except OSError as err:
            raise ExecutionError(f"include: cannot read {path}: {err.strerror}") from None
        self._including.append(path)
        try:
            included = self.run(parse(text, source_name=str(path)), base_dir=path.parent, source_name=str(path))
        finally:
            self._including.pop()
        self._notice = included.notice  # what the included script's last statement said
        return included.frame

    def sql(self, stmt: Sql, **_: object) -> pd.DataFrame | None:
        first = stmt.text.split(None, 1)[0].lower() if stmt.text.strip() else ""
        if first in UNSUPPORTED_BYZER:
            raise ExecutionError(
                f"{first}: Byzer's {'/'.join(UNSUPPORTED_BYZER)} statements need Spark ML and are not supported; "
                "train the model in Python and register it (register keras|sklearn|Ray ...)"
            )
        return self._frame(self._to_duckdb(stmt.text))


_HANDLERS: dict[str, Callable[..., pd.DataFrame | None]] = {
    "load": Executor.load,
    "select": Executor.select,
    "save": Executor.save,
    "register": Executor.register,
    "unregister": Executor.unregister,
    "set": Executor.set,
    "command": Executor.command,
    "include": Executor.include,
    "sql": Executor.sql,
}
