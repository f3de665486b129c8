"""A file or directory as rows of tar chunks, and back: Byzer's ``pyjava.storage.streaming_tar``.

Byzer-python code turns a trained model's directory into a table with
``build_rows_from_file(dir)``: one row per chunk of a tar stream, ``start`` (the chunk's
byte position in the stream), ``offset`` (its length: Byzer's name) and ``value`` (the
bytes). Saved to the lake and loaded back, the rows go to ``register Ray.`<table>``` and
``save_rows_as_file(rows, dir)`` writes the files again. Any chunking joins up to the same
stream, so tables written by Byzer and by rayudf read in both.

Extraction refuses entries that would land outside the target directory (``../x``,
absolute paths, links), sparse entries (a few bytes that unpack to a huge file), and rows
with a gap or an overlap between chunks (a lost row).

Example:
    >>> import tempfile, pathlib
    >>> src = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (src / "variables").mkdir(), (src / "saved_model.pb").write_bytes(b"graph")
    >>> _ = (src / "variables" / "v.index").write_bytes(b"weights")
    >>> rows = list(build_rows_from_file(src))
    >>> sorted(rows[0])
    ['offset', 'start', 'value']
    >>> out = save_rows_as_file(reversed(rows), pathlib.Path(tempfile.mkdtemp()) / "restored")
    >>> (out / "variables" / "v.index").read_bytes(), member_names(rows)
    (b'weights', ['saved_model.pb', 'variables', 'variables/v.index'])
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from udf_engine.errors import ModelError
from udf_engine.models.chunks import CHUNK_BYTES, LENGTH, START, VALUE
from udf_engine.paths import inside

# The columns of a tar chunk row, as Byzer names them.
COLUMNS = (START, LENGTH, VALUE)
# Python 3.11.4+ also checks entries itself; _check_member does the same before it.
_SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class _Chunks(io.RawIOBase):
    """A write-only stream that hands out what was written as chunk rows of CHUNK_BYTES."""

    def __init__(self) -> None:
        self._buffer = bytearray()  # written, not yet handed out
        self._start = 0  # stream position of the buffer's first byte

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def rows(self, *, flush: bool = False) -> Iterator[dict]:
        while len(self._buffer) >= CHUNK_BYTES or (flush and self._buffer):
            value = bytes(self._buffer[:CHUNK_BYTES])
            del self._buffer[:CHUNK_BYTES]
            yield {START: self._start, LENGTH: len(value), VALUE: value}
            self._start += len(value)


def build_rows_from_file(target: str | os.PathLike) -> Iterator[dict]:
    """The tar stream of a directory's files (names relative to it), or of one file, as chunk rows.

    Memory holds at most one file plus one chunk, whatever the directory's size.
    """
    root = Path(target)
    if not root.exists():
        raise ModelError(f"streaming_tar: {root} does not exist")
    stream = _Chunks()
    with tarfile.open(fileobj=stream, mode="w|", dereference=True) as tar:  # a link's target, not the link
        entries = [(root.name, root)] if root.is_file() else sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*"))
        for name, path in entries:
            tar.add(path, arcname=name, recursive=False)
            yield from stream.rows()
    yield from stream.rows(flush=True)


def _ordered(rows: Iterable[dict]) -> list[dict]:
    """Chunk rows by position, checking that they join up with no gap and no overlap."""
    ordered = sorted(rows, key=lambda row: row[START])
    position = 0
    for row in ordered:
        if row[START] != position:
            raise ModelError(
                f"streaming_tar: the chunk rows do not join up: a chunk starts at byte {row[START]}, expected {position} "
                "(a row is missing or repeated)"
            )
        position += len(row[VALUE])
    return ordered


def _check_member(member: tarfile.TarInfo, target: Path) -> None:
    if not (member.isfile() or member.isdir()) or member.issparse():  # a sparse entry of 10 KB can be a 1 TiB file
        raise ModelError(f"streaming_tar: refusing tar entry {member.name!r}: only files and directories are extracted")
    if not (member.isdir() and PurePosixPath(member.name) == PurePosixPath(".")):  # "./", as `tar -C dir .` writes
        inside(target, member.name, what="streaming_tar: tar entry")


def save_rows_as_file(rows: Iterable[dict], target_dir: str | os.PathLike) -> Path:
    """Write chunk rows (in any order) back to files under ``target_dir``; returns it."""
    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as spool:
        for row in _ordered(rows):
            spool.write(row[VALUE])
        spool.seek(0)
        try:
            with tarfile.open(fileobj=spool, mode="r:") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, target)
                tar.extractall(target, members=members, **_SAFE_EXTRACT)
        except tarfile.TarError as err:
            raise ModelError(f"streaming_tar: the rows are not a tar stream: {err}") from None
    return target


def member_names(rows: Iterable[dict]) -> list[str]:
    """The names of the entries in chunk rows' tar stream, without writing any file."""
    data = b"".join(row[VALUE] for row in _ordered(rows))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return tar.getnames()
    except tarfile.TarError as err:
        raise ModelError(f"streaming_tar: the rows are not a tar stream: {err}") from None


def is_chunk_rows(rows: list[dict]) -> bool:
    """Whether rows are streaming_tar chunks (``start``, ``offset``, ``value``, nothing else)."""
    return bool(rows) and set(rows[0]) == set(COLUMNS)


def unpack(rows: list[dict], dest: str | os.PathLike) -> Path:
    """Extract chunk rows under ``dest``; returns the model inside: its one file or directory, else ``dest``."""
    root = save_rows_as_file(rows, dest)
    entries = list(root.iterdir())
    return entries[0] if len(entries) == 1 else root
