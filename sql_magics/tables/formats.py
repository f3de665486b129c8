"""Formats of ``load`` and ``save``: which DuckDB reader a source needs, and how a table is written.

A save writes beside its target and switches the new version in whole (``udf_engine.durable``), so
a query that fails half way, or a kill, leaves the old output intact.

Example:
    >>> reader_sql("parquet", "data/*.parquet", {})
    "read_parquet('data/*.parquet')"
    >>> reader_sql("csv", "a.csv", {"header": "true", "delimiter": ";"})
    "read_csv('a.csv', header = true, delim = ';')"
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path

from arrow_bridge.quoting import quote_identifier, quote_literal
from sql_magics.errors import ExecutionError
from sql_magics.language.statements import APPEND, ERROR_IF_EXISTS, IGNORE
from sql_magics.tables.catalog import relation_kind
from sql_magics.tables.database import Database
from udf_engine import durable

FILE_FORMATS = ("parquet", "csv", "json")
TABLE_FORMATS = ("table", "duckdb")
LAKE_FORMAT = "delta"  # a Delta table, read and written by sql_magics.tables.lake
JSON_LINES_FORMAT = "jsonStr"  # Byzer's JSON lines held by a `set` variable
LOAD_FORMATS = (*FILE_FORMATS, JSON_LINES_FORMAT, *TABLE_FORMATS, LAKE_FORMAT)
SAVE_FORMATS = (*FILE_FORMATS, *TABLE_FORMATS, LAKE_FORMAT)

_READERS = {"parquet": "read_parquet", "csv": "read_csv", "json": "read_json_auto"}
# Spark option names users bring from Byzer scripts, and DuckDB's names for them.
_SPARK_OPTION_NAMES = {"delimiter": "delim", "sep": "delim", "inferSchema": None, "multiLine": None}
_SUFFIX = {"parquet": "*.parquet", "csv": "*.csv", "json": "*.json"}


def _literal(value: str) -> str:
    lowered = str(value).lower()
    if lowered in ("true", "false"):
        return lowered
    try:
        float(value)
        return str(value)
    except ValueError:
        return quote_literal(value)


def _reader_options(options: Mapping[str, str]) -> list[str]:
    pairs = []
    for key, value in options.items():
        name = _SPARK_OPTION_NAMES.get(key, key)
        if name is not None:
            pairs.append(f"{name} = {_literal(value)}")
    return pairs


def reader_sql(fmt: str, path: str | list[str], options: Mapping[str, str]) -> str:
    """The DuckDB table function call that reads ``path``; a directory reads all its files, a list those files.

    Example:
        >>> reader_sql("parquet", ["a.parquet", "b.parquet"], {})
        "read_parquet(['a.parquet', 'b.parquet'])"
    """
    if fmt not in _READERS:
        raise ExecutionError(f"load: format {fmt!r} is not supported (supported: {', '.join(LOAD_FORMATS)})")
    if isinstance(path, list):
        source = f"[{', '.join(quote_literal(p) for p in path)}]"
    else:
        source = quote_literal(str(Path(path) / "**" / _SUFFIX[fmt]) if Path(path).is_dir() else path)
    args = [source, *_reader_options(options)]
    return f"{_READERS[fmt]}({', '.join(args)})"


def _copy_options(fmt: str, options: Mapping[str, str], partition_by: list[str]) -> str:
    parts = [f"FORMAT {fmt}"]
    if partition_by:
        parts.append(f"PARTITION_BY ({', '.join(quote_identifier(c) for c in partition_by)})")
    parts.extend(f"{k.upper()} {_literal(v)}" for k, v in options.items() if _SPARK_OPTION_NAMES.get(k, k))
    return ", ".join(parts)


def writes(mode: str, exists: bool, *, what: str, where: str = "") -> bool:
    """Whether a save under ``mode`` writes: over an existing target (``what`` names it, ``where`` is
    it), errorIfExists is an error and ignore writes nothing; overwrite and append write.

    Example:
        >>> writes("ignore", True, what="save: out.parquet"), writes("ignore", False, what="save: out.parquet")
        (False, True)
    """
    if exists and mode == ERROR_IF_EXISTS:
        raise ExecutionError(f"{what} already exists{where} (use save overwrite or save append)")
    return not (exists and mode == IGNORE)


def save_file(db: Database, table: str, fmt: str, path: str, mode: str, options: Mapping[str, str], partition_by: list[str]) -> None:
    """Write ``table`` to ``path`` in ``fmt`` under ``mode``, so that a kill at any point leaves ``path`` whole.

    A new target, an overwrite, and an append to a single file (its rows and the new ones,
    rewritten) are written beside the target, fsynced, and switched in whole: after a kill the
    path holds the old version or the new one (a half-done switch is undone by the next load or
    save of it). An append into a directory adds its files one at a time, each moved in whole once
    written and fsynced: a kill part way through may leave some of them in and not others, as an
    append across files is not one transaction (a Delta save is).

    Example:
        >>> import tempfile
        >>> db = Database()
        >>> _ = db.query("create view t as select range as i, range % 2 as k from range(4)")
        >>> out = f"{tempfile.mkdtemp()}/out"
        >>> save_file(db, "t", "parquet", out, "overwrite", {}, ["k"])
        >>> save_file(db, "t", "parquet", out, "append", {}, ["k"])
        >>> db.query(f"select count(*) as n from {reader_sql('parquet', out, {})}")["n"].tolist()
        [8]
    """
    if fmt not in FILE_FORMATS:
        raise ExecutionError(f"save: format {fmt!r} is not supported (supported: {', '.join(SAVE_FORMATS)})")
    target = Path(path)
    with durable.staging(target) as stage:  # what a writer that died left is put right first
        exists = target.exists()
        if not writes(mode, exists, what=f"save: {path}"):
            return
        query = f"SELECT * FROM {quote_identifier(table)}"
        into_directory = exists and mode == APPEND and target.is_dir()
        if exists and mode == APPEND and not into_directory:
            query = f"SELECT * FROM {reader_sql(fmt, path, {})} UNION ALL BY NAME {query}"
        # A partitioned append names its files by uuid (DuckDB's APPEND): none clashes with those there.
        copy_to(db, query, stage.new, fmt, options, partition_by, append=into_directory and bool(partition_by))
        if not into_directory:
            stage.swap_in()
        elif partition_by:
            for made in sorted(p for p in stage.new.rglob("*") if p.is_file()):
                stage.add(made, target / made.relative_to(stage.new))
        else:
            stage.add(stage.new, target / f"part-{uuid.uuid4().hex[:12]}.{fmt}")


def copy_to(
    db: Database, query: str, path: Path, fmt: str, options: Mapping[str, str], partition_by: list[str], append: bool = False
) -> None:
    """``COPY (query) TO path`` (on the worker path when the query qualifies)."""
    extra = ", APPEND" if append else ""
    db.query(f"COPY ({query}) TO {quote_literal(str(path))} ({_copy_options(fmt, options, partition_by)}{extra})")


def save_table(db: Database, table: str, name: str, mode: str) -> None:
    """Write ``table`` into the DuckDB table ``name`` under ``mode``."""
    exists = relation_kind(db.con, name) is not None
    source = f"SELECT * FROM {quote_identifier(table)}"
    if not writes(mode, exists, what=f"save: table {name}"):
        return
    if exists and mode == APPEND:
        db.query(f"INSERT INTO {quote_identifier(name)} BY NAME {source}")
        return
    db.query(f"CREATE OR REPLACE TABLE {quote_identifier(name)} AS {source}")
