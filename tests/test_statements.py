"""The statement language run by Session.sql: every statement form against real DuckDB and Ray."""

from __future__ import annotations

import json

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sql_magics import ExecutionError, ParseError, Session
from sql_magics.commands import MODEL_COLUMNS

from conftest import WORKER_CPUS, named_actors


@pytest.fixture
def s(ray_cluster):
    """A fresh session per test, so variables and views never leak between tests."""
    with Session() as session:
        yield session


# -- load ----------------------------------------------------------------------------------


def test_load_parquet_glob_and_directory(s, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"i": [i, i + 10]}), folder / f"p{i}.parquet")
    frame = s.sql(
        f"load parquet.`{folder}/*.parquet` as g; load parquet.`{folder}` as d; "
        "select (select count(*) from g) as g, (select count(*) from d) as d from range(1)"
    )
    assert (frame["g"][0], frame["d"][0]) == (6, 6)


def test_load_csv_with_options_and_a_path_with_spaces(s, tmp_path):
    path = tmp_path / "my data.csv"
    path.write_text("a;b\n1;x\n2;y\n")
    frame = s.sql(f'load csv.`{path}` where header="true" and delimiter=";" as t; select * from t order by a')
    assert frame.to_dict("list") == {"a": [1, 2], "b": ["x", "y"]}


def test_load_json_and_json_string(s, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("\n".join(json.dumps({"k": i, "v": f"s{i}"}) for i in range(3)))
    frame = s.sql(
        f"""load json.`{path}` as j;
        set lines = '''{{"k": 7, "v": "a;b"}}
{{"k": 8, "v": "c"}}''';
        load jsonStr.`lines` as js;
        select (select sum(k) from j) as j, (select list(v order by k) from js) as js from range(1)"""
    )
    assert frame["j"][0] == 3 and list(frame["js"][0]) == ["a;b", "c"]


def test_load_a_duckdb_table_and_unknown_format(s):
    s.sql("create table base as select 5 as x")
    assert s.sql("load table.`base` as alias; select x from alias")["x"][0] == 5
    with pytest.raises(ExecutionError, match=r"line 1: load: format 'hive' is not supported"):
        s.sql("load hive.`db.x` as t")


# -- select ----------------------------------------------------------------------------


def test_named_select_is_a_view_and_output_is_shown(s):
    frame = s.sql("select range as i from range(4) as nums; select sum(i) as total from nums as output; create view v as select 1")
    assert frame["total"].tolist() == [6]  # `as output` yields rows; the view after it yields none
    assert s.sql("select range as i from range(2) as nums2") is None  # only `as output` shows rows
    kinds = s.con.execute("select table_name, table_type from information_schema.tables order by 1").fetchall()
    assert ("nums", "VIEW") in kinds and ("nums2", "VIEW") in kinds


def test_plain_duckdb_passes_through_and_select_alias_is_not_a_name(s):
    frame = s.sql("create table t as select 1 as a; select a as b from t")
    assert list(frame.columns) == ["b"]
    kept = s.sql("select 1 as x from range(1); create table u as select 2 as y")  # DDL yields no rows
    assert kept.to_dict("list") == {"x": [1]}


# -- set and ${var} -----------------------------------------------------------------------


def test_variables_in_sql_and_options_and_types(s, tmp_path):
    path = tmp_path / "v.csv"
    path.write_text("a|b\n1|2\n")
    frame = s.sql(
        f"""set sep = "|";
        set dir = "{tmp_path}";
        set n = `select 40 + 2` where type="sql";
        set who = "echo shell-value" where type="shell";
        load csv.`${{dir}}/v.csv` where delimiter="${{sep}}" and header="true" as t;
        select a + b as s, ${{n}} as n, '${{who}}' as who from t as output"""
    )
    assert frame.to_dict("records") == [{"s": 3, "n": 42, "who": "shell-value"}]


def test_set_types_are_read_whatever_their_case(s):
    s.sql('set kept = "given"; set kept = "default" where type="DEFAULTPARAM"; set fresh = "default" where type="defaultparam"')
    assert s.sql("select '${kept}' as kept, '${fresh}' as fresh as output").to_dict("records") == [{"kept": "given", "fresh": "default"}]
    with pytest.raises(ExecutionError, match=r"set x: type 'bash' is not supported \(supported: text, sql, shell, conf, defaultParam\)"):
        s.sql('set x = "1" where type="bash"')


def test_unknown_variable_names_it_and_the_line(s):
    with pytest.raises(ExecutionError, match=r"line 2: unknown variable \$\{nope\}"):
        s.sql("select 1;\nselect ${nope}")


def test_set_forwards_duckdb_settings(s):
    s.sql("set threads = 3")
    assert s.sql("select current_setting('threads') as t from range(1)")["t"][0] == 3


# -- spark dialect --------------------------------------------------------------------------


def test_spark_dialect_translates_selects(s):
    frame = s.sql(
        """set sql.dialect = "spark";
        select cast(array(1, 2) as array<double>) as xs, array(3) as ys, nvl(null, 'd') as d as output"""
    )
    assert list(frame["xs"][0]) == [1.0, 2.0] and list(frame["ys"][0]) == [3] and frame["d"][0] == "d"
    assert Session(dialect="spark").state.dialect == "spark"
    with pytest.raises(ExecutionError, match="sql.dialect"):
        s.sql('set sql.dialect = "oracle"')


# -- save -------------------------------------------------------------------------------------


def test_save_modes(s, tmp_path):
    out = tmp_path / "out.parquet"
    s.sql("select range as i from range(3) as t")
    s.sql(f"save t as parquet.`{out}`")
    with pytest.raises(ExecutionError, match="already exists"):
        s.sql(f"save errorIfExists t as parquet.`{out}`")
    s.sql(f"save ignore t as parquet.`{out}`")
    s.sql(f"save append t as parquet.`{out}`")
    assert pq.read_table(out).num_rows == 6
    s.sql(f"save overwrite t as parquet.`{out}`")
    assert sorted(pq.read_table(out)["i"].to_pylist()) == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]  # no temporary left behind


def test_save_partitioned_csv_and_table(s, tmp_path):
    s.sql("select range as i, range % 2 as part from range(6) as t")
    s.sql(f"save overwrite t as parquet.`{tmp_path / 'parts'}` partitionBy part")
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part=0", "part=1"]
    s.sql(f"save overwrite t as parquet.`{tmp_path / 'parts'}` partitionBy part")  # overwrite a directory
    assert s.sql(f"select count(*) as n from read_parquet('{tmp_path}/parts/**/*.parquet')")["n"][0] == 6
    s.sql(f'save t as csv.`{tmp_path / "t.csv"}` where header="true"')
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "i,part"
    s.sql("save t as table.`kept`; save append t as table.`kept`")
    assert s.sql("select count(*) as n from kept")["n"][0] == 12


def test_append_to_directories(s, tmp_path):
    s.sql("select range as i, range % 2 as part from range(4) as t")
    s.sql(f"save t as parquet.`{tmp_path / 'parts'}` partitionBy part")
    s.sql(f"save append t as parquet.`{tmp_path / 'parts'}` partitionBy part")
    (tmp_path / "plain").mkdir()
    s.sql(f"save append t as parquet.`{tmp_path / 'plain'}`; save append t as parquet.`{tmp_path / 'plain'}`")
    counts = s.sql(
        f"""load parquet.`{tmp_path / 'parts'}` as parts; load parquet.`{tmp_path / 'plain'}` as plain;
        select (select count(*) from parts) as parts, (select count(*) from plain) as plain from range(1)"""
    )
    assert counts.to_dict("records") == [{"parts": 8, "plain": 8}]
    assert len(list((tmp_path / "plain").glob("part-*.parquet"))) == 2


def test_failing_overwrite_keeps_the_old_output(s, tmp_path):
    out = tmp_path / "keep.parquet"
    pq.write_table(pa.table({"v": [1, 2, 3]}), out)
    s.sql(
        """register ScriptUDF.`` as explode where lang="python" and returns="BIGINT" and code='''
def apply(x):
    if x == 5000:
        raise ValueError("boom at 5000")
    return x
'''"""
    )
    s.sql("select explode(range) as v from range(10000) as bad")
    with pytest.raises(ExecutionError, match="boom at 5000"):
        s.sql(f"save overwrite bad as parquet.`{out}`")
    assert pq.read_table(out)["v"].to_pylist() == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]


# -- register kinds -------------------------------------------------------------------------


def test_register_model_kinds_from_a_loaded_model_table(s, sklearn_model, digits, digits_parquet, tmp_path):
    from udf_engine import save_model

    model, path = sklearn_model
    table = save_model(path, tmp_path / "lr_table")
    frame = s.sql(
        f"""load parquet.`{table}` as lr_model;
        register sklearn.`lr_model` as lr where workers="1" and num_cpus="{WORKER_CPUS}" and method="predict_proba";
        select id, lr(pixels) as p from '{digits_parquet}' as output"""
    )
    np.testing.assert_allclose(np.stack(frame.sort_values("id")["p"]), model.predict_proba(digits[0]), atol=1e-6)
    with pytest.raises(ExecutionError, match="holds a pickle model, not keras"):
        s.sql(f"register keras.`{path}` as nope")
    with pytest.raises(ExecutionError, match="holds a pickle model, not onnx"):
        s.sql(f"register onnx.`{path}` as nope")
    with pytest.raises(ExecutionError, match=r"kind 'pmml' is not supported"):
        s.sql(f"register pmml.`{path}` as nope")


BYZER_SKLEARN = """!python conf "threshold=0.5";
load parquet.`{table}` as clf_model;
register Ray.`clf_model` as clf_predict where maxConcurrency="2" and num_cpus="{cpus}" and registerCode='''
import numpy as np
from pyjava.api.mlsql import RayContext
from pyjava.udf import UDFBuilder, UDFBuildInFunc
ray_context = RayContext.connect(globals(), context.conf.get("rayAddress"))
assert context.conf["threshold"] == "0.5" and context.conf["maxConcurrency"] == "2"
def predict_func(model, v):
    x = np.array([v]).reshape((1, 64))
    return {{"value": [[float(p) for p in model.predict(x)]]}}
UDFBuilder.build(ray_context, UDFBuildInFunc.init_pickle, predict_func)
''' and predictCode='''
UDFBuilder.apply(ray_context)
''';
set sql.dialect = "spark";
load parquet.`{data}` as digits;
select id, cast(pixels as array<double>) as pixels from digits order by id limit 100 as sample;
select id, clf_predict(array(pixels)) as predicted from sample as output;
"""


def test_register_ray_with_pyjava_names_row_by_row(s, sklearn_model, digits, digits_parquet, tmp_path):
    from udf_engine import save_model

    model, path = sklearn_model
    table = save_model(path, tmp_path / "clf_table")
    script = BYZER_SKLEARN.format(table=table, cpus=WORKER_CPUS, data=digits_parquet)
    frame = s.sql(script).sort_values("id")
    assert s.functions["clf_predict"].returns == "DOUBLE[][]"
    expected = model.predict(digits[0][:100].astype(np.float64))
    assert [row[0][0] for row in frame["predicted"]] == list(expected.astype(float))

    workers = s.sql("!workers")
    assert len(workers) == 2 and workers["rows"].sum() == 100  # every row scored exactly once
    assert "pyjava" not in __import__("sys").modules  # the alias lives only while registerCode runs


def test_python_env_reaches_the_workers(s, model_dir):
    path = model_dir / "none.pkl"
    path.write_bytes(cloudpickle.dumps(None))
    frame = s.sql(
        f"""!python env "RAYUDF_PROBE=hello";
        register Ray.`{path}` as env_of where num_cpus="{WORKER_CPUS}" and workers="1" and returns="VARCHAR" and registerCode='''
import os
from pyjava.udf import UDFBuilder
UDFBuilder.build(context, lambda refs, conf: None, lambda model, v: {{"value": os.environ.get("RAYUDF_PROBE")}})
''';
        select env_of(1) as e from range(1)"""
    )
    assert frame["e"][0] == "hello"


def test_script_udf_row_wise_and_vectorized(s):
    s.sql(
        """register ScriptUDF.`` as plus where lang="python" and returns="BIGINT" and code='''def apply(a, b): return a + b''';
        register ScriptUDF.`` as scaled where lang="python" and udfType="vectorized" and returnType="double" and code='''
import numpy as np
def apply(a):
    return np.asarray(a) * 2.5
'''"""
    )
    frame = s.sql("select plus(i, 10) as p, scaled(i) as v from range(3) t(i) order by i")
    assert frame.to_dict("list") == {"p": [10, 11, 12], "v": [0.0, 2.5, 5.0]}
    with pytest.raises(ExecutionError, match="declare the result type"):
        s.sql("register ScriptUDF.`` as untyped where code='''def apply(a): return a'''")
    with pytest.raises(ExecutionError, match="lang 'scala' is not supported"):
        s.sql("register ScriptUDF.`` as sc where lang=\"scala\" and returns=\"INT\" and code='''x'''")


def test_unregister_stops_workers_and_removes_the_function(s, sklearn_model):
    _, path = sklearn_model
    s.sql(f'register model.`{path}` as gone where workers="1" and num_cpus="{WORKER_CPUS}"')
    assert len(named_actors(s.registry.actor_prefix("gone"), timeout_s=0)) == 2
    s.sql("unregister gone")
    assert named_actors(s.registry.actor_prefix("gone")) == []
    with pytest.raises(ExecutionError, match="gone"):
        s.sql("select gone(1.0)")
    models = s.sql("!models")
    assert "gone" not in set(models["function"])


# -- commands and include --------------------------------------------------------------------


def test_commands(s):
    s.sql('!python conf "a=1"; !python env "B=2"')
    assert s.state.python_conf == {"a": "1"} and s.state.python_env == {"B": "2"}
    assert list(s.sql("!models").columns) == MODEL_COLUMNS
    with pytest.raises(ExecutionError, match=r"!nope: unknown command"):
        s.sql("!nope")
    with pytest.raises(ExecutionError, match=r"usage: !python conf"):
        s.sql("!python conf broken")


def test_include_is_relative_to_the_including_file(s, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "inner.sql").write_text('set greeting = "hi";\nselect 7 as seven as inner_t;')
    (tmp_path / "main.sql").write_text("include local.`lib/inner.sql`;\nselect '${greeting}' as g, seven from inner_t as output;")
    frame = s.sql((tmp_path / "main.sql").read_text(), base_dir=tmp_path)
    assert frame.to_dict("records") == [{"g": "hi", "seven": 7}]

    (tmp_path / "loop.sql").write_text("include local.`loop.sql`;")
    with pytest.raises(ExecutionError, match="includes itself"):
        s.sql("include local.`loop.sql`", base_dir=tmp_path)
    (tmp_path / "broken.sql").write_text("select 1;\nload csv.`x` ass t;")
    with pytest.raises(ParseError) as err:
        s.sql("include local.`broken.sql`", base_dir=tmp_path)
    assert (err.value.line, err.value.source_name) == (2, str(tmp_path / "broken.sql"))


# -- errors ------------------------------------------------------------------------------------


def test_a_parse_error_runs_nothing(s):
    with pytest.raises(ParseError) as err:
        s.sql("create table made as select 1;\nsave overwrite made as;")
    assert err.value.line == 2
    assert not s.con.execute("select * from duckdb_tables() where table_name = 'made'").fetchall()


def test_execution_errors_name_the_line(s):
    with pytest.raises(ExecutionError, match=r"^line 3: .*no_such_table"):
        s.sql("select 1;\nselect 2;\nselect * from no_such_table")
    with pytest.raises(ExecutionError, match=r"unknown variable"):
        s.sql("register Ray.`` as f where registerCode='''x = ${missing}'''")
    with pytest.raises(ExecutionError, match=r"registerCode of f failed: NameError"):
        s.sql("register Ray.`` as f where registerCode='''undefined_name'''")
    with pytest.raises(ExecutionError, match=r"did not call UDFBuilder.build"):
        s.sql("register Ray.`` as f where registerCode='''x = 1'''")


BYZER_ML_STATEMENTS = [
    "train data as RandomForest.`/tmp/m` where keepVersion='true'",
    "run data as DataSummary.`` as t",
    "predict data as RandomForest.`/tmp/m` as p",
]


@pytest.mark.parametrize("statement", BYZER_ML_STATEMENTS)
def test_spark_ml_statements_are_refused(s, statement):
    word = statement.split()[0]
    with pytest.raises(ExecutionError, match=rf"line 1: {word}[: ].*not supported"):
        s.sql(statement)


def test_parse_returns_statement_kinds(s):
    kinds = [st.kind for st in s.parse("load csv.`a` as a; select 1 as b; save b as csv.`c`; set x = '1'; !models; copy b to 'x.csv'")]
    assert kinds == ["load", "select", "save", "set", "command", "sql"]


def test_dataframe_parameters_are_bound(s):
    params = {"name": "O'Brien", "count": 41, "count2": 0}
    frame = s.sql("select $name as n, $count + 1 as c from range(1)", parameters=params)
    assert frame.to_dict("records") == [{"n": "O'Brien", "c": 42}]
    named = s.sql("select $count as c from range(3) as counted; select sum(c) as total from counted as output", parameters=params)
    assert named["total"][0] == 123
