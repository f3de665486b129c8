"""The web-service mode: a session's functions answering real HTTP on 127.0.0.1, through a real Ray Serve.

One server for the module (started with ``!serve``, as a notebook would), on the shared Ray. Every
answer is checked against the same model called in-process on the same rows. Load stays on
loopback and bounded: a few hundred requests at most, from a handful of threads.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import logging
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pyarrow as pa
import pytest

from sql_magics import ExecutionError, Session
from sql_magics.serving import app
from sql_magics.serving import publisher as serving
from sql_magics.serving.options import SERVE_OPTIONS, read_serve_options
from sql_magics.serving.publisher import script_answer
from sql_magics.serving.server import check_binding
from udf_engine import ConfigError

from conftest import WORKER_CPUS, Weighted, free_port, save_pickled

TOKEN = "s3cret-token"
VERSION = "x-rayudf-version"
# The module server's time limit: long enough for a worker's replacement under load, short enough to wait for a runaway.
REQUEST_TIMEOUT_S = 8


class Lengths:
    """The length of each text: a model over strings."""

    def predict(self, batch):
        return np.array([len(text) for text in batch], dtype=np.int64)


class Scale:
    """Each row times two, kept as an array: one step of a pipeline."""

    n_features_in_ = 2

    def predict(self, batch):
        return np.asarray(batch, dtype=np.float64) * 2.0


@pytest.fixture(scope="module")
def server(session, model_dir):
    session.register_model("lin", save_pickled(model_dir / "serve_lin.pkl", Weighted((1.0, 10.0))), workers=2, num_cpus=WORKER_CPUS)
    session.register_model("scale", save_pickled(model_dir / "serve_scale.pkl", Scale()), workers=1, num_cpus=WORKER_CPUS)
    session.register_model(
        "strlen", save_pickled(model_dir / "serve_len.pkl", Lengths()), workers=1, num_cpus=WORKER_CPUS, returns="BIGINT"
    )
    port = free_port()
    started = session.sql(f"!serve port={port} token={TOKEN} allow_scripts=true request_timeout_s={REQUEST_TIMEOUT_S}")
    url = started["url"][0]
    assert url == f"http://127.0.0.1:{port}" and started["functions"][0] == "lin, scale, strlen"
    yield url
    session.sql("!serve stop")
    for name in ("lin", "scale", "strlen"):
        if name in session.functions:
            session.unregister(name)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


def lin(rows) -> np.ndarray:
    return Weighted((1.0, 10.0)).predict(np.asarray(rows, dtype=np.float64))


def test_healthz_needs_no_token_and_every_other_endpoint_does(server, client):
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["functions"] == ["lin", "scale", "strlen"]
    assert set(health["workers"]) == {"lin", "scale", "strlen"} and all(n >= 1 for n in health["workers"].values())
    for path in ("/v1/functions", "/metrics", "/model/predict?data=[[1,2]]&pipeline=lin"):
        assert httpx.get(f"{server}{path}").status_code == 401
        assert httpx.get(f"{server}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{server}/v1/functions/lin", json={"inputs": [[1, 2]]}).status_code == 401
    described = {f["name"]: f for f in client.get("/v1/functions").json()}
    assert described["lin"]["returns"] == "DOUBLE" and described["lin"]["inputs"] == {"width": 2}
    assert described["lin"]["versions"] == [{"version": "1", "share": 1.0, "workers": 2}]


def test_a_function_answers_as_the_model_in_process(client):
    rows = np.random.default_rng(0).random((50, 2))
    answer = client.post("/v1/functions/lin", json={"inputs": rows.tolist()})
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == "1" and answer.headers[VERSION] == "lin=1"
    np.testing.assert_allclose(answer.json()["outputs"], lin(rows), rtol=0, atol=1e-12)


def test_arrow_bodies_in_and_out(client):
    rows = np.random.default_rng(1).random((1000, 2))
    table = pa.table({"a": rows[:, 0], "b": rows[:, 1]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    answer = client.post("/v1/functions/lin", content=sink.getvalue(), headers={"Content-Type": "application/vnd.apache.arrow.stream"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/vnd.apache.arrow.stream"
    scores = pa.ipc.open_stream(answer.content).read_all()["output"].to_numpy()
    np.testing.assert_array_equal(scores, lin(rows))


def test_byzer_predict_takes_its_three_data_types_as_form_query_or_json(client):
    vectors = [[1.0, 2.0], [3.0, 4.5]]
    form = client.post("/model/predict", data={"data": str(vectors), "sql": "select lin(feature[1], feature[2]) as p"})
    assert form.status_code == 200 and form.json() == [{"p": p} for p in lin(vectors)] and form.headers[VERSION] == "lin=1"
    query = client.get("/model/predict", params={"data": str(vectors), "sql": "lin(feature[1], feature[2]) as p"})  # `select` optional
    assert query.json() == form.json()
    texts = client.post("/model/predict", json={"dataType": "string", "data": ["a", "hello"], "sql": "select strlen(feature) as n"})
    assert texts.json() == [{"n": 1}, {"n": 5}]
    rows = client.post("/model/predict", json={"dataType": "row", "data": [{"a": 1, "b": 2}, {"a": 3, "b": 5}], "sql": "lin(a, b) as y, a"})
    assert rows.json() == [{"y": y, "a": a} for y, a in zip(lin([[1, 2], [3, 5]]), (1, 3), strict=True)]


def test_byzer_pipeline_and_any_sql_around_the_model(client):
    vectors = [[1.0, 2.0], [0.5, 0.25]]
    piped = client.post("/model/predict", data={"data": str(vectors), "pipeline": "scale, lin"})  # lin(scale(feature)) as feature
    assert piped.status_code == 200, piped.text
    assert piped.json() == [{"feature": f} for f in lin(np.asarray(vectors) * 2)] and piped.headers[VERSION] == "lin=1, scale=1"
    sql = "select round(lin(a, b) * 2 + 1, 6) as y, upper(name) as who, case when lin(a, b) > 30 then 'high' else 'low' end as level"
    rows = [{"a": 1.0, "b": 2.0, "name": "x"}, {"a": 1.5, "b": 3.0, "name": "y"}]
    answer = client.post("/model/predict", json={"dataType": "row", "data": rows, "sql": sql})
    expected = lin([[1.0, 2.0], [1.5, 3.0]])
    assert answer.json() == [{"y": round(expected[0] * 2 + 1, 6), "who": "X", "level": "low"},
                             {"y": round(expected[1] * 2 + 1, 6), "who": "Y", "level": "high"}]


BAD = [
    ("post", "/v1/functions/lin", {"content": b"not json"}, 400, "not JSON"),
    ("post", "/v1/functions/lin", {"json": {"inputs": [[1, 2, 3]]}}, 400, "expected 2 input values per row, got 3"),
    ("post", "/v1/functions/lin", {"json": {"rows": [[1, 2]]}}, 400, '{"inputs": [[arg, ...], ...]}'),
    ("post", "/v1/functions/lin", {"json": {"inputs": [["a", "b"]]}}, 400, "argument 1 is VARCHAR"),
    ("post", "/v1/functions/lin", {"json": {"inputs": [[1, 2], [3]]}}, 400, "row 2 has 1 arguments, row 1 has 2"),
    ("post", "/v1/functions/lin", {"json": {"inputs": [[]]}}, 400, "row 1 holds no arguments"),
    ("post", "/v1/functions/lin", {"json": {"inputs": [[1, [2, 3]]]}}, 400, "argument 2"),
    ("post", "/v1/functions/nope", {"json": {"inputs": [[1, 2]]}}, 404, "no function named 'nope'"),
    ("get", "/v1/functions/lin", {}, 405, "/v1/functions/lin takes POST, not GET"),
    ("post", "/v1/functions/lin/more", {"json": {"inputs": [[1, 2]]}}, 404, "no endpoint at /v1/functions/lin/more"),
    ("post", "/v1/functions/", {"json": {"inputs": [[1, 2]]}}, 404, "no endpoint at /v1/functions/"),
    ("get", "/docs", {}, 404, "no endpoint at /docs"),
    ("delete", "/healthz", {}, 405, "/healthz takes GET, not DELETE"),
    ("post", "/model/predict", {"data": {"data": "[[1, 2]", "pipeline": "lin"}}, 400, "data is not JSON"),
    ("post", "/model/predict", {"data": {"data": '[["x"]]', "pipeline": "lin"}}, 400, "element 1 is not an array of numbers"),
    ("post", "/model/predict", {"data": {"data": "[[1, 2]]", "dataType": "image", "pipeline": "lin"}}, 400, "dataType 'image'"),
    ("post", "/model/predict", {"data": {"data": "[[1, 2]]"}}, 400, "give sql"),
    ("post", "/model/predict", {"data": {"data": "[[1, 2]]", "sql": "lin(nope) as p"}}, 400, "nope"),
    ("post", "/model/predict", {"data": {"data": "[[1, 2]]", "sql": "1 as x from __rayudf_request; select 2"}}, 400, "one select list"),
    ("post", "/v1/functions/lin", {"content": b"[" * 100_000 + b"]" * 100_000}, 400, "JSON nested deeper than"),
    ("post", "/model/predict", {"json": {"data": "[" * 100_000 + "]" * 100_000, "pipeline": "lin"}}, 400, "data: JSON nested deeper than"),
    ("post", "/model/predict", {"content": b'{"a":' * 100_000, "headers": {"Content-Type": "application/json"}}, 400, "JSON nested deeper"),
]

# What a caller may try to reach past the request's rows with /model/predict's select list: each is a 400 naming what is refused.
ESCAPES = [
    ("(select count(*) from read_text('/etc/hostname')) as n", "the table function read_text() is not taken"),
    ("(select * from read_parquet('/tmp/*.parquet')) as n", "the table function read_parquet() is not taken"),
    ("(select count(*) from '/etc/passwd') as n", "the table /etc/passwd is not taken"),
    ("(select count(*) from glob('/*')) as n", "the table function glob() is not taken"),
    ("1 as x from duckdb_settings() --", "a comment is not taken"),
    ("1 as x from duckdb_settings() /* the rest */", "a comment is not taken"),
    ("(select count(*) from duckdb_settings()) as n", "the table function duckdb_settings() is not taken"),
    ("current_setting('temp_directory') as t", "current_setting() is not taken: it reads the server's settings"),
    ("(select * from query('select 1')) as q", "the table function query() is not taken"),
    ("1 as x from __rayudf_request; copy (select 1) to '/tmp/rayudf-escape.csv'", "give one select list"),
    ("1 as x from __rayudf_request; attach '/tmp/rayudf-escape.db'", "give one select list"),
    ("1 as x from __rayudf_request; set memory_limit='100GB'", "give one select list"),
    ("(with t as (select 1) select * from t) as w", "WITH is not taken"),
    ("list_sum(range(100000000000)) as s", "range() is not taken: it can build a value far larger than the request"),
    ("repeat('x', 1000000000) as big", "repeat() is not taken"),
    ("(select count(*) from __rayudf_request, range(1000000000)) as n", "the table function range() is not taken"),
    ("json_serialize_plan('select current_setting(''secret_directory'') as v', optimize := true) as p",
     "json_serialize_plan() is not taken"),
    ("pg_get_viewdef(1) as v", "pg_get_viewdef() is not taken: it reads the database's catalog"),
    ("replace(b::varchar, '2', b::varchar) as r", "replace() is not taken: it can build a value far larger"),
    ("'x' as a0, " + ", ".join(f"a{i - 1}||a{i - 1} as a{i}" for i in range(1, 30)) + ", length(a29) as n",  # 2^29 times the binder's work
     "a0 names an alias of the same select list"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "says"), BAD, ids=[f"{b[1]} {b[4]}" for b in BAD])
def test_bad_input_is_a_400_that_names_what_is_wrong(client, method, path, body, status, says):
    answer = getattr(client, method)(path, **body)
    assert answer.status_code == status and says in answer.json()["error"], answer.text


@pytest.mark.parametrize(("sql", "says"), ESCAPES, ids=[e[1] for e in ESCAPES])
def test_the_select_list_reads_the_requests_rows_and_nothing_else(client, sql, says):
    answer = client.post("/model/predict", json={"dataType": "row", "data": [{"a": 1, "b": 2}], "sql": sql})
    assert answer.status_code == 400 and says in answer.json()["error"], answer.text
    assert not os.path.exists("/tmp/rayudf-escape.csv") and not os.path.exists("/tmp/rayudf-escape.db")


def test_a_body_over_the_limit_is_a_413_chunked_too(client):
    from sql_magics.serving.requests import MAX_BODY_BYTES

    answer = client.post("/v1/functions/lin", content=b" " * (MAX_BODY_BYTES + 1))
    assert answer.status_code == 413 and "at most" in answer.json()["error"]

    def endless(total: int = 512 << 20, chunk: int = 1 << 20):  # 512 MiB, no Content-Length: sent chunked
        for _ in range(total // chunk):
            yield b" " * chunk

    try:
        answer = client.post("/v1/functions/lin", content=endless())
    except httpx.TransportError:  # the server may close the connection once it answered, with most of the body unsent
        pass
    else:
        assert answer.status_code == 413 and f"over {MAX_BODY_BYTES:,} bytes" in answer.json()["error"]
    assert client.post("/v1/functions/lin", json={"inputs": [[1, 2]]}).json()["outputs"] == [21.0]


def _arrow_body(table: pa.Table, **options) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        writer.write_table(table)
    return sink.getvalue()


def test_arrow_bodies_that_would_inflate_or_read_out_of_bounds_are_refused(client):
    arrow = {"Content-Type": "application/vnd.apache.arrow.stream"}
    zeros = pa.table({"a": np.zeros(20_000_000), "b": np.zeros(20_000_000)})  # 320 MB of doubles in ~30 KB of zstd
    bomb = _arrow_body(zeros, compression="zstd")
    assert len(bomb) < 1 << 20
    answer = client.post("/v1/functions/lin", content=bomb, headers=arrow)
    assert answer.status_code == 400 and "compressed buffers" in answer.json()["error"]
    plain = pa.array([b"aa", b"bb", b"cc"], pa.binary())
    offsets = np.frombuffer(plain.buffers()[1], dtype=np.int32).copy()
    offsets[2] = 1_000_000  # the middle offset points far past the data buffer
    crafted = pa.Array.from_buffers(pa.binary(), 3, [None, pa.py_buffer(offsets.tobytes()), plain.buffers()[2]])
    answer = client.post("/v1/functions/strlen", content=_arrow_body(pa.table({"s": crafted})), headers=arrow)
    assert answer.status_code == 400 and "out of bounds" in answer.json()["error"]
    encoded = pa.table({"s": pa.array(["a", "bb"]).dictionary_encode()})
    answer = client.post("/v1/functions/strlen", content=_arrow_body(encoded), headers=arrow)
    assert answer.status_code == 400 and "send plain (not encoded) arrays" in answer.json()["error"]
    nothing = _arrow_body(pa.table({"n": pa.nulls(2**31 - 1)}))  # 2^31 rows in ~200 bytes
    answer = client.post("/v1/functions/strlen", content=nothing, headers=arrow)
    assert len(nothing) < 1000 and answer.status_code == 400 and "holds nothing in each row" in answer.json()["error"]


def test_a_model_that_raises_answers_its_message_and_the_server_goes_on(client):
    answer = client.post("/v1/functions/lin", json={"inputs": [[1.0, 2.0], [-1.0, 2.0]]})
    assert answer.status_code == 422
    said = "function lin: the model raised ValueError: poison row (a = -1) (row 2 of the 2 rows of this call: [-1.0, 2.0])"
    assert answer.json()["error"] == said
    assert client.post("/v1/functions/lin", json={"inputs": [[1, 2]]}).json()["outputs"] == [21.0]


def test_concurrent_requests_share_calls_to_the_workers(session, server, client, model_dir):
    session.register_model("slow", save_pickled(model_dir / "serve_slow.pkl", Weighted(pause_s=0.3)), workers=1, num_cpus=WORKER_CPUS)
    try:
        rows = np.random.default_rng(2).random((16, 2))
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda row: client.post("/v1/functions/slow", json={"inputs": [row.tolist()]}), rows))
        assert [a.status_code for a in answers] == [200] * 16
        np.testing.assert_allclose([a.json()["outputs"][0] for a in answers], lin(rows), rtol=0, atol=1e-12)
        metrics = client.get("/metrics").text
        count = 'rayudf_batch_requests_count{function="slow"}'
        calls = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(count))
        assert calls < 16  # 16 requests, fewer calls: while the worker scored, the others queued and went together
        assert 'rayudf_requests_total{function="slow",endpoint="v1",code="200"} 16' in metrics
    finally:
        session.unregister("slow")


def test_a_hung_batch_answers_504_and_the_function_recovers(session, client, model_dir):
    session.register_model(
        "hangs", save_pickled(model_dir / "serve_hangs.pkl", Weighted()), workers=1, num_cpus=WORKER_CPUS, batch_timeout_s=2
    )
    try:
        answer = client.post("/v1/functions/hangs", json={"inputs": [[-5.0, 1.0]]})
        assert answer.status_code == 504 and "batch_timeout_s=2 s" in answer.json()["error"]
        assert client.post("/v1/functions/hangs", json={"inputs": [[1.0, 1.0]]}).json()["outputs"] == [11.0]
    finally:
        session.unregister("hangs")


def _hammer(client, stop: threading.Event, answers: list, rows: np.ndarray) -> None:
    while not stop.is_set():
        answers.append((client.post("/v1/functions/lin", json={"inputs": rows.tolist()}), time.monotonic()))


def test_a_swap_under_load_fails_no_request_and_no_answer_mixes_versions(session, server, client, model_dir):
    rows = np.random.default_rng(3).random((4, 2))
    weights = {"1": (1.0, 10.0)}
    stop, answers = threading.Event(), []
    threads = [threading.Thread(target=_hammer, args=(client, stop, answers, rows)) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        for version, w in (("2", (2.0, 20.0)), ("3", (3.0, 30.0))):
            session.register_model("lin", save_pickled(model_dir / f"serve_lin{version}.pkl", Weighted(w)), workers=2, num_cpus=WORKER_CPUS)
            weights[version] = w
            swapped = time.monotonic()
            time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        session.register_model("lin", save_pickled(model_dir / "serve_lin.pkl", Weighted((1.0, 10.0))), workers=2, num_cpus=WORKER_CPUS)
    assert len(answers) > 20 and {a.status_code for a, _ in answers} == {200}
    for answer, _ in answers:  # each answer is one version's, entire
        version = answer.json()["version"]
        assert answer.headers[VERSION] == f"lin={version}"
        np.testing.assert_allclose(answer.json()["outputs"], Weighted(weights[version]).predict(rows), rtol=0, atol=1e-12)
    assert {a.json()["version"] for a, _ in answers} == {"1", "2", "3"}
    assert {a.json()["version"] for a, at in answers if at > swapped + 1.0} == {"3"}


def test_a_canary_answers_its_share_and_models_shows_the_split(session, client, model_dir):
    session.register_model("canary", save_pickled(model_dir / "serve_c1.pkl", Weighted((1.0, 10.0))), workers=1, num_cpus=WORKER_CPUS)
    try:
        session.register_model(
            "canary", save_pickled(model_dir / "serve_c2.pkl", Weighted((2.0, 20.0))), workers=1, num_cpus=WORKER_CPUS, traffic=0.3
        )
        assert session.sql("!models").set_index("function").loc["canary", "traffic"] == "1=0.7, 2=0.3"
        time.sleep(1.0)  # the replica hears of the canary
        answers = [client.post("/v1/functions/canary", json={"inputs": [[1, 1]]}).json() for _ in range(300)]
        by_version = {v: [a["outputs"][0] for a in answers if a["version"] == v] for v in ("1", "2")}
        assert set(by_version["1"]) <= {11.0} and set(by_version["2"]) <= {22.0}
        # 300 draws at 0.3: 90 expected, standard deviation 7.9; 5 of them either way
        assert 50 < len(by_version["2"]) < 130 and len(by_version["1"]) + len(by_version["2"]) == 300
        statements = [session.sql("select canary(1.0, 1.0) as y from range(1)")["y"][0] for _ in range(60)]  # statements split too
        assert set(statements) == {11.0, 22.0}
    finally:
        session.unregister("canary")


def test_a_worker_killed_under_load_loses_no_request(session, client, model_dir):
    registered = session.register_model(
        "sturdy", save_pickled(model_dir / "serve_sturdy.pkl", Weighted(pause_s=0.05)), workers=2, num_cpus=WORKER_CPUS
    )
    try:
        rows = np.random.default_rng(4).random((30, 2))
        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(client.post, "/v1/functions/sturdy", json={"inputs": [row.tolist()] * 50}) for row in rows]
            while sum(s["batches"] for s in registered.udf.stats()) < 3:
                time.sleep(0.02)
            victim = next(s["pid"] for s in registered.udf.stats() if s["alive"])
            os.kill(victim, signal.SIGKILL)
            answers = [r.result() for r in running]
        assert [a.status_code for a in answers] == [200] * len(rows)
        for row, answer in zip(rows, answers, strict=True):
            np.testing.assert_allclose(answer.json()["outputs"], lin([row] * 50), rtol=0, atol=1e-12)
        assert victim not in [s["pid"] for s in registered.udf.stats()]
    finally:
        session.unregister("sturdy")


def test_run_script_runs_in_the_session_and_swaps_what_it_registers(session, client, model_dir):
    answer = client.post("/run/script", json={"sql": "select 41 + 1 as answer as t", "includeSchema": "true"})  # table t
    assert answer.json() == {"schema": {"type": "struct", "fields": [{"name": "answer", "type": "int32", "nullable": True}]},
                             "data": [{"answer": 42}]}
    path = save_pickled(model_dir / "serve_script.pkl", Weighted((5.0, 50.0)))
    script = f'register sklearn.`{path}` as lin where workers="2" and num_cpus="{WORKER_CPUS}"; select count(*) as n from range(3)'
    try:
        assert client.post("/run/script", json={"sql": script}).json() == [{"n": 3}]
        time.sleep(1.0)  # the replica hears of the new version
        assert client.post("/v1/functions/lin", json={"inputs": [[1, 1]]}).json()["outputs"] == [55.0]
    finally:
        session.register_model("lin", save_pickled(model_dir / "serve_lin.pkl", Weighted((1.0, 10.0))), workers=2, num_cpus=WORKER_CPUS)
    own = client.post("/run/script", json={"sql": "create table mine as select 1 as x; select * from mine", "owner": "ann",
                                           "sessionPerUser": "true"})
    assert own.json() == [{"x": 1}] and "mine" not in session.sql("show tables")["name"].tolist()  # ann's own session
    bad = client.post("/run/script", json={"sql": "select nope from nowhere"})
    assert bad.status_code == 500 and "nowhere" in bad.json()["error"]


def test_serve_status_and_a_second_server_refused(session, server):
    assert session.sql("!serve status")["url"].tolist() == [server]
    with pytest.raises(Exception, match="already serves"):
        session.sql(f"!serve port={free_port()}")


def test_binding_beyond_this_machine_needs_a_token_and_scripts_always_do():
    check_binding("127.0.0.1", None)
    check_binding("0.0.0.0", TOKEN)
    check_binding("127.0.0.1", TOKEN, allow_scripts=True)
    with pytest.raises(ConfigError, match="binding 0.0.0.0 opens the server beyond this machine; give a token"):
        check_binding("0.0.0.0", None)
    with pytest.raises(ConfigError, match="--allow-scripts runs scripts .* give a token"):
        check_binding("127.0.0.1", None, allow_scripts=True)


def test_run_script_takes_json_posts_only_and_nothing_from_other_sites(server, client):
    script = {"sql": "select 1 as x from range(1)"}
    assert client.post("/run/script", json=script).json() == [{"x": 1}]
    for answer in (client.get("/run/script", params=script), client.post("/run/script", data=script),
                   client.post("/run/script", content=b'{"sql": "select 1"}', headers={"Content-Type": "text/plain"})):
        assert answer.status_code == 415 and "POST with a JSON body" in answer.json()["error"]
    # what a web page of another site can make a browser send: a form POST, or a JSON one the server never allowed
    evil = {"Origin": "http://evil.example"}
    for answer in (httpx.post(f"{server}/run/script", data=script, headers=evil), client.post("/run/script", json=script, headers=evil)):
        assert answer.status_code == 403 and "web pages of other origins" in answer.json()["error"]
    # a GET an <img> of another site makes carries no Origin; the browser says where it comes from all the same
    image = httpx.get(f"{server}/model/predict", params={"data": "[[1, 2]]", "pipeline": "lin"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert image.status_code == 403 and "Sec-Fetch-Site: cross-site" in image.json()["error"]
    other_port = {"Origin": "http://127.0.0.1:1"}  # another server of this machine is another origin
    assert client.post("/run/script", json=script, headers=other_port).status_code == 403
    # a DNS-rebinding name that resolves to 127.0.0.1: the Host it sends is not this server's
    rebound = {"Host": f"evil.example:{server.rsplit(':', 1)[1]}"}
    assert client.post("/run/script", json=script, headers=rebound).status_code == 421
    assert httpx.get(f"{server}/healthz", headers=rebound).status_code == 421
    assert httpx.get(f"{server}/healthz", headers={"Host": "["}).status_code in (400, 421)  # HAProxy refuses it itself
    assert client.get("/v1/functions", headers={"Host": "localhost"}).status_code == 200  # loopback's names are this server's


EXITS = "run command as Ray.`` where outputTable=\"o\" and code='''raise SystemExit(3)'''"


def test_a_script_that_exits_or_gives_what_arrow_cannot_hold_still_answers(client):
    answer = client.post("/run/script", json={"sql": EXITS}, timeout=30)
    assert answer.status_code == 500 and "SystemExit" in answer.json()["error"]
    union = client.post("/run/script", json={"sql": "select union_value(k := 1) as u from range(1)"}, timeout=30)
    assert union.status_code in (200, 500), union.text
    assert client.post("/run/script", json={"sql": "select 2 as x from range(1)"}).json() == [{"x": 2}]  # the server goes on


def test_scripts_of_one_owner_each_read_their_own_result(client):
    def run(who: str) -> list[str]:
        body = {"sql": f"select '{who}' as who as t", "owner": "bob", "sessionPerUser": "true"}
        return [client.post("/run/script", json=body).json()[0]["who"] for _ in range(8)]

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(run, ("first", "second"))
    assert set(first) == {"first"} and set(second) == {"second"}


def _running(client) -> int:
    line = next(line for line in client.get("/metrics").text.splitlines() if line.startswith("rayudf_sql_queries_running "))
    return int(float(line.split()[-1]))


# 3,000 rows in a three-way cross product: 2.7e10 rows to hash, minutes of one core.
RUNAWAY = {"dataType": "row", "data": [{"a": i, "b": 1} for i in range(3000)],
           "sql": "(select count(*) from __rayudf_request x, __rayudf_request y, __rayudf_request z "
                  "where hash(x.a + y.a + z.a) % 7 = 0) as n"}


def test_a_runaway_select_list_is_stopped_at_the_time_limit_while_the_server_answers(client):
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        runaway = pool.submit(client.post, "/model/predict", json=RUNAWAY)
        time.sleep(1.0)
        for _ in range(5):  # meanwhile the server answers as ever
            assert client.post("/v1/functions/lin", json={"inputs": [[1, 2]]}).json()["outputs"] == [21.0]
        answer = runaway.result()
    assert answer.status_code in (504, 408), answer.text  # our time limit, or Serve's proxy's (the same number)
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 5
    deadline = time.monotonic() + 5
    while _running(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(client) == 0  # interrupted, not left to run for hours


def test_a_client_that_gives_up_stops_its_query(server, client):
    with ThreadPoolExecutor(1) as pool:
        gone = pool.submit(httpx.post, f"{server}/model/predict", json=RUNAWAY, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2)
        deadline = time.monotonic() + 5
        while not _running(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _running(client) == 1
        with pytest.raises(httpx.ReadTimeout):
            gone.result()
    left = time.monotonic()
    while _running(client) and time.monotonic() < left + REQUEST_TIMEOUT_S - 2:
        time.sleep(0.1)
    assert _running(client) == 0 and time.monotonic() < left + REQUEST_TIMEOUT_S - 2  # stopped by the disconnect, not the time limit


def test_metrics_count_requests_latency_and_batches_per_function(client):
    client.post("/v1/functions/lin", json={"inputs": [[1, 2]]})
    text = client.get("/metrics").text
    for needed in ('rayudf_requests_total{function="lin",endpoint="v1",code="200"}', 'rayudf_request_seconds_bucket{function="lin"',
                   'rayudf_batch_requests_count{function="lin"}', 'rayudf_batch_rows_sum{function="lin"}', "rayudf_errors_total"):
        assert needed in text, needed


def test_async_clients_at_concurrency_32_all_succeed(server):
    async def load() -> list[int]:
        async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
            answers = await asyncio.gather(*(c.post("/v1/functions/lin", json={"inputs": [[i, 1]]}) for i in range(32)))
        return [a.json()["outputs"][0] for a in answers]

    assert asyncio.run(load()) == list(lin([[i, 1] for i in range(32)]))


def test_serve_options_are_read_once_for_the_command_and_python(session, monkeypatch):
    with pytest.raises(ExecutionError, match=r"serve: option 'prot' is not supported here \(supported: host, port, token, allow_scripts"):
        session.sql("!serve prot=8001")
    with pytest.raises(ExecutionError, match="option port: expected int, got 'eighty'"):
        session.sql("!serve port=eighty")
    with pytest.raises(ExecutionError, match="option allow_scripts: expected true or false"):
        session.sql("!serve allow_scripts=maybe")
    with pytest.raises(ExecutionError, match="!serve: expected key=value with a key of host, port, token, allow_scripts"):
        session.sql("!serve 8001")
    with pytest.raises(ConfigError, match="serve: replicas must be at least 1, got 0"):
        session.serve(replicas=0)
    keywords = inspect.signature(Session.serve).parameters
    assert {name: p.default for name, p in keywords.items() if name != "self"} == {o.name: o.default for o in SERVE_OPTIONS}
    monkeypatch.setenv("RAYUDF_TOKEN", "from-the-environment")
    assert read_serve_options({}).token == "from-the-environment"
    assert read_serve_options({"token": "given"}).token == "given"
    assert read_serve_options({"allow_scripts": "on", "port": "8001"}).allow_scripts is True


@pytest.fixture
def replica_log(caplog, monkeypatch):
    """What the replicas' logger records, handed on to the root's where caplog reads (Ray may keep its loggers' records)."""
    for name in ("ray.serve", "ray"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    return caplog


def test_a_replica_whose_following_fails_logs_it_and_follows_on(monkeypatch, replica_log):
    import ray

    monkeypatch.setattr(app, "_FOLLOW_RETRY_S", 0.01)
    monkeypatch.setattr(app, "_DIRECTORY_RETRY_S", 0.01)
    # what the directory answers each poll: a fault of ours, news, the directory out of reach, news it fails to take in once
    answers = [ValueError("a fault of ours"), (1, "one"), ray.exceptions.RayError("the directory is restarting"), (2, "two"), (2, "two")]
    asked, applied, refuse, lost = [], [], {"two"}, []

    async def ask(known: int):
        asked.append(known)
        if not answers:
            await asyncio.sleep(3600)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def apply(entries: str, *starting: str) -> None:
        if entries in refuse:
            refuse.discard(entries)
            raise TypeError(f"cannot take {entries} in")
        applied.append(entries)

    async def follow_a_while() -> None:
        following = asyncio.create_task(app.follow_directory(ask, apply, lambda: lost.append(len(applied)), 0, "replica r1"))
        while len(applied) < 2 and not following.done():
            await asyncio.sleep(0.01)
        following.cancel()

    asyncio.run(asyncio.wait_for(follow_a_while(), 10))
    # out of reach, the replica forgets what it had (lost) and asks the directory again from revision 0
    assert applied == ["one", "two"] and asked == [0, 0, 1, 0, 0, 2] and lost == [1]
    logged = [r for r in replica_log.records if r.name == app._log.name]
    assert [r.exc_info[0] for r in logged] == [ValueError, TypeError]  # the directory out of reach is no fault: not logged
    assert all("replica r1: following the directory failed" in r.getMessage() for r in logged)


def test_a_500_is_logged_with_its_traceback_and_answers_one_line(replica_log):
    from sql_magics.serving.requests import RequestError

    try:
        raise RuntimeError("actor 5f1e0c pid 4242 at 10.0.0.7\nsecond line")
    except RuntimeError as err:
        answer = app.error_answer(err, "v1")
    said = json.loads(answer.body)["error"]
    assert answer.status_code == 500 and "\n" not in said and "4242" not in said and said.startswith("internal error (RuntimeError)")
    incident = re.search(r"error id (\w+)$", said).group(1)
    (record,) = [r for r in replica_log.records if incident in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info[0] is RuntimeError and "pid 4242" in str(record.exc_info[1])
    mistake = app.error_answer(RequestError("the body is not JSON"), "v1")  # the caller's: its own message, nothing logged
    assert mistake.status_code == 400 and json.loads(mistake.body) == {"error": "the body is not JSON"}
    assert len(replica_log.records) == 1


def test_a_503_says_restarting_with_retry_after_and_nothing_of_rays(replica_log):
    import ray

    from sql_magics.serving.requests import RestartingError
    from udf_engine.errors import WorkerError

    said_by_ray = "actor 5f1e0c9a8b7d6e5f4a3b2c1d pid 4242 at 10.0.0.7: The actor is dead because its owner has died"
    for err in (WorkerError(f"the workers of f are gone: {said_by_ray}"), ray.exceptions.RayError(said_by_ray)):
        answer = app.error_answer(err, "v1")
        said = json.loads(answer.body)["error"]
        assert answer.status_code == 503 and answer.headers["retry-after"] == str(app.RETRY_AFTER_S)
        assert "4242" not in said and "10.0.0.7" not in said and "owner" not in said
        assert said.startswith("the function's workers are restarting")
    assert [r.exc_info[1] is not None and "4242" in str(r.exc_info[1]) for r in replica_log.records] == [True, True]  # the log has it
    said = "function f is restarting; try again in a few seconds"
    restarting = app.error_answer(RestartingError(said), "v1")
    assert restarting.status_code == 503 and json.loads(restarting.body) == {"error": said}


def test_a_script_that_answers_500_is_logged_with_its_traceback(caplog):
    def exits(sql, owner):
        raise SystemExit(3)

    with caplog.at_level(logging.ERROR, logger=serving.__name__):
        answer = script_answer({"sql": "select 1"}, exits)
    assert answer == {"status": 500, "body": {"error": "/run/script: SystemExit: 3"}}
    (record,) = caplog.records
    assert "/run/script answers 500" in record.getMessage() and record.exc_info[0] is SystemExit
    assert script_answer({"sql": "select 1", "includeSchema": "maybe"}, exits)["status"] == 400


def test_a_registration_the_replicas_do_not_confirm_says_so_until_they_do(session, server, model_dir, monkeypatch, caplog):
    """Last of the module's server tests: the replica it leaves behind counts for REPLICA_SILENT_S after its last poll."""
    import ray

    monkeypatch.setattr(serving, "HEARD_TIMEOUT_S", 1.0)
    directory = session.serving._publisher.directory
    ray.get(directory.follow.remote(0, "stuck", [], {}))  # a replica that polls once and no more: it runs on revision 0
    assert session.sql("!serve status")["warning"].tolist() == [""]
    with caplog.at_level(logging.WARNING, logger=serving.__name__):
        session.register_model("late", save_pickled(model_dir / "serve_late.pkl", Weighted()), workers=1, num_cpus=WORKER_CPUS)
    try:
        said = r"^serve: 1 of \d+ replicas did not confirm the newest change of the served functions \(a registration, swap or removal\)"
        assert [r.getMessage() for r in caplog.records if re.match(said, r.getMessage())], caplog.text  # the stuck one; others heard
        assert re.match(said, session.sql("!serve status")["warning"][0])
        revision, *_ = ray.get(directory.follow.remote(0, "stuck", [], {}))  # it hears at last,
        ray.get(directory.follow.remote(revision, "stuck", [], {}))  # and says so with its next poll
        deadline = time.monotonic() + 5
        while session.sql("!serve status")["warning"][0] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session.sql("!serve status")["warning"].tolist() == [""]
    finally:
        session.unregister("late")
