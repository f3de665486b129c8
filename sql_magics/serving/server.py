"""Serving a session's functions over HTTP: Ray Serve started, the directory kept, versions leased.

:class:`Serving` is what a session serves with (``Session.serve``, ``!serve``, ``rayudf serve``).
Starting it starts Ray Serve (its ingress on every node, bound to ``host:port``: HAProxy where it is
installed, :mod:`sql_magics.serving.ingress`), the session's
publisher (:mod:`sql_magics.serving.publisher`: the directory that tells the replicas which functions
and versions there are, kept up to date with every registration, swap and removal), and the app's
replicas. Stopping deletes the app, which lets the requests in flight finish, then stops Serve.

Example:
    >>> serving = Serving(registry, session_id="ab12", run_script=lambda sql, owner: None)   # doctest: +SKIP
    >>> serving.start({"port": 8000, "token": "s3cret"}).url                                # doctest: +SKIP
    'http://127.0.0.1:8000'
    >>> serving.stop()                                                                      # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from sql_magics.models.registry import FunctionRegistry
from sql_magics.serving.ingress import INGRESS_MODES, controller_options, ingress_mode
from sql_magics.serving.options import TOKEN_VARIABLE, read_serve_options
from sql_magics.serving.publisher import Publisher
from udf_engine.errors import ConfigError, RayUDFError
from udf_engine.ray_runtime import actor_name

_TOKEN_SOURCES = f"(--token-file or {TOKEN_VARIABLE})"
# How long a server that is starting waits for /healthz to answer: Serve's controller, the proxy and
# the replicas start in some seconds; a loaded machine may take several times that.
READY_TIMEOUT_S = 120.0
_READY_POLL_S = 0.2
# The name of Serve's controller actor: one Serve per Ray cluster.
_SERVE_CONTROLLER = "SERVE_CONTROLLER_ACTOR"
_SERVE_NAMESPACE = "serve"
_log = logging.getLogger(__name__)


@dataclass
class ServerHandle:
    """A running server: its address, and how to stop it."""

    url: str
    functions: list[str]
    stop: Callable[[], None]
    ingress: str = "proxy"  # a key of INGRESS_MODES: HAProxy, or Serve's own proxy

    def __repr__(self) -> str:
        return f"serving {self.url} (functions: {', '.join(self.functions) or 'none yet'}; ingress: {INGRESS_MODES[self.ingress]})"


def check_binding(host: str, token: str | None, allow_scripts: bool = False) -> None:
    """Refuse to serve beyond this machine without a token, and scripts without one anywhere.

    Example:
        >>> check_binding("127.0.0.1", None); check_binding("0.0.0.0", "s3cret")
        >>> check_binding("0.0.0.0", None)
        Traceback (most recent call last):
        udf_engine.errors.ConfigError: serve: binding 0.0.0.0 opens the server beyond this machine; give a token (...)
        >>> check_binding("127.0.0.1", None, allow_scripts=True)
        Traceback (most recent call last):
        udf_engine.errors.ConfigError: serve: --allow-scripts runs scripts (files, Python) for whoever reaches the port; ...
    """
    if allow_scripts and not token:
        raise ConfigError(
            f"serve: --allow-scripts runs scripts (files, Python) for whoever reaches the port; give a token {_TOKEN_SOURCES}"
        )
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        raise ConfigError(f"serve: binding {host} opens the server beyond this machine; give a token {_TOKEN_SOURCES}")


class Serving:
    """The HTTP server of one session (at most one at a time)."""

    def __init__(
        self, registry: FunctionRegistry, *, session_id: str, run_script: Callable[[str, str | None], pd.DataFrame | None]
    ) -> None:
        self._registry = registry
        self._app = f"rayudf-{session_id}"  # the Serve application's name
        self._publisher = Publisher(registry, actor_name(session_id, "serve"), run_script=run_script)
        self._handle: ServerHandle | None = None
        self._serve_started = False  # whether this server started Ray Serve (and so stops it)

    @property
    def handle(self) -> ServerHandle | None:
        """The running server, if any."""
        return self._handle

    @property
    def warning(self) -> str:
        """Why the newest change of the served functions is not known to be served by every replica ("" when it is)."""
        return self._publisher.warning

    def start(self, options: Mapping[str, Any] | None = None) -> ServerHandle:
        """Serve the session's functions until :meth:`stop`; ``options`` by the names of SERVE_OPTIONS (docs/serving.md)."""
        settings = read_serve_options(options or {})
        if self._handle is not None:
            raise ConfigError(f"serve: this session already serves at {self._handle.url} (!serve stop, or handle.stop(), first)")
        host, port, token = settings.host, settings.port, settings.token
        check_binding(host, token, settings.allow_scripts)
        self._registry.runtime.ensure()
        import ray
        from ray import serve

        try:
            ray.get_actor(_SERVE_CONTROLLER, namespace=_SERVE_NAMESPACE)
        except ValueError:
            pass
        else:
            raise ConfigError("serve: Ray Serve already runs on this Ray cluster (one serving session per cluster); stop it first")
        from sql_magics.serving.app import Ingress

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines (apps deployed, deleted) are not the user's
        try:
            self._publisher.start()
            self._serve_started = True
            mode = ingress_mode()
            serve.start(
                http_options={"host": host, "port": port, "request_timeout_s": settings.request_timeout_s},
                controller_options=controller_options(mode),
            )
            serve.run(
                Ingress.options(num_replicas=settings.replicas).bind(
                    self._publisher.directory_name, token, settings.allow_scripts, host, port, settings.request_timeout_s
                ),
                name=self._app, route_prefix="/", blocking=False,
            )
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
            wait_healthy(url)
        except BaseException:
            self._shutdown()
            raise
        self._handle = ServerHandle(url, sorted(self._registry.model_functions()), self.stop, mode)
        return self._handle

    def stop(self) -> None:
        """Stop serving: the requests in flight finish (up to the app's drain timeout), new ones are refused."""
        if self._handle is None:
            return
        self._handle = None
        self._shutdown()

    def _shutdown(self) -> None:
        from ray import serve

        try:
            if self._serve_started:
                serve.delete(self._app)  # lets the replicas finish what they answer
        finally:
            if self._serve_started:
                serve.shutdown()
                self._serve_started = False
            self._publisher.stop()


def wait_healthy(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until ``url``/healthz answers 200: every function served has a live worker."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RayUDFError(f"serve: {url}/healthz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(_READY_POLL_S)
