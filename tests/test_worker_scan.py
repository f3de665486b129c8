"""Scans on the workers: queries over Parquet files read and score their rows where the model is.

Every shape is checked three ways: ``!plan`` says which path it takes, the rows equal the
driver path's (``set worker_scan = "off"``) exactly, and the scores equal the model called
in-process on the same rows. Models are plain cloudpickled Python.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sql_magics import ExecutionError

from conftest import Weighted, random_table, save_pickled

WEIGHTS = np.array([[1.0, 0.5], [10.0, -1.0], [100.0, 2.0]])


def linear_model(pause_s: float = 0.0) -> Weighted:
    """[a, b, c] @ WEIGHTS: two scores a row."""
    return Weighted(WEIGHTS, pause_s)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two files of (id, a, b, c): 6,000 rows in groups of 1,000 and 2,500 in groups of 700."""
    root = tmp_path_factory.mktemp("scan")
    first = random_table(root / "part-0.parquet", rows=6000, columns="abc", seed=1, row_group_size=1000)
    second = random_table(root / "part-1.parquet", rows=2500, columns="abc", seed=2, row_group_size=700)
    second_ids = pq.read_table(root / "part-1.parquet").column("id").to_numpy()
    assert (second_ids == np.arange(2500)).all()
    return root, np.vstack([first, second])


@pytest.fixture(scope="module")
def linear(session, ray_cluster, model_dir):
    from conftest import WORKER_CPUS

    model = save_pickled(model_dir / "linear.pkl", linear_model())
    session.register_model("lin", model, workers=2, num_cpus=WORKER_CPUS, returns="DOUBLE[2]")
    yield session.functions["lin"]
    session.unregister("lin")


def plan_of(session, query: str) -> dict:
    return session.sql(f"!plan '''{query} '''").iloc[0].to_dict()  # a space: the query may end in a quote


def on_driver(session, script: str) -> pd.DataFrame:
    session.sql('set worker_scan = "off"')
    try:
        return session.sql(script)
    finally:
        session.sql('set worker_scan = "on"')


SHAPES = {
    "fetch all, file order": "select id, lin(a, b, c) as p from read_parquet('{root}/*.parquet')",
    "projection and filter": "select id, lin(a, b, c)[2] as q from '{root}/part-0.parquet' as t where t.a > 0.5 and id % 3 = 0",
    "aggregate over scores": "select sum(list_max(lin(a, b, c))) as s, count(*) as n from read_parquet('{root}/*.parquet')",
    "group by": "select id % 4 as g, avg(lin(a, b, c)[1]) as m from read_parquet('{root}/*.parquet') group by g order by g",
    "filter on a score": "select id, a from read_parquet('{root}/*.parquet') where lin(a, b, c)[1] > 50 order by id, a",
    "star and two calls": "select *, lin(a, b, c) as p, lin(c, b, a) as r, lin(a, b, c)[1] as p1 from '{root}/part-1.parquet'",
    "a subquery around it": "select max(p[1]) as top from (select lin(a, b, c) as p from read_parquet('{root}/*.parquet') where b < 0.3)",
    "null arguments": "select id, lin(case when id % 5 = 0 then null else a end, b, c) as p from '{root}/part-0.parquet'",
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_on_the_workers_equals_the_driver_path_and_the_model(session, linear, files, shape):
    root, _ = files
    query = SHAPES[shape].format(root=root)
    assert plan_of(session, query)["path"] == "workers"
    before = sum(s["scans"] for s in linear.udf.stats())
    on_workers = session.sql(query)
    assert sum(s["scans"] for s in linear.udf.stats()) > before  # the workers read the files themselves
    # row values are equal to the bit; a float sum depends on the order DuckDB's threads add in, on either path
    exact = shape not in ("aggregate over scores", "group by")
    pd.testing.assert_frame_equal(on_workers, on_driver(session, query), check_exact=exact, rtol=1e-12)


def test_scores_equal_the_model_in_process_in_file_order(session, linear, files):
    root, values = files
    result = session.sql(SHAPES["fetch all, file order"].format(root=root))
    assert result["id"].tolist() == [*range(6000), *range(2500)]  # no ORDER BY: the files' order, as DuckDB reads them
    np.testing.assert_array_equal(np.stack(result["p"].to_numpy()), linear_model().predict(values))


def test_copy_create_table_and_a_loaded_view_run_on_the_workers(session, linear, files, tmp_path):
    root, values = files
    expected = linear_model().predict(values)
    query = f"select id, lin(a, b, c) as p from read_parquet('{root}/*.parquet')"
    out = tmp_path / "scores.parquet"
    assert plan_of(session, f"COPY ({query}) TO '{out}' (FORMAT parquet)")["path"] == "workers"
    session.sql(f"COPY ({query}) TO '{out}' (FORMAT parquet)")
    np.testing.assert_array_equal(np.stack(pq.read_table(out).column("p").to_numpy(zero_copy_only=False)), expected)

    session.sql(f"create or replace table scored_t as {query}")
    assert session.sql("select count(*) as n from scored_t")["n"][0] == len(values)

    # Byzer's flow: load, a named select (a view), save: the save's COPY reads the files on the workers
    script = f"load parquet.`{root}` as raw; select id, lin(a, b, c)[1] as y from raw as scored;"
    session.sql(script)
    assert plan_of(session, "select * from scored")["path"] == "workers"
    session.sql(f"save overwrite scored as parquet.`{tmp_path / 'saved'}`;")
    saved = session.sql(f"select * from read_parquet('{tmp_path / 'saved'}') order by id, y")
    want = pd.DataFrame({"id": [*range(6000), *range(2500)], "y": expected[:, 0]}).sort_values(["id", "y"], ignore_index=True)
    pd.testing.assert_frame_equal(saved, want, check_dtype=False)


FALLBACKS = {
    "select id, lin(a, b, c) as p from read_parquet('{root}/*.parquet') limit 5": "LIMIT",
    "select lin(a, b, c) as p from mem": "Parquet files alone",
    "select lin(x.a, x.b, y.c) from '{root}/part-0.parquet' x join '{root}/part-1.parquet' y using (id)": "Parquet files alone",
    "select lin(a, b, random()) from '{root}/part-0.parquet'": "random()",
    "select lin(a, b, c) from '{root}/part-0.parquet' group by a, b, c": "outside the aggregates",
    "select sum(id) over (order by lin(a, b, c)[1]) from '{root}/part-0.parquet'": "window",
    "select lin(a, b, c) from read_parquet('{root}/part-0.parquet', hive_partitioning = true)": "reader options",
    "select 42": "no model function call",
}


@pytest.mark.parametrize("query", FALLBACKS)
def test_other_queries_stay_on_the_driver_and_say_why(session, linear, files, query):
    root, _ = files
    session.sql(f"create or replace table mem as select * from '{root}/part-0.parquet'")
    planned = plan_of(session, query.format(root=root))
    assert planned["path"] == "driver" and FALLBACKS[query] in planned["reason"], planned


def test_the_setting_keeps_queries_on_the_driver(session, linear, files):
    root, _ = files
    query = f"select lin(a, b, c) from '{root}/part-0.parquet'"
    session.sql('set worker_scan = "off"')
    try:
        assert plan_of(session, query) == {**plan_of(session, query), "path": "driver", "reason": 'set worker_scan = "off"'}
    finally:
        session.sql('set worker_scan = "on"')
    with pytest.raises(ExecutionError, match="worker_scan: 'maybe' is not one of on, off"):
        session.sql('set worker_scan = "maybe"')


def test_workers_check_they_see_the_files_the_driver_sees(linear, files):
    path = str(files[0] / "part-0.parquet")
    size = os.path.getsize(path)
    assert linear.udf.can_read([(path, size)])
    assert not linear.udf.can_read([(path, size + 1)])  # another file of that name elsewhere
    assert not linear.udf.can_read([(path + ".missing", size)])


def test_model_errors_on_the_workers_name_the_file_row(session, register, model_dir, files):
    root, values = files
    model = save_pickled(model_dir / "linear_poisoned.pkl", linear_model())
    query = "select id, {f}(case when id = 4321 then -1 else a end, b, c) as p from '" + str(root / "part-0.parquet") + "'"
    register("strict_scan", model, workers=2)
    assert plan_of(session, query.format(f="strict_scan"))["path"] == "workers"
    where = r"\(row 4322 of .*part-0.parquet: \[-1.0, "  # the row's place in its file, and its values
    with pytest.raises(ExecutionError, match=r"^line 1: function strict_scan: the model raised ValueError: poison row \(a = -1\) " + where):
        session.sql(query.format(f="strict_scan"))

    register("lenient_scan", model, workers=2, on_error="null", returns="DOUBLE[2]")
    result = session.run(query.format(f="lenient_scan"))
    scores = result.frame["p"]
    assert scores.isna().sum() == 1 and pd.isna(scores[4321])
    assert "1 row NULL" in result.warnings[0]
    kept = np.arange(6000) != 4321
    np.testing.assert_array_equal(np.stack(scores[kept].to_numpy()), linear_model().predict(values[:6000][kept]))


def test_a_worker_killed_during_a_worker_scan_loses_no_row(session, register, model_dir, tmp_path):
    values = random_table(tmp_path / "rows.parquet", rows=60_000, columns="abc", seed=3, row_group_size=2000)
    registered = register("killed_scan", save_pickled(model_dir / "linear_slow.pkl", linear_model(0.05)), workers=2, batch_size=500)
    query = f"select id, killed_scan(a, b, c) as p from '{tmp_path / 'rows.parquet'}'"
    assert plan_of(session, query)["path"] == "workers"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(session.sql, query)
        while sum(s["batches"] for s in registered.udf.stats()) < 6 and not running.done():  # both workers busy with their shares
            time.sleep(0.05)
        assert not running.done(), running.result()  # a query that ended already (or failed) has nothing to lose
        victim = None
        while victim is None:
            victim = next((s["pid"] for s in registered.udf.stats() if s["batch_running_s"] is not None), None)
        os.kill(victim, signal.SIGKILL)
        result = running.result(timeout=300)
    assert result["id"].tolist() == list(range(60_000))  # every row once, in file order
    np.testing.assert_array_equal(np.stack(result["p"].to_numpy()), linear_model().predict(values))
    stats = registered.udf.stats()
    assert sum(s["replaced"] for s in stats) >= 1 and victim not in [s["pid"] for s in stats]


class ReshapedTrees:
    """A DuckDB connection whose json_serialize_sql answers in another shape, as another release might."""

    def __init__(self, con) -> None:
        self._con = con

    def execute(self, sql, *args):
        if "json_serialize_sql" in sql:
            return self._con.execute("""SELECT '{"error": false, "stmts": []}'""")
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_a_parse_tree_of_another_shape_runs_as_written_and_says_why(session, linear, files):
    """A DuckDB release that reshapes its parse trees must not fail model queries: they take the driver path."""
    from sql_magics.planner.plan import plan, plan_query
    from sql_magics.planner.tree import parse

    root, _ = files
    con, functions = session.con, session.registry.model_functions()
    query = SHAPES["group by"].format(root=root)
    assert plan_query(con, parse(con, query), functions).path == "workers"

    planned = plan(ReshapedTrees(con), query, functions)  # the statement list renamed
    assert planned.path == "driver" and "parse tree has a shape this planner does not read (KeyError: 'statements')" in planned.reason

    renamed = parse(con, query)
    renamed["grouping_expressions"] = renamed.pop("group_expressions")  # a key renamed
    planned = plan_query(con, renamed, functions)
    assert planned.path == "driver"
    assert "parse tree has a shape this planner does not read (KeyError: 'group_expressions')" in planned.reason

    listed = parse(con, query)
    listed["from_table"] = [listed["from_table"]]  # a list where a dict was
    assert plan_query(con, listed, functions).path == "driver"

    unknown = parse(con, SHAPES["projection and filter"].format(root=root))
    unknown["where_clause"]["children"][0]["type"] = "COMPARE_NOT_KNOWN_TO_DUCKDB"  # one DuckDB will not print back
    planned = plan_query(con, unknown, functions)
    assert planned.path == "driver" and "DuckDB does not print the rewritten statement back" in planned.reason


def test_a_source_duckdb_cannot_describe_runs_as_written_and_duckdb_says_why(session, linear, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    query = f"select lin(a, b, c) as p from '{bad}'"
    planned = plan_of(session, query)
    assert planned["path"] == "driver" and "DuckDB refused a question of the planner" in planned["reason"], planned
    with pytest.raises(ExecutionError, match=r"^line 1: .*bad\.parquet"):
        session.sql(query)


def test_the_statement_splitter_leaves_what_the_tokenizer_refuses_to_duckdb_and_nothing_else(session, linear):
    from sql_magics.planner.plan import split_statement
    from sql_magics.planner.tree import NotEligible

    with pytest.raises(NotEligible, match="our tokenizer does not read it"):
        split_statement("select 'unterminated from t")
    with pytest.raises(TypeError):  # a fault of ours is not taken for a statement DuckDB should judge
        split_statement(None)
    planned = plan_of(session, "select lin(a, b, c) from 'x.parquet' where a = \"unterminated")
    assert planned["path"] == "driver" and "our tokenizer does not read it" in planned["reason"]


def test_a_query_with_parameters_runs_on_the_driver_and_plan_says_so(session, linear, files):
    root, values = files
    query = f"select id, lin(a, b, c) as p from '{root}/part-0.parquet' where id < $n"
    planned = plan_of(session, query)
    assert planned["path"] == "driver" and "$parameters" in planned["reason"], planned
    before = sum(s["scans"] for s in linear.udf.stats())
    result = session.sql(query, parameters={"n": 10})
    assert sum(s["scans"] for s in linear.udf.stats()) == before  # as !plan said: the driver called the model
    assert result["id"].tolist() == list(range(10))
    np.testing.assert_array_equal(np.stack(result["p"].to_numpy()), linear_model().predict(values[:10]))


def test_functions_only_the_session_has_stay_with_the_driver(session, linear, files):
    """Macros and Python functions made on the session's connection are unknown to a worker's DuckDB:
    arguments calling them keep the query on the driver, filters calling them are not pushed to the workers."""
    root, values = files
    path = f"{root}/part-0.parquet"
    assert plan_of(session, f"select lin(a, b, c) from '{path}'")["path"] == "workers"
    session.con.execute("create or replace macro twice(x) as 2 * x")  # made on the connection directly, past the session
    session.sql("register ScriptUDF.`` as halve where lang=\"python\" and returns=\"DOUBLE\" and code='''def apply(x): return x / 2'''")
    try:
        a, b, c = values[:6000].T
        for call, first in (("twice(a)", 2 * a), ("halve(a)", a / 2)):
            query = f"select id, lin({call}, b, c) as p from '{path}'"
            planned = plan_of(session, query)
            name = call.split("(")[0]
            assert planned["path"] == "driver" and f"calls {name}(), which only this session's DuckDB has" in planned["reason"]
            result = session.sql(query)
            np.testing.assert_allclose(np.stack(result["p"].to_numpy()), linear_model().predict(np.column_stack([first, b, c])))

        filtered = f"select id, lin(a, b, c) as p from '{path}' where halve(a) > 0.25"
        assert plan_of(session, filtered)["path"] == "workers"  # the filter stays in the driver's statement
        result = session.sql(filtered)
        assert result["id"].tolist() == np.flatnonzero(a / 2 > 0.25).tolist()
        np.testing.assert_array_equal(np.stack(result["p"].to_numpy()), linear_model().predict(values[:6000][a / 2 > 0.25]))
    finally:
        session.con.execute("drop macro twice")
        session.unregister("halve")


def test_share_scans_on_two_threads_each_read_their_own_share(files):
    import pyarrow as pa

    from arrow_bridge.share_scan import ROW_COLUMN, SHARE_VIEW, ShareScan, arg_column
    from udf_engine.actors.batching import cut

    root, values = files
    query = f"SELECT a AS {arg_column(0, 0)}, file_row_number AS {ROW_COLUMN} FROM {SHARE_VIEW}"

    def scan(file: str, rows: int) -> np.ndarray:
        task = ShareScan(
            function="f", returns="DOUBLE", query=query, schema=pa.schema([(arg_column(0, 0), pa.float64())]), passthrough=(),
            call_args=(1,), file=str(root / file), rows=(0, rows - 1), width=None,
        )
        return task.run(lambda matrix: [b[:, 0] for b in cut(matrix, 100)]).table.column(0).to_numpy()  # as a worker scores it

    with ThreadPoolExecutor(2) as pool:
        rounds = [(pool.submit(scan, "part-0.parquet", 6000), pool.submit(scan, "part-1.parquet", 2500)) for _ in range(10)]
        for first, second in rounds:
            np.testing.assert_array_equal(first.result(), values[:6000, 0])
            np.testing.assert_array_equal(second.result(), values[6000:, 0])


# Columns DuckDB writes, each as DuckDB reads it back; nulls in each but *_full, two row groups.
TYPED_COLUMNS = {
    "i8": "(i % 100 - 50)::TINYINT", "u32": "i::UINTEGER", "big": "(i * 1000003)::BIGINT", "f": "(i / 7)::FLOAT",
    "d": "i / 3", "flag": "i % 3 = 0", "name": "'név ' || i", "day": "DATE '2020-01-01' + i::INTEGER",
    "at_": "TIMESTAMP '2020-01-01' + to_seconds(i)", "at_tz": "TIMESTAMPTZ '2020-01-01 00:00:00+00' + to_seconds(i)",
    "vec": "[i, i + 0.5]::DOUBLE[]", "arr": "[i, i / 2, i / 3]::FLOAT[3]",
    "arr_full": "[i, i / 2]::FLOAT[2]", "price": "(i / 100)::DECIMAL(10, 2)",
    "raw": "'\\x00\\xff'::BLOB", "pair": "{'a': i, 'b': 'x'}",
}
# What Arrow's reader cannot give as DuckDB does: DuckDB reads these (the share's query) instead.
READ_BY_DUCKDB = {"price", "raw", "pair", "arr"}  # arr: Arrow's reader fails on DuckDB's arrays with NULLs


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory):
    import duckdb

    path = tmp_path_factory.mktemp("typed") / "typed.parquet"
    columns = ", ".join(
        f"{sql} AS {name}" if name.endswith("_full") else f"CASE WHEN i % 11 = 5 THEN NULL ELSE {sql} END AS \"{name}\""
        for name, sql in TYPED_COLUMNS.items()
    )
    duckdb.sql(f"COPY (SELECT {columns} FROM range(3000) t(i)) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE 2048)")
    return str(path)


def read_both(path, name: str, rows: tuple[int, int]):
    """(what DuckDB reads of column ``name``, what read_picked gives) for rows ``rows`` of ``path``."""
    import duckdb

    from arrow_bridge.share_scan import ROW_COLUMN, read_picked

    expected = duckdb.connect().sql(
        f"SELECT \"{name}\" AS x, file_row_number AS {ROW_COLUMN} FROM read_parquet('{path}', file_row_number = true) "
        f"WHERE file_row_number BETWEEN {rows[0]} AND {rows[1]}"
    ).to_arrow_table()
    return expected, read_picked(str(path), rows, [("x", name)], expected.select(["x"]).schema)


@pytest.mark.parametrize("name", TYPED_COLUMNS)
def test_columns_read_straight_from_the_file_equal_what_duckdb_reads(typed_file, name):
    for rows in ((0, 2047), (1000, 2999), (2048, 2999), (10, 20)):  # whole groups, across them, inside one
        expected, read = read_both(typed_file, name, rows)
        if name in READ_BY_DUCKDB:
            assert read is None
        else:
            assert read is not None and read.equals(expected), name


def test_columns_arrow_wrote_are_read_straight_only_when_alike(tmp_path, monkeypatch):
    import pyarrow as pa

    from arrow_bridge import share_scan

    path = tmp_path / "arrow.parquet"
    pq.write_table(pa.table({
        "vec": pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32(), 2)),
        "text": pa.array(["a", None, "ü"], pa.large_string()),
        "ms": pa.array([0, 1, None], pa.timestamp("ms")),  # DuckDB reads microseconds
        "kind": pa.array(["x", "y", "x"]).dictionary_encode(),  # Arrow reads a dictionary back
    }), path)
    for name, straight in {"vec": True, "text": True, "ms": False, "kind": False}.items():
        expected, read = read_both(path, name, (0, 2))
        assert (read is not None) == straight, name
        assert read is None or read.equals(expected), name
    monkeypatch.setattr(share_scan, "ARROW_READ_BYTES", 10)  # row groups larger than this: DuckDB reads them
    assert read_both(path, "vec", (0, 2))[1] is None


def test_a_file_of_one_row_group_is_scored_by_every_worker(session, linear, tmp_path):
    values = random_table(tmp_path / "one.parquet", rows=3000, columns="abc", seed=3, row_group_size=3000)
    query = f"select id, lin(a, b, c) as p from '{tmp_path}/one.parquet'"
    assert plan_of(session, query)["shares"] == 2
    before = {s["worker"]: s["scans"] for s in linear.udf.stats()}
    result = session.sql(query)
    assert all(s["scans"] > before[s["worker"]] for s in linear.udf.stats())
    assert result["id"].tolist() == list(range(3000))
    np.testing.assert_array_equal(np.stack(result["p"].to_numpy()), linear_model().predict(values))
