"""udf_engine: the Ray side of rayudf. Knows nothing of SQL.

A model is loaded once into stateful ``UDFWorker`` actors owned by a ``UDFMaster``;
a caller-side ``Dispatcher`` spreads batches over them. The wings, lowest first:
``models/`` (model files, the model store, the loaders a worker runs), ``actors/`` (the
builder, master, workers, dispatcher and warm pool) and ``byzer/`` (MLSQL's ``RayContext``
and the ``pyjava`` import names); beside them ``errors``, ``settings``, ``ray_runtime`` and
``resources``, which every wing may use.

Example:
    >>> from udf_engine import RayContext, UDFBuilder, UDFBuildInFunc, model_rows, put_model
    >>> ctx = RayContext("digits", {"workers": 2}, model_refs=put_model(model_rows("m.keras")))  # doctest: +SKIP
    >>> udf = UDFBuilder.build(ctx, UDFBuildInFunc.init_tf, UDFBuildInFunc.predict)              # doctest: +SKIP
"""

from udf_engine.actors.builder import RemoteUDF, UDFBuilder, put_model
from udf_engine.actors.dispatcher import Dispatcher
from udf_engine.actors.master import UDFMaster
from udf_engine.actors.worker import UDFWorker
from udf_engine.byzer.ray_context import DataServer, PythonContext, RayContext
from udf_engine.errors import ConfigError, InputError, ModelError, RayUDFError, ResourceError, RowError, WorkerError
from udf_engine.models.loaders import UDFBuildInFunc
from udf_engine.models.store import detect_format, materialize, model_meta, model_rows, read_model_rows, save_model
from udf_engine.ray_runtime import NAMESPACE, RayRuntime
from udf_engine.settings import OPTIONS, UDFConf

__all__ = [
    "ConfigError", "DataServer", "Dispatcher", "InputError", "ModelError", "NAMESPACE", "OPTIONS",
    "PythonContext", "RayContext", "RayRuntime", "RayUDFError", "RemoteUDF", "ResourceError", "RowError",
    "UDFBuildInFunc", "UDFBuilder", "UDFConf", "UDFMaster", "UDFWorker", "WorkerError", "detect_format",
    "materialize", "model_meta", "model_rows", "put_model", "read_model_rows", "save_model",
]
