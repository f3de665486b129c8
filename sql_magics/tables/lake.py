"""The Delta lake: ``load``/``save`` of ``delta.`db.table``` and ``!delta``, on delta-rs (no JVM, no Spark).

A lake table ``db.table`` lives in ``<lake root>/db/table`` (a bare ``table`` is
``default.table``, as in Byzer); a name holding ``/``, naming an existing directory, or given
with ``mode="path"`` is a path instead. The root is the ``lake.root`` variable
(``set lake.root="..."``), else :data:`DEFAULT_ROOT` in the working directory.

``save`` streams the table out of DuckDB (through a cursor, so a ``create temp view`` is not
seen) into one Delta commit: a query that fails half way commits nothing, so the table stays
at its previous version. ``save append ... where idCols="a,b"`` is a MERGE on those columns
(matched rows updated, the others inserted). ``load`` copies one version of the table into a
DuckDB table, so a later write to the lake does not change what a script already loaded; a
view over a registered Arrow dataset would not do, as it lives on one connection only and
the model registry reads tables through a cursor.

``startingVersion="a" and endingVersion="b"`` follow Byzer's ``MLSQLDelta.load`` (byzer-lang's
source; byzer-doc's ``datasource/dw/delta_lake.md`` shows only an example): both are
required, the range is ``[a, b)`` and each version in it contributes its whole snapshot
(what ``version="v"`` loads), tagged with a ``__delta_version__`` column; so a row that lived
through three versions appears three times (Byzer's example groups by key and version to see
a key's values side by side). That is neither the change data feed nor the rows each commit
added. Unlike Byzer, ``startingVersion="0"`` means version 0 (Byzer reads the latest there).

Options other than those in :data:`LOAD_OPTIONS` and :data:`SAVE_OPTIONS` are refused,
naming the ones there are: Byzer's streaming options (``duration``, ``checkpointLocation``) belong to
stream scripts (``set streamName``, :mod:`sql_magics.streaming`), and a misspelt ``idCols`` must not
silently turn a merge into an append. A stream's Delta source and sink take some of the same
(:data:`PATH_OPTION`, :data:`WRITE_OPTIONS`).

Example:
    >>> import duckdb, tempfile
    >>> con, root = duckdb.connect(), tempfile.mkdtemp()
    >>> _ = con.execute("create view t as select range as i from range(3)")
    >>> save(con, "t", "db.t", "overwrite", {}, [], root=root)
    >>> save(con, "t", "db.t", "append", {}, [], root=root)
    >>> load(con, "back", "db.t", {"version": "0"}, root=root)
    >>> con.execute("select list(i order by i) from back").fetchone()[0]
    [0, 1, 2]
    >>> history("db.t", root=root)[["version", "operation"]].values.tolist()
    [[1, 'WRITE'], [0, 'WRITE']]
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import SchemaMismatchError

from arrow_bridge.quoting import quote_identifier
from sql_magics.errors import ExecutionError, clean_duckdb_error
from sql_magics.language.statements import APPEND, ERROR_IF_EXISTS, IGNORE, OVERWRITE
from sql_magics.tables.catalog import replace_relation
from sql_magics.tables.formats import writes
from udf_engine.errors import UnsafePathError
from udf_engine.paths import inside
from udf_engine.settings import Option, read_options

ROOT_VARIABLE = "lake.root"
DEFAULT_ROOT = "lake"
"""The lake root when ``lake.root`` is not set, relative to the working directory."""
DEFAULT_DATABASE = "default"
VERSION_COLUMN = "__delta_version__"
# The options of `load delta` and `save ... as delta`, which docs/statements.md (Delta lake) shows row by row.
# Versions are text here: _as_version reads them, saying what a version is.
PATH_OPTION = Option("mode", None, str, "`path`: the name is a path even without `/` (the only mode)")
VERSION_OPTION = Option("version", None, str, "the version to load; none: the latest", ("versionAsOf",))
LOAD_OPTIONS: tuple[Option, ...] = (
    VERSION_OPTION,
    Option("startingVersion", None, str, f"with endingVersion: each version from this one on, whole, tagged with `{VERSION_COLUMN}`"),
    Option("endingVersion", None, str, "with startingVersion: the first version not loaded (exclusive)"),
    PATH_OPTION,
)
WRITE_OPTIONS: tuple[Option, ...] = (
    Option("idCols", None, str, '`idCols="a,b"`: merge (upsert) on those columns: rows of a key the table has update it, the others '
           "are inserted (save append)"),
    Option("mergeSchema", False, bool, "add the saved rows' new columns to the table's schema (append, merge)"),
    Option("overwriteSchema", False, bool, "replace the table's schema with the saved rows' (overwrite)"),
)
"""What one Delta commit reads: a save's, and a stream's Delta sink's."""
SAVE_OPTIONS: tuple[Option, ...] = (*WRITE_OPTIONS, PATH_OPTION)
TABLE_COLUMNS = ["database", "table", "path"]
HISTORY_COLUMNS = ["version", "timestamp", "operation", "operationParameters", "operationMetrics", "engineInfo"]
SUBCOMMANDS = ("show tables", "info <table>", "history <table>")

# The save modes of the language, as delta-rs names them.
_WRITE_MODES = {OVERWRITE: "overwrite", APPEND: "append", ERROR_IF_EXISTS: "error", IGNORE: "ignore"}
_SCHEMA_HINT = ' (where mergeSchema="true" adds columns, overwriteSchema="true" replaces the schema)'
# Wrappers delta-rs and the Arrow C stream put around the reason (DuckDB's own error, when the query failed).
_WRAPPERS = re.compile(r"^(Generic DeltaTable error|Generic error|External error|Arrow error|C Data interface error|IOError): ")


@dataclass(frozen=True)
class Location:
    """Where a table is: ``name`` (``db.table``, or the path as written), its directory, and whether
    that is under the lake root (``db.table``) rather than a path."""

    name: str
    path: Path
    in_lake: bool

    def exists(self) -> bool:
        return DeltaTable.is_deltatable(str(self.path))


def root_path(root: str | None) -> Path:
    """The lake root directory: ``root`` (the ``lake.root`` variable) or :data:`DEFAULT_ROOT`, absolute."""
    return Path(root or DEFAULT_ROOT).expanduser().resolve()


def locate(target: str, *, root: str | None = None, as_path: bool = False) -> Location:
    """The table ``target`` names: a path, or ``db.table`` / ``table`` under the lake root.

    Example:
        >>> locate("ai_model.m", root="/lake").path.as_posix(), locate("m", root="/lake").name
        ('/lake/ai_model/m', 'default.m')
        >>> locate("/data/t").name
        '/data/t'
    """
    if as_path or "/" in target or Path(target).is_dir():
        return Location(target, Path(target).expanduser().resolve(), in_lake=False)
    parts = target.split(".")
    if len(parts) == 1:
        parts = [DEFAULT_DATABASE, *parts]
    if len(parts) != 2 or not all(parts) or {".", ".."} & set(parts):
        raise ExecutionError(f"delta: {target!r} is neither db.table nor a path (a path holds '/', or add where mode=\"path\")")
    db, table = parts
    try:
        path = inside(root_path(root), f"{db}/{table}", what="delta: the table")
    except UnsafePathError as err:
        raise ExecutionError(str(err)) from None
    return Location(f"{db}.{table}", path, in_lake=True)


def load(con: duckdb.DuckDBPyConnection, table: str, target: str, options: Mapping[str, str], *, root: str | None = None) -> None:
    """``load delta.`target` [where version="N" | startingVersion="a" and endingVersion="b"] as table``.

    ``table`` becomes a DuckDB table holding that version (the latest by default), or the
    versions ``[a, b)`` tagged with :data:`VERSION_COLUMN`.
    """
    values = read_options(options, LOAD_OPTIONS, "load delta")
    location = locate_as(target, values, root=root, what="load delta")
    if not location.exists():
        raise ExecutionError(f"load delta: no Delta table {_described(location)}")
    registered: list[str] = []
    try:
        with _failing(f"load delta: {location.name}"):
            versions = _versions(location)
            tagged = values["startingVersion"] is not None or values["endingVersion"] is not None
            wanted = _range(location, values, versions) if tagged else [_version(location, values, versions)]
            selects = []
            for version in wanted:
                name = f"__rayudf_delta_{table}_{version}"
                con.register(name, DeltaTable(str(location.path), version=version).to_pyarrow_dataset())
                registered.append(name)
                tag = f", {version}::BIGINT AS {VERSION_COLUMN}" if tagged else ""
                selects.append(f"SELECT *{tag} FROM {quote_identifier(name)}")
            replace_relation(con, table, " UNION ALL BY NAME ".join(selects), table=True)
    finally:
        for name in registered:
            con.unregister(name)


def save(
    con: duckdb.DuckDBPyConnection,
    table: str,
    target: str,
    mode: str,
    options: Mapping[str, str],
    partition_by: list[str],
    *,
    root: str | None = None,
) -> None:
    """``save <mode> table as delta.`target` [where idCols="a,b"] [partitionBy c1, c2]``: one atomic commit.

    ``mode`` is overwrite, append, errorIfExists or ignore; ``append`` with ``idCols`` merges.
    """
    values = read_options(options, SAVE_OPTIONS, "save delta")
    location = locate_as(target, values, root=root, what="save delta")
    exists = location.exists()
    if not writes(mode, exists, what=f"save delta: {location.name}", where=f" at {location.path}"):
        return
    if id_columns(values) and mode != APPEND:
        raise ExecutionError(f'save delta: idCols merges rows into the table, so it needs save append (not {mode})')
    with _failing(f"save delta: {location.name}"):
        before = DeltaTable(str(location.path)).version() if exists else None
    with _failing(f"save delta: {location.name}", f"; {_unchanged(location, before)}"), con.cursor() as cursor:
        # its own connection: the stream holds it until delta-rs has read every row
        rows = cursor.sql(f"SELECT * FROM {quote_identifier(table)}").to_arrow_reader()
        write(location, rows, mode, values, partition_by, exists=exists)


def locate_as(target: str, values: Mapping[str, object], *, root: str | None, what: str) -> Location:
    """The table ``target`` names, read as a path where ``values`` (read by a table holding
    :data:`PATH_OPTION`) say mode="path"."""
    mode = values["mode"]
    if mode is not None and mode.lower() != "path":
        raise ExecutionError(f'{what}: mode={mode!r} is not supported (only mode="path", for a path without \'/\')')
    return locate(target, root=root, as_path=mode is not None)


def id_columns(values: Mapping[str, object]) -> list[str]:
    """The columns of ``idCols="a,b"`` (``values`` read by :data:`WRITE_OPTIONS`): a save append on them merges."""
    return [c.strip() for c in (values["idCols"] or "").split(",") if c.strip()]


def write(
    location: Location, rows, mode: str, values: Mapping[str, object], partition_by: list[str], *, exists: bool,
    transaction: tuple[str, int] | None = None,
) -> None:
    """One Delta commit of ``rows`` (Arrow) under ``mode``: a merge on ``idCols`` into a table that exists.
    ``values`` are the options read by :data:`WRITE_OPTIONS`; ``transaction`` is (app id, version)
    recorded in the commit, as Spark's streaming Delta sink does."""
    id_cols = id_columns(values)
    commit = CommitProperties(app_transactions=[Transaction(*transaction)]) if transaction else None
    if exists and id_cols:
        _merge(location, rows, id_cols, values, commit)
    else:
        write_mode, schema_mode = _WRITE_MODES[mode], _schema_mode(values)
        write_deltalake(
            str(location.path), rows, mode=write_mode, partition_by=partition_by or None, schema_mode=schema_mode,
            commit_properties=commit,
        )


def transaction_version(location: Location, app_id: str) -> int | None:
    """The last version ``app_id`` recorded in the table's commits (a stream's last committed batch), or None."""
    if not location.exists():
        return None
    return DeltaTable(str(location.path)).transaction_version(app_id)


def show_tables(*, root: str | None = None) -> pd.DataFrame:
    """``!delta show tables``: every ``db/table`` directory under the lake root that holds a Delta table."""
    lake = root_path(root)
    rows = [
        {"database": db.name, "table": t.name, "path": str(t)}
        for db in sorted(p for p in lake.glob("*") if p.is_dir())
        for t in sorted(db.glob("*"))
        if (t / "_delta_log").is_dir()
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def history(target: str, *, root: str | None = None) -> pd.DataFrame:
    """``!delta info <table>`` (alias ``!delta history``): the table's commits, newest first."""
    location = locate(target, root=root)
    if not location.exists():
        raise ExecutionError(f"!delta info: no Delta table {_described(location)}")
    with _failing(f"!delta info: {location.name}"):
        commits = DeltaTable(str(location.path)).history()
    rows = [
        {
            "version": h["version"],
            "timestamp": pd.to_datetime(h.get("timestamp"), unit="ms"),
            "operation": h.get("operation"),
            "operationParameters": json.dumps(h.get("operationParameters", {}), sort_keys=True),
            "operationMetrics": json.dumps(h.get("operationMetrics", {}), sort_keys=True),
            "engineInfo": h.get("engineInfo"),
        }
        for h in commits
    ]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def command(args: list[str], *, root: str | None = None) -> pd.DataFrame:
    """``!delta show tables``, ``!delta info <table>``, and ``!delta history <table>`` (Byzer's history command), the same."""
    words = [a.lower() for a in args[:2]]
    if words == ["show", "tables"] and len(args) == 2:
        return show_tables(root=root)
    if words[:1] in (["info"], ["history"]) and len(args) == 2:
        return history(args[1], root=root)
    given = " ".join(args) or "(nothing)"
    raise ExecutionError(f"!delta {given}: unknown sub-command (supported: {', '.join('!delta ' + s for s in SUBCOMMANDS)})")


# -- helpers -----------------------------------------------------------------------------


def _described(location: Location) -> str:
    if not location.in_lake:
        return f"at {location.path}"
    root = location.path.parent.parent
    return f"{location.name} (looked for {location.path} under the lake root {root}; !delta show tables lists the tables)"


def _versions(location: Location) -> list[int]:
    return sorted(h["version"] for h in DeltaTable(str(location.path)).history())


def _as_version(key: str, value: str) -> int:
    if not value.strip().isdigit():
        raise ExecutionError(f"load delta: {key} must be a version number (0, 1, ...), not {value!r}")
    return int(value)


def _version(location: Location, values: Mapping[str, str | None], versions: list[int]) -> int:
    if values["version"] is None:
        return versions[-1]
    version = _as_version("version", values["version"])
    if version not in versions:
        raise ExecutionError(f"load delta: {location.name} has no version {version} (versions: {_spans(versions)})")
    return version


def _range(location: Location, values: Mapping[str, str | None], versions: list[int]) -> list[int]:
    if values["startingVersion"] is None or values["endingVersion"] is None or values["version"] is not None:
        raise ExecutionError("load delta: startingVersion and endingVersion go together, and without version")
    start, end = _as_version("startingVersion", values["startingVersion"]), _as_version("endingVersion", values["endingVersion"])
    if end <= start:
        raise ExecutionError(f"load delta: endingVersion ({end}) is exclusive, so it must be greater than startingVersion ({start})")
    missing = [v for v in range(start, end) if v not in versions]
    if missing:
        raise ExecutionError(f"load delta: {location.name} has no version {missing[0]} (versions: {_spans(versions)})")
    return list(range(start, end))


def _spans(versions: list[int]) -> str:
    """``0-3, 7``: runs of consecutive versions, so a long history stays one short line."""
    spans: list[list[int]] = []
    for v in versions:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _schema_mode(values: Mapping[str, object]) -> str | None:
    if values["overwriteSchema"]:
        return "overwrite"
    return "merge" if values["mergeSchema"] else None


def _merge(location: Location, rows, id_cols: list[str], values: Mapping[str, object], commit: CommitProperties | None) -> None:
    missing = [c for c in id_cols if c not in rows.schema.names]
    if missing:
        columns = ", ".join(rows.schema.names)
        raise ExecutionError(f"save delta: idCols {missing[0]!r} is not a column of the saved table (columns: {columns})")
    predicate = " AND ".join(f"target.{quote_identifier(c)} = source.{quote_identifier(c)}" for c in id_cols)
    table = DeltaTable(str(location.path))
    merger = table.merge(
        rows, predicate, source_alias="source", target_alias="target", merge_schema=_schema_mode(values) == "merge",
        commit_properties=commit,
    )
    merger.when_matched_update_all().when_not_matched_insert_all().execute()


@contextmanager
def _failing(what: str, after: str = "") -> Iterator[None]:
    """delta-rs's and DuckDB's errors as one line: ``what: <reason><after>``."""
    try:
        yield
    except ExecutionError:
        raise
    except duckdb.Error as err:
        raise ExecutionError(f"{what}: {clean_duckdb_error(err)}{after}") from None
    except Exception as err:  # noqa: BLE001 - delta-rs raises plain Exception for some errors
        hint = _SCHEMA_HINT if isinstance(err, SchemaMismatchError) else ""
        raise ExecutionError(f"{what}: {_reason(err)}{hint}{after}") from None


def _reason(err: Exception) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    while (stripped := _WRAPPERS.sub("", text, count=1)) != text:
        text = stripped
    return text


def _unchanged(location: Location, before: int | None) -> str:
    return "nothing was written" if before is None else f"{location.name} is still at version {before}"
