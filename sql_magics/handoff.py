"""Calls a query thread hands to the thread that waits for it: where Ray must be started.

Ray's processes are told to die with the thread that started them (Linux's parent-death
signal follows the thread, not the process), so ``ray.init`` must run on a long-lived
thread, never on the short-lived thread a notebook query runs on. The waiting thread
serves a :class:`Handoff` while it waits; code on the query thread calls
:func:`on_waiting_thread`, which runs the call right there when no thread is serving.

Example:
    >>> handoff = Handoff()
    >>> def query():
    ...     handoff.attach()
    ...     print(on_waiting_thread(lambda: threading.current_thread().name))
    >>> thread = threading.Thread(target=query)
    >>> thread.start()
    >>> while thread.is_alive():
    ...     handoff.serve(); thread.join(0.01)
    MainThread
    >>> handoff.close()
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

# On a thread attached to a Handoff: .handoff, the one whose waiting thread serves its calls.
_attached = threading.local()


class Handoff:
    """A queue of calls from query threads, run by the thread that serves it."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # makes "closed, so run it here" and "queued" exclusive
        self._closed = False  # once the serving thread has stopped waiting

    def attach(self) -> None:
        """Hand this thread's calls (see :func:`on_waiting_thread`) to the serving thread."""
        _attached.handoff = self

    def submit(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` on the serving thread and return what it returns (or raise what it raises)."""
        future: Future = Future()
        with self._lock:
            closed = self._closed
            if not closed:
                self._calls.put((call, future))
        return call() if closed else future.result()

    def serve(self) -> None:
        """Run the calls handed over so far (on the calling thread)."""
        while True:
            try:
                call, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(call())
            except BaseException as err:  # handed to the query thread, which raises it
                future.set_exception(err)
                if isinstance(err, KeyboardInterrupt):
                    raise

    def close(self) -> None:
        """Stop serving: calls still queued fail, later ones run on their own thread."""
        with self._lock:
            self._closed = True
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            future.set_exception(RuntimeError("the thread that runs Ray's start-up stopped waiting for this query"))


def on_waiting_thread(call: Callable[[], Any]) -> Any:
    """Run ``call`` on the thread serving this thread's Handoff, or right here if there is none."""
    handoff = getattr(_attached, "handoff", None)
    return call() if handoff is None else handoff.submit(call)
