"""The engine under faults and load: busy workers, the master's death, bad rows, hung batches, chaos.

Models are plain cloudpickled Python (no TensorFlow), so workers start in about a second.
Processes are killed by their own pid, found through their actor handle.
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from sql_magics import ExecutionError

from conftest import Weighted, random_table, save_pickled

WEIGHTS = np.array([1.0, 10.0])


def pickled(model_dir, name, model):
    return save_pickled(model_dir / f"{name}.pkl", model)


def pid_of(actor) -> int:
    """The process id of an actor, asked of the actor itself."""
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def worker_pids(udf) -> list[int]:
    return [s["pid"] for s in udf.stats() if s["alive"] and s["pid"]]


@pytest.fixture(scope="module")
def rows_parquet(tmp_path_factory):
    """200,000 rows (id, a, b) in row groups of 4,096, and the expected a + 10 b."""
    path = tmp_path_factory.mktemp("faults") / "rows.parquet"
    return path, random_table(path, rows=200_000, columns="ab", seed=7, row_group_size=4096) @ WEIGHTS


def test_a_batch_longer_than_every_health_timeout_is_not_a_death(session, register, model_dir):
    from udf_engine.actors.master import WATCH_INTERVAL_S
    from udf_engine.actors.worker import CONTROL_TIMEOUT_S

    pause_s = CONTROL_TIMEOUT_S + WATCH_INTERVAL_S
    registered = register("sleepy", pickled(model_dir, "sleepy", Weighted(pause_s=pause_s)), workers=1)
    with ThreadPoolExecutor(1) as pool:
        query = pool.submit(session.sql, "select sleepy(2.0, 3.0) as y from range(1)")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (row,) = session.sql("!workers").query("function == 'sleepy'").to_dict("records")
            if row["batch_running_s"] and row["batch_running_s"] > CONTROL_TIMEOUT_S:
                break
            time.sleep(0.5)
        assert row["alive"] and row["batch_running_s"] > CONTROL_TIMEOUT_S, row  # !workers answers while it runs
        assert query.result(timeout=60)["y"].tolist() == [32.0]
    (stats,) = registered.udf.stats()
    assert stats["replaced"] == 0 and stats["batches"] == 1 and stats["batch_running_s"] is None


@pytest.mark.parametrize(
    ("workers", "max_retries"),
    # with one worker no other worker tells of a death together: the master's new life does, and
    # with max_retries=0 a single batch blamed for its death would fail the query
    [(2, 3), (1, 0)],
    ids=["two workers", "one worker, no retries"],
)
def test_the_masters_death_mid_query_loses_no_row_and_costs_no_retry(session, register, model_dir, rows_parquet, workers, max_retries):
    path, expected = rows_parquet
    name = f"orphan{workers}"
    registered = register(name, pickled(model_dir, name, Weighted(pause_s=0.02)), workers=workers, max_retries=max_retries)
    master_pid = pid_of(registered.udf.master)
    with ThreadPoolExecutor(1) as pool:
        query = pool.submit(session.sql, f"select id, {name}(a, b) as y from '{path}' order by id")
        while sum(s["batches"] for s in registered.udf.stats()) < 10:
            time.sleep(0.05)
        assert not query.done()
        os.kill(master_pid, signal.SIGKILL)
        result = query.result(timeout=240)
    assert result["id"].tolist() == list(range(len(expected)))
    np.testing.assert_allclose(result["y"].to_numpy(), expected, rtol=0, atol=1e-9)
    assert pid_of(registered.udf.master) != master_pid  # Ray restarted it
    again = session.sql(f"select sum({name}(a, b)) as s from '{path}'")  # and the function keeps working
    assert again["s"][0] == pytest.approx(expected.sum())


def test_on_error_raise_names_the_row_and_null_keeps_every_other_row(session, register, model_dir, rows_parquet):
    path, expected = rows_parquet
    model = pickled(model_dir, "poisoned", Weighted())
    poison = 12_345
    query = f"select id, {{f}}(case when id = {poison} then -1 else a end, b) as y from '{path}' where id < 20000 order by id"

    register("strict", model)
    session.sql('set worker_scan = "off"')  # the driver path: DuckDB's calls (the worker path: test_worker_scan)
    try:
        with pytest.raises(ExecutionError) as err:
            session.sql(query.format(f="strict"))
    finally:
        session.sql('set worker_scan = "on"')
    message = str(err.value)
    b = pq.read_table(path).column("b")[poison].as_py()
    # DuckDB passes the rows of a 4,096-row group in calls of 2,048: row 12,345 is the 58th of its call
    where = f"(row 58 of the 2048 rows of this call: [-1.0, {b!r}])"
    # exactly what the user sees: no class name (RowError: ...) nor DuckDB's wrapper around it
    assert message == f"line 1: function strict: the model raised ValueError: poison row (a = -1) {where}"

    register("lenient", model, on_error="null")
    result = session.run(query.format(f="lenient"))
    y = result.frame["y"]
    assert result.frame["id"].tolist() == list(range(20000))
    assert y.isna().sum() == 1 and np.isnan(y[poison])
    kept = np.arange(20000) != poison
    np.testing.assert_allclose(y.to_numpy()[kept], expected[:20000][kept], rtol=0, atol=1e-9)
    assert len(result.warnings) == 1 and "1 row NULL" in result.warnings[0] and "poison row" in result.warnings[0]
    assert session.sql("!models").set_index("function").loc["lenient", "nulled_rows"] == 1


def test_a_hung_batch_fails_the_query_naming_the_timeout_and_the_function_recovers(session, register, model_dir):
    register("hangs", pickled(model_dir, "hangs", Weighted()), workers=1, batch_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(ExecutionError, match=r"function hangs: a batch ran longer than batch_timeout_s=2 s"):
        session.sql("select hangs(-5.0, 1.0) as y from range(1)")
    assert time.monotonic() - started < 30
    assert session.sql("select hangs(1.0, 1.0) as y from range(3)")["y"].tolist() == [11.0] * 3


def test_chaos_random_kills_of_workers_and_the_master(session, register, model_dir, rows_parquet):
    """SIGKILLs at random moments, of a worker or of the master, during a 200,000-row query."""
    path, expected = rows_parquet
    registered = register("chaos", pickled(model_dir, "chaos", Weighted(pause_s=0.03)), workers=2)
    rng = random.Random(11)
    plan = ["worker", "master", "worker", "worker", "master", "worker", "master", "worker"]
    kills = []

    def victim(target: str) -> int | None:
        if target == "master":
            return pid_of(registered.udf.master)
        pids = worker_pids(registered.udf)  # none while a restarted master starts its workers
        return rng.choice(pids) if pids else None

    with ThreadPoolExecutor(1) as pool:
        query = pool.submit(session.sql, f"select id, chaos(a, b) as y from '{path}'")
        for target in plan:
            time.sleep(rng.uniform(0.3, 0.9))
            pid = victim(target)
            while pid is None and not query.done():
                time.sleep(0.1)
                pid = victim(target)
            if query.done():
                break
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append(target)
            except ProcessLookupError:
                continue  # it died on its own meanwhile
        result = query.result(timeout=600)
    ids = result["id"].to_numpy()
    order = np.argsort(ids)
    assert np.array_equal(ids[order], np.arange(len(expected)))  # every row once: none lost, none twice
    np.testing.assert_allclose(result["y"].to_numpy()[order], expected, rtol=0, atol=1e-9)
    print(f"chaos: {len(kills)} kills survived ({kills.count('master')} of the master), {len(ids):,} rows checked")
    assert kills.count("worker") >= 2 and kills.count("master") >= 1, kills


class Shifted(Weighted):
    """Version 2: a + 10 b + 1000."""

    def predict(self, batch):
        return super().predict(batch) + 1000.0


def test_registering_again_during_a_query_is_a_rolling_swap(session, register, model_dir, rows_parquet):
    from conftest import named_actors

    path, expected = rows_parquet
    register("roll", pickled(model_dir, "roll_v1", Weighted(pause_s=0.2)), workers=2)  # the query takes ~10 s
    first_version = session.registry.functions["roll"].udf
    with ThreadPoolExecutor(1) as pool:
        query = pool.submit(session.sql, f"select id, roll(a, b) as y from '{path}' order by id")
        while sum(s["batches"] for s in first_version.stats()) < 3:
            time.sleep(0.05)
        register("roll", pickled(model_dir, "roll_v2", Shifted()), workers=1)
        assert not query.done(), "register waited for the query; it should only start the new workers and switch"
        after = session.sql("select roll(1.0, 1.0) as y from range(1)")  # starts once the running query is done
        result = query.result(timeout=300)
    np.testing.assert_allclose(result["y"].to_numpy(), expected, rtol=0, atol=1e-9)  # every row from version 1
    assert after["y"].tolist() == [1011.0]  # version 2 after register returned
    models = session.sql("!models").set_index("function")
    assert models.loc["roll", "version"] == "2" and models.loc["roll", "workers"] == 1
    old_prefix = session.registry.actor_prefix("roll") + ".r1."
    assert named_actors(old_prefix, timeout_s=20) == []  # version 1's workers stopped once drained


def test_batches_sent_from_an_event_loop_survive_what_sql_batches_survive(session, register, model_dir):
    """``RemoteUDF.score_async`` (a Serve replica's calls, sent from its event loop): full workers, a worker
    killed under its batches, the model's error on a row and a hung batch give what ``score`` gives."""
    import asyncio

    from udf_engine.errors import BatchTimeoutError, RowError

    registered = register("looped", pickled(model_dir, "looped", Weighted(pause_s=0.5)), workers=2, batch_timeout_s=10)
    udf = registered.udf
    matrices = [np.array([[float(i), 1.0], [2.0, float(i)]]) for i in range(6)]

    async def score_all(kill: int | None = None) -> list:
        calls = [asyncio.ensure_future(udf.score_async(m)) for m in matrices]  # 6 batches for 4 slots: 2 wait on a thread
        if kill is not None:
            await asyncio.sleep(0.2)
            os.kill(kill, signal.SIGKILL)
        return await asyncio.gather(*calls)

    for outputs, matrix in zip(asyncio.run(score_all()), matrices, strict=True):
        np.testing.assert_array_equal(outputs[0], matrix @ WEIGHTS)
    for outputs, matrix in zip(asyncio.run(score_all(kill=worker_pids(udf)[0])), matrices, strict=True):
        np.testing.assert_array_equal(outputs[0], matrix @ WEIGHTS)  # none lost: sent again to the other worker
    with pytest.raises(RowError, match=r"poison row") as raised:
        asyncio.run(udf.score_async(np.array([[1.0, 1.0], [-1.0, 1.0]])))
    with pytest.raises(RowError) as by_sql:
        udf.score(np.array([[1.0, 1.0], [-1.0, 1.0]]))
    assert str(raised.value) == str(by_sql.value)  # the row named as for SQL
    started = time.monotonic()
    with pytest.raises(BatchTimeoutError, match=r"function looped: a batch ran longer than batch_timeout_s=10 s"):
        asyncio.run(udf.score_async(np.array([[-5.0, 1.0]])))
    assert time.monotonic() - started < 40
    np.testing.assert_array_equal(asyncio.run(udf.score_async(matrices[1]))[0], matrices[1] @ WEIGHTS)  # the function recovers
