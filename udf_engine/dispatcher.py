"""The data plane: spreads batches over a UDF's workers from the caller's side.

Many threads (DuckDB calls a function from several at once) share one
Dispatcher. Each ``map`` call sends its batches to the least-loaded workers,
never more than ``max_in_flight`` per worker, retries a batch whose worker died
on another worker (while the master replaces the dead one) and returns the
results in input order. The master is only contacted when a worker dies.

What the model raises is never retried as a worker death. ``on_error="raise"``
fails the call naming the first row the model fails on (found by splitting the
batch); ``on_error="null"`` splits the batch until the failing rows stand alone
and returns a :class:`Partial` result with None for them.

Example:
    >>> d = Dispatcher(master, ray.get(master.workers.remote()), model_refs=refs, function="digits")  # doctest: +SKIP
    >>> [r.shape for r in d.map([np.zeros((4, 64)), np.zeros((2, 64))])]              # doctest: +SKIP
    [(4, 10), (2, 10)]
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from udf_engine.errors import ModelError, RayUDFError, RowError, WorkerError, remote_cause

# One batch running and one queued behind it: the worker starts the next batch the
# moment it finishes one, without waiting a round trip for it, while a slow worker
# never hoards more than one batch that a faster worker could have taken.
MAX_IN_FLIGHT_PER_WORKER = 2

# How long a thread with nothing in flight sleeps before it checks again for a
# free worker or a finished replacement (it is also woken as soon as either happens).
_WAIT_TICK_S = 0.5
# How much of a failing row the error message shows.
_ROW_PREVIEW_CHARS = 80
# How long a worker Ray cannot reach (its node gone silent) gets no batches. It is not
# dead until Ray says so, which for a lost node takes the GCS's missed heartbeats (~15 s);
# meanwhile the other workers take its batches, and it is tried again after this pause.
_UNREACHABLE_PAUSE_S = 5.0
# How often one batch may find its worker unreachable before the query fails: ten pauses
# is nearly a minute of a node that neither answers nor is declared dead.
_MAX_UNREACHABLE = 10
# After a worker died, how long to wait for the others' stats() (a control call, answered at
# once by a live worker) to learn which died with it.
_SWEEP_TIMEOUT_S = 2.0


def user_error(err: ray.exceptions.RayTaskError, function: str) -> RayUDFError:
    """The exception an apply_func raised inside a worker, as a project error."""
    cause = remote_cause(err)
    if isinstance(cause, RayUDFError):
        return cause
    return ModelError(f"function {function}: the model raised {type(cause).__name__}: {cause}")


@dataclass
class Partial:
    """A batch's result with rows the model failed on: ``parts`` are (rows, output) runs in
    row order, output None for rows left NULL."""

    parts: list[tuple[int, Any]] = field(default_factory=list)
    error: str = ""  # what the model raised on the first NULLed row

    @property
    def nulled(self) -> int:
        return sum(rows for rows, output in self.parts if output is None)


@dataclass
class _Failed:
    """The model raised on a batch."""

    error: RayUDFError


def _preview(row: Any) -> str:
    text = repr(row.tolist() if hasattr(row, "tolist") else row)
    return text if len(text) <= _ROW_PREVIEW_CHARS else text[: _ROW_PREVIEW_CHARS - 3] + "..."


class Dispatcher:
    """A thread-safe pool of worker handles with per-worker in-flight bounds."""

    def __init__(
        self,
        master: Any,
        workers: Sequence[tuple[str, Any]],
        *,
        model_refs: Sequence[Any] = (),
        function: str = "",
        max_retries: int = 1,
        max_in_flight: int = MAX_IN_FLIGHT_PER_WORKER,
        batch_timeout_s: float | None = None,
        on_error: str = "raise",
    ) -> None:
        self._master = master  # asked for a replacement when a worker dies
        self._model_refs = list(model_refs)  # the model, handed to the master with each replacement (it may have restarted)
        self._function = function  # the SQL name, for messages
        self._max_retries = max_retries  # times one batch may be resent after its worker died
        self._max_in_flight = max_in_flight  # bound on batches in flight per worker
        self._batch_timeout_s = batch_timeout_s  # how long a worker may go without finishing a batch it holds
        self._on_error = on_error  # "raise" or "null": what a model error on some rows does
        self._handles: dict[str, Any] = dict(workers)  # live workers by id; a dead one never returns
        self._in_flight: dict[str, int] = {w: 0 for w in self._handles}  # batches sent, not yet back
        self._sent: dict[str, int] = {w: 0 for w in self._handles}  # all batches ever sent (tie-break)
        self._progress: dict[str, float] = {}  # when each worker last finished a batch (for batch_timeout_s)
        self._paused: dict[str, float] = {}  # workers Ray could not reach, and until when they get no batches
        self._replacing: set[str] = set()  # dead workers whose replacement is starting
        self._dead: set[str] = set()  # every worker known dead: never back in the pool
        self._replace_error: BaseException | None = None  # why the last replacement failed
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
        outcomes = self._run(batches)
        results = []
        offset = 0
        total = sum(len(b) for b in batches)
        for batch, outcome in zip(batches, outcomes, strict=True):
            if isinstance(outcome, _Failed):
                outcome = self._isolate(batch) if self._on_error == "null" else self._raise_located(batch, outcome, offset, total)
            results.append(outcome)
            offset += len(batch)
        return results

    # -- what the model fails on ------------------------------------------------------

    def _raise_located(self, batch: Any, failed: _Failed, offset: int, total: int) -> None:
        """Raise the model's error as a RowError naming the first row of ``batch`` it fails on alone."""
        start, part, error = 0, batch, failed.error
        while len(part) > 1:
            half = len(part) // 2
            first, second = self._run([part[:half], part[half:]])
            if isinstance(first, _Failed):
                part, error = part[:half], first.error
            elif isinstance(second, _Failed):
                start, part, error = start + half, part[half:], second.error
            else:
                raise ModelError(f"{failed.error} (on a batch of {len(batch)} rows, though on no part of it alone)")
        raise RowError(str(error), row=offset + start, rows=total, values=_preview(part[0]))

    def _isolate(self, batch: Any) -> Partial:
        """Score a batch the model failed on in halves, down to the single rows it fails on."""
        if len(batch) == 1:
            (outcome,) = self._run([batch])
            if isinstance(outcome, _Failed):
                return Partial([(1, None)], str(outcome.error))
            return Partial([(1, outcome)])
        half = len(batch) // 2
        pieces = [batch[:half], batch[half:]]
        result = Partial()
        for piece, outcome in zip(pieces, self._run(pieces), strict=True):
            if isinstance(outcome, _Failed):
                inner = self._isolate(piece)
                result.parts.extend(inner.parts)
                result.error = result.error or inner.error
            else:
                result.parts.append((len(piece), outcome))
        return result

    # -- sending batches -------------------------------------------------------------

    def _run(self, batches: Sequence[Any]) -> list[Any]:
        """Each batch's output, or _Failed where the model raised; worker deaths are retried."""
        results: list[Any] = [None] * len(batches)
        retries = [0] * len(batches)
        unreachable = [0] * len(batches)
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
                    pending[handle.apply.remote(batches[index])] = (index, worker_id, time.monotonic())
                if not pending:
                    self._wait_for_free()
                    continue
                done, _ = ray.wait(list(pending), num_returns=1, timeout=self._wait_s(pending))
                if not done:
                    self._fail_hung(pending)
                    continue
                for ref in done:
                    index, worker_id, _ = pending.pop(ref)
                    try:
                        results[index] = ray.get(ref)
                    except ray.exceptions.ActorUnavailableError:
                        self._pause(worker_id)  # not dead (Ray has not said so), only unreachable for now
                        unreachable[index] += 1
                        if unreachable[index] > _MAX_UNREACHABLE:
                            raise WorkerError(
                                f"function {self._function}: a batch found its worker unreachable {unreachable[index]} times"
                            ) from None
                        todo.appendleft(index)
                        continue
                    except ray.exceptions.RayActorError:
                        self._worker_died(worker_id)
                        retries[index] += 1
                        if retries[index] > self._max_retries:
                            raise WorkerError(
                                f"function {self._function}: a batch of {len(batches[index])} rows lost its worker "
                                f"{retries[index]} times (max_retries={self._max_retries}): a poison batch that kills "
                                "the worker scoring it, or workers dying for another reason (see !workers)"
                            ) from None
                        todo.appendleft(index)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        self._release(worker_id, finished=True)
                        results[index] = _Failed(user_error(err, self._function))
                        continue
                    self._release(worker_id, finished=True)
        finally:
            for _, worker_id, _ in pending.values():
                self._release(worker_id)
        return results

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
                raise WorkerError(
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

    def _pause(self, worker_id: str) -> None:
        with self._cond:
            self._paused[worker_id] = time.monotonic() + _UNREACHABLE_PAUSE_S
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
                self._cond.wait(_WAIT_TICK_S)

    def _worker_died(self, worker_id: str, *, sweep: bool = True) -> None:
        """Drop a dead worker from the pool and ask the master for a replacement (once).

        Workers die together when their master does: the others are asked at once, so
        that a batch is not sent to each dead one in turn, using up its retries.
        """
        with self._cond:
            if worker_id not in self._handles:
                return
            del self._handles[worker_id], self._in_flight[worker_id], self._sent[worker_id]
            self._dead.add(worker_id)
            self._replacing.add(worker_id)
        threading.Thread(target=self._replace, args=(worker_id,), daemon=True).start()
        if sweep:
            self._sweep()

    def _sweep(self) -> None:
        """Drop every worker Ray says is dead, asking each with a control call."""
        asked = {handle.stats.remote(): worker_id for worker_id, handle in self.workers()}
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=_SWEEP_TIMEOUT_S)
        for ref in answered:
            try:
                ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                continue
            except ray.exceptions.RayActorError:
                self._worker_died(asked[ref], sweep=False)

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
