"""Where a stream's micro-batches go, each commit idempotent so that a re-run batch is written once.

A batch's output is first staged as one Parquet file in the checkpoint (the query runs once,
on the worker path where it may); the sink then commits that file:

- Delta (``delta.``, Byzer's ``rate.``): one commit that records (query id, batch id) as a
  transaction, as Spark's Delta sink does; a batch the table already records is skipped.
  ``idCols`` merges (upserts) on those columns.
- Parquet, CSV and JSON directories: part files named ``part-<batch>-<query>``, moved into
  place; a re-run batch removes what an earlier attempt of it left, then moves its own.
- A DuckDB table: the rows and a row of ``__rayudf_stream_commits`` in one transaction.
- ``console``: prints the rows (at least once: a re-run batch prints again).

With mode="Complete" a commit replaces what the sink holds (a Delta overwrite, the table
replaced); file sinks take Append only, as in Spark. Each sink declares its options in a table
(``OPTIONS``) that docs/streaming.md shows row by row; a file sink's options are DuckDB's.

Example:
    >>> sink_for("rate", "/tmp/lake/t", {"idCols": "id"}, [], lake_root=None).description()
    'delta:/tmp/lake/t'
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from arrow_bridge.quoting import quote_identifier, quote_literal
from sql_magics.errors import ExecutionError
from sql_magics.streaming.checkpoint import sync_directory
from sql_magics.streaming.faults import reached
from sql_magics.tables import formats, lake
from sql_magics.tables.catalog import relation_kind
from sql_magics.tables.database import Database
from udf_engine.durable import sync_file
from udf_engine.settings import Option, read_options

DELTA_FORMATS = (formats.LAKE_FORMAT, "rate")  # Byzer calls its streaming Delta sink `rate`
CONSOLE_FORMAT = "console"
SINK_FORMATS = (*DELTA_FORMATS, *formats.FILE_FORMATS, CONSOLE_FORMAT, *formats.TABLE_FORMATS)
COMMITS_TABLE = "__rayudf_stream_commits"
"""The DuckDB table where a table sink records the batches it committed, in the same transaction."""
# Spark's console sink shows 20 rows of a batch unless numRows says otherwise.
CONSOLE_ROWS = 20


class Sink(Protocol):
    def description(self) -> str:
        """Where the batches go, as the checkpoint's identity of it: ``delta:/lake/db/t``."""
        ...

    def has(self, db: Database, batch: int, query_id: str) -> bool:
        """Whether batch ``batch`` of query ``query_id`` is committed here (False where the sink cannot tell)."""
        ...

    def commit(self, db: Database, staged: Path, batch: int, query_id: str) -> None:
        """Write the rows of ``staged`` (a Parquet file) as batch ``batch`` of query ``query_id``, once."""
        ...


def sink_for(
    fmt: str, path: str, options: Mapping[str, str], partition_by: list[str], *, lake_root: str | None,
    echo: Callable[[str], None] = print, complete: bool = False,
) -> Sink:
    """The sink a stream's ``save append <table> as <fmt>.`<path>``` names (``options`` are the sink's own);
    ``complete``: each commit replaces what the sink holds (mode="Complete")."""
    lowered = fmt.lower()
    if lowered in DELTA_FORMATS:
        return DeltaSink(path, options, partition_by, root=lake_root, complete=complete)
    if lowered in formats.FILE_FORMATS:
        if complete:
            raise ExecutionError(
                f'save {fmt} (stream): a file sink adds part files, so mode="Append" only (as in Spark); '
                'mode="Complete" writes to delta, rate, table or console'
            )
        return FileSink(lowered, path, options, partition_by)
    if lowered == CONSOLE_FORMAT:
        return ConsoleSink(options, echo)
    if lowered in formats.TABLE_FORMATS:
        return TableSink(path, options, complete=complete)
    raise ExecutionError(f"save {fmt}: not a stream sink here (supported: {', '.join(SINK_FORMATS)})")


class DeltaSink:
    OPTIONS = lake.WRITE_OPTIONS  # a batch's commit is a Delta save's (mode is the stream's own: Append, Complete)

    def __init__(
        self, path: str, options: Mapping[str, str], partition_by: list[str], *, root: str | None, complete: bool = False
    ) -> None:
        self.values = read_options(options, self.OPTIONS, "save rate/delta (stream)")
        if complete and lake.id_columns(self.values):
            raise ExecutionError('save rate/delta (stream): mode="Complete" replaces the table each batch, so idCols has nothing to merge')
        self.location = lake.locate(path, root=root)
        self.partition_by = partition_by
        self.mode = lake.OVERWRITE if complete else lake.APPEND

    def description(self) -> str:
        return f"delta:{self.location.path}"

    def has(self, db: Database, batch: int, query_id: str) -> bool:
        done = lake.transaction_version(self.location, query_id)
        return done is not None and done >= batch

    def commit(self, db: Database, staged: Path, batch: int, query_id: str) -> None:
        if self.has(db, batch, query_id):
            return  # committed before a crash stopped the stream from recording it
        rows = ds.dataset(str(staged)).to_table()
        lake.write(
            self.location, rows, self.mode, self.values, self.partition_by, exists=self.location.exists(),
            transaction=(query_id, batch),
        )


class FileSink:
    def __init__(self, fmt: str, path: str, options: Mapping[str, str], partition_by: list[str]) -> None:
        self.fmt = fmt
        self.path = Path(path).expanduser().resolve()
        # DuckDB's COPY options (header, delimiter, compression, ...), passed through as a batch save passes
        # them: DuckDB's to check, so no table of ours names them.
        self.options = dict(options)
        self.partition_by = partition_by
        if self.path.is_file():
            raise ExecutionError(f"save {fmt}: {self.path} is a file; a stream writes part files into a directory")

    def description(self) -> str:
        return f"{self.fmt}:{self.path}"

    def has(self, db: Database, batch: int, query_id: str) -> bool:
        return False  # its part files may be only some of the batch's: a re-run replaces them

    def commit(self, db: Database, staged: Path, batch: int, query_id: str) -> None:
        prefix = f"part-{batch:05d}-{query_id[:8]}"
        out = staged.parent / "out"
        shutil.rmtree(out, ignore_errors=True)
        query = f"SELECT * FROM read_parquet({quote_literal(str(staged))})"
        if self.partition_by:
            options = {**self.options, "filename_pattern": f"{prefix}-{{i}}"}
            formats.copy_to(db, query, out, self.fmt, options, self.partition_by)
        else:
            out.mkdir()
            if self.fmt == "parquet" and not self.options:
                os.replace(staged, out / f"{prefix}.parquet")  # the staged file is the part file: no second write
            else:
                formats.copy_to(db, query, out / f"{prefix}.{self.fmt}", self.fmt, self.options, [])
        for old in self.path.rglob(f"{prefix}*") if self.path.exists() else []:
            old.unlink()  # an earlier attempt at this batch, cut short
        for made in sorted(p for p in out.rglob("*") if p.is_file()):
            target = self.path / made.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            _move(made, target)
            reached("sink_file_moved", batch)


def _move(made: Path, target: Path) -> None:
    """Put ``made`` at ``target`` whole, by rename, its bytes on disk before its name (so a power cut
    leaves the whole file or none); from another filesystem (the checkpoint's), through a hidden copy
    beside ``target``."""
    sync_file(made)
    try:
        os.replace(made, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        hidden = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(made, hidden)
        sync_file(hidden)
        os.replace(hidden, target)
        made.unlink()
    sync_directory(target.parent)


class TableSink:
    OPTIONS: tuple[Option, ...] = ()

    def __init__(self, name: str, options: Mapping[str, str], *, complete: bool = False) -> None:
        read_options(options, self.OPTIONS, "save table (stream)")  # none: refused, not silently dropped
        self.name = name
        self.complete = complete  # each batch's rows replace the table's

    def description(self) -> str:
        return f"table:{self.name}"

    def has(self, db: Database, batch: int, query_id: str) -> bool:
        with db.exclusive():
            if relation_kind(db.con, COMMITS_TABLE) != "table":
                return False
            return bool(db.con.execute(f"SELECT 1 FROM {COMMITS_TABLE} WHERE query_id = ? AND batch = ?", [query_id, batch]).fetchall())

    def commit(self, db: Database, staged: Path, batch: int, query_id: str) -> None:
        con = db.con
        rows = f"SELECT * FROM read_parquet({quote_literal(str(staged))})"
        with db.exclusive():
            con.execute(f"CREATE TABLE IF NOT EXISTS {COMMITS_TABLE} (query_id VARCHAR, batch BIGINT)")
            con.execute("BEGIN TRANSACTION")
            try:
                if self.has(db, batch, query_id):
                    con.execute("ROLLBACK")
                    return
                if relation_kind(con, self.name) == "table" and not self.complete:
                    con.execute(f"INSERT INTO {quote_identifier(self.name)} BY NAME {rows}")
                else:
                    con.execute(f"CREATE OR REPLACE TABLE {quote_identifier(self.name)} AS {rows}")
                con.execute(f"INSERT INTO {COMMITS_TABLE} VALUES (?, ?)", [query_id, batch])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise


class ConsoleSink:
    OPTIONS: tuple[Option, ...] = (
        Option("numRows", CONSOLE_ROWS, int, "rows of each batch printed"),
        Option("truncate", True, bool, "show 20 characters of each value at most"),
    )

    def __init__(self, options: Mapping[str, str], echo: Callable[[str], None]) -> None:
        values = read_options(options, self.OPTIONS, "save console")
        self.rows = values["numRows"]
        if self.rows < 0:
            raise ExecutionError(f"save console: numRows must not be negative, not {self.rows}")
        self.truncate = values["truncate"]
        self.echo = echo

    def description(self) -> str:
        return CONSOLE_FORMAT

    def has(self, db: Database, batch: int, query_id: str) -> bool:
        return False  # it keeps nothing: a re-run batch prints again

    def commit(self, db: Database, staged: Path, batch: int, query_id: str) -> None:
        frame = pq.read_table(staged).slice(0, self.rows).to_pandas()
        shown = frame.to_string(index=False, max_colwidth=20 if self.truncate else None)
        rule = "-" * 43
        self.echo(f"{rule}\nBatch: {batch}\n{rule}\n{shown}\n")
