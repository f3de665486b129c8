"""The benchmark's data, model and Ray: a generated Parquet table of FLOAT[width] rows, a Keras MLP, the local Ray.

Example:
    >>> path = write_table("/tmp/bench.parquet", rows=1000, width=8)   # doctest: +SKIP
    >>> start_ray()                                                     # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Many row groups, so DuckDB can read (and call the function) from several threads.
ROW_GROUP = 16_384


def start_ray() -> None:
    """Start the local Ray a benchmark runs on, as rayudf starts one (``init_local``), with twice the
    cores as logical CPUs: idle registered workers must not stop other contenders' actors (Ray
    Data's, Serve's) from being placed; only running ones use the cores."""
    from udf_engine.ray_runtime import init_local

    init_local(num_cpus=2 * (os.cpu_count() or 1), log_to_driver=False)


def write_table(path: str | Path, *, rows: int, width: int, seed: int = 0, row_group: int = ROW_GROUP) -> Path:
    """Write ``rows`` rows (id BIGINT, image FLOAT[width]) in row groups of ``row_group``, never holding them all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.int64()), ("image", pa.list_(pa.float32(), width))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            values = rng.random((n, width), dtype=np.float32)
            batch = pa.record_batch(
                [pa.array(np.arange(start, start + n)), pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), width)],
                schema=schema,
            )
            writer.write_batch(batch, row_group_size=row_group)
    return path


def export_onnx(keras_path: str | Path, path: str | Path) -> Path:
    """The same MLP (same weights) as an ONNX graph with a dynamic batch dimension: input ``x``, output ``probabilities``."""
    import keras
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (w1, b1), (w2, b2) = (layer.get_weights() for layer in keras.models.load_model(keras_path, compile=False).layers)
    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["o1"]),
        helper.make_node("Softmax", ["o1"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w1.shape[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", w2.shape[1]])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path


def build_model(path: str | Path, *, width: int, hidden: int = 512, classes: int = 10) -> Path:
    """Save an MLP width -> hidden -> classes (softmax) with fixed random weights as ``.keras``."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((width,)), keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(classes, activation="softmax")]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path
