"""MLflow models: a source resolved where the tracking server is, loaded where the workers are.

``resolve(source)`` turns an MLflow model directory, ``models:/<name>/<version>``,
``models:/<name>@<alias>`` or ``runs:/<run>/<path>`` into a local directory (downloaded
with the tracking URI given, else ``MLFLOW_TRACKING_URI``) and the version and run it is.
The directory then travels to the workers through the model store, so workers need no
access to the tracking server; each loads it with ``mlflow.pyfunc.load_model``.

MLflow is an extra (``pip install 'rayudf[mlflow]'``); without it, a clear error says so.

Example:
    >>> resolved = resolve("models:/churn@champion", tracking_uri="sqlite:///mlflow.db")   # doctest: +SKIP
    >>> resolved.version, resolved.run_id                                                 # doctest: +SKIP
    ('3', '0bfe6a39a839480cace1188bc1b8d961')
    >>> model = load_mlflow(resolved.path, "churn")                                       # doctest: +SKIP
    >>> model.predict(np.zeros((2, model.input_shape[1]))).shape                           # doctest: +SKIP
    (2,)
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from udf_engine.errors import ConfigError, ModelError

EXTRA = "rayudf[mlflow]"
KIND = "mlflow"  # the model kind and format name
TRACKING_URI_OPTION = "tracking_uri"  # the register option naming the tracking server
# The file that makes a directory an MLflow model.
MLMODEL = "MLmodel"
URI_SCHEMES = ("models:/", "runs:/")
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")
_RUN = re.compile(r"^runs:/(?P<run>[^/]+)/")


def _mlflow() -> Any:
    try:
        import mlflow
        import mlflow.pyfunc
    except ImportError:
        raise ConfigError(f"MLflow models need MLflow, which is not installed: pip install '{EXTRA}'") from None
    return mlflow


@dataclass(frozen=True)
class Resolved:
    """An MLflow model source made local: its directory, and which version and run it is."""

    source: str
    path: Path
    version: str | None = None
    run_id: str | None = None
    downloaded: bool = False  # path is a temporary copy, for the caller to delete once read

    def describe(self) -> str:
        """``models:/churn@champion (version 3, run 0bfe...)``: what ``!models`` shows."""
        facts = [f"version {self.version}"] if self.version else []
        facts += [f"run {self.run_id}"] if self.run_id else []
        return f"{self.source} ({', '.join(facts)})" if facts else self.source


def is_mlflow_dir(path: Path) -> bool:
    """Whether ``path`` is an MLflow model directory."""
    return path.is_dir() and (path / MLMODEL).is_file()


def resolve(source: str, *, tracking_uri: str | None = None) -> Resolved:
    """A local directory holding the model ``source`` names, with its registry version and run."""
    path = Path(source).expanduser()
    if is_mlflow_dir(path):
        return Resolved(source, path)
    if not source.startswith(URI_SCHEMES):
        raise ModelError(f"{source}: not an MLflow model directory (no {MLMODEL} file) nor a models:/ or runs:/ URI")
    mlflow = _mlflow()
    where = tracking_uri or mlflow.get_tracking_uri()
    try:
        version, run_id = _registry_facts(mlflow, source, where)
        target = tempfile.mkdtemp(prefix="rayudf-mlflow-")
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=target, tracking_uri=where)
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for a source it cannot find
        raise ModelError(f"MLflow model {source!r} does not resolve with tracking URI {where!r}: {err}") from None
    if not is_mlflow_dir(Path(local)):
        raise ModelError(f"MLflow source {source!r} (tracking URI {where!r}) holds no {MLMODEL} file: it is not a model")
    return Resolved(source, Path(local), version, run_id, downloaded=True)


def _registry_facts(mlflow: Any, source: str, tracking_uri: str) -> tuple[str | None, str | None]:
    if match := _RUN.match(source):
        return None, match["run"]
    match = _REGISTERED.match(source)
    if match is None:
        return None, None
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if match["alias"]:
        found = client.get_model_version_by_alias(match["name"], match["alias"])
    else:
        found = client.get_model_version(match["name"], match["version"])
    return str(found.version), found.run_id


class MlflowPredictor:
    """An MLflow pyfunc model behind ``predict(batch)``, fed as its signature asks.

    A tensor signature gets the batch as an array of its dtype; a column signature gets a
    DataFrame with its column names (the function's arguments, in order). ``input_shape``
    is ``(None, width)`` when the signature says the width.
    """

    def __init__(self, model: Any, name: str) -> None:
        self._model = model
        self.name = name
        signature = model.metadata.signature
        inputs = signature.inputs if signature is not None else None
        self._columns: list[str] | None = None
        self._dtype: Any = None
        self.input_shape: tuple | None = None
        if inputs is not None and inputs.is_tensor_spec():
            spec = inputs.inputs[0]
            self._dtype = spec.type
            if len(spec.shape) == 2 and spec.shape[1] > 0:
                self.input_shape = (None, spec.shape[1])
        elif inputs is not None:
            self._columns = inputs.input_names()
            self.input_shape = (None, len(self._columns))

    def predict(self, batch: Any) -> Any:
        batch = np.asarray(batch)
        if self._columns is not None:
            import pandas as pd

            data: Any = pd.DataFrame(batch.reshape(len(batch), -1), columns=self._columns)
        else:
            data = batch.astype(self._dtype, copy=False) if self._dtype is not None else batch
        out = self._model.predict(data)
        if hasattr(out, "to_numpy"):  # a DataFrame or Series: its values, one entry per row
            out = out.to_numpy()
            return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out
        return np.asarray(out)


def load_mlflow(path: Path, name: str) -> MlflowPredictor:
    """Load an MLflow model directory with ``mlflow.pyfunc.load_model``."""
    mlflow = _mlflow()
    try:
        return MlflowPredictor(mlflow.pyfunc.load_model(str(path)), name)
    except Exception as err:  # noqa: BLE001 - the flavor's loader may raise anything
        raise ModelError(f"cannot load MLflow model {name!r}: {type(err).__name__}: {err}") from None
