"""The statement kinds of the language: one small dataclass each.

Every statement has a class attribute ``kind`` and, filled in by the parser, ``text`` (its
raw source without the trailing ``;``), ``line`` and ``col`` (1-based, of its first token).
Those three are keyword-only and left out of ``==``, so a statement built by hand compares
equal to the parsed one.

Example:
    >>> Load("csv", "a.csv", {}, "a") == Load("csv", "a.csv", {}, "a", line=3, col=1)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

SAVE_MODES = ("overwrite", "append", "errorIfExists", "ignore")
"""The modes of ``save``, as written in scripts (matched without regard to case)."""
OVERWRITE, APPEND, ERROR_IF_EXISTS, IGNORE = SAVE_MODES
DEFAULT_SAVE_MODE = ERROR_IF_EXISTS
OUTPUT_TABLE = "output"
"""The table a script shows the rows of, Byzer's way (``select ... as output``)."""
RAY = "Ray"
"""Byzer's name for Python run on Ray: ``register Ray.`...``` and ``run ... as Ray.``` (its ET)."""
NO_INPUT = "command"
"""Byzer's ``inputTable`` (``run command as Ray.``...``) when the code reads no table."""
PYTHON_ENV = "PYTHON_ENV"
"""The run option naming Byzer's Python environment to activate (``#%env=``); the code runs in this
process's Python, so it is ignored (with a warning)."""


@dataclass(kw_only=True)
class Statement:
    """Base of every statement kind."""

    kind: ClassVar[str] = ""
    text: str = field(default="", compare=False, repr=False)
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)


@dataclass
class Load(Statement):
    """``load <format>.`<path>` [where k="v" and ...] as <table>``."""

    kind: ClassVar[str] = "load"
    format: str
    path: str
    options: dict[str, str]
    table: str


@dataclass
class Save(Statement):
    """``save [mode] <table> as <format>.`<path>` [where ...] [partitionBy c1, c2]``.

    ``mode`` is one of :data:`SAVE_MODES`; :data:`DEFAULT_SAVE_MODE` when the script names none.
    """

    kind: ClassVar[str] = "save"
    mode: str
    table: str
    format: str
    path: str
    options: dict[str, str]
    partition_by: list[str]


@dataclass
class Select(Statement):
    """``select ... as <table>``: ``sql`` is the query before the final ``as``."""

    kind: ClassVar[str] = "select"
    sql: str
    table: str


@dataclass
class Register(Statement):
    """``register <kind>.`<path or table>` as <function> [where ...]``.

    ``model_kind`` is kept as written (Ray, keras, sklearn, ScriptUDF, ...).
    """

    kind: ClassVar[str] = "register"
    model_kind: str
    path: str
    function: str
    options: dict[str, str]


@dataclass
class Unregister(Statement):
    """``unregister <function>``."""

    kind: ClassVar[str] = "unregister"
    function: str


@dataclass
class Set(Statement):
    """``set <key> = <value> [where type="text|sql|shell"]``; used later as ``${key}``."""

    kind: ClassVar[str] = "set"
    key: str
    value: str
    options: dict[str, str]


@dataclass
class Command(Statement):
    """``!<name> <args...>``, e.g. ``!python conf "runIn=driver"``.

    ``name`` is lower-cased; ``args`` are shell-like words with their quotes removed.
    """

    kind: ClassVar[str] = "command"
    name: str
    args: list[str]


@dataclass
class Include(Statement):
    """``include <format>.`<file>` [where k="v" ...]``.

    ``format`` is ``local`` or ``project`` for a script file, or ``lib`` for a Byzer library
    (``include lib.`github.com/user/repo` where alias="name"``).
    """

    kind: ClassVar[str] = "include"
    format: str
    path: str
    options: dict[str, str]


@dataclass
class Run(Statement):
    """``run <table> as <ET>.`<path>` [where k="v" ...] [as <output>]``, Byzer's ET statement.

    ``et`` is kept as written (``Ray``, ``TableRepartition``, ...); ``output`` is "" when the
    statement names no output table (``run command as Ray.`` where outputTable="o" ...``).
    """

    kind: ClassVar[str] = "run"
    table: str
    et: str
    path: str
    options: dict[str, str]
    output: str


@dataclass
class Sql(Statement):
    """Any other statement, handed to DuckDB unchanged; ``text`` is the SQL."""

    kind: ClassVar[str] = "sql"
    text: str


STATEMENT_TYPES: tuple[type[Statement], ...] = (
    Load,
    Save,
    Select,
    Register,
    Unregister,
    Set,
    Command,
    Include,
    Run,
    Sql,
)
"""Every statement class, e.g. for checking that each ``kind`` is documented."""
