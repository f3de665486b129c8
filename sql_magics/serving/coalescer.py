"""Coalescing one function's calls from concurrent requests into fewer, larger calls to its workers.

Ray Serve's ``@serve.batch`` waits its timeout for every batch, also when no other request is on
its way (a request alone pays the whole wait). Here a call waits, at most ``wait_s`` from when it
could start, only while more requests are known or expected to come: a request announces itself
when it arrives at the replica (:meth:`Coalescer.coming`), and requests that came while others
waited or were scored show how often they come (one that finds the function idle, as each does at
concurrency 1, says nothing of the next). Otherwise a call starts at once with everything queued
(at most ``max_batch_size`` requests). One call runs at a time, and the requests that come while
it runs queue for the next; a full call (``max_batch_size`` requests) may start beside running
ones, up to ``slots`` at once, so that a load that fills calls keeps every worker busy.

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
import math
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


# A call waiting for requests that came often stops waiting after this many of their gaps without one.
_GAPS_OF_SILENCE = 3

# The announcement of the request the running task serves (tasks it starts share it).
_announced: contextvars.ContextVar[_Announcement | None] = contextvars.ContextVar("rayudf_announced", default=None)


class Coalescer:
    """One function's queue of calls (within one event loop)."""

    def __init__(self, score: Callable[[list], Awaitable[list]], *, max_batch_size: int, wait_s: float, slots: int) -> None:
        self._score = score  # items -> one result each, in order: one call to the workers
        self._max = max_batch_size  # requests one call takes at most
        self._wait_s = wait_s  # how long a call may wait for requests known or expected to come
        self._slots = slots  # full calls running at once at most: enough to keep every worker busy
        self._queue: deque[tuple[Any, asyncio.Future, float]] = deque()  # (item, its result, when it came)
        self._running = 0  # calls running now
        self._coming = 0  # requests announced that have not brought their rows
        self._timer: asyncio.TimerHandle | None = None  # wakes a waiting call when its wait is over
        self._last = 0.0  # when the latest request brought its rows
        self._gap = math.inf  # how far apart requests come while others wait or are scored (a moving mean)
        self._freed = 0.0  # when a slot was last freed: a call that takes it may wait from then
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
        now = time.monotonic()
        if self._queue or self._running:
            self._gap = now - self._last if self._gap == math.inf else 0.7 * self._gap + 0.3 * (now - self._last)
        else:
            self._gap = math.inf
        self._last = now
        result = asyncio.get_running_loop().create_future()
        self._queue.append((item, result, now))
        self._pump()
        return await result

    def _pump(self) -> None:
        """Start the calls that may start now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue and self._running < self._slots:
            if self._running and len(self._queue) < self._max:
                return  # beside a running call, only a full one starts: the rest gather while it runs
            now = time.monotonic()
            deadline = max(self._queue[0][2], self._freed) + self._wait_s
            flowing_until = self._last + _GAPS_OF_SILENCE * self._gap  # later, the requests have stopped coming
            expected = self._coming > 0 or (self._last + self._gap < deadline and now < flowing_until)
            if len(self._queue) < self._max and now < deadline and expected:
                wake = deadline if self._coming > 0 else min(deadline, flowing_until)
                self._timer = asyncio.get_running_loop().call_later(wake - now, self._pump)
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
            self._freed = time.monotonic()
            self._pump()
