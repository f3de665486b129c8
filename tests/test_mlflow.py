"""register mlflow.: model directories and a real MLflow registry (a sqlite: tracking store in a temp dir)."""

from __future__ import annotations

import glob
import os
import sys
import tempfile
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from sql_magics import ExecutionError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves this machine
pyfunc = pytest.importorskip("mlflow.pyfunc")

from conftest import WORKER_CPUS  # noqa: E402

DOWNLOADS = f"{tempfile.gettempdir()}/rayudf-mlflow-*"  # where registration downloads a model for a moment


class Scaled(pyfunc.PythonModel):
    """A model with named columns: mlflow's column-based signature, f(a, b) in SQL."""

    def predict(self, context, frame, params=None):
        return frame["a"] * 2.0 + frame["b"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, digits):
    """A tracking store with 'digits' v1 (alias champion), v2, and a column-signature pyfunc model."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    downloads_before = set(glob.glob(DOWNLOADS))
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("rayudf", artifact_location=(root / "artifacts").as_uri())  # not ./mlruns
    mlflow.set_experiment("rayudf")
    pixels, labels = digits
    models, runs = [], []
    for version, c in enumerate((1.0, 0.05), start=1):
        model = LogisticRegression(C=c, max_iter=300).fit(pixels, labels)
        with mlflow.start_run() as run:
            mlflow.sklearn.log_model(
                model, name="model", signature=infer_signature(pixels[:5], model.predict_proba(pixels[:5])),
                registered_model_name="digits", serialization_format="cloudpickle", pyfunc_predict_fn="predict_proba",
            )
        models.append(model)
        runs.append(run.info.run_id)
        assert mlflow.MlflowClient().get_model_version("digits", str(version)).run_id == run.info.run_id
    mlflow.MlflowClient().set_registered_model_alias("digits", "champion", "1")
    scaled_dir = root / "scaled"
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test modules
    example = pd.DataFrame({"a": [1.0], "b": [2.0]})
    pyfunc.save_model(scaled_dir, python_model=Scaled(), signature=infer_signature(example, np.array([4.0])))
    mlflow.set_tracking_uri(None)  # from here on, only what rayudf is given says where the registry is
    yield {"uri": uri, "models": models, "runs": runs, "scaled": scaled_dir, "downloads_before": downloads_before}


@pytest.fixture
def features(session, digits):
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(digits[0][:50].ravel()), 64)
    session.db.con.register("feats", pa.table({"id": np.arange(50), "v": pixels}))
    yield digits[0][:50]
    session.db.con.unregister("feats")


def _scores(session, function: str) -> np.ndarray:
    return np.array(session.sql(f"select {function}(v) as p from feats order by id")["p"].tolist())


def test_registry_versions_aliases_and_runs_score_like_the_model(session, registry, features):
    uri = registry["uri"]
    v1, v2 = (m.predict_proba(features) for m in registry["models"])
    session.sql(f'''set mlflow.tracking_uri = "{uri}";
        register mlflow.`models:/digits/2` as mf_v2 where workers="1" and num_cpus="{WORKER_CPUS}";
        register mlflow.`models:/digits@champion` as mf_champion where workers="1" and num_cpus="{WORKER_CPUS}"''')
    run_uri = f"runs:/{registry['runs'][1]}/model"
    session.register_model("mf_run", run_uri, format="mlflow", tracking_uri=uri, workers=1, num_cpus=WORKER_CPUS)
    try:
        np.testing.assert_allclose(_scores(session, "mf_v2"), v2, atol=1e-5)
        np.testing.assert_allclose(_scores(session, "mf_champion"), v1, atol=1e-5)  # the alias points at version 1
        np.testing.assert_allclose(_scores(session, "mf_run"), v2, atol=1e-5)
        models = session.sql("!models").set_index("function")
        assert "(version 1, run " + registry["runs"][0] in models.loc["mf_champion", "path"]
        assert "(version 2, run " + registry["runs"][1] in models.loc["mf_v2", "path"]
        assert models.loc["mf_run", "kind"] == "mlflow" and registry["runs"][1] in models.loc["mf_run", "path"]
    finally:
        for name in ("mf_v2", "mf_champion", "mf_run"):
            session.unregister(name)


def test_nothing_is_left_behind(registry):
    assert not Path("mlflow.db").exists() and not Path("mlruns").exists()  # no registry of MLflow's own defaults was made
    assert set(glob.glob(DOWNLOADS)) <= registry["downloads_before"]  # downloads are deleted once read


def test_model_directory_with_a_column_signature(session, registry):
    scaled = registry["scaled"]
    session.sql(f'register model.`{scaled}` as mf_scaled where workers="1" and num_cpus="{WORKER_CPUS}"')  # detected: MLmodel inside
    try:
        frame = session.sql("select mf_scaled(a, b) as y from (values (1.0, 2.0), (3.0, -1.0), (0.5, 0.25)) t(a, b)")
        assert frame["y"].tolist() == pytest.approx([4.0, 5.0, 1.25])
        assert session.sql("!models").set_index("function").loc["mf_scaled", "kind"] == "mlflow"
    finally:
        session.unregister("mf_scaled")


def test_a_source_that_does_not_resolve_names_it_and_the_tracking_uri(session, registry):
    uri = registry["uri"]
    with pytest.raises(ExecutionError, match=rf"models:/nope/1.*does not resolve with tracking URI '{uri}'"):
        session.sql(f'register mlflow.`models:/nope/1` as mf_nope where tracking_uri="{uri}"')
    with pytest.raises(ExecutionError, match="model path not found: /no/such/dir"):
        session.sql("register mlflow.`/no/such/dir` as mf_nope")


def _log_with_defaults(uri: str, model, **options) -> str:
    import mlflow
    import mlflow.sklearn

    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            logged = mlflow.sklearn.log_model(model, name="model", **options)  # every other default
        assert mlflow.models.get_model_info(logged.model_uri).flavors["sklearn"]["serialization_format"] == "skops"
    finally:
        mlflow.set_tracking_uri(None)
    return f"runs:/{run.info.run_id}/model"


def test_a_sklearn_model_logged_with_mlflows_defaults_scores_like_the_model(session, registry, features, digits):
    """MLflow 3 logs scikit-learn models with skops by default (model.skops): rayudf[mlflow] loads them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    model = LogisticRegression(max_iter=300).fit(*digits)
    run_uri = _log_with_defaults(registry["uri"], model)
    session.register_model(
        "mf_skops", run_uri, format="mlflow", tracking_uri=registry["uri"], returns="BIGINT", workers=1, num_cpus=WORKER_CPUS
    )  # no signature: MLflow logs none by default
    try:
        np.testing.assert_array_equal(_scores(session, "mf_skops"), model.predict(features))
    finally:
        session.unregister("mf_skops")
    # a tree stores node indices skops checks only when told the file is trusted: MLflow takes that at log time
    tree = DecisionTreeClassifier(max_depth=6, random_state=0).fit(*digits)
    tree_uri = _log_with_defaults(registry["uri"], tree, skops_trusted_types=["sklearn.tree._tree.Tree"])
    session.register_model(
        "mf_tree", tree_uri, format="mlflow", tracking_uri=registry["uri"], returns="BIGINT", workers=1, num_cpus=WORKER_CPUS
    )
    try:
        np.testing.assert_array_equal(_scores(session, "mf_tree"), tree.predict(features))
    finally:
        session.unregister("mf_tree")


def test_missing_extra_is_named(session, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without the extra looks like to import
    with pytest.raises(ExecutionError, match=r"pip install 'rayudf\[mlflow\]'"):
        session.sql("register mlflow.`models:/digits/1` as mf_nope")
