"""One stream: its script gathered (:class:`StreamDraft`) and its loop of micro-batches (:class:`StreamQuery`).

A stream script is read as Byzer reads one: ``set streamName="name"`` makes it a stream, a
``load`` of a directory, a Delta table or ``mockStream`` is its source, the selects that read
the source (or a select that does) wait, and ``save append <table> as <sink> options
duration="10" and checkpointLocation="/ck"`` starts it. Each micro-batch then makes the
source's table hold the batch's rows (with mode="Complete", all the rows so far), runs those
selects as written, stages the saved table's rows and has the sink commit them; the
checkpoint records the input before and the commit after, so a restart re-runs at most one
batch, which the sinks write once.

Example:
    >>> draft = StreamDraft("scores")
    >>> draft.read_from(source)                                                   # doctest: +SKIP
    >>> draft.reads("select id, f(x) as p from events"), draft.reads("select 1")  # doctest: +SKIP
    (True, False)
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow.parquet as pq

from arrow_bridge.quoting import quote_identifier
from sql_magics.errors import ExecutionError
from sql_magics.models.registry import FunctionRegistry
from sql_magics.streaming.checkpoint import Checkpoint
from sql_magics.streaming.faults import reached, reading
from sql_magics.streaming.read_errors import TransientReadError, transient
from sql_magics.streaming.sinks import Sink, sink_for
from sql_magics.streaming.sources import Source
from sql_magics.tables import formats
from sql_magics.tables.catalog import replace_relation
from sql_magics.tables.database import Database
from udf_engine.errors import RayUDFError
from udf_engine.settings import Option, read_options

STREAM_NAME = "streamName"
"""The variable whose ``set`` makes a script a stream (Byzer's)."""
APPEND, COMPLETE = "append", "complete"
OUTPUT_MODES = (APPEND, COMPLETE)
"""Spark's output modes a stream runs: Append (each batch's rows are added) and Complete (each
batch's selects run over all the input so far, and the sink's content is replaced by their rows).
Update is refused."""
ONCE_TRIGGERS = ("once", "availableNow")
BAD_FILE_CHOICES = ("fail", "skip")
# The options of a stream's `save` that are the stream's own; the others are the sink's. docs/streaming.md
# shows them row by row. They are text here: Trigger.of reads them, saying what each takes.
STREAM_OPTIONS: tuple[Option, ...] = (
    Option("checkpointLocation", None, str, "required: the stream's checkpoint directory (below); one per stream"),
    Option(
        "duration", "0", str, "seconds between the starts of two micro-batches; 0: the next as soon as the last commits (and, "
        "with nothing new, a look every 0.05 s)",
    ),
    Option("trigger", None, str, "`once` (or `availableNow`): what is there, then return"),
    Option(
        "mode", "Append", str, "Spark's output mode: `Append` adds each batch's rows; `Complete` replaces the sink's content with "
        "the selects over all the input so far (Output modes)",
    ),
    Option(
        "on_bad_file", BAD_FILE_CHOICES[0], str, "`fail`: a malformed file stops the stream; `skip`: it is recorded and left out; "
        "either way a read that fails for a reason that may pass is retried (Bad files)",
    ),
)
STREAM_OPTION_NAMES = tuple(opt.name for opt in STREAM_OPTIONS)
# With duration="0" and nothing new, how long to wait before looking again: a directory listing
# or a Delta log poll costs well under a millisecond, and 50 ms is little next to a batch.
IDLE_POLL_S = 0.05
# How long !kill and a session's close wait for a stream's batch to commit before giving up on it.
STOP_TIMEOUT_S = 600.0
# The pauses before each new try of a batch whose files could not be read for a reason that may
# pass (EIO, ESTALE, too many open files, out of memory): 5 more tries over 15.5 s, doubling from
# half a second, outlast what clears by itself (another query's files or memory freed, an NFS
# client revalidating its handles). What lasts longer needs a person: the stream stops naming the
# file, and a restart takes up that batch exactly where it stopped.
READ_RETRY_PAUSES_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# How many of a batch's files a message names before "and N more".
NAMED_FILES = 3

T = TypeVar("T")

RUNNING, WAITING, STOPPED, FINISHED, FAILED = "running", "waiting", "stopped", "finished", "failed"

_log = logging.getLogger(__name__)


def _named(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w$]){re.escape(name)}(?![\w$])", re.I)


@dataclass
class StreamDraft:
    """What a stream script has said so far: its name, its source and the selects over it."""

    name: str
    source: Source | None = None
    chain: list[tuple[str, str]] = field(default_factory=list)  # (table, DuckDB query) of each select that reads the stream
    started: bool = False

    def read_from(self, source: Source) -> None:
        if self.source is not None:
            raise ExecutionError(
                f"stream {self.name}: a stream reads one source, and {self.source.table} is it already "
                f"(load {source.table} from a single file, or as a batch script)"
            )
        self.source = source

    def tables(self) -> list[str]:
        """The stream's tables: the source's and each waiting select's."""
        return ([self.source.table] if self.source else []) + [table for table, _ in self.chain]

    def reads(self, query: str) -> bool:
        """Whether a query reads one of the stream's tables (then it runs in each batch, not now)."""
        return any(_named(table).search(query) for table in self.tables())

    def defer(self, table: str, query: str) -> None:
        self.chain = [(t, q) for t, q in self.chain if t.lower() != table.lower()] + [(table, query)]


@dataclass(frozen=True)
class Trigger:
    """When batches run: every ``duration`` seconds (0: back to back), or ``once`` over what is there."""

    duration: float
    once: bool
    skip_bad: bool
    complete: bool  # mode="Complete": the selects run over all the input so far, the sink's content replaced

    @classmethod
    def of(cls, values: Mapping[str, str | None], what: str) -> Trigger:
        """The trigger ``values`` say (a stream's options, read by :data:`STREAM_OPTIONS`)."""
        try:
            duration = float(values["duration"])
        except ValueError:
            raise ExecutionError(f'{what}: duration must be seconds (duration="10"), not {values["duration"]!r}') from None
        if duration < 0:
            raise ExecutionError(f"{what}: duration must be 0 or more seconds, not {duration:g}")
        trigger = values["trigger"]
        if trigger and trigger.lower() not in (t.lower() for t in ONCE_TRIGGERS):
            raise ExecutionError(f'{what}: trigger {trigger!r} is not supported (trigger="once" runs what is there and returns)')
        mode = values["mode"]
        if mode.lower() not in OUTPUT_MODES:
            raise ExecutionError(
                f'{what}: mode={mode!r} is not supported; mode="Append" adds each batch\'s rows, mode="Complete" '
                "replaces the sink's content with the selects over all the input so far"
            )
        bad = values["on_bad_file"].lower()
        if bad not in BAD_FILE_CHOICES:
            raise ExecutionError(f"{what}: on_bad_file must be one of {', '.join(BAD_FILE_CHOICES)}, not {bad!r}")
        return cls(duration, bool(trigger), bad == "skip", mode.lower() == COMPLETE)


class StreamQuery:
    """A started stream: its checkpoint, source, selects and sink, and the loop that runs its batches.

    :meth:`run` runs it in the calling thread (``trigger="once"``), :meth:`start` in a thread of
    its own until :meth:`stop`, which lets the batch in progress commit.
    """

    def __init__(
        self, draft: StreamDraft, output: str, sink: Sink, trigger: Trigger, checkpoint: str, db: Database,
        registry: FunctionRegistry, *, on_batch: Callable[[str], None] | None = None,
    ) -> None:
        assert draft.source is not None
        self.name = draft.name
        self.source = draft.source
        self.chain = list(draft.chain)
        self.output = output  # the table the save names: the chain's selects up to it run in each batch
        self.sink = sink
        self.trigger = trigger
        self.db = db
        self.registry = registry
        self.on_batch = on_batch  # called with one progress line per batch, and per retry (rayudf run prints them)
        identity = {"name": self.name, "source": self.source.description(), "sink": sink.description()}
        self.checkpoint = Checkpoint.open(checkpoint, identity)  # its lock held until the run ends (or release())
        try:
            self.source.skip_bad = trigger.skip_bad
            self.source.schema = self.checkpoint.metadata.get("schema")  # where checkpoints before 2026-12 kept it
            self.source.resume(self.checkpoint.offsets())
        except BaseException:
            self.checkpoint.release()
            raise
        self.state = WAITING
        self.batches = 0  # batches committed by this run of the stream
        self.rows = 0  # rows those batches committed
        self.busy_s = 0.0  # seconds spent in those batches
        self.last_batch_s: float | None = None  # the last batch's seconds, from its start to its commit
        self.last_error = ""  # what stopped the stream, if something did
        self.skipped: list[dict] = []  # the bad files on_bad_file="skip" passed over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._background, name=f"rayudf-stream-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop after the batch in progress commits."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self.state in (RUNNING, WAITING) and not self._stop.is_set()

    def _background(self) -> None:
        try:
            self.run()
        except Exception as err:  # noqa: BLE001 - state and last_error hold it for !streams (one line); the log, whole
            # An error raised on purpose (a bad file, a model error) is the user's, said in one line by !streams, the
            # CLI and the notebook, so its traceback is logged below WARNING, which Python's last-resort handler would
            # print beside that line; any other is a bug, logged as an error.
            level = logging.INFO if isinstance(err, RayUDFError) else logging.ERROR
            _log.log(level, "stream %s failed: %s", self.name, self.last_error, exc_info=True)

    def run(self) -> None:
        """The loop: a pending batch first (a restart), then new input every ``duration`` seconds until stopped."""
        try:
            if self.trigger.once:
                self.source.until_now()
            self._retried(lambda: self._pending(restart=True))
            while not self._stop.is_set():
                tick = time.monotonic()
                offsets = self._retried(self._next_input)
                if offsets is None:
                    if self.trigger.once:
                        if self.source.drained():
                            break
                        continue  # a mock that drew 0 rows this time: draw again, no wait
                    self.state = WAITING
                    self._stop.wait(max(IDLE_POLL_S, self.trigger.duration - (time.monotonic() - tick)))
                    continue
                batch = self.checkpoint.next_batch()
                self.checkpoint.write_offsets(batch, offsets)
                reached("offsets_written", batch)
                self._retried(lambda: self._pending(restart=False))
                if not self.trigger.once:
                    self.state = WAITING
                    self._stop.wait(max(0.0, self.trigger.duration - (time.monotonic() - tick)))
            self.state = FINISHED if self.trigger.once and not self._stop.is_set() else STOPPED
        except BaseException as err:
            self.state, self.last_error = FAILED, str(err) or type(err).__name__
            raise
        finally:
            self.checkpoint.release()

    def _retried(self, attempt: Callable[[], T]) -> T | None:
        """``attempt()``, tried again after each pause of READ_RETRY_PAUSES_S while it fails with a
        transient read error (recorded in last_error, for !streams); the error of the last try stops
        the stream. None if the stream is stopped during a pause (its batch waits for the restart)."""
        tries = len(READ_RETRY_PAUSES_S) + 1
        for n, pause in enumerate(READ_RETRY_PAUSES_S, 1):
            try:
                return attempt()
            except TransientReadError as err:
                self.last_error = f"{err} (try {n} of {tries}; again in {pause:g} s)"
                if self.on_batch is not None:
                    self.on_batch(f"stream {self.name}: {self.last_error}")
                if self._stop.wait(pause):
                    return None
        try:
            return attempt()
        except TransientReadError as err:
            raise ExecutionError(
                f"{err}; still so after {tries} tries over {sum(READ_RETRY_PAUSES_S):g} s, so the stream stops "
                "(a transient error: nothing of the batch is committed and no file is marked bad; start the stream "
                "again once the file reads)"
            ) from err

    def _next_input(self) -> dict | None:
        with self.db.exclusive():
            return self.source.next_input(self.db.con)

    def _pending(self, *, restart: bool) -> None:
        """Run the batch that has offsets but no commit, if one has: after a restart, or the one just
        recorded. Its offsets are read at each try, as a try that left out a file rewrote them."""
        pending = self.checkpoint.pending()
        if pending is not None:
            self._batch(*pending, pending=restart)

    def _batch(self, batch: int, offsets: dict, *, pending: bool = False) -> None:
        """Run one micro-batch and commit it: input recorded already, output staged, sink, commit recorded.
        A ``pending`` batch (one a crash cut short) that the sink has already is only recorded."""
        self.state = RUNNING
        started = time.monotonic()
        if pending and self.sink.has(self.db, batch, self.checkpoint.query_id):
            self.checkpoint.write_commit(batch, {"rows": None})  # its input may have gone since: not read again
            self.checkpoint.compact(batch, self.source.merged)
            return
        staged = self.checkpoint.staging(batch) / "batch.parquet"
        with self.db.exclusive(), self.registry.statement():
            rows, offsets = self._stage(batch, offsets, staged)
            reached("staged", batch)
            if rows or (self.trigger.complete and staged.exists()):  # Complete: an empty result replaces the last
                self.sink.commit(self.db, staged, batch, self.checkpoint.query_id)
            reached("sink_committed", batch)
        self.checkpoint.write_commit(batch, {"rows": rows})
        reached("batch_committed", batch)
        self.checkpoint.clear_staging(batch)
        self.checkpoint.compact(batch, self.source.merged)
        self.skipped += offsets.get("skipped", [])
        elapsed = time.monotonic() - started
        self.batches, self.rows, self.busy_s, self.last_batch_s = self.batches + 1, self.rows + rows, self.busy_s + elapsed, elapsed
        if self.on_batch is not None:
            self.on_batch(self.progress_line(batch, rows, elapsed))

    def _stage(self, batch: int, offsets: dict, staged) -> tuple[int, dict]:
        """The batch's rows of the saved table, written to ``staged``: how many, and the batch's input. A
        malformed file that fails the batch is named (and with on_bad_file="skip", recorded and left out
        of a second try); a read that failed for a reason that may pass raises TransientReadError."""
        if (left := self.source.gone(offsets)) is not offsets:
            offsets = left
            self.checkpoint.write_offsets(batch, offsets)  # nothing of the batch is committed: its input may change
        selected = self._input(batch, offsets)
        if self.source.reads_nothing(selected):
            return 0, offsets  # every file was bad and skipped
        try:
            with reading("stage"):
                self._run_selects(selected, staged)
        except Exception as err:
            # each file read alone says which is malformed; one that fails to read for a reason that may pass
            # raises TransientReadError, and a file read whole by it cannot be blamed
            bad = self.source.culprit(self.db.con, offsets)
            if bad is None:
                if transient(err):
                    raise TransientReadError(_batch_input(batch, offsets), err) from err
                raise
            if not self.trigger.skip_bad:
                raise bad from None
            offsets = self.source.skip(offsets, bad)
            self.checkpoint.write_offsets(batch, offsets)  # nothing of the batch is committed: its input may change
            return self._stage(batch, offsets, staged)
        return pq.ParquetFile(staged).metadata.num_rows, offsets

    def _input(self, batch: int, offsets: dict) -> dict:
        """What the batch's selects read: its own input, or with mode="Complete" every batch's up to it."""
        if not self.trigger.complete:
            return offsets
        return self.source.merged([record for n, record in self.checkpoint.offsets() if n <= batch])

    def _run_selects(self, offsets: dict, staged) -> None:
        con = self.db.con
        self.source.bind(con, offsets)
        for table, query in self.chain:
            replace_relation(con, table, query)
            if table.lower() == self.output.lower():
                break
        formats.copy_to(self.db, f"SELECT * FROM {quote_identifier(self.output)}", staged, "parquet", {}, [])

    # -- what !streams shows --------------------------------------------------------

    def rows_per_s(self) -> float:
        return self.rows / self.busy_s if self.busy_s else 0.0

    def progress_line(self, batch: int, rows: int, elapsed: float) -> str:
        rate = rows / elapsed if elapsed else 0.0
        return f"stream {self.name}: batch {batch} committed {rows:,} rows in {elapsed:.2f} s ({rate:,.0f} rows/s), input lag {self.lag()}"

    def lag(self) -> int | str:
        try:
            return self.source.lag()
        except Exception as err:  # noqa: BLE001 - a source that cannot be listed now; the loop will say why
            return f"? ({err})"


def _batch_input(batch: int, offsets: dict) -> str:
    """A batch's input, for a message: its files (the first few), or its number."""
    files = offsets.get("files")
    if not files:
        return f"batch {batch}"
    more = f" and {len(files) - NAMED_FILES} more" if len(files) > NAMED_FILES else ""
    return f"batch {batch} ({', '.join(files[:NAMED_FILES])}{more})"


def start_stream(
    draft: StreamDraft, output: str, fmt: str, path: str, options: Mapping[str, str], partition_by: list[str], db: Database,
    registry: FunctionRegistry, *, lake_root: str | None, on_batch: Callable[[str], None] | None = None,
    echo: Callable[[str], None] = print,
) -> StreamQuery:
    """The stream a ``save append <output> as <fmt>.`<path>` options ...`` starts (not yet running)."""
    what = f"stream {draft.name}: save {output} as {fmt}"
    values = read_options({k: v for k, v in options.items() if k in STREAM_OPTION_NAMES}, STREAM_OPTIONS, what)
    if values["checkpointLocation"] is None:
        raise ExecutionError(f'{what}: a stream needs checkpointLocation="/dir", where it records what each batch read')
    trigger = Trigger.of(values, what)
    sink_options = {k: v for k, v in options.items() if k not in STREAM_OPTION_NAMES}
    sink = sink_for(fmt, path, sink_options, partition_by, lake_root=lake_root, echo=echo, complete=trigger.complete)
    draft.started = True
    return StreamQuery(draft, output, sink, trigger, values["checkpointLocation"], db, registry, on_batch=on_batch)
