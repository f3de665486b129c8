"""Where a model comes from, as the rows that ship it and the loader that loads it.

A model to register is a file or directory (Keras, SavedModel, pickle, ONNX, booster, MLflow),
a model table on disk written by ``save_model``, an MLflow URI (``models:/churn@champion``,
``runs:/...``), or a table's rows already read (a model table or Byzer's tar chunks, loaded in
a session). Each becomes a :class:`ModelSource`: its chunk rows, what ``!models`` shows of it,
and its format, whose loader the workers run.

Example:
    >>> import tempfile, pathlib, cloudpickle
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.pkl"
    >>> _ = path.write_bytes(cloudpickle.dumps(len))
    >>> model = from_path(str(path))
    >>> model.format, loader_of("f", model, kind=None).__name__
    ('pickle', 'init_pickle')
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from udf_engine import durable
from udf_engine.errors import ModelError
from udf_engine.models import mlflow
from udf_engine.models.loaders import ANY_SUFFIX_KINDS, LOADERS, MODEL_KINDS
from udf_engine.models.store import DEFAULT_VERSION, detect_format, model_meta, model_rows, read_model_rows, rows_from_table


@dataclass
class ModelSource:
    """A model's chunk rows, and what ``!models`` shows as its path."""

    rows: list[dict]
    shown: str

    @property
    def format(self) -> str:
        """The model's format (a key of LOADERS), as its rows record it."""
        return model_meta(self.rows)["format"]


def from_path(source: str, *, kind: str | None = None, version: str = DEFAULT_VERSION, tracking_uri: str | None = None) -> ModelSource:
    """The model a path or an MLflow URI names; ``kind`` (a key of MODEL_KINDS, None: read from the
    model) says how to read a file whose suffix does not tell."""
    if source.startswith(mlflow.URI_SCHEMES) or (kind == mlflow.KIND and mlflow.is_mlflow_dir(Path(source))):
        return _from_mlflow(source, tracking_uri)
    path = Path(source)
    durable.recover(path)  # a save_model of it that a kill cut short: undone or finished first
    if not path.exists():
        raise ModelError(f"model path not found: {source}")
    try:
        model_format = MODEL_KINDS[kind] if kind in ANY_SUFFIX_KINDS and path.is_file() else detect_format(path)
    except ModelError as err:
        if kind is None:
            raise ModelError(f"{err}; register it with its kind ({', '.join(MODEL_KINDS)})") from None
        model_format = MODEL_KINDS[kind]
    rows = read_model_rows(path) if model_format == "table" else model_rows(path, model_format=model_format, version=version)
    return ModelSource(rows, source)


def from_table(table: pa.Table, name: str) -> ModelSource:
    """The model a table's rows hold (model-store rows, or Byzer's tar chunks); ``name`` says where they came from."""
    return ModelSource(rows_from_table(table, source=f"table {name}"), name)


def _from_mlflow(source: str, tracking_uri: str | None) -> ModelSource:
    """An MLflow model's rows, shown with the registry version and run it resolved to."""
    resolved = mlflow.resolve(source, tracking_uri=tracking_uri)
    try:
        rows = model_rows(resolved.path, model_format=mlflow.KIND, version=resolved.version or DEFAULT_VERSION, name=source)
    finally:
        if resolved.temp_dir is not None:
            shutil.rmtree(resolved.temp_dir, ignore_errors=True)
    return ModelSource(rows, resolved.describe())


def loader_of(function: str, model: ModelSource, *, kind: str | None) -> Callable:
    """The init_func that loads ``model``, checked against the ``kind`` the registration named (None: any)."""
    loader = LOADERS.get(model.format)
    if loader is None:
        raise ModelError(f"register {function}: no loader for a {model.format!r} model")
    if kind is not None and LOADERS[MODEL_KINDS[kind]] is not loader:
        raise ModelError(f"register {function}: {model.shown} holds a {model.format} model, not {kind}")
    return loader
