"""What a model function takes: text, bytes and every other DuckDB type, and return types
inferred from real rows (a property test over the types with hypothesis)."""

from __future__ import annotations

import decimal
import re
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arrow_bridge.types import arrow_type
from sql_magics import ExecutionError

from conftest import WORKER_CPUS, save_pickled

REVIEWS = ["great phone, love it", "terrible battery", "love the screen", "awful, broke in a day", "great value", "terrible support"]
LABELS = ["pos", "neg", "pos", "neg", "pos", "neg"]


class Measure:
    """Numbers -> the row's sum; text or bytes -> its length: a model for any input it can take."""

    def predict(self, batch):
        if batch.dtype == object:
            return np.array([float(len(value)) for value in batch])
        return np.asarray(batch, dtype=np.float64).reshape(len(batch), -1).sum(axis=1)


@pytest.fixture(scope="module")
def measure(session, model_dir):
    session.register_model("measure", save_pickled(model_dir / "measure.pkl", Measure()), returns="DOUBLE", workers=1, num_cpus=WORKER_CPUS)
    yield "measure"
    session.unregister("measure")


@pytest.fixture(scope="module")
def text_model(model_dir):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(REVIEWS, LABELS)
    return model, save_pickled(model_dir / "reviews.pkl", model)


def test_text_pipeline_types_from_a_sample_of_real_rows(session, register, text_model):
    model, path = text_model
    session.db.con.register("reviews", pa.table({"id": np.arange(6), "body": REVIEWS}))
    sample = "select body from reviews limit 3"
    register("sentiment", path, sample=sample)
    register("sentiment_p", path, sample=sample, method="predict_proba")
    frame = session.sql("select sentiment(body) as label, sentiment_p(body) as p from reviews order by id")
    assert frame["label"].tolist() == list(model.predict(REVIEWS))  # class labels as VARCHAR
    np.testing.assert_allclose(np.stack(frame["p"]), model.predict_proba(REVIEWS), atol=1e-6)
    types = session.sql("select typeof(sentiment(body)) as t, typeof(sentiment_p(body)) as u from reviews limit 1").iloc[0]
    assert types.tolist() == ["VARCHAR", "DOUBLE[2]"]


def test_a_model_without_width_asks_for_returns_or_sample(session, text_model):
    path = text_model[1]
    with pytest.raises(ExecutionError, match=r'returns=.*sample="select'):
        session.sql(f'register sklearn.`{path}` as sentiment_unknown where workers="1" and num_cpus="{WORKER_CPUS}"')
    with pytest.raises(ExecutionError, match="sample query gave no rows"):
        session.sql(f'register sklearn.`{path}` as sentiment_empty where workers="1" and sample="select 1 as body where false"')
    assert not {"sentiment_unknown", "sentiment_empty"} & set(session.functions)


def test_blob_reaches_the_model_as_bytes(session, measure):
    frame = session.sql("select measure(b) as n from (values ('\\x00\\xff\\x10'::BLOB), (''::BLOB), (NULL::BLOB)) t(b)")
    assert frame["n"].tolist()[:2] == [3.0, 0.0] and frame["n"].isna().tolist()[2]


# -- every DuckDB type: a correct score, or an error naming the function, the argument and its SQL type --

_INT_RANGES = {"TINYINT": 7, "SMALLINT": 15, "INTEGER": 31, "BIGINT": 53, "UTINYINT": 8, "UINTEGER": 32}


def _ints(sql_type: str):
    bits = _INT_RANGES[sql_type]
    low = 0 if sql_type.startswith("U") else -(2 ** bits)
    return st.integers(low, 2 ** bits - 1)


_SCORED = {  # DuckDB type -> values, and what the model gives for one value
    "BOOLEAN": (st.booleans(), float),
    **{t: (_ints(t), float) for t in _INT_RANGES},
    "DECIMAL(10,2)": (st.decimals(-10**6, 10**6, places=2, allow_nan=False, allow_infinity=False), float),
    "FLOAT": (st.floats(-1e6, 1e6, width=32), float),
    "DOUBLE": (st.floats(-1e12, 1e12), float),
    "VARCHAR": (st.text(st.characters(blacklist_characters="\x00"), max_size=20), lambda v: float(len(v))),
    "BLOB": (st.binary(max_size=20), lambda v: float(len(v))),
    "INTEGER[3]": (st.lists(_ints("INTEGER"), min_size=3, max_size=3), lambda v: float(sum(v))),
    "DOUBLE[2][2]": (st.lists(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2), min_size=2, max_size=2),
                     lambda v: float(sum(map(sum, v)))),
}
_REFUSED = {  # DuckDB type -> values; the model never sees them
    "DATE": st.dates(),
    "TIMESTAMP": st.datetimes(),
    "INTERVAL": st.timedeltas(min_value=-timedelta(days=9999), max_value=timedelta(days=9999)),
    "STRUCT(a INTEGER, b VARCHAR)": st.fixed_dictionaries({"a": _ints("INTEGER"), "b": st.text(max_size=5)}),
    "MAP(VARCHAR, INTEGER)": st.dictionaries(st.text(max_size=5), _ints("INTEGER"), max_size=3).map(lambda d: list(d.items())),
    "VARCHAR[]": st.lists(st.text(max_size=5), max_size=3),
}


def _column(sql_type: str, values: list) -> pa.Array:
    if sql_type == "INTERVAL":  # DuckDB reads Arrow durations as INTERVAL
        return pa.array(values, pa.duration("us"))
    if sql_type.startswith("DECIMAL"):
        return pa.array([None if v is None else decimal.Decimal(v) for v in values], arrow_type(sql_type))
    return pa.array(values, arrow_type(sql_type))


def _score(session, function: str, sql_type: str, values: list) -> list:
    session.db.con.register("typed", pa.table({"i": np.arange(len(values)), "x": _column(sql_type, values)}))
    try:
        return session.sql(f"select {function}(x::{sql_type}) as y from typed order by i")["y"].tolist()
    finally:
        session.db.con.unregister("typed")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), sql_type=st.sampled_from(sorted(_SCORED)), size=st.integers(1, 12))
def test_every_scored_type_gives_the_in_process_result(session, measure, data, sql_type, size):
    values_of, expected_of = _SCORED[sql_type]
    values = data.draw(st.lists(st.one_of(st.none(), values_of), min_size=size, max_size=size))
    if sql_type == "FLOAT":
        values = [None if v is None else float(np.float32(v)) for v in values]
    got = _score(session, measure, sql_type, values)
    for value, result in zip(values, got, strict=True):
        if value is None:
            assert result is None or np.isnan(result)  # a NULL argument: a NULL result, the model never called
        else:
            assert result == pytest.approx(expected_of(value), rel=1e-6, abs=1e-6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), sql_type=st.sampled_from(sorted(_REFUSED)), size=st.integers(1, 6))
def test_every_other_type_is_an_error_naming_function_argument_and_sql_type(session, measure, data, sql_type, size):
    values = data.draw(st.lists(_REFUSED[sql_type], min_size=size, max_size=size))
    with pytest.raises(ExecutionError, match=rf"function measure: argument 1 is {re.escape(sql_type)}; a model takes numbers"):
        _score(session, measure, sql_type, values)


def test_all_null_columns_and_ragged_lists(session, measure):
    got = _score(session, measure, "DOUBLE", [None, None])
    assert len(got) == 2 and all(v is None or np.isnan(v) for v in got)
    with pytest.raises(ExecutionError, match=r"function measure: expected lists of length 2, got length 3 \(row 2"):
        _score(session, measure, "INTEGER[]", [[1, 2], [1, 2, 3]])
