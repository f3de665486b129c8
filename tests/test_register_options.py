"""A register statement's options are typed once, where the statement is read: a bad value or an
unknown name is a one-line error naming the option and the statement, before Ray starts or a
model ships. No Ray here: the registry's runtime fails the test if anything asks for it."""

from __future__ import annotations

import pytest

from sql_magics import ExecutionError
from sql_magics.models import kinds
from sql_magics.models.options import RegisterOptions
from sql_magics.models.registry import FunctionRegistry
from sql_magics.state import ScriptState
from sql_magics.tables.database import Database
from udf_engine import RayRuntime
from udf_engine.errors import ConfigError


class NoRay(RayRuntime):
    def ensure(self) -> None:
        raise AssertionError("Ray was asked for before the options were checked")


@pytest.fixture
def registry():
    return FunctionRegistry(Database(), NoRay(), session_id="t0", worker_env={})


@pytest.fixture
def model(sklearn_model):
    return str(sklearn_model[1])


@pytest.mark.parametrize(
    ("kind", "options", "says"),
    [
        ("sklearn", {"batch_size": "many"}, "option batch_size: expected int, got 'many'"),
        ("sklearn", {"workers": "0"}, "option workers: must be at least 1, got 0"),
        ("sklearn", {"on_error": "ignore"}, "option on_error: 'ignore' is not one of raise, null"),
        ("sklearn", {"batchsize": "10"}, "option 'batchsize' is not supported here (supported: workers, maxConcurrency"),
        ("sklearn", {"inputs": "a,b"}, "option 'inputs' is not supported here"),  # an ONNX option
        ("sklearn", {"source": "x"}, "option 'source' is not supported here"),  # once a Python keyword argument: a TypeError
        ("sklearn", {"workers": "2", "maxConcurrency": "3"}, "option workers given twice (as 'maxConcurrency')"),
        ("model", {"output": "probabilities"}, "option 'output' is not one a pickle model takes (it takes: method)"),
        ("Ray", {"registerCode": "x = 1", "batch_timeout_s": "-1"}, "option batch_timeout_s: must be positive, got -1"),
        ("ScriptUDF", {"code": "def apply(x): return x", "returns": "BIGINT", "cache": "true"}, "option 'cache' is not supported here"),
    ],
)
def test_a_bad_option_is_one_line_naming_it_and_the_statement_before_ray_starts(registry, model, kind, options, says):
    source = "" if kind in ("Ray", "ScriptUDF") else model
    with pytest.raises((ConfigError, ExecutionError)) as err:
        kinds.register(registry, ScriptState(), kind, source, "f", options)
    message = str(err.value)
    assert says in message and "\n" not in message, message
    if kind not in ("model",):  # a detected kind is checked once the model's format is read
        assert message.startswith(f"register {kind}.`{source}` as f: "), message
    assert "f" not in registry.functions


def test_options_are_typed_values_that_travel_whole():
    options = RegisterOptions.of(
        {"maxConcurrency": "3", "batchSize": "512", "on_error": "NULL", "inputs": "X", "returns": "FLOAT[2]", "version": "V2"},
        "register onnx.`m.onnx` as f", fmt="onnx",
    )
    settings = options.settings
    assert (settings.workers, settings.batch_size, settings.on_error) == (3, 512, "null")
    assert settings.extra == {"inputs": "X"}  # a graph input's name keeps its case
    assert (options.returns, options.version, options.sample) == ("FLOAT[2]", "V2", None)
    assert settings.as_conf()["inputs"] == "X" and settings.as_conf()["batch_size"] == 512  # what init_func reads


def test_session_register_model_types_its_keyword_options_the_same_way(sklearn_model):
    from sql_magics import Session

    with Session(warm=False) as s, pytest.raises(ConfigError, match="register_model.*option batch_size: expected int, got 'lots'"):
        s.register_model("f", sklearn_model[1], batch_size="lots")


def test_a_text_format_has_its_own_batch_size_default_which_a_given_one_beats():
    what = "register transformers.`m` as f"
    assert RegisterOptions.of({}, what, fmt="transformers").settings.batch_size == 256
    assert RegisterOptions.of({"batchSize": "64"}, what, fmt="transformers").settings.batch_size == 64
    assert RegisterOptions.of({}, "register onnx.`m.onnx` as f", fmt="onnx").settings.batch_size == 2048
    # `register model.`: the format is known once the model is read
    unknown = RegisterOptions.of({"pooling": "cls"}, "register model.`m` as f")
    assert unknown.settings.batch_size == 2048
    assert unknown.checked_for("transformers", what).settings.batch_size == 256
    assert RegisterOptions.of({}, what).checked_for("transformers", what).settings.batch_size == 256
    assert RegisterOptions.of({"batch_size": "8"}, what).checked_for("transformers", what).settings.batch_size == 8
