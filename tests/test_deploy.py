"""``rayudf deploy`` on a real ``ray start --head`` cluster of the module's own (its own temp dir, ports,
dashboard and Serve; stopped by its pids): the app answers after the launcher has exited; SIGKILL of
its owner and every UDFWorker gives 503s that say "restarting" with Retry-After and nothing of Ray's,
then exact answers again; a changed script swaps under load with no failed request; a changed script
that fails leaves the one before; ``--status`` and ``--delete``; the YAML of docs/serving.md through
``serve deploy``. The tests share the module's app and run in order."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import psutil
import pytest
import yaml

from sql_magics.serving.ingress import INGRESS_MODES, ingress_mode

from conftest import WORKER_CPUS, Weighted, free_port, ray_head, ray_node, save_pickled

ROOT = Path(__file__).resolve().parents[1]
RAYUDF = str(Path(sys.executable).with_name("rayudf"))
SERVE = str(Path(sys.executable).with_name("serve"))
ROWS = [[1.0, 2.0], [3.0, 4.0], [0.5, -7.0]]
V1, V2 = (1.0, 10.0), (2.0, 20.0)
# What an answer must not carry: Ray's actor ids, pids, addresses, tracebacks.
_RAY_WORDS = re.compile(r"actor|pid|\b\d{1,3}(\.\d{1,3}){3}\b|traceback|[0-9a-f]{20,}|owner has died", re.I)
BACK_WITHIN_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    dashboard = free_port()
    with ray_head("--num-cpus=2", "--disable-usage-stats", env=env, dashboard_port=dashboard) as address:
        port = free_port()
        yield SimpleNamespace(
            address=address, env=env, port=port, url=f"http://127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard}",
            dir=tmp_path_factory.mktemp("deploy"),
        )


def deploy(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAYUDF, "deploy", *args, "--ray-address", cluster.address], capture_output=True, text=True, timeout=600, env=cluster.env,
        cwd=cluster.dir,
    )


def script(cluster, name: str, weights: tuple[float, float] | None) -> Path:
    """A script registering ``f``: a model of ``weights``, or a path with no model (None)."""
    model = save_pickled(cluster.dir / f"{name}.pkl", Weighted(weights)) if weights else cluster.dir / "missing.pkl"
    path = cluster.dir / f"{name}.sql"
    path.write_text(f'register sklearn.`{model}` as f where workers="1" and num_cpus="{WORKER_CPUS}";\n')
    return path


def expected(weights: tuple[float, float]) -> list[float]:
    return Weighted(weights).predict(np.asarray(ROWS)).tolist()


def ask(cluster, **headers: str) -> httpx.Response:
    return httpx.post(f"{cluster.url}/v1/functions/f", json={"inputs": ROWS}, headers=headers, timeout=60)


def cluster_processes(address: str) -> list[psutil.Process]:
    """The processes the cluster's raylets started (its workers and actors), none of another Ray's."""
    raylets = [
        p for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "raylet" and any(address in part for part in p.info["cmdline"] or [])
    ]
    return [child for raylet in raylets for child in raylet.children(recursive=True)]


def titled(address: str, *prefixes: str) -> list[psutil.Process]:
    found = []
    for process in cluster_processes(address):
        try:
            if process.cmdline() and process.cmdline()[0].startswith(prefixes):
                found.append(process)
        except psutil.Error:
            pass
    return found


def test_a_deployed_app_outlives_its_launcher_and_comes_back_after_its_owner_and_workers_are_killed(cluster):
    done = deploy(cluster, str(script(cluster, "v1", V1)), "--name", "scores", "--port", str(cluster.port))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"deployed scores at {cluster.url} (functions: f; ingress: {INGRESS_MODES[ingress_mode()]})"
    assert "INFO" not in done.stderr and "Token authentication" not in done.stderr  # Serve's and Ray's chatter is not the user's
    # the launcher has exited: Serve's controller, detached, keeps the app
    answer = ask(cluster)
    assert answer.status_code == 200 and answer.json()["outputs"] == expected(V1)
    health = httpx.get(f"{cluster.url}/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "functions": ["f"], "workers": {"f": 1}}

    victims = titled(cluster.address, "ray::ServeReplica:scores:Owner", "ray::UDFWorker")
    assert sorted(p.cmdline()[0].split(":")[-1].split(".")[0] for p in victims) == ["Owner", "UDFWorker"]

    def kill() -> None:
        for process in victims:
            process.send_signal(signal.SIGKILL)

    back_after(cluster, kill)


def under_load(cluster, change, **headers: str) -> tuple[list[httpx.Response], int, object]:
    """``change()`` while two clients call ``f`` without pause (at most 5,000 calls): the answers, how many came
    before ``change`` returned, and what it returned."""
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60, headers=headers) as client:
            while not stop.is_set() and len(answers) < 5_000:
                answers.append(client.post(f"{cluster.url}/v1/functions/f", json={"inputs": ROWS}))

    loaders = [threading.Thread(target=load) for _ in range(2)]
    for loader in loaders:
        loader.start()
    try:
        done = change()
        settled = len(answers)
        time.sleep(1.0)
    finally:
        stop.set()
        for loader in loaders:
            loader.join(timeout=60)
    return answers, settled, done


def assert_swapped(answers: list[httpx.Response], settled: int) -> None:
    """No failed call; each answer whole from one version, v1's or v2's; v2's alone once the change was done."""
    assert [a.status_code for a in answers if a.status_code != 200] == []
    versions = {tuple(a.json()["outputs"]): a.json()["version"] for a in answers}
    assert set(versions) <= {tuple(expected(V1)), tuple(expected(V2))} and tuple(expected(V1)) in versions
    assert versions[tuple(expected(V2))] != versions[tuple(expected(V1))]
    assert all(a.json()["outputs"] == expected(V2) for a in answers[settled:])


def test_a_changed_script_swaps_under_load_with_no_failed_request(cluster):
    assert deploy(cluster, str(script(cluster, "v1", V1)), "--name", "scores", "--port", str(cluster.port)).returncode == 0
    answers, settled, done = under_load(
        cluster, lambda: deploy(cluster, str(script(cluster, "v2", V2)), "--name", "scores", "--port", str(cluster.port))
    )
    assert done.returncode == 0, done.stderr
    assert_swapped(answers, settled)


def test_a_changed_script_that_fails_leaves_the_app_on_the_script_before(cluster):
    done = deploy(cluster, str(script(cluster, "broken", None)), "--name", "scores", "--port", str(cluster.port))
    assert done.returncode == 1
    assert done.stderr.startswith("error: deploy scores: the changed script failed, and the app answers with the script before:")
    assert "missing.pkl" in done.stderr and "Traceback" not in done.stderr
    assert ask(cluster).json()["outputs"] == expected(V2)
    listed = deploy(cluster, "--status")
    assert listed.returncode == 0 and listed.stdout.startswith("scores\tRUNNING\tf\t") and "missing.pkl" in listed.stdout


def test_deploy_refuses_what_it_cannot_run_before_it_starts_anything(cluster):
    bad = cluster.dir / "bad.sql"
    bad.write_text("!serve port=8001;\n")
    done = deploy(cluster, str(bad), "--port", str(cluster.port))
    assert done.returncode == 2 and "a deployed app runs the set, load, select and register statements" in done.stderr
    open_address = deploy(cluster, str(script(cluster, "v1", V1)), "--host", "0.0.0.0", "--port", str(cluster.port))
    assert open_address.returncode == 2 and "give a token" in open_address.stderr
    assert deploy(cluster, "--delete", "nothing").stderr.startswith("error: deploy: no app named nothing runs on this cluster")
    assert deploy(cluster).returncode == 2  # neither a script, --status nor --delete
    alone = subprocess.run([RAYUDF, "deploy", "--status"], capture_output=True, text=True, timeout=60, env=cluster.env)
    assert alone.returncode == 2 and "give the Ray cluster (--ray-address or RAY_ADDRESS)" in alone.stderr  # not a Ray of its own


def test_delete_stops_the_app_and_its_workers(cluster):
    done = deploy(cluster, "--delete", "scores")
    assert done.returncode == 0 and done.stdout.strip() == "deleted scores"
    assert httpx.get(f"{cluster.url}/healthz").status_code == 404  # Serve's proxy: no app at that route
    deadline = time.monotonic() + 30
    while titled(cluster.address, "ray::UDFWorker", "ray::UDFMaster", "ray::ServeReplica:scores"):
        assert time.monotonic() < deadline, "the app's processes outlived it"
        time.sleep(0.5)
    assert deploy(cluster, "--status").stdout == ""


def documented_yaml() -> str:
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text[text.index("## Deploying on a cluster"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def serve_deploy(cluster, weights: tuple[float, float], name: str, change=lambda config: config) -> subprocess.CompletedProcess:
    """``serve deploy`` of the YAML of docs/serving.md, its model one of ``weights``, on the cluster's address
    (``change``: of the config, read)."""
    model = save_pickled(cluster.dir / f"{name}.pkl", Weighted(weights))
    config = documented_yaml()
    assert "import_path: sql_magics.front.deploy:app" in config
    config = config.replace("/models/scores.pkl", str(model)).replace("8000", str(cluster.port)).replace("0.0.0.0", "127.0.0.1")
    path = cluster.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(change(yaml.safe_load(config))))
    env = {**cluster.env, "RAY_AUTH_MODE": "token"}  # Serve's CLI, unlike Ray's, does not look for the token by itself
    return subprocess.run([SERVE, "deploy", str(path), "-a", cluster.dashboard], capture_output=True, text=True, timeout=120, env=env)


def wait_answering(cluster, within_s: float = 180.0) -> None:
    deadline = time.monotonic() + within_s
    while httpx.get(f"{cluster.url}/healthz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the app did not answer"
        time.sleep(0.5)


def back_after(cluster, fault, **headers: str) -> list[httpx.Response]:
    """``fault()``, then calls until one is refused (Ray may take some seconds to learn of a lost node, and the
    workers on other nodes answer meanwhile), then until /healthz and a call both answer 200 again, all within
    BACK_WITHIN_S: the refused answers, each checked to be a 503 with Retry-After and none of Ray's words, as
    /healthz's are."""
    fault()
    refused, healths = [], []
    faulted = time.monotonic()
    deadline = faulted + BACK_WITHIN_S
    while True:
        health, answer = httpx.get(f"{cluster.url}/healthz", timeout=30), ask(cluster, **headers)
        if refused and health.status_code == answer.status_code == 200:
            break
        assert time.monotonic() < deadline, f"not back within {BACK_WITHIN_S:g} s: {health.status_code} {answer.text}"
        if refused:  # once calls are refused, /healthz says so too (before, it may not have noticed the fault yet)
            healths.append(health)
        if answer.status_code != 200:
            refused.append(answer)
        time.sleep(0.2)
    assert refused and healths, "the fault went unnoticed"
    for answer in refused:
        assert answer.status_code == 503 and answer.headers["retry-after"].isdigit(), answer.text
        assert not _RAY_WORDS.search(answer.text), answer.text
    assert {h.status_code for h in healths} == {503} and all(not _RAY_WORDS.search(h.text) for h in healths)
    assert ask(cluster, **headers).json()["outputs"] == expected(V1)  # exact, from the owner Serve started again
    print(f"back {time.monotonic() - faulted:.1f} s after the fault; {len(refused)} calls refused meanwhile")  # for the notes (-s)
    return refused


def test_the_documented_serve_config_deploys_and_swaps_a_changed_script_with_no_failed_request(cluster):
    done = serve_deploy(cluster, V1, "yaml_v1")
    assert done.returncode == 0, done.stderr
    wait_answering(cluster)
    assert ask(cluster).status_code == 401  # the config's token
    auth = {"Authorization": "Bearer s3cret"}
    answer = ask(cluster, **auth)
    assert answer.status_code == 200 and answer.json()["outputs"] == expected(V1)

    def changed() -> subprocess.CompletedProcess:  # serve deploy returns at once: wait for the new model's answers
        done = serve_deploy(cluster, V2, "yaml_v2")
        deadline = time.monotonic() + 180
        while ask(cluster, **auth).json().get("outputs") != expected(V2):
            assert time.monotonic() < deadline, "the changed config's model never answered"
            time.sleep(0.2)
        return done

    answers, settled, done = under_load(cluster, changed, **auth)
    assert done.returncode == 0, done.stderr
    assert_swapped(answers, settled)


def test_losing_the_node_of_the_owner_brings_the_app_back_on_another(tmp_path):
    """Three raylets: the head (Serve's controller and proxy), and two nodes the owner may run on (the resource
    ``owner_node``, which the config asks for). The owner's node is lost (its processes SIGKILLed)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    dashboard, port = free_port(), free_port()
    owner_nodes = ("--num-cpus=1", '--resources={"owner_node": 1}')
    joining = {**env, "RAY_AUTH_MODE": "token"}  # `ray start --address` sends the head's token only when told to
    with (
        ray_head("--num-cpus=1", "--disable-usage-stats", env=env, dashboard_port=dashboard) as address,
        ray_node(address, *owner_nodes, env=joining) as first,
        ray_node(address, *owner_nodes, env=joining) as second,
    ):
        cluster = SimpleNamespace(
            address=address, env=env, port=port, url=f"http://127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard}", dir=tmp_path,
        )

        def pinned(config: dict) -> dict:
            config["proxy_location"] = "HeadOnly"  # one proxy on the port: the nodes share this machine
            (owner,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Owner"]
            owner["ray_actor_options"] = {"num_cpus": 0, "resources": {"owner_node": 0.01}}
            return config

        done = serve_deploy(cluster, V1, "node_v1", pinned)
        assert done.returncode == 0, done.stderr
        wait_answering(cluster)
        auth = {"Authorization": "Bearer s3cret"}
        assert ask(cluster, **auth).json()["outputs"] == expected(V1)
        (holder,) = [
            node for node in (first, second)
            if any(p.cmdline()[0].startswith("ray::ServeReplica:scores:Owner") for p in psutil.Process(node).children(recursive=True))
        ]

        def lose() -> None:  # every process of the node at once: its raylet, its workers, what they started
            node = psutil.Process(holder)
            for process in [node, *node.children(recursive=True)]:
                process.send_signal(signal.SIGKILL)

        back_after(cluster, lose, **auth)
