"""``rayudf serve`` from the shell: it prints its address once it answers, and SIGTERM lets the
requests in flight finish before it exits 0. What it refuses to start without a token. The process joins the test session's Ray; its server
(one Serve per cluster) runs after test_serve.py's has stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from sql_magics.front.cli import main
from sql_magics.serving.ingress import INGRESS_MODES, ingress_mode

from conftest import WORKER_CPUS, Weighted, free_port, save_pickled

ROOT = Path(__file__).resolve().parents[1]
RAYUDF = str(Path(sys.executable).with_name("rayudf"))


@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    return ray_cluster.get_runtime_context().gcs_address


def start(script: Path, port: int, ray_address: str, *extra: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [RAYUDF, "serve", str(script), "--port", str(port), "--ray-address", ray_address, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    line = process.stdout.readline()  # the one line it prints once /healthz answers
    if not line:
        process.wait(timeout=60)
        pytest.fail(f"rayudf serve exited {process.returncode}: {process.stderr.read()[-2000:]}")
    return process, line.strip()


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(ray_address, model_dir, tmp_path):
    model = save_pickled(model_dir / "cli_slow.pkl", Weighted(pause_s=2.0))
    script = tmp_path / "serve.sql"
    script.write_text(f'register sklearn.`{model}` as slow where workers="1" and num_cpus="{WORKER_CPUS}";\n')
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    process, line = start(script, port, ray_address, "--token-file", str(token_file))
    try:
        assert line == f"serving http://127.0.0.1:{port} (functions: slow; ingress: {INGRESS_MODES[ingress_mode()]})"
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer from-a-file"}
        assert httpx.post(f"{url}/v1/functions/slow", json={"inputs": [[1, 2]]}).status_code == 401
        assert httpx.post(f"{url}/run/script", json={"sql": "select 1"}, headers=auth).status_code == 403  # off without --allow-scripts
        answers = []

        def ask() -> None:
            answers.append(httpx.post(f"{url}/v1/functions/slow", json={"inputs": [[1, 2]]}, headers=auth, timeout=60))

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.8)  # the request is with the model (2 s) when the signal comes
        process.send_signal(signal.SIGTERM)
        asking.join(timeout=60)
        assert process.wait(timeout=90) == 0, process.stderr.read()[-2000:]
        assert answers[0].status_code == 200 and answers[0].json()["outputs"] == [21.0]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_bad_script_or_an_open_address_without_a_token_exits_with_a_line(ray_address, tmp_path):
    bad = tmp_path / "bad.sql"
    bad.write_text("register sklearn.`/nowhere/model.pkl` as f;\n")
    done = subprocess.run(
        [RAYUDF, "serve", str(bad), "--ray-address", ray_address, "--token", "typed"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    said = done.stderr.strip().splitlines()
    assert said[0] == "warning: --token shows in the process list; prefer --token-file or RAYUDF_TOKEN"
    assert done.returncode == 1 and said[-1] == f"error: {bad}: line 1: model path not found: /nowhere/model.pkl"



@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--host", "0.0.0.0"], "serve: binding 0.0.0.0 opens the server beyond this machine; give a token (--token-file or RAYUDF_TOKEN)"),
        (["--allow-scripts"], "serve: --allow-scripts runs scripts (files, Python) for whoever reaches the port; give a token "
                              "(--token-file or RAYUDF_TOKEN)"),
        (["--token-file", "missing"], "--token-file missing: No such file or directory"),
        (["--token", "typed", "--token-file", "missing"], "give --token or --token-file, not both"),
        (["--replicas", "0"], "serve: replicas must be at least 1, got 0"),  # read as !serve and Session.serve read it
    ],
)
def test_serve_refuses_to_start_without_the_token_it_needs(tmp_path, monkeypatch, extra, says):
    monkeypatch.delenv("RAYUDF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "never_runs.sql"
    script.write_text("register sklearn.`/nowhere/model.pkl` as f;\n")
    done = CliRunner().invoke(main, ["serve", str(script), *extra])
    assert done.exit_code == 2 and says in done.output  # refused before the script runs: no Ray, no model
