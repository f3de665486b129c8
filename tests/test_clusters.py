"""Rayudf on Ray clusters of its own: a 2-CPU laptop holding four models, and two nodes, one lost.

Each test runs a driver script in a subprocess, because a process joins one Ray only and
the rest of the suite shares the session's. The processes a test starts are stopped by
the script itself (``Cluster.shutdown`` kills the nodes it started, and nothing else).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import free_port, random_table, ray_head, save_pickled


class Scaled:
    """a * factor + b."""

    n_features_in_ = 2

    def __init__(self, factor: float, pause_s: float = 0.0) -> None:
        self.factor = factor
        self.pause_s = pause_s

    def predict(self, batch):
        import time

        time.sleep(self.pause_s)
        x = np.asarray(batch, dtype=np.float64)
        return x[:, 0] * self.factor + x[:, 1]


def save(path, model) -> str:
    return str(save_pickled(path, model))


def run_driver(script: str, tmp_path, timeout_s: float = 300) -> dict:
    """Run ``script`` in a fresh interpreter (no RAY_ADDRESS: it makes its own Ray); it leaves JSON in result.json
    (not on stdout, where Ray's own nodes may write)."""
    path = tmp_path / "driver.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("clusters") / "t.parquet"
    return path, random_table(path, rows=50_000, columns="ab", seed=5, row_group_size=2048)


LAPTOP = """
import json, os, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="rayudf")  # a 2-core laptop
from sql_magics import Session
with Session() as s:
    for i, path in enumerate({paths!r}):
        s.register_model(f"m{{i}}", path)  # default options
    frame = s.sql("select id, m0(a, b) as y0, m1(a, b) as y1, m2(a, b) as y2, m3(a, b) as y3 from '{table}' order by id")
    threads = {{name: sum(w["threads"] for w in f.udf.stats()) for name, f in s.functions.items()}}
    s.register_model("m0", {new_version!r})  # no room for both versions: the old one makes way
    again = s.sql("select id, m0(a, b) as y0 from '{table}' order by id")
    result = {{"y": frame[["y0", "y1", "y2", "y3"]].to_numpy().tolist(), "threads": threads, "cores": len(os.sched_getaffinity(0)),
               "y0_v2": again["y0"].tolist(), "version": s.functions["m0"].version}}
    open("result.json", "w").write(json.dumps(result))
ray.shutdown()
"""


def test_four_models_with_default_options_fit_a_two_cpu_ray_and_each_uses_every_core(small_table, tmp_path):
    table, x = small_table
    paths = [save(tmp_path / f"m{i}.pkl", Scaled(float(i + 1))) for i in range(4)]
    new_version = save(tmp_path / "m0_v2.pkl", Scaled(10.0))
    out = run_driver(LAPTOP.format(paths=paths, table=table, new_version=new_version), tmp_path)
    expected = np.column_stack([x[:, 0] * (i + 1) + x[:, 1] for i in range(4)])
    np.testing.assert_allclose(np.array(out["y"]), expected, rtol=0, atol=1e-9)
    # the math threads of each model's workers add up to the cores: scoring alone, a model uses them all
    assert set(out["threads"].values()) == {out["cores"]}, out
    # registering again with the machine full replaces the function rather than failing
    np.testing.assert_allclose(out["y0_v2"], x[:, 0] * 10.0 + x[:, 1], rtol=0, atol=1e-9)
    assert out["version"] == "2"


TWO_NODES = """
import json, os, signal, threading, time
import ray
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
second = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="rayudf", log_to_driver=False)
from sql_magics import Session
try:
    with Session() as s:
        udf = s.register_model("f", {path!r}, workers=2).udf
        nodes = sorted({{w["node"] for w in udf.stats()}})
        lost = {{}}
        def lose_node():
            while sum(w["batches"] for w in udf.stats()) < 6:
                time.sleep(0.05)
            cluster.remove_node(second, allow_graceful=False)
            lost["at"] = time.monotonic()
        killer = threading.Thread(target=lose_node)
        killer.start()
        frame = s.sql("select id, f(a, b) as y from '{table}'")
        finished = time.monotonic()
        killer.join()
        after = s.sql("select count(f(a, b)) as n from '{table}'")["n"][0]
        result = {{"ids": frame["id"].tolist(), "y": frame["y"].tolist(), "nodes": len(nodes), "after": int(after),
                   "lost_mid_query": lost["at"] < finished}}
        open("result.json", "w").write(json.dumps(result))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_nodes_one_lost_mid_query_gives_exact_rows(small_table, tmp_path):
    table, x = small_table
    out = run_driver(TWO_NODES.format(path=save(tmp_path / "f.pkl", Scaled(3.0, pause_s=0.2)), table=table), tmp_path)
    assert out["nodes"] == 2  # the workers were spread over both nodes
    assert out["lost_mid_query"]  # else the test proves nothing
    ids = np.array(out["ids"])
    order = np.argsort(ids)
    assert np.array_equal(ids[order], np.arange(len(x)))  # every row once
    np.testing.assert_allclose(np.array(out["y"])[order], x[:, 0] * 3.0 + x[:, 1], rtol=0, atol=1e-9)
    assert out["after"] == len(x)  # and the function works on one node afterwards


GROWING = """
import json, logging
import ray
ray.init(address={address!r}, namespace="rayudf", log_to_driver=False)
from sql_magics import Session
with Session() as s:
    s.register_model("g", {path!r}, workers=1, num_cpus=1)  # the head has no CPU: the autoscaler must add a node
    frame = s.sql("select sum(g(range::DOUBLE, 1.0)) as total from range(1000)")
    open("result.json", "w").write(json.dumps({{"total": frame["total"][0], "cpus": ray.cluster_resources().get("CPU", 0)}}))
"""

FAKE_AUTOSCALER = {
    "cluster_name": "rayudf-growing",
    "max_workers": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_node": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5,
    "docker": {},
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "rsync_exclude": [],
    "rsync_filter": [],
}


@pytest.fixture
def autoscaling_cluster(tmp_path):
    """A head node with no CPU and Ray's autoscaler over its fake multi-node provider, which adds
    up to one 1-CPU node (real raylets on this machine) when work waits for a CPU. Its nodes run
    from its temp dir, so stopping it (``ray_head``) stops them too."""
    from ray._private.services import node_ip_address_from_perspective

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # the head and the driver use the same token (~/.ray/auth_token)
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    config_path = tmp_path / "autoscaler.json"
    port = free_port()  # the GCS address goes into the autoscaler's config before the head starts
    config = {**FAKE_AUTOSCALER, "provider": {**FAKE_AUTOSCALER["provider"], "gcs_address": f"{node_ip_address_from_perspective()}:{port}"}}
    config_path.write_text(json.dumps(config))
    with ray_head("--num-cpus=0", f"--autoscaling-config={config_path}", env=head_env, port=port) as address:
        yield address, env


def test_registration_waits_for_the_autoscaler_to_add_a_node(autoscaling_cluster, tmp_path):
    address, env = autoscaling_cluster
    script = tmp_path / "growing.py"
    script.write_text(GROWING.format(address=address, path=save(tmp_path / "g.pkl", Scaled(2.0))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["total"] == pytest.approx(sum(2.0 * i + 1.0 for i in range(1000)))
    assert out["cpus"] == 1  # the node the autoscaler added
    assert "register g: waiting for the cluster to grow (asked CPU=1, free CPU=0)" in done.stderr
