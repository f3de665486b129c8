"""Byzer's own documentation parses: every fixture is a ```sql block of byzer-doc
(https://github.com/byzer-org/byzer-doc, en-us and zh-cn), copied unchanged under
tests/fixtures/byzer_doc/ with a first comment line naming its page.

The fixtures are the blocks whose statements are all of kinds this project reads (load,
save, select, set, register, include, run, unregister, ``!`` commands and plain SQL),
chosen for variety: each brings a format, ET, command, option form or quoting the others
lack. Left out:

- blocks that are not Byzer scripts: Python, Scala, shell, HTTP, JSON schemas, LLM chat
  prompts, MySQL/BigQuery statements, and fragments that start mid-statement (``and k=v``,
  ``...``);
- syntax templates with placeholders (extension/et/CustomFS.md, TableRepartition.md,
  extension/dev/et_command.md: ``[表名]``, ``<table_name>``, ``where ...``);
- blocks using train, predict or connect (Spark ML and Spark connections);
- blocks with typos Byzer's own parser rejects:
  - zh-cn/datasource/dw/delta_summary.md, sql block 1: ``save overwirte table1`` (misspelt mode);
  - zh-cn/datasource/dw/hive.md, sql block 2: ``load jdbc.`db1.table1` where ...`` without ``as <table>``;
  - zh-cn/python/etl.md, sql block 4: ``!python conf "schema=st(...`` never closes its string.

Pages that print a ``> `` prompt before each statement are copied without the prompt (their
first line says so). The blocks also run where they need nothing from outside: the examples
of the Python UDF, set and include pages run below on a real :class:`Session`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from deltalake import DeltaTable

from sql_magics import ExecutionError, Session
from sql_magics.language.parser import parse
from sql_magics.language.tokens import tokenize

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "byzer_doc").glob("*.sql"))
# Statements a Byzer reader knows by their first word, and DuckDB's own forms of two of them.
BYZER_WORDS = ("load", "save", "register", "run", "set", "include", "unregister")
_DUCKDB_SET = re.compile(r"^set\s+((global|session|local|variable)\s+\w|\S+\s+to\b)", re.IGNORECASE)
# A select naming its result: `... as <name>` at its very end (a word, `backquoted` or ${var}).
_NAMED_SELECT = re.compile(r"\bas\s+(\w+|`[^`]*`|\$\{[^}]*\})\s*$", re.IGNORECASE)


def expected_kind(text: str) -> str:
    """The kind a Byzer reader gives a statement, from its text alone."""
    if text.startswith("!"):
        return "command"
    first = text.split(None, 1)[0].lower()
    if first == "set" and _DUCKDB_SET.match(text):
        return "sql"
    if first == "load" and len(tokenize(text)) == 2:
        return "sql"  # DuckDB's `LOAD httpfs`
    if first in BYZER_WORDS:
        return first
    if first == "select" and _NAMED_SELECT.search(text):
        return "select"
    return "sql"


def test_there_are_fixtures_from_both_languages():
    names = [path.name for path in FIXTURES]
    assert len(names) >= 50
    assert any(name.startswith("en-us__") for name in names)
    assert any(name.startswith("zh-cn__") for name in names)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda path: path.stem)
def test_byzer_doc_block_parses_into_the_kinds_byzer_reads(path):
    text = path.read_text()
    assert text.startswith("-- byzer-doc: ")
    statements = parse(text, source_name=path.name)
    assert statements
    assert [s.kind for s in statements] == [expected_kind(s.text) for s in statements]
    for stmt in statements:
        if stmt.kind in ("load", "select"):
            assert stmt.table
        elif stmt.kind == "save":
            assert stmt.table and stmt.format
        elif stmt.kind == "register":
            assert stmt.model_kind and stmt.function
        elif stmt.kind == "run":
            assert stmt.table and stmt.et
        elif stmt.kind == "command":
            assert stmt.name


# -- examples of the pages that run without Spark ----------------------------------------------


def test_python_udf_page_example_runs():
    # zh-cn/transform/udf/extend_udf/python_udf.md: `WHERE` then `and`, dataType, apply(self, m).
    with Session(dialect="spark") as s:
        s.sql(
            """REGISTER ScriptUDF.`` AS echoFun WHERE
and lang="python"
and dataType="map(string,string)"
and code='''
def apply(self,m):
    return m
 ''';"""
        )
        assert s.functions["echoFun"].returns == "MAP(VARCHAR, VARCHAR)"
        frame = s.sql('SELECT echoFun(map("a","b")) AS res as output;')
        assert frame["res"].tolist() == [{"a": "b"}]


def test_script_udf_methods_share_self_and_return_dicts():
    with Session() as s:
        s.sql(
            """register ScriptUDF.`` as tag where lang="python" and dataType="map(string,array(string))" and code='''
def twice(self, v):
    return [v, v]

def apply(self, k, v):
    return {k: self.twice(v)}
''';"""
        )
        assert s.functions["tag"].returns == "MAP(VARCHAR, VARCHAR[])"
        assert s.sql("select tag('a', 'b') as m as output")["m"].tolist() == [{"a": ["b", "b"]}]
        with pytest.raises(ExecutionError, match="dataType 'nonsense<' is not a Spark SQL type"):
            s.sql("register ScriptUDF.`` as bad where dataType=\"nonsense<\" and code='''def apply(x): return x'''")


@pytest.mark.parametrize("name", ["`${hello}`", "${hello}", "`my view`"])
def test_set_page_example_names_a_table_with_a_variable(name):
    # zh-cn/grammar/set.md: `select ... as `${hello}`;` then `select * from world`.
    table = "`my view`" if name == "`my view`" else "world"
    with Session(dialect="spark") as s:
        frame = s.sql(
            f"""set hello="world";
select "hello William" as title
as {name};
select * from {table} as output;"""
        )
        assert frame.equals(pd.DataFrame({"title": ["hello William"]}))


def test_include_lib_is_refused_offline_unless_its_directory_is_named(tmp_path):
    include = 'include lib.`github.com/allwefantasy/lib-core` where alias="libCore"'
    with Session() as s:
        with pytest.raises(ExecutionError, match=r"include lib\.`github\.com/allwefantasy/lib-core`: not available offline"):
            s.sql(include)
        with pytest.raises(ExecutionError, match="libDir '/no/such/dir' is not a directory"):
            s.sql(include + ' and libDir="/no/such/dir"')


def test_include_lib_then_local_runs_the_libs_script(tmp_path):
    # zh-cn/grammar/include.md: `include lib` names the library, `include local.`libCore.udf.hello``
    # runs its udf/hello.mlsql, found by the alias or the library's full name.
    lib = tmp_path / "lib-core"
    (lib / "udf").mkdir(parents=True)
    (lib / "udf" / "hello.mlsql").write_text("select 'hello ' || '${who}' as greeting as output;")
    (lib / "udf" / "bye.byzer").write_text("select 'bye' as word as output;")
    with Session() as s:
        s.sql(f'include lib.`github.com/allwefantasy/lib-core`\nwhere\n-- force="true"\nalias="libCore" and libDir="{lib}";')
        frame = s.sql('include local.`libCore.udf.hello` where who="you";')
        assert frame["greeting"].tolist() == ["hello you"]
        assert s.sql("include local.`github.com/allwefantasy/lib-core.udf.bye.byzer`;")["word"].tolist() == ["bye"]
    project = tmp_path / "src"
    project.mkdir()
    (project / "b.byzer").write_text("select 2 as n as output;")
    with Session() as s:
        assert s.sql("include project.`src/b.byzer`;", base_dir=tmp_path)["n"].tolist() == [2]


# -- the streaming pages' examples: trigger="once" and temporary paths, mockStream for Kafka -----


def stream_fixture(name: str, tmp_path: Path, paths: dict[str, str]) -> str:
    """A stream example of byzer-doc, run once over what its source has (``trigger="once"``) and
    writing to temporary directories instead of its /tmp paths."""
    text = (FIXTURES[0].parent / name).read_text()
    for path, new_name in paths.items():
        assert path in text
        text = text.replace(path, str(tmp_path / new_name))
    return re.sub(r"\band checkpointLocation=", 'and trigger="once" and checkpointLocation=', text)


def test_query_kafka_page_mock_stream_example_prints_every_row_once(tmp_path, capsys):
    script = stream_fixture("zh-cn__streaming__query_kafka__5.sql", tmp_path, {"/tmp/cpl3": "cpl3"})
    with Session() as s:
        result = s.run(script)
    printed = capsys.readouterr().out
    assert "ran once" in result.notice and "Batch: 0" in printed
    rows = re.findall(r"^\s*(\w)\s+(\w)\s+(\w)\s+\{'key': 'yes'", printed, re.MULTILINE)
    assert sorted(rows) == sorted([tuple(v) for v in ("abc", "dfe", "kdj", "mdz", "odd", "mmm")])


def test_delta_page_mock_stream_into_rate_partitioned_by_key(tmp_path):
    data = (FIXTURES[0].parent / "zh-cn__save_data__dw__delta__6.sql").read_text()
    stream = stream_fixture(
        "zh-cn__save_data__dw__delta__7.sql", tmp_path, {"/tmp/delta/rate-1-table": "rate-1-table", "/tmp/rate-1": "rate-1"}
    )
    with Session() as s:
        s.run(data + "\n" + stream)
    table = DeltaTable(str(tmp_path / "rate-1-table"))
    assert sorted(table.to_pandas()["offset"]) == [0, 1, 2, 3, 4, 5]
    assert table.metadata().partition_columns == ["key"]


def test_delta_page_kafka_stream_upserts_on_its_id_cols_with_mock_stream_for_kafka(tmp_path):
    block = stream_fixture("zh-cn__save_data__dw__delta__4.sql", tmp_path, {"/tmp/delta/wow-0": "wow-0", "/tmp/s-cpl6": "s-cpl6"})
    with Session() as s, pytest.raises(ExecutionError, match="Kafka is not available here"):
        s.run(block.replace("!kafkaTool", "-- !kafkaTool"))  # no broker here: the page's Kafka load is refused, naming why
    # The rows its block 3 writes to Kafka, twice (x, y the same): the upsert keeps one.
    mocked = """set abc='''
{ "x": 100, "y": 201, "z": 204 ,"dataType":"A group"}
{ "x": 100, "y": 201, "z": 205 ,"dataType":"A group"}
''';
load jsonStr.`abc` as table1;
"""
    kafka_load = re.search(r"load kafka\.`wow` options.*?as newkafkatable1;", block, re.DOTALL).group(0)
    script = block.replace("!kafkaTool", "-- !kafkaTool").replace(
        kafka_load, 'load mockStream.`table1` options stepSizeRange="1-1" as newkafkatable1;'
    )
    with Session() as s:
        s.run(mocked + script)
    rows = DeltaTable(str(tmp_path / "wow-0")).to_pandas()
    assert rows[["x", "y", "z"]].values.tolist() == [[100, 201, 205]]
