"""Byzer-python: `run command as Ray`, the pyjava API on a real Ray, output schemas, and the
seed script from training to scoring (Delta lake in between)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sql_magics import ExecutionError, Session
from sql_magics.front.demo import write_mnist_like

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def s(ray_cluster, tmp_path):
    with Session() as session:
        session.sql(f'set lake.root = "{tmp_path / "lake"}"')
        yield session


@pytest.fixture
def numbers(tmp_path) -> Path:
    """10,000 rows (i, x, tags) in one Parquet file: several blocks for 4 CPUs."""
    path = tmp_path / "numbers.parquet"
    i = np.arange(10_000)
    pq.write_table(pa.table({"i": i, "x": i * 0.5, "tags": [[int(v), int(v) % 7] for v in i]}), path)
    return path


def run(code: str, *, input_table: str = "numbers", output: str = "out") -> str:
    return f"run command as Ray.`` where inputTable=\"{input_table}\" and outputTable=\"{output}\" and code='''\n{code}\n''';"


def test_seed_script_trains_on_ray_saves_to_the_lake_and_scores(s, tmp_path):
    script = (EXAMPLES / "byzer_train_to_score.sql").read_text()
    mnist = write_mnist_like(tmp_path / "mnist")
    script = script.replace('"demo_data/data/mnist"', f'"{mnist}"').replace('"demo_data/lake"', f'"{tmp_path / "lake"}"')
    frame = s.sql(script)
    assert len(frame) == 100
    predicted = np.array([p[0][0] for p in frame["predicted"]])  # MLSQL's DOUBLE[][]: [[class]] per row
    assert (predicted == frame["label"].to_numpy()).mean() >= 0.5  # 6 epochs on 1,797 images: far above chance (0.1)

    # The same model, read back from the lake and run in this process, gives the same classes.
    import deltalake

    from udf_engine.models.loaders import UDFBuildInFunc

    chunks = deltalake.DeltaTable(str(tmp_path / "lake" / "ai_model" / "mnist_model")).to_pyarrow_table().to_pylist()
    model = UDFBuildInFunc.init_tf(chunks, {})
    images = np.array(s.sql("select image from new_mnist_data")["image"].tolist())
    np.testing.assert_array_equal(predicted, model.predict(images).argmax(axis=1))

    tables = s.sql("!delta show tables")
    assert ("ai_model", "mnist_model") in set(zip(tables["database"], tables["table"], strict=True))
    chunks = s.sql("select sum(offset) as bytes, count(*) as n, min(start) as first from mnist_model")
    assert chunks["first"][0] == 0 and chunks["n"][0] >= 1
    assert s.functions["model_predict"].kind == "Ray"


def test_collect_to_pandas_and_data_servers_see_every_row_once(s, numbers):
    s.sql(f"load parquet.`{numbers}` as numbers")
    code = """
import ray
from pyjava.api.mlsql import RayContext
ray_context = RayContext.connect(globals(), None)
servers = ray_context.data_servers()

@ray.remote
def block_sum(server):
    rows = list(RayContext.collect_from([server]))
    return len(rows), sum(r["i"] for r in rows), sum(r["tags"][1] for r in rows)

parts = ray.get([block_sum.remote(server) for server in servers])
collected = list(ray_context.collect())
frame = ray_context.to_pandas()
context.build_result([{
    "blocks": len(servers),
    "rows": sum(p[0] for p in parts), "isum": sum(p[1] for p in parts), "tagsum": sum(p[2] for p in parts),
    "collected": len(collected), "pandas_x": float(frame["x"].sum()),
    "all_from": sum(1 for _ in RayContext.collect_from(servers)),
}])
"""
    frame = s.sql(run(code) + "select * from out")
    row = frame.iloc[0]
    i = np.arange(10_000)
    assert row["blocks"] > 1
    assert (row["rows"], row["isum"], row["tagsum"]) == (10_000, i.sum(), (i % 7).sum())
    assert (row["collected"], row["all_from"], row["pandas_x"]) == (10_000, 10_000, (i * 0.5).sum())


def test_foreach_and_map_iter_run_in_ray_tasks_and_make_the_output(s, numbers):
    s.sql(f'load parquet.`{numbers}` as numbers; !python conf "schema=st(field(i,long),field(y,double),field(pid,long))"')
    foreach = """
import os
from pyjava.api.mlsql import RayContext
ray_context = RayContext.connect(globals(), None)
def echo(row):
    if row["i"] % 10 == 3:
        return None  # a row function may drop rows
    return {"i": row["i"], "y": row["x"] * 2, "pid": os.getpid()}
ray_context.foreach(echo)
"""
    map_iter = """
import os
from pyjava.api.mlsql import RayContext
ray_context = RayContext.connect(globals(), None)
def pairs(rows):
    pid = os.getpid()
    for row in rows:
        yield {"i": row["i"], "y": row["x"] + 1, "pid": pid}
        yield {"i": -row["i"], "y": 0.0, "pid": pid}
ray_context.map_iter(pairs)
"""
    s.sql(run(foreach, output="each") + run(map_iter, output="iter"))
    each = s.sql("select i, y, pid from each order by i")
    expected = np.array([i for i in range(10_000) if i % 10 != 3])
    assert each["i"].tolist() == expected.tolist() and np.allclose(each["y"], expected.astype(float))
    assert os.getpid() not in set(each["pid"])  # on Ray's worker processes, not in this one
    it = s.sql("select count(*) as n, sum(i) as total, count(distinct i) as distinct_i, sum(y) as y from iter").iloc[0]
    assert (it["n"], it["total"], it["distinct_i"]) == (20_000, 0, 19_999)  # +i and -i, 0 twice
    assert it["y"] == pytest.approx(np.arange(10_000).sum() * 0.5 + 10_000)
    assert s.sql("select typeof(i) as t, typeof(y) as u from each limit 1").iloc[0].tolist() == ["BIGINT", "DOUBLE"]


def test_schemas_type_the_output_and_a_bad_row_is_named(s):
    code = """
context.build_result([
    {"a": 1, "b": [1.5, 2.0], "m": {"k": 2}, "st": {"x": "p", "y": [1, 2]}},
    {"a": 2, "b": [], "m": {}, "st": {"x": "q", "y": []}},
])
"""
    frame = s.sql(
        '!python conf "schema=st(field(a,long),field(b,array(double)),field(m,map(string,long)),'
        'field(st,st(field(x,string),field(y,array(integer)))))";'
        + run(code, input_table="command")
        + "select typeof(a) as a, typeof(b) as b, typeof(m) as m, typeof(st) as st, (select sum(a) from out) as total from out limit 1"
    )
    assert frame.iloc[0].tolist() == ["BIGINT", "DOUBLE[]", "MAP(VARCHAR, BIGINT)", "STRUCT(x VARCHAR, y INTEGER[])", 3]

    bad = 'context.build_result([{"a": 1}, {"a": "seven"}])'
    with pytest.raises(ExecutionError, match=r'(?s)run bad_out.*"?a"?.*seven'):
        s.sql('!python conf "schema=st(field(a,long))";' + run(bad, input_table="command", output="bad_out"))
    assert s.sql("select count(*) as n from duckdb_tables() where table_name = 'bad_out'")["n"][0] == 0  # nothing half made


def test_inferred_schema_and_ddl_schema(s):
    code = 'context.build_result({"n": i, "name": f"r{i}", "v": [float(i)] * 2} for i in range(3))'
    frame = s.sql(run(code, input_table="command") + "select n, name, v from out order by n")
    assert frame["n"].tolist() == [0, 1, 2] and frame["name"].tolist() == ["r0", "r1", "r2"]
    s.sql('!python conf "schema=n bigint, name string, v array<float>";' + run(code, input_table="command", output="ddl"))
    types = s.sql("select typeof(n) as n, typeof(v) as v from ddl limit 1").iloc[0].tolist()
    assert types == ["BIGINT", "FLOAT[]"]


def test_code_errors_and_missing_result_are_clear(s):
    with pytest.raises(ExecutionError, match="code of run out failed: ZeroDivisionError"):
        s.sql(run("x = 1 / 0", input_table="command"))
    with pytest.raises(ExecutionError, match="gave no result"):
        s.sql(run("x = 1", input_table="command"))
    with pytest.raises(ExecutionError, match="input table 'nowhere' does not exist"):
        s.sql(run("x = 1", input_table="nowhere"))
    boom = """
from pyjava.api.mlsql import RayContext
def fail(row):
    raise ValueError(f"bad row {row['n']}")
RayContext.connect(globals(), None).foreach(fail)
"""
    s.sql("select 1 as n as one")
    with pytest.raises(ExecutionError, match="ValueError: bad row 1"):
        s.sql(run(boom, input_table="one"))


def test_connect_to_another_cluster_is_refused_while_on_this_one(s):
    code = 'from pyjava.api.mlsql import RayContext\nRayContext.connect(globals(), "10.255.255.1:6379")'
    with pytest.raises(ExecutionError, match="already runs on the Ray at"):
        s.sql(run(code, input_table="command"))


def test_tar_rows_of_a_keras_file_register_as_a_model(s, keras_model, tmp_path):
    from udf_engine.models.streaming_tar import build_rows_from_file

    model, path = keras_model
    pq.write_table(pa.Table.from_pylist(list(build_rows_from_file(path))), tmp_path / "chunks.parquet")
    s.sql(f"load parquet.`{tmp_path / 'chunks.parquet'}` as keras_chunks")
    s.register_model("chunk_predict", "keras_chunks", workers=1, num_cpus=0.5)
    try:
        x = np.random.default_rng(3).random((20, 64), dtype=np.float32)
        s.db.con.register("feat", pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)}))
        scored = np.array(s.sql("select chunk_predict(v) as p from feat")["p"].tolist())
        np.testing.assert_allclose(scored, model.predict(x, verbose=0), atol=1e-5)
    finally:
        s.unregister("chunk_predict")


def test_ray_command_short_form_and_table_repartition(s):
    s.sql("select range as n from range(5) as nums; run nums as TableRepartition.`` where partitionNum=\"2\" as nums2")
    frame = s.sql(
        "!ray on nums2 '''\ncontext.build_result({'n2': r['n'] * r['n']} for r in context.rayContext.collect())\n''' named sq;"
        "select list(n2 order by n2) as l from sq"
    )
    assert list(frame["l"][0]) == [0, 1, 4, 9, 16]


def test_python_cell_directives_and_env_note(s):
    s.sql("select 3 as a as src")
    result = s.run("#%python\n#%input=src\n#%schema=st(field(b,long))\n#%env=source activate dev\n"
                   "context.build_result([{'b': r['a'] + 1} for r in context.rayContext.collect()])")
    assert result.frame["b"].tolist() == [4]  # no #%output=: the result shows, as `output`
    assert any("#%env" in w and "ignored" in w for w in result.warnings)


def test_a_long_run_does_not_hold_the_session(s, tmp_path):
    import threading

    started, release = tmp_path / "started", tmp_path / "release"
    code = f"""
import pathlib, time
pathlib.Path({str(started)!r}).touch()
for _ in range(600):
    if pathlib.Path({str(release)!r}).exists():
        break
    time.sleep(0.05)
context.build_result([{{"done": 1}}])
"""
    errors: list[BaseException] = []

    def run_long():
        try:
            s.sql(run(code, input_table="command", output="slow"))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    runner = threading.Thread(target=run_long)
    runner.start()
    while not started.exists() and runner.is_alive():
        runner.join(0.05)
    answers: list = []
    other = threading.Thread(target=lambda: answers.append(s.sql("select 42 as x from range(1)")["x"][0]))
    other.start()
    other.join(20)
    finished_meanwhile = not other.is_alive()
    release.touch()
    runner.join(30)
    other.join(30)
    assert finished_meanwhile and answers == [42]  # another statement ran while the code was still running
    assert not errors and s.sql("select done from slow")["done"].tolist() == [1]


def test_no_rows_and_no_schema_is_a_clear_error(s):
    with pytest.raises(ExecutionError, match="gave no rows, so nothing says its columns"):
        s.sql(run("context.build_result([])", input_table="command", output="empty"))
    frame = s.sql('!python conf "schema=st(field(a,long))";' + run("context.build_result([])", input_table="command", output="empty")
                  + "select count(*) as n from empty")
    assert frame["n"][0] == 0
