"""Scoring through SQL equals the same model called in-process on the same rows."""

from __future__ import annotations

import cloudpickle
import numpy as np
import pandas as pd
import pytest

from conftest import WORKER_CPUS

TOL = 1e-5


def scored(frame, column):
    return np.stack(frame[column].to_numpy())


@pytest.fixture(scope="module")
def keras_fn(session, keras_model):
    _, path = keras_model
    return session.register_model("digit", path, workers=2, num_cpus=WORKER_CPUS, batch_size=128)


@pytest.fixture(scope="module")
def three_feature_model(digits, model_dir):
    """A regression on three scalar features (the first three pixels)."""
    from sklearn.linear_model import LinearRegression

    pixels, labels = digits
    model = LinearRegression().fit(pixels[:, :3].astype(np.float64), labels.astype(np.float64))
    path = model_dir / "three.pkl"
    path.write_bytes(cloudpickle.dumps(model))
    return model, path


def test_keras_fixed_size_array_column(session, keras_fn, keras_model, digits, digits_parquet):
    model, _ = keras_model
    frame = session.sql(f"select id, digit(pixels) as probs from '{digits_parquet}' order by id")

    assert keras_fn.model_function.return_type == "FLOAT[10]"
    assert list(frame["id"]) == list(range(len(digits[0])))
    np.testing.assert_allclose(scored(frame, "probs"), model.predict(digits[0], verbose=0), atol=TOL)


def test_keras_list_column(session, keras_fn, keras_model, digits, digits_parquet):
    model, _ = keras_model
    frame = session.sql(f"select id, digit(plist) as probs from '{digits_parquet}' order by id")
    np.testing.assert_allclose(scored(frame, "probs"), model.predict(digits[0], verbose=0), atol=TOL)


def test_both_workers_receive_batches(session, keras_fn, digits, digits_parquet):
    before = {s["worker"]: s["rows"] for s in keras_fn.udf.stats()}
    session.sql(f"select digit(pixels) from '{digits_parquet}'")
    stats = keras_fn.udf.stats()
    scored = {s["worker"]: s["rows"] - before[s["worker"]] for s in stats}
    assert len(stats) == 2 and all(s["alive"] for s in stats), stats
    assert all(rows > 0 for rows in scored.values()), scored  # this query's rows reached both workers
    assert sum(scored.values()) == len(digits[0])  # each row scored once
    assert all(s["threads"] == 1 for s in stats)  # math threads capped at the CPU share


def test_pickled_classifier_predict_proba(session, register, sklearn_model, digits, digits_parquet):
    model, path = sklearn_model
    register("proba", path, method="predict_proba")
    frame = session.sql(f"select proba(pixels) as p from '{digits_parquet}' order by id")

    assert session.functions["proba"].model_function.return_type == "DOUBLE[10]"
    np.testing.assert_allclose(scored(frame, "p"), model.predict_proba(digits[0]), atol=TOL)


def test_three_scalar_columns(session, register, three_feature_model, digits, digits_parquet):
    model, path = three_feature_model
    register("reg3", path)
    frame = session.sql(f"select reg3(a, b, c) as y from '{digits_parquet}' order by id")

    assert session.functions["reg3"].model_function.return_type == "DOUBLE"
    np.testing.assert_allclose(frame["y"].to_numpy(), model.predict(digits[0][:, :3].astype(np.float64)), atol=TOL)


def test_declared_scalar_and_array_return_types(session, register, sklearn_model, digits, digits_parquet):
    model, path = sklearn_model
    register("label_d", path, returns="DOUBLE")
    register("proba_f", path, method="predict_proba", returns="FLOAT[10]")
    frame = session.sql(f"select label_d(pixels) as l, proba_f(pixels) as p from '{digits_parquet}' order by id")
    types = session.sql(f"select typeof(label_d(pixels)) as l, typeof(proba_f(pixels)) as p from '{digits_parquet}' limit 1")

    assert (types["l"][0], types["p"][0]) == ("DOUBLE", "FLOAT[10]")
    np.testing.assert_array_equal(frame["l"].to_numpy(), model.predict(digits[0]).astype(np.float64))
    np.testing.assert_allclose(scored(frame, "p"), model.predict_proba(digits[0]), atol=TOL)


@pytest.fixture(scope="module")
def struct_model_path(model_dir):
    """A model whose predict returns a dict of columns (label, score): a STRUCT in SQL."""

    class ArgMax:  # defined here so cloudpickle ships the class by value to the workers
        n_features_in_ = 64

        def predict(self, batch):
            x = np.asarray(batch, dtype=np.float64)
            return {"label": x.argmax(axis=1).astype(np.int64), "score": x.max(axis=1)}

    path = model_dir / "argmax.pkl"
    path.write_bytes(cloudpickle.dumps(ArgMax()))
    return path


def test_inferred_struct(session, register, struct_model_path, digits, digits_parquet):
    register("best", struct_model_path)
    frame = session.sql(f"select best(pixels).label as label, best(pixels).score as score from '{digits_parquet}' order by id")

    assert session.functions["best"].model_function.return_type == 'STRUCT("label" BIGINT, "score" DOUBLE)'
    np.testing.assert_array_equal(frame["label"].to_numpy(), digits[0].argmax(axis=1))
    np.testing.assert_allclose(frame["score"].to_numpy(), digits[0].max(axis=1), atol=TOL)


def test_declared_struct(session, register, struct_model_path, digits, digits_parquet):
    register("best_d", struct_model_path, returns="STRUCT(score FLOAT, label INTEGER)")
    frame = session.sql(f"select best_d(pixels) as r from '{digits_parquet}' order by id")

    first = frame["r"][0]
    assert list(first) == ["score", "label"]
    assert first["label"] == digits[0][0].argmax()


def test_null_rows_give_null_and_others_are_scored(session, register, sklearn_model, digits):
    model, path = sklearn_model
    register("label_n", path)
    session.con.register("few", pd.DataFrame({"i": range(6)}))
    frame = session.sql(
        f"""select i, label_n(case when i % 2 = 0 then null else {list(map(float, digits[0][0]))}::FLOAT[64] end) as l
            from few order by i"""
    )

    assert frame["l"].isna().tolist() == [True, False, True, False, True, False]
    assert set(frame["l"].dropna()) == {model.predict(digits[0][:1])[0]}


def test_empty_table(session, keras_fn, digits_parquet):
    frame = session.sql(f"select id, digit(pixels) as p from '{digits_parquet}' where id < 0")
    assert len(frame) == 0 and list(frame.columns) == ["id", "p"]


def test_logical_gpus_reach_the_workers(register, sklearn_model):
    _, path = sklearn_model
    stats = register("on_gpu", path, workers=2, num_gpus=0.5).udf.stats()
    assert all(len(s["gpu_ids"]) == 1 for s in stats), stats


def test_a_text_call_goes_to_the_model_longest_first_and_comes_back_in_row_order():
    import pyarrow as pa

    from arrow_bridge.scoring import score_columns
    from udf_engine.actors.batching import cut
    from udf_engine.errors import RowError
    from udf_engine.models.loaders import TEXT_INPUT

    texts = ["bb", None, "a" * 5000, "", "ccc" * 900, "d"]
    seen: list[list[str]] = []

    def score(matrix):  # the engine's score: pieces cut as the engine cuts them, each piece's outputs
        pieces = cut(matrix, 2)
        seen.extend(list(piece) for piece in pieces)
        return [np.array([len(t) for t in piece], dtype=np.int64) for piece in pieces]

    scored = score_columns([pa.array(texts)], function="f", width=TEXT_INPUT, arrow_type=pa.int64(), score=score)
    assert scored.array.to_pylist() == [2, None, 5000, 0, 2700, 1]  # row order, NULL where the text is NULL
    assert [t for piece in seen for t in piece] == ["a" * 5000, "ccc" * 900, "bb", "d", ""]  # longest first
    assert [len(piece) for piece in seen] == [1, 2, 2]  # the long text alone: it is most of the characters

    def fails_on_d(matrix):
        raise RowError("function f: the model raised ValueError: no d", row=list(matrix).index("d"), rows=len(matrix), values="'d'")

    with pytest.raises(RowError, match=r"row 6 of the 6 rows of this call"):  # "d" is the call's sixth row
        score_columns([pa.array(texts)], function="f", width=TEXT_INPUT, arrow_type=pa.int64(), score=fails_on_d)
