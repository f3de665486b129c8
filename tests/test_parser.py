"""Tests of the statement language's tokenizer and parser (pure Python)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sql_magics.errors import ParseError
from sql_magics.language.parser import parse
from sql_magics.language.statements import (
    STATEMENT_TYPES,
    Command,
    Include,
    Load,
    Register,
    Run,
    Save,
    Select,
    Set,
    Sql,
    Unregister,
)
from sql_magics.language.tokens import BACKQUOTE, NUMBER, OP, STRING, TRIPLE, WORD, tokenize

BYZER = '''!python conf "runIn=driver";
set sql.dialect="spark";
load parquet.`/data/models/clf_table` as clf_model;
register Ray.`clf_model` as clf_predict where maxConcurrency="2" and registerCode=\'\'\'
import numpy as np
from pyjava.api.mlsql import RayContext
from pyjava.udf import UDFBuilder, UDFBuildInFunc
ray_context = RayContext.connect(globals(), context.conf.get("rayAddress"))
def predict_func(model, v):
    x = np.array([v]).reshape((1, 64))
    return {"value": [[float(np.argmax(p)) for p in model.predict(x)]]}
UDFBuilder.build(ray_context, UDFBuildInFunc.init_tf, predict_func)
\'\'\';
load parquet.`/data/digits.parquet` as digits;
select id, cast(pixels as array<double>) as pixels from digits limit 100 as sample;
select id, clf_predict(array(pixels)) as predicted from sample as output;
'''


def one(text: str):
    statements = parse(text)
    assert len(statements) == 1, statements
    return statements[0]


def error(text: str, source_name: str = "") -> ParseError:
    with pytest.raises(ParseError) as info:
        parse(text, source_name)
    return info.value


# -- tokens ----------------------------------------------------------------------------


def test_tokens_know_kind_position_and_exclusive_end():
    text = "load csv.`a b` where k='v' and n=1.5;\n  x"
    tokens = tokenize(text)
    assert [t.kind for t in tokens] == [
        WORD, WORD, OP, BACKQUOTE, WORD, WORD, OP, STRING, WORD, WORD, OP, NUMBER, OP, WORD,
    ]
    assert all(text[t.start : t.end] == t.text for t in tokens)
    last = tokens[-1]
    assert (last.text, last.line, last.col, last.start, last.end) == ("x", 2, 3, 40, 41)


def test_string_values_undo_doubled_quotes_and_keep_backslashes():
    tokens = tokenize("'it''s' " + r'"a\"b"' + ' "say ""hi""" `a``b`')
    assert [t.value for t in tokens] == ["it's", r"a\"b", 'say "hi"', "a`b"]


def test_triple_block_spans_lines_and_later_tokens_have_right_columns():
    tokens = tokenize("x = '''a\nb;c''' where")
    assert tokens[2].kind is TRIPLE and tokens[2].value == "a\nb;c"
    assert tokens[2].end_position() == (2, 7)
    assert (tokens[3].line, tokens[3].col) == (2, 8)


def test_comments_are_skipped_but_dashes_in_strings_are_text():
    tokens = tokenize("a -- c ; d\n/* e ; f */ b '--g' \"/*h*/\"")
    assert [t.value for t in tokens] == ["a", "b", "--g", "/*h*/"]


def test_dollar_and_braces_are_plain_ops():
    assert [t.text for t in tokenize("${name}")] == ["$", "{", "name", "}"]


@pytest.mark.parametrize(
    ("text", "message", "line", "col"),
    [
        ("select 1;\nselect 'abc", "unterminated string", 2, 8),
        ('x = "a\\"', "unterminated string", 1, 5),
        ("set a = '''x\ny;\n", "unterminated ''' block", 1, 9),
        ("load csv.`/data/x as t;", "unterminated backquote", 1, 10),
        ("select 1; /* never\nclosed", "unterminated /* comment", 1, 11),
    ],
)
def test_unterminated_tokens_point_at_where_they_open(text, message, line, col):
    err = error(text)
    assert (err.message, err.line, err.col) == (message, line, col)


# -- splitting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "select 'a;b'",
        'select "a;b"',
        "set x = '''a;b'''",
        "load csv.`a;b` as t",
        "select 1 -- a;b",
        "select /* a;b */ 1",
        "select '--;' ",
    ],
)
def test_semicolons_inside_quotes_and_comments_do_not_split(text):
    assert len(parse(text + ";")) == 1


def test_empty_statements_and_comment_only_scripts_are_dropped():
    assert parse("") == []
    assert parse(";;  ;\n-- only a comment;\n/* and; this */;") == []
    assert parse(";;select 1;;;select 2") == [Sql("select 1"), Sql("select 2")]


def test_statement_text_is_stripped_without_semicolon_or_outer_comments():
    statements = parse("-- lead\n  select 1 -- trail\n ; \n\nselect /* in */ 2  ")
    assert [s.text for s in statements] == ["select 1", "select /* in */ 2"]
    assert [(s.line, s.col) for s in statements] == [(2, 3), (5, 1)]


def test_statement_on_line_three_has_exact_position():
    statements = parse("set a = 1;\n\n   load csv.`x` as t;")
    assert (statements[1].line, statements[1].col) == (3, 4)


# -- load ------------------------------------------------------------------------------


def test_load_simple():
    stmt = one("load parquet.`/data/x.parquet` as x;")
    assert stmt == Load("parquet", "/data/x.parquet", {}, "x")
    assert stmt.kind == "load"
    assert stmt.text == "load parquet.`/data/x.parquet` as x"


def test_load_options_in_every_quoting():
    stmt = one(
        "load csv.`/data/my files/*.csv` where header=\"true\" and delim=';' "
        "and `weird key`='''a\n'b'\n''' AND n=3 and mode=FAILFAST and fs.s3a.region=\"eu\" "
        "and 'quoted.key'=-2 as t"
    )
    assert stmt.path == "/data/my files/*.csv"
    assert stmt.options == {
        "header": "true",
        "delim": ";",
        "weird key": "a\n'b'\n",
        "n": "3",
        "mode": "FAILFAST",
        "fs.s3a.region": "eu",
        "quoted.key": "-2",
    }


def test_load_options_keyword_and_any_format():
    stmt = one("load jsonStr.`data` options a=\"1\" as t")
    assert stmt == Load("jsonStr", "data", {"a": "1"}, "t")
    assert one("load whatever.`x` as t").format == "whatever"


def test_keywords_are_case_insensitive():
    stmt = one('LOAD CSV.`x.csv` WHERE header="true" AnD sep="," As T')
    assert stmt == Load("CSV", "x.csv", {"header": "true", "sep": ","}, "T")


def test_duckdb_load_extension_is_sql():
    assert one("LOAD httpfs") == Sql("LOAD httpfs")
    assert one("load 'my_ext.duckdb_extension'").kind == "sql"


@pytest.mark.parametrize(
    ("text", "message", "col"),
    [
        ("load csv.`p` ass t", "load: expected 'as <table>' after the path, found 'ass'", 14),
        ("load csv.`p` where a=1 t", "load: expected 'as <table>' after the options, found 't'", 24),
        ("load csv.`p`", "load: expected 'as <table>' after the path, found end of statement", 13),
        ("load csv.`p` as ;", "load: expected a table name after 'as', found end of statement", 16),
        ("load csv.`p` as t u", "load: expected ';' after the table name, found 'u'", 19),
        ("load csv.'p' as t", "load: expected <format>.`<path>`, found 'p'", 10),
        ("load parquet as t", "load: expected <format>.`<path>`, found 'as'", 14),
        ("load `p` as t", "load: expected <format>.`<path>`, found `p`", 6),
        ("load csv.`p` where as t", "load: expected an option name after 'where', found 'as'", 20),
        ("load csv.`p` where a as t", "load: expected '=' after option 'a', found 'as'", 22),
        ("load csv.`p` where a= as t", "load: expected a value for option 'a', found 'as'", 23),
        ("load csv.`p` where a=1 and a=2 as t", "load: option 'a' is given twice", 28),
        ("load csv.`p` where a=${x as t", "load: unclosed '${' in a value", 22),
    ],
)
def test_load_errors(text, message, col):
    err = error(text)
    assert (err.message, err.line, err.col) == (message, 1, col)
    assert err.source_line == text


# -- save ------------------------------------------------------------------------------


def test_save_defaults():
    stmt = one("save t as parquet.`/out/t.parquet`")
    assert stmt == Save("errorIfExists", "t", "parquet", "/out/t.parquet", {}, [])
    assert stmt.kind == "save"


@pytest.mark.parametrize(
    ("word", "mode"),
    [
        ("overwrite", "overwrite"),
        ("OVERWRITE", "overwrite"),
        ("Append", "append"),
        ("errorifexists", "errorIfExists"),
        ("ErrorIfExists", "errorIfExists"),
        ("IGNORE", "ignore"),
    ],
)
def test_save_modes_are_normalised(word, mode):
    assert one(f"save {word} t as csv.`o`").mode == mode


def test_save_with_options_and_partitions_in_either_order():
    expected = Save("append", "db.t", "parquet", "/o", {"compression": "zstd"}, ["a", "b"])
    assert one('save append db.t as parquet.`/o` where compression="zstd" partitionBy a, b') == expected
    assert one("save append db.t as parquet.`/o` PARTITIONBY a,b options compression=zstd") == expected


def test_save_table_named_like_a_mode():
    assert one("save append as csv.`o`") == Save("errorIfExists", "append", "csv", "o", {}, [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("save overwrite", "save: expected a table name to save, found end of statement"),
        ("save t to csv.`o`", "save: expected 'as <format>.`<path>`' after the table name, found 'to'"),
        ("save t as csv.`o` extra", "save: expected 'where', 'partitionBy' or ';' after the path, found 'extra'"),
        ("save t as csv.`o` partitionBy", "save: expected a column name after 'partitionBy', found end of statement"),
        ("save t as csv.`o` partitionBy a partitionBy b", "save: 'partitionBy' is given twice"),
        ("save t as csv.`o` where a=1 where b=2", "save: 'where' is given twice"),
    ],
)
def test_save_errors(text, message):
    assert error(text).message == message


# -- select ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sql", "table"),
    [
        ("select * from t as output", "select * from t", "output"),
        ("select count(*) as n from t as output", "select count(*) as n from t", "output"),
        ("SELECT cast(x AS int) AS y FROM t AS Out", "SELECT cast(x AS int) AS y FROM t", "Out"),
        ("select 1\n  as\n  t", "select 1", "t"),
        ("select '${v}' as x, ${col} from ${tbl} as r", "select '${v}' as x, ${col} from ${tbl}", "r"),
    ],
)
def test_select_naming_its_result(text, sql, table):
    stmt = one(text + ";")
    assert stmt == Select(sql, table)
    assert stmt.kind == "select"
    assert stmt.text == text


@pytest.mark.parametrize(
    "text",
    [
        "select 1",
        "select a as b from t",
        "select cast(x as int)",
        "select (select 1 as x)",
        'select 1 as "quoted"',
        "select cast(1 as int))) as t",
    ],
)
def test_plain_select_is_sql(text):
    assert one(text) == Sql(text)


# -- register / unregister ---------------------------------------------------------------


def test_register_byzer_order_and_where_before_as():
    expected = Register("sklearn", "/m/model.pkl", "predict", {"workers": "2", "batch_size": "64"})
    text = 'register sklearn.`/m/model.pkl` as predict where workers="2" and batch_size=64'
    assert one(text) == expected
    assert one('register sklearn.`/m/model.pkl` where workers="2" and batch_size=64 as predict') == expected
    assert one(text).kind == "register"


def test_register_kind_kept_as_written_and_script_udf_code():
    stmt = one("register ScriptUDF.`` as plus1 where lang=\"python\" and code='''\ndef apply(x):\n    return x + 1\n'''")
    assert (stmt.model_kind, stmt.path, stmt.function) == ("ScriptUDF", "", "plus1")
    assert stmt.options == {"lang": "python", "code": "\ndef apply(x):\n    return x + 1\n"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("register Ray.`m` as", "register: expected a function name after 'as', found end of statement"),
        ("register Ray.`m` as 'f'", "register: expected a function name after 'as', found 'f'"),
        ("register Ray.`m` f", "register: expected 'as <function>' after the path, found 'f'"),
        ("register `m` as f", "register: expected <kind>.`<path or table>`, found `m`"),
        ("register Ray.`m` where a=1 as f where b=2", "register: 'where' is given twice"),
        ("register Ray.`m` as f g", "register: expected ';' after the function name, found 'g'"),
    ],
)
def test_register_errors(text, message):
    assert error(text).message == message


def test_unregister():
    assert one("UNREGISTER predict;") == Unregister("predict")
    assert error("unregister").message == "unregister: expected a function name, found end of statement"
    assert error("unregister a b").message == "unregister: expected ';' after the function name, found 'b'"


# -- set -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('set a = "x y"', Set("a", "x y", {})),
        ("set a='x;y'", Set("a", "x;y", {})),
        ("SET sql.dialect = '''spark'''", Set("sql.dialect", "spark", {})),
        ("set ray.address = auto", Set("ray.address", "auto", {})),
        ("set n = 10", Set("n", "10", {})),
        ('set q = `select 1` where type="sql"', Set("q", "select 1", {"type": "sql"})),
        ("set j = '''{\"a\": 1}\n{\"a\": 2}''' options type=text", Set("j", '{"a": 1}\n{"a": 2}', {"type": "text"})),
        ('set p = "${base}/x"', Set("p", "${base}/x", {})),
        ("set p = ${base}", Set("p", "${base}", {})),
    ],
)
def test_set_forms(text, expected):
    stmt = one(text)
    assert stmt == expected
    assert stmt.kind == "set"


def test_duckdb_set_forms_are_sql():
    for text in ("SET GLOBAL threads = 4", "set variable x = 1", "SET threads TO 4"):
        assert one(text) == Sql(text)


@pytest.mark.parametrize(
    ("text", "message", "line", "col"),
    [
        ("set a", "set: expected '=' after 'a', found end of statement", 1, 6),
        ('set a "v"', "set: expected '=' after 'a', found \"v\"", 1, 7),
        ("set a =;", "set: expected a value after 'a =', found end of statement", 1, 8),
        ("set a = ;\n", "set: expected a value after 'a =', found end of statement", 1, 8),
        ("set = 1", "set: expected a variable name, found '='", 1, 5),
        ("set a = '''x\nyy''' whre type=\"sql\"", "set: expected ';' after the value, found 'whre'", 2, 7),
    ],
)
def test_set_errors_point_where_something_was_expected(text, message, line, col):
    err = error(text)
    assert (err.message, err.line, err.col) == (message, line, col)


# -- commands and include ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('!python conf "runIn=driver"', Command("python", ["conf", "runIn=driver"])),
        ("!python env 'PYTHONPATH=/x'", Command("python", ["env", "PYTHONPATH=/x"])),
        ("!python conf runIn=driver", Command("python", ["conf", "runIn=driver"])),
        ("!workers", Command("workers", [])),
        ("!Models", Command("models", [])),
        ("!workers 4 '''a b'''", Command("workers", ["4", "a b"])),
    ],
)
def test_commands(text, expected):
    stmt = one(text + ";")
    assert stmt == expected
    assert stmt.kind == "command"


def test_command_without_a_name_is_an_error():
    err = error("!;")
    assert (err.message, err.col) == ("command: expected a command name after '!', found end of statement", 2)


def test_include():
    assert one("include local.`lib/common steps.sql`;") == Include("local", "lib/common steps.sql", {})
    assert one("include local.`x`").kind == "include"
    assert error("include local.`x` y").message == "include: expected ';' after the path, found 'y'"
    assert error('include local.`x` where a="1" y').message == "include: expected ';' after the options, found 'y'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Byzer's include page, with commented-out options inside the where clause.
        (
            'include lib.`github.com/allwefantasy/lib-core`\nwhere \n-- libMirror="gitee.com"\n-- force="true"\nalias="libCore";',
            Include("lib", "github.com/allwefantasy/lib-core", {"alias": "libCore"}),
        ),
        (
            'include lib.`github.com/allwefantasy/lib-core` where alias="libCore" and libDir="/opt/lib-core"',
            Include("lib", "github.com/allwefantasy/lib-core", {"alias": "libCore", "libDir": "/opt/lib-core"}),
        ),
        ("include local.`libCore.udf.hello`;", Include("local", "libCore.udf.hello", {})),
        ("include project.`src/algs/b.byzer`;", Include("project", "src/algs/b.byzer", {})),
        ("include local.`x.sql` options a=\"1\" and b='''2'''", Include("local", "x.sql", {"a": "1", "b": "2"})),
    ],
)
def test_include_forms(text, expected):
    stmt = one(text)
    assert stmt == expected
    assert stmt.kind == "include"


# -- run -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "run command as Ray.`` where inputTable=\"data\" and outputTable=\"data2\" and code='''\nx = 1\n'''",
            Run("command", "Ray", "", {"inputTable": "data", "outputTable": "data2", "code": "\nx = 1\n"}, ""),
        ),
        (
            'run data as TableRepartition.`` where partitionNum="2" as newdata',
            Run("data", "TableRepartition", "", {"partitionNum": "2"}, "newdata"),
        ),
        ("RUN data AS ShowTableExt.``", Run("data", "ShowTableExt", "", {}, "")),
        ("run data into SaveBinaryAsFile.`/tmp/out`", Run("data", "SaveBinaryAsFile", "/tmp/out", {}, "")),
        ("run `my data` as ET.`p` as `my out`", Run("my data", "ET", "p", {}, "my out")),
        ("run ${t} as ET.`p` as ${out}", Run("${t}", "ET", "p", {}, "${out}")),
        (
            "run command as Ray.`` where\nand inputTable=\"a\" and `config.x`='y' as b",
            Run("command", "Ray", "", {"inputTable": "a", "config.x": "y"}, "b"),
        ),
    ],
)
def test_run_forms(text, expected):
    stmt = one(text + ";")
    assert stmt == expected
    assert stmt.kind == "run"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("run", "run: expected a table name after 'run', found end of statement"),
        ("run data", "run: expected 'as <ET>.`<path>`' after the table name, found end of statement"),
        ("run data as Ray", "run: expected <ET>.`<path>`, found end of statement"),
        ("run data as Ray.`` as", "run: expected an output table name after 'as', found end of statement"),
        ("run data as Ray.`` x", "run: expected ';' after the path, found 'x'"),
        ('run data as Ray.`` where a="1" x', "run: expected ';' after the options, found 'x'"),
        ("run data as Ray.`` as a b", "run: expected ';' after the output table, found 'b'"),
    ],
)
def test_run_errors(text, message):
    assert error(text).message == message


# -- Byzer's optional `where` before `and` -----------------------------------------------


def test_where_may_be_followed_directly_by_and():
    # Byzer's Python UDF page: `WHERE` ends a line, every option follows on an `and` line.
    stmt = one(
        'REGISTER ScriptUDF.`` AS echoFun WHERE\nand lang="python"\nand dataType="map(string,string)"\n'
        "and code='''\ndef apply(self,m):\n    return m\n ''';"
    )
    assert stmt == Register(
        "ScriptUDF",
        "",
        "echoFun",
        {"lang": "python", "dataType": "map(string,string)", "code": "\ndef apply(self,m):\n    return m\n "},
    )
    assert one('load csv.`p` where and header="true" as t') == Load("csv", "p", {"header": "true"}, "t")
    assert one('set a = "b" options and type="text"') == Set("a", "b", {"type": "text"})


def test_options_may_start_with_and_without_where():
    # Byzer's delta page: `save append t as delta.`p` and idCols="id"`.
    stmt = one('save append orginal_text_corpus\nas delta.`/tmp/delta/table10`\nand idCols="id";')
    assert stmt == Save("append", "orginal_text_corpus", "delta", "/tmp/delta/table10", {"idCols": "id"}, [])
    assert one("load csv.`p` and fs.s3a.region='eu' as t") == Load("csv", "p", {"fs.s3a.region": "eu"}, "t")
    assert one("save t as csv.`o` and `a.b`='1' partitionBy c").options == {"a.b": "1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("load csv.`p` and as t", "load: expected 'as <table>' after the path, found 'and'"),
        ("load csv.`p` and x as t", "load: expected 'as <table>' after the path, found 'and'"),
        ("load csv.`p` where and as t", "load: expected an option name after 'and', found 'as'"),
        ('save t as csv.`o` and a="1" where b="2"', "save: 'where' is given twice"),
    ],
)
def test_optional_where_errors(text, message):
    assert error(text).message == message


# -- backquoted and ${var} table names -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("select 1 as a as `my view`", Select("select 1 as a", "my view")),
        ('select "hello William" as title \nas `${hello}`', Select('select "hello William" as title', "${hello}")),
        ("select 1 as a as ${hello}", Select("select 1 as a", "${hello}")),
        ("select * from ${tbl} as `out`", Select("select * from ${tbl}", "out")),
        ("load csv.`x.csv` as `my table`", Load("csv", "x.csv", {}, "my table")),
        ("load csv.`x.csv` as ${name}", Load("csv", "x.csv", {}, "${name}")),
        ("save overwrite `my table` as csv.`o`", Save("overwrite", "my table", "csv", "o", {}, [])),
        ("save `${t}` as csv.`o`", Save("errorIfExists", "${t}", "csv", "o", {}, [])),
    ],
)
def test_backquoted_and_variable_table_names(text, expected):
    assert one(text + ";") == expected


@pytest.mark.parametrize(
    "text",
    ["select * from ${tbl}", "select 1 as }", "select a as x}", "select {'a': 1} as s from t}", "select 1 as 'x'"],
)
def test_select_ending_in_something_else_is_sql(text):
    assert one(text) == Sql(text)


# -- Byzer's other forms through the tokenizer ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('!python conf "schema=st(field(a,long))"', Command("python", ["conf", "schema=st(field(a,long))"])),
        ("!ray on t '''\nprint('x; y')\n''' named out", Command("ray", ["on", "t", "\nprint('x; y')\n", "named", "out"])),
        ("!hdfs -ls /tmp", Command("hdfs", ["-ls", "/tmp"])),
        ("!hdfs -cp /tmp/a.txt /tmp/b-1.txt", Command("hdfs", ["-cp", "/tmp/a.txt", "/tmp/b-1.txt"])),
        ("!show tables", Command("show", ["tables"])),
        ("!delta show tables", Command("delta", ["show", "tables"])),
        ("!delta history demo.table1", Command("delta", ["history", "demo.table1"])),
        ("!if ''' :inModule == \"true\" '''", Command("if", [' :inModule == "true" '])),
        (
            "!pyInclude local 'github.com/a/lib-core.alg.xgboost.py' named rawXgboost",
            Command("pyinclude", ["local", "github.com/a/lib-core.alg.xgboost.py", "named", "rawXgboost"]),
        ),
        ("!desc `my table`", Command("desc", ["my table"])),
    ],
)
def test_byzer_commands(text, expected):
    stmt = one(text + ";")
    assert stmt == expected


def test_byzer_script_with_comments_strings_and_blocks():
    script = r"""-- a comment; with a 'quote
/* a block
   comment; */
set a="b" where type="defaultParam";
set s = 'it''s; "fine"';
set d = "say \"hi\"; ok";
set code = '''x = "a'b"; y = 'c"d' -- not a comment''';
select '--', "/*" as t;
"""
    assert parse(script) == [
        Set("a", "b", {"type": "defaultParam"}),
        Set("s", 'it\'s; "fine"', {}),
        Set("d", r"say \"hi\"; ok", {}),
        Set("code", "x = \"a'b\"; y = 'c\"d' -- not a comment", {}),
        Select("select '--', \"/*\"", "t"),
    ]


# -- pass-through SQL ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "create table t as select 1 as a",
        "COPY t TO 'out.csv' (HEADER, DELIMITER ';')",
        "with x as (select 1) select * from x",
        "insert into t values ('a;b', \"c\")",
        "pragma table_info('t')",
        "describe t",
        "explain select 1",
        "drop view if exists ${name}",
        "(select 1) union (select 2)",
    ],
)
def test_other_statements_pass_through_unchanged(text):
    stmt = one(text + " ;")
    assert stmt == Sql(text)
    assert stmt.kind == "sql"


# -- whole scripts -----------------------------------------------------------------------


def test_byzer_example():
    statements = parse(BYZER)
    assert [s.kind for s in statements] == [
        "command", "set", "load", "register", "load", "select", "select",
    ]
    command, set_, load, register, _, sample, output = statements
    assert command == Command("python", ["conf", "runIn=driver"])
    assert set_ == Set("sql.dialect", "spark", {})
    assert load == Load("parquet", "/data/models/clf_table", {}, "clf_model")
    assert (register.model_kind, register.path, register.function) == ("Ray", "clf_model", "clf_predict")
    assert register.options["maxConcurrency"] == "2"
    code = register.options["registerCode"]
    assert code.startswith("\nimport numpy as np\n") and code.endswith("predict_func)\n")
    assert 'context.conf.get("rayAddress")' in code
    assert sample == Select(
        "select id, cast(pixels as array<double>) as pixels from digits limit 100", "sample"
    )
    assert output == Select("select id, clf_predict(array(pixels)) as predicted from sample", "output")
    assert [s.line for s in statements] == [1, 2, 3, 4, 14, 15, 16]


def test_registercode_with_semicolons_quotes_and_hash_comments():
    script = (
        "register Ray.`m` as f where registerCode='''\n"
        "# a comment; with 'quotes' and \"more\" -- and dashes /* and stars\n"
        "x = 1; y = \"a;b\"\n"
        "''';\nselect f(x) from t as output;"
    )
    register, select = parse(script)
    assert register.options["registerCode"].count(";") == 3
    assert select == Select("select f(x) from t", "output")
    assert (select.line, select.col) == (5, 1)


def test_error_on_line_three_and_source_name():
    err = error("select 1;\n-- fine\nload csv.`x` as t extra;", source_name="cell[2]")
    assert (err.line, err.col, err.source_line) == (3, 19, "load csv.`x` as t extra;")
    assert str(err).startswith("cell[2]: line 3, col 19: load:")
    assert err.highlight().splitlines()[-1] == "  " + " " * 18 + "^"


def test_first_error_in_the_script_wins_before_anything_runs():
    err = error("load csv.`x` ass t;\nselect 'never closed")
    assert (err.line, err.message) == (1, "load: expected 'as <table>' after the path, found 'ass'")


def test_every_statement_class_has_a_distinct_kind():
    kinds = [cls.kind for cls in STATEMENT_TYPES]
    assert sorted(kinds) == sorted(set(kinds))
    assert set(kinds) == {
        "load", "save", "select", "register", "unregister", "set", "command", "include", "run", "sql",
    }


# -- properties ------------------------------------------------------------------------

_PIECES = [
    "'", '"', "`", ";", "-", "/", "*", "!", "(", ")", "'''", "--", "/*", "*/", "\n", " ",
    "=", ".", ",", "$", "{", "}", "\\", "${a}", "`p`", '"v"', "'w'", "'''t'''", "1", "x",
    "load", "save", "select", "register", "unregister", "set", "include", "as", "where",
    "options", "and", "partitionBy", "overwrite", "csv", "Ray", "to", "global", "run", "into",
]
_SCRIPTS = st.lists(st.sampled_from(_PIECES) | st.text(max_size=3), max_size=40).map("".join)


def _check_never_crashes(text: str) -> None:
    try:
        statements = parse(text)
    except ParseError as err:
        assert err.line >= 1 and err.col >= 1
        return
    lines = text.split("\n")
    for stmt in statements:
        # Each statement's text starts exactly at its reported line and column.
        offset = sum(len(line) + 1 for line in lines[: stmt.line - 1]) + stmt.col - 1
        assert stmt.text and text[offset:].startswith(stmt.text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_parses_or_raises_parse_error(text):
    _check_never_crashes(text)


@settings(max_examples=300, deadline=None)
@given(_SCRIPTS)
def test_language_soup_parses_or_raises_parse_error(text):
    _check_never_crashes(text)
