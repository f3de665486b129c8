"""UDFBuilder builds (or replaces) one UDF's master and workers; RemoteUDF is what it returns.

Example:
    >>> ctx = RayContext("digits", {"workers": 2}, model_refs=put_model(rows))    # doctest: +SKIP
    >>> udf = UDFBuilder.build(ctx, UDFBuildInFunc.init_tf, UDFBuildInFunc.predict)  # doctest: +SKIP
    >>> udf.score(np.zeros((3, 64)))[0].shape                                       # doctest: +SKIP
    (3, 10)
    >>> udf.shutdown()                                                               # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray

from udf_engine.actors.batching import cut
from udf_engine.actors.dispatcher import Dispatcher
from udf_engine.actors.failures import user_error
from udf_engine.actors.master import UDFMaster
from udf_engine.actors.warm_pool import WorkerKind, find_pool
from udf_engine.errors import RayUDFError, ResourceError, WorkerError, remote_cause
from udf_engine.models.loaders import WARM_IMPORTS, RowWiseApply
from udf_engine.ray_runtime import NAMESPACE, RayRuntime, cluster_can_grow
from udf_engine.resources import WorkerResources, shortage
from udf_engine.settings import UDFConf

# How long a master gets to kill its workers itself before it is killed: killing actors
# is a few calls to the GCS, so 10 s only runs out for a master that is stuck or gone.
SHUTDOWN_TIMEOUT_S = 10.0
# How long a replaced master's name may stay taken after the kill: Ray frees it once
# the GCS has seen the actor die, normally within a second, so we look every 50 ms.
NAME_RELEASE_TIMEOUT_S = 30.0
NAME_POLL_S = 0.05
# How long a registration waits for the resources a replaced UDF's workers release (a
# killed actor's resources return within a second or two); it looks every 100 ms, a
# small cost next to starting a worker.
RESOURCES_GRACE_S = 5.0
RESOURCES_POLL_S = 0.1
# File sets a UDF remembers its workers could read (can_read), before it forgets them all.
_READABLE_KEPT = 256
_log = logging.getLogger(__name__)


class BuildContext(Protocol):
    """What ``UDFBuilder.build`` reads of its context, MLSQL's ``ray_context`` (``udf_engine.RayContext``),
    and the ``udf`` it leaves there."""

    function: str  # the SQL name
    conf: dict  # the registration's options, as MLSQL code reads them
    settings: UDFConf | None  # the same typed, when the registration was read (None: typed here)
    model_refs: list  # the model's rows in the object store
    actor_prefix: str  # the master is named f"{actor_prefix}.master", its workers f"{actor_prefix}.w<slot>.<token>"
    runtime: RayRuntime | None  # the Ray to start first, if any
    warm_pool: str  # the name of the session's warm pool actor, "" for none
    row_wise: bool  # apply_func is written for one row (MLSQL): build() wraps it
    udf: Any  # the RemoteUDF build() made


def put_model(rows: Sequence[dict]) -> list[ray.ObjectRef]:
    """Put a model table's rows into the object store, one ref per row."""
    return [ray.put(row) for row in rows]


def _master_name(ray_context: BuildContext) -> str:
    return f"{ray_context.actor_prefix}.master"


def _stop_master(master: Any) -> None:
    """Let a master kill its workers, then kill it; a master already gone is fine."""
    try:
        ray.get(master.shutdown.remote(), timeout=SHUTDOWN_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError):
        pass  # dead or stuck already: killing it kills its workers too, as they are its children
    ray.kill(master)


def _stop_existing(name: str) -> None:
    """Shut down a master of the same name and wait until its name is free."""
    try:
        old = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return
    _stop_master(old)
    deadline = time.monotonic() + NAME_RELEASE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(NAME_POLL_S)
    raise WorkerError(f"the old UDF master {name} did not stop within {NAME_RELEASE_TIMEOUT_S:.0f} s")


def _shortage(settings: UDFConf, spares: int = 0) -> str:
    """What the workers ask and what is free, e.g. "asked CPU=0.5, free CPU=0" ("" when it fits);
    ``spares`` of them start on warm spares, whose resources are reserved already."""
    return shortage(WorkerResources.of(settings).needs(max(0, settings.workers - spares)))


def _wait_for_resources(function: str, settings: UDFConf, spares: int = 0) -> bool:
    """Return once the workers fit the free resources (True: they do not, but the cluster can grow).

    On a cluster that cannot grow, fail at once, naming what is asked and what is free:
    a registration waiting for resources nobody is going to free looks like a hang. The
    grace period lets a replaced UDF's workers release theirs. On a cluster with an
    autoscaler, the workers are started anyway: their demand is what makes it add nodes.
    """
    if not _shortage(settings, spares):
        return False
    if cluster_can_grow():
        return True
    deadline = time.monotonic() + RESOURCES_GRACE_S
    while missing := _shortage(settings, spares):
        if time.monotonic() > deadline:
            raise ResourceError(
                f"function {function}: not enough free Ray resources for {settings.workers} worker(s): {missing}; "
                "unregister other functions or lower workers/num_cpus/num_gpus"
            )
        time.sleep(RESOURCES_POLL_S)
    return False


def _make_room(pool_name: str, settings: UDFConf, imports: tuple[str, ...]) -> int:
    """How many warm spares of the workers' kind wait in the session's pool (none without ``imports``:
    spares are kept for frameworks only); spares of other kinds are stopped when the workers do not
    fit beside them."""
    pool = find_pool(pool_name) if pool_name else None
    if pool is None:
        return 0
    kind = WorkerKind.of(settings, imports)
    waiting = ray.get(pool.waiting.remote(kind)) if kind.kept_warm else 0
    if _shortage(settings, waiting):
        ray.get(pool.drop.remote(keep=kind))
    return waiting


def _await_start(function: str, start: ray.ObjectRef, settings: UDFConf, growing: bool) -> dict:
    """The master's start() result; if the cluster must grow for the workers, say so first."""
    if growing and (missing := _shortage(settings)):
        _log.warning(
            "register %s: waiting for the cluster to grow (%s), up to startup_timeout_s=%g s",
            function, missing, settings.startup_timeout_s,
        )
    return ray.get(start)


@dataclass
class RemoteUDF:
    """A built UDF: its master (control plane) and a dispatcher (data plane).

    :meth:`score` is the one way rows reach the workers from a caller: the session's SQL calls and a
    Serve replica's requests (:meth:`attach`) alike. Worker scans read and score on the workers (:meth:`scan`).
    """

    function: str
    master: Any
    dispatcher: Dispatcher
    conf: UDFConf
    info: dict  # what the workers reported when the model loaded (input_width, load_s)
    model_refs: list = field(default_factory=list)  # the model's rows in the object store (a master restarting needs them)
    readable: set = field(default_factory=set)  # (worker ids, files) every one of those workers could read (can_read)

    @classmethod
    def attach(cls, function: str, master: Any, settings: UDFConf, model_refs: Sequence[Any], info: dict | None = None) -> RemoteUDF:
        """The UDF a process that did not build it (a Serve replica) scores with: its own dispatcher over the
        master's workers, each of which holds at most MAX_IN_FLIGHT_PER_WORKER batches whoever sends them."""
        workers, life = ray.get([master.workers.remote(), master.life.remote()])
        dispatcher = Dispatcher(master, workers, settings, model_refs=model_refs, function=function, master_life=life)
        return cls(function, master, dispatcher, settings, dict(info or {}), list(model_refs))

    def score(self, matrix: Any) -> list[Any]:
        """Score a feature matrix (rows of model input) on the workers, in ``batch_size`` pieces:
        each piece's output, in order (a :class:`~udf_engine.actors.failures.Partial` where the
        model failed on some rows under on_error="null")."""
        return self.dispatcher.map(cut(matrix, self.conf.batch_size))

    async def score_async(self, matrix: Any) -> list[Any]:
        """:meth:`score`, for an event loop: a matrix of one piece is sent from the loop (``Dispatcher.map_one``)."""
        batches = cut(matrix, self.conf.batch_size)
        if len(batches) == 1:
            return [await self.dispatcher.map_one(batches[0])]
        return await asyncio.to_thread(self.dispatcher.map, batches)

    def stream(self, prompt: Any, params: Any = None) -> AsyncIterator[dict]:
        """A generation model's answer to one prompt as it is generated (an async iterator of
        ``{"text": piece}`` events, then ``{"finish_reason", "prompt_tokens", "completion_tokens"}``)."""
        return self.dispatcher.stream(prompt, params)

    def scan(self, tasks: Sequence[Any]) -> Iterator[Any]:
        """Run tasks that read and score their own rows on the workers (``worker.scan``); results in task order."""
        return self.dispatcher.scan(tasks)

    def can_read(self, files: Sequence[tuple[str, int]]) -> bool:
        """Whether the workers that answer (at least one) see each (path, size) as a file of that size;
        asked once per set of workers and files while every worker says yes."""
        key = (frozenset(w for w, _ in self.dispatcher.workers()), tuple(files))
        if key in self.readable:
            return True
        answers = self.dispatcher.ask_all("can_read", list(files))
        if len(answers) == len(key[0]) and all(answers):
            if len(self.readable) >= _READABLE_KEPT:
                self.readable.clear()
            self.readable.add(key)
        return bool(answers) and all(answers)

    def probe(self, batch: Any) -> Any:
        """Score one sample batch on a worker without counting it in the statistics."""
        _, handle = self.dispatcher.workers()[0]
        try:
            return ray.get(handle.probe.remote(batch))
        except ray.exceptions.RayTaskError as err:
            raise user_error(err, self.function) from None

    def stats(self) -> list[dict]:
        """Per-worker statistics from the master."""
        return ray.get(self.master.stats.remote())

    def worker_handles(self) -> list[Any]:
        """The live worker actor handles."""
        return [h for _, h in self.dispatcher.workers()]

    def shutdown(self) -> None:
        """Kill the workers and the master."""
        _stop_master(self.master)


class UDFBuilder:
    """Creates or replaces the named UDFMaster of one UDF (MLSQL's ``UDFBuilder``)."""

    @staticmethod
    def build(
        ray_context: BuildContext,
        init_func: Callable[[Sequence[Any], dict], Any],
        apply_func: Callable[[Any, Any], Any],
        conf: dict | None = None,
    ) -> RemoteUDF:
        """Start the workers (each runs ``init_func`` once) and return the ready UDF.

        The settings are ``ray_context.settings`` (typed when the registration was read), else
        ``ray_context.conf`` overlaid with ``conf`` (MLSQL code's own call). Fails with
        ModelError/WorkerError, leaving no actor behind, if any worker cannot load the model.
        """
        if ray_context.runtime is not None:
            ray_context.runtime.ensure()
        settings = ray_context.settings
        if settings is None or conf:
            settings = UDFConf.from_options({**ray_context.conf, **(conf or {})})
        if ray_context.row_wise and not isinstance(apply_func, RowWiseApply):
            apply_func = RowWiseApply(apply_func)
        name = _master_name(ray_context)
        _stop_existing(name)
        imports = WARM_IMPORTS.get(init_func, ())
        spares = _make_room(ray_context.warm_pool, settings, imports)
        growing = _wait_for_resources(ray_context.function, settings, spares)
        master = (
            ray.remote(UDFMaster)
            # Ray restarts a master that dies, and holds calls to it (a dispatcher asking
            # for a replacement) until it is back: see udf_engine.actors.master.
            .options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=-1, max_task_retries=-1)
            .remote(ray_context.function, ray_context.actor_prefix, init_func, apply_func, settings, imports, ray_context.warm_pool)
        )
        try:
            info = _await_start(ray_context.function, master.start.remote(ray_context.model_refs), settings, growing)
            workers, life = ray.get([master.workers.remote(), master.life.remote()])
        except ray.exceptions.RayTaskError as err:
            ray.kill(master)
            cause = remote_cause(err)
            if isinstance(cause, RayUDFError):
                raise type(cause)(str(cause)) from None
            raise WorkerError(f"function {ray_context.function}: could not start its workers: {cause}") from None
        except BaseException:  # interrupted (Ctrl-C while waiting): no master may outlive the registration
            ray.kill(master)
            raise
        dispatcher = Dispatcher(
            master, workers, settings, model_refs=ray_context.model_refs, function=ray_context.function, master_life=life
        )
        udf = RemoteUDF(ray_context.function, master, dispatcher, settings, info, list(ray_context.model_refs))
        ray_context.udf = udf
        return udf

    @staticmethod
    def apply(ray_context: BuildContext) -> RemoteUDF:
        """MLSQL's predictCode hook: the UDF built in this context."""
        if ray_context.udf is None:
            raise WorkerError(f"function {ray_context.function}: UDFBuilder.build was not called")
        return ray_context.udf
