"""udf_engine: the Ray side of rayudf. Knows nothing of SQL.

A model is loaded once into stateful ``UDFWorker`` actors owned by a ``UDFMaster``;
a caller-side ``Dispatcher`` spreads batches over them. The wings, lowest first:
``models/`` (model files, the model store, the loaders a worker runs), ``actors/`` (the
builder, master, workers, dispatcher, warm pool and its spares policy) and ``byzer/``
(MLSQL's ``RayContext`` and the ``pyjava`` import names); beside them ``errors``,
``settings``, ``ray_runtime``, ``resources`` and ``durable``, which every wing may use.

The names below are imported when first asked for: a process that needs one module (a worker
scanning its share, say) does not import the builder, the dispatcher and the rest with it.

Example:
    >>> from udf_engine import RayContext, UDFBuilder, UDFBuildInFunc, model_rows, put_model
    >>> ctx = RayContext("digits", {"workers": 2}, model_refs=put_model(model_rows("m.keras")))  # doctest: +SKIP
    >>> udf = UDFBuilder.build(ctx, UDFBuildInFunc.init_tf, UDFBuildInFunc.predict)              # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

# The public names, and the module each lives in.
_EXPORTS = {
    **dict.fromkeys(("RemoteUDF", "UDFBuilder", "put_model"), "udf_engine.actors.builder"),
    "Dispatcher": "udf_engine.actors.dispatcher",
    "UDFMaster": "udf_engine.actors.master",
    "UDFWorker": "udf_engine.actors.worker",
    **dict.fromkeys(("DataServer", "PythonContext", "RayContext"), "udf_engine.byzer.ray_context"),
    **dict.fromkeys(
        ("BatchTimeoutError", "ConfigError", "InputError", "ModelError", "RayUDFError", "ResourceError", "RowError", "UnsafePathError",
         "WorkerError"),
        "udf_engine.errors",
    ),
    "UDFBuildInFunc": "udf_engine.models.loaders",
    **dict.fromkeys(
        ("detect_format", "materialize", "model_meta", "model_rows", "read_model_rows", "save_model"), "udf_engine.models.store"
    ),
    **dict.fromkeys(("NAMESPACE", "RayRuntime"), "udf_engine.ray_runtime"),
    **dict.fromkeys(("OPTIONS", "UDFConf"), "udf_engine.settings"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'udf_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # asked once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
