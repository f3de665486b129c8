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
    with pytest.raises(ExecutionError, match=r"the model raised ValueError: poison row \(a = -1\) " + where):
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
        while sum(s["batches"] for s in registered.udf.stats()) < 6:  # both workers busy with their shares
            time.sleep(0.05)
        victim = None
        while victim is None:
            victim = next((s["pid"] for s in registered.udf.stats() if s["batch_running_s"] is not None), None)
        os.kill(victim, signal.SIGKILL)
        result = running.result(timeout=300)
    assert result["id"].tolist() == list(range(60_000))  # every row once, in file order
    np.testing.assert_array_equal(np.stack(result["p"].to_numpy()), linear_model().predict(values))
    stats = registered.udf.stats()
    assert sum(s["replaced"] for s in stats) >= 1 and victim not in [s["pid"] for s in stats]
