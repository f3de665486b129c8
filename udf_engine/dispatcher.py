"""The data plane: spreads batches over a UDF's workers from the caller's side.

Many threads (DuckDB calls a function from several at once) share one
Dispatcher. Each ``map`` call sends its batches to the least-loaded workers,
never more than ``max_in_flight`` per worker, retries a batch whose worker died
on another worker (while the master replaces the dead one) and returns the
results in input order. The master is only contacted when a worker dies.

Example:
    >>> d = Dispatcher(master, ray.get(master.workers.remote()), function="digits")  # doctest: +SKIP
    >>> [r.shape for r in d.map([np.zeros((4, 64)), np.zeros((2, 64))])]              # doctest: +SKIP
    [(4, 10), (2, 10)]
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import ray

from udf_engine.errors import ModelError, RayUDFError, WorkerError, remote_cause

# One batch running and one queued behind it: the worker starts the next batch the
# moment it finishes one, without waiting a round trip for it, while a slow worker
# never hoards more than one batch that a faster worker could have taken.
MAX_IN_FLIGHT_PER_WORKER = 2

# How long a thread with nothing in flight sleeps before it checks again for a
# free worker or a finished replacement (it is also woken as soon as either happens).
_WAIT_TICK_S = 0.5


def user_error(err: ray.exceptions.RayTaskError, function: str) -> RayUDFError:
    """The exception an apply_func raised inside a worker, as a project error."""
    cause = remote_cause(err)
    if isinstance(cause, RayUDFError):
        return cause
    return ModelError(f"function {function}: the model raised {type(cause).__name__}: {cause}")


class Dispatcher:
    """A thread-safe pool of worker handles with per-worker in-flight bounds."""

    def __init__(
        self,
        master: Any,
        workers: Sequence[tuple[str, Any]],
        *,
        function: str = "",
        max_retries: int = 1,
        max_in_flight: int = MAX_IN_FLIGHT_PER_WORKER,
    ) -> None:
        self._master = master  # asked for a replacement when a worker dies
        self._function = function  # the SQL name, for messages
        self._max_retries = max_retries  # times one batch may be resent after its worker died
        self._max_in_flight = max_in_flight  # bound on batches in flight per worker
        self._handles: dict[str, Any] = dict(workers)  # live workers by id; a dead one never returns
        self._in_flight: dict[str, int] = {w: 0 for w in self._handles}  # batches sent, not yet back
        self._sent: dict[str, int] = {w: 0 for w in self._handles}  # all batches ever sent (tie-break)
        self._replacing: set[str] = set()  # dead workers whose replacement is starting
        self._replace_error: BaseException | None = None  # why the last replacement failed
        self._cond = threading.Condition()

    # -- public verbs -------------------------------------------------------------

    def workers(self) -> list[tuple[str, Any]]:
        """The live workers as (worker_id, handle) pairs."""
        with self._cond:
            return list(self._handles.items())

    def map(self, batches: Sequence[Any]) -> list[Any]:
        """Score every batch on some worker; results come back in input order."""
        results: list[Any] = [None] * len(batches)
        retries = [0] * len(batches)
        todo = deque(range(len(batches)))
        pending: dict[ray.ObjectRef, tuple[int, str]] = {}
        try:
            while todo or pending:
                while todo:
                    slot = self._acquire()
                    if slot is None:
                        break
                    worker_id, handle = slot
                    index = todo.popleft()
                    pending[handle.apply.remote(batches[index])] = (index, worker_id)
                if not pending:
                    self._wait_for_free()
                    continue
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index, worker_id = pending.pop(ref)
                    try:
                        results[index] = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        self._worker_died(worker_id)
                        retries[index] += 1
                        if retries[index] > self._max_retries:
                            raise WorkerError(
                                f"function {self._function}: batch {index} lost its worker "
                                f"{retries[index]} times (max_retries={self._max_retries})"
                            ) from None
                        todo.appendleft(index)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        self._release(worker_id)
                        raise user_error(err, self._function) from None
                    self._release(worker_id)
        finally:
            for _, worker_id in pending.values():
                self._release(worker_id)
        return results

    # -- private ------------------------------------------------------------------

    def _acquire(self) -> tuple[str, Any] | None:
        """Take a slot on the least-loaded worker, or None when all are full."""
        with self._cond:
            free = [w for w, n in self._in_flight.items() if n < self._max_in_flight]
            if not free:
                return None
            worker_id = min(free, key=lambda w: (self._in_flight[w], self._sent[w]))
            self._in_flight[worker_id] += 1
            self._sent[worker_id] += 1
            return worker_id, self._handles[worker_id]

    def _release(self, worker_id: str) -> None:
        with self._cond:
            if worker_id in self._in_flight:
                self._in_flight[worker_id] -= 1
                self._cond.notify_all()

    def _wait_for_free(self) -> None:
        """Block until a worker has a free slot; fail when none is left or coming."""
        with self._cond:
            while not any(n < self._max_in_flight for n in self._in_flight.values()):
                if not self._handles and not self._replacing:
                    raise WorkerError(
                        f"function {self._function}: every worker died and none could be replaced"
                        + (f": {self._replace_error}" if self._replace_error else "")
                    )
                self._cond.wait(_WAIT_TICK_S)

    def _worker_died(self, worker_id: str) -> None:
        """Drop a dead worker from the pool and ask the master for a replacement (once)."""
        with self._cond:
            if worker_id not in self._handles:
                return
            del self._handles[worker_id], self._in_flight[worker_id], self._sent[worker_id]
            self._replacing.add(worker_id)
        threading.Thread(target=self._replace, args=(worker_id,), daemon=True).start()

    def _replace(self, dead_id: str) -> None:
        try:
            fresh = ray.get(self._master.replace.remote(dead_id))
            error = None
        except Exception as err:  # noqa: BLE001 - reported to the waiting threads below
            fresh, error = None, remote_cause(err)
        with self._cond:
            self._replacing.discard(dead_id)
            if error is not None:
                self._replace_error = error
            if fresh is not None and fresh[0] not in self._handles:
                self._handles[fresh[0]] = fresh[1]
                self._in_flight[fresh[0]] = 0
                self._sent[fresh[0]] = 0
            self._cond.notify_all()
