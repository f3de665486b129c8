"""The planner's one rule for what runs on the workers: a model's arguments and the WHERE conditions pushed
to the workers follow it alike. Planned on a plain DuckDB connection (no Ray): the model function is a stand-in."""

from __future__ import annotations

from types import SimpleNamespace

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sql_magics.planner.plan import DRIVER, WORKERS, plan_query
from sql_magics.planner.tree import parse

# An expression, and why it cannot run where the rows are read (None: it can).
RULE = [
    ("a + b * 2", None),
    ("abs(a) + length('xy')", None),
    ("random()", "calls random(), which gives other values each time"),
    ("twice(a)", "calls twice(), which only this session's DuckDB has, not the workers'"),
    ("(select 1)", "holds a subquery or window"),
    ("f(b, a)", "calls the model function f()"),
    ("other.a", "reads other.a, not a column of the files"),
]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """plan(query): the plan of a query over one Parquet file of columns a and b, the model function being f."""
    path = tmp_path_factory.mktemp("plan") / "t.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]}), path)
    con = duckdb.connect()
    con.execute("create macro twice(x) as 2 * x")  # a function of this connection's, not of a worker's DuckDB
    functions = {"f": SimpleNamespace(name="f", udf=SimpleNamespace(conf=SimpleNamespace(batch_timeout_s=None, workers=2)))}
    yield lambda query: plan_query(con, parse(con, query.format(file=f"'{path}'")), functions)
    con.close()


@pytest.mark.parametrize(("expr", "why"), RULE, ids=[e for e, _ in RULE])
def test_an_argument_runs_on_the_workers_when_a_filter_would_be_pushed_there(planned, expr, why):
    as_argument = planned(f"select f(a, {expr}) as p from {{file}}")
    assert (as_argument.path, as_argument.reason) == ((WORKERS, "") if why is None else (DRIVER, f"a model argument {why}"))
    as_filter = planned(f"select a, f(a, b) as p from {{file}} where {expr} > 0 and b > 4")
    assert as_filter.path == WORKERS
    where = as_filter.worker_query.split(" WHERE ")[1]
    if why is None:  # both conditions run where the rows are read
        assert " AND " in where and "(b > 4)" in where
    else:  # only the other one: the driver's statement keeps this one
        assert where.startswith("(b > 4)") and " AND " not in where and "> 0" in as_filter.statement
