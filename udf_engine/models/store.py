"""The model store: a model file or directory kept as a Parquet table of binary chunks.

A model table has one row per chunk (``path``, ``start``, ``offset``, ``value``):
``path`` is the file inside the model ("" for a single-file model), ``start`` the
chunk's byte position in that file, ``offset`` its length (the name Byzer's
``pyjava.storage.streaming_tar`` gives that column) and ``value`` the bytes.
One metadata row (``path == META_PATH``) holds JSON with the format, sha256 and
version. Rows travel to the workers through the Ray object store, so no worker
needs a shared file system; the sha256 is checked after reassembly.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "m.pkl").write_bytes(b"not really a model")
    >>> table_dir = save_model(d / "m.pkl", d / "m_table")
    >>> rows = read_model_rows(table_dir)
    >>> meta = model_meta(rows); meta["format"], meta["files"]
    ('pickle', 1)
    >>> model_path = materialize(rows, d / "restored")
    >>> model_path.read_bytes()
    b'not really a model'
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from udf_engine import durable
from udf_engine.errors import ModelError
from udf_engine.models import streaming_tar
from udf_engine.models.chunks import CHUNK_BYTES, LENGTH, PATH, START, VALUE
from udf_engine.paths import inside

# A few chunks per row group: a reader holds one row group at a time, so this bounds its
# memory to ~64 MiB whatever the model's size.
CHUNKS_PER_ROW_GROUP = 16
META_PATH = "__rayudf_meta__"
STORE_VERSION = 1
# The version label a model gets when nobody gives one.
DEFAULT_VERSION = "1"
# The file that makes a directory an MLflow model.
MLMODEL = "MLmodel"
COLUMNS = (PATH, START, LENGTH, VALUE)
SCHEMA = pa.schema([(PATH, pa.string()), (START, pa.int64()), (LENGTH, pa.int64()), (VALUE, pa.binary())])

_FORMAT_BY_SUFFIX = {
    ".keras": "keras",
    ".h5": "keras",
    ".hdf5": "keras",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".cloudpickle": "pickle",
    ".joblib": "pickle",
    ".onnx": "onnx",
    ".ubj": "xgboost",  # xgboost's own binary format; its .json and LightGBM's .txt need the kind named
    ".pt2": "torch",  # torch.export
    ".pt": "torch",  # TorchScript (or a pickled nn.Module: `register torch.` reads any suffix)
    ".pth": "torch",
}
# What a directory holds that tells its format, first match wins: sentence-transformers saves a
# Transformers config too, so its modules.json comes before config.json.
_DIRECTORY_MARKERS = (
    ("saved_model.pb", "savedmodel"), (MLMODEL, "mlflow"), ("modules.json", "sentence_transformers"), ("config.json", "transformers"),
)


def detect_format(src: str | os.PathLike) -> str:
    """Name the format of a model file or directory: one that ``loaders.LOADERS`` loads, or "table".

    A directory holding ``saved_model.pb`` is a TF SavedModel, one holding ``MLmodel`` an MLflow
    model, ``modules.json`` a sentence-transformers model, ``config.json`` a Transformers one; a
    directory of Parquet files (or a ``.parquet`` file) is a model table written by :func:`save_model`.
    A file is told by its suffix; xgboost's ``.json`` and LightGBM's ``.txt`` boosters are not (the
    caller names their format).
    """
    path = Path(src)
    is_dir = path.is_dir()
    fmt = _format_of([p.name for p in path.iterdir()] if is_dir else [path.name], is_dir=is_dir)
    if fmt is None and is_dir:
        raise ModelError(
            f"{path}: directory is neither a SavedModel, an MLflow model, a Transformers or sentence-transformers model nor a model table"
        )
    if fmt is None:
        known = ", ".join(sorted(_FORMAT_BY_SUFFIX))
        raise ModelError(f"{path}: cannot tell the model format from the suffix (known: {known}); give the model kind explicitly")
    return fmt


def _format_of(names: list[str], *, is_dir: bool) -> str | None:
    """The format of a directory holding ``names`` (its top-level entries), or of the one file ``names[0]``."""
    if is_dir:
        found = [fmt for marker, fmt in _DIRECTORY_MARKERS if marker in names]
        return found[0] if found else ("table" if any(n.endswith(".parquet") for n in names) else None)
    suffix = Path(names[0]).suffix.lower()
    return "table" if suffix == ".parquet" else _FORMAT_BY_SUFFIX.get(suffix)


def _model_files(root: Path) -> list[tuple[str, Path]]:
    if root.is_file():
        return [("", root)]
    return sorted(
        (p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()
    )


def _digest(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (relative path, length, bytes) of every file, in path order."""
    h = hashlib.sha256()
    for rel, data in sorted(files, key=lambda f: f[0]):
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def model_rows(
    src: str | os.PathLike, *, model_format: str | None = None, version: str = DEFAULT_VERSION, name: str | None = None
) -> list[dict]:
    """Read a model file or directory into chunk rows plus the metadata row (in memory).

    ``model_format`` (a key of ``loaders.LOADERS``) is detected from the path when not given.
    """
    root = Path(src)
    if not root.exists():
        raise ModelError(f"model path not found: {root}")
    fmt = model_format or detect_format(root)
    rows: list[dict] = []
    contents: list[tuple[str, bytes]] = []
    for rel, path in _model_files(root):
        data = path.read_bytes()
        contents.append((rel, data))
        for start in range(0, max(len(data), 1), CHUNK_BYTES):
            chunk = data[start : start + CHUNK_BYTES]
            rows.append({PATH: rel, START: start, LENGTH: len(chunk), VALUE: chunk})
    meta = {
        "format": fmt,
        "sha256": _digest(contents),
        "version": str(version),
        "files": len(contents),
        "name": name or root.name,  # what load errors call the model
        "store_version": STORE_VERSION,
    }
    rows.append({PATH: META_PATH, START: -1, LENGTH: 0, VALUE: json.dumps(meta).encode()})
    return rows


def save_model(
    src: str | os.PathLike, dest: str | os.PathLike, *, model_format: str | None = None, version: str = DEFAULT_VERSION
) -> Path:
    """Save a model file or directory as a model table (a directory holding one Parquet file).

    Returns the table directory; ``load parquet.`<dest>` as m`` reads it back. A table already at
    ``dest`` is replaced whole (:mod:`udf_engine.durable`): after a kill, ``dest`` holds the old
    table or the new one.
    """
    rows = model_rows(src, model_format=model_format, version=version)
    dest = Path(dest)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with durable.staging(dest) as stage:  # a table already there is replaced whole, never removed first
        stage.new.mkdir()
        pq.write_table(table, stage.new / "part-00000.parquet", row_group_size=CHUNKS_PER_ROW_GROUP)
        stage.swap_in()
    return dest


def read_model_rows(path: str | os.PathLike) -> list[dict]:
    """Read a model table (directory or ``.parquet`` file) written by :func:`save_model`."""
    path = Path(path)
    durable.recover(path)  # a save_model of it that a kill cut short: undone or finished first
    if not path.exists():
        raise ModelError(f"model table not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ModelError(f"{path}: not a readable model table ({err})") from None
    return rows_from_table(table, source=str(path))


def rows_from_table(table: pa.Table, *, source: str = "model table") -> list[dict]:
    """Turn an Arrow table with the model-store columns into rows, checking its shape.

    A table of ``streaming_tar`` chunks (``start``, ``offset``, ``value``: what Byzer-python's
    ``build_rows_from_file`` makes) is a model table too.
    """
    columns = COLUMNS if PATH in table.column_names else streaming_tar.COLUMNS
    missing = set(columns) - set(table.column_names)
    if missing:
        raise ModelError(f"{source}: not a model table, missing columns {sorted(missing)}")
    return table.select(list(columns)).to_pylist()


def model_meta(rows: Sequence[dict]) -> dict[str, Any]:
    """The metadata of a model table's rows (format, sha256, version, ...).

    Rows of ``streaming_tar`` chunks carry none: their format is read from the names of
    the files inside (a SavedModel directory, or one model file).
    """
    rows = list(rows)
    if streaming_tar.is_chunk_rows(rows):
        return _tar_meta(streaming_tar.member_names(rows))
    for row in rows:
        if row[PATH] == META_PATH:
            return json.loads(row[VALUE])
    raise ModelError("model table has no metadata row (was it written by save_model?)")


def _tar_meta(names: list[str]) -> dict[str, Any]:
    """The metadata of tar chunk rows from the names inside, read as :func:`detect_format` reads the
    files :func:`streaming_tar.unpack` would write: one entry is the model itself, else the whole."""
    tops = sorted({n.split("/", 1)[0] for n in names})
    single = tops[0] if len(tops) == 1 else None
    if single is not None and names == [single]:  # one file
        fmt, name = _format_of(names, is_dir=False), single
    else:
        inside = [n[len(single) + 1 :] for n in names if n.startswith(f"{single}/")] if single else names
        fmt, name = _format_of([n for n in inside if n and "/" not in n], is_dir=True), single or "model"
    if fmt is None:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ModelError(f"cannot tell the model format of the tar chunk rows: they hold {shown} (expected a model file or directory)")
    return {"format": fmt, "name": name, "version": DEFAULT_VERSION}


def unpack(rows: Sequence[dict], dest: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Write a model's rows (model-store rows or ``streaming_tar`` chunks) under ``dest``: the model's path and metadata."""
    rows = list(rows)
    if not streaming_tar.is_chunk_rows(rows):
        return materialize(rows, dest), model_meta(rows)
    path = streaming_tar.unpack(rows, dest)  # the files say what the model is: no second copy in memory to read the names
    return path, {"format": detect_format(path), "name": path.name, "version": DEFAULT_VERSION}


def materialize(rows: Iterable[dict], dest: str | os.PathLike) -> Path:
    """Write chunk rows back to files under ``dest`` and verify the sha256.

    Returns the model's path: the file itself for a single-file model, else the directory.
    Raises ModelError naming both checksums when the content does not match, and
    UnsafePathError when a row's path or the model's name would land outside ``dest``.
    """
    rows = list(rows)
    meta = model_meta(rows)
    dest = Path(dest)
    parts: dict[str, list[dict]] = {}
    for row in rows:
        if row[PATH] != META_PATH:
            parts.setdefault(row[PATH], []).append(row)
    contents: list[tuple[str, bytes]] = []
    for rel, chunks in parts.items():
        chunks.sort(key=lambda r: r[START])
        data = b"".join(r[VALUE] for r in chunks)
        contents.append((rel, data))
    actual = _digest(contents)
    if actual != meta["sha256"]:
        raise ModelError(
            f"model {meta.get('name', '?')!r}: sha256 mismatch, the model table is corrupt "
            f"(expected {meta['sha256']}, got {actual})"
        )
    single = list(parts) == [""]
    # every name checked before anything is written: the table may come from anyone
    targets = [inside(dest, str(meta.get("name") or "model"), what="model table name")] if single else [
        inside(dest, rel, what="model table row") for rel, _ in contents
    ]
    for target, (_, data) in zip(targets, contents, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return targets[0] if single else dest
