"""Formats of ``load`` and ``save``: which DuckDB reader a source needs, and how a table is written.

``save overwrite`` writes to a temporary path beside the target and renames it into
place, so a query that fails half way leaves the old output intact.

Example:
    >>> reader_sql("parquet", "data/*.parquet", {})
    "read_parquet('data/*.parquet')"
    >>> reader_sql("csv", "a.csv", {"header": "true", "delimiter": ";"})
    "read_csv('a.csv', header = true, delim = ';')"
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from arrow_bridge.quoting import quote_identifier, quote_literal
from sql_magics.errors import ExecutionError
from sql_magics.language.statements import APPEND, ERROR_IF_EXISTS, IGNORE
from sql_magics.tables.catalog import relation_kind
from sql_magics.tables.database import Database

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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


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
    """Write ``table`` to ``path`` in ``fmt`` under ``mode``."""
    if fmt not in FILE_FORMATS:
        raise ExecutionError(f"save: format {fmt!r} is not supported (supported: {', '.join(SAVE_FORMATS)})")
    target = Path(path)
    exists = target.exists()
    if not writes(mode, exists, what=f"save: {path}"):
        return
    query = f"SELECT * FROM {quote_identifier(table)}"
    if exists and mode == APPEND and target.is_file():
        query = f"SELECT * FROM {reader_sql(fmt, path, {})} UNION ALL BY NAME {query}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if exists and mode == APPEND and target.is_dir():
        # a new part file beside the old ones; a partitioned write lets DuckDB add to each partition
        part = target / f"part-{uuid.uuid4().hex[:12]}.{fmt}"
        copy_to(db, query, target if partition_by else part, fmt, options, partition_by, append=bool(partition_by))
        return
    tmp = target.with_name(f".{target.name}.rayudf-tmp-{uuid.uuid4().hex[:8]}")
    try:
        copy_to(db, query, tmp, fmt, options, partition_by)
    except BaseException:
        _remove(tmp)
        raise
    _replace(tmp, target)


def copy_to(
    db: Database, query: str, path: Path, fmt: str, options: Mapping[str, str], partition_by: list[str], append: bool = False
) -> None:
    """``COPY (query) TO path`` (on the worker path when the query qualifies)."""
    extra = ", APPEND" if append else ""
    db.query(f"COPY ({query}) TO {quote_literal(str(path))} ({_copy_options(fmt, options, partition_by)}{extra})")


def _replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` into ``target``'s place; the old target survives until the move is certain."""
    if target.exists() and (target.is_dir() or tmp.is_dir()):
        backup = target.with_name(f".{target.name}.rayudf-old-{uuid.uuid4().hex[:8]}")
        os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(backup, target)
            raise
        _remove(backup)
    else:
        os.replace(tmp, target)  # atomic for a file over a file


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
