"""UDFMaster: the control-plane actor of one UDF.

It starts the UDFWorkers, waits until each has loaded the model, replaces dead
ones (when told by a dispatcher, and on its own watch), reports statistics and
shuts them down. Batches never pass through it.

The master may die (its node lost, its process killed). Ray then restarts it
(``max_restarts``); its workers, which are its children, die with it. A dispatcher
that loses workers asks the master for replacements, and Ray holds those calls until
the master is back, so a running query only waits; the restarted master then starts
all its workers again. The model reaches the master with each call that may start
workers (``start``, ``replace``), never through its constructor: Ray could not
restart a master whose constructor arguments had left the object store.

A worker counts as dead only when Ray says so (an actor error on a call): a worker
that is busy with a long batch still answers ``stats``, which runs in its own
concurrency group, and one that does not answer in time is not replaced.

Example:
    >>> master = ray.remote(UDFMaster).options(name="rayudf.ab12.digits.r1.master", max_restarts=-1).remote(
    ...     "digits", "rayudf.ab12.digits.r1", init, apply, UDFConf())          # doctest: +SKIP
    >>> info = ray.get(master.start.remote(model_refs))  # {"input_width": 64, "load_s": ...} # doctest: +SKIP
    >>> workers = ray.get(master.workers.remote())  # [(worker_id, handle), ...]         # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from udf_engine.actors.warm_pool import WorkerKind, find_pool, worker_actor
from udf_engine.actors.worker import CONTROL_TIMEOUT_S
from udf_engine.errors import ModelError, WorkerError, remote_cause
from udf_engine.ray_runtime import NAMESPACE
from udf_engine.settings import UDFConf

# How often the master looks at its workers on its own; dispatchers report deaths sooner.
WATCH_INTERVAL_S = 2.0
_RESTARTED = "the master restarted; its workers start again with the next query"


@dataclass
class _Slot:
    """One worker position; a replacement keeps the slot and gets a new worker id."""

    index: int
    worker_id: str
    handle: Any
    ready: Any = None  # what the worker answers once it has loaded the model (ready(), or a spare's load())
    replaced: int = 0  # how many times this slot's worker has been replaced
    lent: bool = False  # a spare of the warm pool, given back to it at shutdown
    last_error: str = ""  # why the last replacement of this slot's worker failed ("" if none did)


def slot_index(worker_id: str) -> int:
    """The slot a worker id names: ``<prefix>.w<slot>.<token>``.

    Example:
        >>> slot_index("rayudf.ab12.digits.r1.w3.9f2c01")
        3
    """
    return int(worker_id.rsplit(".", 2)[1][1:])


class UDFMaster:
    """Owns the workers of one UDF (an async Ray actor)."""

    def __init__(
        self,
        function: str,
        actor_prefix: str,
        init_func: Callable,
        apply_func: Callable,
        conf: UDFConf,
        imports: Sequence[str] = (),
        pool: str = "",
    ) -> None:
        self._function = function  # the SQL name, for messages
        self._prefix = actor_prefix  # worker actors are named f"{prefix}.w{slot}.{token}"
        self._init_func = init_func
        self._apply_func = apply_func
        self._model_refs: list = []  # the model, as the last start() or replace() handed it over
        self._conf = conf
        self._slots: list[_Slot] = []  # empty until start(), or after a restart until a replace()
        self._info: dict = {}  # what the first worker said of the model (input width, ...)
        self._lock = asyncio.Lock()  # one start or replace at a time
        self._life = secrets.token_hex(4)  # a new one each time Ray restarts this master: see life()
        self._watch: asyncio.Task | None = None
        self._kind = WorkerKind.of(conf, tuple(imports))
        # the session's warm pool (udf_engine.actors.warm_pool), for a kind of worker worth keeping warm
        self._pool = find_pool(pool) if pool and self._kind.kept_warm else None
        if self._pool is not None:
            self._pool.release.remote(self._prefix)  # spares lent to a previous life of this master

    async def _new_worker(self, index: int) -> _Slot:
        """A worker loading the model: a warm spare if the pool has one, else a new process."""
        worker_id = f"{self._prefix}.w{index}.{secrets.token_hex(3)}"
        args = (worker_id, self._init_func, self._apply_func, self._model_refs, self._conf)
        spare = None
        if self._pool is not None:
            try:
                spare = await self._pool.take.remote(self._kind, self._prefix, self._conf.workers)
            except ray.exceptions.RayError:  # the pool is gone (the session closing): a new process then
                self._pool = None
        if spare is not None:
            return _Slot(index, worker_id, spare, spare.load.remote(*args), lent=True)
        handle = worker_actor(self._kind, name=worker_id, namespace=NAMESPACE).remote(*args)
        return _Slot(index, worker_id, handle, handle.ready.remote())

    async def _await_ready(self, slots: list[_Slot]) -> None:
        """Wait for every worker to load the model; on any failure kill them all and raise."""
        waits = [asyncio.ensure_future(asyncio.wait_for(s.ready, self._conf.startup_timeout_s)) for s in slots]
        try:
            infos = await asyncio.gather(*waits)
        except BaseException as err:  # noqa: BLE001 - whatever failed, no half-started worker may stay
            for w in waits:
                w.cancel()
            for s in slots:
                ray.kill(s.handle)
            cause = remote_cause(err)
            if isinstance(cause, TimeoutError):
                raise WorkerError(
                    f"function {self._function}: workers not ready after {self._conf.startup_timeout_s:.0f} s "
                    f"(asked for num_cpus={self._conf.num_cpus}, num_gpus={self._conf.num_gpus} each; "
                    f"free now: {ray.available_resources()})"
                ) from None
            if isinstance(cause, ModelError):
                raise ModelError(f"function {self._function}: {cause}") from None
            raise ModelError(f"function {self._function}: model failed to load: {cause}") from None
        if not self._info:
            self._info = dict(infos[0])

    async def start(self, model_refs: Sequence[Any]) -> dict:
        """Start ``conf.workers`` workers on the model; return its info once all have loaded it."""
        async with self._lock:
            self._model_refs = list(model_refs)
            await self._start_workers()
        return self._info

    async def _start_workers(self) -> None:
        """Start the workers if there are none (called holding the lock)."""
        if self._slots:
            return
        slots = [await self._new_worker(i) for i in range(self._conf.workers)]
        await self._await_ready(slots)
        self._slots = slots
        if self._pool is not None:  # the next function of this kind starts on spares
            try:  # awaited (the spares are placed, not yet imported): a registration that follows sees them
                await self._pool.refill.remote(self._kind, self._conf.workers)
            except ray.exceptions.RayError:  # the pool is gone (the session closing): no spares, no harm
                self._pool = None
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_loop())

    async def life(self) -> str:
        """A token of this life of the master: a caller that sees it change knows the master restarted,
        and that its workers died with it (no batch's fault)."""
        return self._life

    def workers(self) -> list[tuple[str, Any]]:
        """The live workers as (worker_id, handle) pairs (none after a restart until a replace())."""
        return [(s.worker_id, s.handle) for s in self._slots]

    async def replace(self, worker_id: str, model_refs: Sequence[Any]) -> tuple[str, Any]:
        """Replace a dead worker; idempotent (a second report returns the same replacement).

        After a restart, every worker starts again here; a worker id from before it names
        its slot, whose new worker is returned.
        """
        async with self._lock:
            self._model_refs = list(model_refs)
            await self._start_workers()
            slot = self._slots[slot_index(worker_id)]
            if slot.worker_id != worker_id or await self._is_alive(slot):
                return slot.worker_id, slot.handle
            try:
                return await self._respawn(slot)
            except Exception as err:
                slot.last_error = f"{type(remote_cause(err)).__name__}: {remote_cause(err)}"  # shown by !workers
                raise

    async def _respawn(self, slot: _Slot) -> tuple[str, Any]:
        ray.kill(slot.handle)
        fresh = await self._new_worker(slot.index)
        await self._await_ready([fresh])
        fresh.replaced = slot.replaced + 1
        self._slots[slot.index] = fresh
        return fresh.worker_id, fresh.handle

    @staticmethod
    async def _is_alive(slot: _Slot) -> bool:
        """False only when Ray says the worker is dead; one too slow to answer counts as alive."""
        try:
            await asyncio.wait_for(slot.handle.stats.remote(), CONTROL_TIMEOUT_S)
        except (TimeoutError, ray.exceptions.ActorUnavailableError):  # slow or unreachable for now: not dead
            return True
        except ray.exceptions.RayActorError:
            return False
        return True

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for slot in list(self._slots):
                if not await self._is_alive(slot):
                    try:
                        await self.replace(slot.worker_id, self._model_refs)
                    except Exception:  # noqa: BLE001 - replace() recorded it for !workers; the next round tries again
                        continue

    async def stats(self) -> list[dict]:
        """One row per worker slot: counters, node, GPU ids, replacements, alive, busy."""
        if not self._slots:  # restarted: the workers start with the next replace()
            return [self._row(i, None, alive=False, last_error=_RESTARTED) for i in range(self._conf.workers)]
        rows = []
        for slot in self._slots:
            row = self._row(slot.index, slot.worker_id, replaced=slot.replaced, last_error=slot.last_error)
            try:
                row.update(await asyncio.wait_for(slot.handle.stats.remote(), CONTROL_TIMEOUT_S))
            except (TimeoutError, ray.exceptions.ActorUnavailableError):
                row["last_error"] = row["last_error"] or f"did not answer within {CONTROL_TIMEOUT_S:g} s"
            except ray.exceptions.RayActorError:
                row["alive"] = False
            rows.append(row)
        return rows

    def _row(self, index: int, worker_id: str | None, **known: Any) -> dict:
        """A stats row with every field, before the worker's own counters fill it in."""
        row = {"function": self._function, "slot": index, "worker": worker_id, "replaced": 0, "alive": True, "last_error": ""}
        row.update(
            node=None, pid=None, gpu_ids=[], threads=None, batches=0, scans=0, rows=0, busy_s=0.0, errors=0, batch_running_s=None,
            most_held=0, bounced=0, device=None, truncated=0, tokens=0, padded_tokens=0,
        )
        row.update(known)
        return row

    async def shutdown(self) -> None:
        """Stop watching; give the workers the warm pool lent back to it (spares again), kill the others."""
        if self._watch is not None:
            self._watch.cancel()
        giving_back = False
        if self._pool is not None and any(s.lent for s in self._slots):
            try:
                await self._pool.give_back.remote(self._prefix, self._conf.workers)
                giving_back = True
            except ray.exceptions.RayError:  # the pool is gone, and its spares with it
                pass
        for slot in self._slots:
            if not (slot.lent and giving_back):
                ray.kill(slot.handle)
        self._slots = []
        if self._pool is not None and not giving_back:
            self._pool.release.remote(self._prefix)
