"""A stream's checkpoint directory: what each micro-batch reads, written before it runs, and which batches committed.

Spark's layout, in JSON: ``metadata.json`` names the query (its id, stream name, source and
sink), ``offsets/<batch>.json`` is written (atomically, by rename) before a batch runs and
``commits/<batch>.json`` after its sink committed. A restart re-runs the batch whose offsets
have no commit with the same input, and the sinks make that second commit a no-op or a
replacement, so every input row is written exactly once. ``staging/<batch>`` holds a
batch's output between the query and the sink's commit, and ``lock`` is held (``flock``)
while the query runs, so that no two runs of one checkpoint write at once.

Example:
    >>> import tempfile
    >>> ck = Checkpoint.open(tempfile.mkdtemp(), {"name": "s", "source": "parquet:in", "sink": "delta:out"})
    >>> ck.write_offsets(0, {"files": ["a.parquet"]})
    >>> ck.pending()                     # batch 0 read its input but did not commit
    (0, {'files': ['a.parquet']})
    >>> ck.write_commit(0, {"rows": 3})
    >>> ck.pending(), ck.next_batch()
    (None, 1)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from sql_magics.errors import ExecutionError

# The fields of metadata.json that say which query a checkpoint belongs to.
IDENTITY = ("name", "source", "sink")


def _write_json(path: Path, value: dict) -> None:
    """Write ``value`` to ``path`` whole or not at all: a crash leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as out:
        json.dump(value, out, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make the renames into ``directory`` outlast a power cut (fsync of the directory itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._lock: int | None = None  # the descriptor holding the lock while the query runs

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
        except BaseException:
            os.close(lock)
            raise
        checkpoint = cls(path, metadata)
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

    def offsets(self) -> list[tuple[int, dict]]:
        """Every batch's input so far, in batch order."""
        return [(n, json.loads(p.read_text())) for n, p in sorted(_batches(self._offsets).items())]

    def committed(self) -> int | None:
        """The last batch whose sink committed, or None."""
        return max(_batches(self._commits), default=None)

    def pending(self) -> tuple[int, dict] | None:
        """The batch that read its input but did not commit (a crash or a failure stopped it), else None."""
        offsets = _batches(self._offsets)
        last = max(offsets, default=None)
        if last is None or last == self.committed():
            return None
        return last, json.loads(offsets[last].read_text())

    def next_batch(self) -> int:
        """The id of the batch after the last one that read its input."""
        return max(_batches(self._offsets), default=-1) + 1

    def write_offsets(self, batch: int, offsets: dict) -> None:
        _write_json(self._offsets / f"{batch}.json", offsets)

    def write_commit(self, batch: int, info: dict) -> None:
        _write_json(self._commits / f"{batch}.json", info)

    def staging(self, batch: int) -> Path:
        """An empty directory for batch ``batch``'s output before the sink commits it."""
        path = self.path / "staging" / str(batch)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def clear_staging(self, batch: int) -> None:
        shutil.rmtree(self.path / "staging" / str(batch), ignore_errors=True)
