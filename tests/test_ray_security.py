"""The Ray rayudf starts listens on loopback only and keeps its token file to its user; joining a
cluster that lets anyone in without a token says so, once."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import psutil
import pytest

from udf_engine.ray_runtime import _answers_without_token, _private_token_file, warn_if_open

from conftest import ray_head


def _ray_processes() -> list[psutil.Process]:
    """The processes of the test session's Ray: its GCS, its raylet and everything the raylet started."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    servers = [p for p in psutil.process_iter(["cmdline"]) if any(session in part for part in p.info["cmdline"] or [])]
    return servers + [child for p in servers for child in p.children(recursive=True)]


def test_the_local_ray_listens_on_loopback_only(ray_cluster):
    assert ray_cluster.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    pids = {p.pid for p in _ray_processes()}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 3  # the GCS, the raylet, its workers
    assert {c.laddr.ip for c in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening


def test_a_new_local_ray_keeps_its_token_file_to_its_user(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no token there yet: a local start makes one (Ray's default path)
    _private_token_file()
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    written = token.read_text()
    _private_token_file()  # one there already: kept as it is
    assert token.read_text() == written
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    token.unlink()
    _private_token_file()  # no token auth: no token file
    assert not token.exists()


@pytest.fixture(scope="module")
def open_cluster():
    """A head node with token authentication off."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    with ray_head("--num-cpus=1", "--disable-usage-stats", env=env) as address:
        yield address


def test_a_cluster_that_takes_calls_without_a_token_is_told_apart(ray_cluster, open_cluster):
    assert _answers_without_token(open_cluster)
    assert not _answers_without_token(ray_cluster.get_runtime_context().gcs_address)  # token auth on, Ray's default


def test_joining_a_cluster_without_token_auth_warns_once(open_cluster):
    with pytest.warns(RuntimeWarning, match=f"the Ray cluster at {open_cluster} has token authentication off"):
        warn_if_open(open_cluster)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_open(open_cluster)  # once per cluster


def _joined_gcs(address: str, home: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``rayudf run`` of a script that joins ``address`` (RAY_ADDRESS) with HOME ``home`` and no RAY_AUTH_* set."""
    script = tmp_path / "join.sql"
    script.write_text("""run command as Ray.`` where outputTable="joined" and code='''
import ray
from pyjava.api.mlsql import RayContext
RayContext.connect(globals(), None)
context.build_result([{"gcs": ray.get_runtime_context().gcs_address}])
''';
select gcs from joined as output;""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), RAY_ADDRESS=address)
    rayudf = str(Path(sys.executable).with_name("rayudf"))
    return subprocess.run([rayudf, "run", str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_joining_a_token_cluster_finds_the_token_as_rays_cli_does_or_says_what_to_set(tmp_path):
    home, stranger = tmp_path / "home", tmp_path / "stranger"
    (home / ".ray").mkdir(parents=True)
    stranger.mkdir()
    (home / ".ray" / "auth_token").write_text("a" * 64)  # the cluster's token, where Ray's CLI looks for it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    with ray_head("--num-cpus=1", "--disable-usage-stats", env=env) as address:
        joined = _joined_gcs(address, home, tmp_path)
        assert joined.returncode == 0, joined.stderr
        assert joined.stdout.split()[-1] == address
        refused = _joined_gcs(address, stranger, tmp_path)  # no token on this "machine"
    assert refused.returncode != 0
    assert f"the Ray cluster at {address} wants Ray's token" in refused.stderr and "RAY_AUTH_TOKEN_PATH" in refused.stderr
    assert "Traceback" not in refused.stderr
