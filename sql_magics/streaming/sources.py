"""Where a stream's rows come from: files that appear in a directory, the versions a Delta table gains, Byzer's mockStream.

Each source answers three questions: what the next micro-batch reads (:meth:`next_input`, a
JSON-able record the checkpoint keeps before the batch runs), how to make the stream's table
hold those rows (:meth:`bind`, the same rows again when a restart re-runs the batch), and how
much input waits (:meth:`lag`). :meth:`resume` replays the records of the batches before.
Each answers the whole :class:`Source` protocol, so the stream's loop never asks which kind it
has: a source without files of its own (Delta versions, mock rows) has no bad, gone or skipped
input. Each declares its options in a table (``OPTIONS``) that docs/streaming.md shows row by row.

Example:
    >>> import duckdb, tempfile, pathlib
    >>> con, folder = duckdb.connect(), pathlib.Path(tempfile.mkdtemp())
    >>> _ = con.execute(f"copy (select 1 as x) to '{folder}/a.parquet'")
    >>> source = FileSource("parquet", str(folder), {}, "events")
    >>> batch = source.next_input(con)
    >>> [pathlib.Path(f).name for f in batch["files"]], source.next_input(con)
    (['a.parquet'], None)
    >>> source.bind(con, batch)
    >>> con.execute("select x from events").fetchall()
    [(1,)]
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import duckdb
import pyarrow as pa
from deltalake import DeltaTable

from sql_magics.byzer.schemas import parse_schema
from sql_magics.errors import ExecutionError
from sql_magics.streaming.faults import reading
from sql_magics.streaming.read_errors import BadFileError, TransientReadError, read_failure
from sql_magics.tables import formats, lake
from sql_magics.tables.catalog import loaded_table, replace_relation, table_from_arrow
from udf_engine.settings import Option, read_options

MOCK_FORMAT = "mockStream"
KAFKA_FORMATS = ("kafka", "kafka8", "kafka9")
STREAM_ONLY_FORMATS = (MOCK_FORMAT.lower(), *KAFKA_FORMATS)
"""Formats only a stream loads: a batch script's load of one is refused, saying how to make a stream."""
# Python's Kafka clients; with none installed a Kafka source is refused naming them.
_KAFKA_CLIENTS = ("confluent_kafka", "kafka")
# At most this many new files go in one micro-batch unless maxFilesPerTrigger says otherwise
# (Spark's default for file sources: a backlog is read in batches, not all at once).
MAX_FILES_PER_TRIGGER = 1000
# A directory is listed again, even with its mtime unchanged, unless its last listing came this
# long after that mtime: a file renamed in within a filesystem's timestamp granularity of a
# listing may leave the directory's mtime as it was.
RELIST_WITHIN_NS = 2_000_000_000
# And every directory is listed again this often, whatever its times say: a file server's clock
# may lag this machine's.
RELIST_ALL_NS = 30_000_000_000
MOCK_VALUE_COLUMN = "kafkaValue"
"""With ``valueFormat``, mockStream's rows are the fields of ``value`` plus the other columns in this struct (Byzer's name)."""


class Source(Protocol):
    table: str  # the table the stream's selects read
    skip_bad: bool  # on_bad_file="skip": a malformed input is recorded in its batch's offsets and left out
    schema: list[list[str]] | None  # [[column, type], ...] of the stream's input, where the checkpoint keeps it (files)

    def description(self) -> str:
        """What the source reads, as the checkpoint's identity of it: ``parquet:/data/in``."""
        ...

    def resume(self, offsets: list[tuple[int, dict]]) -> None:
        """Take up after the batches the checkpoint recorded (in batch order: its compact record, which stands for
        the batches it covers, then each record after it)."""
        ...

    def next_input(self, con: duckdb.DuckDBPyConnection) -> dict | None:
        """What the next micro-batch reads (and from then on counts as read), or None when nothing new waits."""
        ...

    def bind(self, con: duckdb.DuckDBPyConnection, offsets: dict) -> None:
        """Make :attr:`table` hold the rows of a batch that read ``offsets``."""
        ...

    def merged(self, records: list[dict]) -> dict:
        """One record that reads what the batches of ``records`` (consecutive, from the first) read:
        all the rows so far, which mode="Complete" runs its selects over, and the record a
        checkpoint compacts them into, so it keeps all that :meth:`resume` needs of them."""
        ...

    def lag(self) -> int:
        """Input that waits to be read: files, Delta versions, mock rows."""
        ...

    def drained(self) -> bool:
        """After :meth:`next_input` found nothing: whether nothing is left for ``trigger="once"`` (a mock may send 0 rows)."""
        ...

    def until_now(self) -> None:
        """From now on read only the input there is now (``trigger="once"``, Spark's available-now), so that a
        producer that keeps adding, or a mock that recycles, does not keep the run going."""
        ...

    def gone(self, offsets: dict) -> dict:
        """``offsets`` without the input removed since they were recorded (each recorded as skipped), for a
        batch that never committed; ``offsets`` itself (the same object) when none is gone."""
        ...

    def culprit(self, con: duckdb.DuckDBPyConnection, offsets: dict) -> BadFileError | None:
        """After a batch failed reading ``offsets``: the first malformed input, if one is to blame. Raises
        :class:`TransientReadError` if reading one failed for a reason that may pass (it is not to blame)."""
        ...

    def skip(self, offsets: dict, bad: BadFileError) -> dict:
        """``offsets`` without the input ``bad`` names, recorded as skipped (on_bad_file="skip")."""
        ...

    def reads_nothing(self, offsets: dict) -> bool:
        """Whether a batch of ``offsets`` has no input left to read (every file of it bad and skipped)."""
        ...


def is_source(fmt: str, path: str, options: Mapping[str, str]) -> bool:
    """Whether a stream script's ``load`` of ``fmt.`path``` is the stream's source; else it is of a fixed table
    (a single file, a Delta ``version``), which loads as in a batch script."""
    lowered = fmt.lower()
    if lowered in STREAM_ONLY_FORMATS:
        return True
    if lowered == formats.LAKE_FORMAT:
        return not any(name in options for name in (lake.VERSION_OPTION.name, *lake.VERSION_OPTION.aliases))
    return lowered in formats.FILE_FORMATS and not Path(path).is_file()


def source_for(
    con: duckdb.DuckDBPyConnection, fmt: str, path: str, options: Mapping[str, str], table: str, *, lake_root: str | None
) -> Source:
    """The stream source a stream script's ``load`` names (one :func:`is_source` says is a source)."""
    lowered = fmt.lower()
    if lowered in KAFKA_FORMATS:
        raise _no_kafka(fmt, path)
    if lowered == MOCK_FORMAT.lower():
        return MockSource(con, path, options, table)
    if lowered == formats.LAKE_FORMAT:
        return DeltaSource(path, options, table, root=lake_root)
    return FileSource(lowered, path, options, table)


def batch_load_error(fmt: str, path: str) -> ExecutionError:
    """Why a script that is not a stream cannot load ``fmt``, a format only a stream reads (:data:`STREAM_ONLY_FORMATS`)."""
    if fmt.lower() in KAFKA_FORMATS:
        return _no_kafka(fmt, path)
    return ExecutionError(
        f'load {fmt}.`{path}`: {MOCK_FORMAT} is a stream source; a stream script starts with set streamName="name" '
        "(docs/streaming.md)"
    )


def _no_kafka(fmt: str, path: str) -> ExecutionError:
    installed = [name for name in _KAFKA_CLIENTS if importlib.util.find_spec(name)]
    found = f"the Kafka client {installed[0]} is installed, but" if installed else "no Kafka client is installed and"
    return ExecutionError(
        f"load {fmt}.`{path}`: Kafka is not available here ({found} rayudf reads no Kafka topic); "
        f"stream from files, a Delta table or {MOCK_FORMAT}.`table` (docs/streaming.md)"
    )


def _hidden(name: str) -> bool:
    """Spark's rule: names starting with ``.`` or ``_`` are not data (files being written, _SUCCESS, _delta_log)."""
    return name.startswith((".", "_"))


class FileSource:
    """New files under a directory (and its sub-directories) or matching a glob: each file is read once."""

    # Its own options. Every other option of the load is the reader's (read_parquet's, read_csv's,
    # read_json's: header, delimiter, ...), passed to DuckDB as a batch load passes them: DuckDB's
    # to check, so no table of ours names them.
    OPTIONS: tuple[Option, ...] = (
        Option("maxFilesPerTrigger", MAX_FILES_PER_TRIGGER, int, "at most this many new files a batch"),
    )

    def __init__(self, fmt: str, path: str, options: Mapping[str, str], table: str) -> None:
        self.table = table
        self.fmt = fmt
        self.path = path
        own = {opt.name for opt in self.OPTIONS}
        values = read_options({k: v for k, v in options.items() if k in own}, self.OPTIONS, f"load {fmt} (stream)")
        self.max_files = values["maxFilesPerTrigger"]
        if self.max_files < 1:
            raise ExecutionError(f"load {fmt} (stream): maxFilesPerTrigger must be at least 1, not {self.max_files}")
        self.options = {k: v for k, v in options.items() if k not in own}  # the reader's own options (header, delimiter, ...)
        self.seen: set[str] = set()  # every file a batch read (or skipped), absolute
        self.schema: list[list[str]] | None = None  # [[column, type], ...] of the stream's files, from the first file read
        self._waiting = 0  # new files the last listing found beyond those taken
        self._listed: dict[str, tuple] = {}  # directory -> (its ctime, when listed, files, sub-directories)
        self._sorted: list[str] | None = None  # the last listing, oldest first
        self._until: set[str] | None = None  # trigger="once": the files there when it started
        self.skip_bad = False  # on_bad_file="skip": a bad file is recorded in the batch's offsets and not read

    def description(self) -> str:
        return f"{self.fmt}:{os.path.abspath(os.path.expanduser(self.path))}"

    def resume(self, offsets: list[tuple[int, dict]]) -> None:
        for _, record in offsets:
            self.seen.update(record.get("files", []))
            self.seen.update(s["file"] for s in record.get("skipped", []))
            self.schema = self.schema or record.get("schema")

    def until_now(self) -> None:
        self._until = set(self.listing())

    def listing(self) -> list[str]:
        """The data files there now, oldest first (by modification time, then name)."""
        root = Path(self.path).expanduser()
        if root.is_dir():
            stamped, changed = self._walk(os.path.abspath(root))
            if not changed and self._sorted is not None:
                return self._sorted
            self._sorted = [name for _, name in sorted(stamped)]
            return self._sorted
        fixed = _fixed_part(os.path.expanduser(self.path))
        found: dict[str, int] = {}  # path -> mtime (a file a matched directory holds may match too)
        for name in glob.glob(os.path.expanduser(self.path), recursive=True):
            if any(_hidden(part) for part in Path(os.path.relpath(name, fixed)).parts):
                continue  # a directory being written (_temporary), or a hidden name, on the way to it
            try:
                if os.path.isdir(name):  # a matched directory: the files in it, as Spark reads them
                    for mtime, path in self._walk(os.path.abspath(name))[0]:
                        found.setdefault(path, mtime)
                elif os.path.isfile(name):
                    found.setdefault(os.path.abspath(name), os.stat(name).st_mtime_ns)
            except FileNotFoundError:  # renamed away between the listing and the stat
                continue
        return [name for _, name in sorted((mtime, path) for path, mtime in found.items())]

    def _walk(self, root: str) -> tuple[list[tuple[int, str]], bool]:
        """(mtime, path) of the files under ``root``, and whether a directory was listed again. A
        directory whose ctime is what it was, well before its last listing, has the same entries:
        only the others are listed again, so that a stream waiting on a directory of many files
        looks at it often for little. (The ctime, not the mtime: ``touch -r``, ``tar`` or ``cp -a``
        can set a directory's mtime back to what it was, nothing sets its ctime.)"""
        found, stack, changed = [], [root], False
        now = time.time_ns()
        while stack:
            directory = stack.pop()
            try:
                modified = os.stat(directory).st_ctime_ns
            except FileNotFoundError:
                changed = True
                continue
            cached = self._listed.get(directory)
            if (
                cached is None or cached[0] != modified or cached[1] - modified < RELIST_WITHIN_NS
                or now - cached[1] > RELIST_ALL_NS
            ):
                known = cached[2] if cached is not None else {}
                cached = (modified, now, *self._scan(directory, known))
                self._listed[directory] = cached
                changed = True
            found += [(mtime, path) for path, mtime in cached[2].items()]
            stack += cached[3]
        return found, changed

    @staticmethod
    def _scan(directory: str, known: dict[str, int]) -> tuple[dict[str, int], list[str]]:
        """A directory's files (path -> mtime; a file listed before keeps the mtime it had) and sub-directories."""
        files, subdirectories = {}, []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if _hidden(entry.name):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirectories.append(entry.path)
                        elif entry.path in known:
                            files[entry.path] = known[entry.path]
                        elif entry.is_file():
                            files[entry.path] = entry.stat().st_mtime_ns
                    except FileNotFoundError:  # renamed away while listed
                        continue
        except FileNotFoundError:
            pass
        return files, subdirectories

    def next_input(self, con: duckdb.DuckDBPyConnection) -> dict | None:
        """Raises :class:`TransientReadError` if a new file could not be probed for a reason that may pass:
        nothing then counts as read, and the next call probes the same files again."""
        new = [f for f in self.listing() if f not in self.seen and (self._until is None or f in self._until)]
        taken, self._waiting = new[: self.max_files], max(0, len(new) - self.max_files)
        schema = self.schema
        files, skipped = [], []
        for path in taken:
            try:
                schema = self._check(con, path, schema)
            except BadFileError as bad:
                if not self.skip_bad:
                    raise
                skipped.append({"file": path, "reason": bad.reason})
                continue
            files.append(path)
        if not files and not skipped:
            return None
        self.seen.update(taken)
        record: dict = {"files": files}
        if skipped:
            record["skipped"] = skipped
        if self.schema is None and schema is not None:  # the first file read: the stream's columns, kept with the batch
            self.schema = record["schema"] = schema
        return record

    def _columns(self, con: duckdb.DuckDBPyConnection, path: str) -> list[list[str]]:
        with con.cursor() as cursor:
            try:
                with reading("probe"):
                    rows = cursor.execute(f"DESCRIBE SELECT * FROM {formats.reader_sql(self.fmt, [path], self.options)}").fetchall()
            except (duckdb.Error, OSError, MemoryError) as err:
                raise read_failure(path, err) from None
        # CSV and JSON types are guessed from each file's values, so only their names must agree
        return [[name, kind if self.fmt == "parquet" else ""] for name, kind, *_ in rows]

    def _check(self, con: duckdb.DuckDBPyConnection, path: str, schema: list[list[str]] | None) -> list[list[str]]:
        """The stream's columns once ``path`` is read: ``schema``, or the file's own if it is the first file."""
        columns = self._columns(con, path)
        if schema is not None and columns != schema:
            shown = ", ".join(" ".join(c).strip() for c in columns)
            wanted = ", ".join(" ".join(c).strip() for c in schema)
            raise BadFileError(path, f"its columns are ({shown}), the stream's files have ({wanted})")
        return columns

    def culprit(self, con: duckdb.DuckDBPyConnection, offsets: dict) -> BadFileError | None:
        """After a batch failed reading its files: the first file that is malformed, if one is. Raises
        :class:`TransientReadError` if reading one failed for a reason that may pass (it is not to blame)."""
        for path in offsets.get("files", []):
            with con.cursor() as cursor:
                try:
                    with reading("culprit"):
                        cursor.sql(f"SELECT * FROM {formats.reader_sql(self.fmt, [path], self.options)}").to_arrow_table()
                except (duckdb.Error, OSError, MemoryError) as err:
                    failure = read_failure(path, err)
                    if isinstance(failure, TransientReadError):
                        raise failure from None
                    return failure
        return None

    def bind(self, con: duckdb.DuckDBPyConnection, offsets: dict) -> None:
        # A view of read_parquet([...]) keeps the batch on the worker path where its query allows.
        replace_relation(con, self.table, f"SELECT * FROM {formats.reader_sql(self.fmt, offsets['files'], self.options)}")

    def merged(self, records: list[dict]) -> dict:
        merged: dict = {"files": [f for record in records for f in record.get("files", [])]}
        if skipped := [s for record in records for s in record.get("skipped", [])]:
            merged["skipped"] = skipped  # so that a restart from a compacted checkpoint never reads them again
        if schema := next((record["schema"] for record in records if record.get("schema")), None):
            merged["schema"] = schema
        return merged

    def lag(self) -> int:
        return self._waiting

    def drained(self) -> bool:
        return True  # asked when next_input found nothing: no file waits

    def gone(self, offsets: dict) -> dict:
        """``offsets`` without the files removed since they were recorded (a batch that never
        committed re-runs without them, each recorded as skipped)."""
        missing = [f for f in offsets.get("files", []) if not os.path.exists(f)]
        if not missing:
            return offsets
        return _without(offsets, {f: "removed before its batch committed" for f in missing})

    def skip(self, offsets: dict, bad: BadFileError) -> dict:
        return _without(offsets, {bad.path: bad.reason})

    def reads_nothing(self, offsets: dict) -> bool:
        return not offsets.get("files")


def _without(offsets: dict, reasons: dict[str, str]) -> dict:
    """A file source's ``offsets`` without the files ``reasons`` names, each recorded as skipped for its reason."""
    return {
        **offsets,
        "files": [f for f in offsets["files"] if f not in reasons],
        "skipped": [*offsets.get("skipped", []), *({"file": f, "reason": why} for f, why in reasons.items())],
    }


class _NoFiles:
    """The protocol's answers for a source that reads no files of its own (Delta versions, mock rows):
    none of its input is malformed, gone or skipped, and the checkpoint keeps no columns of it."""

    skip_bad = False  # nothing to skip
    schema: list[list[str]] | None = None

    def gone(self, offsets: dict) -> dict:
        return offsets

    def culprit(self, con: duckdb.DuckDBPyConnection, offsets: dict) -> BadFileError | None:
        return None  # a failed batch is the error's own, or a read that may pass

    def skip(self, offsets: dict, bad: BadFileError) -> dict:
        raise AssertionError(f"{type(self).__name__} blames no input, so skips none")  # culprit() is always None

    def reads_nothing(self, offsets: dict) -> bool:
        return False


def _fixed_part(pattern: str) -> str:
    """The directory a glob's matches are under: its parts before the first with a wildcard."""
    parts = []
    for part in Path(pattern).parts:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return os.path.join(*parts) if parts else "."


class DeltaSource(_NoFiles):
    """The rows a Delta table's new versions append, as Spark's Delta source reads them.

    Without ``startingVersion`` the first batch is the table as it is, then each batch the
    versions committed since; ``startingVersion="N"`` starts with version N's added rows
    (``"latest"``: only what comes next). A version that removes or rewrites rows (a delete,
    an overwrite, a merge) stops the stream, unless ``ignoreChanges="true"``, which reads the
    files it adds again (so rows may come twice, as in Spark).
    """

    OPTIONS: tuple[Option, ...] = (
        Option(
            "startingVersion", None, str, "a version number (its rows first) or `latest` (only what comes next); none: the table "
            "as it is, then the rows each new version appends",
        ),
        Option(
            "ignoreChanges", False, bool, "a version that removes or rewrites rows (a delete, an overwrite, a merge) is read for "
            "the files it adds, so rows may come again, instead of stopping the stream",
        ),
        lake.PATH_OPTION,
    )

    def __init__(self, path: str, options: Mapping[str, str], table: str, *, root: str | None) -> None:
        values = read_options(options, self.OPTIONS, "load delta (stream)")
        self.table = table
        self.location = lake.locate_as(path, values, root=root, what="load delta")
        if not self.location.exists():
            raise ExecutionError(f"load delta: no Delta table at {self.location.path} (a stream reads a table that exists)")
        self.starting = values["startingVersion"]
        self.ignore_changes = values["ignoreChanges"]
        self.next_version: int | None = None  # the first version not read yet (None: not started)
        self._table = DeltaTable(str(self.location.path))  # brought up to date at each poll
        self._until: int | None = None  # trigger="once": the latest version when it started

    def description(self) -> str:
        return f"delta:{self.location.path}"

    def _latest(self) -> int:
        if self._until is not None:
            return self._until
        self._table.update_incremental()
        return self._table.version()

    def until_now(self) -> None:
        self._until = self._latest()

    def resume(self, offsets: list[tuple[int, dict]]) -> None:
        if offsets:
            self.next_version = offsets[-1][1]["to"] + 1

    def next_input(self, con: duckdb.DuckDBPyConnection) -> dict | None:
        latest = self._latest()
        if self.next_version is None:
            if self.starting is None:
                self.next_version = latest + 1
                return {"snapshot": True, "from": latest, "to": latest}
            if self.starting.lower() == "latest":
                self.next_version = latest + 1
            elif self.starting.isdigit():
                self.next_version = int(self.starting)
            else:
                raise ExecutionError(f'load delta: startingVersion must be a version number or "latest", not {self.starting!r}')
        if latest < self.next_version:
            return None
        first = self.next_version
        for version in range(first, latest + 1):
            self._added(version)  # refuses a version that removes rows, before the batch counts it as read
        self.next_version = latest + 1
        return {"from": first, "to": latest}

    def _files(self, version: int) -> set[str]:
        if version < 0:
            return set()
        actions = pa.table(DeltaTable(str(self.location.path), version=version).get_add_actions(flatten=True))
        return set(actions.column("path").to_pylist())

    def _added(self, version: int) -> set[str]:
        before, after = self._files(version - 1), self._files(version)
        if before - after and not self.ignore_changes:
            operation = DeltaTable(str(self.location.path), version=version).history(1)[0].get("operation", "?")
            raise ExecutionError(
                f"load delta: version {version} of {self.location.name} removes or rewrites rows ({operation}); a stream reads "
                'only appends (where ignoreChanges="true" reads the files such a version adds, so rows may come again)'
            )
        return after - before

    def bind(self, con: duckdb.DuckDBPyConnection, offsets: dict) -> None:
        import pyarrow.dataset as ds

        fragments, schema = [], None
        for version in range(offsets["from"], offsets["to"] + 1):
            dataset = DeltaTable(str(self.location.path), version=version).to_pyarrow_dataset()
            whole = offsets.get("snapshot") and version == offsets["from"]  # the table as it was, then what each version adds
            wanted = None if whole else self._added(version)
            fragments += [f for f in dataset.get_fragments() if wanted is None or f.path in wanted]
            schema, fmt, filesystem = dataset.schema, dataset.format, dataset.filesystem
        rows = ds.FileSystemDataset(fragments, schema, fmt, filesystem).to_table()
        table_from_arrow(con, self.table, rows)

    def merged(self, records: list[dict]) -> dict:
        return {"from": records[0]["from"], "to": records[-1]["to"], "snapshot": records[0].get("snapshot", False)}

    def lag(self) -> int:
        if self.next_version is None:
            return 1
        return max(0, self._latest() + 1 - self.next_version)

    def drained(self) -> bool:
        return True  # asked when next_input found nothing: no version waits


class MockSource(_NoFiles):
    """Byzer's mockStream: each trigger sends the next a-b rows (``stepSizeRange="a-b"``, drawn at random) of a table.

    ``recycle="true"`` starts over at the end (the stream never runs dry); ``valueFormat="csv"``
    or ``"json"`` with ``valueSchema="st(field(a,string),...)"`` parses the ``value`` column into
    those columns, the row's other columns going in a :data:`MOCK_VALUE_COLUMN` struct.
    """

    OPTIONS: tuple[Option, ...] = (
        Option("stepSizeRange", "0-3", str, "`a-b`: each batch sends the next a to b rows, drawn at random, until the table is all sent"),
        Option("recycle", False, bool, "start over at the end: the stream never runs dry"),
        Option(
            "valueFormat", None, str, f"`csv` or `json`: the `value` column parsed into the valueSchema columns, the other "
            f"columns in one struct column `{MOCK_VALUE_COLUMN}` (as Byzer does)",
        ),
        Option("valueSchema", None, str, "the columns valueFormat parses `value` into: `st(field(a,string),...)`"),
    )

    def __init__(self, con: duckdb.DuckDBPyConnection, name: str, options: Mapping[str, str], table: str) -> None:
        values = read_options(options, self.OPTIONS, f"load {MOCK_FORMAT}")
        rows = loaded_table(con, name)
        if rows is None:
            raise ExecutionError(f"load {MOCK_FORMAT}.`{name}`: no table {name} (load it first, e.g. load jsonStr.`data` as {name})")
        self.table = table
        self.name = name
        self.rows = rows  # the table as the stream started: the stream's rows, in order
        self.low, self.high = _step_range(values["stepSizeRange"])
        self.recycle = values["recycle"]
        self.value_format = (values["valueFormat"] or "").lower()
        if self.value_format not in ("", "csv", "json"):
            raise ExecutionError(f'load {MOCK_FORMAT}: valueFormat {self.value_format!r} is not supported (supported: csv, json)')
        if self.value_format and values["valueSchema"] is None:
            raise ExecutionError(f'load {MOCK_FORMAT}: valueFormat parses value into the columns of valueSchema="st(field(a,string),...)"')
        self.value_schema = parse_schema(values["valueSchema"]) if self.value_format else None
        if self.value_format and "value" not in rows.column_names:
            raise ExecutionError(f"load {MOCK_FORMAT}: valueFormat parses a value column, and {name} has none")
        self.position = 0  # rows sent so far
        self.end: int | None = None if self.recycle else rows.num_rows  # the position it stops at (None: never)
        self._random = random.Random()

    def description(self) -> str:
        return f"{MOCK_FORMAT}:{self.name}"

    def resume(self, offsets: list[tuple[int, dict]]) -> None:
        if offsets:
            self.position = offsets[-1][1]["end"]

    def drained(self) -> bool:
        """Whether every row was sent (after :meth:`until_now`, a recycling mock: the table once more)."""
        return self.end is not None and self.position >= self.end

    def until_now(self) -> None:
        if self.end is None:
            self.end = self.position + self.rows.num_rows

    def next_input(self, con: duckdb.DuckDBPyConnection) -> dict | None:
        if self.rows.num_rows == 0 or self.drained():
            return None
        step = self._random.randint(self.low, self.high)
        if self.end is not None:
            step = min(step, self.end - self.position)
        if step == 0:
            return None
        start, self.position = self.position, self.position + step
        return {"start": start, "end": self.position}

    def bind(self, con: duckdb.DuckDBPyConnection, offsets: dict) -> None:
        count = self.rows.num_rows
        taken = self.rows.take(pa.array([i % count for i in range(offsets["start"], offsets["end"])], pa.int64()))
        table_from_arrow(con, self.table, self._parsed(taken) if self.value_format else taken)

    def merged(self, records: list[dict]) -> dict:
        return {"start": records[0]["start"], "end": records[-1]["end"]}

    def _parsed(self, rows: pa.Table) -> pa.Table:
        schema = self.value_schema
        values = [str(v) if v is not None else "" for v in rows.column("value").to_pylist()]
        if self.value_format == "csv":
            # each value alone: a reader over them all would skip an empty one and misalign the rows
            records = [dict(zip(schema.names, next(csv.reader([v]), []), strict=False)) for v in values]
        else:
            records = [json.loads(v) if v else {} for v in values]
        columns = {}
        for field in schema:
            raw = [r.get(field.name) for r in records]
            try:  # CSV fields are text, to be cast; JSON's are typed already
                text = self.value_format == "csv"
                columns[field.name] = pa.array(raw, pa.string()).cast(field.type) if text else pa.array(raw, field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
                raise ExecutionError(f"load {MOCK_FORMAT}: value field {field.name} is not a {field.type}: {err}") from None
        others = rows.drop_columns(["value"])
        columns[MOCK_VALUE_COLUMN] = pa.StructArray.from_arrays(
            [others.column(n).combine_chunks() for n in others.column_names], others.column_names
        ) if others.num_columns else pa.nulls(rows.num_rows)
        return pa.table(columns)

    def lag(self) -> int:
        return 0 if self.recycle else max(0, self.rows.num_rows - self.position)


def _step_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit() or int(low) > int(high) or int(high) == 0:
        raise ExecutionError(f'load {MOCK_FORMAT}: stepSizeRange must be "a-b" with 0 <= a <= b and b > 0, not {text!r}')
    return int(low), int(high)
