"""Warm pools: a second Keras model starts on processes that imported TensorFlow while they waited.

Spares are real Ray actors of the session's pool; tests find them by pid and check that the next
registration of the same kind loads its model into them, that a master's restart stops what it
was lent, and that spares give their resources up to a registration that needs them.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray

from conftest import WORKER_CPUS, Weighted, save_pickled


def pool_of(session):
    from udf_engine.actors.warm_pool import find_pool

    return find_pool(session.registry.pool_name)


def spare_pids(session, count: int, timeout_s: float = 120.0) -> list[int]:
    """The pids of the pool's spares, once ``count`` wait and have imported their framework."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pool = pool_of(session)  # a session warming ahead of need starts it in the background
        spares = [] if pool is None else ray.get(pool.spares.remote())
        stats = ray.get([h.stats.remote() for h in spares])
        if sum(s["imported"] for s in stats) >= count:
            return [s["pid"] for s in stats if s["imported"]]
        time.sleep(0.5)
    raise AssertionError(f"no {count} spares after {timeout_s:.0f} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not alive(pid)


def test_a_second_model_of_a_kind_loads_into_warm_spares(session, register, keras_model, digits, digits_parquet):
    model, path = keras_model
    pixels, _ = digits
    register("warm_first", path, workers=1, num_cpus=WORKER_CPUS)
    (spare,) = spare_pids(session, 1)  # the first registration asked for one spare of its kind
    second = register("warm_second", path, workers=1, num_cpus=WORKER_CPUS)
    assert [s["pid"] for s in second.udf.stats()] == [spare]  # loaded where TensorFlow was imported already
    scored = session.sql(f"select warm_second(pixels) as p from '{digits_parquet}' order by id")["p"]
    np.testing.assert_allclose(np.stack(scored.to_numpy()), model.predict(pixels, verbose=0), rtol=1e-5, atol=1e-6)

    # a master that restarts has the pool stop what it lent to its previous life
    from test_faults import pid_of

    os.kill(pid_of(second.udf.master), signal.SIGKILL)
    assert gone(spare)
    again = session.sql(f"select count(warm_second(pixels)) as n from '{digits_parquet}'")
    assert again["n"][0] == len(pixels)  # the restarted master started a worker again
    assert spare not in [s["pid"] for s in second.udf.stats()]


def test_the_workers_of_an_unregistered_function_are_spares_for_the_next(session, register, keras_model, digits, digits_parquet):
    model, path = keras_model
    pixels, _ = digits
    register("reuse_seed", path, workers=1, num_cpus=WORKER_CPUS)  # its master asks the pool for a spare of the kind
    waiting = spare_pids(session, 1)
    first = register("reuse_first", path, workers=1, num_cpus=WORKER_CPUS)
    (spare,) = [s["pid"] for s in first.udf.stats()]
    assert spare in waiting  # lent by the pool
    session.sql(f"select count(reuse_first(pixels)) as n from '{digits_parquet}'")
    session.unregister("reuse_first")
    deadline = time.monotonic() + 30
    while spare not in spare_pids(session, 1) and time.monotonic() < deadline:  # given back, its model dropped
        time.sleep(0.2)
    second = register("reuse_second", path, workers=1, num_cpus=WORKER_CPUS)
    (worker,) = second.udf.stats()
    assert (worker["pid"], worker["rows"], worker["batches"]) == (spare, 0, 0)  # the same process, counting afresh
    scored = session.sql(f"select reuse_second(pixels) as p from '{digits_parquet}' order by id")["p"]
    np.testing.assert_allclose(np.stack(scored.to_numpy()), model.predict(pixels, verbose=0), rtol=1e-5, atol=1e-6)


def test_spares_give_their_resources_to_a_registration_that_needs_them(session, register, keras_model, model_dir):
    _, path = keras_model
    register("warm_owner", path, workers=1, num_cpus=WORKER_CPUS)
    spares = spare_pids(session, 1)  # and those given back by the functions of earlier tests
    time.sleep(1.0)  # Ray's view of free resources catches up with the spares' reservations
    free = ray.available_resources().get("CPU", 0.0)
    # this worker fits only if a spare (holding WORKER_CPUS) is stopped
    register("needs_room", save_pickled(model_dir / "room.pkl", Weighted()), workers=1, num_cpus=free + WORKER_CPUS / 2)
    assert all(gone(pid) for pid in spares)
    assert session.sql("select needs_room(1.0, 2.0) as y from range(1)")["y"][0] == pytest.approx(21.0)


def test_a_new_session_warms_spares_before_its_first_registration(ray_cluster, keras_model, digits):
    from sql_magics import Session

    model, path = keras_model
    pixels, _ = digits
    with Session(warm="keras") as fresh:
        assert fresh.sql("select 42 as x from range(1)")["x"].tolist() == [42]  # the first statement does not wait for the warming
        spares = spare_pids(fresh, 2)  # a default registration's workers: 2
        assert all(os.sched_getscheduler(pid) == os.SCHED_OTHER for pid in spares)  # only their imports ran idly
        registered = fresh.register_model("warm_ahead", path)  # every option its default: the kind warmed
        assert sorted(s["pid"] for s in registered.udf.stats()) == sorted(spares)
        scored = fresh.sql("select warm_ahead(v) as p from (select unnest($v) as v)", parameters={"v": pixels[:20].tolist()})
        np.testing.assert_allclose(np.array(scored["p"].tolist()), model.predict(pixels[:20], verbose=0), atol=1e-5)
    assert all(gone(pid) for pid in spares)


@pytest.mark.skipif(os.geteuid() != 0, reason="leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE (else a spare finishes idly)")
@pytest.mark.parametrize(("wanted", "policy"), [(False, "SCHED_IDLE"), (True, "SCHED_OTHER")])
def test_a_spare_imports_idly_until_a_model_waits_for_its_imports(tmp_path, monkeypatch, wanted, policy):
    from udf_engine.actors.worker import IdleImports

    module = f"slow_framework_{policy.lower()}"
    (tmp_path / f"{module}.py").write_text("import os, time\ntime.sleep(0.5)\nPOLICY = os.sched_getscheduler(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imports = IdleImports([module])
    time.sleep(0.1)  # the import has begun, idly
    if wanted:
        imports.finish()  # while it sleeps: a model waits for it
    else:
        while not imports.done:
            time.sleep(0.05)
    import importlib

    assert importlib.import_module(module).POLICY == getattr(os, policy)


def test_a_spare_whose_framework_does_not_import_says_so_when_a_model_loads(ray_cluster):
    from udf_engine.actors.warm_pool import WorkerKind, worker_actor
    from udf_engine.resources import WorkerResources
    from udf_engine.settings import UDFConf

    kind = WorkerKind(("no_such_framework",), WorkerResources(num_cpus=WORKER_CPUS))
    spare = worker_actor(kind).remote(imports=kind.imports)
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="No module named 'no_such_framework'"):
            ray.get(spare.load.remote("w0", lambda refs, conf: None, lambda model, batch: batch, [], UDFConf()), timeout=60)
    finally:
        ray.kill(spare)


def test_warm_names_a_framework_or_none():
    from sql_magics import Session
    from udf_engine import ConfigError

    with pytest.raises(ConfigError, match=r"warm='jax': give one of keras, onnx, torch or none \(\$RAYUDF_WARM takes the same\)"):
        Session(warm="jax")


def test_set_warm_starts_spares_of_a_framework_and_none_stops_them(ray_cluster):
    from sql_magics import ExecutionError, Session

    with Session(warm="none") as fresh:
        assert pool_of(fresh) is None  # nothing warmed yet
        fresh.sql('set warm = "keras"')
        spares = spare_pids(fresh, 2)  # a default registration's workers
        fresh.sql('set warm = "none"')
        assert all(gone(pid) for pid in spares)
        with pytest.raises(ExecutionError, match=r"line 1: set warm = 'jax': give one of keras, onnx, torch or none"):
            fresh.sql('set warm = "jax"')


def test_a_script_starts_the_workers_of_a_later_registration_while_earlier_statements_run(ray_cluster, keras_model, digits):
    from concurrent.futures import ThreadPoolExecutor

    from sql_magics import Session

    model, path = keras_model
    pixels, _ = digits
    script = f'''
        set pause = "sleep 8" where type="shell";
        register keras.`{path}` as later where workers="1";
    '''
    with Session(warm="none") as fresh, ThreadPoolExecutor(1) as runner:
        running = runner.submit(fresh.sql, script)
        spares, deadline = [], time.monotonic() + 30
        while not spares and not running.done() and time.monotonic() < deadline:
            pool = pool_of(fresh)
            spares = [] if pool is None else ray.get(pool.spares.remote())
            time.sleep(0.1)
        assert spares and not running.done()  # placed while the statement before the register runs
        running.result()
        (worker,) = fresh.functions["later"].udf.stats()
        assert worker["pid"] in [ray.get(h.stats.remote())["pid"] for h in spares]  # the registration took it
        scored = fresh.sql("select later(v) as p from (select unnest($v) as v)", parameters={"v": pixels[:20].tolist()})
        np.testing.assert_allclose(np.array(scored["p"].tolist()), model.predict(pixels[:20], verbose=0), atol=1e-5)
