"""The spares policy of one session: which workers wait in its warm pool, and when they start.

The pool (:mod:`udf_engine.actors.warm_pool`, an actor) keeps spares and lends them to masters;
this object, in the session's process, decides what the pool keeps:

- :meth:`SparesPolicy.warm` (``Session(warm=...)``, ``set warm``): Ray starts in the background
  (``RayRuntime.start_ahead``) and, once it is up, spares importing a framework wait for the
  workers a registration with default options asks for. Another framework's spares make way;
  ``None`` stops them.
- :meth:`SparesPolicy.prepare`: spares for a registration a later statement of the running
  script makes, placed while the statements before it run. It never starts Ray itself, so a
  ``set ray.address`` may still move it.
- :meth:`SparesPolicy.ready`: before a registration asks for workers, the spares placed for it
  are there and the pool is started; the registration hands the pool's name to its RayContext.
- :meth:`SparesPolicy.close`: the pool and its spares stop, and nothing starts any more.

Warming never slows a running statement (SPEC §7): spares are placed on threads of their own,
and :meth:`SparesPolicy.prepare` never waits for a refill under way.

Example:
    >>> spares = SparesPolicy(RayRuntime(), "rayudf.ab12.pool")
    >>> spares.pool_name
    'rayudf.ab12.pool'
    >>> spares.warm("keras")                                                           # doctest: +SKIP
    >>> spares.prepare(UDFBuildInFunc.init_tf, UDFConf(workers=1))                     # doctest: +SKIP
    >>> RayContext("digits", settings=UDFConf(workers=1), warm_pool=spares.ready())    # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from udf_engine.actors.warm_pool import WorkerKind, start_pool, stop_pool
from udf_engine.models.loaders import WARM_FRAMEWORKS, WARM_IMPORTS
from udf_engine.ray_runtime import RayRuntime
from udf_engine.settings import UDFConf

# How long spares for a script's later registration (prepare) wait for a Ray starting ahead of need.
PREPARE_WAIT_S = 30.0
_log = logging.getLogger(__name__)


def _as_given(settings: UDFConf) -> UDFConf:
    return settings


class SparesPolicy:
    """Which spares wait in one session's warm pool, and when they start (see the module's docstring)."""

    def __init__(self, runtime: RayRuntime, pool_name: str, *, complete: Callable[[UDFConf], UDFConf] = _as_given) -> None:
        self.runtime = runtime  # the Ray the pool runs on; warm() starts it ahead of need. Set once: no lock
        self.pool_name = pool_name  # the pool actor's name, which every RayContext of the session carries. Set once: no lock
        self._complete = complete  # a registration's settings as its workers get them (sql_magics adds `!python env`). Set once
        # Guards _pool. Held while the pool starts, refills or stops, so each decision about spares is placed before
        # the next is made (a `set warm` that follows a refill drops what it placed); a registration waits on it
        # for the spares being placed, prepare() never does.
        self._pool_lock = threading.Lock()
        self._pool: Any = None  # the pool's handle once started (Ray stops an actor nobody holds a handle of); _pool_lock
        # Guards _warming, _ahead, _closed and _placing; held for no Ray call, so taking it never waits for a refill.
        # Taken after _pool_lock where both are held.
        self._lock = threading.Lock()
        self._warming: str | None = None  # the framework whose spares wait for a default registration; _lock
        self._ahead = False  # whether warm() has started Ray ahead of need; _lock
        self._closed = False  # once close() ran: nothing starts any more; _lock
        self._placing: list[threading.Thread] = []  # placing spares for registrations to come (prepare); _lock

    def warm(self, framework: str | None) -> None:
        """Have spares importing ``framework`` (a key of WARM_FRAMEWORKS; None: none) wait for the workers
        a registration with default options asks for, in place of those waiting now. The first call starts
        Ray in the background; the spares follow once it is up, and that registration takes them."""
        with self._pool_lock:
            with self._lock:
                if framework == self._warming:
                    return
                self._warming = framework
            if self._pool is not None:
                ray.get(self._pool.drop.remote())
        if framework is None:
            return
        with self._lock:
            start, self._ahead = not self._ahead, True
        if start:
            self.runtime.start_ahead(then=self._warm_up, leaving=self._drop_pool)
        elif _ray_up():
            threading.Thread(target=self._warm_up, name="rayudf-warm-up", daemon=True).start()
        # else the start ahead is under way, and warms what _warming says once Ray is up

    def prepare(self, init_func: Callable, settings: UDFConf) -> None:
        """Have spares ready for a registration a later statement of the running script makes (a model
        ``init_func`` loads, with ``settings``), when its framework is worth importing ahead: they are
        placed in the background once Ray is up, import while the statements before it run, and that
        registration takes them (:meth:`ready`). It never starts Ray itself."""
        conf = self._complete(settings)
        kind = WorkerKind.of(conf, WARM_IMPORTS.get(init_func, ()))
        if not kind.kept_warm:
            return
        with self._lock:
            if self._ahead or _ray_up():
                thread = threading.Thread(target=self._place, args=(kind, conf.workers), name="rayudf-prepare", daemon=True)
                self._placing.append(thread)
                thread.start()

    def ready(self) -> str:
        """The pool's name, for a registration about to ask for workers: the spares placed for it are
        there (:meth:`prepare`), and the pool is started, once."""
        while True:
            with self._lock:
                thread = self._placing.pop() if self._placing else None
            if thread is None:
                break
            thread.join()
        with self._pool_lock:
            self._started_pool()
        return self.pool_name

    def close(self) -> None:
        """Stop the pool and its spares; nothing starts any more."""
        with self._lock:
            self._closed = True
        self._drop_pool()

    def _warm_up(self) -> None:
        """Refill the pool with spares of the framework now warmed, for a default registration."""
        self._refill(self._warmed_kind)

    def _warmed_kind(self) -> tuple[WorkerKind, int] | None:
        """The workers a registration with default options asks for, of the framework warmed now (None: none)."""
        with self._lock:
            framework = self._warming
        if framework is None:
            return None
        settings = self._complete(UDFConf())
        return WorkerKind.of(settings, WARM_FRAMEWORKS[framework]), settings.workers

    def _place(self, kind: WorkerKind, count: int) -> None:
        deadline = time.monotonic() + PREPARE_WAIT_S
        while not _ray_up():  # a start ahead of need under way
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        try:
            self._refill(lambda: (kind, count))
        except Exception:  # noqa: BLE001 - ahead of need: the registration starts its workers itself and says what fails
            _log.info("placing spares ahead of a registration failed", exc_info=True)

    def _refill(self, wanted: Callable[[], tuple[WorkerKind, int] | None]) -> None:
        """Have the spares ``wanted()`` names (a kind, and how many; None: none) wait in the pool. Decided
        and placed holding the pool lock, so a ``warm`` that follows drops them; nothing once closed."""
        with self._pool_lock:
            with self._lock:
                closed = self._closed
            if closed or (want := wanted()) is None:
                return
            ray.get(self._started_pool().refill.remote(*want))

    def _started_pool(self) -> Any:
        """This session's pool, started if it is not (the pool lock held): once, as a second start
        would hand back a handle that does not own it."""
        if self._pool is None:
            self._pool = start_pool(self.pool_name)
        return self._pool

    def _drop_pool(self) -> None:
        """Stop the warm pool and its spares; the next registration starts another."""
        with self._pool_lock:
            stop_pool(self.pool_name)
            self._pool = None


def _ray_up() -> bool:
    return ray.is_initialized()
