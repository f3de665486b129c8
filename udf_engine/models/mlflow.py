"""MLflow models: a source resolved where the tracking server is, loaded where the workers are.

``resolve(source)`` turns an MLflow model directory, ``models:/<name>/<version>``,
``models:/<name>@<alias>`` or ``runs:/<run>/<path>`` into a local directory (downloaded
with the tracking URI given, else ``MLFLOW_TRACKING_URI``) and the version and run it is.
The directory then travels to the workers through the model store, so workers need no
access to the tracking server; each loads it with ``mlflow.pyfunc.load_model``, or a model of
MLflow's ``transformers``, ``sentence_transformers`` or ``pytorch`` flavor with that flavor's
loader, run as rayudf's text and torch kinds run it (:mod:`udf_engine.models.mlflow_flavors`).

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

import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from udf_engine.errors import ConfigError, ModelError
from udf_engine.models.store import MLMODEL

EXTRA = "rayudf[mlflow]"
KIND = "mlflow"  # the model kind and format name
URI_SCHEMES = ("models:/", "runs:/")
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")
_LOGGED = re.compile(r"^models:/(?P<id>m-[0-9a-f]+)/?$")  # MLflow 3's logged models
_RUN = re.compile(r"^runs:/(?P<run>[^/]+)/")
# Where a worker keeps its loaded model's directory: the pid tells whose it is.
_KEPT_PREFIX = "rayudf-model-mlflow-"


def _mlflow() -> Any:
    # MLflow 3 sends usage telemetry from every process that imports it: not from ours.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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
    temp_dir: Path | None = None  # where it was downloaded, for the caller to delete once read

    def describe(self) -> str:
        """``models:/churn@champion (version 3, run 0bfe...)``: what ``!models`` shows."""
        facts = [f"version {self.version}"] if self.version else []
        facts += [f"run {self.run_id}"] if self.run_id else []
        return f"{self.source} ({', '.join(facts)})" if facts else self.source


def is_mlflow_dir(path: Path) -> bool:
    """Whether ``path`` is an MLflow model directory."""
    return path.is_dir() and (path / MLMODEL).is_file()


def resolve(source: str, *, tracking_uri: str | None = None) -> Resolved:
    """A local directory holding the model ``source`` names, with its registry version and run.

    Everything is looked up with ``tracking_uri`` (else MLflow's own, ``MLFLOW_TRACKING_URI``),
    the registry included; an alias is resolved once, so the files are the version reported.
    """
    path = Path(source).expanduser()
    if is_mlflow_dir(path):
        return Resolved(source, path)
    if not source.startswith(URI_SCHEMES):
        raise ModelError(f"{source}: not an MLflow model directory (no {MLMODEL} file) nor a models:/ or runs:/ URI")
    mlflow = _mlflow()
    where = tracking_uri or mlflow.get_tracking_uri()
    target = Path(tempfile.mkdtemp(prefix="rayudf-mlflow-"))
    try:
        client = mlflow.MlflowClient(tracking_uri=where, registry_uri=where)
        version, run_id, artifacts = _locate(client, source)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifacts, dst_path=str(target), tracking_uri=where))
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for a source it cannot find
        shutil.rmtree(target, ignore_errors=True)
        raise ModelError(f"MLflow model {source!r} does not resolve with tracking URI {where!r}: {err}") from None
    if not is_mlflow_dir(local):
        shutil.rmtree(target, ignore_errors=True)
        raise ModelError(f"MLflow source {source!r} (tracking URI {where!r}) holds no {MLMODEL} file: it is not a model")
    return Resolved(source, local, version, run_id, temp_dir=target)


def _locate(client: Any, source: str) -> tuple[str | None, str | None, str]:
    """(registry version, run, where its files are) for a models:/ or runs:/ URI."""
    if match := _RUN.match(source):
        run = client.get_run(match["run"])
        path = source[len(match[0]) :].strip("/")
        for output in getattr(run.outputs, "model_outputs", None) or []:  # MLflow 3 logs models beside the run
            logged = client.get_logged_model(output.model_id)
            if logged.name == path:
                return None, run.info.run_id, logged.artifact_location
        return None, run.info.run_id, f"{run.info.artifact_uri.rstrip('/')}/{path}"  # a model in the run's artifacts
    if match := _LOGGED.match(source):
        return None, None, client.get_logged_model(match["id"]).artifact_location
    match = _REGISTERED.match(source)
    if match is None:
        raise ModelError(f"{source}: expected models:/<name>/<version>, models:/<name>@<alias> or runs:/<run>/<path>")
    if match["alias"]:
        found = client.get_model_version_by_alias(match["name"], match["alias"])
    else:
        found = client.get_model_version(match["name"], match["version"])
    files = client.get_model_version_download_uri(found.name, found.version)
    if logged := _LOGGED.match(files):  # the version's source is a logged model: read its location here
        files = client.get_logged_model(logged["id"]).artifact_location
    return str(found.version), found.run_id, files


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
        self._column_types: list[np.dtype | None] = []
        self._dtype: Any = None
        self.input_shape: tuple | None = None
        if inputs is not None and inputs.is_tensor_spec():
            spec = inputs.inputs[0]
            self._dtype = spec.type
            if len(spec.shape) == 2 and spec.shape[1] > 0:
                self.input_shape = (None, spec.shape[1])
        elif inputs is not None:
            self._columns = inputs.input_names()
            self._column_types = [_numpy_type(spec.type) for spec in inputs.inputs]
            if all(t is not None and t.kind in "biuf" for t in self._column_types):
                self.input_shape = (None, len(self._columns))  # else a zero row cannot probe it: sample= can

    def predict(self, batch: Any) -> Any:
        batch = np.asarray(batch)
        if self._columns is not None:
            import pandas as pd

            matrix = batch.reshape(len(batch), -1)
            typed = zip(self._columns, self._column_types, strict=True)
            data: Any = pd.DataFrame({name: _cast(matrix[:, i], kind) for i, (name, kind) in enumerate(typed)})
        else:
            data = batch.astype(self._dtype, copy=False) if self._dtype is not None else batch
        out = self._model.predict(data)
        if hasattr(out, "to_numpy"):  # a DataFrame or Series: its values, one entry per row
            out = out.to_numpy()
            return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out
        return np.asarray(out)


def _sweep_dead_copies() -> None:
    """Delete the model copies of worker processes that are gone (killed actors never clean up)."""
    for copy in Path(tempfile.gettempdir()).glob(f"{_KEPT_PREFIX}*-*"):
        pid = copy.name[len(_KEPT_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(copy, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _cast(values: np.ndarray, kind: np.dtype | None) -> np.ndarray:
    return values if kind is None else values.astype(kind)


def _numpy_type(data_type: Any) -> np.dtype | None:
    try:
        return np.dtype(data_type.to_numpy())
    except Exception:  # noqa: BLE001 - a type without a NumPy twin (a tensor spec, a nested type): passed as it comes
        return None


def model_home() -> Path:
    """A directory for one loaded model's files, named after this process.

    A pyfunc model may read its artifacts and code from its directory after loading, so the
    files stay as long as the model (see :func:`load_mlflow`); the directories of processes
    that were killed, which never clean up, are deleted here first.
    """
    _sweep_dead_copies()
    return Path(tempfile.mkdtemp(prefix=f"{_KEPT_PREFIX}{os.getpid()}-"))


def load_mlflow(
    path: Path, name: str, *, home: Path | None = None, options: Mapping[str, Any] | None = None, threads: int = 0, num_gpus: float = 0
) -> Any:
    """Load an MLflow model directory: a torch flavor as the torch and text kinds run it
    (:mod:`udf_engine.models.mlflow_flavors`, ``options``: its text options' values), any other
    with ``mlflow.pyfunc.load_model``. ``home`` (from :func:`model_home`, holding ``path``) is
    deleted when the model is, or this process ends normally."""
    from udf_engine.models.mlflow_flavors import MLFLOW_TEXT_OPTIONS, flavor_of, load_flavor

    mlflow = _mlflow()
    try:
        flavor = flavor_of(path)
        if flavor is not None:
            given = {opt.name: opt.default for opt in MLFLOW_TEXT_OPTIONS} | dict(options or {})
            model = load_flavor(path, flavor, name, given, threads=threads, num_gpus=num_gpus)
        else:
            model = MlflowPredictor(mlflow.pyfunc.load_model(str(path)), name)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - the flavor's loader may raise anything
        raise ModelError(f"cannot load MLflow model {name!r}: {type(err).__name__}: {err}") from None
    if home is not None:
        weakref.finalize(model, shutil.rmtree, home, ignore_errors=True)
    return model
