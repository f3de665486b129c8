"""A stream's checkpoint directory: what each micro-batch reads, written before it runs, and which batches committed.

Spark's layout, in JSON: ``metadata.json`` names the query (its id, stream name, source and
sink), ``offsets/<batch>.json`` is written (atomically, by rename) before a batch runs and
``commits/<batch>.json`` after its sink committed. A restart re-runs the batch whose offsets
have no commit with the same input, and the sinks make that second commit a no-op or a
replacement, so every input row is written exactly once. ``staging/<batch>`` holds a
batch's output between the query and the sink's commit, and ``lock`` is held (``flock``)
while the query runs, so that no two runs of one checkpoint write at once.

Every :data:`COMPACT_EVERY` batches, ``compact.json`` (``{"batch": n, "offsets": ...}``) folds
the input of batches 0 to n, all committed, into one record (the source's ``merged``), and the
offsets and commits of those batches are removed: the directory stays small, and a restart
reads one record and the few after it. Where both are there (a crash between writing the
compact record and removing what it covers), the compact record is the one read for its
batches, so no batch counts twice and none is lost, and the next :meth:`Checkpoint.open`
removes the rest.

Example:
    >>> import tempfile
    >>> ck = Checkpoint.open(tempfile.mkdtemp(), {"name": "s", "source": "parquet:in", "sink": "delta:out"})
    >>> ck.write_offsets(0, {"files": ["a.parquet"]})
    >>> ck.pending()                     # batch 0 read its input but did not commit
    (0, {'files': ['a.parquet']})
    >>> ck.write_commit(0, {"rows": 3})
    >>> ck.pending(), ck.next_batch()
    (None, 1)
    >>> merge = lambda records: {"files": [f for r in records for f in r["files"]]}
    >>> for n in range(1, COMPACT_EVERY):
    ...     ck.write_offsets(n, {"files": [f"{n}.parquet"]})
    ...     ck.write_commit(n, {"rows": 3})
    ...     _ = ck.compact(n, merge)
    >>> ck.offsets()[0][0], len(ck.offsets()[0][1]["files"]), ck.committed(), ck.next_batch()
    (9, 10, 9, 10)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from sql_magics.errors import ExecutionError
from sql_magics.streaming.faults import reached
from udf_engine.durable import sync_directory

# The fields of metadata.json that say which query a checkpoint belongs to.
IDENTITY = ("name", "source", "sink")
# Batches between two compactions: Spark's default compactInterval for its file source and sink
# logs. A restart then reads one compact record and fewer than 10 others, the directory holds at
# most 10 batches' records beside it, and rewriting the compact record (which grows with the
# files a file source has read) is paid once in 10 batches.
COMPACT_EVERY = 10


def _write_json(path: Path, value: dict) -> None:
    """Write ``value`` to ``path`` whole or not at all: a crash leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as out:
        json.dump(value, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    sync_directory(path.parent)


def _claim(path: Path) -> int:
    """The descriptor holding the lock of the checkpoint at ``path``: another run of it, here or in
    another process, is refused until this one stops (the kernel drops the lock of a killed process)."""
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ExecutionError(
            f"checkpointLocation {path} is in use by a running stream (pid {holder}); stop that one first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _metadata(path: Path, identity: dict) -> dict:
    """metadata.json of the checkpoint at ``path``, written for this query if there is none; refused if another query's."""
    meta_path = path / "metadata.json"
    if not meta_path.exists():
        metadata = {**{k: identity.get(k) for k in IDENTITY}, "id": uuid.uuid4().hex}
        _write_json(meta_path, metadata)
        return metadata
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise ExecutionError(f"checkpointLocation {path}: metadata.json is unreadable ({err})") from None
    theirs = {k: metadata.get(k) for k in IDENTITY}
    ours = {k: identity.get(k) for k in IDENTITY}
    if theirs != ours:
        what = "; ".join(f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in IDENTITY if theirs[k] != ours[k])
        raise ExecutionError(f"checkpointLocation {path} belongs to another query ({what}); give this stream a checkpoint of its own")
    return metadata


def _batches(directory: Path) -> dict[int, Path]:
    return {int(p.stem): p for p in directory.glob("*.json") if p.stem.isdigit()}


class Checkpoint:
    """One stream query's checkpoint directory (see the module's docstring)."""

    def __init__(self, path: Path, metadata: dict) -> None:
        self.path = path
        self.metadata = metadata  # the query's id and identity (IDENTITY)
        self._offsets = path / "offsets"
        self._commits = path / "commits"
        self._compact = path / "compact.json"
        self._lock: int | None = None  # the descriptor holding the lock while the query runs
        compact = self._compact_record()
        self._compacted: int | None = compact["batch"] if compact else None  # the last batch compact.json covers

    @classmethod
    def open(cls, location: str | os.PathLike, identity: dict) -> Checkpoint:
        """The checkpoint at ``location``, made for this query if new, its lock held until :meth:`release`:
        what it records is read only by the run that may write it. One made by another query is refused."""
        path = Path(location).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        lock = _claim(path)
        try:
            metadata = _metadata(path, identity)
            for directory in ("offsets", "commits"):
                (path / directory).mkdir(exist_ok=True)
            checkpoint = cls(path, metadata)
            checkpoint._prune()  # what a crash during a compaction left
        except BaseException:
            os.close(lock)
            raise
        checkpoint._lock = lock
        return checkpoint

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @property
    def query_id(self) -> str:
        """The query's id, for the sinks' idempotent commits (a Delta transaction's app id, part file names)."""
        return self.metadata["id"]

    def _compact_record(self) -> dict | None:
        try:
            return json.loads(self._compact.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ExecutionError(f"checkpointLocation {self.path}: compact.json is unreadable ({err})") from None

    def _covered(self) -> int:
        return -1 if self._compacted is None else self._compacted

    def offsets(self) -> list[tuple[int, dict]]:
        """Every batch's input so far, in batch order: the compact record first (one record for the
        batches it covers, numbered by the last of them), then each batch's after it."""
        compact = self._compact_record()
        head = [(compact["batch"], compact["offsets"])] if compact else []
        after = [(n, json.loads(p.read_text())) for n, p in sorted(_batches(self._offsets).items()) if n > self._covered()]
        return head + after

    def committed(self) -> int | None:
        """The last batch whose sink committed, or None."""
        return max([*_batches(self._commits), *([self._compacted] if self._compacted is not None else [])], default=None)

    def pending(self) -> tuple[int, dict] | None:
        """The batch that read its input but did not commit (a crash or a failure stopped it), else None."""
        offsets = _batches(self._offsets)
        last = max(offsets, default=None)
        if last is None or last <= self._covered() or last == self.committed():
            return None
        return last, json.loads(offsets[last].read_text())

    def next_batch(self) -> int:
        """The id of the batch after the last one that read its input."""
        return max(max(_batches(self._offsets), default=-1), self._covered()) + 1

    def write_offsets(self, batch: int, offsets: dict) -> None:
        _write_json(self._offsets / f"{batch}.json", offsets)

    def write_commit(self, batch: int, info: dict) -> None:
        _write_json(self._commits / f"{batch}.json", info)

    def compact(self, batch: int, merge: Callable[[list[dict]], dict]) -> bool:
        """After batch ``batch`` committed, if it is one of every :data:`COMPACT_EVERY`: fold the input of
        the batches up to it into compact.json with ``merge`` (the source's), then remove their
        offsets and commits. Whether it compacted."""
        if (batch + 1) % COMPACT_EVERY:
            return False
        records = [record for n, record in self.offsets() if n <= batch]
        _write_json(self._compact, {"batch": batch, "offsets": merge(records)})
        self._compacted = batch
        reached("compact_written", batch)
        self._prune()
        return True

    def _prune(self) -> None:
        """Remove the offsets and commits of the batches compact.json covers."""
        for directory in (self._commits, self._offsets):
            for n, path in _batches(directory).items():
                if n <= self._covered():
                    path.unlink(missing_ok=True)

    def staging(self, batch: int) -> Path:
        """An empty directory for batch ``batch``'s output before the sink commits it."""
        path = self.path / "staging" / str(batch)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def clear_staging(self, batch: int) -> None:
        shutil.rmtree(self.path / "staging" / str(batch), ignore_errors=True)
