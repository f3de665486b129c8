"""UDFWorker: the Ray actor that loads a model once and scores batches with it.

Its control calls (``ready``, ``stats``) run in a concurrency group of their own, so they
are answered while a batch runs: a busy worker is never mistaken for a dead one. Batches run in
another: one at a time on the model, at most ``MAX_IN_FLIGHT_PER_WORKER`` held (running or waiting
to), whoever sent them; one more is answered ``BUSY`` at once (udf_engine.actors.batching).

Example:
    >>> Worker = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(UDFWorker)  # doctest: +SKIP
    >>> w = Worker.remote("w0", init, apply, model_refs, UDFConf(workers=1))  # doctest: +SKIP
    >>> ray.get(w.ready.remote())["input_width"]                # doctest: +SKIP
    64
    >>> ray.get(w.apply.remote(np.zeros((4, 64)))).shape        # doctest: +SKIP
    (4, 10)
"""

from __future__ import annotations

import gc
import importlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from threadpoolctl import threadpool_limits

from udf_engine.actors.batching import BUSY, CALLS_SEEN, MAX_IN_FLIGHT_PER_WORKER, cut
from udf_engine.actors.failures import Failed, resolve, user_error
from udf_engine.errors import ModelError
from udf_engine.models.loaders import MATH_THREADS, RowWiseApply, declared_returns, input_width, load_info, model_counts
from udf_engine.settings import UDFConf

# Control calls get one thread of their own; batches (apply, scan, probe) threads enough to see every
# call that comes (each waits for the model, or is answered BUSY); a generation model's streams (one
# per open HTTP stream, each mostly waiting for its next token) threads of their own; the rest (load,
# unload) the default one.
CONTROL = "control"
BATCHES = "batches"
STREAMS = "streams"
# Streams one worker answers at once; more wait for a thread. Its running batch is bounded by the
# model's token budget, not by this: a stream waits in the model's queue as a SQL row does.
MAX_STREAMS_PER_WORKER = 64
CONCURRENCY_GROUPS = {CONTROL: 1, BATCHES: CALLS_SEEN, STREAMS: MAX_STREAMS_PER_WORKER}
# How long to wait for a worker's answer to a control call (stats, can_read). A live worker answers
# at once, as the call runs beside any batch; a worker just killed gets Ray's verdict (an actor
# error) within a second or two, more on a loaded machine, and that verdict is what tells a death
# (its own, or its siblings' when their master died) from a worker that is only slow. One that
# neither answers nor errs in time is reported as not answering, never taken for dead.
CONTROL_TIMEOUT_S = 10.0

_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TF_NUM_INTEROP_THREADS",
)
# TensorFlow given a single intra-op thread runs its kernels inline, about 25% slower
# per core than with a pool of two, even when both threads share one core
# (Keras MLP 784->512->10 pinned to one core: 1.37 s against 1.07 s per 100k rows).
_TF_MIN_INTRAOP_THREADS = 2


def math_threads(num_cpus: float, workers: int, cores: int) -> int:
    """The threads a worker's math libraries get: the node's cores shared among the UDF's
    workers, and never fewer than the CPUs it reserved.

    The reservation (``num_cpus``) may be a small fraction, so that idle workers of
    several models fit on a laptop; a worker that scores still uses its share of the cores.
    Two workers on a 2-core machine each get one thread: more would oversubscribe the
    cores and run slower than one worker.

    Example:
        >>> math_threads(0.25, workers=2, cores=2), math_threads(0.25, workers=1, cores=2), math_threads(4, workers=2, cores=2)
        (1, 2, 4)
    """
    return max(1, math.ceil(num_cpus), cores // max(workers, 1))


def limit_math_threads(threads: int) -> None:
    """Cap BLAS/OpenMP/TF thread pools at ``threads`` (TensorFlow keeps a pool of two)."""
    for name in _THREAD_ENV:
        os.environ[name] = str(threads)
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(max(_TF_MIN_INTRAOP_THREADS, threads))
    threadpool_limits(threads)  # pools numpy already started ignore the env vars


class IdleImports:
    """Imports ``modules`` on a thread that runs only when the cores are otherwise idle (Linux's
    SCHED_IDLE, which a thread may take without privileges; elsewhere the imports run as they are),
    until :meth:`finish` wants them: then at normal priority.

    A warm spare imports its framework ahead of need this way, so a running statement does not slow
    down, and a registration that takes the spare before its imports are done does not wait behind
    other spares importing idly. Lowering the niceness would not do: Ray already runs every worker
    at niceness 15, the busy ones too. The worker's own thread keeps its priority for the model it
    loads later.

    Example:
        >>> imports = IdleImports(["json"])
        >>> imports.finish()
        >>> imports.done
        True
    """

    def __init__(self, modules: Sequence[str]) -> None:
        self._failed: list[BaseException] = []
        self._lock = threading.Lock()
        self._thread_id: int | None = None
        self._wanted = False  # finish() was called: no idling from then on
        self._thread = threading.Thread(target=self._run, args=(tuple(modules),), name="rayudf-spare-imports", daemon=True)
        self._thread.start()

    def _run(self, modules: tuple[str, ...]) -> None:
        with self._lock:
            self._thread_id = threading.get_native_id()
            if not self._wanted:
                _set_policy(self._thread_id, "SCHED_IDLE")
        try:
            for module in modules:
                importlib.import_module(module)
        except BaseException as err:  # noqa: BLE001 - raised again by finish(), in the worker's own thread
            self._failed.append(err)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def finish(self) -> None:
        """Wait for the imports, raised to normal priority; raise what they raised."""
        with self._lock:
            self._wanted = True
            if self._thread_id is not None and self._thread.is_alive():
                _set_policy(self._thread_id, "SCHED_OTHER")
        self._thread.join()
        if self._failed:
            raise self._failed[0]


def _set_policy(thread_id: int, policy: str) -> None:
    try:
        os.sched_setscheduler(thread_id, getattr(os, policy), os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed back from SCHED_IDLE (RLIMIT_NICE): as it is
        pass


class UDFWorker:
    """Holds one loaded model; ``apply`` scores a batch, ``stats`` reports its counters.

    Started without a model (``init_func`` None) it is a warm spare (udf_engine.actors.warm_pool):
    it imports ``imports`` (the model's framework) in the background (:class:`IdleImports`), and
    ``load`` gives it its model later, once they are done.
    """

    def __init__(
        self,
        worker_id: str = "",
        init_func: Callable[[Sequence[Any], dict], Any] | None = None,
        apply_func: Callable[[Any, Any], Any] | None = None,
        model_refs: Sequence[Any] = (),
        settings: UDFConf | None = None,
        *,
        imports: Sequence[str] = (),
    ) -> None:
        self._batch_started: float | None = None  # when the batch now running began (None: idle)
        self._threads: int | None = None  # the math threads a model runs with (set as it loads)
        self._model_lock = threading.Lock()  # one batch at a time on the model (batches arrive on several threads)
        self._holding_lock = threading.Lock()  # guards _holding, _most_held and _bounced
        self._holding = 0  # batches held now: running, or waiting for the model
        self._most_held = 0  # the most ever held at once (at most MAX_IN_FLIGHT_PER_WORKER)
        self._bounced = 0  # batches answered BUSY: sent while the worker held its bound
        self._forget()
        self._id, self._apply_func = worker_id, apply_func
        self._imports: IdleImports | None = None  # a spare's framework, importing
        if init_func is None:
            self._imports = IdleImports(imports)
        else:
            for module in imports:
                importlib.import_module(module)
        ctx = ray.get_runtime_context()
        self._node = ctx.get_node_id()
        self._gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if init_func is not None:
            self._load(worker_id, init_func, apply_func, model_refs, settings or UDFConf())

    def _forget(self) -> None:
        """No model, no function, no counts: a worker's state before its first model."""
        self._batches = 0  # batches scored by apply()
        self._rows = 0  # rows in those batches
        self._busy_s = 0.0  # wall time spent inside apply_func
        self._errors = 0  # apply() calls that raised
        self._scans = 0  # shares of a file source this worker read and scored itself (scan())
        self._init_error: BaseException | None = None  # re-raised by ready()
        self._model: Any = None
        self._id, self._apply_func, self._load_s = "", None, 0.0
        self._on_error = UDFConf().on_error  # what scan() does with rows the model raises on
        self._batch_size = UDFConf().batch_size  # rows per piece when scan() scores a share's rows

    def unload(self) -> int:
        """Drop the model and what its function counted, so the process, its framework imported, is
        a spare again for the next function of its kind (udf_engine.actors.warm_pool); answers the pid.
        Waits for the batch it runs."""
        with self._model_lock:
            self._forget()
        gc.collect()
        return os.getpid()

    def load(self, worker_id: str, init_func: Callable, apply_func: Callable, model_refs: Sequence[Any], settings: UDFConf) -> dict:
        """Give a warm spare its model; answers as ``ready`` does."""
        self._load(worker_id, init_func, apply_func, model_refs, settings)
        return self.ready()

    def _load(self, worker_id: str, init_func: Callable, apply_func: Callable, model_refs: Sequence[Any], settings: UDFConf) -> None:
        self._id = worker_id  # stable name of this worker in stats and errors
        self._apply_func = apply_func
        self._threads = math_threads(settings.num_cpus, settings.workers, len(os.sched_getaffinity(0)))
        limit_math_threads(self._threads)
        self._on_error = settings.on_error
        self._batch_size = settings.batch_size
        started = time.perf_counter()
        try:
            if self._imports is not None:
                self._imports.finish()  # a spare taken while it still imports its framework
                started = time.perf_counter()  # load_s: the model's own
            self._model = init_func(model_refs, {**settings.as_conf(), MATH_THREADS: self._threads})
        except BaseException as err:  # noqa: BLE001 - reported by ready(), so the master sees the real cause
            self._init_error = err
        self._load_s = time.perf_counter() - started

    @ray.method(concurrency_group=CONTROL)
    def ready(self) -> dict:
        """Raise the model's load error, or describe the loaded model (``model``: what its loader
        recorded, e.g. the ONNX providers chosen)."""
        if self._init_error is not None:
            raise self._init_error
        # a row-wise function takes whatever one row holds, so no width is promised
        width = None if isinstance(self._apply_func, RowWiseApply) else input_width(self._model)
        return {
            "worker": self._id, "input_width": width, "load_s": self._load_s, "model": load_info(self._model),
            "returns": declared_returns(self._model),
        }

    # Served requests make hundreds of small batches a second: Ray's task events (the dashboard's list of
    # tasks) for each took about a tenth of the call's CPU on both sides, and nobody reads them for batches.
    @ray.method(concurrency_group=BATCHES, enable_task_events=False)
    def apply(self, batch: Any) -> Any:
        """Score one batch and count it (BUSY, at once, when the worker holds its bound of batches)."""
        return self._admitted(self._apply, batch)

    def _apply(self, batch: Any) -> Any:
        result = self._busy(self._apply_func, self._model, batch)
        self._batches += 1
        self._rows += len(batch)
        return result

    @ray.method(concurrency_group=BATCHES)
    def scan(self, task: Any) -> Any:
        """Read and score one share of a query's file source in this process: ``task.run(score, threads)``,
        where ``score(matrix)`` gives the outputs of the matrix's ``batch_size`` pieces as ``apply``
        does, with rows the model raises on handled by ``on_error`` here (see arrow_bridge.share_scan),
        and ``threads`` are this worker's math threads. BUSY, at once, as for ``apply``."""
        return self._admitted(self._scan, task)

    def _scan(self, task: Any) -> Any:
        result = self._busy(task.run, lambda matrix: self._score(cut(matrix, self._batch_size), task.function), self._threads)
        self._scans += 1
        self._rows += result.rows
        return result

    def _admitted(self, work: Callable, *args: Any) -> Any:
        """``work(*args)`` as one of the batches this worker holds, on the model alone, or BUSY when it
        holds MAX_IN_FLIGHT_PER_WORKER already (sent by other callers: each keeps to that bound itself)."""
        with self._holding_lock:
            if self._holding >= MAX_IN_FLIGHT_PER_WORKER:
                self._bounced += 1
                return BUSY
            self._holding += 1
            self._most_held = max(self._most_held, self._holding)
        try:
            if getattr(self._model, "concurrent", False):  # a generation model: calls join its one running batch
                return work(*args)
            with self._model_lock:
                return work(*args)
        finally:
            with self._holding_lock:
                self._holding -= 1

    def _busy(self, work: Callable, *args: Any) -> Any:
        """``work(*args)``, timed as the running batch (``batch_running_s``, ``busy_s``), counted if it raises."""
        started = self._batch_started = time.perf_counter()
        try:
            return work(*args)
        except BaseException:
            self._errors += 1
            raise
        finally:
            self._batch_started = None
            self._busy_s += time.perf_counter() - started

    def _score(self, batches: Sequence[Any], function: str) -> list[Any]:
        self._batches += len(batches)

        def run(parts: Sequence[Any]) -> list[Any]:
            outcomes = []
            for part in parts:
                try:
                    outcomes.append(self._apply_func(self._model, part))
                except Exception as err:  # noqa: BLE001 - what the model raised, handled as on_error says
                    outcomes.append(Failed(user_error(err, function)))
            return outcomes

        return resolve(batches, run(batches), run, self._on_error)

    @ray.method(concurrency_group=STREAMS, num_returns="streaming")
    def stream(self, prompt: Any, params: Any = None) -> Iterator[dict]:
        """A generation model's answer to one prompt as it is generated (``Generator.stream``'s events);
        what the model raises reaches the caller, which names its function (``user_error``)."""
        stream = getattr(self._model, "stream", None)
        if stream is None:
            raise ModelError("its model does not generate text")
        yield from stream(prompt, params)
        self._rows += 1

    @ray.method(concurrency_group=CONTROL)
    def can_read(self, files: Sequence[tuple[str, int]]) -> bool:
        """Whether every (path, size) is a file of that size here: the driver saw the same file."""
        try:
            return all(os.path.getsize(path) == size for path, size in files)
        except OSError:
            return False

    @ray.method(concurrency_group=BATCHES)
    def probe(self, batch: Any) -> Any:
        """Score a sample batch without counting it (used to infer the return type)."""
        with self._model_lock:
            return self._apply_func(self._model, batch)

    @ray.method(concurrency_group=CONTROL)
    def stats(self) -> dict:
        """This worker's counters, node and GPU ids, and how long the batch it runs has run."""
        started = self._batch_started
        return {
            "worker": self._id,
            "node": self._node,
            "pid": os.getpid(),
            "gpu_ids": self._gpu_ids,
            "threads": self._threads,
            "batches": self._batches,
            "scans": self._scans,
            "rows": self._rows,
            "busy_s": self._busy_s,
            "batch_running_s": None if started is None else time.perf_counter() - started,
            "errors": self._errors,
            "most_held": self._most_held,  # batches held at once, at most (MAX_IN_FLIGHT_PER_WORKER)
            "bounced": self._bounced,  # batches answered BUSY: another caller's held the bound
            "load_s": self._load_s,
            "imported": self._imports is None or self._imports.done,  # a spare's framework, imported
            "device": load_info(self._model).get("device"),  # where the model runs, when its loader says
            **model_counts(self._model),  # a text model's truncated texts and tokens
        }
