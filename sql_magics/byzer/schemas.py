"""The type of a Byzer-python result: a schema from text, and rows made into an Arrow table.

Byzer-python code yields rows (dicts, or a pandas DataFrame) and declares their type with
``!python conf "schema=..."``. The text takes the forms Byzer accepts, told apart as Byzer
tells them apart: JSON (``{...}``), ``file``, ``st(field(...))``, else a Spark DDL. DuckDB
reads the table as it is, so Arrow's types are the SQL types the rows get.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from udf_engine.errors import RayUDFError
from udf_engine.models import streaming_tar

# Spark's type names, typeName first, then the DDL alias; errors show the first. Spark's
# timestamp is in microseconds; with no zone DuckDB reads it as TIMESTAMP and naive datetimes go in as they are.
_SPARK_TYPES = [
    ("string", pa.string()),
    ("long bigint", pa.int64()),
    ("integer int", pa.int32()),
    ("short smallint", pa.int16()),
    ("byte tinyint", pa.int8()),
    ("double", pa.float64()),
    ("float real", pa.float32()),
    ("boolean", pa.bool_()),
    ("binary", pa.binary()),
    ("date", pa.date32()),
    ("timestamp", pa.timestamp("us")),
]
_ATOMIC = {name: data_type for names, data_type in _SPARK_TYPES for name in names.split()}
_SHOWN = {data_type: names.split()[0] for names, data_type in _SPARK_TYPES}

# The rows of pyjava's streaming_tar (``schema=file``): a tar file cut into chunks.
FILE_SCHEMA = pa.schema([(streaming_tar.START, pa.int64()), (streaming_tar.LENGTH, pa.int64()), (streaming_tar.VALUE, pa.binary())])

_ARROW_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)
_SHORT = 60  # characters of a schema text or a value that an error shows


def _shorten(text: str) -> str:
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


class SchemaError(RayUDFError, ValueError):
    """A schema text that does not parse, or rows that do not fit a schema.

    ``position`` is the 0-based offset in ``text`` where parsing stopped. ``row`` is the
    0-based index of the row that does not fit; the message counts rows from 1, as
    :class:`~udf_engine.errors.RowError` does.

    Example:
        >>> print(SchemaError("expected long, got 'x' (str)", row=2, field="a"))
        row 3, field "a": expected long, got 'x' (str)
    """

    def __init__(
        self, message: str, *, text: str | None = None, position: int | None = None, row: int | None = None, field: str | None = None
    ):
        self.message, self.text, self.position, self.row, self.field = message, text, position, row, field
        where = []
        if text is not None:
            where.append(f"schema {_shorten(text.strip())!r}")
            if position is not None:
                line, col = text.count("\n", 0, position) + 1, position - text.rfind("\n", 0, position)
                where[-1] += f" at line {line}, col {col}" if "\n" in text else f" at col {col}"
        if row is not None:
            where.append(f"row {row + 1}")
        if field is not None:
            where.append(f'field "{field}"')
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "quoted" (a `backquoted` name, unescaped), "punct", "bad" or "end"
    text: str
    start: int  # offset in the schema text; the token ends before ``end``
    end: int


_TOKEN = re.compile(r"\s*(?:(?P<quoted>`(?:[^`]|``)*`)|(?P<punct>[(),<>:])|(?P<name>[^\s(),<>:`]+)|(?P<bad>\S))")


def _tokens(text: str) -> list[_Token]:
    tokens = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind is None:  # only trailing whitespace was left
            break
        value = match.group(kind)
        tokens.append(_Token(kind, value[1:-1].replace("``", "`") if kind == "quoted" else value, match.start(kind), match.end(kind)))
    return [*tokens, _Token("end", "", len(text), len(text))]


class _Parser:
    """Byzer's ``st(field(name,type),...)`` when ``byzer``, else Spark DDL ``name type, ...``."""

    def __init__(self, text: str, *, byzer: bool) -> None:
        self.text, self.byzer = text, byzer
        self.tokens = _tokens(text)
        self.i = 0  # index of the next token to read

    def schema(self) -> pa.Schema:
        if self.byzer:
            self._expect("st")
            self._expect("(")
        fields = self._fields()
        if self.byzer:
            self._expect(")")
        return pa.schema(self._end(fields))

    def single_type(self) -> pa.DataType:
        return self._end(self._type())

    def _error(self, message: str, token: _Token | None = None) -> SchemaError:
        return SchemaError(message, text=self.text, position=(token or self.tokens[self.i]).start)

    def _expected(self, what: str) -> SchemaError:
        got = self.tokens[self.i]
        return self._error(f"expected {what}, got {repr(got.text) if got.text else 'the end'}")

    def _end(self, result: Any) -> Any:
        if self.tokens[self.i].kind != "end":
            raise self._expected("the end of the schema")
        return result

    def _take(self, text: str) -> bool:
        """Read the next token if it is ``text``: a bracket, or a word in any case."""
        token = self.tokens[self.i]
        if token.kind in ("punct", "name") and token.text.lower() == text:
            self.i += 1
            return True
        return False

    def _expect(self, text: str) -> None:
        if not self._take(text):
            raise self._expected(repr(text))

    def _next(self, kinds: tuple[str, ...], what: str) -> _Token:
        token = self.tokens[self.i]
        if token.kind not in kinds:
            raise self._expected(what)
        self.i += 1
        return token

    def _number(self) -> int:
        if not self.tokens[self.i].text.isdigit():
            raise self._expected("a number")
        return int(self._next(("name",), "a number").text)

    def _fields(self) -> list[pa.Field]:
        fields: list[pa.Field] = []
        while True:
            if self.byzer:
                self._expect("field")
                self._expect("(")
            name = self._next(("name", "quoted"), "a field name")
            if name.text in (field.name for field in fields):
                raise self._error(f'duplicate field "{name.text}"', name)
            if self.byzer:
                self._expect(",")
            else:
                self._take(":")
            field_type = self._type()
            if self.byzer:
                self._expect(")")
            fields.append(pa.field(name.text, field_type))
            if not self._take(","):
                return fields

    def _type(self) -> pa.DataType:
        token = self._next(("name",), "a type")
        word = token.text.lower()
        if word in _ATOMIC:
            return _ATOMIC[word]
        if word == "decimal":
            return self._decimal()
        if word not in ("array", "map", "st" if self.byzer else "struct"):
            compound = "array(t), map(k,v), st(field(n,t),...)" if self.byzer else "array<t>, map<k,v>, struct<n:t,...>"
            raise self._error(f"unknown type {token.text!r}; expected one of {', '.join(_ATOMIC)}, decimal(p,s), {compound}", token)
        opening, closing = ("(", ")") if self.byzer else ("<", ">")
        self._expect(opening)
        if word == "array":
            result = pa.list_(self._type())
        elif word == "map":
            key = self._type()
            self._expect(",")
            result = pa.map_(key, self._type())
        else:
            result = pa.struct(self._fields())
        self._expect(closing)
        return result

    def _decimal(self) -> pa.DataType:
        if not self._take("("):
            # Byzer's st() parser reads a bare decimal as double; Spark's default is decimal(10,0).
            return pa.float64() if self.byzer else pa.decimal128(10, 0)
        start = self.tokens[self.i]
        precision = self._number()
        scale = self._number() if self._take(",") else 0
        self._expect(")")
        if not (0 < precision <= 38 and scale <= precision):
            raise self._error(f"decimal({precision},{scale}): precision must be 1 to 38 and scale at most the precision", start)
        return pa.decimal128(precision, scale)


def _json_type(node: Any, where: str, text: str) -> pa.DataType:
    if isinstance(node, str):
        try:
            return _Parser(node, byzer=False).single_type()
        except SchemaError as err:
            raise SchemaError(f"{where}: {err.message}", text=text) from None

    def need(obj: Any, key: str, at: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise SchemaError(f'{at}: expected an object with "{key}", got {_shorten(json.dumps(obj))}', text=text)
        return obj[key]

    kind = need(node, "type", where)
    if kind == "array":
        return pa.list_(_json_type(need(node, "elementType", where), f"{where}.elementType", text))
    if kind == "map":
        key = _json_type(need(node, "keyType", where), f"{where}.keyType", text)
        return pa.map_(key, _json_type(need(node, "valueType", where), f"{where}.valueType", text))
    if kind != "struct":
        raise SchemaError(f'{where}: unknown type {_shorten(json.dumps(kind))}; expected "struct", "array", "map" or a name', text=text)
    fields: list[pa.Field] = []
    for i, item in enumerate(need(node, "fields", where)):
        at = f"{where}.fields[{i}]"
        name = need(item, "name", at)
        if not isinstance(name, str) or name in (field.name for field in fields):
            raise SchemaError(f"{at}: a field's name is a string unlike the other fields' names, got {json.dumps(name)}", text=text)
        fields.append(pa.field(name, _json_type(need(item, "type", at), f"{at}.type", text)))
    return pa.struct(fields)


def parse_schema(text: str) -> pa.Schema:
    """The Arrow schema a Byzer-python ``schema=`` text declares.

    Accepts Byzer's ``st(field(a,long),field(b,array(double)))`` (with ``map(k,v)`` and nested
    ``st(...)``), a Spark DDL ``a bigint, b array<double>``, Spark's StructType JSON, and
    ``file`` (:data:`FILE_SCHEMA`). Type names are case-insensitive; names may be `backquoted`.

    Raises:
        SchemaError: the text is malformed; the message says where and what was expected.

    Example:
        >>> parse_schema("st(field(a,long),field(m,map(string,array(double))))").types
        [DataType(int64), MapType(map<string, list<item: double>>)]
        >>> parse_schema("st(field(a,lon))")
        Traceback (most recent call last):
        ...
        sql_magics.byzer.schemas.SchemaError: schema 'st(field(a,lon))' at col 12: unknown type 'lon'; expected one of ...
    """
    stripped = text.strip()
    if not stripped:
        raise SchemaError("the schema is empty", text=text)
    if stripped == "file":
        return FILE_SCHEMA
    if not stripped.startswith("{"):
        return _Parser(text, byzer=re.match(r"st\s*\(", stripped, re.IGNORECASE) is not None).schema()
    try:
        node = json.loads(text)
    except json.JSONDecodeError as err:
        raise SchemaError(f"not valid JSON: {err.msg}", text=text, position=err.pos) from None
    struct = _json_type(node, "schema", text)
    if not pa.types.is_struct(struct):
        raise SchemaError('a JSON schema is an object with "type": "struct"', text=text)
    return pa.schema(list(struct))


def _type_name(data_type: pa.DataType) -> str:
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type):
        return f"array<{_type_name(data_type.value_type)}>"
    if pa.types.is_map(data_type):
        return f"map<{_type_name(data_type.key_type)},{_type_name(data_type.item_type)}>"
    if pa.types.is_struct(data_type):
        return "struct<" + ",".join(f"{field.name}:{_type_name(field.type)}" for field in data_type) + ">"
    if pa.types.is_decimal(data_type):
        return f"decimal({data_type.precision},{data_type.scale})"
    return _SHOWN.get(data_type, str(data_type))


def _show(value: Any) -> str:
    kind = f"ndarray of {value.dtype}, shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
    return f"{_shorten(repr(value))} ({kind})"


def _stacked(values: list, data_type: pa.DataType | None) -> pa.Array | None:
    """A column of 1-D NumPy arrays (or None) as one list array, copied by NumPy rather than number by number.

    None when the column is not that, or ``data_type`` is not a list of numbers.
    """
    element = data_type.value_type if data_type is not None and pa.types.is_list(data_type) else None
    numbers = element is not None and (pa.types.is_integer(element) or pa.types.is_floating(element))
    kinds = "biuf" if data_type is None else "iuf" if numbers else ""
    arrays = [value for value in values if value is not None]
    if not arrays or not all(isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in kinds for value in arrays):
        return None
    dtypes = {value.dtype for value in arrays}
    if data_type is None and len(dtypes) > 1:
        return None  # NumPy would promote where pyarrow's inference may not
    data_type = data_type or pa.list_(pa.from_numpy_dtype(next(iter(dtypes))))
    target = np.dtype(data_type.value_type.to_pandas_dtype())
    if target.kind == "f" or all(np.can_cast(dtype, target, "safe") for dtype in dtypes):
        flat = pa.array(np.concatenate(arrays, dtype=target, casting="same_kind"))
    else:
        flat = pa.array(np.concatenate(arrays)).cast(data_type.value_type)  # Arrow's safe cast refuses a fraction or an overflow
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([0 if value is None else len(value) for value in values], out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        return None  # pyarrow's own conversion splits it into chunks
    mask = None if len(arrays) == len(values) else pa.array([value is None for value in values])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat, type=data_type, mask=mask)


def _array(values: list, data_type: pa.DataType | None) -> pa.Array | pa.ChunkedArray:
    stacked = _stacked(values, data_type)
    if stacked is not None:
        return stacked
    # pyarrow reads 1-D arrays as lists, but not arrays of more (or no) dimensions.
    values = [value.tolist() if isinstance(value, np.ndarray) and value.ndim != 1 else value for value in values]
    array = pa.array(values, type=data_type)
    element = data_type
    while element is not None and (pa.types.is_list(element) or pa.types.is_large_list(element)):
        element = element.value_type
    if element is not None and pa.types.is_integer(element):
        # pyarrow truncates 2.5 to 2 on its way into an integer; Spark refuses it, so Arrow's safe cast decides.
        try:
            inferred = pa.array(values)
        except _ARROW_ERRORS:
            return array  # no one type fits all the values: then none is a fraction the typed conversion cut
        if inferred.type != data_type:
            inferred.cast(data_type)
    return array


def _misfit(name: str, values: list, data_type: pa.DataType | None, err: Exception) -> SchemaError:
    """The error naming the first of ``values`` that does not convert."""

    def _converts(values: list, data_type: pa.DataType | None) -> bool:
        try:
            _array(values, data_type)
        except _ARROW_ERRORS:
            return False
        return True

    if data_type is not None:
        row = next((i for i, value in enumerate(values) if not _converts([value], data_type)), None)
    else:
        # What Arrow infers depends on the rows before: the shortest prefix that fails ends at the culprit.
        good, bad = 0, len(values)
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if _converts(values[:middle], None) else (good, middle)
        row = bad - 1
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if row is None:
        return SchemaError(f"cannot make a column of {_type_name(data_type)}: {reason}", field=name)
    if data_type is not None:
        return SchemaError(f"expected {_type_name(data_type)}, got {_show(values[row])}", row=row, field=name)
    before = _array(values[:row], None).type
    if pa.types.is_null(before):
        return SchemaError(f"Arrow cannot store {_show(values[row])}: {reason}", row=row, field=name)
    return SchemaError(f"got {_show(values[row])}, unlike the rows before it ({_type_name(before)}); declare a schema", row=row, field=name)


def _column(name: str, values: list, data_type: pa.DataType | None) -> pa.Array | pa.ChunkedArray:
    try:
        return _array(values, data_type)
    except _ARROW_ERRORS as err:
        raise _misfit(name, values, data_type, err) from None


def _not_in(schema: pa.Schema, names: list, what: str) -> str:
    listed = ", ".join(f'"{name}"' for name in names)
    are = f"{what}s {listed} are" if len(names) > 1 else f"{what} {listed} is"
    return f"{are} not in the schema ({', '.join(schema.names)})"


def _frame_columns(frame: pd.DataFrame) -> dict[str, list]:
    if frame.columns.has_duplicates:
        raise SchemaError(f"the DataFrame has duplicate columns: {sorted(set(frame.columns[frame.columns.duplicated()]))}")
    columns = {}
    for name, series in frame.items():
        values = series.tolist()
        # pandas marks a missing value with NaN or NaT as often as with None: all are NULL.
        for i in np.flatnonzero(series.isna().to_numpy()):
            values[i] = None
        columns[str(name)] = values
    return columns


def _dict_columns(rows: list, schema: pa.Schema | None) -> dict[str, list]:
    known = set(schema.names) if schema is not None else None
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise SchemaError(f"expected a dict, got {_show(row)}", row=i)
        if known is not None and not known.issuperset(row):
            raise SchemaError(_not_in(schema, [key for key in row if key not in known], "key"), row=i)
    names = schema.names if schema is not None else list(dict.fromkeys(key for row in rows for key in row))
    for name in names:
        if not isinstance(name, str):
            raise SchemaError(f"the key {_show(name)} is not a string", row=next(i for i, row in enumerate(rows) if name in row))
    return {name: [row.get(name) for row in rows] for name in names}


def table_from_rows(rows: Any, schema: pa.Schema | None = None) -> pa.Table:
    """The Arrow table of a Byzer-python result, typed by ``schema`` (else inferred).

    ``rows`` are dicts (an iterable read once: a generator will do) or a pandas DataFrame, whose
    NaN and NaT are NULL as pandas means them. With a schema, values convert to its types (an
    int into a double, NumPy scalars and 1-D arrays into numbers and lists, bytes-likes into
    binary; a fraction into an integer is refused), a missing key is NULL and a key the schema
    lacks is an error. Without one, Arrow infers each column from all its values: a column of
    None only is of Arrow's null type, and no rows make a table of no columns.

    Raises:
        SchemaError: a row does not fit; the message names the row (from 1), the field, the
            value and the type expected.

    Example:
        >>> schema = parse_schema("st(field(a,long),field(b,array(double)))")
        >>> table_from_rows([{"a": 1, "b": np.ones(2, dtype="float32")}], schema).to_pylist()
        [{'a': 1, 'b': [1.0, 1.0]}]
        >>> table_from_rows(iter([{"a": 1}, {"a": 2.5, "b": "x"}])).to_pydict()
        {'a': [1.0, 2.5], 'b': [None, 'x']}
        >>> table_from_rows([{"a": 1}, {"a": "x"}], parse_schema("a long"))
        Traceback (most recent call last):
        ...
        sql_magics.byzer.schemas.SchemaError: row 2, field "a": expected long, got 'x' (str)
    """
    if isinstance(rows, pd.DataFrame):
        columns, count = _frame_columns(rows), len(rows)
    else:
        rows = list(rows)
        columns, count = _dict_columns(rows, schema), len(rows)
    if schema is None:
        return pa.Table.from_arrays([_column(name, values, None) for name, values in columns.items()], names=list(columns))
    extra = [name for name in columns if name not in schema.names]
    if extra:
        raise SchemaError(_not_in(schema, extra, "column"))
    arrays = [_column(field.name, columns[field.name] if field.name in columns else [None] * count, field.type) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)
