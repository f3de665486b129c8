"""Runs parsed statements against a Session: one handler per statement kind.

Every error leaves here as an ExecutionError naming the script and the
statement's line; nothing runs before the whole script has parsed.

Example:
    >>> from sql_magics import Session
    >>> with Session() as s:
    ...     s.sql('set n = "3"; select range as i from range(${n}) as output;')["i"].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import duckdb
import pandas as pd

from sql_magics import formats, registration
from sql_magics.commands import run_command
from sql_magics.dialect import to_duckdb
from sql_magics.errors import ExecutionError, ParseError, clean_duckdb_error
from sql_magics.catalog import quote_identifier, replace_relation
from sql_magics.parser import parse
from sql_magics.statements import Command, Include, Load, Register, Save, Select, Set, Sql, Statement, Unregister
from sql_magics.variables import substitute, substitute_options
from udf_engine.errors import RayUDFError

if TYPE_CHECKING:
    from sql_magics.session import Session

SET_TYPES = ("text", "sql", "shell")
# Byzer statements that run Spark ML algorithms; there is no Spark here.
UNSUPPORTED_BYZER = ("train", "run", "predict")


class Executor:
    """Executes one script (and the files it includes) in a Session."""

    def __init__(self, session: "Session", *, parameters: dict | None = None) -> None:
        self.session = session
        self.parameters = parameters or {}  # values for $name query parameters
        self._including: list[Path] = []  # include stack, to refuse cycles

    def run(self, statements: list[Statement], *, base_dir: Path, source_name: str = "") -> pd.DataFrame | None:
        """Run statements in order; the rows of the last statement that yields rows."""
        result = None
        for statement in statements:
            try:
                frame = _HANDLERS[statement.kind](self, statement, base_dir=base_dir)
            except (ParseError, ExecutionError) as err:
                if isinstance(err, ParseError) or err.line:
                    raise  # already placed (an included file's statement)
                raise ExecutionError(str(err), line=statement.line, source=source_name) from None
            except RayUDFError as err:
                raise ExecutionError(str(err), line=statement.line, source=source_name) from None
            except duckdb.Error as err:
                raise ExecutionError(clean_duckdb_error(err), line=statement.line, source=source_name) from None
            if frame is not None:
                result = frame
        return result

    # -- helpers ---------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        return to_duckdb(substitute(text, self.session.variables), self.session.dialect)

    def _bound(self, query: str) -> dict | None:
        """The parameters a query refers to as $name (None when it refers to none)."""
        wanted = {name: value for name, value in self.parameters.items() if re.search(rf"\${name}\b", query)}
        return wanted or None

    def _frame(self, query: str) -> pd.DataFrame | None:
        return self.session.run_duckdb(query, self._bound(query))

    # -- one handler per statement kind ------------------------------------------------

    def load(self, stmt: Load, **_: object) -> None:
        variables = self.session.variables
        path, options = substitute(stmt.path, variables), substitute_options(stmt.options, variables)
        fmt = stmt.format.lower()
        con = self.session.con
        if fmt == "jsonstr":
            self._load_json_lines(stmt.table, path)
        elif fmt in formats.TABLE_FORMATS:
            replace_relation(con, stmt.table, f"SELECT * FROM {quote_identifier(path)}")
        else:
            replace_relation(con, stmt.table, f"SELECT * FROM {formats.reader_sql(fmt, path, options)}")

    def _load_json_lines(self, table: str, variable: str) -> None:
        import pyarrow.json as pajson

        if variable not in self.session.variables:
            raise ExecutionError(f"load jsonStr: no variable named {variable!r} (set {variable} = '''...''' first)")
        text = self.session.variables[variable].strip()
        try:
            arrow = pajson.read_json(io.BytesIO(text.encode()))
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for bad JSON
            raise ExecutionError(f"load jsonStr: variable {variable} is not JSON lines: {err}") from None
        scratch = f"__rayudf_json_{table}"
        self.session.con.register(scratch, arrow)
        try:
            replace_relation(self.session.con, table, f"SELECT * FROM {quote_identifier(scratch)}", table=True)
        finally:
            self.session.con.unregister(scratch)

    def select(self, stmt: Select, **_: object) -> pd.DataFrame | None:
        query = self._sql(stmt.sql)
        replace_relation(self.session.con, stmt.table, query, self._bound(query))
        if stmt.table == "output":
            return self._frame(f"SELECT * FROM {quote_identifier(stmt.table)}")
        return None

    def save(self, stmt: Save, **_: object) -> None:
        variables = self.session.variables
        path, options = substitute(stmt.path, variables), substitute_options(stmt.options, variables)
        fmt = stmt.format.lower()
        if fmt in formats.TABLE_FORMATS:
            formats.save_table(self.session.con, stmt.table, path, stmt.mode)
        else:
            formats.save_file(self.session.con, stmt.table, fmt, path, stmt.mode, options, stmt.partition_by)

    def register(self, stmt: Register, **_: object) -> None:
        variables = self.session.variables
        registration.register(
            self.session, stmt.model_kind, substitute(stmt.path, variables), stmt.function, substitute_options(stmt.options, variables)
        )

    def unregister(self, stmt: Unregister, **_: object) -> None:
        self.session.unregister(stmt.function)

    def set(self, stmt: Set, **_: object) -> None:
        session = self.session
        value = substitute(stmt.value, session.variables)
        kind = stmt.options.get("type", "text").lower()
        if kind == "sql":
            rows = session.con.execute(to_duckdb(value, session.dialect)).fetchall()
            value = "" if not rows else str(rows[0][0])
        elif kind == "shell":
            done = subprocess.run(value, shell=True, capture_output=True, text=True)
            if done.returncode != 0:
                raise ExecutionError(f"set {stmt.key}: shell command exited {done.returncode}: {done.stderr.strip()[:200]}")
            value = done.stdout.strip()
        elif kind != "text":
            raise ExecutionError(f"set {stmt.key}: type {kind!r} is not supported (supported: {', '.join(SET_TYPES)})")
        session.set_variable(stmt.key, value)

    def command(self, stmt: Command, **_: object) -> pd.DataFrame | None:
        return run_command(self.session, stmt.name, stmt.args)

    def include(self, stmt: Include, *, base_dir: Path, **_: object) -> pd.DataFrame | None:
        if stmt.format.lower() != "local":
            raise ExecutionError(f"include: format {stmt.format!r} is not supported (only local)")
        path = (base_dir / substitute(stmt.path, self.session.variables)).resolve()
        if path in self._including:
            raise ExecutionError(f"include: {path} includes itself")
        try:
            text = path.read_text()
        except OSError as err:
            raise ExecutionError(f"include: cannot read {path}: {err.strerror}") from None
        self._including.append(path)
        try:
            return self.run(parse(text, source_name=str(path)), base_dir=path.parent, source_name=str(path))
        finally:
            self._including.pop()

    def sql(self, stmt: Sql, **_: object) -> pd.DataFrame | None:
        first = stmt.text.split(None, 1)[0].lower() if stmt.text.strip() else ""
        if first in UNSUPPORTED_BYZER:
            raise ExecutionError(
                f"{first}: Byzer's {'/'.join(UNSUPPORTED_BYZER)} statements need Spark ML and are not supported; "
                "train the model in Python and register it (register keras|sklearn|Ray ...)"
            )
        return self._frame(self._sql(stmt.text))


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
