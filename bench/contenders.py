"""The things the benchmark times: each a function that does one run and returns seconds.

All score the same Parquet table with the same Keras model and bring the results back
to the driver as Arrow, so only the way the rows reach the model differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from arrow_bridge.tensors import features, to_arrow
from arrow_bridge.types import arrow_type

RETURNS = "FLOAT[10]"


def timed(work: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: DuckDB's threads, Ray's client, the bridge) of one run."""
    started, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - started, time.process_time() - cpu


def scoring_query(function: str, path: Path, limit: int | None = None) -> str:
    tail = f" LIMIT {limit}" if limit else ""
    return f"SELECT {function}(image) AS p FROM read_parquet('{path}'){tail}"


def aggregate_query(function: str, path: Path) -> str:
    return f"SELECT sum(list_max({function}(image))) AS s FROM read_parquet('{path}')"


def register_in_process(con: Any, name: str, model: Any, batch_size: int) -> None:
    """The limit: the same model called inside DuckDB's Arrow UDF, same conversions, same batches."""
    target = arrow_type(RETURNS)

    def call(*cols: Any) -> pa.Array:
        x = features(cols, function=name)
        outs = [model.predict_on_batch(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return to_arrow(outs, target, len(x))

    con.create_function(name, call, None, RETURNS, type="arrow")


class OnnxModel:
    """An ONNX Runtime session behind the ``predict_on_batch`` the in-process limit calls."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: np.asarray(batch, dtype=np.float32)})[0]


def register_per_row(con: Any, name: str, model: Any) -> None:
    """What users write by hand: a native (row at a time) Python UDF."""

    def call(image: list) -> list:
        return model.predict_on_batch(np.asarray([image], dtype=np.float32))[0].tolist()

    con.create_function(name, call, None, RETURNS, type="native")


def fetch(con: Any, query: str) -> pa.Table:
    """The driver path: DuckDB reads the rows and calls the function (in-process, or rayudf's workers)."""
    return con.sql(query).to_arrow_table()


def copy_sql(query: str, out: Path) -> str:
    return f"COPY ({query}) TO '{out}' (FORMAT parquet)"


def copy_to(con: Any, query: str, out: Path) -> None:
    con.execute(copy_sql(query, out)).fetchall()


def fetch_planned(session: Any, query: str) -> pa.Table:
    """What a session runs for ``query`` (the worker path when it qualifies), its rows as Arrow like ``fetch``."""
    with session.db.exclusive(), session.registry.statement(), session.db.planner(session.con, query) as statement:
        return session.con.sql(statement).to_arrow_table()


def copy_planned(session: Any, query: str, out: Path) -> None:
    with session.registry.statement():
        session.db.query(copy_sql(query, out))


class RayDataPredictor:
    """The peer: the callable class users hand to Ray Data's map_batches."""

    def __init__(self, model_path: str) -> None:
        import keras

        self.model = keras.models.load_model(model_path, compile=False)

    def __call__(self, batch: dict) -> dict:
        x = np.asarray(batch["image"])
        if x.dtype == object:
            x = np.stack(x)
        return {"p": self.model.predict_on_batch(x.astype(np.float32))}


def ray_data_run(path: Path, model_path: Path, workers: int, batch_size: int) -> int:
    """Ray Data end to end: read, an actor pool of ``workers`` loading the model, results to the driver."""
    import ray.data

    ds = ray.data.read_parquet(str(path), columns=["image"]).map_batches(
        RayDataPredictor,
        fn_constructor_args=(str(model_path),),
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
    )
    return sum(len(b["p"]) for b in ds.iter_batches(batch_format="numpy", batch_size=None))
