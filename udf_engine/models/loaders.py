"""Ready-made ``init_func``s and ``apply_func``s for UDFWorker (the MLSQL ``UDFBuildInFunc``).

An ``init_func(model_refs, conf)`` runs once inside each worker: it fetches the
model table's rows from the object store, rebuilds the files in a private
temporary directory, checks the sha256 and loads the model. An
``apply_func(model, batch)`` scores one batch (a 2-D ndarray) and returns an
ndarray with one entry per row (or a dict of such arrays, which becomes a STRUCT).

Example (inside a worker, or in-process for a test):
    >>> rows = model_rows("models/digits.keras")            # doctest: +SKIP
    >>> model = UDFBuildInFunc.init_tf(rows, {})              # doctest: +SKIP
    >>> UDFBuildInFunc.predict(model, np.zeros((2, 64))).shape  # doctest: +SKIP
    (2, 10)
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from udf_engine.errors import ModelError
from udf_engine.models.generation import DECLARED_RETURNS
from udf_engine.models.mlflow_flavors import MLFLOW_TEXT_OPTIONS
from udf_engine.models.store import unpack
from udf_engine.models.text import SENTENCE_TRANSFORMERS_OPTIONS, TRANSFORMERS_OPTIONS
from udf_engine.models.torch_models import TORCH_OPTIONS
from udf_engine.settings import DEFAULT_METHOD, Option

# The conf key under which UDFWorker hands init_func the threads its math libraries get.
MATH_THREADS = "math_threads"
# A text model's input width: one VARCHAR argument a row (udf_engine.models.text).
TEXT_INPUT = "text"
# A generation model's: a prompt (text or chat messages), and the row's parameters if any (udf_engine.models.generation).
PROMPT_INPUT = "prompt"


def fetch_rows(model_refs: Sequence[Any]) -> list[dict]:
    """Model-table rows from object refs (as Ray hands them to init_func) or plain rows."""
    import ray

    refs = [r for r in model_refs if isinstance(r, ray.ObjectRef)]
    fetched = iter(ray.get(refs)) if refs else iter(())
    return [next(fetched) if isinstance(r, ray.ObjectRef) else r for r in model_refs]


class SavedModelPredictor:
    """A TF SavedModel's serving signature behind a Keras-like ``predict``."""

    def __init__(self, loaded: Any) -> None:
        self._fn = loaded.signatures["serving_default"]
        (self._input_name, spec), = self._fn.structured_input_signature[1].items()
        self._dtype = spec.dtype.as_numpy_dtype
        self.input_shape = tuple(spec.shape.as_list())

    def predict(self, batch: np.ndarray, verbose: int = 0) -> Any:
        out = self._fn(**{self._input_name: np.asarray(batch, dtype=self._dtype)})
        arrays = {k: v.numpy() for k, v in out.items()}
        return next(iter(arrays.values())) if len(arrays) == 1 else arrays

    predict_on_batch = predict


def _enable_gpu_memory_growth(tf: Any) -> None:
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth can only be set before first use
            pass


def _with_model_files(model_refs: Sequence[Any], load: Callable[[Path, dict], Any], *, keep_in: Path | None = None) -> Any:
    """``load(path, meta)`` on the model's files, written to a temporary directory deleted afterwards,
    or to ``keep_in``, left for the loaded model to use (deleted only if loading fails)."""
    rows = fetch_rows(model_refs)
    workdir = keep_in or Path(tempfile.mkdtemp(prefix="rayudf-model-"))
    try:
        model = load(*unpack(rows, workdir))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if keep_in is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return model


def _with_format_options(model_refs: Sequence[Any], conf: dict, fmt: str, load: Callable[..., Any]) -> Any:
    """``load(path, name, options, threads=, num_gpus=)`` on the model's files, ``options`` being format
    ``fmt``'s own from conf (typed where the registration was read), each missing one at its default."""
    engine = _engine_options(conf)
    options = {opt.name: conf.get(opt.name, opt.default) for opt in FORMAT_OPTIONS[fmt]}
    options[DECLARED_RETURNS] = conf.get(DECLARED_RETURNS)  # a generation model answers with usage when a STRUCT is declared
    return _with_model_files(
        model_refs, lambda path, meta: load(path, str(meta.get("name")), options, threads=engine["threads"], num_gpus=engine["num_gpus"])
    )


def _engine_options(conf: dict) -> dict:
    """What a loader takes from conf: the method asked for, the worker's math threads and GPUs."""
    return {
        "method": str(conf.get("method") or DEFAULT_METHOD),
        "threads": int(conf.get(MATH_THREADS) or 0),
        "num_gpus": float(conf.get("num_gpus") or 0),
    }


class UDFBuildInFunc:
    """Built-in loaders (``init_tf``, ``init_pickle``, ``init_onnx``, ``init_xgboost``, ``init_lightgbm``)
    and appliers (``predict``, ``predictor``)."""

    @staticmethod
    def init_tf(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load a Keras ``.keras``/``.h5`` file or a TF SavedModel directory."""
        import tensorflow as tf

        _enable_gpu_memory_growth(tf)

        def load(path: Path, meta: dict) -> Any:
            try:
                if meta["format"] == "savedmodel":
                    return SavedModelPredictor(tf.saved_model.load(str(path)))
                import keras

                return keras.models.load_model(path, compile=False)
            except Exception as err:  # noqa: BLE001 - any loader failure is a model problem for the user
                raise ModelError(f"cannot load {meta['format']} model {meta.get('name')!r}: {err}") from None

        return _with_model_files(model_refs, load)

    @staticmethod
    def init_pickle(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load a cloudpickle/pickle/joblib object that has ``predict`` (or ``conf['method']``)."""

        def load(path: Path, meta: dict) -> Any:
            try:
                if path.suffix == ".joblib":
                    import joblib

                    model = joblib.load(path)
                else:
                    import cloudpickle

                    model = cloudpickle.loads(path.read_bytes())
            except Exception as err:  # noqa: BLE001 - unpickling runs the model's own code, which may raise anything
                raise ModelError(f"cannot unpickle model {meta.get('name')!r}: {err}") from None
            method = conf.get("method") or DEFAULT_METHOD
            if not callable(getattr(model, method, None)):
                raise ModelError(f"model {meta.get('name')!r} has no method {method!r}")
            return model

        return _with_model_files(model_refs, load)

    @staticmethod
    def init_onnx(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load an ONNX graph into one ONNX Runtime session (options ``inputs``, ``output``)."""
        from udf_engine.models.onnx import load_onnx

        def load(path: Path, meta: dict) -> Any:
            return load_onnx(path, str(meta.get("name")), inputs=conf.get("inputs"), output=conf.get("output"), **_engine_options(conf))

        return _with_model_files(model_refs, load)

    @staticmethod
    def init_xgboost(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load an xgboost booster saved with ``save_model`` (``.ubj``/``.json``)."""
        from udf_engine.models.boosters import load_xgboost

        return _with_model_files(model_refs, lambda path, meta: load_xgboost(path, str(meta.get("name")), **_engine_options(conf)))

    @staticmethod
    def init_lightgbm(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load a LightGBM booster saved with ``save_model`` (its text format)."""
        from udf_engine.models.boosters import load_lightgbm

        return _with_model_files(model_refs, lambda path, meta: load_lightgbm(path, str(meta.get("name")), **_engine_options(conf)))

    @staticmethod
    def init_mlflow(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load an MLflow model directory (needs ``rayudf[mlflow]``): its torch flavors as the torch and text
        kinds run them, any other with ``mlflow.pyfunc.load_model``."""
        from udf_engine.models.mlflow import load_mlflow, model_home

        home = model_home()
        engine = _engine_options(conf)
        options = {opt.name: conf.get(opt.name, opt.default) for opt in FORMAT_OPTIONS["mlflow"]}
        return _with_model_files(
            model_refs,
            lambda path, meta: load_mlflow(path, str(meta.get("name")), home=home, options=options, threads=engine["threads"],
                                           num_gpus=engine["num_gpus"]),
            keep_in=home,
        )

    @staticmethod
    def init_torch(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load a PyTorch model: a ``torch.export`` program, TorchScript, or a cloudpickled ``nn.Module`` (``rayudf[text]``)."""
        from udf_engine.models.torch_models import load_torch

        return _with_format_options(model_refs, conf, "torch", load_torch)

    @staticmethod
    def init_transformers(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load a Hugging Face ``save_pretrained`` directory for its task (``rayudf[text]``)."""
        from udf_engine.models.text import load_transformers

        return _with_format_options(model_refs, conf, "transformers", load_transformers)

    @staticmethod
    def init_sentence_transformers(model_refs: Sequence[Any], conf: dict) -> Any:
        """Load a sentence-transformers model directory (``rayudf[text]``)."""
        from udf_engine.models.text import load_sentence_transformer

        return _with_format_options(model_refs, conf, "sentence_transformers", load_sentence_transformer)

    @staticmethod
    def predict(model: Any, batch: np.ndarray) -> Any:
        """Score a batch the fastest way the model offers (Keras ``predict_on_batch``)."""
        scorer = getattr(model, "predict_on_batch", None) or model.predict
        return scorer(batch)

    @staticmethod
    def predictor(method: str = DEFAULT_METHOD) -> Callable[[Any, np.ndarray], Any]:
        """An apply_func calling ``model.<method>(batch)``, e.g. ``predictor("predict_proba")``."""
        if method == DEFAULT_METHOD:
            return UDFBuildInFunc.predict

        def apply(model: Any, batch: np.ndarray) -> Any:
            return getattr(model, method)(batch)

        return apply


# The init_func that loads each model format (the formats detect_format names).
LOADERS: dict[str, Callable[[Sequence[Any], dict], Any]] = {
    "keras": UDFBuildInFunc.init_tf,
    "savedmodel": UDFBuildInFunc.init_tf,
    "pickle": UDFBuildInFunc.init_pickle,
    "onnx": UDFBuildInFunc.init_onnx,
    "xgboost": UDFBuildInFunc.init_xgboost,
    "lightgbm": UDFBuildInFunc.init_lightgbm,
    "mlflow": UDFBuildInFunc.init_mlflow,
    "torch": UDFBuildInFunc.init_torch,
    "transformers": UDFBuildInFunc.init_transformers,
    "sentence_transformers": UDFBuildInFunc.init_sentence_transformers,
}
# A text model's spare imports the Auto model classes and their modeling code (~2.7 s of the ~5 s), after which
# a model's own architecture costs ~0.05 s; and sentence-transformers (~1.5 s more) where it is installed, which
# a `transformers` user need not have. One spare serves either text kind.
TEXT_IMPORTS = ("torch", "transformers", "transformers.models.auto.modeling_auto", "transformers.modeling_utils") + (
    ("sentence_transformers",) if importlib.util.find_spec("sentence_transformers") else ()
)
# What a warm spare of a loader's workers imports while it waits (udf_engine.actors.warm_pool): the
# frameworks whose import costs seconds. Loaders not named here start workers as they are needed.
WARM_IMPORTS: dict[Callable, tuple[str, ...]] = {
    UDFBuildInFunc.init_tf: ("tensorflow", "keras"),
    UDFBuildInFunc.init_onnx: ("onnxruntime",),
    UDFBuildInFunc.init_torch: ("torch",),
    UDFBuildInFunc.init_transformers: TEXT_IMPORTS,
    UDFBuildInFunc.init_sentence_transformers: TEXT_IMPORTS,
}
# The frameworks a session may warm before its first registration (Session(warm=...)), by name.
WARM_FRAMEWORKS: dict[str, tuple[str, ...]] = {
    "keras": WARM_IMPORTS[UDFBuildInFunc.init_tf], "onnx": WARM_IMPORTS[UDFBuildInFunc.init_onnx],
    "torch": WARM_IMPORTS[UDFBuildInFunc.init_transformers],
}
# Engine options (udf_engine.settings.OPTIONS) whose default differs for a format. A text model's batch of
# 2,048 rows is seconds of work: a DuckDB chunk of texts, longest first, cut in pieces of at most 256 rows
# (and udf_engine.actors.batching.TEXT_PIECES' share of its characters) keeps every worker busy.
ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformers": {"batch_size": 256}, "sentence_transformers": {"batch_size": 256},
}
# The options of a model's own, beside the engine's (udf_engine.settings.OPTIONS): every format's,
# and each format's own. Typed once where the registration is read; the loaders get the values.
MODEL_OPTIONS: tuple[Option, ...] = (
    Option(
        "method", DEFAULT_METHOD, str, "the model method to call: `predict_proba` for pickled models and for xgboost/lightgbm classifiers"
    ),
)
FORMAT_OPTIONS: dict[str, tuple[Option, ...]] = {
    "onnx": (
        Option("inputs", None, str, 'ONNX: the graph inputs the function\'s arguments feed, in argument order (`inputs="a,b,c"`); '
               "none: the graph's order"),
        Option("output", None, str, 'ONNX: the graph output the function returns (`output="probabilities"`); none: the first output'),
    ),
    "torch": TORCH_OPTIONS,
    "transformers": TRANSFORMERS_OPTIONS,
    "sentence_transformers": SENTENCE_TRANSFORMERS_OPTIONS,
    "mlflow": MLFLOW_TEXT_OPTIONS,  # for its transformers, sentence_transformers and pytorch flavors
}


def options_of(fmt: str | None) -> tuple[Option, ...]:
    """The options a model of format ``fmt`` takes beside the engine's. When the format is not known
    yet (None), every format's: a name two formats give different meanings (``output``) is read as
    plain text then, and typed by its format's table once the model is read.

    Example:
        >>> [o.name for o in options_of("onnx")], [o.name for o in options_of("pickle")]
        (['method', 'inputs', 'output'], ['method'])
        >>> [o.choices for o in options_of(None) if o.name == "output"]
        [()]
    """
    if fmt is not None:
        return (*MODEL_OPTIONS, *FORMAT_OPTIONS.get(fmt, ()))
    merged: dict[str, Option] = {opt.name: opt for opt in MODEL_OPTIONS}
    for opt in (opt for options in FORMAT_OPTIONS.values() for opt in options):
        same = merged.setdefault(opt.name, opt)
        if same != opt:
            merged[opt.name] = Option(opt.name, None, str, f"{same.help}; {opt.help}")
    return tuple(merged.values())


# The model kinds a user may name, and the format a file of that kind is read as when its
# suffix does not tell. A kind accepts any model its format's loader loads (keras: SavedModels too).
MODEL_KINDS: dict[str, str] = {
    "keras": "keras", "tf": "keras", "savedmodel": "savedmodel", "sklearn": "pickle", "pickle": "pickle",
    "onnx": "onnx", "xgboost": "xgboost", "lightgbm": "lightgbm", "mlflow": "mlflow",
    "torch": "torch", "pytorch": "torch", "transformers": "transformers", "sentence_transformers": "sentence_transformers",
}
# Kinds whose files any suffix may name (`register torch.`m.pkl``: a pickled nn.Module, not a scikit-learn pickle).
ANY_SUFFIX_KINDS = ("torch", "pytorch")


class RowWiseApply:
    """Runs an MLSQL-style ``apply_func(model, value)`` written for one row over a whole batch.

    Such a function returns ``{"value": ...}`` for its row; the batch's result is the
    list of those values, in row order.

    Example:
        >>> apply = RowWiseApply(lambda model, v: {"value": [float(sum(v))]})
        >>> apply(None, np.array([[1.0, 2.0], [3.0, 4.0]]))
        [[3.0], [7.0]]
    """

    def __init__(self, func: Callable[[Any, Any], Any]) -> None:
        self.func = func

    def __call__(self, model: Any, batch: Any) -> list:
        values = []
        for row in batch:
            result = self.func(model, row)
            values.append(result["value"] if isinstance(result, dict) and "value" in result else result)
        return values


def input_width(model: Any) -> int | str | None:
    """How many features one row of the model's input has, when the model says so (TEXT_INPUT: one text)."""
    if getattr(model, "takes_text", False):
        return TEXT_INPUT
    if getattr(model, "takes_prompts", False):
        return PROMPT_INPUT
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, list):  # a multi-input Keras model: no single width
        return None
    if shape and len(shape) == 2 and isinstance(shape[-1], int):
        return shape[-1]
    width = getattr(model, "n_features_in_", None)
    return int(width) if width is not None else None


def declared_returns(model: Any) -> str | None:
    """The DuckDB type a loaded model says it returns (a text model knows its head), if it says."""
    returns = getattr(model, "returns", None)
    return returns if isinstance(returns, str) else None


def model_counts(model: Any) -> dict:
    """What a model counts of its own work (a text model: its device, texts truncated, tokens), for !workers."""
    counts = getattr(model, "counts", None)
    return dict(counts()) if callable(counts) else {}


def load_info(model: Any) -> dict:
    """What the loader recorded of how it loaded the model (ONNX providers, a booster's device), if anything."""
    info = getattr(model, "load_info", None)
    return dict(info) if isinstance(info, dict) else {}
