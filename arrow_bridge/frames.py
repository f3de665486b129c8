"""pandas DataFrames handed to DuckDB by name, with the column types their values have.

DuckDB's pandas scan types an object column from the Python types of its values, and
reads lists or dicts of NumPy scalars (``list(np.random.rand(8).astype("float32"))``,
the usual way a notebook keeps embeddings) as VARCHAR: ``'[np.float32(0.51), ...]'``.
Arrow's conversion types them as lists of float (or structs), so a frame with a column of
lists or dicts goes as Arrow. Other frames go as they are: no copy.

Example:
    >>> frame = pd.DataFrame({"v": [list(np.ones(2, dtype="float32"))], "s": ["a"]})
    >>> scannable(frame).schema.field("v").type
    ListType(list<item: float>)
    >>> scannable(pd.DataFrame({"x": [1.5]})) is not None
    True
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

_NESTED = (list, tuple, np.ndarray, dict)


def _holds_nested(column: pd.Series) -> bool:
    if column.dtype != object:
        return False
    first = column.first_valid_index()
    return first is not None and isinstance(column[first], _NESTED)


def scannable(frame: pd.DataFrame) -> pd.DataFrame | pa.Table:
    """``frame`` itself, or as an Arrow table when a column holds lists or dicts (typed by Arrow)."""
    if not any(_holds_nested(column) for _, column in frame.items()):
        return frame
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return frame  # values Arrow cannot type as one column: DuckDB's own scan decides
