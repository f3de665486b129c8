"""What an HTTP request asks, read into rows: Byzer's ``/model/predict`` and ``/v1/functions/{name}``.

Byzer's ``/model/predict`` takes ``dataType`` (how ``data`` is read), ``data`` (a JSON array) and
``sql`` (a select list over the data's columns) or ``pipeline`` (functions applied in turn to
``feature``). Its rows become an Arrow table that DuckDB evaluates the select list over.

Example:
    >>> ask = predict_request({"data": "[[1, 2], [3, 4]]", "sql": "select f(feature) as p"})
    >>> ask.rows.column_names, ask.select
    (['feature'], 'f(feature) as p')
    >>> predict_request({"dataType": "row", "data": [{"a": 1}], "pipeline": "f, g"}).select
    'g(f(feature)) as feature'
    >>> inputs_arguments({"inputs": [[1, 2.5], [3, 4]]})        # numbers only: one matrix
    array([[1. , 2.5],
           [3. , 4. ]])
    >>> [c.to_pylist() for c in inputs_arguments({"inputs": [["a", 1], ["b", None]]})]
    [['a', 'b'], [1, None]]
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from arrow_bridge.ipc import UntrustedStreamError, read_untrusted
from udf_engine.errors import RayUDFError

# The largest body a request may have (and the largest answer a select list may give): a bulk
# Arrow request of some hundred thousand rows.
MAX_BODY_BYTES = 64 << 20
DATA_TYPES = ("vector", "string", "row")
FEATURE = "feature"  # Byzer's column of a vector or string request
REQUEST_TABLE = "__rayudf_request"  # what the select list reads from
_LEADING_SELECT = re.compile(r"^\s*select\b", re.I)
# How much of a bad value an error shows.
_SHOWN = 60


class RequestError(RayUDFError):
    """A request that does not say what it asks, or says it wrongly: answered 400, naming what is wrong."""


class UnknownFunctionError(RequestError):
    """A request names a function the server does not serve: answered 404."""


class QueryStoppedError(RequestError):
    """A select list stopped because its request ran past its time limit (answered 504), or its client went away."""


class RestartingError(RayUDFError):
    """A function the server cannot answer for now: it is (re)starting, or its workers are all gone.
    Answered 503 with Retry-After: the same request succeeds once its workers are back."""


@dataclass
class PredictRequest:
    """The rows of a ``/model/predict`` request, and the select list to evaluate over them."""

    rows: pa.Table
    select: str


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _json(value: Any, what: str) -> Any:
    """``value`` itself, or what the JSON text ``value`` holds."""
    if not isinstance(value, str):
        return value
    return loads(value, what)


def loads(text: str | bytes, what: str) -> Any:
    """JSON text's value, or a RequestError naming ``what`` (JSON nested too deep for the parser included)."""
    try:
        return json.loads(text)
    except ValueError as err:
        raise RequestError(f"{what} is not JSON ({err}): {_shown(text if isinstance(text, str) else repr(text[:_SHOWN]))}") from None
    except RecursionError:
        raise RequestError(f"{what}: JSON nested deeper than {sys.getrecursionlimit():,} levels is not taken") from None


def predict_request(params: Mapping[str, Any]) -> PredictRequest:
    """Read Byzer's ``/model/predict`` parameters (form fields, a query string or a JSON body alike)."""
    data_type = str(params.get("dataType") or "vector")
    data = _json(params.get("data", "[]"), "data")
    if not isinstance(data, list):
        raise RequestError(f"data must be a JSON array, got {_shown(data)}")
    if data_type == "vector":
        for i, row in enumerate(data):
            if not isinstance(row, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in row):
                raise RequestError(f'data: element {i + 1} is not an array of numbers (dataType="vector"): {_shown(row)}')
        rows = pa.table({FEATURE: pa.array(data, pa.list_(pa.float64()))})
    elif data_type == "string":
        rows = pa.table({FEATURE: pa.array([x if isinstance(x, str) else json.dumps(x) for x in data], pa.string())})
    elif data_type == "row":
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise RequestError(f'data: element {i + 1} is not a JSON object (dataType="row"): {_shown(row)}')
        try:
            rows = pa.Table.from_pylist(data)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise RequestError(f"data: the rows do not make one table: {err}") from None
    else:
        raise RequestError(f"dataType {data_type!r} is not one of {', '.join(DATA_TYPES)}")
    return PredictRequest(rows, _select_list(params))


def _select_list(params: Mapping[str, Any]) -> str:
    sql, pipeline = str(params.get("sql") or "").strip(), str(params.get("pipeline") or "").strip()
    if sql:
        return _LEADING_SELECT.sub("", sql, count=1).strip()
    if pipeline:
        names = [name.strip() for name in pipeline.split(",")]
        if not all(re.fullmatch(r"[A-Za-z_]\w*", name) for name in names):
            raise RequestError(f"pipeline {pipeline!r}: expected function names separated by commas")
        expression = FEATURE
        for name in names:
            expression = f"{name}({expression})"
        return f"{expression} as {FEATURE}"
    raise RequestError("give sql (a select list over the data's columns, e.g. sql=\"select f(feature) as p\") or pipeline")


def inputs_arguments(body: Any) -> np.ndarray | list[pa.Array]:
    """The arguments of ``{"inputs": [[arg, ...], ...]}`` (one array of arguments per row): one matrix
    when every argument is a number (read at once, whatever the width), else one Arrow column each."""
    body = _json(body, "the body")
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(row, list) for row in inputs):
        raise RequestError('expected a JSON body {"inputs": [[arg, ...], ...]}: one array of arguments per row')
    if not inputs:
        raise RequestError("inputs holds no rows")
    width = len(inputs[0])
    if not width:
        raise RequestError("inputs: row 1 holds no arguments")
    for i, row in enumerate(inputs):
        if len(row) != width:
            raise RequestError(f"inputs: row {i + 1} has {len(row)} arguments, row 1 has {width}")
    try:
        matrix = np.asarray(inputs)
    except ValueError:  # arrays of several lengths among the arguments: Arrow says which
        matrix = None
    if matrix is not None and matrix.ndim == 2 and matrix.dtype.kind in "biuf":  # numbers, no null: as columns of them stack
        return matrix
    columns = []
    for j in range(width):
        try:
            columns.append(pa.array([row[j] for row in inputs]))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise RequestError(f"inputs: argument {j + 1} does not have one type in all rows ({err})") from None
    return columns


def arrow_columns(body: bytes) -> list[pa.Array]:
    """The argument columns of an Arrow IPC stream body: its columns, in order."""
    try:
        table = read_untrusted(body)
    except UntrustedStreamError as err:
        raise RequestError(str(err)) from None
    if table.num_columns == 0 or table.num_rows == 0:
        raise RequestError("the Arrow body holds no argument columns or no rows")
    return [column.combine_chunks() for column in table.columns]


def rows_json(table: pa.Table) -> list[dict]:
    """A result table as JSON-ready row objects."""
    return [_plain(row) for row in table.to_pylist()]


# Up to this many values an answer reads them one by one: numpy's pass costs more than it saves on so few.
_FEW_VALUES = 16


def values_json(values: pa.Array) -> list:
    """A result column as JSON-ready values (numbers, and fixed-size lists of them, read at once when there
    are more than a few and none is null, NaN or infinite).

    Example:
        >>> values_json(pa.array([1.5, float("nan"), None])), values_json(pa.array([[1, 2]], pa.list_(pa.int8(), 2)))
        ([1.5, None, None], [[1, 2]])
        >>> values_json(pa.array(np.arange(40, dtype=np.float32)))[-2:], values_json(pa.array([0.5] * 40 + [float("inf")]))[-2:]
        ([38.0, 39.0], [0.5, None])
        >>> values_json(pa.array([{"a": [1, None], "b": b"x"}]))
        [{'a': [1, None], 'b': "b'x'"}]
    """
    if len(values) <= _FEW_VALUES:
        return [_plain(value) for value in values.to_pylist()]
    shape = values.type
    flat = values.flatten() if pa.types.is_fixed_size_list(shape) and not values.null_count else values
    if (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)) and not flat.null_count:
        numbers = flat.to_numpy()
        if numbers.dtype.kind != "f" or np.isfinite(numbers).all():
            return (numbers if flat is values else numbers.reshape(len(values), shape.list_size)).tolist()
    return [_plain(value) for value in values.to_pylist()]


def _plain(value: Any) -> Any:
    """JSON's own types: NaN and infinities as null, dates, decimals and bytes as their text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)
