"""Runs parsed statements: one handler per statement kind.

The executor works on three things it is given: the :class:`Database` that runs SQL, the
:class:`FunctionRegistry` that registers models, and the :class:`ScriptState` that
statements leave for the ones after them. Every error leaves here as an ExecutionError
naming the script and the statement's line; nothing runs before the whole script has parsed.
The modes in :data:`MODES` plug in: each is asked whether it claims a statement before the
statement's batch handler runs it (a stream script's load, selects and save are the streaming
mode's), so the handlers here are batch only.

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
from typing import Protocol

import duckdb
import pandas as pd

from arrow_bridge.quoting import quote_identifier
from sql_magics.byzer.run_python import STATEMENT_OPTIONS, run_python
from sql_magics.commands import run_command
from sql_magics.errors import ExecutionError, ParseError, clean_duckdb_error
from sql_magics.language import statements
from sql_magics.language.dialect import check_dialect, to_duckdb
from sql_magics.language.parser import parse
from sql_magics.language.variables import parameter_names, substitute, substitute_options
from sql_magics.models import kinds
from sql_magics.models.registry import FunctionRegistry
from sql_magics.serving.server import Serving
from sql_magics.state import RAY_ADDRESS, WARM, WORKER_SCAN, WORKER_SCAN_VALUES, ScriptState, warm_framework
from sql_magics.streaming.mode import StreamMode
from sql_magics.streaming.streams import Streams
from sql_magics.tables import formats, lake
from sql_magics.tables.catalog import column_count, replace_relation, table_from_arrow
from sql_magics.tables.database import Database
from udf_engine import durable
from udf_engine.errors import RayUDFError

# Byzer's `set` types: "conf" is a setting (assigned like text: DuckDB's settings apply), and
# "defaultParam" a value used only when the variable has none yet (from `rayudf run --set`, say).
SET_TYPES = ("text", "sql", "shell", "conf", "defaultParam")
_SET_TYPE_NAMES = {t.lower(): t for t in SET_TYPES}  # as scripts may write them
# Statements that run SQL on the session's connection: they take turns with other threads'
# statements, and each runs on the model versions current when it starts. The others
# (commands, register, include's own statements) take the connection only if they need it.
_RUNS_SQL = ("load", "select", "save", "set", "sql")
# `include` formats that name a script file (Byzer's `project` is a path in the project).
_INCLUDE_FORMATS = ("local", "project")
# Suffixes Byzer's `include local.`<lib>.dir.file.<suffix>`` may name; `mlsql` when none is.
_LIB_SUFFIXES = ("mlsql", "byzer", "byz", "by")
# Byzer statements that run Spark ML algorithms; there is no Spark here.
UNSUPPORTED_BYZER = ("train", "predict")
# Byzer's `run t as TableRepartition.`` where partitionNum="4" as t2`: here a view of the same rows.
REPARTITION_ET = "TableRepartition"
# How much of a failed `set ... where type="shell"` command's stderr the error quotes:
# enough for its message, not a whole usage text.
_SHELL_ERROR_CHARS = 200


class Mode(Protocol):
    """A way of running statements beside batch (streaming), built per executor with the executor as its context."""

    def claims(self, statement: statements.Statement) -> bool:
        """Whether the mode runs ``statement`` (instead of its batch handler)."""
        ...

    def run(self, statement: statements.Statement) -> str | None:
        """Run a statement the mode claims; the line it says (it yields no rows)."""
        ...

    def assigned(self, key: str, value: str) -> None:
        """A variable the script set (``set streamName`` makes a stream script)."""
        ...

    def finished(self) -> list[str]:
        """Warnings at the end of a script (a stream nothing started)."""
        ...


# The modes that plug into the executor, asked in this order whether they claim a statement.
MODES: tuple[Callable[[Executor], Mode], ...] = (StreamMode,)


@dataclass
class ScriptResult:
    """What a script gives back: the rows of its last statement that yields rows, a line to
    show when it yields none (what its last statement made, and how to see it), and
    warnings to show in any case (rows a model function left NULL)."""

    frame: pd.DataFrame | None
    notice: str | None = None
    warnings: list[str] = field(default_factory=list)
    made: str | None = None  # the table or view the last statement made (a named select, a run), if it made one


class Executor:
    """Executes one script (and the files it includes)."""

    def __init__(
        self, db: Database, registry: FunctionRegistry, state: ScriptState, *, parameters: dict | None = None,
        serving: Serving | None = None, streams: Streams | None = None, echo: Callable[[str], None] = print,
    ) -> None:
        self.db = db
        self.registry = registry
        self.state = state
        self.serving = serving  # the session's HTTP server (!serve), when it has one
        self.streams = streams if streams is not None else Streams()  # the session's streams (!streams)
        self.echo = echo  # where a stream's progress lines and console sink print
        self.parameters = parameters or {}  # values for $name query parameters
        self._including: list[Path] = []  # include stack, to refuse cycles
        self._notice: str | None = None  # what the statement that ran last says when it yields no rows
        self._made: str | None = None  # the relation the statement that ran last made
        self._warnings: list[str] = []  # for the whole script, included files too
        self.modes: list[Mode] = [mode(self) for mode in MODES]  # this script's, asked before each statement

    def run(self, script: list[statements.Statement], *, base_dir: Path, source_name: str = "") -> ScriptResult:
        """Run a script's statements in order; the workers of its later ``register`` statements start meanwhile."""
        self._prepare(script)
        frame = None
        for statement in script:
            self._notice = self._made = None
            nulled_before = self._nulled()
            try:
                with self._turn(statement):
                    result = self._execute(statement, base_dir)
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
        if not self._including:
            for mode in self.modes:
                self._warnings += mode.finished()
        return ScriptResult(frame, None if frame is not None else self._notice, self._warnings, self._made)

    def assign(self, key: str, value: str) -> None:
        """``set key = value``: a ${key} variable, or a setting (sql.dialect, ray.address, warm, DuckDB's own)."""
        state = self.state
        if key in state.pinned:
            return
        if key == "sql.dialect":
            state.dialect = check_dialect(value)
        elif key == RAY_ADDRESS:
            self.registry.runtime.retarget(value)
        elif key == WARM:
            self.registry.spares.warm(warm_framework(value, named=f"set {WARM} = "))
        elif key == WORKER_SCAN and value.lower() not in WORKER_SCAN_VALUES:
            raise ExecutionError(f"set {WORKER_SCAN}: {value!r} is not one of {', '.join(WORKER_SCAN_VALUES)}")
        elif self.db.is_setting(key):
            self.db.set_setting(key, value)
        state.variables[key] = value
        for mode in self.modes:
            mode.assigned(key, value)

    # -- helpers ---------------------------------------------------------------------

    def _execute(self, statement: statements.Statement, base_dir: Path) -> pd.DataFrame | None:
        """Run ``statement``: by the mode that claims it, else by its batch handler."""
        for mode in self.modes:
            if mode.claims(statement):
                self._notice = mode.run(statement)
                return None
        return _HANDLERS[statement.kind](self, statement, base_dir=base_dir)

    def _prepare(self, script: list[statements.Statement]) -> None:
        """Spares for the model registrations after the first statement, as their text reads now
        (a ${variable} a statement before them sets is not known yet: then nothing is prepared)."""
        for statement in script[1:]:
            if isinstance(statement, statements.Set) and statement.key == RAY_ADDRESS:
                return  # the workers go to another Ray: nothing starts here
            if isinstance(statement, statements.Register):
                try:
                    path, options = self.substituted(statement.path), substitute_options(statement.options, self.state.variables)
                except ExecutionError:
                    continue
                kinds.prepare(self.registry, statement.model_kind, path, options)

    @contextmanager
    def _turn(self, statement: statements.Statement) -> Iterator[None]:
        """For a statement that runs SQL: the connection to itself, and the model versions pinned."""
        if statement.kind not in _RUNS_SQL:
            yield
            return
        with self.db.exclusive(), self.registry.statement():
            yield

    def _nulled(self) -> dict[str, int]:
        """Rows each model function has left NULL so far."""
        return {name: f.model_function.nulled.value for name, f in self.registry.functions.items() if f.model_function}

    def _warn_nulled(self, before: dict[str, int], statement: statements.Statement, source_name: str) -> None:
        where = (f"{source_name}: " if source_name else "") + f"line {statement.line}"
        for name, fn in self.registry.functions.items():
            rows = fn.model_function.nulled.value - before.get(name, 0) if fn.model_function else 0
            if rows > 0:
                plural = "" if rows == 1 else "s"
                self._warnings.append(f'{where}: {rows:,} row{plural} NULL (on_error="null"): {fn.model_function.null_reason}')

    def substituted(self, text: str) -> str:
        """Statement text with its ${key} variables substituted."""
        return substitute(text, self.state.variables)

    def as_duckdb(self, text: str) -> str:
        """Statement text as DuckDB SQL: ${key} substituted, translated from the script's dialect."""
        return to_duckdb(self.substituted(text), self.state.dialect)

    def _bound(self, query: str) -> dict | None:
        """The parameters a query refers to as $name (None when it refers to none)."""
        wanted = parameter_names(query)
        return {name: value for name, value in self.parameters.items() if name in wanted} or None

    def _frame(self, query: str) -> pd.DataFrame | None:
        return self.db.query(query, self._bound(query))

    # -- one handler per statement kind ------------------------------------------------

    def load(self, stmt: statements.Load, **_: object) -> None:
        path, options = self.substituted(stmt.path), substitute_options(stmt.options, self.state.variables)
        fmt, table = stmt.format.lower(), self.substituted(stmt.table)
        con = self.db.con
        if fmt == formats.JSON_LINES_FORMAT.lower():
            self._load_json_lines(table, path)
        elif fmt in formats.TABLE_FORMATS:
            replace_relation(con, table, f"SELECT * FROM {quote_identifier(path)}")
        elif fmt == formats.LAKE_FORMAT:
            lake.load(con, table, path, options, root=self._lake_root())
        else:
            durable.recover(path)  # a save of it that a kill cut short: undone or finished before anything reads it
            replace_relation(con, table, f"SELECT * FROM {formats.reader_sql(fmt, path, options)}")

    def _load_json_lines(self, table: str, variable: str) -> None:
        import pyarrow.json as pajson

        if variable not in self.state.variables:
            raise ExecutionError(f"load jsonStr: no variable named {variable!r} (set {variable} = '''...''' first)")
        text = self.state.variables[variable].strip()
        try:
            arrow = pajson.read_json(io.BytesIO(text.encode()))
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for bad JSON
            raise ExecutionError(f"load jsonStr: variable {variable} is not JSON lines: {err}") from None
        table_from_arrow(self.db.con, table, arrow)

    def _lake_root(self) -> str | None:
        return self.state.variables.get(lake.ROOT_VARIABLE)

    def select(self, stmt: statements.Select, **_: object) -> pd.DataFrame | None:
        query = self.as_duckdb(stmt.sql)
        table = self.substituted(stmt.table)  # Byzer's `select ... as `${name}``
        kind = replace_relation(self.db.con, table, query, self._bound(query))
        if table == statements.OUTPUT_TABLE:
            return self._frame(f"SELECT * FROM {quote_identifier(table)}")
        self._notice = self._created(kind, table)
        return None

    def _created(self, kind: str, name: str) -> str:
        self._made = name
        columns = column_count(self.db.con, name)
        return f"{kind} {name} created: {columns} column{'' if columns == 1 else 's'}; end with 'as {statements.OUTPUT_TABLE}' to see rows"

    def save(self, stmt: statements.Save, **_: object) -> None:
        path, options = self.substituted(stmt.path), substitute_options(stmt.options, self.state.variables)
        fmt, table = stmt.format.lower(), self.substituted(stmt.table)
        if fmt in formats.TABLE_FORMATS:
            formats.save_table(self.db, table, path, stmt.mode)
        elif fmt == formats.LAKE_FORMAT:
            lake.save(self.db.con, table, path, stmt.mode, options, stmt.partition_by, root=self._lake_root())
        else:
            formats.save_file(self.db, table, fmt, path, stmt.mode, options, stmt.partition_by)

    def register(self, stmt: statements.Register, **_: object) -> None:
        path, options = self.substituted(stmt.path), substitute_options(stmt.options, self.state.variables)
        kinds.register(self.registry, self.state, stmt.model_kind, path, stmt.function, options)

    def unregister(self, stmt: statements.Unregister, **_: object) -> None:
        self.registry.unregister(stmt.function)

    def set(self, stmt: statements.Set, **_: object) -> None:
        value = self.substituted(stmt.value)
        given = stmt.options.get("type", "text")
        kind = _SET_TYPE_NAMES.get(given.lower())
        if kind is None:
            raise ExecutionError(f"set {stmt.key}: type {given.lower()!r} is not supported (supported: {', '.join(SET_TYPES)})")
        if kind == "defaultParam" and stmt.key in self.state.variables:
            return
        if kind == "sql":
            rows = self.db.con.execute(to_duckdb(value, self.state.dialect)).fetchall()
            value = "" if not rows else str(rows[0][0])
        elif kind == "shell":
            done = subprocess.run(value, shell=True, capture_output=True, text=True)
            if done.returncode != 0:
                stderr = done.stderr.strip()[:_SHELL_ERROR_CHARS]
                raise ExecutionError(f"set {stmt.key}: shell command exited {done.returncode}: {stderr}")
            value = done.stdout.strip()
        self.assign(stmt.key, value)

    def command(self, stmt: statements.Command, **_: object) -> pd.DataFrame | None:
        return run_command(self, stmt.name, stmt.args)

    def run_et(self, stmt: statements.Run, **_: object) -> pd.DataFrame | None:
        options = substitute_options(stmt.options, self.state.variables)
        if stmt.et.lower() == REPARTITION_ET.lower():  # DuckDB has no partitions to change: the rows, as they are
            output = self.substituted(stmt.output)
            kind = replace_relation(self.db.con, output, f"SELECT * FROM {quote_identifier(self.substituted(stmt.table))}")
            self._notice = self._created(kind, output)
            return None
        if stmt.et.lower() != statements.RAY.lower():
            raise ExecutionError(
                f"run {stmt.table} as {stmt.et}: Byzer's {stmt.et} runs on Spark and is not supported here; "
                f"Python on Ray runs with run command as {statements.RAY}.`` where code='''...'''"
            )
        output = self.substituted(options.get("outputTable") or stmt.output)
        return self.run_byzer_python(self.substituted(options.get("inputTable") or stmt.table), output, options)

    def run_byzer_python(self, input_table: str, output: str, options: dict[str, str]) -> pd.DataFrame | None:
        """Byzer-python: the code in ``options`` over ``input_table``; its output becomes table ``output``."""
        state = self.state
        conf = {k: v for k, v in options.items() if k not in STATEMENT_OPTIONS}
        conf = {**({"env": dict(state.python_env)} if state.python_env else {}), **state.python_conf, **conf}
        # Not a turn on the connection for the whole run: training may take hours, and the
        # session's other statements (and model versions draining) need not wait for it.
        run_python(
            self.db, self.registry.runtime, conf, code=options.get("code", ""), input_table=input_table, output_table=output
        )
        if statements.PYTHON_ENV in options:
            self._warnings.append(
                f"run {output}: {statements.PYTHON_ENV} (#%env) is ignored: the code runs in this process's Python; "
                '!python env "K=V" sets environment variables of the Ray workers'
            )
        if output == statements.OUTPUT_TABLE:
            return self._frame(f"SELECT * FROM {quote_identifier(output)}")
        with self.db.exclusive():
            self._notice = self._created("table", output)
        return None

    def include(self, stmt: statements.Include, *, base_dir: Path, **_: object) -> pd.DataFrame | None:
        """``include local|project.`<file>```, ``include lib.`<site/user/repo>` where alias="a"``.

        A file's options are set as variables before it runs (as Byzer's ``include local``
        does). ``include lib`` runs nothing: it names a library directory, found offline
        through ``libDir="/path"`` or a lib path that is a local directory, so that
        ``include local.`<alias>.udf.hello``` runs its ``udf/hello.mlsql`` (Byzer's layout;
        a last part ``byzer``/``byz``/``by``/``mlsql`` is the file's suffix instead).
        """
        fmt, name = stmt.format.lower(), self.substituted(stmt.path)
        options = substitute_options(stmt.options, self.state.variables)
        if fmt == "lib":
            self._include_lib(name, options, base_dir)
            return None
        if fmt not in _INCLUDE_FORMATS:
            supported = ", ".join((*_INCLUDE_FORMATS, "lib"))
            raise ExecutionError(f"include: format {stmt.format!r} is not supported (supported: {supported})")
        path = self._lib_script(name) or (base_dir / name).resolve()
        if path in self._including:
            raise ExecutionError(f"include: {path} includes itself")
        try:
            text = path.read_text()
        except OSError as err:
            raise ExecutionError(f"include: cannot read {path}: {err.strerror}") from None
        for key, value in options.items():
            self.assign(key, value)
        self._including.append(path)
        try:
            included = self.run(parse(text, source_name=str(path)), base_dir=path.parent, source_name=str(path))
        finally:
            self._including.pop()
        self._notice, self._made = included.notice, included.made  # what the included script's last statement said and made
        return included.frame

    def _include_lib(self, name: str, options: dict[str, str], base_dir: Path) -> None:
        """Byzer's ``include lib``: remember the library's directory as ``${__lib__<alias>}``."""
        directory = options.get("libDir") or name
        root = base_dir / Path(directory).expanduser()
        if not root.is_dir():
            if "libDir" in options:
                raise ExecutionError(f"include lib.`{name}`: libDir {directory!r} is not a directory")
            raise ExecutionError(f'include lib.`{name}`: not available offline; clone the library and add where libDir="/path/to/it"')
        root = root.resolve()
        alias = options.get("alias", "")
        for key in dict.fromkeys((alias, name)):  # Byzer finds a lib by its alias or its full name
            if key:
                self.assign(f"__lib__{key}", str(root))
        self._notice = f"lib {name} at {root}" + (f" as {alias}" if alias else "")

    def _lib_script(self, name: str) -> Path | None:
        """``<lib>.<dir>.<file>`` as a file of a library named by ``include lib``, else None."""
        head, _, rest = name.rpartition("/")
        lib, *parts = rest.split(".")
        root = self.state.variables.get(f"__lib__{head}/{lib}" if head else f"__lib__{lib}")
        suffix = parts.pop().lower() if parts and parts[-1].lower() in _LIB_SUFFIXES else "mlsql"
        if root is None or not parts:
            return None
        return Path(root, *parts[:-1], f"{parts[-1]}.{suffix}")

    def sql(self, stmt: statements.Sql, **_: object) -> pd.DataFrame | None:
        first = stmt.text.split(None, 1)[0].lower() if stmt.text.strip() else ""
        if first in UNSUPPORTED_BYZER:
            raise ExecutionError(
                f"{first}: Byzer's {'/'.join(UNSUPPORTED_BYZER)} statements need Spark ML and are not supported; "
                "train the model in Python and register it (register keras|sklearn|Ray ...)"
            )
        return self._frame(self.as_duckdb(stmt.text))


_HANDLERS: dict[str, Callable[..., pd.DataFrame | None]] = {
    "load": Executor.load,
    "select": Executor.select,
    "save": Executor.save,
    "register": Executor.register,
    "unregister": Executor.unregister,
    "set": Executor.set,
    "run": Executor.run_et,
    "command": Executor.command,
    "include": Executor.include,
    "sql": Executor.sql,
}
