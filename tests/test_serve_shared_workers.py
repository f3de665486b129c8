"""One worker, three callers: the session's SQL and two Serve replicas score through it at once.

Each caller's dispatcher keeps to MAX_IN_FLIGHT_PER_WORKER for its own batches; the worker keeps
to it for all of them (udf_engine.actors.batching). A server of its own, with two replicas, so
the module server of test_serve stays one replica whose /metrics are read at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from udf_engine.actors.batching import MAX_IN_FLIGHT_PER_WORKER

from conftest import WORKER_CPUS, Weighted, free_port, save_pickled

TOKEN = "sh4red-token"


@pytest.fixture(scope="module")
def client(session):
    port = free_port()
    session.sql(f"!serve port={port} token={TOKEN} replicas=2")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
            yield c
    finally:
        session.sql("!serve stop")


def test_a_worker_holds_at_most_two_batches_whoever_sends_them(session, client, model_dir):
    """SQL and both replicas send batches to one worker at once: it holds two at most (one running,
    one waiting), answering BUSY to more, and every answer is the model's."""
    model = Weighted(pause_s=0.01)
    registered = session.register_model(
        "held", save_pickled(model_dir / "shared_held.pkl", model), workers=1, num_cpus=WORKER_CPUS, batch_size=4
    )
    try:
        rows = np.random.default_rng(6).random((600, 2))
        session.con.execute(
            "create or replace table held_rows as select * from (values "
            + ", ".join(f"({i}, {float(a)!r}, {float(b)!r})" for i, (a, b) in enumerate(rows))
            + ") t(i, a, b)"
        )
        with ThreadPoolExecutor(9) as pool:
            sql = pool.submit(lambda: session.sql("select i, held(a, b) as y from held_rows order by i")["y"].to_numpy())
            answers = list(pool.map(lambda i: client.post("/v1/functions/held", json={"inputs": rows[i::8][:40].tolist()}), range(8)))
            scored = sql.result()
        np.testing.assert_allclose(scored, model.predict(rows), rtol=0, atol=1e-12)
        for i, answer in enumerate(answers):
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(answer.json()["outputs"], model.predict(rows[i::8][:40]), rtol=0, atol=1e-12)
        (stats,) = registered.udf.stats()
        # three callers' batches met there (each may send two), and it never held more than its bound
        assert stats["most_held"] <= MAX_IN_FLIGHT_PER_WORKER and stats["bounced"] > 0, stats
    finally:
        session.unregister("held")
