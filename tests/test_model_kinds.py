"""The model kinds people bring: ONNX graphs, XGBoost and LightGBM boosters saved with their own
``save_model``. SQL scoring equals the same model run in-process on the same rows; bad models
fail ``register`` naming the model and the kind; the GPU choice follows Ray's logical GPUs."""

from __future__ import annotations

import numpy as np
import pytest

from sql_magics.errors import ExecutionError
from udf_engine import ModelError, detect_format
from udf_engine.models.devices import CPU_PROVIDER, CUDA_PROVIDER, onnx_providers, xgboost_device

from conftest import WORKER_CPUS

TOL = 1e-5
ONE_WORKER = f'workers="1" and num_cpus="{WORKER_CPUS}"'


def scored(frame, column):
    return np.stack(frame[column].to_numpy())


def in_process(path, feeds, output=None):
    """The ONNX model run here, by ONNX Runtime, on the same rows."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=[CPU_PROVIDER]).run([output] if output else None, feeds)[0]


@pytest.fixture
def sql_functions(session):
    """Names of functions a test registers with a `register` statement: unregistered after it."""
    names: list[str] = []
    yield names
    for name in names:
        if name in session.functions:
            session.unregister(name)


# -- models, made here --------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_lr(digits, model_dir):
    """A logistic regression on the digits, converted by skl2onnx (probabilities as a tensor)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    pixels, labels = digits
    model = LogisticRegression(max_iter=300).fit(pixels, labels)
    path = model_dir / "digits_lr.onnx"
    path.write_bytes(to_onnx(model, pixels[:1], options={id(model): {"zipmap": False}}).SerializeToString())
    return model, path


@pytest.fixture(scope="module")
def onnx_mlp(digits, model_dir):
    """A small MLP on the digits, converted by skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    pixels, labels = digits
    model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0).fit(pixels, labels)
    path = model_dir / "digits_mlp.onnx"
    path.write_bytes(to_onnx(model, pixels[:1], options={id(model): {"zipmap": False}}).SerializeToString())
    return model, path


def onnx_graph(path, *, batch="batch"):
    """A raw graph with two inputs, x FLOAT[batch, 2] and y DOUBLE[batch]: z = x0 + 10 x1 + 100 y, z2 = 2 z."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h

    inputs = [h.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2]), h.make_tensor_value_info("y", TensorProto.DOUBLE, [batch])]
    outputs = [h.make_tensor_value_info(n, TensorProto.FLOAT, [batch]) for n in ("z", "z2")]
    constants = [
        h.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 10.0]),
        h.make_tensor("hundred", TensorProto.FLOAT, [], [100.0]),
        h.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["xw"]),
        h.make_node("Cast", ["y"], ["yf"], to=TensorProto.FLOAT),
        h.make_node("Mul", ["yf", "hundred"], ["yh"]),
        h.make_node("Add", ["xw", "yh"], ["z"]),
        h.make_node("Mul", ["z", "two"], ["z2"]),
    ]
    model = h.make_model(h.make_graph(nodes, "two_inputs", inputs, outputs, initializer=constants), opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def two_inputs(model_dir):
    return onnx_graph(model_dir / "two_inputs.onnx")


@pytest.fixture(scope="module")
def xgb_models(digits, model_dir):
    """XGBoost on the digits: a 10-class and a binary classifier (.ubj), a regressor (.json)."""
    import xgboost as xgb

    pixels, labels = digits
    params = {"n_estimators": 8, "max_depth": 3, "tree_method": "hist", "n_jobs": 1}
    multi = xgb.XGBClassifier(**params).fit(pixels, labels)
    binary = xgb.XGBClassifier(**params).fit(pixels, (labels >= 5).astype(int))
    regressor = xgb.XGBRegressor(**params).fit(pixels, labels.astype(np.float64))
    paths = {"multi": model_dir / "xgb_multi.ubj", "binary": model_dir / "xgb_binary.ubj", "regressor": model_dir / "xgb_reg.json"}
    for name, model in (("multi", multi), ("binary", binary), ("regressor", regressor)):
        model.get_booster().save_model(paths[name])
    return {"multi": multi, "binary": binary, "regressor": regressor}, paths


@pytest.fixture(scope="module")
def lgb_model(digits, model_dir):
    """A LightGBM classifier on the digits, its booster saved in LightGBM's text format."""
    import lightgbm as lgb

    pixels, labels = digits
    model = lgb.LGBMClassifier(n_estimators=8, num_leaves=8, n_jobs=1, verbose=-1).fit(pixels, labels)
    path = model_dir / "lgb_digits.txt"
    model.booster_.save_model(path)
    return model, path


# -- without Ray --------------------------------------------------------------------------


def test_onnx_and_ubj_are_detected_json_and_txt_need_the_kind(tmp_path):
    assert detect_format(tmp_path / "m.onnx") == "onnx"
    assert detect_format(tmp_path / "m.ubj") == "xgboost"
    for name in ("m.json", "m.txt"):
        with pytest.raises(ModelError, match="give the model kind explicitly"):
            detect_format(tmp_path / name)


@pytest.mark.parametrize(
    ("num_gpus", "visible", "available", "providers", "device"),
    [
        (1, "1", [CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER], "cuda"),
        (0.5, "0,1", [CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER], "cuda"),
        (1, "", [CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER], "cpu"),  # Ray made no GPU visible
        (1, None, [CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER], "cpu"),
        (0, "0", [CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER], "cpu"),  # visible, but not reserved
        (1, "0", [CPU_PROVIDER], [CPU_PROVIDER], "cuda"),  # an onnxruntime build without CUDA
    ],
)
def test_gpu_choice_follows_cuda_visible_devices(num_gpus, visible, available, providers, device):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert onnx_providers(num_gpus, environ, available) == providers
    assert xgboost_device(num_gpus, environ, cuda_built=True) == device
    assert xgboost_device(num_gpus, environ, cuda_built=False) == "cpu"


# -- ONNX ---------------------------------------------------------------------------------


def test_onnx_classifier_through_register_statements(session, sql_functions, onnx_lr, digits, digits_parquet):
    model, path = onnx_lr
    sql_functions += ["lr_proba", "lr_label"]
    session.sql(
        f"""register onnx.`{path}` as lr_proba where output="probabilities" and {ONE_WORKER};
        register onnx.`{path}` as lr_label where {ONE_WORKER}"""
    )
    frame = session.sql(f"select lr_proba(pixels) as p, lr_label(pixels) as l from '{digits_parquet}' order by id")

    assert session.functions["lr_proba"].kind == "onnx"
    assert session.functions["lr_proba"].returns == "FLOAT[10]"
    assert session.functions["lr_label"].returns == "BIGINT"  # the first output: skl2onnx's label
    np.testing.assert_allclose(scored(frame, "p"), in_process(path, {"X": digits[0]}, "probabilities"), atol=TOL)
    np.testing.assert_allclose(scored(frame, "p"), model.predict_proba(digits[0]), atol=TOL)
    np.testing.assert_array_equal(frame["l"].to_numpy(), in_process(path, {"X": digits[0]}, "label"))

    # the graph takes 64 values per row: both widths are named, for scalar and for array arguments
    with pytest.raises(ExecutionError, match="lr_proba: expected 64 input values per row, got 3 arguments"):
        session.sql(f"select lr_proba(a, b, c) from '{digits_parquet}'")
    with pytest.raises(ExecutionError, match="lr_proba: expected arrays of length 64, got length 3"):
        session.sql("select lr_proba([1.0, 2.0, 3.0]::FLOAT[3])")


def test_onnx_mlp_through_register_model_detects_the_kind(session, register, onnx_mlp, digits, digits_parquet):
    model, path = onnx_mlp
    registered = register("mlp", path, output="probabilities")  # format=None: read from the suffix
    frame = session.sql(f"select mlp(plist) as p from '{digits_parquet}' order by id")

    assert registered.kind == "onnx" and registered.returns == "FLOAT[10]"
    assert registered.udf.info["input_width"] == 64
    assert registered.udf.info["model"]["inputs"] == ["X"] and registered.udf.info["model"]["output"] == "probabilities"
    assert registered.udf.info["model"]["intra_op_threads"] == registered.udf.stats()[0]["threads"]  # the worker's math threads
    np.testing.assert_allclose(scored(frame, "p"), in_process(path, {"X": digits[0]}, "probabilities"), atol=TOL)
    np.testing.assert_allclose(scored(frame, "p"), model.predict_proba(digits[0]), atol=TOL)


def test_onnx_several_inputs_by_position_and_by_name(session, register, sql_functions, two_inputs, digits, digits_parquet):
    pixels = digits[0].astype(np.float64)
    a, b, c = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    register("by_position", two_inputs)  # f(a, b, c): x gets (a, b), y gets c
    sql_functions.append("by_name")
    session.sql(f'register onnx.`{two_inputs}` as by_name where inputs="y, x" and output="z2" and {ONE_WORKER}')  # f(c, a, b)
    frame = session.sql(f"select by_position(a, b, c) as p, by_name(c, a, b) as n from '{digits_parquet}' order by id")

    x, y = np.column_stack([a, b]).astype(np.float32), c
    assert session.functions["by_position"].returns == "FLOAT"
    assert session.functions["by_name"].udf.info["model"]["inputs"] == ["y", "x"]
    np.testing.assert_allclose(frame["p"].to_numpy(), in_process(two_inputs, {"x": x, "y": y}, "z"), atol=TOL)
    np.testing.assert_allclose(frame["n"].to_numpy(), in_process(two_inputs, {"x": x, "y": y}, "z2"), atol=TOL)
    np.testing.assert_allclose(frame["p"].to_numpy(), a + 10 * b + 100 * c, rtol=1e-6)  # float32 arithmetic
    with pytest.raises(ExecutionError, match="by_position: expected 3 input values per row, got 2 arguments"):
        session.sql(f"select by_position(a, b) from '{digits_parquet}'")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inputs": "x, nope"}, r"onnx model 'two_inputs.onnx': inputs='x, nope' names nope, not inputs of the graph \(its inputs: x, y\)"),
        ({"inputs": "x"}, r"onnx model 'two_inputs.onnx': inputs=\"x\" leaves out graph input\(s\) y"),
        ({"output": "nope"}, r"'two_inputs.onnx': no output named 'nope' \(its outputs: z tensor\(float\), z2 tensor\(float\)"),
        ({"method": "predict_proba"}, r"onnx model 'two_inputs.onnx': method='predict_proba' does not apply"),
    ],
)
def test_onnx_options_are_checked_at_register(register, two_inputs, options, message):
    with pytest.raises(ModelError, match=message):
        register("bad_options", two_inputs, **options)


def test_onnx_output_that_is_not_a_tensor_is_refused(register, digits, model_dir):
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    pixels, labels = digits
    model = LogisticRegression(max_iter=50).fit(pixels[:200], labels[:200])
    path = model_dir / "zipmap.onnx"
    path.write_bytes(to_onnx(model, pixels[:1]).SerializeToString())  # probabilities as a sequence of maps
    with pytest.raises(ModelError, match=r"output 'output_probability' is a seq\(map\(int64,tensor\(float\)\)\), not a tensor.*zipmap"):
        register("zipmap", path, output="output_probability")


def test_onnx_static_batch_dimension_fails_register(session, model_dir):
    path = onnx_graph(model_dir / "static_batch.onnx", batch=1)
    with pytest.raises(ExecutionError, match=r"onnx model 'static_batch.onnx': input 'x' has a fixed batch size of 1.*dynamic"):
        session.sql(f"register onnx.`{path}` as static where {ONE_WORKER}")
    assert "static" not in session.functions


# -- a file that is not the kind named ----------------------------------------------------


def test_a_file_not_of_the_kind_named_fails_register(session, register, xgb_models, lgb_model, model_dir):
    junk = model_dir / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match=r"cannot load onnx model 'junk.onnx': .*INVALID_PROTOBUF"):
        register("junk", junk)
    with pytest.raises(ExecutionError, match=r"cannot load xgboost model 'lgb_digits.txt': not a file xgboost's save_model wrote"):
        session.sql(f"register xgboost.`{lgb_model[1]}` as wrong where {ONE_WORKER}")
    with pytest.raises(ModelError, match=r"cannot load lightgbm model 'xgb_reg.json': not a file lightgbm's save_model wrote"):
        register("wrong", xgb_models[1]["regressor"], format="lightgbm")
    with pytest.raises(ModelError, match=r"holds a xgboost model, not onnx"):  # the suffix says what it is
        register("wrong", xgb_models[1]["multi"], format="onnx")
    with pytest.raises(ExecutionError, match=r"cannot tell the model format .* register it with its kind"):
        session.sql(f"register model.`{xgb_models[1]['regressor']}` as wrong")
    assert not {"junk", "wrong"} & set(session.functions)


# -- XGBoost ------------------------------------------------------------------------------


def test_xgboost_classifiers(session, register, sql_functions, xgb_models, digits, digits_parquet):
    models, paths = xgb_models
    sql_functions += ["xgb_p", "xgb_c"]
    session.sql(
        f"""register model.`{paths["multi"]}` as xgb_p where method="predict_proba" and {ONE_WORKER};
        register xgboost.`{paths["multi"]}` as xgb_c where {ONE_WORKER}"""
    )
    register("xgb_bin", paths["binary"], format="xgboost", method="predict_proba")
    frame = session.sql(f"select xgb_p(pixels) as p, xgb_c(pixels) as c, xgb_bin(pixels) as b from '{digits_parquet}' order by id")

    assert session.functions["xgb_p"].kind == "xgboost"  # .ubj is detected
    assert [session.functions[f].returns for f in ("xgb_p", "xgb_c", "xgb_bin")] == ["DOUBLE[10]", "BIGINT", "DOUBLE[2]"]
    np.testing.assert_allclose(scored(frame, "p"), models["multi"].predict_proba(digits[0]), atol=TOL)
    np.testing.assert_array_equal(frame["c"].to_numpy(), models["multi"].predict(digits[0]))
    np.testing.assert_allclose(scored(frame, "b"), models["binary"].predict_proba(digits[0]), atol=TOL)


def test_xgboost_regressor_from_json(session, register, xgb_models, digits, digits_parquet):
    models, paths = xgb_models
    registered = register("xgb_reg", paths["regressor"], format="xgboost")
    frame = session.sql(f"select xgb_reg(pixels) as y from '{digits_parquet}' order by id")

    assert registered.returns == "DOUBLE" and registered.udf.info["model"]["objective"] == "reg:squarederror"
    np.testing.assert_allclose(frame["y"].to_numpy(), models["regressor"].predict(digits[0]), atol=TOL)
    message = r"xgboost model 'xgb_reg.json' is a regressor \(objective reg:squarederror\): it has no predict_proba"
    with pytest.raises(ModelError, match=message):
        register("xgb_reg_p", paths["regressor"], format="xgboost", method="predict_proba")


# -- LightGBM -----------------------------------------------------------------------------


def test_lightgbm_classifier(session, register, sql_functions, lgb_model, digits, digits_parquet):
    model, path = lgb_model
    sql_functions.append("lgb_p")
    session.sql(f'register lightgbm.`{path}` as lgb_p where method="predict_proba" and {ONE_WORKER}')
    registered = register("lgb_c", path, format="lightgbm")
    frame = session.sql(f"select lgb_p(pixels) as p, lgb_c(pixels) as c from '{digits_parquet}' order by id")

    assert session.functions["lgb_p"].returns == "DOUBLE[10]" and registered.returns == "BIGINT"
    assert registered.udf.info["model"] == {"objective": "multiclass", "device": "cpu", "visible_gpus": ""}
    np.testing.assert_allclose(scored(frame, "p"), model.predict_proba(digits[0]), atol=TOL)
    np.testing.assert_array_equal(frame["c"].to_numpy(), model.predict(digits[0]))


# -- GPUs: Ray's logical GPUs (the test cluster has 2) set CUDA_VISIBLE_DEVICES ------------


def test_device_choice_follows_the_workers_logical_gpus(session, register, onnx_lr, xgb_models):
    import onnxruntime as ort
    import xgboost as xgb

    on_gpu = register("onnx_gpu", onnx_lr[1], num_gpus=1)
    xgb_gpu = register("xgb_gpu", xgb_models[1]["multi"], num_gpus=1)
    on_cpu = register("onnx_cpu", onnx_lr[1])
    workers = session.sql("!workers").set_index("function")["gpu_ids"]

    assert len(workers["onnx_gpu"]) == 1 and len(workers["xgb_gpu"]) == 1 and len(workers["onnx_cpu"]) == 0
    # Each loader saw the GPU Ray assigned its worker, and chose from what it saw.
    seen = on_gpu.udf.info["model"]["visible_gpus"]
    assert seen == ",".join(str(g) for g in workers["onnx_gpu"]) and xgb_gpu.udf.info["model"]["visible_gpus"] == ",".join(
        str(g) for g in workers["xgb_gpu"]
    )
    visible = {"CUDA_VISIBLE_DEVICES": seen}
    assert on_gpu.udf.info["model"]["providers"] == onnx_providers(1, visible, ort.get_available_providers())
    assert xgb_gpu.udf.info["model"]["device"] == xgboost_device(1, visible, cuda_built=bool(xgb.build_info().get("USE_CUDA")))
    assert on_cpu.udf.info["model"]["visible_gpus"] == "" and on_cpu.udf.info["model"]["providers"] == [CPU_PROVIDER]
