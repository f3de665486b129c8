"""Settings of one registered UDF: a table of options and the validated dataclass built from it.

The table :data:`OPTIONS` names, defaults and explains every engine option once:
:class:`UDFConf` takes its defaults from it, and the tests check the option table of
``docs/statements.md`` against it.

Example:
    >>> conf = UDFConf.from_options({"maxConcurrency": "3", "num_cpus": "0.5"})
    >>> conf.workers, conf.num_cpus, conf.batch_size
    (3, 0.5, 2048)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from udf_engine.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One option: its name, default, type, help text, accepted aliases and, for a word, the words it may be."""

    name: str
    default: Any
    type: type
    help: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()  # the values a str option takes (any case, kept lowercase); none: any


# What a model error on some rows does: fail the query (the default), or leave those rows NULL.
ON_ERROR = (RAISE, NULL) = ("raise", "null")

OPTIONS: tuple[Option, ...] = (
    Option("workers", 2, int, "number of UDFWorker actors holding the model", ("maxConcurrency",)),
    Option(
        "num_cpus",
        0.25,
        float,
        "CPUs reserved per worker (fractions allowed); its math threads are the node's cores shared among the workers, at least this",
    ),
    Option("num_gpus", 0.0, float, "GPUs reserved per worker (fractions allowed)"),
    Option("resources", {}, dict, 'custom Ray resources per worker, as JSON: {"accelerator": 1}'),
    Option("env", {}, dict, 'environment variables of the worker processes, as JSON: {"OMP_PROC_BIND": "true"} (`!python env` fills it)'),
    Option("batch_size", 2048, int, "rows per batch sent to a worker (DuckDB calls a function with at most 2048)", ("batchSize",)),
    Option(
        "max_retries", 3, int, "times a batch whose worker died is retried; a batch that kills its worker more often is a poison batch"
    ),
    Option("startup_timeout_s", 300.0, float, "seconds to wait for workers to load the model"),
    Option("batch_timeout_s", None, float, "seconds a batch may run before the query fails naming it (none: no limit)"),
    Option("on_error", RAISE, str, f'when the model raises on some rows: "{RAISE}" fails the query, "{NULL}" gives NULL for those rows'),
    Option(
        "traffic", 1.0, float, "share of statements and served requests a new version of a name answers; below 1 it is a canary "
        "beside the version before it",
    ),
    Option("max_batch_size", 32, int, "served requests (rayudf serve) coalesced into one call to the workers, at most"),
    Option("batch_wait_timeout_s", 0.005, float, "seconds a served request waits for others to share its call to the workers"),
)
# The model method an apply_func calls unless the registration names another (method="predict_proba").
DEFAULT_METHOD = "predict"

_BY_NAME = {alias: opt for opt in OPTIONS for alias in (opt.name, *opt.aliases)}


def _default(name: str) -> Any:
    """A dataclass field whose default is the one :data:`OPTIONS` gives ``name``."""
    value = _BY_NAME[name].default
    if isinstance(value, dict):
        return field(default_factory=lambda: dict(value))
    return field(default=value)


# The one reading of a boolean option, everywhere options are read (register, load, save, streams, serve).
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def as_bool(value: Any, name: str) -> bool:
    """A boolean option's value: true/false, 1/0, yes/no, on/off (any case); anything else is an error.

    Example:
        >>> as_bool("Yes", "recycle"), as_bool("0", "recycle"), as_bool(True, "recycle")
        (True, False, True)
        >>> as_bool("maybe", "recycle")
        Traceback (most recent call last):
        udf_engine.errors.ConfigError: option recycle: expected true or false (or 1/0, yes/no, on/off), got 'maybe'
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"option {name}: expected true or false (or 1/0, yes/no, on/off), got {value!r}")


def refuse_unknown(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """The one "not supported here" message: ``what`` names where (``load delta``, ``stream sink parquet``).

    Example:
        >>> refuse_unknown(["idCols", "idcol"], ["idCols", "mergeSchema"], "save delta")
        Traceback (most recent call last):
        udf_engine.errors.ConfigError: save delta: option 'idcol' is not supported here (supported: idCols, mergeSchema)
    """
    known = list(known)
    unknown = [name for name in given if name not in known]
    if unknown:
        supported = ", ".join(known) or "none"
        raise ConfigError(f"{what}: option {unknown[0]!r} is not supported here (supported: {supported})")


def read_options(given: Mapping[str, Any], table: Sequence[Option], what: str) -> dict[str, Any]:
    """The values of ``given`` typed by ``table``, by option name, each missing one at its default;
    an option ``table`` does not name, or one given twice (by name and alias), is an error.

    Example:
        >>> table = (Option("recycle", False, bool, "start over at the end"), Option("steps", 3, int, "rows a step"))
        >>> read_options({"recycle": "1"}, table, "load mockStream")
        {'recycle': True, 'steps': 3}
    """
    by_name = {alias: opt for opt in table for alias in (opt.name, *opt.aliases)}
    refuse_unknown(given, by_name, what)
    values: dict[str, Any] = {}
    for key, value in given.items():
        opt = by_name[key]
        if opt.name in values:
            raise ConfigError(f"{what}: option {opt.name} given twice (as {key!r})")
        values[opt.name] = _coerce(opt, value)
    return {opt.name: values.get(opt.name, opt.default) for opt in table}


def _coerce(opt: Option, value: Any) -> Any:
    if opt.default is None and (value is None or str(value).strip().lower() in ("", "none")):
        return None
    if opt.type is bool:
        return as_bool(value, opt.name)
    if opt.type is dict:
        if isinstance(value, Mapping):
            return dict(value)
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            parsed = None
        if not isinstance(parsed, dict):
            raise ConfigError(f"option {opt.name}: expected a JSON object, got {value!r}")
        return parsed
    if opt.type is str:
        word = str(value).strip()
        if opt.choices and word.lower() not in opt.choices:
            raise ConfigError(f"option {opt.name}: {word!r} is not one of {', '.join(opt.choices)}")
        return word.lower() if opt.choices else word
    try:
        if opt.type is int and isinstance(value, str):
            return int(float(value)) if float(value).is_integer() else int(value)
        return opt.type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {opt.name}: expected {opt.type.__name__}, got {value!r}") from None


@dataclass(frozen=True)
class UDFConf:
    """Validated engine settings of one UDF; ``extra`` keeps every other option verbatim.

    One field per entry of :data:`OPTIONS`, in the same order. ``extra`` reaches
    ``init_func(model_refs, conf)`` through :meth:`as_conf`, so a loader can read its
    own options (``method="predict_proba"``).
    """

    workers: int = _default("workers")
    num_cpus: float = _default("num_cpus")
    num_gpus: float = _default("num_gpus")
    resources: dict = _default("resources")
    env: dict = _default("env")
    batch_size: int = _default("batch_size")
    max_retries: int = _default("max_retries")
    startup_timeout_s: float = _default("startup_timeout_s")
    batch_timeout_s: float | None = _default("batch_timeout_s")
    on_error: str = _default("on_error")
    traffic: float = _default("traffic")
    max_batch_size: int = _default("max_batch_size")
    batch_wait_timeout_s: float = _default("batch_wait_timeout_s")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_error", self.on_error.lower())  # "NULL" as "null"
        if self.workers < 1:
            raise ConfigError(f"option workers: must be at least 1, got {self.workers}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("options num_cpus and num_gpus must not be negative")
        if self.batch_size < 1:
            raise ConfigError(f"option batch_size: must be at least 1, got {self.batch_size}")
        if self.max_retries < 0:
            raise ConfigError(f"option max_retries: must not be negative, got {self.max_retries}")
        if self.batch_timeout_s is not None and self.batch_timeout_s <= 0:
            raise ConfigError(f"option batch_timeout_s: must be positive, got {self.batch_timeout_s:g}")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"option on_error: {self.on_error!r} is not one of {', '.join(ON_ERROR)}")
        if not 0 < self.traffic <= 1:
            raise ConfigError(f"option traffic: must be more than 0 and at most 1, got {self.traffic:g}")
        if self.max_batch_size < 1:
            raise ConfigError(f"option max_batch_size: must be at least 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError(f"option batch_wait_timeout_s: must not be negative, got {self.batch_wait_timeout_s:g}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> UDFConf:
        """Build settings from user options (strings allowed), resolving aliases."""
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in (options or {}).items():
            opt = _BY_NAME.get(key)
            if opt is None:
                extra[key] = value
            elif opt.name in known:
                raise ConfigError(f"option {opt.name} given twice (as {key!r})")
            else:
                known[opt.name] = _coerce(opt, value)
        return cls(**known, extra=extra)

    def as_conf(self) -> dict[str, Any]:
        """The flat dict handed to ``init_func``: engine settings plus every extra option."""
        conf = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        conf.update(self.extra)
        return conf
