"""Byzer-python output schemas: every notation parsed, rows typed by them, the tables read by DuckDB."""

from __future__ import annotations

import datetime
import decimal
import json
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from sql_magics.byzer.schemas import FILE_SCHEMA, SchemaError, parse_schema, table_from_rows
from udf_engine.errors import RayUDFError


def _types(schema: pa.Schema) -> dict[str, pa.DataType]:
    return dict(zip(schema.names, schema.types, strict=True))


# --- parse_schema: Byzer's st(field(...)) notation ---------------------------------------------------


def test_byzer_simple_types():
    text = (
        "st(field(s,string),field(l,long),field(i,int),field(i2,integer),field(sh,short),field(b,byte),"
        "field(d,double),field(f,float),field(bo,boolean),field(bi,binary),field(da,date),field(ts,timestamp),"
        "field(de,decimal(10,2)))"
    )
    assert _types(parse_schema(text)) == {
        "s": pa.string(),
        "l": pa.int64(),
        "i": pa.int32(),
        "i2": pa.int32(),
        "sh": pa.int16(),
        "b": pa.int8(),
        "d": pa.float64(),
        "f": pa.float32(),
        "bo": pa.bool_(),
        "bi": pa.binary(),
        "da": pa.date32(),
        "ts": pa.timestamp("us"),
        "de": pa.decimal128(10, 2),
    }
    assert all(field.nullable for field in parse_schema(text))


def test_byzer_bare_decimal_is_double_as_in_byzer():
    assert parse_schema("st(field(a,decimal))").field("a").type == pa.float64()


def test_byzer_nested_array_map_and_struct():
    schema = parse_schema("st(field(a,array(array(double))),field(m,map(string,array(st(field(x,string),field(y,long))))))")
    assert schema.field("a").type == pa.list_(pa.list_(pa.float64()))
    inner = pa.struct([("x", pa.string()), ("y", pa.int64())])
    assert schema.field("m").type == pa.map_(pa.string(), pa.list_(inner))
    assert parse_schema("st(field(s,st(field(k,binary))))").field("s").type == pa.struct([("k", pa.binary())])


def test_byzer_whitespace_case_and_quoted_names():
    schema = parse_schema("  st(field(epoch,string),field(k,string), field(b,string))\n")
    assert schema.names == ["epoch", "k", "b"]
    spaced = parse_schema("st ( field ( a , ARRAY ( Double ) ) ,\n field(`odd, name`, LONG) )")
    assert _types(spaced) == {"a": pa.list_(pa.float64()), "odd, name": pa.int64()}
    assert parse_schema("st(field(`a``b`,long))").names == ["a`b"]


def test_byzer_docs_examples_parse():
    # Schemas as they appear in Byzer's own documentation.
    assert parse_schema("st(field(image,array(long)),field(label,long),field(tag,string))").field("image").type == pa.list_(pa.int64())
    assert parse_schema("st(field(dict_value,map(string,array(long))))").field("dict_value").type == pa.map_(
        pa.string(), pa.list_(pa.int64())
    )
    assert parse_schema("st(field(content,binary),field(status,integer))").types == [pa.binary(), pa.int32()]


# --- Spark DDL, Spark JSON and file ---------------------------------------------------------------------


def test_spark_ddl():
    schema = parse_schema("a bigint, b array<double>, c struct<x:int,y:string>, d map<string, array<float>>, `e f` decimal(5,1)")
    assert _types(schema) == {
        "a": pa.int64(),
        "b": pa.list_(pa.float64()),
        "c": pa.struct([("x", pa.int32()), ("y", pa.string())]),
        "d": pa.map_(pa.string(), pa.list_(pa.float32())),
        "e f": pa.decimal128(5, 1),
    }
    assert parse_schema("a:LONG,b:struct<c string>").field("b").type == pa.struct([("c", pa.string())])
    assert parse_schema("a decimal").field("a").type == pa.decimal128(10, 0)


def test_spark_json():
    schema = {
        "type": "struct",
        "fields": [
            {"name": "id", "type": "integer", "nullable": True, "metadata": {}},
            {"name": "v", "type": {"type": "array", "elementType": "double", "containsNull": True}, "nullable": False, "metadata": {}},
            {
                "name": "m",
                "type": {"type": "map", "keyType": "string", "valueType": "decimal(10,2)", "valueContainsNull": True},
                "nullable": True,
                "metadata": {},
            },
            {"name": "s", "type": {"type": "struct", "fields": [{"name": "x", "type": "long", "nullable": True, "metadata": {}}]}},
        ],
    }
    parsed = parse_schema(json.dumps(schema))
    assert _types(parsed) == {
        "id": pa.int32(),
        "v": pa.list_(pa.float64()),
        "m": pa.map_(pa.string(), pa.decimal128(10, 2)),
        "s": pa.struct([("x", pa.int64())]),
    }


def test_file_schema():
    assert parse_schema(" file ") == FILE_SCHEMA
    assert _types(FILE_SCHEMA) == {"start": pa.int64(), "offset": pa.int64(), "value": pa.binary()}


# --- malformed schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("st(field(a,lon))", "at col 12: unknown type 'lon'; expected one of string, long"),
        ("st(field(a,long)", "at col 17: expected ')', got the end"),
        ("st(field(a long))", "at col 12: expected ',', got 'long'"),
        ("st(field(a,long),field(a,string))", 'at col 24: duplicate field "a"'),
        ("st(field(a,array<double>))", "at col 17: expected '(', got '<'"),
        ("st(field(a,long)))", "at col 18: expected the end of the schema, got ')'"),
        ("st(fld(a,long))", "at col 4: expected 'field', got 'fld'"),
        ("st(field(a,map(string)))", "at col 22: expected ',', got ')'"),
        ("st(field(a,decimal(50,2)))", "at col 20: decimal(50,2): precision must be 1 to 38"),
        ("st(field(a,string,analyze))", "at col 18: expected ')', got ','"),
        ("st(field(`a,long))", "at col 10: expected a field name, got '`'"),
        ("a bigint,\n b array<dubble>", "at line 2, col 10: unknown type 'dubble'"),
        ("a bigint, b map<string,int", "at col 27: expected '>', got the end"),
        ("a bigint b int", "at col 10: expected the end of the schema, got 'b'"),
        ("a bigint NOT NULL", "at col 10: expected the end of the schema, got 'NOT'"),
        ("", "the schema is empty"),
        ('{"type": "struct", "fields": [', "not valid JSON"),
        ('{"type": "struct", "fields": [{"name": "a", "type": "lng"}]}', "schema.fields[0].type: unknown type 'lng'"),
        ('{"type": "struct", "fields": [{"name": "a"}]}', 'schema.fields[0]: expected an object with "type"'),
        ('{"type": "array", "elementType": "long"}', 'a JSON schema is an object with "type": "struct"'),
        ('{"type": "struct", "fields": [{"name": "a", "type": {"type": "udt"}}]}', 'schema.fields[0].type: unknown type "udt"'),
    ],
)
def test_malformed_schema_says_where_and_what(text, message):
    with pytest.raises(SchemaError) as caught:
        parse_schema(text)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RayUDFError)
    assert caught.value.text == text


def test_parse_error_carries_the_position():
    with pytest.raises(SchemaError) as caught:
        parse_schema("st(field(a,lon))")
    assert caught.value.position == 11 and "st(field(a,lon))"[caught.value.position :] == "lon))"


# --- table_from_rows with a schema -------------------------------------------------------------------------


def test_rows_take_the_schema_types_exactly():
    schema = parse_schema("st(field(a,long),field(b,array(double)),field(c,string),field(m,map(string,long)),field(s,st(field(x,double))))")
    rows = [
        {"a": 1, "b": [1, 2.5], "c": "x", "m": {"k": 1}, "s": {"x": 1}},
        {"a": 2, "b": [], "c": "y", "m": {}, "s": {"x": 0.5}},
    ]
    table = table_from_rows(rows, schema)
    assert table.schema == schema
    assert table.to_pylist() == [
        {"a": 1, "b": [1.0, 2.5], "c": "x", "m": [("k", 1)], "s": {"x": 1.0}},
        {"a": 2, "b": [], "c": "y", "m": [], "s": {"x": 0.5}},
    ]


def test_other_value_kinds_convert():
    schema = parse_schema("a double, b binary, c binary, d binary, e date, f timestamp, g decimal(5,2), h boolean")
    row = {
        "a": 3,
        "b": b"x",
        "c": bytearray(b"y"),
        "d": memoryview(b"z"),
        "e": datetime.date(2024, 1, 2),
        "f": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "g": decimal.Decimal("1.25"),
        "h": True,
    }
    assert table_from_rows([row], schema).to_pylist() == [{**row, "a": 3.0, "c": b"y", "d": b"z"}]


def test_numpy_scalars_and_arrays():
    schema = parse_schema("st(field(a,long),field(x,double),field(v,array(double)),field(w,array(float)),field(g,array(array(long))))")
    rows = [
        {"a": np.int32(7), "x": np.float32(0.5), "v": np.array([1, 2], dtype="float32"), "w": np.array([0.25]), "g": np.eye(2, dtype=int)},
        {"a": np.int64(8), "x": 1, "v": None, "w": [np.float32(1.5)], "g": None},
        {"a": 9, "x": None, "v": np.array([3.5], dtype="float32"), "w": np.array([], dtype="float64"), "g": [[1]]},
    ]
    table = table_from_rows(rows, schema)
    assert table.schema == schema
    assert table.to_pydict() == {
        "a": [7, 8, 9],
        "x": [0.5, 1.0, None],
        "v": [[1.0, 2.0], None, [3.5]],
        "w": [[0.25], [1.5], []],
        "g": [[[1, 0], [0, 1]], None, [[1]]],
    }


def test_numpy_arrays_without_schema_keep_their_dtype():
    table = table_from_rows([{"v": np.ones(3, dtype="float32")}, {"v": None}, {"v": np.zeros(2, dtype="float32")}])
    assert table.schema.field("v").type == pa.list_(pa.float32())
    assert table.column("v").to_pylist() == [[1.0, 1.0, 1.0], None, [0.0, 0.0]]


def test_many_wide_numpy_rows_are_fast():
    rows = [{"id": i, "pixels": np.full(784, i, dtype="float32")} for i in range(20_000)]
    schema = parse_schema("st(field(id,long),field(pixels,array(double)))")
    started = time.perf_counter()
    table = table_from_rows(iter(rows), schema)
    # Element by element pyarrow takes ~1.5 s for these; stacked through NumPy ~0.2 s.
    assert time.perf_counter() - started < 1.0
    assert table.num_rows == 20_000 and table.column("pixels")[19_999].as_py()[:2] == [19_999.0, 19_999.0]


def test_row_that_does_not_fit_names_row_field_value_and_type():
    schema = parse_schema("st(field(a,long),field(b,array(double)))")
    rows = [{"a": i, "b": [float(i)]} for i in range(1000)]
    rows[3]["b"] = "abc"
    with pytest.raises(SchemaError) as caught:
        table_from_rows(rows, schema)
    assert str(caught.value) == "row 4, field \"b\": expected array<double>, got 'abc' (str)"
    assert (caught.value.row, caught.value.field) == (3, "b")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("a", "12", "expected long, got '12' (str)"),
        ("a", 2**70, "expected long, got 1180591620717411303424 (int)"),
        ("a", True, "expected long, got True (bool)"),
        ("a", 2.5, "expected long, got 2.5 (float)"),
        ("a", np.float64(2.5), "expected long, got np.float64(2.5) (float64)"),
        ("v", [1, 2.5], "expected array<long>, got [1, 2.5] (list)"),
        ("c", 5, "expected string, got 5 (int)"),
        ("v", np.array([0.5, 1.5]), "expected array<long>, got array([0.5, 1.5]) (ndarray of float64, shape (2,))"),
        ("v", ["x" * 100], "expected array<long>, got ['" + "x" * 55 + "... (list)"),
    ],
)
def test_misfits_of_each_kind(column, value, message):
    schema = parse_schema("a long, c string, v array<long>")
    rows = [{"a": 1, "c": "x", "v": np.array([1, 2])} for _ in range(5)]
    rows[2][column] = value
    with pytest.raises(SchemaError, match=r"^row 3, field \"" + column + '"') as caught:
        table_from_rows(rows, schema)
    assert str(caught.value).endswith(message)


def test_whole_floats_go_into_integers():
    schema = parse_schema("a long, v array<int>")
    rows = [{"a": 1.0, "v": [2.0, 3]}, {"a": np.float32(4), "v": np.array([5.0])}]
    assert table_from_rows(rows, schema).to_pydict() == {"a": [1, 4], "v": [[2, 3], [5]]}


def test_a_misfit_deep_in_many_wide_rows():
    rows = [{"v": np.zeros(784, dtype="float32")} for _ in range(5000)]
    rows[4321]["v"] = np.array(["a"])
    with pytest.raises(SchemaError, match=r'^row 4322, field "v": expected array<double>, got array\(\[\'a\'\], dtype=\'<U1\'\)'):
        table_from_rows(rows, parse_schema("v array<double>"))


def test_extra_key_is_an_error_naming_it():
    schema = parse_schema("st(field(a,long))")
    with pytest.raises(SchemaError) as caught:
        table_from_rows([{"a": 1}, {"a": 2, "zz": 3, "yy": 4}], schema)
    assert str(caught.value) == 'row 2: keys "zz", "yy" are not in the schema (a)'


def test_missing_key_is_null():
    schema = parse_schema("st(field(a,long),field(b,string))")
    assert table_from_rows([{"a": 1}, {"b": "x"}], schema).to_pydict() == {"a": [1, None], "b": [None, "x"]}


def test_a_row_that_is_not_a_dict():
    with pytest.raises(SchemaError, match=r"^row 2: expected a dict, got \[1, 2\] \(list\)$"):
        table_from_rows([{"a": 1}, [1, 2]], parse_schema("a long"))


def test_generator_is_read_once():
    def rows():
        for i in range(3):
            yield {"start": i * 10, "offset": 10, "value": bytes([i]) * 10}

    table = table_from_rows(rows(), parse_schema("file"))
    assert table.schema == FILE_SCHEMA
    assert table.column("start").to_pylist() == [0, 10, 20]
    assert table.column("value")[2].as_py() == b"\x02" * 10


def test_no_rows():
    schema = parse_schema("a long, b array<double>")
    empty = table_from_rows([], schema)
    assert empty.schema == schema and empty.num_rows == 0
    assert table_from_rows(iter([])).num_columns == 0


# --- DataFrames and Arrow inputs ---------------------------------------------------------------------------


def test_dataframe_with_schema():
    frame = pd.DataFrame(
        {
            "a": [1, 2, 3],
            "x": [0.5, np.nan, 2.0],
            "v": [np.array([1.0, 2.0], dtype="float32"), None, np.array([3.0], dtype="float32")],
            "s": ["p", None, "r"],
        },
        index=[10, 20, 30],
    )
    schema = parse_schema("st(field(a,double),field(x,double),field(v,array(double)),field(s,string),field(missing,long))")
    table = table_from_rows(frame, schema)
    assert table.schema == schema
    assert table.to_pydict() == {
        "a": [1.0, 2.0, 3.0],
        "x": [0.5, None, 2.0],
        "v": [[1.0, 2.0], None, [3.0]],
        "s": ["p", None, "r"],
        "missing": [None, None, None],
    }


def test_dataframe_missing_values_of_each_dtype_are_null():
    frame = pd.DataFrame(
        {"t": pd.to_datetime(["2024-01-02", None]), "n": pd.array([1, None], dtype="Int64"), "c": pd.Categorical(["x", None])}
    )
    table = table_from_rows(frame, parse_schema("t timestamp, n long, c string"))
    assert table.to_pydict() == {"t": [datetime.datetime(2024, 1, 2), None], "n": [1, None], "c": ["x", None]}


def test_dataframe_misfit_and_extra_column():
    frame = pd.DataFrame({"a": [1.0, 2.5, 3.0]})
    with pytest.raises(SchemaError, match=r'^row 2, field "a": expected long, got 2.5 \(float\)$'):
        table_from_rows(frame, parse_schema("a long"))
    with pytest.raises(SchemaError, match=r'^column "a" is not in the schema \(b\)$'):
        table_from_rows(frame, parse_schema("b long"))


def test_dataframe_without_schema():
    frame = pd.DataFrame({"a": [1, 2], "v": [np.ones(2), np.zeros(2)], "s": ["x", "y"]})
    inferred = table_from_rows(frame)
    assert inferred.to_pydict() == {"a": [1, 2], "v": [[1.0, 1.0], [0.0, 0.0]], "s": ["x", "y"]}
    assert duckdb.sql("select typeof(a), typeof(v), typeof(s) from inferred").fetchall() == [("BIGINT", "DOUBLE[]", "VARCHAR")] * 2


# --- inference without a schema ---------------------------------------------------------------------------


def test_inference_over_all_rows():
    table = table_from_rows([{"a": 1, "b": None}, {"a": 2.5, "c": [1, 2]}, {"a": None, "b": None}])
    assert _types(table.schema) == {"a": pa.float64(), "b": pa.null(), "c": pa.list_(pa.int64())}
    assert table.to_pydict() == {"a": [1.0, 2.5, None], "b": [None, None, None], "c": [None, [1, 2], None]}


def test_inference_names_the_row_that_breaks_the_type():
    rows = [{"a": i} for i in range(100)] + [{"a": "x"}]
    with pytest.raises(SchemaError) as caught:
        table_from_rows(rows)
    assert str(caught.value) == "row 101, field \"a\": got 'x' (str), unlike the rows before it (long); declare a schema"


# --- what DuckDB reads -------------------------------------------------------------------------------------


def test_duckdb_reads_the_declared_sql_types():
    schema = parse_schema(
        "st(field(a,long),field(b,array(double)),field(m,map(string,string)),field(s,st(field(x,integer),field(y,string))),"
        "field(f,float),field(bi,binary),field(d,date),field(ts,timestamp),field(de,decimal(10,2)),field(bo,boolean),field(i8,byte))"
    )
    t = table_from_rows([{"a": 1, "b": [1.0], "m": {"k": "v"}, "s": {"x": 1, "y": "z"}}], schema)
    assert t.num_rows == 1
    assert duckdb.sql("select typeof(columns(*)) from t").fetchall()[0] == (
        "BIGINT",
        "DOUBLE[]",
        "MAP(VARCHAR, VARCHAR)",
        "STRUCT(x INTEGER, y VARCHAR)",
        "FLOAT",
        "BLOB",
        "DATE",
        "TIMESTAMP",
        "DECIMAL(10,2)",
        "BOOLEAN",
        "TINYINT",
    )
    assert duckdb.sql("select a, b[1], m['k'], s.y from t").fetchall() == [(1, 1.0, "v", "z")]
