"""The streaming mode as the executor sees it: the statements of a stream script it claims, and runs.

The executor asks each mode that plugs into it whether it claims a statement before the
statement's batch handler runs (``claims``, then ``run``); it tells them each variable a script
sets (``assigned``) and asks them, at the end of a script, what to warn of (``finished``). So the
executor knows nothing of streams, and batch handlers carry no stream branches.

After ``set streamName="name"`` the stream mode claims the ``load`` of the stream's source, each
``select`` that reads the stream's tables, and the ``save append`` that starts the stream. In
any script it claims a ``load`` of a format only a stream reads (mockStream, kafka) and a
``save`` given a stream's options, to refuse them saying how to make a stream.

Example:
    >>> from types import SimpleNamespace
    >>> from sql_magics.language.parser import parse
    >>> mode = StreamMode(SimpleNamespace(substituted=str))  # an executor, as far as these statements need one
    >>> [mode.claims(s) for s in parse("select 1 as a; load mockStream.`t` as e; save append a as parquet.`out`")]
    [False, True, False]
    >>> mode.assigned("streamName", "scores")
    >>> mode.claims(parse("load parquet.`/data/incoming` as events")[0])
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sql_magics.errors import ExecutionError
from sql_magics.language import statements
from sql_magics.language.variables import substitute_options
from sql_magics.models.registry import FunctionRegistry
from sql_magics.state import ScriptState
from sql_magics.streaming.query import STREAM_NAME, STREAM_OPTION_NAMES, StreamDraft, start_stream
from sql_magics.streaming.sources import STREAM_ONLY_FORMATS, batch_load_error, is_source, source_for
from sql_magics.streaming.streams import Streams
from sql_magics.tables import lake
from sql_magics.tables.database import Database

# A stream's options a batch save refuses, naming set streamName: all but mode, which a Delta save takes too (mode="path").
_REFUSED_IN_BATCH = tuple(name for name in STREAM_OPTION_NAMES if name != "mode")


class Script(Protocol):
    """What the stream mode works on: the executor running the script."""

    db: Database
    registry: FunctionRegistry
    state: ScriptState
    streams: Streams  # the session's streams (!streams)
    echo: Callable[[str], None]  # where a stream's progress lines and console sink print

    def substituted(self, text: str) -> str:
        """Text with its ${key} variables substituted."""
        ...

    def as_duckdb(self, text: str) -> str:
        """Statement text as DuckDB SQL (substituted, translated from the script's dialect)."""
        ...


class StreamMode:
    """The streaming mode of one script (and the files it includes): see the module's docstring."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.draft: StreamDraft | None = None  # the stream this script is, after its set streamName

    # -- what the executor asks -----------------------------------------------------

    def assigned(self, key: str, value: str) -> None:
        """A variable the script set: ``streamName`` makes the script a stream."""
        if key == STREAM_NAME:
            self.draft = StreamDraft(value)

    def claims(self, statement: statements.Statement) -> bool:
        """Whether ``statement`` is the stream's (or one only a stream may run), for :meth:`run` to run."""
        if isinstance(statement, statements.Load):
            if self.draft is None:
                return statement.format.lower() in STREAM_ONLY_FORMATS
            return is_source(statement.format, self.script.substituted(statement.path), statement.options)
        if isinstance(statement, statements.Select):
            return self.draft is not None and self.draft.reads(self.script.as_duckdb(statement.sql))
        if isinstance(statement, statements.Save):
            return self._streamed(self.script.substituted(statement.table)) or any(k in _REFUSED_IN_BATCH for k in statement.options)
        return False

    def run(self, statement: statements.Statement) -> str:
        """Run a statement :meth:`claims`; what it did, in one line."""
        if isinstance(statement, statements.Load):
            return self._load(statement)
        if isinstance(statement, statements.Select):
            return self._select(statement)
        assert isinstance(statement, statements.Save)
        return self._save(statement)

    def finished(self) -> list[str]:
        """What to warn of at the end of the script: a stream that nothing started."""
        draft = self.draft
        if draft is None or draft.source is None or draft.started:
            return []
        return [
            f"stream {draft.name}: nothing started it; a stream starts at save append <table> as <sink> "
            'options checkpointLocation="/dir" (docs/streaming.md)'
        ]

    # -- each statement it claims ---------------------------------------------------

    def _load(self, stmt: statements.Load) -> str:
        path = self.script.substituted(stmt.path)
        if self.draft is None:
            raise batch_load_error(stmt.format, path)
        options, table = substitute_options(stmt.options, self.script.state.variables), self.script.substituted(stmt.table)
        source = source_for(self.script.db.con, stmt.format, path, options, table, lake_root=self._lake_root())
        self.draft.read_from(source)
        return f"stream {self.draft.name} reads {table} from {source.description()}"

    def _select(self, stmt: statements.Select) -> str:
        table = self.script.substituted(stmt.table)
        self.draft.defer(table, self.script.as_duckdb(stmt.sql))
        return f"stream {self.draft.name}: {table} runs in each micro-batch"

    def _save(self, stmt: statements.Save) -> str:
        """``save append <stream table> as <sink>``: the stream starts, in the background unless ``trigger="once"``."""
        table = self.script.substituted(stmt.table)
        if not self._streamed(table):
            given = next(k for k in stmt.options if k in _REFUSED_IN_BATCH)
            raise ExecutionError(
                f"save {table}: {given} is an option of a stream; a stream script starts with set {STREAM_NAME}=\"name\" "
                "and loads a directory, a Delta table or mockStream (docs/streaming.md)"
            )
        draft, script = self.draft, self.script
        if draft.started:
            raise ExecutionError(f"stream {draft.name}: started already; a stream script has one save append of its tables")
        if stmt.mode != statements.APPEND:
            raise ExecutionError(f"stream {draft.name}: save {stmt.mode} {table}: a stream adds each micro-batch, so it needs save append")
        script.streams.refuse_running(draft.name)
        path, options = script.substituted(stmt.path), substitute_options(stmt.options, script.state.variables)
        query = start_stream(
            draft, table, stmt.format.lower(), path, options, stmt.partition_by, script.db, script.registry,
            lake_root=self._lake_root(), on_batch=script.echo if script.streams.progress else None, echo=script.echo,
        )
        try:
            if query.trigger.once:
                script.streams.remember(query)
                query.run()
                return f"stream {draft.name} ran once: {query.batches} batches, {query.rows:,} rows into {query.sink.description()}"
            script.streams.start(query)
        except BaseException:
            query.checkpoint.release()  # its checkpoint claimed as the query was made: free for the next run
            raise
        return (
            f"stream {draft.name} started: {query.source.description()} into {query.sink.description()}; "
            f"!streams shows it, !kill stream {draft.name} stops it"
        )

    def _streamed(self, table: str) -> bool:
        """Whether ``table`` is one of the stream's (its source's, or a waiting select's)."""
        return self.draft is not None and table.lower() in (t.lower() for t in self.draft.tables())

    def _lake_root(self) -> str | None:
        return self.script.state.variables.get(lake.ROOT_VARIABLE)
