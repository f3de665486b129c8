"""Inside a Serve replica: the served functions as it knows them, and requests scored through them.

A replica follows the session's directory (:mod:`sql_magics.serving.directory`). For each version
of a function it holds the engine's own dispatcher over that version's UDFWorkers (the workers SQL
uses: the model is never loaded again here). Each request picks, for each function it calls, one
version (by the versions' shares) and keeps it to its end: no request mixes versions. The model
calls of concurrent requests are coalesced (one queue per function)
into one call to the workers (:mod:`sql_magics.serving.coalescer`); a call the model fails on is
scored again one request at a time, so each request gets its own answer or its own error.

``/model/predict`` evaluates its select list with DuckDB over the request's rows: a DuckDB of the
replica's own, with no access to files, network or extensions, where each model function is a
Python function that sends its rows through the coalescing queue.

Example (inside a replica):
    >>> functions = Functions(loop=asyncio.get_running_loop(), metrics=Metrics())   # doctest: +SKIP
    >>> functions.update(entries)                                                   # doctest: +SKIP
    >>> await functions.score("digit", [pixels], pins)                              # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from arrow_bridge.function import add_arrow_function
from arrow_bridge.scoring import Call, Scored
from arrow_bridge.tensors import join_outputs, slice_output, to_arrow
from arrow_bridge.types import arrow_type
from sql_magics.errors import clean_duckdb_error
from sql_magics.serving.coalescer import Coalescer
from sql_magics.serving.directory import FunctionEntry, VersionEntry
from sql_magics.serving.metrics import Metrics
from sql_magics.serving.requests import (
    MAX_BODY_BYTES,
    REQUEST_TABLE,
    PredictRequest,
    QueryStoppedError,
    RequestError,
    RestartingError,
    UnknownFunctionError,
)
from sql_magics.serving.select_list import query
from udf_engine.actors.builder import RemoteUDF
from udf_engine.actors.failures import Partial
from udf_engine.errors import BatchTimeoutError, InputError, ModelError, RayUDFError, RowError, WorkerError

# Threads that run requests' DuckDB queries: each one waits while its model calls are coalesced,
# so there are as many as requests that may be coalesced into one call, and more.
QUERY_THREADS = 64
# What all of a replica's select lists together may hold in DuckDB (the request's rows come in as
# Arrow, outside it): a select list over a request's rows needs little, a runaway one (a cross
# product, range(1e11)) fails at this instead of taking the memory the model workers share.
QUERY_MEMORY_LIMIT = "512MB"
# Rows an answer may have: as many as a large request's, more only when a select list unnests.
MAX_RESULT_ROWS = 1_000_000
# How often a stopped query is interrupted again until its thread lets go of it.
_INTERRUPT_EVERY_S = 0.1
# How long a health check waits for a function's master to count its live workers.
HEALTH_TIMEOUT_S = 5.0
_local = threading.local()  # the Pins of the request a query thread runs


class VersionClient:
    """One version of a function as the replica calls it: the engine's UDF, attached to its master's workers."""

    def __init__(self, function: str, entry: VersionEntry) -> None:
        self.key, self.label, self.width = entry.key, entry.label, entry.width
        self._udf = RemoteUDF.attach(function, entry.master, entry.conf, entry.model_refs, {"input_width": entry.width})

    async def map(self, matrix: Any) -> list[Any]:
        """Score one feature matrix on the workers."""
        return await self._udf.score_async(matrix)

    def stream(self, prompt: Any, params: Any = None) -> AsyncIterator[dict]:
        """A generation model's answer to one prompt, as it is generated (see ``RemoteUDF.stream``)."""
        return self._udf.stream(prompt, params)

    def stats(self) -> list[dict]:
        """The workers' statistics (blocking: run it on a thread)."""
        return self._udf.stats()

    async def live_workers(self) -> int:
        """How many of the version's workers Ray says are alive (0 when its master does not answer in time)."""
        try:
            rows = await asyncio.wait_for(self._udf.master.stats.remote(), HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a master gone or too slow: no worker to count on
            return 0
        return sum(bool(row.get("alive")) for row in rows)


@dataclass
class Outcome:
    """What the coalesced call gave one request: its outputs, or the error that is its own."""

    outputs: list | None = None
    error: RayUDFError | None = None


class Function:
    """A served function in the replica: its versions, and the queue that coalesces calls to them."""

    def __init__(self, entry: FunctionEntry, clients: dict[str, VersionClient], metrics: Metrics) -> None:
        self.name, self.returns, self.kind = entry.name, entry.returns, entry.kind
        self.arrow_type = arrow_type(entry.returns)
        self.versions = [(clients[v.key], v.share) for v in entry.versions]
        self.entry = entry
        self._metrics = metrics
        workers = max(v.workers for v in entry.versions)
        # one call at a time takes what queued meanwhile; full calls may run one per worker
        self.coalesced = Coalescer(
            self._score_together, max_batch_size=entry.max_batch_size, wait_s=entry.batch_wait_timeout_s,
            slots=workers,
        )

    def choose(self) -> VersionClient:
        """The version a request starting now uses."""
        draw, upto = random.random(), 0.0
        for client, share in self.versions:
            upto += share
            if draw < upto:
                return client
        return self.versions[-1][0]

    async def _score_together(self, items: list[tuple[VersionClient, Any]]) -> list[Outcome]:
        """One call to the workers for the requests of each version, their outputs split back."""
        outcomes: list[Outcome] = [Outcome()] * len(items)
        groups: dict[VersionClient, list[int]] = defaultdict(list)
        for i, (client, _) in enumerate(items):
            groups[client].append(i)
        for client, indices in groups.items():
            matrices = [items[i][1] for i in indices]
            for i, outcome in zip(indices, await self._score_group(client, matrices), strict=True):
                outcomes[i] = outcome
        return outcomes

    async def _score_group(self, client: VersionClient, matrices: list[Any]) -> list[Outcome]:
        sizes = [len(m) for m in matrices]
        joined = _joined(matrices)
        if joined is not None:
            self._metrics.batch(self.name, requests=len(matrices), rows=len(joined))
            try:
                outputs = await client.map(joined)
            except (ModelError, InputError) as err:
                if len(matrices) == 1:
                    return [Outcome(error=err)]
            except RayUDFError as err:  # the workers (not the rows) failed: every request of the call learns it
                return [Outcome(error=err)] * len(matrices)
            else:
                if len(matrices) == 1:
                    return [Outcome(outputs)]
                if not any(isinstance(o, Partial) for o in outputs):
                    return _split(outputs, self.arrow_type, sizes)
        return [await self._score_alone(client, m) for m in matrices]  # each request its own answer or error

    async def _score_alone(self, client: VersionClient, matrix: Any) -> Outcome:
        self._metrics.batch(self.name, requests=1, rows=len(matrix))
        try:
            return Outcome(await client.map(matrix))
        except RayUDFError as err:
            return Outcome(error=err)


def _split(outputs: list[Any], arrow_type: pa.DataType, sizes: list[int]) -> list[Outcome]:
    """A coalesced call's outputs, as each request's share: converted to Arrow once, then sliced (no copy);
    when they do not convert, each share is converted on its own, so that the error is the rows' own."""
    starts = np.cumsum([0, *sizes])
    try:
        whole = to_arrow(outputs, arrow_type, int(starts[-1]))
    except ModelError:
        joined = join_outputs(outputs)
        return [Outcome([slice_output(joined, a, b)]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return [Outcome([whole.slice(a, b - a)]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _joined(matrices: Sequence[Any]) -> Any:
    """One matrix of all the requests' rows, or None when they do not stack (another width or type)."""
    if len(matrices) == 1:
        return matrices[0]
    try:
        return np.concatenate(matrices)
    except ValueError:
        return None


class Pins:
    """The version a request uses of each function it calls, chosen at its first call of it."""

    def __init__(self, functions: dict[str, Function], busy: Counter, restarting: frozenset[str] | None = frozenset()) -> None:
        self._functions = functions  # as they were when the request came
        self._restarting = restarting  # names to answer 503 for (None: every name the replica does not know: its directory is lost)
        self._busy = busy  # the replica's count of requests in flight per version key
        # Every version the request may still choose is in use until it ends: the session keeps its workers.
        self._held = [client.key for function in functions.values() for client, _ in function.versions]
        for key in self._held:
            busy[key] += 1
        self.chosen: dict[str, VersionClient] = {}
        self.error: BaseException | None = None  # what a model call inside DuckDB raised (DuckDB wraps it)
        self._lock = threading.Lock()

    def function(self, name: str) -> Function:
        function = self._functions.get(name)
        if function is None and (self._restarting is None or name in self._restarting):
            raise RestartingError(f"function {name} is restarting; try again in a few seconds")
        if function is None:
            raise UnknownFunctionError(f"no function named {name!r} is served (GET /v1/functions lists them)")
        return function

    def client(self, name: str) -> VersionClient:
        with self._lock:
            if name not in self.chosen:
                self.chosen[name] = self.function(name).choose()
            return self.chosen[name]

    def release(self) -> None:
        """The request is done: what it held is not in use any more (by it)."""
        for key in self._held:
            self._busy[key] -= 1
        self._held = []

    def versions(self) -> str:
        """What the answer says served it: ``f=2`` (``f=2, g=1`` for several functions)."""
        return ", ".join(f"{name}={client.label}" for name, client in sorted(self.chosen.items()))


class Functions:
    """The functions a replica serves, kept as the directory tells them.

    While the directory is out of reach (the app's owner died: it comes back and registers its functions
    again), the replica knows no function: every call answers 503, "restarting". So do the functions the
    directory names as still to come.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics) -> None:
        self._loop = loop  # the replica's event loop, where calls are coalesced
        self._metrics = metrics
        self.by_name: dict[str, Function] = {}
        self.starting: frozenset[str] = frozenset()  # functions the directory says are still to come
        self.lost_at: float | None = time.monotonic()  # since when the directory is out of reach (None: it answers)
        self.busy: Counter[str] = Counter()  # requests in flight per version key
        self._clients: dict[str, VersionClient] = {}
        self._sql: _RequestSQL | None = None
        self._queries = ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="rayudf-query")

    def update(self, entries: dict[str, FunctionEntry], starting: Sequence[str] = ()) -> None:
        """Take the directory's functions, and the names of those still to come (blocking: clients ask the
        masters for their workers)."""
        keys = {v.key for entry in entries.values() for v in entry.versions}
        clients = {k: c for k, c in self._clients.items() if k in keys}
        for entry in entries.values():
            for version in entry.versions:
                if version.key not in clients:
                    clients[version.key] = VersionClient(entry.name, version)
        kept = {name: f for name, f in self.by_name.items() if name in entries and f.entry.signature == entries[name].signature}
        functions = {name: kept.get(name) or Function(entry, clients, self._metrics) for name, entry in entries.items()}
        if self._sql is None or self._sql.returns != {n: f.returns for n, f in functions.items()}:
            self._sql = _RequestSQL({n: f.returns for n, f in functions.items()}, self._loop)
        self._clients, self.by_name = clients, functions
        self.starting, self.lost_at = frozenset(starting), None

    def lose(self) -> None:
        """The directory is out of reach: its functions' workers went with their owner (or will come back with it)."""
        if self.lost_at is None:
            self.lost_at = time.monotonic()
        self._clients, self.by_name = {}, {}

    def pins(self) -> Pins:
        return Pins(self.by_name, self.busy, None if self.lost_at is not None else self.starting)

    async def health(self) -> tuple[bool, dict]:
        """Whether every function has a live worker, with what /healthz says: the functions, their live
        workers, and those restarting (all of them while the directory is out of reach)."""
        if self.lost_at is not None:
            return False, {"status": "restarting", "functions": [], "workers": {}}
        functions = dict(self.by_name)
        counts = await asyncio.gather(*(
            asyncio.gather(*(client.live_workers() for client, _ in f.versions)) for f in functions.values()
        ))
        workers = {name: sum(c) for name, c in zip(functions, counts, strict=True)}
        ok = not self.starting and all(workers.values())
        body = {"status": "ok" if ok else "unavailable", "functions": sorted(functions), "workers": workers}
        if self.starting:
            body["restarting"] = sorted(self.starting)
        return ok, body

    def in_use(self) -> list[str]:
        """Keys of the versions requests in flight use."""
        return [key for key, n in self.busy.items() if n > 0]

    async def score(self, name: str, arguments: list[pa.Array] | np.ndarray, pins: Pins) -> Scored:
        """Score argument columns (or a matrix of number arguments) with ``name`` (the version ``pins`` chose)."""
        function, client = pins.function(name), pins.client(name)
        read = Call.of_matrix if isinstance(arguments, np.ndarray) else Call.of
        call = read(arguments, function=name, width=client.width)
        if call.matrix is None:
            return call.scored([], function.arrow_type)
        outcome = await function.coalesced((client, call.matrix))
        error = outcome.error
        if isinstance(error, WorkerError) and not isinstance(error, BatchTimeoutError):  # its words (actor ids, pids) go to the log
            raise RestartingError(f"function {name} has no live worker now (they are restarting); try again in a few seconds") from error
        if error is not None:
            raise call.placed(error) if isinstance(error, RowError) else error
        return call.scored(outcome.outputs, function.arrow_type)

    async def predict(self, ask: PredictRequest, pins: Pins, timeout_s: float) -> pa.Table:
        """Evaluate a ``/model/predict`` select list over its rows, on a query thread, for at most ``timeout_s``;
        a query past it, or whose request is cancelled (its client went away), is interrupted."""
        sql = self._sql
        cursor = sql.cursor()
        work = asyncio.wrap_future(self._queries.submit(sql.evaluate, cursor, ask, pins, self))
        self._metrics.queries_running += 1
        work.add_done_callback(self._query_done)
        try:
            return await asyncio.wait_for(asyncio.shield(work), timeout_s)
        except TimeoutError:
            self._loop.create_task(_interrupt_until_done(cursor, work))
            raise QueryStoppedError(f"sql: the query ran past the request's time limit ({timeout_s:g} s) and was stopped") from None
        except asyncio.CancelledError:
            self._loop.create_task(_interrupt_until_done(cursor, work))
            raise

    def _query_done(self, work: asyncio.Future) -> None:
        self._metrics.queries_running -= 1
        if not work.cancelled():
            work.exception()  # retrieved: a stopped query's error has nobody else to read it


class _RequestSQL:
    """The replica's DuckDB for request select lists: the served functions created in it, no file,
    network or extension access, a memory limit and no spilling, one thread per query (a model call
    runs on the thread of its request). Each request's query has a cursor of its own, so that it
    alone can be stopped."""

    def __init__(self, returns: dict[str, str], loop: asyncio.AbstractEventLoop) -> None:
        self.returns = returns
        self._con = duckdb.connect(config={
            "enable_external_access": False, "threads": 1, "memory_limit": QUERY_MEMORY_LIMIT, "temp_directory": "",
            "autoload_known_extensions": False, "autoinstall_known_extensions": False,
        })
        self._con.execute("SET lock_configuration = true").fetchall()
        for name, type_name in returns.items():
            add_arrow_function(self._con, name, _calling(name, loop), type_name)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self._con.cursor()

    def evaluate(self, cursor: duckdb.DuckDBPyConnection, ask: PredictRequest, pins: Pins, functions: Functions) -> pa.Table:
        """The select list's rows (at most MAX_RESULT_ROWS and MAX_BODY_BYTES of them); closes ``cursor``."""
        _local.pins, _local.functions = pins, functions
        try:
            statement = query(ask.select)
            cursor.register(REQUEST_TABLE, ask.rows)
            reader = cursor.sql(statement).to_arrow_reader()
            batches, rows, size = [], 0, 0
            for batch in reader:
                rows, size = rows + batch.num_rows, size + batch.nbytes
                if rows > MAX_RESULT_ROWS or size > MAX_BODY_BYTES:
                    raise RequestError(
                        f"sql: the answer would be over {MAX_RESULT_ROWS:,} rows or {MAX_BODY_BYTES:,} bytes; "
                        "an answer has as many rows as the request, unless the select list unnests"
                    )
                batches.append(batch)
            return pa.Table.from_batches(batches, reader.schema)
        except duckdb.InterruptException:
            raise QueryStoppedError("sql: the query was stopped") from None
        except duckdb.OutOfMemoryException:
            raise RequestError(f"sql: the query needs more than the {QUERY_MEMORY_LIMIT} a replica's select lists may take") from None
        except duckdb.Error as err:
            if pins.error is not None:
                raise pins.error from None
            raise RequestError(f"sql: {clean_duckdb_error(err)}") from None
        finally:
            _local.pins = _local.functions = None
            cursor.close()


async def _interrupt_until_done(cursor: duckdb.DuckDBPyConnection, work: asyncio.Future) -> None:
    """Interrupt a query until its thread has let go of it: an interrupt that lands before the
    query starts is lost (DuckDB clears it when a query begins), so it is sent again."""
    while not work.done():
        try:
            cursor.interrupt()
        except duckdb.Error:
            return  # closed: the query is over
        await asyncio.sleep(_INTERRUPT_EVERY_S)


def _calling(name: str, loop: asyncio.AbstractEventLoop):
    """The DuckDB function ``name``: its rows go through the replica's coalescing queue, on its loop."""

    def call(*cols: Any) -> pa.Array:
        pins, functions = _local.pins, _local.functions
        try:
            scored = asyncio.run_coroutine_threadsafe(functions.score(name, list(cols), pins), loop).result()
        except BaseException as err:
            pins.error = err  # DuckDB puts its own words around it: the request answers with this
            raise
        return scored.array

    return call
