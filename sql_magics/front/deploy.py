"""``rayudf deploy``: a script's functions as a Ray Serve application that outlives its launcher.

The application has two deployments:

- ``Owner``, one replica: a session that runs the script (its ``set``, ``load`` and ``register``
  statements), owns the functions' masters and workers, and publishes them in the directory the
  HTTP replicas follow (:mod:`sql_magics.serving.publisher`). When it dies (its process killed, its
  node lost) its workers die with it, Serve starts it again, and it runs the script again; the HTTP
  replicas answer 503 with ``Retry-After`` meanwhile. The script is its ``user_config``: deploying a
  changed script reconfigures the running owner, which registers each function again, a rolling swap
  as a re-register in SQL is, and removes the functions the script no longer registers.
- ``Ingress``, ``replicas`` of them: the HTTP tier of ``rayudf serve`` (:mod:`sql_magics.serving.app`).

Serve's controller is detached and restarts both: no process of the launcher's is needed once the
app answers. :func:`app` is the application builder, so the same app deploys from a Serve config
file (``serve deploy``, KubeRay's RayService): ``import_path: sql_magics.front.deploy:app`` and
``args`` of :data:`DEPLOY_OPTIONS` and the serve options (docs/serving.md, "Deploying on a cluster").

Example:
    >>> application = app({"script": "register sklearn.`/models/digits.pkl` as digit;", "port": 8000})   # doctest: +SKIP
    >>> serve.run(application, name="scores", route_prefix="/")                                          # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ray import serve

from sql_magics.language.parser import parse
from sql_magics.serving.app import Ingress
from sql_magics.serving.directory import app_directory_name
from sql_magics.serving.ingress import INGRESS_MODES, controller_options, ingress_mode
from sql_magics.serving.options import ServeOptions, read_serve_options
from sql_magics.serving.server import check_binding, wait_healthy
from udf_engine.errors import ConfigError, RayUDFError
from udf_engine.settings import Option, read_options

DEPLOY_OPTIONS: tuple[Option, ...] = (
    Option("script", None, str, "the script's text (its set, load and register statements); or the Owner's user_config"),
    Option("script_path", None, str, "or a file of it, read where the app is built (on the cluster)"),
    Option("base_dir", None, str, "where the script's include statements look (default: the owner's working directory)"),
)
# Statements a deployed script may not hold: a command (`!serve` would start another server in the
# owner) and a save (an HTTP app writes no files); what the script is for is registering functions.
_NOT_DEPLOYED = {"command": "a command (!serve, !workers, ...)", "save": "a save"}
# How long the launcher waits for a deployed app to answer: the owner registers every function first.
DEPLOYED_TIMEOUT_S = 600.0
_POLL_S = 0.5
# How often Serve asks an owner whether it is alive: its death is noticed within this.
_OWNER_HEALTH_PERIOD_S = 2.0
_log = logging.getLogger("ray.serve.rayudf")


def script_digest(script: str) -> str:
    """What tells two scripts apart (an owner runs a script once: the same one deployed again is no change).

    Example:
        >>> script_digest("register sklearn.`/m.pkl` as f;")[:12]
        '29140cf80952'
    """
    return hashlib.sha256(script.encode()).hexdigest()


def check_script(script: str, source: str = "the script") -> list[str]:
    """The names of the functions a deployed script registers; ParseError when it does not parse,
    ConfigError when it holds a statement a deployed app does not run.

    Example:
        >>> check_script("set w = '2'; register sklearn.`/m.pkl` as f where workers='${w}';")
        ['f']
        >>> check_script("!serve port=8001;")
        Traceback (most recent call last):
        udf_engine.errors.ConfigError: deploy: the script holds a command (!serve, !workers, ...) at line 1; ...
    """
    statements = parse(script, source)
    for statement in statements:
        if statement.kind in _NOT_DEPLOYED:
            raise ConfigError(
                f"deploy: the script holds {_NOT_DEPLOYED[statement.kind]} at line {statement.line}; a deployed app runs the "
                "set, load, select and register statements that make its functions"
            )
    return [statement.function for statement in statements if statement.kind == "register"]


@dataclass(frozen=True)
class DeployArgs:
    """A deployed app's arguments, read and checked: its script and the serve options."""

    script: str | None  # None: the Owner's user_config (a Serve config's deployments) gives it
    base_dir: str | None
    serve: ServeOptions

    @classmethod
    def of(cls, given: Mapping[str, Any]) -> DeployArgs:
        """``given`` (a Serve config's ``args``) typed and checked, the script read if a path names it."""
        own = {k: v for k, v in given.items() if k in {o.name for o in DEPLOY_OPTIONS}}
        values = read_options(own, DEPLOY_OPTIONS, "deploy")
        settings = read_serve_options({k: v for k, v in given.items() if k not in own})
        script = values["script"]
        if script is not None and values["script_path"] is not None:
            raise ConfigError("deploy: give the script's text (script) or a file of it (script_path), not both")
        if values["script_path"] is not None:
            try:
                script = Path(values["script_path"]).read_text()
            except OSError as err:
                raise ConfigError(f"deploy: script_path {values['script_path']}: {err.strerror}") from None
        if script is not None:
            check_script(script)
        check_binding(settings.host, settings.token, settings.allow_scripts)
        return cls(script, values["base_dir"], settings)


def app(args: dict) -> serve.Application:
    """Serve's application builder: the owner and the HTTP tier of a deployed script (``args``: DEPLOY_OPTIONS
    and the serve options). The app's name, which its replicas read from Serve, names its directory."""
    given = DeployArgs.of(args)
    settings = given.serve
    ingress_args = (None, settings.token, settings.allow_scripts, settings.host, settings.port, settings.request_timeout_s)
    owner = _pinned(Owner, given.base_dir)
    if given.script is not None:
        owner = owner.options(user_config={"script": given.script})
    owner = owner.bind(given.base_dir)
    return _pinned(Ingress, ingress_args).options(num_replicas=settings.replicas).bind(*ingress_args, owner)


def _pinned(deployment: serve.Deployment, arguments: Any) -> serve.Deployment:
    """``deployment`` with a code version of its own: rayudf's version and its constructor's arguments. Deployed
    from Python (``serve.run``), a deployment otherwise gets a new random version each time, and Serve starts
    its replicas anew: a changed script would stop the owner and its workers instead of reconfiguring it.
    (From a config file, Serve versions the app by its import path and ``args`` itself.) Serve keeps setting the
    version to itself (``_internal``); where it takes no such option, the deployment is as it is."""
    version = hashlib.sha256(repr((metadata.version("rayudf"), arguments)).encode()).hexdigest()[:16]
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError):
        return deployment


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},  # it only registers: the workers hold the cores
    health_check_period_s=_OWNER_HEALTH_PERIOD_S,
)
class Owner:
    """The session of a deployed app: it runs the script, owns the functions' workers and publishes them."""

    def __init__(self, base_dir: str | None = None) -> None:
        from sql_magics.serving.publisher import Publisher
        from sql_magics.session import Session

        self._base_dir = Path(base_dir) if base_dir else Path.cwd()
        self._session = Session(warm=False)  # on the replica's Ray
        # started with the first script (reconfigure): its functions are published as to come from the first
        self._publisher = Publisher(self._session.registry, app_directory_name(), run_script=self._session.answer_script)
        self._lock = threading.Lock()  # one script at a time
        self._state: dict[str, Any] = {"applied": None, "script": None, "failed": None, "error": ""}

    async def reconfigure(self, config: dict) -> None:
        """Serve's: the app's script, at start and whenever a changed one is deployed."""
        await asyncio.to_thread(self._apply, str(config.get("script") or ""))

    def _apply(self, script: str) -> None:
        """Run ``script`` unless it is the one applied: each function it registers is registered again (a rolling
        swap while the old version answers), and those it no longer registers are removed. A script that fails
        at start fails the replica (Serve says so); later, the functions of the script before stay."""
        digest = script_digest(script)
        with self._lock:
            if digest == self._state["applied"]:
                return
            names = check_script(script)
            before = self._session.functions
            if self._publisher.directory is None:
                self._publisher.start(starting=names)
            try:
                with self._publisher.starting(set(names) - set(before)):
                    self._session.run(script, base_dir=self._base_dir)
                    after = self._session.functions
                    for name, registered in before.items():
                        if after.get(name) is registered:  # not registered again: no longer the script's
                            self._session.unregister(name)
            except Exception as err:
                if self._state["applied"] is None:
                    raise
                _log.error("deploy: the changed script failed; the functions of the one before answer", exc_info=err)
                self._state.update(failed=digest, error=f"{type(err).__name__}: {err}")
                return
            self._state.update(applied=digest, script=script, failed=None, error="")

    def state(self) -> dict[str, Any]:
        """What the owner runs: the digest and text of the script applied, the digest and error of one that
        failed since, and the functions."""
        with self._lock:
            return {**self._state, "functions": sorted(self._session.registry.model_functions())}

    def __del__(self) -> None:
        publisher, session = getattr(self, "_publisher", None), getattr(self, "_session", None)
        try:
            if publisher is not None:
                publisher.stop()
        finally:
            if session is not None:
                session.close()


# -- the launcher (``rayudf deploy``): on a driver joined to the cluster -----------------------------


@dataclass(frozen=True)
class Deployed:
    """A deployed app that answers."""

    name: str
    url: str
    functions: list[str]
    ingress: str | None  # a key of INGRESS_MODES when this deploy started Serve (None: Serve ran already, as it was started)

    def __str__(self) -> str:
        ingress = f"; ingress: {INGRESS_MODES[self.ingress]}" if self.ingress else ""
        return f"deployed {self.name} at {self.url} (functions: {', '.join(self.functions) or 'none'}{ingress})"


def deploy(name: str, args: dict, route_prefix: str = "/") -> Deployed:
    """Deploy (or update) the app ``name`` and wait until its owner ran the script and every function has a
    live worker. A changed script that fails leaves the app on the script before, and raises."""
    given = DeployArgs.of(args)
    settings = given.serve
    if given.script is None:
        raise ConfigError("deploy: give the script's text (script) or a file of it (script_path)")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines (Serve started, apps ready) are not the user's
    ingress = _start_serve(settings)
    before = _owner_state(name)
    serve.run(app(args), name=name, route_prefix=route_prefix, blocking=False)
    digest = script_digest(given.script)
    state = _wait_applied(name, digest)
    if state["failed"] == digest:
        if before and before.get("script"):
            serve.run(app({**args, "script": before["script"], "script_path": None}), name=name, route_prefix=route_prefix, blocking=False)
        raise RayUDFError(f"deploy {name}: the changed script failed, and the app answers with the script before: {state['error']}")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}{route_prefix.rstrip('/')}"
    wait_healthy(url, DEPLOYED_TIMEOUT_S)
    return Deployed(name, url, state["functions"], ingress)


def _start_serve(settings: ServeOptions) -> str | None:
    """Start Serve (detached: it outlives this process) on the options' address, in the ingress mode this machine
    has (its mode then), or check that the Serve running is on that address (None)."""
    import ray

    try:
        config = ray.serve.context._get_global_client().http_config  # a private API: else Serve's own check alone
    except Exception:  # noqa: BLE001 - no Serve yet (RayServeException), or another Serve's layout
        config = None
    if config is not None and (config.host, config.port) != (settings.host, settings.port):
        raise ConfigError(
            f"deploy: Ray Serve on this cluster listens on {config.host}:{config.port} (one HTTP address per cluster); "
            f"deploy with --host {config.host} --port {config.port}"
        )
    mode = None if config is not None else ingress_mode()
    http = {"host": settings.host, "port": settings.port, "request_timeout_s": settings.request_timeout_s}
    serve.start(http_options=http, controller_options=controller_options(mode) if mode else None)
    return mode


def _owner_state(name: str, timeout_s: float = 30.0) -> dict | None:
    """The state of the app's owner (None: no such app, or no owner answering)."""
    if name not in serve.status().applications:
        return None
    try:
        return serve.get_deployment_handle(Owner.name, app_name=name).state.remote().result(timeout_s=timeout_s)
    except Exception:  # noqa: BLE001 - an app of another kind, or one whose owner is down: nothing to go back to
        return None


def _wait_applied(name: str, digest: str) -> dict:
    """Wait until the app's owner ran the script ``digest`` (or failed on it); its state then."""
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + DEPLOYED_TIMEOUT_S
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RayUDFError(f"deploy {name}: {_why_failed(status)}")
        if status is not None and status.status == ApplicationStatus.RUNNING:
            state = _owner_state(name)
            if state is not None and digest in (state["applied"], state["failed"]):
                return state
        time.sleep(_POLL_S)
    raise RayUDFError(f"deploy {name}: the app did not run its script within {DEPLOYED_TIMEOUT_S:.0f} s (serve status shows why)")


def _why_failed(status: Any) -> str:
    """The last line of what failed a deployment of the app (Serve keeps the whole traceback)."""
    for deployment in status.deployments.values():
        lines = [line for line in (deployment.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return status.message or "the app failed to deploy"


def deployed() -> list[dict]:
    """The rayudf apps on the cluster: name, status, route and functions (``rayudf deploy --status``)."""
    details = serve.status().applications
    rows = []
    for name, status in sorted(details.items()):
        if Owner.name not in status.deployments:
            continue
        state = _owner_state(name, timeout_s=5.0) or {}
        rows.append({
            "name": name, "status": str(status.status.value if hasattr(status.status, "value") else status.status),
            "functions": ", ".join(state.get("functions", [])), "error": state.get("error", ""),
        })
    return rows


def undeploy(name: str) -> None:
    """Delete the app ``name`` (its requests in flight finish; its owner's workers stop with it)."""
    if name not in serve.status().applications:
        raise ConfigError(f"deploy: no app named {name} runs on this cluster (rayudf deploy --status lists them)")
    serve.delete(name)

