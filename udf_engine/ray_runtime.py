"""Which Ray the UDFs run on.

:class:`RayRuntime` joins the cluster named by ``address`` or ``RAY_ADDRESS``, or
else starts a local Ray on first use (dashboard off) and stops it at ``shutdown``
only if it started it.

Example:
    >>> runtime = RayRuntime()           # nothing starts yet
    >>> runtime.ensure()                 # doctest: +SKIP
    >>> runtime.address is None
    True
    >>> runtime.start_ahead(then=warm_spares)   # doctest: +SKIP
    ... # Ray starts on a thread of its own; the caller goes on at once
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from udf_engine.errors import ConfigError

# Every rayudf actor lives in this namespace; names inside it carry a per-session
# token, so two sessions on one cluster never replace each other's UDFs.
NAMESPACE = "rayudf"


def actor_name(*parts: str) -> str:
    """The name of a rayudf actor: ``rayudf.<session>.<function>...``, inside :data:`NAMESPACE`.

    Example:
        >>> actor_name("ab12", "digits", "r1")
        'rayudf.ab12.digits.r1'
    """
    return ".".join((NAMESPACE, *parts))


# Whether we start Ray or join it: workers' output (TensorFlow's and absl's start-up
# lines) stays in their log files under Ray's session directory instead of filling the
# notebook or the terminal. Errors still reach the caller: Ray raises them from the call
# that failed.
_QUIET = {"log_to_driver": False, "logging_level": logging.WARNING}
# The Ray rayudf starts (a cluster it joins keeps its own settings) returns values up to 1 MiB
# inside the task's reply instead of through the object store. A worker's share of a query
# comes back as its scores, ~330 KB for 8,192 rows of 10 float32 (Ray's default threshold is
# 100 KB); inline, each share costs ~1 ms less (bench.interactive's fixed cost: 200k rows in
# 20 shares, 27-31 ms against 34-53 ms).
LOCAL_SYSTEM_CONFIG = {"max_direct_call_object_size": 1 << 20}
_log = logging.getLogger(__name__)
_AUTH_MODE = "RAY_AUTH_MODE"  # Ray's switch for token authentication: "token" (its default for a new local Ray) or "disabled"
# How long the check whether a cluster takes calls without a token waits for its GCS (on the same network, it answers in ms).
_PROBE_TIMEOUT_S = 5.0
_WARNED: set[str] = set()  # the clusters warned about (their GCS address, "local"): each once per process


# Ray's notices about faults the engine handles itself: a worker process that died (it is
# replaced, its batches retried) and a call to our actors that Ray retries (the master
# restarting, Serve's controller while a server stops). Other notices (a node out of memory, a task that cannot be scheduled) still
# print: they explain trouble the caller may not otherwise see.
_HANDLED_NOTICES = ("A worker died or was killed", "Task UDFMaster.", "Task UDFWorker.", "Task ServeController.")


def _log_raylet_notices() -> None:
    """Send Ray's "(raylet) A worker died ..." notices (see _HANDLED_NOTICES) to logging (INFO)
    instead of stdout.

    ``log_to_driver=False`` does not cover them (ray-project/ray#28216): the driver's
    error listener prints them with ``ray._private.worker.print_to_stdstream``, which
    has no switch. A death is already handled (the batch is retried, or the query fails
    naming it), so in a notebook cell the notice is noise. Without that function (another
    Ray version) nothing changes.
    """
    import ray._private.worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "rayudf_routes_raylet", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        lines = data.get("lines", [])
        if data.get("pid") != "raylet" or not all(str(line).startswith(_HANDLED_NOTICES) for line in lines):
            printer(data, ignore_prefix)
            return
        for line in lines:
            _log.info("raylet: %s", line)

    print_to_stdstream.rayudf_routes_raylet = True
    ray_worker.print_to_stdstream = print_to_stdstream


def cluster_can_grow() -> bool:
    """Whether an autoscaler may add nodes to the Ray this process is connected to.

    Ray's autoscaler (v1) publishes its status in the GCS: a cluster without autoscaling
    config only mirrors the nodes it has, each as a node type ``node_<id>``; one with a
    config names its own node types, or has launches pending. Autoscaler v2 is only on
    when configured.
    """
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    if _internal_kv_get(ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY, namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE) == b"1":
        return True
    raw = _internal_kv_get(ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return False
    report = json.loads(raw).get("autoscaler_report") or {}
    if report.get("pending_launches") or report.get("pending_nodes"):
        return True
    return any(kind != f"node_{node}" for node, kind in (report.get("node_type_mapping") or {}).items())


def init_local(**options: Any) -> None:
    """``ray.init`` of a new local Ray, as rayudf starts one (the tests' and the benchmarks' too):
    dashboard off, results inline (:data:`LOCAL_SYSTEM_CONFIG`), every Ray server listening on
    loopback only, and the token of Ray's token authentication (on by default) in a file only its
    user can read.

    Ray's own local start takes this machine's reachable address and listens on every interface;
    with the node's address set to loopback, every server it starts binds there instead.
    """
    import ray

    options["_system_config"] = {**LOCAL_SYSTEM_CONFIG, **options.get("_system_config", {})}
    _private_token_file()
    with _node_on_loopback():
        ray.init(namespace=NAMESPACE, include_dashboard=False, **options)
    warn_if_open(None)


def join(address: str, **options: Any) -> None:
    """``ray.init`` of the cluster at ``address``. A driver on this machine's loopback Ray (one that
    :func:`init_local` started in another process) is a node on loopback too: Ray would otherwise
    look for its raylet at this machine's reachable address, where none listens."""
    import ray

    if not _token_mode_if_token_here() and os.environ.get(_AUTH_MODE, "").lower() != "token" and _unauthenticated_call(address) == REFUSED:
        # said before Ray tries: its connection retries a refused call for some 20 s, logging each refusal
        raise ConfigError(
            f"the Ray cluster at {address} wants Ray's token and this machine has none (no RAY_AUTH_TOKEN, no {_token_path()}): "
            "give its token in RAY_AUTH_TOKEN or in a file named by RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on its head prints it)"
        )
    with _node_on_loopback() if _is_loopback(address) else nullcontext():
        ray.init(address=address, namespace=NAMESPACE, **options)
    warn_if_open(ray.get_runtime_context().gcs_address)


def _token_path() -> Path:
    """Where Ray reads its token from: RAY_AUTH_TOKEN_PATH, else ``~/.ray/auth_token``."""
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"


def _token_mode_if_token_here() -> bool:
    """Send Ray's token when joining a cluster, as Ray's own CLI does: when RAY_AUTH_MODE does not say
    otherwise and this machine has a token (RAY_AUTH_TOKEN, or the file Ray reads). Without it, a
    driver joining a token-authenticated cluster sends none and is refused. Whether token mode was turned on."""
    if os.environ.get(_AUTH_MODE) is not None or not (os.environ.get("RAY_AUTH_TOKEN") or _token_path().exists()):
        return False
    os.environ[_AUTH_MODE] = "token"  # this process's Ray when it connects, and the workers it starts, read it
    try:  # Ray's own switch also refreshes the config this process's Ray has read already (a private API: else the env alone)
        from ray._private.authentication import authentication_token_setup as setup

        del os.environ[_AUTH_MODE]
        said = logging.getLogger(setup.__name__)
        level = said.level
        said.setLevel(logging.ERROR)  # its "token authentication is enabled" is for a cluster it starts, not one joined
        try:
            setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        finally:
            said.setLevel(level)
    except Exception:  # noqa: BLE001 - another Ray's layout: the environment variable is set
        os.environ[_AUTH_MODE] = "token"
    return True


@contextmanager
def _node_on_loopback() -> Iterator[None]:
    """While ``ray.init`` runs, this node's address is loopback: Ray's switch for "this node is one of a
    cluster" (ENABLE_RAY_CLUSTER, on by default on Linux) is off. A Ray without that switch: as it is."""
    from ray._private import ray_constants

    clustered = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if clustered is None:
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clustered


def _is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``) is on loopback.

    Example:
        >>> _is_loopback("127.0.0.1:6379"), _is_loopback("localhost:6379"), _is_loopback("10.0.0.5:6379"), _is_loopback("auto")
        (True, True, False, False)
    """
    host = urlsplit(f"//{address}").hostname if "://" not in address else None
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _private_token_file() -> None:
    """Make the token file a new local Ray would write (``~/.ray/auth_token``, which Ray writes with the
    default umask: readable by every user) ourselves, mode 0600, when token auth is on and no token exists."""
    if os.environ.get(_AUTH_MODE, "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = _token_path()
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile: Ray reads that one
        return
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator makes


def warn_if_open(gcs_address: str | None) -> None:
    """Warn once per cluster when the Ray this process uses lets anyone in without a token: the local Ray
    rayudf started (``gcs_address`` None) with RAY_AUTH_MODE=disabled, or a cluster whose GCS answers a
    call that carries no token."""
    key = gcs_address or "local"
    if key in _WARNED:
        return
    _WARNED.add(key)
    if gcs_address is None:
        if os.environ.get(_AUTH_MODE, "token").lower() == "token":
            return
        where = f"the local Ray rayudf started ({_AUTH_MODE}={os.environ[_AUTH_MODE]})"
    elif _answers_without_token(gcs_address):
        where = f"the Ray cluster at {gcs_address}"
    else:
        return
    warnings.warn(
        f"{where} has token authentication off: whoever can reach its ports can run code there as its user and read "
        f"what it holds (models, data). Start it with {_AUTH_MODE}=token (https://docs.ray.io/en/latest/ray-security/token-auth.html)",
        RuntimeWarning,
        stacklevel=2,
    )


def _answers_without_token(gcs_address: str) -> bool:
    """Whether the GCS at ``gcs_address`` answers a call that carries no token."""
    return _unauthenticated_call(gcs_address) == ANSWERED


# How a GCS answers a call that carries no token: it answers (token auth off), refuses it (on), or neither.
ANSWERED, REFUSED, UNKNOWN = "answered", "refused", "unknown"


def _unauthenticated_call(gcs_address: str) -> str:
    """How the GCS at ``gcs_address`` answers a call with no token (Ray's internal gRPC API: any other
    answer or shape, or no answer, is UNKNOWN)."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return UNKNOWN
    try:
        with grpc.insecure_channel(gcs_address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=_PROBE_TIMEOUT_S)
        return ANSWERED
    except grpc.RpcError as err:
        return REFUSED if err.code() == grpc.StatusCode.UNAUTHENTICATED else UNKNOWN
    except Exception:  # noqa: BLE001 - another Ray's API, an address gRPC does not take
        return UNKNOWN


class RayRuntime:
    """Starts or joins Ray once; stops it again only if it started it.

    ``starter(call)`` runs the ``ray.init`` call: Ray's processes die with the thread that
    started them, so a caller whose code runs on short-lived threads hands the call to a
    long-lived one (``sql_magics`` does).
    """

    def __init__(
        self, address: str | None = None, *, starter: Callable[[Callable[[], Any]], Any] | None = None, **init_options: Any
    ) -> None:
        self.address = address  # None: RAY_ADDRESS, else a local Ray
        self.starter = starter or (lambda call: call())
        self._init_options = init_options  # extra ray.init arguments (num_cpus=..., num_gpus=...)
        self._started_here = False
        self._starting = threading.Lock()  # one start at a time: ahead of need, and the first statement that needs Ray
        self._stopped = threading.Event()  # lets the thread that started Ray ahead end
        self._ahead = False  # Ray was started ahead of need ...
        self._used = False  # ... and a statement has used it since (ensure, join)
        self._ahead_work: tuple[Callable[[], Any] | None, Callable[[], Any] | None] = (None, None)  # start_ahead's then, leaving

    def ensure(self) -> None:
        """Make sure Ray is up (idempotent; waits for a start ahead of need that is under way)."""
        import ray

        self._used = True
        if not ray.is_initialized():
            with self._starting:
                self.starter(self._init)

    def start_ahead(self, then: Callable[[], Any] | None = None, leaving: Callable[[], Any] | None = None) -> None:
        """Start Ray now, in the background, and run ``then`` once it is up (warm spares, say).

        The start runs on a thread of its own that lives until :meth:`shutdown`: Ray's processes
        die with the thread that started them. A statement that needs Ray meanwhile waits for it
        (:meth:`ensure`); one that does not runs at once. A failure here is only logged: the
        statement that next needs Ray starts it again and says what is wrong. If a statement then
        names another Ray before any has used this one (:meth:`retarget`, :meth:`join`),
        ``leaving()`` stops what ``then`` made, and the start moves there.
        """

        def start(stopped: threading.Event) -> None:
            import ray

            try:
                with self._starting:
                    up = ray.is_initialized()  # by the caller: then not this runtime's to leave
                    self._init()
                    self._ahead = not up
                if then is not None:
                    then()
            except Exception:  # noqa: BLE001 - ahead of need: nobody waits for this, ensure() reports it
                _log.info("starting Ray ahead of need failed", exc_info=True)
            stopped.wait()

        self._ahead_work = (then, leaving)
        self._stopped = stopped = threading.Event()  # this start's own: a later start must not wake it
        threading.Thread(target=start, args=(stopped,), name="rayudf-ray-ahead", daemon=True).start()

    def retarget(self, address: str) -> None:
        """Use the Ray at ``address`` from now on (``set ray.address``), moving a start ahead of need there."""
        if not self._move_ahead(address):
            self.address = address

    def _move_ahead(self, address: str) -> bool:
        """Whether a Ray started ahead of need elsewhere than ``address``, which no statement has used,
        was left for a start ahead at ``address``."""
        import ray

        with self._starting:  # a start ahead of need that is under way ends first
            moved = (
                self._ahead and not self._used and ray.is_initialized()
                and address not in (self.address, ray.get_runtime_context().gcs_address)
            )
            if moved:
                then, leaving = self._ahead_work
                if leaving is not None:
                    leaving()
                self._leave(disconnect=True)
                self.address = address
        if moved:
            self.start_ahead(then, leaving)
        return moved

    def _init(self) -> None:
        import ray

        if ray.is_initialized():
            return
        _log_raylet_notices()
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            join(address, **{**_QUIET, **self._init_options})
            return
        init_local(**{**_QUIET, **self._init_options})
        self._started_here = True

    def join(self, address: str | None) -> None:
        """Make sure Ray is up, on the cluster at ``address`` when one is named (None: any).

        Joins ``address`` if Ray is not up yet; if it is up on another cluster, raises
        ConfigError naming both (one process holds one Ray connection).
        """
        import ray

        if address is not None:
            self._move_ahead(address)
        if address is not None and not ray.is_initialized():
            previous, self.address = self.address, address
            try:
                self.ensure()
            except BaseException:
                self.address = previous  # a wrong address must not stick to the session
                raise
            return
        self.ensure()
        if address is None:
            return
        current = ray.get_runtime_context().gcs_address
        if address not in (current, self.address):
            raise ConfigError(
                f"Ray address {address!r}: this session already runs on the Ray at {current}; "
                "one session holds one Ray connection, so pass None to use it, or set ray.address in a new session"
            )

    def shutdown(self) -> None:
        """Stop the local Ray if this runtime started it."""
        with self._starting:  # a start ahead of need that is under way ends first
            self._leave(disconnect=False)

    def _leave(self, *, disconnect: bool) -> None:
        """Stop the local Ray if this runtime started it, else only leave it if ``disconnect`` (lock held)."""
        import ray

        if (self._started_here or disconnect) and ray.is_initialized():
            ray.shutdown()
        self._started_here = self._ahead = self._used = False
        self._stopped.set()
