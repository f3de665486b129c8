"""Faults: a worker killed mid-query, bad input, missing or corrupt models, leftover actors."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sql_magics import ExecutionError, Session
from udf_engine import ModelError, WorkerError, read_model_rows, save_model
from udf_engine.models.store import SCHEMA

from conftest import named_actors, random_table


@pytest.fixture(scope="module")
def slow_model_path(model_dir):
    """A deterministic model that takes a few ms per batch, so a query lasts long enough to kill a worker."""

    class SlowSum:
        n_features_in_ = 4

        def predict(self, batch):
            time.sleep(0.01)
            return np.asarray(batch, dtype=np.float64) @ np.array([1.0, 10.0, 100.0, 1000.0])

    path = model_dir / "slow.pkl"
    path.write_bytes(cloudpickle.dumps(SlowSum()))
    return path


@pytest.fixture(scope="module")
def wide_parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide") / "wide.parquet"
    return path, random_table(path, rows=40_000, columns="abcd", seed=1, row_group_size=4096)


def test_worker_killed_mid_query_loses_no_row(session, register, slow_model_path, wide_parquet):
    import ray

    path, x = wide_parquet
    registered = register("slow_sum", slow_model_path, workers=2, batch_size=128)
    victim = registered.udf.worker_handles()[0]
    with ThreadPoolExecutor(1) as pool:
        query = pool.submit(session.sql, f"select id, slow_sum(a, b, c, d) as y from '{path}' order by id")
        deadline = time.monotonic() + 30
        while sum(s["batches"] for s in registered.udf.stats()) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not query.done(), "the query ended before the kill; the test would prove nothing"
        ray.kill(victim)
        result = query.result(timeout=120)  # re-raises the query's own error

    assert list(result["id"]) == list(range(len(x)))  # no row lost, none duplicated
    np.testing.assert_allclose(result["y"].to_numpy(), x @ np.array([1.0, 10.0, 100.0, 1000.0]), rtol=0, atol=1e-9)
    stats = registered.udf.stats()
    assert len(stats) == 2 and all(s["alive"] for s in stats)
    assert sum(s["replaced"] for s in stats) == 1, stats


def test_wrong_length_names_function_and_both_lengths(session, register, sklearn_model):
    _, path = sklearn_model
    register("lr_len", path)
    with pytest.raises(ExecutionError, match=r"function lr_len: expected lists of length 64, got length 3 \(row 1 of the batch\)"):
        session.sql("select lr_len([1.0, 2.0, 3.0]) as y from range(1)")

    with pytest.raises(ExecutionError, match=r"function lr_len: expected arrays of length 64, got length 10"):
        session.sql("select lr_len(range(10)::FLOAT[10]) as y from range(1)")
    # the function still works afterwards
    assert session.sql("select lr_len(range(64)::FLOAT[64]) as y from range(1)")["y"].notna().all()


def test_model_error_is_reported_and_workers_survive(session, register, model_dir):
    class Picky:
        n_features_in_ = 2

        def predict(self, batch):
            if (np.asarray(batch) < 0).any():
                raise ValueError("negative input")
            return np.asarray(batch).sum(axis=1)

    path = model_dir / "picky.pkl"
    path.write_bytes(cloudpickle.dumps(Picky()))
    register("picky", path)
    with pytest.raises(ExecutionError, match="picky.*ValueError: negative input"):
        session.sql("select picky(-1.0, 2.0) as y from range(1)")
    assert session.sql("select picky(1.0, 2.0) as y from range(1)")["y"][0] == 3.0


def test_missing_model_path_fails_registration(session, tmp_path):
    missing = tmp_path / "missing.keras"
    with pytest.raises(ModelError, match="missing.keras"):
        session.register_model("ghost", missing)
    assert "ghost" not in session.functions
    assert named_actors(session.registry.actor_prefix("ghost")) == []


def test_corrupt_model_table_fails_on_checksum_and_leaves_no_actor(session, sklearn_model, tmp_path):
    _, path = sklearn_model
    rows = read_model_rows(save_model(path, tmp_path / "good"))
    chunk = next(r for r in rows if r["path"] == "")
    flipped = bytearray(chunk["value"])
    flipped[100] ^= 0x20
    chunk["value"] = bytes(flipped)
    bad = tmp_path / "bad_table"
    bad.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), bad / "part-00000.parquet")

    with pytest.raises(ModelError, match="sha256 mismatch"):
        session.register_model("corrupt", bad, workers=2, num_cpus=0.5)
    assert "corrupt" not in session.functions
    assert named_actors(session.registry.actor_prefix("corrupt")) == []


def test_not_enough_resources_fails_fast(session, sklearn_model):
    _, path = sklearn_model
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"not enough free Ray resources.*GPU=6"):
        session.register_model("greedy", path, workers=3, num_cpus=0.1, num_gpus=2)
    assert time.monotonic() - started < 30
    assert named_actors(session.registry.actor_prefix("greedy")) == []


def test_closing_a_session_stops_its_actors(ray_cluster, sklearn_model):
    _, path = sklearn_model
    with Session() as own:
        own.register_model("short_lived", path, workers=1, num_cpus=0.5)
        prefix = own.registry.actor_prefix("")
        assert len(named_actors(prefix, timeout_s=0)) == 3  # the master, its worker and the session's warm pool
    assert named_actors(prefix) == []
    assert ray_cluster.is_initialized()  # the session joined Ray, so it leaves it running


QUIET_DRIVER = """
import os, signal, threading, time
from sql_magics import Session

def kill_when_busy(udf):
    while udf.stats()[0]["batches"] < 5:
        time.sleep(0.05)
    os.kill(udf.stats()[0]["pid"], signal.SIGKILL)

with Session() as s:
    registered = s.register_model("noisy", {path!r}, workers=2, num_cpus=0.5, batch_size=256)
    killer = threading.Thread(target=kill_when_busy, args=(registered.udf,))
    killer.start()
    frame = s.sql("select sum(noisy(range::DOUBLE, 1.0)) as total from range(40000)")
    killer.join()
    print("TOTAL", frame["total"][0])
"""


def test_worker_output_and_raylet_notices_stay_out_of_the_driver(ray_cluster, model_dir, tmp_path):
    """A driver joining a cluster (RAY_ADDRESS, as a notebook kernel does) shows neither what
    its workers print nor Ray's notice that one was killed; the query still returns its rows."""
    import os
    import subprocess
    import sys

    class Noisy:
        n_features_in_ = 2

        def predict(self, batch):
            print("NOISE on stdout")
            print("NOISE on stderr", file=sys.stderr)
            time.sleep(0.02)
            return np.asarray(batch, dtype=np.float64).sum(axis=1)

    path = model_dir / "noisy.pkl"
    path.write_bytes(cloudpickle.dumps(Noisy()))
    script = tmp_path / "driver.py"
    script.write_text(QUIET_DRIVER.format(path=str(path)))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"TOTAL {float(sum(range(40000)) + 40000)}"]  # every row, once
    assert "NOISE" not in done.stderr and "(raylet)" not in done.stderr, done.stderr[-2000:]


# Every error class of the project, as DuckDB names it when one of them leaves a model function.
PROJECT_ERRORS = [
    "RayUDFError", "ConfigError", "ModelError", "RowError", "WorkerError", "ResourceError", "BatchTimeoutError", "InputError",
    "ParseError", "ExecutionError", "SchemaError", "RequestError", "UnknownFunctionError",
]


@pytest.mark.parametrize("name", PROJECT_ERRORS)
def test_duckdb_wrapping_and_the_class_name_of_any_project_error_are_stripped(name):
    import duckdb

    from sql_magics.byzer.schemas import SchemaError  # noqa: F401 - the project's errors that live in wings, loaded
    from sql_magics.errors import clean_duckdb_error
    from sql_magics.serving.requests import RequestError  # noqa: F401

    wrapped = duckdb.InvalidInputException(
        f"Invalid Input Error: Python exception occurred while executing the UDF: {name}: function f: the model raised ValueError: bad"
    )
    assert clean_duckdb_error(wrapped) == "function f: the model raised ValueError: bad"


def test_other_exception_names_stay_in_the_message():
    import duckdb

    from sql_magics.errors import clean_duckdb_error

    wrapped = duckdb.InvalidInputException("Invalid Input Error: Python exception occurred while executing the UDF: ValueError: bad")
    assert clean_duckdb_error(wrapped) == "ValueError: bad"
