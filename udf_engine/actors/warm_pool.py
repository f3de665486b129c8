"""Warm pools: worker processes started ahead of need, with the model's framework imported,
so a registration only ships and loads its model.

Starting a worker costs a process (~1 s) and, for TensorFlow, ~3-4 s of imports; loading a
small model costs well under a second. One pool per session (an actor, owned by the
session's process) keeps spares per :class:`WorkerKind` (framework, CPUs, GPUs, resources,
environment): after a function's workers are ready, its master asks for as many spares of
their kind as it has workers, and the next function of that kind takes them. Spares reserve
the resources a worker of their kind reserves (no kind that asks for GPUs is kept warm); a
registration that finds too few free resources has the spares stopped first. Spares unused
for ``IDLE_S`` are stopped (an idle TensorFlow process holds ~700 MB, ~310 MB of it private).

A spare lent to a master is owned by the pool, not by the master: a master that restarts
asks the pool to stop what it lent to its previous life (:meth:`WarmPool.release`), so
workers still never outlive their function or the session. A master that shuts down (its
function unregistered or replaced) gives them back instead (:meth:`WarmPool.give_back`): with
their model dropped they are spares again, for a function of the same size (TensorFlow keeps
the math threads it started with, and those follow from the number of workers).

Example:
    >>> kind = WorkerKind(("keras",), WorkerResources(num_cpus=0.25))
    >>> pool = ray.remote(WarmPool).options(num_cpus=0).remote()       # doctest: +SKIP
    >>> pool.refill.remote(kind, 2)                                      # doctest: +SKIP
    >>> ray.get(pool.take.remote(kind, "rayudf.ab12.digit.r2"))          # doctest: +SKIP
    Actor(UDFWorker, ...)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from udf_engine.actors.worker import CONCURRENCY_GROUPS, CONTROL_TIMEOUT_S, UDFWorker
from udf_engine.ray_runtime import NAMESPACE
from udf_engine.resources import WorkerResources, fits

# Spares unused this long are stopped. Ten minutes spans a pause to look at results and
# register the next model, and no more of an idle machine's memory.
IDLE_S = 600.0
# How often the pool looks for spares idle too long.
_REAP_INTERVAL_S = 30.0


@dataclass(frozen=True)
class WorkerKind:
    """What makes two workers interchangeable before they load a model."""

    imports: tuple[str, ...]  # the framework a spare imports while it waits
    resources: WorkerResources = WorkerResources()  # what it reserves, and its environment

    @property
    def kept_warm(self) -> bool:
        """Whether spares of this kind are kept: for a framework worth importing ahead, and never
        holding a GPU (scarce: an idle spare would keep it from other work for IDLE_S)."""
        return bool(self.imports) and not self.resources.num_gpus

    @classmethod
    def of(cls, conf: Any, imports: tuple[str, ...]) -> WorkerKind:
        """The kind of a UDF's workers (``conf``: its UDFConf) that import ``imports`` while they wait."""
        return cls(tuple(imports), WorkerResources.of(conf))


def worker_actor(kind: WorkerKind, **extra: Any) -> Any:
    """The UDFWorker actor class with a kind's options (plus ``extra``: a name, for one)."""
    return ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(UDFWorker).options(**kind.resources.actor_options(), **extra)


@dataclass
class _Spare:
    handle: Any
    since: float = field(default_factory=time.monotonic)
    workers: int | None = None  # given back: the number of workers of the function it served; None: never loaded


@dataclass
class _Lent:
    kind: WorkerKind
    handle: Any


class WarmPool:
    """The spares of one session, and the spares it lent to each function's master."""

    def __init__(self) -> None:
        self._spares: dict[WorkerKind, list[_Spare]] = {}  # waiting, oldest first
        self._lent: dict[str, list[_Lent]] = {}  # by the actor prefix of the master that took them
        self._lock = threading.Lock()
        threading.Thread(target=self._reap_forever, name="rayudf-pool-reaper", daemon=True).start()

    def take(self, kind: WorkerKind, owner: str, workers: int) -> Any | None:
        """A spare of ``kind`` for the master of actor prefix ``owner`` (its function has ``workers``), or None."""
        with self._lock:
            spares = [s for s in self._spares.get(kind, []) if s.workers in (None, workers)]
            if not spares:
                return None
            spare = spares[-1]  # the newest: the oldest are the first to go idle
            self._spares[kind].remove(spare)
            self._lent.setdefault(owner, []).append(_Lent(kind, spare.handle))
            return spare.handle

    def refill(self, kind: WorkerKind, count: int) -> int:
        """Start spares until ``count`` of ``kind`` wait, as far as free resources allow; returns how many wait."""
        with self._lock:
            spares = self._spares.setdefault(kind, [])
            while len(spares) < count and fits(kind.resources.needs(1)):
                spares.append(_Spare(worker_actor(kind).remote(imports=kind.imports)))
                time.sleep(0.05)  # let Ray account for the new actor's resources before looking again
            return len(spares)

    def release(self, owner: str) -> None:
        """Stop what was lent to the master of actor prefix ``owner`` (it restarted, or stopped)."""
        with self._lock:
            lent = self._lent.pop(owner, [])
        for each in lent:
            ray.kill(each.handle)

    def give_back(self, owner: str, workers: int) -> None:
        """Take back what was lent to the master of actor prefix ``owner`` (its function, of ``workers``
        workers, is gone): each worker that drops its model in time waits as a spare again; in the
        background, so a registration asking meanwhile is not held up."""
        with self._lock:
            lent = self._lent.pop(owner, [])
        if lent:
            threading.Thread(target=self._take_back, args=(lent, workers), name="rayudf-pool-give-back", daemon=True).start()

    def _take_back(self, lent: list[_Lent], workers: int) -> None:
        for each in lent:
            try:
                ray.get(each.handle.unload.remote(), timeout=CONTROL_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):  # dead, or stuck in a batch: not worth keeping
                ray.kill(each.handle)
                continue
            with self._lock:
                self._spares.setdefault(each.kind, []).append(_Spare(each.handle, workers=workers))

    def waiting(self, kind: WorkerKind) -> int:
        """How many spares of ``kind`` wait."""
        with self._lock:
            return len(self._spares.get(kind, []))

    def drop(self, keep: WorkerKind | None = None) -> int:
        """Stop every spare not of kind ``keep`` (a registration needs their resources); returns how many stopped."""
        with self._lock:
            spares = [s for kind, waiting in self._spares.items() if kind != keep for s in waiting]
            self._spares = {kind: waiting for kind, waiting in self._spares.items() if kind == keep}
        for spare in spares:
            ray.kill(spare.handle)
        return len(spares)

    def spares(self) -> list[Any]:
        """The waiting spares' handles."""
        with self._lock:
            return [s.handle for kind in self._spares.values() for s in kind]

    def _reap_forever(self) -> None:
        while True:
            time.sleep(_REAP_INTERVAL_S)
            now = time.monotonic()
            with self._lock:
                idle = [s for kind in self._spares.values() for s in kind if now - s.since > IDLE_S]
                for kind, spares in self._spares.items():
                    self._spares[kind] = [s for s in spares if now - s.since <= IDLE_S]
            for spare in idle:
                ray.kill(spare.handle)


def start_pool(name: str) -> Any:
    """The warm pool named ``name``, started if it is not running (owned by this process)."""
    return (
        ray.remote(WarmPool)
        .options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=-1, get_if_exists=True)
        .remote()
    )


def find_pool(name: str) -> Any | None:
    """The warm pool named ``name``, or None when it is not running."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def stop_pool(name: str) -> None:
    """Stop the warm pool named ``name`` and its spares (what it lent is stopped by the masters)."""
    pool = find_pool(name) if ray.is_initialized() else None
    if pool is not None:
        try:
            ray.get(pool.drop.remote(), timeout=_REAP_INTERVAL_S)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # gone or stuck: killing it takes its spares along, as they are its children
        ray.kill(pool)
