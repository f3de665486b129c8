"""Text models and PyTorch models as SQL functions: each kind and task scores what the same model
gives in-process on the same rows (Transformers' own pipeline, sentence-transformers' encode,
the torch module called directly), through a real Ray and DuckDB. The models are small, built
from configs with random weights (sql_magics/front/text_data.py): nothing is downloaded.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import cloudpickle
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")

import torch
import transformers

from sql_magics import ExecutionError
from sql_magics.front.text_data import LABELS, TINY, save_sentence_transformer, save_text_models, stdlib_texts
from udf_engine.models.token_batches import padding_share, token_batches

from conftest import WORKER_CPUS, numbered_table, registered

TOLERANCE = 1e-5
ONE = f'workers="1" and num_cpus="{WORKER_CPUS}"'  # one small worker


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_models")
    paths = save_text_models(root, TINY)
    paths["sentences"] = save_sentence_transformer(paths["encoder"], root, TINY)
    return paths


@pytest.fixture(scope="module")
def texts() -> list[str | None]:
    """Texts of mixed lengths: short lines, joined paragraphs past the model's maximum, an empty one and a NULL."""
    lines = stdlib_texts()
    rng = np.random.default_rng(3)
    mixed = [" ".join(lines[i : i + int(n)]) for i, n in zip(rng.integers(0, len(lines) - 20, 60), rng.integers(1, 12, 60), strict=True)]
    return [*mixed[:30], "", None, *mixed[30:]]


@pytest.fixture(scope="module")
def text_table(session, texts):
    return numbered_table(session, "text_rows", "t", texts)


def scored(session, function: str, table: str = "text_rows") -> list:
    """Each row's answer as Python values (a STRUCT a dict, NULL None)."""
    return [y for _, y in session.con.execute(f"select i, {function}(t) as y from {table} order by i").fetchall()]


def test_a_text_classifier_scores_what_the_pipeline_gives(session, made, texts, text_table):
    with registered(session, f"register transformers.`{made['classifier']}` as sentiment where {ONE}", "sentiment"):
        got = scored(session, "sentiment")
        pipe = transformers.pipeline("text-classification", model=str(made["classifier"]), device="cpu")
        for text, answer in zip(texts, got, strict=True):
            if text is None:
                assert answer is None  # a NULL text gives NULL
                continue
            (want,) = pipe([text], truncation=True)
            assert answer["label"] == want["label"] and abs(answer["score"] - want["score"]) < TOLERANCE, (text, answer, want)
        models = session.sql("!models").set_index("function")
        assert models.loc["sentiment", "returns"] == "STRUCT(label VARCHAR, score FLOAT)"
        assert "task=text-classification (config.json: BertForSequenceClassification)" in models.loc["sentiment", "model"]
        (worker,) = session.sql("!workers").query("function == 'sentiment'").to_dict("records")
        long = sum(1 for t in texts if t is not None and len(pipe.tokenizer(t)["input_ids"]) > TINY.max_length)
        assert long > 0 and worker["truncated"] == long and worker["device"] == "cpu"


def test_every_label_s_score_in_the_config_s_order(session, made, texts, text_table):
    with registered(session, f"register transformers.`{made['classifier']}` as scores where output='scores' and {ONE}", "scores"):
        got = scored(session, "scores")
        pipe = transformers.pipeline("text-classification", model=str(made["classifier"]), device="cpu")
        kept = [t for t in texts if t is not None]
        want = [{d["label"]: d["score"] for d in row} for row in pipe(kept, truncation=True, top_k=None)]
        answers = [a for t, a in zip(texts, got, strict=True) if t is not None]
        np.testing.assert_allclose(answers, [[row[label] for label in LABELS] for row in want], atol=TOLERANCE, rtol=0)


def test_a_token_classifier_lists_what_the_pipeline_lists(session, made, texts, text_table):
    with registered(session, f"register transformers.`{made['tagger']}` as tags where {ONE}", "tags"):
        got = scored(session, "tags")
        pipe = transformers.pipeline("token-classification", model=str(made["tagger"]), device="cpu")
        for text, answer in zip(texts[:12], got[:12], strict=True):  # short texts: the pipeline does not truncate
            if text is None or len(pipe.tokenizer(text)["input_ids"]) > TINY.max_length:
                continue
            want = pipe(text)
            assert [(e["entity"], e["word"], e["start"], e["end"]) for e in answer] == [
                (e["entity"], e["word"], e["start"], e["end"]) for e in want
            ]
            np.testing.assert_allclose([e["score"] for e in answer], [e["score"] for e in want], atol=TOLERANCE, rtol=0)


def _embedded(path, text: str, pooling: str, normalize: bool) -> np.ndarray:
    """The encoder called in-process on one text, pooled by hand."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    encoded = tokenizer(text, truncation=True, max_length=TINY.max_length, return_tensors="pt")
    with torch.inference_mode():
        states = model(**encoded).last_hidden_state[0]
    vector = states[0] if pooling == "cls" else states.mean(0)
    return (vector / vector.norm() if normalize else vector).numpy()


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", False), ("cls", True)])
def test_embeddings_pool_as_asked(session, made, texts, text_table, pooling, normalize):
    asked = f"pooling='{pooling}' and normalize='{str(normalize).lower()}' and max_batch_tokens='200' and {ONE}"
    with registered(session, f"register transformers.`{made['encoder']}` as embed where {asked}", "embed"):
        got = scored(session, "embed")
        assert session.sql("!models").set_index("function").loc["embed", "returns"] == "FLOAT[32]"
        for text, answer in list(zip(texts, got, strict=True))[::7]:
            if text is not None:
                np.testing.assert_allclose(answer, _embedded(made["encoder"], text, pooling, normalize), atol=TOLERANCE, rtol=0)
        (worker,) = session.sql("!workers").query("function == 'embed'").to_dict("records")
        assert worker["truncated"] > 0


def test_a_sentence_transformer_embeds_what_encode_gives(session, made, texts, text_table):
    from sentence_transformers import SentenceTransformer

    with registered(session, f"register model.`{made['sentences']}` as embed_st where {ONE}", "embed_st"):
        got = scored(session, "embed_st")
        models = session.sql("!models").set_index("function")
        assert models.loc["embed_st", "kind"] == "sentence_transformers" and models.loc["embed_st", "returns"] == "FLOAT[32]"
        kept = [t for t in texts if t is not None]
        want = SentenceTransformer(str(made["sentences"]), device="cpu").encode(kept)
        np.testing.assert_allclose([a for a in got if a is not None], want, atol=TOLERANCE, rtol=0)
        assert got[texts.index(None)] is None


def test_a_text_too_long_is_an_error_naming_the_row_when_asked(session, made, text_table):
    with registered(session, f"register transformers.`{made['classifier']}` as strict where truncation='error' and {ONE}", "strict"):
        long = "word " * 200
        session.con.execute(f"create or replace table two_texts as select * from (values (1, 'short'), (2, '{long}')) v(i, t)")
        said = r"function strict: .*a text of \d+ tokens is longer than the model's 48 \(truncation=\"error\"\) \(row 2 "
        with pytest.raises(ExecutionError, match=said):
            session.sql("select strict(t) from two_texts order by i")


def test_a_text_model_takes_one_varchar_and_says_so(session, made):
    with registered(session, f"register transformers.`{made['classifier']}` as needs_text where {ONE}", "needs_text"):
        with pytest.raises(ExecutionError, match=r"function needs_text: a text model takes one VARCHAR argument, got \(BIGINT\)"):
            session.sql("select needs_text(range) from range(3)")
        with pytest.raises(ExecutionError, match=r"function needs_text: a text model takes one VARCHAR argument, got \(VARCHAR, VARCHAR\)"):
            session.sql("select needs_text('a', 'b')")


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ('task="summarization"', "option task: 'summarization' is not one of text-classification, token-classification"),
        ('truncation="drop"', "option truncation: 'drop' is not one of truncate, error"),
        ('dtype="int8"', "option dtype: 'int8' is not one of float32, float16, bfloat16"),
        ('max_batch_tokens="lots"', "option max_batch_tokens: expected int, got 'lots'"),
        ('pooling="max"', "option pooling: 'max' is not one of mean, cls"),
    ],
)
def test_text_options_are_checked_at_the_statement(session, made, options, says):
    with pytest.raises((ExecutionError, Exception), match=says):
        session.sql(f"register transformers.`{made['classifier']}` as refused where {options}")
    assert "refused" not in session.functions


def test_token_budget_batches_pad_less_than_fixed_row_batches():
    lengths = np.random.default_rng(1).pareto(1.2, 2000).clip(0, 50).astype(int) * 8 + 5  # long-tailed, 5 to 405 tokens
    fixed = [list(range(i, min(i + 32, len(lengths)))) for i in range(0, len(lengths), 32)]
    budgeted = token_batches(lengths, 4096)
    assert sorted(int(i) for group in budgeted for i in group) == list(range(len(lengths)))  # every row once
    assert all(len(g) == 1 or len(g) * max(lengths[g]) <= 4096 for g in budgeted)
    assert padding_share(lengths, budgeted) * 10 < padding_share(lengths, fixed)  # here 0.17 against 8.4


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.layers(x).softmax(-1)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_models")
    net = Net().eval()
    example = torch.zeros(2, 4)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("rows")},)), root / "net.pt2")
    torch.jit.script(net).save(str(root / "net.pt"))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Net travels with the pickle: workers do not import tests
    try:
        (root / "net.pkl").write_bytes(cloudpickle.dumps(net))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return net, root


@pytest.mark.parametrize(("file", "dtype", "tolerance"), [("net.pt2", "float32", TOLERANCE), ("net.pt", "float32", TOLERANCE),
                                                          ("net.pkl", "float32", TOLERANCE), ("net.pkl", "bfloat16", 1e-2)])
def test_a_torch_model_scores_what_it_gives_in_process(session, torch_files, file, dtype, tolerance):
    net, root = torch_files
    with registered(session, f"register torch.`{root / file}` as net where dtype=\"{dtype}\" and {ONE}", "net"):
        frame = session.sql("select a, b, c, d, net(a, b, c, d) as p from (select range / 7.0 as a, 1 - range / 9.0 as b, "
                            "(range % 5)::DOUBLE as c, 0.5 as d from range(300)) order by a")
        with torch.inference_mode():
            want = net(torch.tensor(frame[["a", "b", "c", "d"]].to_numpy(), dtype=torch.float32)).numpy()
        np.testing.assert_allclose(np.stack(frame["p"]), want, atol=tolerance, rtol=0)
        assert session.sql("!models").set_index("function").loc["net", "returns"] == "FLOAT[3]"


def test_a_worker_with_a_logical_gpu_gets_it_and_runs_on_the_cpu_it_falls_back_to(session, torch_files):
    _, root = torch_files
    two_on_half_gpus = f'num_gpus="0.5" and workers="2" and num_cpus="{WORKER_CPUS}"'
    with registered(session, f"register torch.`{root / 'net.pkl'}` as on_gpu where {two_on_half_gpus}", "on_gpu"):
        workers = session.sql("!workers").query("function == 'on_gpu'")
        # fractional GPUs: Ray may put both workers on one card; each sees the card it was given, and torch finds no CUDA here
        assert all(len(ids) == 1 for ids in workers["gpu_ids"]) and set(workers["device"]) == {"cpu"}
        info = session.sql("!models").set_index("function").loc["on_gpu", "model"]
        assert "device=cpu" in info


def test_a_worker_killed_mid_query_gives_exactly_the_same_rows(session, made, texts):
    two = f'workers="2" and num_cpus="{WORKER_CPUS}" and batch_size="16"'
    with registered(session, f"register transformers.`{made['classifier']}` as steady where {two}", "steady"):
        many = [t for t in texts if t is not None] * 60
        numbered_table(session, "many_texts", "t", many)
        want = scored(session, "steady", "many_texts")
        udf = session.functions["steady"].udf
        before = sum(s["batches"] for s in udf.stats())
        killed: list[float] = []

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 30
            while sum(s["batches"] for s in udf.stats()) < before + 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(udf.stats()[0]["pid"], signal.SIGKILL)
            killed.append(time.monotonic())

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        got = scored(session, "steady", "many_texts")
        ended = time.monotonic()
        killer.join()
        assert killed and killed[0] < ended  # the worker died while the query ran
        assert got == want


def test_warm_torch_spares_take_a_text_model(ray_cluster, made):
    from test_warm_pool import gone, spare_pids

    from sql_magics import Session

    with Session(warm="torch") as fresh:
        spares = spare_pids(fresh, 2)  # a default registration's workers, torch and transformers imported
        fresh.sql(f"register transformers.`{made['classifier']}` as warm_sentiment")  # every option its default: the kind warmed
        assert sorted(s["pid"] for s in fresh.functions["warm_sentiment"].udf.stats()) == sorted(spares)
        (answer,) = fresh.con.execute("select warm_sentiment('a new path')").fetchone()
        (want,) = transformers.pipeline("text-classification", model=str(made["classifier"]), device="cpu")(["a new path"])
        assert answer["label"] == want["label"] and abs(answer["score"] - want["score"]) < TOLERANCE
    assert all(gone(pid) for pid in spares)


@pytest.fixture(scope="module")
def mlflow_models(tmp_path_factory, made, torch_files):
    """The classifier logged with mlflow.transformers to a real tracking store (registered as 'feelings'),
    the embedder saved with mlflow.sentence_transformers and Net with mlflow.pytorch (torch.export)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    pytest.importorskip("mlflow")
    import mlflow
    import mlflow.pytorch
    import mlflow.sentence_transformers
    import mlflow.transformers
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("mlflow_text")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.create_experiment("text", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment("text")
        parts = {"model": transformers.AutoModelForSequenceClassification.from_pretrained(made["classifier"]),
                 "tokenizer": transformers.AutoTokenizer.from_pretrained(made["classifier"])}
        with mlflow.start_run():  # pip_requirements given: MLflow would otherwise look for torchvision's version
            mlflow.transformers.log_model(parts, name="model", task="text-classification", registered_model_name="feelings",
                                          pip_requirements=["transformers", "torch"])
    finally:
        mlflow.set_tracking_uri(None)
    mlflow.sentence_transformers.save_model(SentenceTransformer(str(made["sentences"]), device="cpu"), str(root / "st"),
                                            pip_requirements=["sentence-transformers"])
    net, _ = torch_files
    mlflow.pytorch.save_model(net, str(root / "pt"), input_example=np.zeros((2, 4), np.float32), pip_requirements=["torch"])
    return {"uri": uri, "st": root / "st", "pt": root / "pt"}


def test_mlflow_s_torch_flavors_run_as_the_text_and_torch_kinds(session, made, texts, text_table, mlflow_models, torch_files):
    from sentence_transformers import SentenceTransformer

    register = f"register mlflow.`models:/feelings/1` as feelings where tracking_uri='{mlflow_models['uri']}' and {ONE}"
    with registered(session, register, "feelings"):
        got = scored(session, "feelings")
        pipe = transformers.pipeline("text-classification", model=str(made["classifier"]), device="cpu")
        kept = [t for t in texts if t is not None]
        want = pipe(kept, truncation=True)
        answers = [a for t, a in zip(texts, got, strict=True) if t is not None]
        assert [a["label"] for a in answers] == [w["label"] for w in want] and None in got
        np.testing.assert_allclose([a["score"] for a in answers], [w["score"] for w in want], atol=TOLERANCE, rtol=0)
        model = session.sql("!models").set_index("function").loc["feelings"]
        assert model["returns"] == "STRUCT(label VARCHAR, score FLOAT)" and "MLflow transformers" in model["model"]
    with registered(session, f"register mlflow.`{mlflow_models['st']}` as st_embed where {ONE}", "st_embed"):
        got = scored(session, "st_embed")
        encoder = SentenceTransformer(str(made["sentences"]), device="cpu")
        np.testing.assert_allclose(np.stack([g for g in got if g is not None]), encoder.encode(kept), atol=TOLERANCE, rtol=0)
    net, _ = torch_files
    with registered(session, f"register mlflow.`{mlflow_models['pt']}` as mlflow_net where {ONE}", "mlflow_net"):
        frame = session.sql("select a, b, mlflow_net(a, b, 0.5, 1.0) as p from (select range / 7.0 as a, 1 - range / 9.0 as b "
                            "from range(100)) order by a")
        rows = np.column_stack([frame["a"], frame["b"], np.full(len(frame), 0.5), np.ones(len(frame))])
        with torch.inference_mode():
            np.testing.assert_allclose(np.stack(frame["p"]), net(torch.tensor(rows, dtype=torch.float32)).numpy(), atol=TOLERANCE, rtol=0)
        assert "saved_as=MLflow pytorch" in session.sql("!models").set_index("function").loc["mlflow_net", "model"]


def test_registering_a_text_model_again_during_a_query_is_a_rolling_swap(session, made, texts, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    second = save_text_models(tmp_path, TINY, seed=8)["classifier"]  # the same shape, other weights: other answers
    two = f'workers="2" and num_cpus="{WORKER_CPUS}" and batch_size="16"'
    kept = [t for t in texts if t is not None]
    repeats = 500  # a query of some seconds, long enough to register again while it runs (300 was not, once, on a fast day)
    numbered_table(session, "roll_texts", "t", kept * repeats)
    numbered_table(session, "roll_after", "t", kept)  # after the swap, one pass shows the new version
    pipes = [transformers.pipeline("text-classification", model=str(path), device="cpu") for path in (made["classifier"], second)]
    want = [pipes[0](kept, truncation=True) * repeats, pipes[1](kept, truncation=True)]
    with registered(session, f"register transformers.`{made['classifier']}` as rolled where {two}", "rolled"):
        first = session.functions["rolled"].udf
        with ThreadPoolExecutor(1) as pool:
            # a statement runs on the version it began with (session.sql pins it; the bare connection does not)
            query = pool.submit(lambda: session.sql("select i, rolled(t) as y from roll_texts order by i")["y"].tolist())
            while sum(s["batches"] for s in first.stats()) < 3 and not query.done():
                time.sleep(0.02)
            session.sql(f"register transformers.`{second}` as rolled where {ONE}")
            assert not query.done(), "register waited for the query; it should only start the new workers and switch"
            during = query.result(timeout=300)
        after = scored(session, "rolled", "roll_after")
        for got, expected in ((during, want[0]), (after, want[1])):  # every row from one version: the one running when it began
            assert [g["label"] for g in got] == [w["label"] for w in expected]
            np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in expected], atol=TOLERANCE, rtol=0)
        assert session.sql("!models").set_index("function").loc["rolled", "version"] == "2"


def test_a_text_function_answers_http_as_the_model_in_process(session, made, texts):
    import httpx

    from conftest import free_port

    token = "text-token"
    with registered(session, f"register transformers.`{made['classifier']}` as served_sentiment where {ONE}", "served_sentiment"):
        url = session.sql(f"!serve port={free_port()} token={token}")["url"][0]
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                rows = [t for t in texts[:20] if t is not None] + ["", None]
                answer = client.post("/v1/functions/served_sentiment", json={"inputs": [[t] for t in rows]})
                assert answer.status_code == 200, answer.text
                outputs = answer.json()["outputs"]
                pipe = transformers.pipeline("text-classification", model=str(made["classifier"]), device="cpu")
                want = pipe(rows[:-1], truncation=True)
                assert [o["label"] for o in outputs[:-1]] == [w["label"] for w in want] and outputs[-1] is None
                np.testing.assert_allclose([o["score"] for o in outputs[:-1]], [w["score"] for w in want], atol=TOLERANCE, rtol=0)
                described = {f["name"]: f for f in client.get("/v1/functions").json()}["served_sentiment"]
                assert described["returns"] == "STRUCT(label VARCHAR, score FLOAT)" and described["inputs"] == {"width": "text"}
                # what a careless or hostile caller sends: numbers, two arguments; each a 400 naming the function
                for inputs in ([[1.5], [2.5]], [["a", "b"]]):
                    refused = client.post("/v1/functions/served_sentiment", json={"inputs": inputs})
                    assert refused.status_code == 400 and "served_sentiment: a text model takes one VARCHAR argument" in refused.text
                byzer = {"dataType": "string", "data": rows[:3], "sql": "select served_sentiment(feature).label as label"}
                predicted = client.post("/model/predict", json=byzer)
                assert predicted.status_code == 200 and predicted.json() == [{"label": w["label"]} for w in want[:3]], predicted.text
        finally:
            session.sql("!serve stop")
