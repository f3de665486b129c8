"""Shared fixtures: one real local Ray for the whole run, real DuckDB, small real models.

Ray is started once (with 2 logical GPUs, which only set CUDA_VISIBLE_DEVICES), as a session
starts one, and every Session joins it, so no test pays Ray's start-up twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Sessions (and the CLIs and kernels tests start) warm no spares ahead of need unless a test asks:
# spares would take the shared test cluster's CPUs. tests/test_warm_pool.py covers warming ahead.
os.environ["RAYUDF_WARM"] = "none"

# Small enough that several UDFs fit at once in the test cluster's 4 logical CPUs.
WORKER_CPUS = 0.5


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from udf_engine.ray_runtime import init_local

    init_local(num_cpus=4, num_gpus=2, log_to_driver=False)  # as a session starts one: on loopback, results inline
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits: pixels scaled to 0..1 as float32, and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def keras_model(digits, model_dir):
    """A small trained Keras classifier and the path of its .keras file."""
    import keras

    keras.utils.set_random_seed(0)
    pixels, labels = digits
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(pixels, labels, epochs=3, batch_size=128, verbose=0)
    path = model_dir / "digits.keras"
    model.save(path)
    return model, path


@pytest.fixture(scope="session")
def sklearn_model(digits, model_dir):
    """A logistic regression on the digits, pickled with cloudpickle."""
    from sklearn.linear_model import LogisticRegression

    pixels, labels = digits
    model = LogisticRegression(max_iter=300).fit(pixels, labels)
    path = model_dir / "digits_lr.pkl"
    path.write_bytes(cloudpickle.dumps(model))
    return model, path


def write_digits_parquet(path: Path, pixels: np.ndarray, labels: np.ndarray, *, row_group_size: int = 256) -> Path:
    """id, label, pixels as FLOAT[64], the same as a DOUBLE[] list, and the first three pixels as columns."""
    table = pa.table(
        {
            "id": pa.array(np.arange(len(pixels)), pa.int64()),
            "label": pa.array(labels, pa.int64()),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), pixels.shape[1]),
            "plist": pa.array(list(pixels.astype(np.float64)), pa.list_(pa.float64())),
            "a": pixels[:, 0].astype(np.float64),
            "b": pixels[:, 1].astype(np.float64),
            "c": pixels[:, 2].astype(np.float64),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def random_table(path: Path, *, rows: int, columns: str, seed: int, row_group_size: int) -> np.ndarray:
    """Write ``id`` and one column of uniform random doubles per letter of ``columns``; return those values."""
    x = np.random.default_rng(seed).random((rows, len(columns)))
    pq.write_table(pa.table({"id": np.arange(rows), **{c: x[:, i] for i, c in enumerate(columns)}}), path, row_group_size=row_group_size)
    return x


def save_pickled(path: Path, model) -> Path:
    """cloudpickle ``model`` to ``path``, its class and base classes by value: workers cannot import the test modules."""
    for cls in type(model).__mro__[:-1]:
        cloudpickle.register_pickle_by_value(sys.modules[cls.__module__])
    path.write_bytes(cloudpickle.dumps(model))
    return path


class Weighted:
    """x @ weights, after ``pause_s`` per batch; raises on the poison value x[:, 0] == -1, hangs below it."""

    def __init__(self, weights=(1.0, 10.0), pause_s: float = 0.0) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)
        self.n_features_in_ = self.weights.shape[0]
        self.pause_s = pause_s

    def predict(self, batch):
        x = np.asarray(batch, dtype=np.float64)
        if (x[:, 0] == -1.0).any():
            raise ValueError("poison row (a = -1)")
        if (x[:, 0] < -1.0).any():
            time.sleep(3600)  # a hung batch
        time.sleep(self.pause_s)
        return x @ self.weights


@pytest.fixture(scope="session")
def digits_parquet(digits, tmp_path_factory) -> Path:
    return write_digits_parquet(tmp_path_factory.mktemp("data") / "digits.parquet", *digits)


@pytest.fixture(scope="module")
def session(ray_cluster):
    """One Session per test module, joined to the shared Ray (so closing it leaves Ray up)."""
    from sql_magics import Session

    with Session() as s:
        yield s


@pytest.fixture
def register(session):
    """Register a model for one test (1 worker, small CPU share unless told) and unregister it after."""
    names: list[str] = []

    def _register(name, path, **options):
        options.setdefault("workers", 1)
        options.setdefault("num_cpus", WORKER_CPUS)
        registered = session.register_model(name, path, **options)
        names.append(name)
        return registered

    yield _register
    for name in names:
        if name in session.functions:
            session.unregister(name)


@contextmanager
def registered(session, statement: str, name: str):
    """The function ``statement`` registers, for the block; unregistered after it."""
    session.sql(statement)
    try:
        yield
    finally:
        session.unregister(name)


def numbered_table(session, name: str, column: str, values: list) -> str:
    """A DuckDB table ``name`` of ``(i, column)``: each value with its row number."""
    session.con.register(f"{name}_arrow", pa.table({"i": list(range(len(values))), column: values}))
    session.con.execute(f"create or replace table {name} as select * from {name}_arrow")
    session.con.unregister(f"{name}_arrow")
    return name


def write_kernelspec(jupyter_path: Path) -> Path:
    """A ``python3`` kernelspec running this interpreter under ``jupyter_path``; put that first
    on JUPYTER_PATH so a kernelspec installed elsewhere (~/.local/share/jupyter) is never used."""
    spec_dir = jupyter_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (rayudf tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return jupyter_path


def named_actors(prefix: str, timeout_s: float = 10.0) -> list[str]:
    """Names of live rayudf actors starting with ``prefix``, after kills have had time to land."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


@contextmanager
def ray_head(*args: str, env: dict, port: int | None = None, dashboard_port: int | None = None) -> Iterator[str]:
    """A ``ray start --head`` of the test's own (extra ``args``, ``env``), on its own temp dir and
    ``port`` (a free one by default), with a dashboard on ``dashboard_port`` if given: yields its
    address. Stopped by killing the processes it started, nothing else (see :func:`ray_start`)."""
    from ray._private.services import node_ip_address_from_perspective

    port = port or free_port()
    address = f"{node_ip_address_from_perspective()}:{port}"  # where `ray start` puts its node
    dashboard = (
        ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"] if dashboard_port
        else ["--include-dashboard=false"]
    )
    with ray_start("--head", f"--port={port}", *args, *dashboard, env=env):
        yield address


@contextmanager
def ray_node(address: str, *args: str, env: dict) -> Iterator[int]:
    """Another raylet of the cluster at ``address`` (``ray start --address``, extra ``args``), on a temp dir of
    its own: yields the pid of its ``ray start`` (the leader of its process group). Losing the node is
    ``os.killpg(pid, SIGKILL)``."""
    with ray_start(f"--address={address}", *args, env=env) as pid:
        yield pid


@contextmanager
def ray_start(*args: str, env: dict) -> Iterator[int]:
    """``ray start --block`` with ``args`` on a temp dir of its own, in a process group of its own; yields its pid
    once its raylet listens. Stopped by killing its process group and what runs from its temp dir (such as
    nodes an autoscaler added), nothing else."""
    import shutil
    import signal
    import subprocess
    import tempfile

    import psutil

    temp_dir = Path(tempfile.mkdtemp(prefix="rayudf-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    ray_cli = str(Path(sys.executable).with_name("ray"))
    node = subprocess.Popen(
        [ray_cli, "start", f"--temp-dir={temp_dir}", "--block", *args],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(temp_dir.glob("session_*/sockets/raylet")):
            assert time.monotonic() < deadline and node.poll() is None, f"ray start {' '.join(args)} did not start"
            time.sleep(0.5)
        yield node.pid
    finally:
        started = [p for p in psutil.process_iter(["cmdline"]) if any(str(temp_dir) in part for part in p.info["cmdline"] or [])]
        try:  # and what they started, in groups of their own or not (Serve's HAProxy)
            started += psutil.Process(node.pid).children(recursive=True)
        except psutil.Error:
            pass
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:  # lost already, by the test
            pass
        for process in started:
            try:
                process.kill()
            except psutil.Error:
                pass
        node.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
