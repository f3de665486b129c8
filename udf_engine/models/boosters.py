"""XGBoost and LightGBM boosters saved with their own ``save_model`` (no pickle), scored in a worker.

A booster is a classifier or a regressor by its own objective (xgboost's
``learner.objective.name`` in its config, LightGBM's ``objective`` parameter).
``predict`` gives a regressor's value, or a classifier's class index (0..k-1: a booster
file does not keep the labels a scikit-learn wrapper mapped them from);
``predict_proba`` gives a classifier's probabilities, k per row, binary ones too
(``[1 - p, p]``). Both come back as float64/int64 arrays (one value, or k, per row).

Example (inside a worker, or in-process for a test):
    >>> model = load_xgboost(Path("churn.ubj"), "churn.ubj", method="predict_proba")  # doctest: +SKIP
    >>> model.predict_proba(np.zeros((2, 8))).shape                                   # doctest: +SKIP
    (2, 2)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from udf_engine.errors import ModelError
from udf_engine.models.devices import xgboost_device
from udf_engine.settings import DEFAULT_METHOD

METHODS = (DEFAULT_METHOD, "predict_proba")
# xgboost's classification objectives, and how a batch's probabilities come from the booster:
# the predicted value itself, or a transform of the raw margin. binary:hinge predicts 0/1 only.
_XGB_CLASSIFIERS: dict[str, str | None] = {
    "binary:logistic": "value",
    "multi:softprob": "value",
    "binary:logitraw": "sigmoid",
    "multi:softmax": "softmax",
    "binary:hinge": None,
}
_LGB_CLASSIFIERS = ("binary", "multiclass", "multiclassova")


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-margin))


def _softmax(margin: np.ndarray) -> np.ndarray:
    e = np.exp(margin - margin.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class BoosterPredictor:
    """A booster behind ``predict`` and, for a classifier with probabilities, ``predict_proba``.

    ``values(batch)`` is what the booster predicts; ``probabilities(batch)`` (None for a
    regressor or a classifier without them) one probability per row (binary) or k.

    Example:
        >>> clf = BoosterPredictor("xgboost", "m", "binary:logistic", classifier=True, n_features=2,
        ...                        values=lambda b: b[:, 0], probabilities=lambda b: b[:, 0])
        >>> clf.predict_proba(np.array([[0.2, 0.0], [0.9, 0.0]])), clf.predict(np.array([[0.2, 0.0], [0.9, 0.0]]))
        (array([[0.8, 0.2],
               [0.1, 0.9]]), array([0, 1]))
    """

    def __init__(
        self, kind: str, model: str, objective: str, *, classifier: bool, n_features: int,
        values: Callable[[np.ndarray], np.ndarray], probabilities: Callable[[np.ndarray], np.ndarray] | None,
        load_info: dict | None = None,
    ) -> None:
        self.kind, self.model, self.objective, self.classifier = kind, model, objective, classifier
        self.n_features_in_ = n_features
        self._values = values
        self._probabilities = probabilities
        self.load_info = {"objective": objective, **(load_info or {})}

    def check_method(self, method: str) -> None:
        """Raise ModelError, naming the model and its kind, if ``method`` does not apply to it."""
        if method not in METHODS:
            raise ModelError(f"{self.kind} model {self.model!r} has no method {method!r} (methods: {', '.join(METHODS)})")
        if method == "predict_proba" and self._probabilities is None:
            what = "a classifier without probabilities" if self.classifier else "a regressor"
            raise ModelError(f"{self.kind} model {self.model!r} is {what} (objective {self.objective}): it has no predict_proba")

    def predict(self, batch: Any) -> np.ndarray:
        """A regressor's values, or a classifier's class indexes."""
        batch = np.asarray(batch, dtype=np.float64)
        if not self.classifier:
            return np.asarray(self._values(batch), dtype=np.float64)
        if self._probabilities is None:
            return np.asarray(self._values(batch)).astype(np.int64)
        return self.predict_proba(batch).argmax(axis=1)

    def predict_proba(self, batch: Any) -> np.ndarray:
        """``(rows, k)`` class probabilities; a binary classifier's are ``[1 - p, p]``."""
        p = np.asarray(self._probabilities(np.asarray(batch, dtype=np.float64)), dtype=np.float64)
        return np.column_stack([1.0 - p, p]) if p.ndim == 1 else p


def _loaded(kind: str, model: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except Exception as err:  # noqa: BLE001 - each library raises its own error type for a file it cannot read
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load {kind} model {model!r}: not a file {kind}'s save_model wrote ({first})") from None


def load_xgboost(path: Path, model: str, *, method: str = DEFAULT_METHOD, threads: int = 0, num_gpus: float = 0.0) -> BoosterPredictor:
    """An xgboost ``Booster`` from a ``.ubj``/``.json`` file, on the GPU when the worker has one."""
    import xgboost as xgb

    booster = _loaded("xgboost", model, lambda: xgb.Booster(model_file=str(path)))
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    device = xgboost_device(num_gpus, os.environ, cuda_built=bool(xgb.build_info().get("USE_CUDA")))
    booster.set_param({"device": device, **({"nthread": threads} if threads else {})})

    def values(batch: np.ndarray) -> np.ndarray:
        return booster.inplace_predict(batch, validate_features=False)

    def margin(batch: np.ndarray) -> np.ndarray:
        return booster.inplace_predict(batch, predict_type="margin", validate_features=False)

    transform = _XGB_CLASSIFIERS.get(objective)
    probabilities = {"value": values, "sigmoid": lambda b: _sigmoid(margin(b)), "softmax": lambda b: _softmax(margin(b)), None: None}
    predictor = BoosterPredictor(
        "xgboost", model, objective, classifier=objective in _XGB_CLASSIFIERS, n_features=booster.num_features(),
        values=values, probabilities=probabilities[transform],
        load_info={"device": device, "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")},
    )
    predictor.check_method(method)
    return predictor


def load_lightgbm(path: Path, model: str, *, method: str = DEFAULT_METHOD, threads: int = 0, num_gpus: float = 0.0) -> BoosterPredictor:
    """A LightGBM ``Booster`` from its text model file (always on the CPU: LightGBM predicts there)."""
    import lightgbm as lgb

    booster = _loaded("lightgbm", model, lambda: lgb.Booster(model_file=str(path)))
    objective = str(booster.params.get("objective") or booster.dump_model()["objective"]).split()[0]
    extra = {"num_threads": threads} if threads else {}

    def values(batch: np.ndarray) -> np.ndarray:
        return booster.predict(batch, **extra)

    classifier = objective in _LGB_CLASSIFIERS
    predictor = BoosterPredictor(
        "lightgbm", model, objective, classifier=classifier, n_features=booster.num_feature(),
        values=values, probabilities=values if classifier else None,
        load_info={"device": "cpu", "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")},
    )
    predictor.check_method(method)
    return predictor
