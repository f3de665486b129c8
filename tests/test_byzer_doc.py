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
