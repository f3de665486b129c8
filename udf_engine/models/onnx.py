"""ONNX models in a worker: one ONNX Runtime session, its graph inputs bound to the function's arguments.

A graph with one input gets the whole batch (the feature matrix, or the tensor column's
rows). A graph with several inputs gets the function's arguments split among them: by
position (``f(a, b, c)`` feeds the graph's inputs in their order), or by name with
``inputs="a,b,c"`` (the graph inputs the arguments feed, in argument order). Each input
is cast to the element type the graph declares; the result is one output, picked with
``output="probabilities"`` or else the graph's first. Everything that can be checked
without rows (the batch dimension must be dynamic, the names given must exist, the output
must be a tensor) is checked when the model loads, so it fails ``register``.

Example (inside a worker, or in-process for a test):
    >>> model = load_onnx(Path("digits.onnx"), "digits.onnx", output="probabilities")  # doctest: +SKIP
    >>> model.predict(np.zeros((2, 64))).shape, model.n_features_in_                   # doctest: +SKIP
    ((2, 10), 64)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from udf_engine.errors import ModelError
from udf_engine.models.devices import onnx_providers
from udf_engine.settings import DEFAULT_METHOD

# ONNX element types as ONNX Runtime names them, and the NumPy type each input is cast to.
ONNX_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}
# skl2onnx classifiers return probabilities as a sequence of maps unless told not to.
_NOT_A_TENSOR_HINT = "skl2onnx: convert with options={id(model): {'zipmap': False}}"


@dataclass(frozen=True)
class GraphInput:
    """One input of the graph: its name, the NumPy type it takes, and its shape after the batch dimension."""

    name: str
    dtype: Any
    row_shape: tuple  # one entry per dimension after the batch; None where the graph leaves it open

    @property
    def width(self) -> int | None:
        """Values per row when every dimension is fixed (1 for a ``[batch]`` input)."""
        return None if None in self.row_shape else math.prod(self.row_shape)

    def fit(self, values: np.ndarray) -> np.ndarray:
        """``values`` cast to the declared type, flat rows reshaped to the declared row shape."""
        values = np.asarray(values, dtype=self.dtype)
        width = self.width
        if width is not None and values.ndim >= 1 and values.size == len(values) * width:
            values = values.reshape(len(values), *self.row_shape)
        return values


def _graph_input(arg: Any, model: str) -> GraphInput:
    shape = list(arg.shape or [])
    if not shape:
        raise ModelError(f"onnx model {model!r}: input {arg.name!r} is a scalar; it needs a batch dimension")
    if isinstance(shape[0], int):
        raise ModelError(
            f"onnx model {model!r}: input {arg.name!r} has a fixed batch size of {shape[0]} (shape {shape}); "
            f"export it with a dynamic batch dimension (torch.onnx.export(..., dynamic_axes={{{arg.name!r}: {{0: 'batch'}}}}))"
        )
    dtype = ONNX_DTYPES.get(arg.type)
    if dtype is None:
        raise ModelError(f"onnx model {model!r}: input {arg.name!r} has type {arg.type}, which rayudf cannot feed")
    return GraphInput(arg.name, dtype, tuple(d if isinstance(d, int) else None for d in shape[1:]))


def bind_inputs(declared: list[GraphInput], names: str | None, model: str) -> list[GraphInput]:
    """The graph inputs the function's arguments feed, in argument order.

    Example:
        >>> x, y = GraphInput("x", np.float32, (2,)), GraphInput("y", np.float32, ())
        >>> [i.name for i in bind_inputs([x, y], None, "m")], [i.name for i in bind_inputs([x, y], "y, x", "m")]
        (['x', 'y'], ['y', 'x'])
        >>> bind_inputs([x, y], "x", "m")
        Traceback (most recent call last):
        ...
        udf_engine.errors.ModelError: onnx model 'm': inputs="x" leaves out graph input(s) y (the graph's inputs: x, y)
    """
    if not names:
        return declared
    by_name = {i.name: i for i in declared}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    listed = ", ".join(by_name)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ModelError(
            f"onnx model {model!r}: inputs={names!r} names {', '.join(unknown)}, not inputs of the graph (its inputs: {listed})"
        )
    if len(set(wanted)) != len(wanted):
        raise ModelError(f"onnx model {model!r}: inputs={names!r} names an input twice")
    missing = [n for n in by_name if n not in wanted]
    if missing:
        raise ModelError(
            f'onnx model {model!r}: inputs="{names}" leaves out graph input(s) {", ".join(missing)} (the graph\'s inputs: {listed})'
        )
    return [by_name[n] for n in wanted]


class OnnxPredictor:
    """An ONNX Runtime session behind ``predict(batch)``; ``n_features_in_`` is the row width it takes."""

    def __init__(self, session: Any, model: str, *, inputs: str | None = None, output: str | None = None, visible_gpus: str = "") -> None:
        self._session = session
        self._inputs = bind_inputs([_graph_input(a, model) for a in session.get_inputs()], inputs, model)
        self._output = _pick_output(session.get_outputs(), output, model)
        widths = [i.width for i in self._inputs]
        if len(widths) > 1 and None in widths:
            open_ = [i.name for i in self._inputs if i.width is None]
            raise ModelError(
                f"onnx model {model!r}: with several inputs each needs a fixed width, but {', '.join(open_)} has open dimensions"
            )
        # The values one row holds, which the caller checks against the arguments it has: known
        # for several inputs and for a [batch, width] input; a [batch, c, h, w] input takes a
        # flat or a nested tensor column, so no single width is promised.
        single = self._inputs[0] if len(self._inputs) == 1 else None
        self.n_features_in_ = sum(widths) if single is None else (single.width if len(single.row_shape) <= 1 else None)
        self._offsets = np.cumsum([0, *widths[:-1]]) if single is None else None
        self.load_info = {
            "providers": list(session.get_providers()),
            "intra_op_threads": session.get_session_options().intra_op_num_threads,
            "visible_gpus": visible_gpus,  # the CUDA_VISIBLE_DEVICES the choice of providers saw
            "inputs": [i.name for i in self._inputs],
            "output": self._output,
        }

    def predict(self, batch: Any) -> np.ndarray:
        """The chosen output for a batch (one row per row of ``batch``)."""
        if self._offsets is None:
            feeds = {self._inputs[0].name: self._inputs[0].fit(batch)}
        else:
            matrix = np.asarray(batch)
            feeds = {i.name: i.fit(matrix[:, start : start + i.width]) for i, start in zip(self._inputs, self._offsets, strict=True)}
        return self._session.run([self._output], feeds)[0]


def _pick_output(outputs: list[Any], name: str | None, model: str) -> str:
    by_name = {o.name: o for o in outputs}
    listed = ", ".join(f"{o.name} {o.type}" for o in outputs)
    if name and name not in by_name:
        raise ModelError(f"onnx model {model!r}: no output named {name!r} (its outputs: {listed})")
    chosen = by_name[name] if name else outputs[0]
    if not chosen.type.startswith("tensor("):
        raise ModelError(
            f"onnx model {model!r}: output {chosen.name!r} is a {chosen.type}, not a tensor; "
            f"pick a tensor output with output=\"...\" (its outputs: {listed}), or for {_NOT_A_TENSOR_HINT}"
        )
    return chosen.name


def _graph_file(path: Path, model: str) -> Path:
    """The ``.onnx`` file of a model: the file itself, or the one in a directory (with its external data)."""
    if path.is_file():
        return path
    found = sorted(path.rglob("*.onnx"))
    if len(found) != 1:
        raise ModelError(f"onnx model {model!r}: the directory holds {len(found)} .onnx files, expected one")
    return found[0]


def load_onnx(
    path: Path, model: str, *, inputs: str | None = None, output: str | None = None, method: str = DEFAULT_METHOD,
    threads: int = 0, num_gpus: float = 0.0,
) -> OnnxPredictor:
    """One ONNX Runtime session on ``path`` with ``threads`` intra-op threads (0: ONNX Runtime's
    default), on the GPU when the worker has one (see :mod:`udf_engine.models.devices`)."""
    import onnxruntime as ort

    if method != DEFAULT_METHOD:
        raise ModelError(f'onnx model {model!r}: method={method!r} does not apply to ONNX; pick the graph output with output="..."')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # the worker runs one batch at a time: parallelism is inside the operators
    options.log_severity_level = 3  # errors only: warnings would reach the worker's log for every session
    # Idle intra-op threads would spin between batches, taking the cores other workers and DuckDB need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = onnx_providers(num_gpus, os.environ, ort.get_available_providers())
    graph = _graph_file(path, model)
    try:
        session = ort.InferenceSession(str(graph), sess_options=options, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        raise ModelError(f"cannot load onnx model {model!r}: {err}") from None
    return OnnxPredictor(session, model, inputs=inputs, output=output, visible_gpus=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
