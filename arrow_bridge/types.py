"""DuckDB type <-> Arrow type, and the DuckDB type of a model's output.

DuckDB itself answers which Arrow type a DuckDB type maps to, so the mapping
is always the one DuckDB uses when it reads the function's result.

Example:
    >>> arrow_type("FLOAT[3]").list_size
    3
    >>> duckdb_type_of(np.zeros((1, 10), dtype="float32"))
    'FLOAT[10]'
    >>> duckdb_type_of({"label": np.array([3]), "score": np.array([0.9])})
    'STRUCT("label" BIGINT, "score" DOUBLE)'
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from arrow_bridge.quoting import quote_identifier
from udf_engine.errors import ConfigError

_SCALAR_NAMES = {
    np.dtype("float16"): "FLOAT",
    np.dtype("float32"): "FLOAT",
    np.dtype("float64"): "DOUBLE",
    np.dtype("int8"): "TINYINT",
    np.dtype("int16"): "SMALLINT",
    np.dtype("int32"): "INTEGER",
    np.dtype("int64"): "BIGINT",
    np.dtype("uint8"): "UTINYINT",
    np.dtype("uint16"): "USMALLINT",
    np.dtype("uint32"): "UINTEGER",
    np.dtype("uint64"): "UBIGINT",
    np.dtype("bool"): "BOOLEAN",
}

_lock = threading.Lock()
_connection: duckdb.DuckDBPyConnection | None = None


def _scratch() -> duckdb.DuckDBPyConnection:
    global _connection
    if _connection is None:
        _connection = duckdb.connect()
    return _connection


@functools.lru_cache(maxsize=256)
def arrow_type(duckdb_type: str) -> pa.DataType:
    """The Arrow type DuckDB uses for ``duckdb_type``; ConfigError if DuckDB does not know it."""
    with _lock:
        try:
            reader = _scratch().sql(f"SELECT CAST(NULL AS {duckdb_type}) AS x").to_arrow_table()
        except duckdb.Error as err:
            raise ConfigError(f"returns: {duckdb_type!r} is not a DuckDB type ({str(err).splitlines()[0]})") from None
    return reader.schema.field(0).type


@functools.lru_cache(maxsize=256)
def sql_type_name(arrow: pa.DataType) -> str:
    """How DuckDB names the SQL type it hands over as ``arrow`` (``date32[day]`` -> ``DATE``).

    Example:
        >>> sql_type_name(pa.month_day_nano_interval()), sql_type_name(pa.list_(pa.string()))
        ('INTERVAL', 'VARCHAR[]')
    """
    with _lock:
        try:
            return str(_scratch().from_arrow(pa.table({"x": pa.nulls(0, arrow)})).types[0])
        except (duckdb.Error, pa.ArrowException):
            return str(arrow)


def _scalar_name(dtype: np.dtype) -> str:
    if dtype.kind in "USO":
        return "VARCHAR"
    name = _SCALAR_NAMES.get(np.dtype(dtype))
    if name is None:
        raise ConfigError(f"cannot map model output dtype {dtype} to a DuckDB type; declare returns=")
    return name


def duckdb_type_of(output: Any) -> str:
    """The DuckDB type of a model's output for a batch (one entry per row).

    ``(n,)`` and ``(n, 1)`` arrays are scalars, ``(n, k)`` arrays ``T[k]``, dicts STRUCTs.
    """
    if isinstance(output, dict):
        fields = ", ".join(f"{quote_identifier(k)} {duckdb_type_of(v)}" for k, v in output.items())
        return f"STRUCT({fields})"
    array = np.asarray(output)
    if array.ndim == 0:
        raise ConfigError("the model returned a single value for a batch; it must return one per row")
    if array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1):
        return _scalar_name(array.dtype)
    if array.ndim == 2:
        return f"{_scalar_name(array.dtype)}[{array.shape[1]}]"
    # DuckDB reads suffixes inside out: FLOAT[4][3] is 3 arrays of FLOAT[4].
    dims = "".join(f"[{d}]" for d in reversed(array.shape[1:]))
    return f"{_scalar_name(array.dtype)}{dims}"
