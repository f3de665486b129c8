"""A ``register`` statement's options, typed once: before Ray starts or a model ships.

Three tables say what a model registration takes: the engine's (``udf_engine.settings.OPTIONS``:
workers, batch_size, ...), the registration's own (:data:`REGISTER_OPTIONS`: returns, sample,
version, tracking_uri) and the model format's (``udf_engine.models.loaders.options_of``: method,
and ONNX's inputs and output). :meth:`RegisterOptions.of` reads the options as written into one
object, each value typed and checked, and refuses an unknown name or a bad value naming the
option and the statement. The object travels whole to the registry and the engine: nothing
downstream parses an option again. ``ScriptUDF`` has a table of its own
(:data:`SCRIPT_OPTIONS`); MLSQL's ``Ray`` kind takes any option (its code reads them in
``context.conf``), the engine's among them typed all the same.

Example:
    >>> given = {"workers": "3", "method": "predict_proba", "returns": "DOUBLE[2]"}
    >>> options = RegisterOptions.of(given, "register sklearn.`m.pkl` as f", fmt="pickle")
    >>> options.settings.workers, options.settings.extra, options.returns
    (3, {'method': 'predict_proba'}, 'DOUBLE[2]')
    >>> RegisterOptions.of({"workers": "two"}, "register sklearn.`m.pkl` as f")
    Traceback (most recent call last):
    udf_engine.errors.ConfigError: register sklearn.`m.pkl` as f: option workers: expected int, got 'two'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from udf_engine.errors import ConfigError
from udf_engine.models.loaders import ENGINE_DEFAULTS, options_of
from udf_engine.settings import OPTIONS, Option, UDFConf, read_options

# The register option naming the MLflow tracking server (`set mlflow.tracking_uri` fills it).
TRACKING_URI = "tracking_uri"
REGISTER_OPTIONS: tuple[Option, ...] = (
    Option(
        "returns", None, str, "the DuckDB result type (`DOUBLE`, `FLOAT[10]`, `STRUCT(label BIGINT, p DOUBLE)`); none: inferred by "
        "probing the model once with a zero row, or with the `sample` rows",
    ),
    Option(
        "sample", None, str, "a query whose rows (the function's arguments, real data) the model is tried on once to infer `returns`, "
        'for models that take text or bytes or do not say their input width: `sample="select body from reviews limit 5"`',
    ),
    Option("version", None, str, "a label shown by `!models`; none: the count of registrations of the name"),
    Option(
        TRACKING_URI, None, str, "MLflow: the tracking server that resolves `models:/` and `runs:/` URIs; none: `set mlflow.tracking_uri`, "
        "else `MLFLOW_TRACKING_URI`",
    ),
)
# `register ScriptUDF.`` as f where ...`: Byzer's options of a Python function run in-process.
SCRIPT_OPTIONS: tuple[Option, ...] = (
    Option("lang", "python", str, "the language of `code`; only `python`"),
    Option("code", None, str, "the Python source defining the function (required)"),
    Option("methodName", None, str, "the function of `code` to call; none: `apply`, or the one function `code` defines"),
    Option("dataType", None, str, "the result type as Spark SQL names it (`double`, `map(string,string)`)", ("returnType",)),
    Option("returns", None, str, "the result type as DuckDB names it (wins over `dataType`)"),
    Option(
        "udfType", "udf", str, "`udf`: called with one row's values; `vectorized`: with one NumPy array per argument, returning an array"
    ),
    Option("version", None, str, "a label shown by `!models`; none: the count of registrations of the name"),
)


@dataclass(frozen=True)
class RegisterOptions:
    """The typed options of one registration (see the module's docstring)."""

    settings: UDFConf  # the engine's settings; the model format's own options are in settings.extra
    returns: str | None = None
    sample: str | None = None
    version: str | None = None
    tracking_uri: str | None = None
    given: Mapping[str, Any] = field(default_factory=dict)  # the options as written, for !models

    @classmethod
    def of(cls, given: Mapping[str, Any], what: str, *, fmt: str | None = None) -> RegisterOptions:
        """``given`` (strings, as a statement writes them, or Python values) typed by the engine's table,
        the registration's and format ``fmt``'s (every format's when it is not known yet: see :meth:`checked_for`);
        an engine option not given takes the format's default where it has one (a text model's ``batch_size``)."""
        model = options_of(fmt)
        values = _typed(given, (*OPTIONS, *REGISTER_OPTIONS, *model), what)
        engine = {**ENGINE_DEFAULTS.get(fmt or "", {}), **{opt.name: values[opt.name] for opt in OPTIONS if opt.name in values}}
        extra = {opt.name: values[opt.name] for opt in model if opt.name in values}
        try:
            settings = UDFConf(**engine, extra=extra)
        except ConfigError as err:
            raise ConfigError(f"{what}: {err}") from None
        own = {opt.name: values.get(opt.name) for opt in REGISTER_OPTIONS}
        return cls(settings, **own, given=dict(given))

    def checked_for(self, fmt: str, what: str) -> RegisterOptions:
        """These options, for a model whose format is known now (``register model.``): an option of another
        format's is refused, the format's own are typed again by its table (``output`` is ONNX's or a
        text classifier's), and engine options not given take the format's defaults."""
        takes = {opt.name for opt in options_of(fmt)}
        for name in self.settings.extra:
            if name not in takes:
                raise ConfigError(f"{what}: option {name!r} is not one a {fmt} model takes (it takes: {', '.join(sorted(takes))})")
        extra = _typed(self.settings.extra, options_of(fmt), what)
        given = set(_typed(self.given, OPTIONS, what, only_known=True))
        defaults = {name: value for name, value in ENGINE_DEFAULTS.get(fmt, {}).items() if name not in given}
        return replace(self, settings=replace(self.settings, **defaults, extra=extra))


def script_options(given: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A ``ScriptUDF`` registration's options, typed by :data:`SCRIPT_OPTIONS`."""
    return _typed(given, SCRIPT_OPTIONS, what, defaults=True)


def _typed(
    given: Mapping[str, Any], table: Sequence[Option], what: str, *, defaults: bool = False, only_known: bool = False
) -> dict[str, Any]:
    """The options given (``defaults``: every option of ``table``; ``only_known``: those ``table`` names), typed, by option name."""
    if only_known:
        names = {alias for opt in table for alias in (opt.name, *opt.aliases)}
        given = {key: value for key, value in given.items() if key in names}
    try:
        values = read_options(given, table, what)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(what) else f"{what}: {message}") from None
    if defaults:
        return values
    named = {alias: opt.name for opt in table for alias in (opt.name, *opt.aliases)}
    return {named[key]: values[named[key]] for key in given}
