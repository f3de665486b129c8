"""Coalescing one function's calls from concurrent requests into fewer, larger calls to its workers.

Ray Serve's ``@serve.batch`` waits its timeout for every batch, also when no other request is on
its way (a request alone pays the whole wait), and spreads what arrives over the batches forming
at once. Here a call waits only for requests known to be coming: a request announces itself when
it arrives at the replica (:meth:`Coalescer.coming`), and a call about to start waits, at most
``wait_s``, while announced requests have not yet brought their rows. Otherwise a call starts at
once with everything queued (at most ``max_batch_size`` requests), as soon as one of its ``slots``
is free: while the workers score, the requests that come queue for the next call.

Example:
    >>> async def double(items):
    ...     return [x * 2 for x in items]
    >>> async def main():
    ...     together = Coalescer(double, max_batch_size=8, wait_s=0.05, slots=1)
    ...     with together.coming(), together.coming():   # two requests on their way
    ...         return await asyncio.gather(together(1), together(2)), together.calls
    >>> asyncio.run(main())
    ([2, 4], 1)
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any


class _Announcement:
    """A request on its way to a coalescer, until it brings its rows (or leaves without)."""

    def __init__(self, coalescer: Coalescer) -> None:
        self.coalescer = coalescer
        self.pending = True


# The announcement of the request the running task serves (tasks it starts share it).
_announced: contextvars.ContextVar[_Announcement | None] = contextvars.ContextVar("rayudf_announced", default=None)


class Coalescer:
    """One function's queue of calls (within one event loop)."""

    def __init__(self, score: Callable[[list], Awaitable[list]], *, max_batch_size: int, wait_s: float, slots: int) -> None:
        self._score = score  # items -> one result each, in order: one call to the workers
        self._max = max_batch_size  # requests one call takes at most
        self._wait_s = wait_s  # how long a call may wait for announced requests
        self._slots = slots  # calls running at once at most: enough to keep every worker busy
        self._queue: deque[tuple[Any, asyncio.Future, float]] = deque()  # (item, its result, when it came)
        self._running = 0  # calls running now
        self._coming = 0  # requests announced that have not brought their rows
        self._timer: asyncio.TimerHandle | None = None  # wakes a waiting call when its wait is over
        self.calls = 0  # calls made so far

    @contextmanager
    def coming(self) -> Iterator[None]:
        """``with coalescer.coming():`` a request on its way: a call about to start waits for its rows."""
        announcement = _Announcement(self)
        self._coming += 1
        token = _announced.set(announcement)
        try:
            yield
        finally:
            _announced.reset(token)
            self._arrived(announcement)  # left without calling: nobody waits for it any more

    def _arrived(self, announcement: _Announcement | None, *, pump: bool = True) -> None:
        if announcement is not None and announcement.coalescer is self and announcement.pending:
            announcement.pending = False
            self._coming -= 1
            if pump:
                self._pump()

    async def __call__(self, item: Any) -> Any:
        """The result for ``item``, from the call it shares with others."""
        self._arrived(_announced.get(), pump=False)  # pumped below, with the item queued
        result = asyncio.get_running_loop().create_future()
        self._queue.append((item, result, time.monotonic()))
        self._pump()
        return await result

    def _pump(self) -> None:
        """Start the calls that may start now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue and self._running < self._slots:
            waited = time.monotonic() - self._queue[0][2]
            if len(self._queue) < self._max and self._coming > 0 and waited < self._wait_s:
                self._timer = asyncio.get_running_loop().call_later(self._wait_s - waited, self._pump)
                return
            taken = [self._queue.popleft() for _ in range(min(self._max, len(self._queue)))]
            self._running += 1
            self.calls += 1
            asyncio.get_running_loop().create_task(self._call(taken))

    async def _call(self, taken: list[tuple[Any, asyncio.Future, float]]) -> None:
        try:
            results = await self._score([item for item, _, _ in taken])
        except BaseException as err:  # noqa: BLE001 - handed to every request of the call
            for _, future, _ in taken:
                if not future.done():
                    future.set_exception(err)
        else:
            for (_, future, _), value in zip(taken, results, strict=True):
                if not future.done():
                    future.set_result(value)
        finally:
            self._running -= 1
            self._pump()
