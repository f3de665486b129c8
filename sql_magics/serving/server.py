"""Serving a session's functions over HTTP: Ray Serve started, the directory kept, versions leased.

:class:`Serving` is what a session serves with (``Session.serve``, ``!serve``, ``rayudf serve``).
Starting it starts Ray Serve (its proxy on every node, bound to ``host:port``), a directory actor
that tells the replicas which functions and versions there are, and the app's replicas. While it
serves, every registration, swap and removal of the session's model functions is published to the
replicas, and a version no longer published keeps its workers until no replica can still answer
with it (each replica reports the versions its requests in flight use). Stopping deletes the app,
which lets the requests in flight finish, then stops Serve.

Example:
    >>> serving = Serving(registry, session_id="ab12", run_script=lambda sql, owner: None)   # doctest: +SKIP
    >>> serving.start({"port": 8000, "token": "s3cret"}).url                                # doctest: +SKIP
    'http://127.0.0.1:8000'
    >>> serving.stop()                                                                      # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from sql_magics.errors import ExecutionError, ParseError
from sql_magics.models.registry import FunctionRegistry
from sql_magics.serving.directory import Directory, FunctionEntry, VersionEntry
from sql_magics.serving.options import TOKEN_VARIABLE, read_serve_options
from sql_magics.serving.requests import rows_json
from udf_engine.errors import ConfigError, RayUDFError
from udf_engine.ray_runtime import NAMESPACE, actor_name
from udf_engine.settings import as_bool

_TOKEN_SOURCES = f"(--token-file or {TOKEN_VARIABLE})"
# How long a server that is starting waits for /healthz to answer: Serve's controller, the proxy and
# the replicas start in some seconds; a loaded machine may take several times that.
READY_TIMEOUT_S = 120.0
_READY_POLL_S = 0.2
# How long a registration waits for the replicas to answer with it: they hear of it at once and
# only ask the new version's master for its workers; a replica that takes longer is slow or gone.
HEARD_TIMEOUT_S = 10.0
_HEARD_POLL_S = 0.02
# How often the server looks at the replicas' reports (to let old versions go) and for scripts to run.
_TEND_S = 0.25
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

    def __repr__(self) -> str:
        return f"serving {self.url} (functions: {', '.join(self.functions) or 'none yet'})"


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
        self._directory_name = actor_name(session_id, "serve")
        self._run_script = run_script  # (sql, owner or None) -> the last statement's rows
        self._directory: Any = None
        self._handle: ServerHandle | None = None
        self._keys: dict[int, tuple[Any, str]] = {}  # id(Version) -> (version, key): the versions leased
        self._removed: dict[str, int] = {}  # keys of leased versions no longer published -> the revision that dropped them
        self._serial = 0  # numbers the version keys
        self._unconfirmed: tuple[int, str] | None = None  # (revision, warning) while some replica has not confirmed it
        self._lock = threading.Lock()  # guards _keys, _removed, _serial and _unconfirmed
        self._publishing = threading.Lock()  # one publish at a time, so revisions follow the registry's order
        self._stopping = threading.Event()
        self._tender: threading.Thread | None = None
        self._serve_started = False  # whether this server started Ray Serve (and so stops it)

    @property
    def handle(self) -> ServerHandle | None:
        """The running server, if any."""
        return self._handle

    @property
    def warning(self) -> str:
        """Why the newest change of the served functions is not known to be served by every replica ("" when it is)."""
        with self._lock:
            return self._unconfirmed[1] if self._unconfirmed else ""

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
        self._stopping.clear()
        self._directory = ray.remote(Directory).options(name=self._directory_name, namespace=NAMESPACE, num_cpus=0).remote()
        try:
            self._publish()
            self._registry.watch(self._publish)
            self._serve_started = True
            serve.start(http_options={"host": host, "port": port, "request_timeout_s": settings.request_timeout_s})
            serve.run(
                Ingress.options(num_replicas=settings.replicas).bind(
                    self._directory, token, settings.allow_scripts, host, port, settings.request_timeout_s
                ),
                name=self._app, route_prefix="/", blocking=False,
            )
            self._tender = threading.Thread(target=self._tend, name="rayudf-serving", daemon=True)
            self._tender.start()
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
            _wait_healthy(url)
        except BaseException:
            self._shutdown()
            raise
        self._handle = ServerHandle(url, sorted(self._registry.model_functions()), self.stop)
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
            self._registry.unwatch(self._publish)
        except ValueError:
            pass  # not watching yet
        try:
            if self._serve_started:
                serve.delete(self._app)  # lets the replicas finish what they answer
        finally:
            if self._serve_started:
                serve.shutdown()
                self._serve_started = False
            self._stopping.set()
            if self._tender is not None:
                self._tender.join()
            with self._lock:
                leased, self._keys, self._removed = [v for v, _ in self._keys.values()], {}, {}
                self._unconfirmed = None
            for version in leased:
                version.leave()
            if self._directory is not None:
                import ray

                ray.kill(self._directory)
                self._directory = None

    # -- what the replicas are told --------------------------------------------------------

    def _publish(self) -> None:
        """Tell the replicas the session's functions now; lease the versions they may use."""
        with self._publishing:
            self._publish_now()

    def _publish_now(self) -> None:
        import ray

        entries: dict[str, FunctionEntry] = {}
        published: set[str] = set()
        registered = self._registry.functions
        for name, fn in self._registry.model_functions().items():
            versions = tuple(self._entry(version, share) for version, share in fn.live_versions())
            published |= {v.key for v in versions}
            conf = registered[name].udf.conf  # the newest registration's serving options
            entries[name] = FunctionEntry(
                name, fn.return_type, registered[name].kind, versions, conf.max_batch_size, conf.batch_wait_timeout_s
            )
        revision = ray.get(self._directory.publish.remote(entries))
        with self._lock:
            for _, key in self._keys.values():
                if key not in published:
                    self._removed.setdefault(key, revision)
        self._wait_heard(revision)

    def _wait_heard(self, revision: int) -> None:
        """Return once every replica answers with ``revision`` (a registration is served when it returns);
        after HEARD_TIMEOUT_S, say that some do not: a warning logged, and in ``!serve status`` until they do."""
        import ray

        deadline = time.monotonic() + HEARD_TIMEOUT_S
        while True:
            reports = ray.get(self._directory.reports.remote())
            behind = sum(seen < revision for seen, _ in reports.values())
            if not behind or time.monotonic() >= deadline:
                break
            time.sleep(_HEARD_POLL_S)
        warning = ""
        if behind:
            warning = (
                f"serve: {behind} of {len(reports)} replicas did not confirm the newest change of the served functions (a "
                f"registration, swap or removal) within {HEARD_TIMEOUT_S:g} s; until they do, they answer with what they had before"
            )
            _log.warning(warning)
        with self._lock:
            self._unconfirmed = (revision, warning) if warning else None

    def _confirmed(self, reports: dict[str, tuple[int, frozenset[str]]]) -> None:
        """Forget the warning of a change once every replica heard from recently runs on it (or a newer one)."""
        with self._lock:
            if self._unconfirmed and all(seen >= self._unconfirmed[0] for seen, _ in reports.values()):
                self._unconfirmed = None

    def _entry(self, version: Any, share: float) -> VersionEntry:
        with self._lock:
            if id(version) not in self._keys:
                self._serial += 1
                version.enter()  # a lease: its workers stay while replicas may answer with it
                self._keys[id(version)] = (version, f"{version.udf.function}#{self._serial}")
            key = self._keys[id(version)][1]
        udf = version.udf
        return VersionEntry(key, version.label, share, udf.master, udf.conf, udf.model_refs, version.width, udf.conf.workers)

    # -- tending: old versions let go, scripts run -----------------------------------------

    def _tend(self) -> None:
        import ray

        while not self._stopping.is_set():
            try:
                job = ray.get(self._directory.next_script.remote(_TEND_S))
                reports = ray.get(self._directory.reports.remote())
            except ray.exceptions.RayError:
                if self._stopping.wait(_TEND_S):
                    return
                continue
            if job is not None:
                threading.Thread(target=self._answer_script, args=job, name="rayudf-script", daemon=True).start()
            self._let_go(reports)
            self._confirmed(reports)

    def _let_go(self, reports: dict[str, tuple[int, frozenset[str]]]) -> None:
        """End the leases of versions no replica can still use."""
        with self._lock:
            done = [
                key for key, revision in self._removed.items()
                if all(seen >= revision and key not in busy for seen, busy in reports.values())
            ]
            gone = [(i, v) for i, (v, key) in self._keys.items() if key in done]
            for i, _ in gone:
                del self._keys[i]
            for key in done:
                del self._removed[key]
        for _, version in gone:
            version.leave()

    def _answer_script(self, job: int, request: dict) -> None:
        self._directory.answer.remote(job, script_answer(request, self._run_script))


def script_answer(request: dict, run: Callable[[str, str | None], pd.DataFrame | None]) -> dict:
    """Byzer's ``/run/script`` answer: the last statement's rows (``[]`` for none), with their schema
    when ``includeSchema`` is true; ``owner`` with ``sessionPerUser`` runs in that owner's own session.

    Example:
        >>> answer = script_answer({"sql": "select 1 as x", "includeSchema": "true"}, lambda sql, owner: pd.DataFrame({"x": [1]}))
        >>> answer["status"], answer["body"]["data"], answer["body"]["schema"]["fields"][0]["type"]
        (200, [{'x': 1}], 'int64')
    """
    sql = str(request.get("sql") or "")
    if not sql.strip():
        return {"status": 400, "body": {"error": "/run/script: the sql parameter (the script) is required"}}
    try:
        per_user, with_schema = (as_bool(request.get(name) or False, name) for name in ("sessionPerUser", "includeSchema"))
    except ConfigError as err:
        return {"status": 400, "body": {"error": f"/run/script: {err}"}}
    owner = str(request.get("owner") or "admin") if per_user else None
    try:
        frame = run(sql, owner)
        table = pa.table({}) if frame is None else pa.Table.from_pandas(frame, preserve_index=False)
        rows = rows_json(table)
    except (ParseError, ExecutionError, RayUDFError) as err:
        if not isinstance(err, ParseError):
            _log.error("/run/script answers 500: the script failed", exc_info=err)
        return {"status": 400 if isinstance(err, ParseError) else 500, "body": {"error": str(err)}}
    except BaseException as err:  # noqa: BLE001 - SystemExit, a result Arrow cannot hold: still an answer, never a lost request
        _log.error("/run/script answers 500: running the script raised", exc_info=err)
        return {"status": 500, "body": {"error": f"/run/script: {type(err).__name__}: {err}"}}
    if not with_schema:
        return {"status": 200, "body": rows}
    fields = [{"name": f.name, "type": str(f.type), "nullable": True} for f in table.schema]
    return {"status": 200, "body": {"schema": {"type": "struct", "fields": fields}, "data": rows}}


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RayUDFError(f"serve: {url}/healthz did not answer within {READY_TIMEOUT_S:.0f} s")
        time.sleep(_READY_POLL_S)
