"""The data plane: spreads batches over a UDF's workers from the caller's side.

Many threads (DuckDB calls a function from several at once) share one
Dispatcher. Each ``map`` call sends its batches to the least-loaded workers,
never more than ``max_in_flight`` per worker, retries a batch whose worker died
on another worker (while the master replaces the dead one) and returns the
results in input order. The master is only contacted when a worker dies. Other
processes' dispatchers (Serve replicas) send to the same workers: a worker that
holds its bound of batches answers BUSY, and the batch goes to another worker, or
to the same one a moment later.

What the model raises is never retried as a worker death. ``on_error="raise"``
fails the call naming the first row the model fails on (found by splitting the
batch); ``on_error="null"`` splits the batch until the failing rows stand alone
and returns a :class:`Partial` result with None for them.

Example:
    >>> d = Dispatcher(master, ray.get(master.workers.remote()), UDFConf(), model_refs=refs, function="digits")  # doctest: +SKIP
    >>> [r.shape for r in d.map([np.zeros((4, 64)), np.zeros((2, 64))])]              # doctest: +SKIP
    [(4, 10), (2, 10)]
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import ray

from udf_engine.actors.batching import BUSY, MAX_IN_FLIGHT_PER_WORKER
from udf_engine.actors.failures import Failed, resolve, user_error
from udf_engine.actors.worker import CONTROL_TIMEOUT_S
from udf_engine.errors import BatchTimeoutError, WorkerError, remote_cause
from udf_engine.settings import UDFConf

# How long a thread with nothing in flight sleeps before it checks again for a
# free worker or a finished replacement (it is also woken as soon as either happens).
_WAIT_TICK_S = 0.5
# How often a stream that found no live worker (all being replaced) looks again.
_STREAM_WAIT_S = 0.1
# How long a worker that answered BUSY (other callers' batches fill it) gets no batch from this
# dispatcher: about a small batch's time, so a freed worker is not left idle for long.
_BUSY_PAUSE_S = 0.01
# How long a worker Ray cannot reach (its node gone silent) gets no batches. It is not
# dead until Ray says so, which for a lost node takes the GCS's missed heartbeats (~15 s);
# meanwhile the other workers take its batches, and it is tried again after this pause.
_UNREACHABLE_PAUSE_S = 5.0
# How often one batch may find its worker unreachable before the query fails: ten pauses
# is nearly a minute of a node that neither answers nor is declared dead.
_MAX_UNREACHABLE = 10


class Dispatcher:
    """A thread-safe pool of worker handles with per-worker in-flight bounds."""

    def __init__(
        self,
        master: Any,
        workers: Sequence[tuple[str, Any]],
        settings: UDFConf,
        *,
        model_refs: Sequence[Any] = (),
        function: str = "",
        master_life: str = "",
        max_in_flight: int = MAX_IN_FLIGHT_PER_WORKER,
    ) -> None:
        self._master = master  # asked for a replacement when a worker dies
        self._master_life = master_life  # the master's life() when last asked: another means it restarted
        self._model_refs = list(model_refs)  # the model, handed to the master with each replacement (it may have restarted)
        self._function = function  # the SQL name, for messages
        self._max_retries = settings.max_retries  # times one batch may be resent after its worker died
        self._max_in_flight = max_in_flight  # bound on batches in flight per worker
        self._batch_timeout_s = settings.batch_timeout_s  # how long a worker may go without finishing a batch it holds
        self._on_error = settings.on_error  # "raise" or "null": what a model error on some rows does
        self._handles: dict[str, Any] = dict(workers)  # live workers by id; a dead one never returns
        self._in_flight: dict[str, int] = {w: 0 for w in self._handles}  # batches sent, not yet back
        self._sent: dict[str, int] = {w: 0 for w in self._handles}  # all batches ever sent (tie-break)
        self._progress: dict[str, float] = {}  # when each worker last finished a batch (for batch_timeout_s)
        self._paused: dict[str, float] = {}  # workers Ray could not reach, and until when they get no batches
        self._replacing: set[str] = set()  # dead workers whose replacement is starting
        self._dead: set[str] = set()  # every worker known dead: never back in the pool
        self._died_together: set[str] = set()  # workers that died with others (their master's death): no batch's fault
        self._replace_error: BaseException | None = None  # why the last replacement failed
        self._streams: dict[str, int] = {}  # generation streams open per worker
        self._cond = threading.Condition()

    # -- public verbs -------------------------------------------------------------

    def workers(self) -> list[tuple[str, Any]]:
        """The live workers as (worker_id, handle) pairs."""
        with self._cond:
            return list(self._handles.items())

    def map(self, batches: Sequence[Any]) -> list[Any]:
        """Score every batch on some worker; results come back in input order.

        A batch the model failed on gives a :class:`Partial` (``on_error="null"``) or
        raises a ModelError naming its first failing row and where it is in this call.
        """
        return resolve(batches, self._run(batches), self._run, self._on_error)

    async def map_one(self, batch: Any) -> Any:
        """``map([batch])[0]``, for an event loop (a Serve replica's coalesced call): sent and awaited from the
        loop, with no thread between (a thread's hand-off costs about half a Ray call's CPU again). A batch
        that finds every worker full, its worker busy, unreachable or dead, or the model failing on it goes
        on to :meth:`map`, on a thread, which waits, retries, splits and reports as for SQL; a batch past
        ``batch_timeout_s`` fails as there."""
        slot = self._acquire()
        if slot is None:
            return await self._mapped(batch)
        worker_id, handle = slot
        ref = handle.apply.remote(batch)
        pending = {ref: (0, worker_id, time.monotonic())}
        answer = asyncio.wrap_future(ref.future())
        try:
            while (limit := self._wait_s(pending)) is not None and not answer.done():  # (asyncio.wait costs a fifth of a call)
                done, _ = await asyncio.wait((answer,), timeout=limit)
                if not done:
                    await asyncio.to_thread(self._fail_hung, pending)  # raises (the worker stopped) once it is past its deadline
            outcome = await answer
        except ray.exceptions.ActorUnavailableError:
            self._pause(worker_id, _UNREACHABLE_PAUSE_S)
            return await self._mapped(batch)
        except ray.exceptions.RayActorError:
            self._release(worker_id)
            await asyncio.to_thread(self._worker_died, worker_id)  # out of the pool, and replaced, before map sends the batch again
            return await self._mapped(batch)
        except ray.exceptions.RayTaskError:  # the model's error: map finds the rows it fails on
            self._release(worker_id, finished=True)
            return await self._mapped(batch)
        except BaseException:
            self._release(worker_id)
            raise
        if outcome is BUSY:
            self._pause(worker_id, _BUSY_PAUSE_S)
            return await self._mapped(batch)
        self._release(worker_id, finished=True)
        return outcome

    async def _mapped(self, batch: Any) -> Any:
        return (await asyncio.to_thread(self.map, [batch]))[0]

    def scan(self, tasks: Sequence[Any]) -> Iterator[Any]:
        """Run each task on some worker (``worker.scan(task)``: it reads and scores its own rows);
        results are yielded in task order as they arrive. A task whose worker dies runs again
        on another, and its result is taken once: no task is lost or counted twice."""
        arrived: dict[int, Any] = {}
        following = 0
        for index, outcome in self._outcomes(tasks, "scan"):
            if isinstance(outcome, Failed):
                raise outcome.error
            arrived[index] = outcome
            while following in arrived:
                yield arrived.pop(following)
                following += 1

    async def stream(self, *args: Any) -> AsyncIterator[dict]:
        """A generation model's answer (``worker.stream(*args)``'s events: ``{"text": piece}``, then the
        usage), from the live worker with the fewest of this dispatcher's streams open. A worker that dies
        mid-answer is replaced by another, which generates the very same text (greedily, or sampled from the
        row's seed): only what was not yet given is given. What the model raises is a ModelError naming the function.
        """
        given, lost = "", 0
        while True:
            worker_id, handle = await self._stream_slot()
            text = ""
            try:
                async for ref in handle.stream.remote(*args):
                    event = await ref
                    if "text" not in event:
                        yield event
                        return
                    text += event["text"]
                    if len(text) > len(given):
                        yield {"text": text[len(given) :]}
                        given = text
            except ray.exceptions.ActorUnavailableError:
                self._pause(worker_id, _UNREACHABLE_PAUSE_S)
                lost += 1
            except ray.exceptions.RayActorError:
                await asyncio.to_thread(self._worker_died, worker_id)
                lost += 1
            except ray.exceptions.RayTaskError as err:
                raise user_error(err, self._function) from None
            finally:
                with self._cond:
                    if worker_id in self._streams:
                        self._streams[worker_id] -= 1
            if lost > self._max_retries:
                raise WorkerError(f"function {self._function}: an answer lost its worker {lost} times (max_retries={self._max_retries})")

    async def _stream_slot(self) -> tuple[str, Any]:
        """The live worker with the fewest streams open from here (one more counted on it); waits while every worker is being replaced."""
        while True:
            with self._cond:
                usable = self._usable()
                if usable:
                    worker_id = min(usable, key=lambda w: (self._streams.get(w, 0), self._in_flight[w]))
                    self._streams[worker_id] = self._streams.get(worker_id, 0) + 1
                    return worker_id, self._handles[worker_id]
                if not self._handles and not self._replacing:
                    raise WorkerError(
                        f"function {self._function}: every worker died and none could be replaced"
                        + (f": {self._replace_error}" if self._replace_error else "")
                    )
            await asyncio.sleep(_STREAM_WAIT_S)

    def ask_all(self, method: str, *args: Any) -> list[Any]:
        """The answers to a control call (``can_read``, ``stats``) of the workers that answer; one
        Ray says is dead leaves the pool (and is replaced), one it cannot reach is left out."""
        asked = {getattr(handle, method).remote(*args): worker_id for worker_id, handle in self.workers()}
        if not asked:
            return []
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=CONTROL_TIMEOUT_S)
        answers = []
        for ref in answered:
            try:
                answers.append(ray.get(ref))
            except ray.exceptions.ActorUnavailableError:
                continue
            except ray.exceptions.RayActorError:
                self._worker_died(asked[ref], sweep=False)
        return answers

    # -- sending batches -------------------------------------------------------------

    def _run(self, batches: Sequence[Any]) -> list[Any]:
        """Each batch's output, or Failed where the model raised; worker deaths are retried."""
        results: list[Any] = [None] * len(batches)
        for index, outcome in self._outcomes(batches, "apply"):
            results[index] = outcome
        return results

    def _outcomes(self, batches: Sequence[Any], method: str) -> Iterator[tuple[int, Any]]:
        """(index, output or Failed) for each batch as ``worker.<method>(batch)`` returns it; worker deaths are retried."""
        retries = [0] * len(batches)
        unreachable = [0] * len(batches)
        blamed: set[str] = set()  # dead workers whose death a batch has been blamed for
        todo = deque(range(len(batches)))
        pending: dict[ray.ObjectRef, tuple[int, str, float]] = {}  # ref -> (batch index, worker, sent at)
        try:
            while todo or pending:
                while todo:
                    slot = self._acquire()
                    if slot is None:
                        break
                    worker_id, handle = slot
                    index = todo.popleft()
                    pending[getattr(handle, method).remote(batches[index])] = (index, worker_id, time.monotonic())
                if not pending:
                    self._wait_for_free()
                    continue
                done, _ = ray.wait(list(pending), num_returns=1, timeout=self._wait_s(pending))
                if not done:
                    self._fail_hung(pending)
                    continue
                for ref in done:
                    index, worker_id, sent = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.ActorUnavailableError:
                        self._pause(worker_id, _UNREACHABLE_PAUSE_S)  # not dead (Ray has not said so), only unreachable for now
                        unreachable[index] += 1
                        if unreachable[index] > _MAX_UNREACHABLE:
                            raise WorkerError(
                                f"function {self._function}: a batch found its worker unreachable {unreachable[index]} times"
                            ) from None
                        todo.appendleft(index)
                        continue
                    except ray.exceptions.RayActorError:
                        self._worker_died(worker_id)
                        if worker_id not in blamed and worker_id not in self._died_together:
                            # A poison batch kills the worker running it, alone: the batch sent to it first (a worker
                            # runs its batches in turn) takes the blame, not the one queued behind it.
                            blamed.add(worker_id)
                            queued = [(t, i) for i, w, t in pending.values() if w == worker_id]
                            retries[min([(sent, index), *queued])[1]] += 1
                        if (lost := retries[index]) > self._max_retries:
                            raise WorkerError(
                                f"function {self._function}: a batch of {len(batches[index])} rows lost its worker "
                                f"{lost} time{'' if lost == 1 else 's'} (max_retries={self._max_retries}): a poison batch that kills "
                                "the worker scoring it, or workers dying for another reason (see !workers)"
                            ) from None
                        todo.appendleft(index)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        self._release(worker_id, finished=True)
                        yield index, Failed(user_error(err, self._function))
                        continue
                    if outcome is BUSY:  # its other callers' batches fill it: elsewhere, or here in a moment
                        self._pause(worker_id, _BUSY_PAUSE_S)
                        todo.appendleft(index)
                        continue
                    self._release(worker_id, finished=True)
                    yield index, outcome
        finally:
            for _, worker_id, _ in pending.values():
                self._release(worker_id)

    def _wait_s(self, pending: dict) -> float | None:
        """How long to wait for a result before checking for a hung batch (None: no limit)."""
        if self._batch_timeout_s is None:
            return None
        now = time.monotonic()
        return max(0.0, min(self._deadline(w, sent) for _, w, sent in pending.values()) - now)

    def _deadline(self, worker_id: str, sent: float) -> float:
        """When a batch sent at ``sent`` counts as hung: its worker finished nothing since then for too long."""
        with self._cond:
            last = self._progress.get(worker_id, sent)
        return max(sent, last) + self._batch_timeout_s

    def _fail_hung(self, pending: dict) -> None:
        """Raise for a batch past its deadline, after killing its worker (which gets replaced)."""
        now = time.monotonic()
        for _, worker_id, sent in pending.values():
            if self._deadline(worker_id, sent) <= now:
                handle = self._handles.get(worker_id)
                if handle is not None:
                    ray.kill(handle)
                    self._worker_died(worker_id)  # out of the pool now, and replaced
                raise BatchTimeoutError(
                    f"function {self._function}: a batch ran longer than batch_timeout_s={self._batch_timeout_s:g} s "
                    f"on worker {worker_id}; the worker was stopped and will be replaced"
                )

    # -- the pool ----------------------------------------------------------------------

    def _acquire(self) -> tuple[str, Any] | None:
        """Take a slot on the least-loaded worker, or None when all are full (or paused)."""
        with self._cond:
            free = [w for w in self._usable() if self._in_flight[w] < self._max_in_flight]
            if not free:
                return None
            worker_id = min(free, key=lambda w: (self._in_flight[w], self._sent[w]))
            self._in_flight[worker_id] += 1
            self._sent[worker_id] += 1
            return worker_id, self._handles[worker_id]

    def _release(self, worker_id: str, *, finished: bool = False) -> None:
        with self._cond:
            if finished:
                self._progress[worker_id] = time.monotonic()
            if worker_id in self._in_flight:
                self._in_flight[worker_id] -= 1
                self._cond.notify_all()

    def _usable(self) -> list[str]:
        """The workers that may get batches now (called holding the lock)."""
        now = time.monotonic()
        return [w for w in self._in_flight if self._paused.get(w, 0.0) <= now]

    def _pause(self, worker_id: str, pause_s: float) -> None:
        with self._cond:
            self._paused[worker_id] = max(self._paused.get(worker_id, 0.0), time.monotonic() + pause_s)
        self._release(worker_id)

    def _wait_for_free(self) -> None:
        """Block until a worker has a free slot; fail when none is left or coming."""
        with self._cond:
            while not any(self._in_flight[w] < self._max_in_flight for w in self._usable()):
                if not self._handles and not self._replacing:
                    raise WorkerError(
                        f"function {self._function}: every worker died and none could be replaced"
                        + (f": {self._replace_error}" if self._replace_error else "")
                    )
                now = time.monotonic()
                ends = [until - now for until in self._paused.values() if until > now]
                self._cond.wait(min([_WAIT_TICK_S, *ends]))

    def _worker_died(self, worker_id: str, *, sweep: bool = True) -> None:
        """Drop a dead worker from the pool and ask the master for a replacement (once).

        Workers die together when their master does: the master is asked whether it restarted
        and the other workers whether they live, so that no batch takes the blame for their
        deaths (a batch is not sent to each dead one in turn, using up its retries), even when
        the master held only this one worker at the time.
        """
        with self._cond:
            if worker_id not in self._handles:
                return
            del self._handles[worker_id], self._in_flight[worker_id], self._sent[worker_id]
            self._dead.add(worker_id)
            self._replacing.add(worker_id)
        threading.Thread(target=self._replace, args=(worker_id,), daemon=True).start()
        if sweep:
            with self._cond:
                known = set(self._dead)
            restarted = self._master_restarted()
            self._sweep()
            with self._cond:
                others = self._dead - known
                if others or restarted:
                    self._died_together |= others | {worker_id}

    def _master_restarted(self) -> bool:
        """Whether the master has restarted since it was last asked (Ray holds the call while it restarts).

        A master that does not answer in time counts as not restarted: the death then counts against
        the batch, as any other, so that no poison batch goes on killing workers unnoticed.
        """
        try:
            life = ray.get(self._master.life.remote(), timeout=CONTROL_TIMEOUT_S)
        except ray.exceptions.RayActorError:  # gone for good: its workers went with it
            return True
        except ray.exceptions.RayError:
            return False
        with self._cond:
            restarted, self._master_life = life != self._master_life, life
        return restarted

    def _sweep(self) -> None:
        """Drop every worker Ray says is dead, asking each with a control call."""
        self.ask_all("stats")

    def _replace(self, dead_id: str) -> None:
        """Get the dead worker's replacement, then the master's whole list: after the master
        itself restarted, every worker it had is gone and the list holds their successors."""
        try:
            ray.get(self._master.replace.remote(dead_id, self._model_refs))
            current = dict(ray.get(self._master.workers.remote()))
            error = None
        except BaseException as err:  # noqa: BLE001 - reported to the waiting threads (SystemExit: Ray shut down)
            current, error = None, remote_cause(err)
        with self._cond:
            self._replacing.discard(dead_id)
            self._replace_error = error  # the latest attempt's outcome: None once one succeeds
            if current is not None:
                for gone in set(self._handles) - set(current):
                    del self._handles[gone], self._in_flight[gone], self._sent[gone]
                for worker_id, handle in current.items():
                    if worker_id not in self._handles and worker_id not in self._dead:
                        self._handles[worker_id] = handle
                        self._in_flight[worker_id] = 0
                        self._sent[worker_id] = 0
            self._cond.notify_all()
