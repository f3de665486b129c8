"""Arrow columns -> NumPy feature matrices, and model outputs -> Arrow arrays.

One list column (``FLOAT[784]``, ``DOUBLE[]``) becomes an ``(n, width)`` ndarray
that shares the Arrow buffer when the layout allows (no NULL inside a row);
several scalar columns become a feature matrix; a VARCHAR column an array of
strings, a BLOB column an array of bytes. Any other type is an InputError naming the
function, the argument and its SQL type. Outputs are cast to the Arrow type the
function declared.

Example:
    >>> col = pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32(), 2))
    >>> features([col], function="f")
    array([[1., 2.],
           [3., 4.]], dtype=float32)
    >>> to_arrow([np.array([[0.5, 0.5]]), np.array([[0.1, 0.9]])], pa.list_(pa.float64(), 2), 2).to_pylist()
    [[0.5, 0.5], [0.1, 0.9]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.types as pat

from arrow_bridge.types import sql_type_name
from udf_engine.actors.failures import Partial
from udf_engine.errors import InputError, ModelError
from udf_engine.models.loaders import PROMPT_INPUT, TEXT_INPUT

_LIST_TYPES = (pat.is_fixed_size_list, pat.is_list, pat.is_large_list)
_TEXT_TYPES = (pat.is_string, pat.is_large_string, pat.is_string_view)
_BYTES_TYPES = (pat.is_binary, pat.is_large_binary, pat.is_binary_view, pat.is_fixed_size_binary)
# What a model function accepts, for the error that names an argument of another type.
_ACCEPTED = "a model takes numbers (BOOLEAN, integers, DECIMAL, FLOAT, DOUBLE), arrays of them, or one VARCHAR or BLOB argument"


def _is_list(t: pa.DataType) -> bool:
    return any(check(t) for check in _LIST_TYPES)


def _as_array(col: Any) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):  # DuckDB hands one chunk: take it rather than copy it
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _not_accepted(function: str, argument: str, arrow: pa.DataType) -> InputError:
    return InputError(f"function {function}: {argument} is {sql_type_name(arrow)}; {_ACCEPTED}")


def _numeric(values: pa.Array, function: str, argument: str, column_type: pa.DataType) -> np.ndarray:
    if pat.is_decimal(values.type):  # SQL literals such as 1.5 are DECIMAL in DuckDB
        values = values.cast(pa.float64())
    if not (pat.is_integer(values.type) or pat.is_floating(values.type) or pat.is_boolean(values.type)):
        raise _not_accepted(function, argument, column_type)
    # zero_copy_only would refuse a buffer with NULLs; those become NaN instead.
    return values.to_numpy(zero_copy_only=False)


def _list_tensor(col: pa.Array, function: str, width: int | None, column_type: pa.DataType) -> np.ndarray:
    """``(n, width)`` for a list of numbers, ``(n, width, ...)`` for lists of lists."""
    n = len(col)
    leaf = col.type
    while _is_list(leaf):
        leaf = leaf.value_type
    if not (pat.is_integer(leaf) or pat.is_floating(leaf) or pat.is_boolean(leaf) or pat.is_decimal(leaf)):
        raise _not_accepted(function, "argument 1", column_type)
    if pat.is_fixed_size_list(col.type):
        got = col.type.list_size
        if width is not None and got != width:
            raise InputError(f"function {function}: expected arrays of length {width}, got length {got}")
    else:
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        got = width if width is not None else (int(lengths[0]) if n else 0)
        bad = np.flatnonzero(lengths != got)
        if bad.size:
            row = int(bad[0])
            raise InputError(
                f"function {function}: expected lists of length {got}, got length {int(lengths[row])} "
                f"(row {row + 1} of the batch)"
            )
    child = col.flatten()
    if _is_list(child.type):
        inner = _list_tensor(child, function, None, column_type)
        return inner.reshape(n, got, *inner.shape[1:])
    return _numeric(child, function, "argument 1", column_type).reshape(n, got)


def check_arguments(function: str, width: int | str | None, given: int) -> None:
    """Refuse ``given`` number arguments a row to a model that takes ``width`` input values (TEXT_INPUT: one text)."""
    if width == TEXT_INPUT:
        raise InputError(f"function {function}: a text model takes one VARCHAR argument, got {given} number argument(s)")
    if width is not None and given != width:
        raise InputError(f"function {function}: expected {width} input values per row, got {given} arguments")


def features(cols: Sequence[Any], *, function: str, width: int | str | None = None) -> np.ndarray:
    """The model input for one call: an ``(n, width)`` matrix, or ``(n,)`` strings or bytes (a text
    model, whose ``width`` is TEXT_INPUT, takes one VARCHAR argument and nothing else), or a
    generation model's ``(n, 3)`` prompt rows (:func:`prompt_rows`)."""
    arrays = [_as_array(c) for c in cols]
    if not arrays:
        raise InputError(f"function {function}: needs at least one argument")
    if width == PROMPT_INPUT:
        return prompt_rows(arrays, function=function)
    if width == TEXT_INPUT and (len(arrays) != 1 or not any(check(arrays[0].type) for check in _TEXT_TYPES)):
        given = ", ".join(sql_type_name(a.type) for a in arrays)
        raise InputError(f"function {function}: a text model takes one VARCHAR argument, got ({given})")
    if len(arrays) == 1:
        col = arrays[0]
        if _is_list(col.type):
            return _list_tensor(col, function, width, col.type)
        if any(check(col.type) for check in (*_TEXT_TYPES, *_BYTES_TYPES)):
            return np.asarray(col.to_pylist(), dtype=object)
    for i, col in enumerate(arrays, 1):
        if _is_list(col.type):
            raise InputError(f"function {function}: argument {i} is {sql_type_name(col.type)}, an array; pass one array or only scalars")
    check_arguments(function, width, len(arrays))
    return np.column_stack([_numeric(c, function, f"argument {i}", c.type) for i, c in enumerate(arrays, 1)])


def prompt_rows(arrays: Sequence[pa.Array], *, function: str) -> np.ndarray:
    """A generation model's rows, ``(prompt, parameters, occurrence)``: the prompt is a VARCHAR or a
    list of ``STRUCT(role, content)`` messages; the optional second argument, the row's parameters, a
    JSON object's VARCHAR, a STRUCT or a MAP (NULL: none); ``occurrence`` counts the equal rows before
    it in the call, so equal prompts are seeded apart (udf_engine.models.generation.row_seed).

    Example:
        >>> prompt_rows([pa.array(["hi", "hi", "yo"])], function="chat")[:, 2].tolist()
        [0, 1, 0]
    """
    prompt = arrays[0]
    messages = _is_list(prompt.type) and pat.is_struct(prompt.type.value_type)
    if len(arrays) > 2 or not (messages or any(check(prompt.type) for check in _TEXT_TYPES)) or (
        len(arrays) == 2 and not any(check(arrays[1].type) for check in (*_TEXT_TYPES, pat.is_struct, pat.is_map))
    ):
        given = ", ".join(sql_type_name(a.type) for a in arrays)
        raise InputError(
            f"function {function}: a generation model takes a prompt (VARCHAR, or a list of STRUCT(role, content) messages) and "
            f"optionally its parameters (a JSON VARCHAR, a STRUCT or a MAP), got ({given})"
        )
    prompts = prompt.to_pylist()
    params = arrays[1].to_pylist() if len(arrays) == 2 else [None] * len(prompts)
    seen: dict[str, int] = {}
    rows = np.empty((len(prompts), 3), dtype=object)
    for i, (text, given) in enumerate(zip(prompts, params, strict=True)):
        key = repr((text, given))
        rows[i] = (text, given, seen.get(key, 0))
        seen[key] = rows[i, 2] + 1
    return rows


def join_outputs(results: Sequence[Any]) -> Any:
    """Per-batch model outputs (arrays, dicts of arrays for a STRUCT, or lists) joined into one."""
    if not results:
        return np.empty(0)
    if len(results) == 1:
        return results[0]
    if isinstance(results[0], dict):
        return {k: join_outputs([r[k] for r in results]) for k in results[0]}
    if all(isinstance(r, np.ndarray) for r in results):
        return np.concatenate(results) if len(results) > 1 else results[0]
    return [row for r in results for row in r]


def slice_output(output: Any, start: int, stop: int) -> Any:
    """The outputs of rows ``start`` to ``stop`` (exclusive) of one joined output.

    Example:
        >>> slice_output({"p": np.arange(4)}, 1, 3)
        {'p': array([1, 2])}
    """
    if isinstance(output, dict):
        return {k: slice_output(v, start, stop) for k, v in output.items()}
    return output[start:stop]


def _convert(values: Any, target: pa.DataType) -> pa.Array:
    if isinstance(values, pa.Array):  # converted already (a slice of a coalesced call's outputs)
        return values if values.type == target else values.cast(target)
    if pat.is_struct(target):
        if not isinstance(values, dict):
            raise ModelError(f"declared a STRUCT result but the model returned {type(values).__name__}")
        missing = [f.name for f in target if f.name not in values]
        if missing:
            raise ModelError(f"the model's result has no field(s) {missing} declared in the STRUCT")
        children = [_convert(values[f.name], f.type) for f in target]
        return pa.StructArray.from_arrays(children, fields=list(target))
    if pat.is_fixed_size_list(target) and isinstance(values, np.ndarray) and values.ndim >= 2:
        size = target.list_size
        if values.shape[1] != size:
            raise ModelError(f"declared {size} values per row but the model returned {values.shape[1]}")
        inner = _convert(values.reshape(values.shape[0] * size, *values.shape[2:]), target.value_type)
        return pa.FixedSizeListArray.from_arrays(inner, size)
    if isinstance(values, np.ndarray):
        if values.ndim == 2 and values.shape[1] == 1 and not _is_list(target):
            values = values[:, 0]
        if values.ndim == 1:
            return pa.array(values).cast(target)
        values = list(values)
    return pa.array(values, type=target)


def _convert_checked(values: Any, target: pa.DataType) -> pa.Array:
    try:
        return _convert(values, target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as err:
        raise ModelError(f"the model's output does not convert to {target}: {err}") from None


def _with_nulls(results: Sequence[Any], target: pa.DataType) -> pa.Array:
    """Per-batch outputs where some batches are :class:`Partial` (rows left NULL), as one array."""
    runs: list[tuple[int, Any]] = []
    for result in results:
        runs.extend(result.parts if isinstance(result, Partial) else [(None, result)])
    pieces = [pa.nulls(rows, target) if output is None else _convert_checked(output, target) for rows, output in runs]
    return pa.concat_arrays(pieces)


def to_arrow(results: Sequence[Any], target: pa.DataType, rows: int) -> pa.Array:
    """Join per-batch model outputs and convert them to one Arrow array of ``rows`` entries.

    A :class:`Partial` result (``on_error="null"``) gives NULL for the rows the model failed on.
    """
    if any(isinstance(r, Partial) for r in results):
        array = _with_nulls(results, target)
    else:
        array = _convert_checked(join_outputs(results), target)
    if len(array) != rows:
        raise ModelError(f"the model returned {len(array)} results for {rows} rows")
    return array
