"""Scoring a call's argument columns with a model: NULL rows set aside, the rest in batches, one Arrow array back.

Both paths score this way: DuckDB's calls of a model function in the driver
(``arrow_bridge.function``), and a worker scoring its own share of a file (``arrow_bridge.share_scan``).

Example:
    >>> double = lambda matrix: [matrix * 2]   # the engine's score(matrix): the outputs of its batches, in order
    >>> score_columns([pa.array([1.0, None, 3.0])], function="f", width=1, arrow_type=pa.float64(), score=double).array.to_pylist()
    [2.0, None, 6.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from arrow_bridge.tensors import check_arguments, features, to_arrow
from udf_engine.actors.failures import Partial
from udf_engine.errors import RowError
from udf_engine.models.loaders import PROMPT_INPUT, TEXT_INPUT


@dataclass
class Scored:
    """One call's result: ``array`` has a value per row; ``rows`` went to the model, ``nulled`` of
    them came back NULL because the model raised on them (on_error="null": ``reason`` says why)."""

    array: pa.Array
    rows: int = 0
    nulled: int = 0
    reason: str = ""


@dataclass
class Call:
    """One call's argument columns made ready for the model: the rows with no NULL argument as one
    feature matrix (``matrix`` None when there are none), and where they stand among the call's rows.

    A text model's rows go to it longest first (``order``), so the engine's pieces each hold texts of
    about one length and pad little (udf_engine.actors.batching.cut); the result is put back in row order.
    """

    rows: int
    valid: np.ndarray | None  # which rows the model sees (None: all)
    matrix: Any
    order: np.ndarray | None = None  # the matrix's rows, by their place among the valid rows (None: as they are)

    @classmethod
    def of(cls, cols: Sequence[Any], *, function: str, width: int | str | None) -> Call:
        rows = len(cols[0]) if cols else 0
        # a generation row's parameters may be NULL (none given): only its prompt's NULL makes the answer NULL
        valid = valid_rows(cols[:1] if width == PROMPT_INPUT else cols) if rows else None
        kept = [c.filter(pa.array(valid)) for c in cols] if valid is not None else cols
        count = rows if valid is None else int(valid.sum())
        matrix = features(kept, function=function, width=width) if count else None
        if width != TEXT_INPUT or matrix is None:
            return cls(rows, valid, matrix)
        order = np.argsort(-np.fromiter((len(text) for text in matrix), np.int64, len(matrix)), kind="stable")
        return cls(rows, valid, matrix[order], order)

    @classmethod
    def of_matrix(cls, matrix: np.ndarray, *, function: str, width: int | None) -> Call:
        """A call whose arguments are numbers already in one ``(rows, arguments)`` matrix (no NULL)."""
        check_arguments(function, width, matrix.shape[1])
        return cls(len(matrix), None, matrix)

    def placed(self, err: RowError) -> RowError:
        """A RowError placed among the rows scored, placed among the call's rows."""
        row = err.row if self.order is None else int(self.order[err.row])
        return err.at(row, self.rows) if self.valid is None else err.at(int(np.flatnonzero(self.valid)[row]), self.rows)

    def scored(self, outputs: Sequence[Any], arrow_type: pa.DataType) -> Scored:
        """The model's outputs (per batch, in order) as the call's result, NULL for the rows it did not see."""
        count = 0 if self.matrix is None else len(self.matrix)
        array = to_arrow(outputs, arrow_type, count) if count else pa.array([], type=arrow_type)
        if self.order is not None:
            array = array.take(pa.array(np.argsort(self.order)))  # back in row order
        scored = Scored(array if self.valid is None else with_null_rows(array, self.valid), count)
        for output in outputs:
            if isinstance(output, Partial) and output.nulled:
                scored.nulled += output.nulled
                scored.reason = output.error
        return scored


def score_columns(
    cols: Sequence[Any], *, function: str, width: int | None, arrow_type: pa.DataType, score: Callable[[Any], list]
) -> Scored:
    """Score argument columns with a model: rows with a NULL argument stay NULL, the others go to
    ``score`` as one feature matrix (the engine cuts it into batches: ``RemoteUDF.score``, a worker's
    share scan) and its outputs, one per batch, become one Arrow array of ``arrow_type``. A RowError
    names its row among the call's rows, NULL rows included."""
    call = Call.of(cols, function=function, width=width)
    if call.matrix is None:
        return call.scored([], arrow_type)
    try:
        outputs = score(call.matrix)
    except RowError as err:
        raise call.placed(err) from None
    return call.scored(outputs, arrow_type)


def valid_rows(cols: Sequence[Any]) -> np.ndarray | None:
    """Which rows have no NULL argument (a boolean mask), or None when all of them.

    Example:
        >>> valid_rows([pa.array([1.0, None, 3.0]), pa.array([1, 2, None])])
        array([ True, False, False])
        >>> valid_rows([pa.array([1.0, 2.0])]) is None
        True
    """
    if not any(c.null_count for c in cols):
        return None
    valid = np.ones(len(cols[0]), dtype=bool)
    for col in cols:
        if col.null_count:
            valid &= col.is_valid().to_numpy(zero_copy_only=False)
    return valid


def with_null_rows(values: pa.Array, valid: np.ndarray) -> pa.Array:
    """``values`` (one per valid row) spread over all rows, NULL where ``valid`` is False.

    Example:
        >>> with_null_rows(pa.array([10, 30]), np.array([True, False, True])).to_pylist()
        [10, None, 30]
    """
    positions = np.cumsum(valid) - 1
    return values.take(pa.array(positions, mask=~valid))
