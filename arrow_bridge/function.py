"""A built UDF as a DuckDB vectorized (``type='arrow'``) function, and its versions.

DuckDB calls the function with at most 2048 rows at a time, from several threads
at once. Each call hands its rows to the engine (``RemoteUDF.score``), which cuts them into
``batch_size`` pieces and fans them out over the workers (:mod:`arrow_bridge.scoring`); :func:`add_function`
raises the connection's ``threads`` setting (never lowers it) so that enough calls are in
flight to keep every worker busy. The function stays in DuckDB while its model changes: a
:class:`ModelFunction` holds the current :class:`Version` and the one a running statement pinned.

Example:
    >>> fn = ModelFunction("digit", return_type_of("digit", udf), RowCounter(), udf, retire=lambda v: v.udf.shutdown())  # doctest: +SKIP
    >>> add_function(con, fn)                                                      # doctest: +SKIP
    >>> con.sql("select digit(pixels) from digits").fetchall()                     # doctest: +SKIP
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from arrow_bridge.scoring import score_columns, valid_rows
from arrow_bridge.tensors import features, to_arrow
from arrow_bridge.types import arrow_type, duckdb_type_of
from udf_engine.actors.batching import MAX_IN_FLIGHT_PER_WORKER
from udf_engine.errors import ConfigError


class RowCounter:
    """Rows scored by model functions, added to from DuckDB's threads, read by progress bars.

    Example:
        >>> counter = RowCounter()
        >>> counter.add(2048); counter.add(10); counter.value
        2058
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0  # rows scored so far

    def add(self, rows: int) -> None:
        with self._lock:
            self._value += rows

    @property
    def value(self) -> int:
        with self._lock:
            return self._value


_random = random.Random().random  # which version a statement runs on, under a canary's share

# How long a function being removed waits for calls still running on it: only queries run
# on cursors of the connection can be, as the session's own statements have finished.
DRAIN_TIMEOUT_S = 60.0


class Version:
    """One registered version of a model function: its UDF, its label, and the calls running on it."""

    def __init__(self, udf: Any, label: str = "") -> None:
        self.udf = udf  # a RemoteUDF (anything with score(matrix) -> outputs per batch, conf, info)
        self.label = label  # what !models and the answers of a served function call it ("1", "2", a given label)
        self.width = udf.info.get("input_width")  # values per input row, when the model says so
        self._calls = 0  # calls of this version running now (and leases: a server answering with it)
        self._idle = threading.Condition()

    def enter(self) -> None:
        with self._idle:
            self._calls += 1

    def leave(self) -> None:
        with self._idle:
            self._calls -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> None:
        """Return once no call of this version runs (or after ``timeout_s``)."""
        with self._idle:
            self._idle.wait_for(lambda: self._calls == 0, timeout_s)


class ModelFunction:
    """The callable DuckDB runs: Arrow columns in, one Arrow array out.

    It stays registered in DuckDB while its model changes: :meth:`switch` makes a new version
    current, or a canary that answers a share of the statements (and served requests) while the
    current version answers the rest. A statement of the session pins one version when it starts
    (:meth:`pin`), so every call it makes goes to that one version; a version is retired (its
    workers stopped by the ``retire`` callback) once it is neither current, canary nor pinned and
    its last call has returned.
    """

    def __init__(
        self, name: str, return_type: str, counter: RowCounter, udf: Any, retire: Callable[[Version], None], *, label: str = ""
    ) -> None:
        self.name = name  # the SQL name
        self.return_type = return_type  # DuckDB type, e.g. "FLOAT[10]"
        self.arrow_type = arrow_type(return_type)
        self._counter = counter  # told of every row scored
        self._retire = retire  # called (on a thread of its own) with a version nobody uses any more
        self._lock = threading.Lock()  # guards _current, _canary, _share and _pinned
        self._current = Version(udf, label)  # what calls outside a statement, and most statements starting now, use
        self._canary: Version | None = None  # a newer version answering a share of what starts now
        self._share = 0.0  # that share, 0 < share < 1
        self._pinned: Version | None = None  # what the session's statement running now started with
        self.nulled = RowCounter()  # rows left NULL because the model raised on them (on_error="null")
        self.null_reason = ""  # what the model raised on the latest of those rows

    @property
    def udf(self) -> Any:
        """The current version's UDF."""
        return self._current.udf

    def switch(self, udf: Any, *, label: str = "", share: float = 1.0) -> None:
        """Make ``udf`` the current version (``share`` 1), or a canary answering ``share`` of what starts
        from now; the versions it replaces retire once the running statement is done with them."""
        new = Version(udf, label)
        with self._lock:
            if share >= 1.0:
                replaced = [self._current, self._canary]
                self._current, self._canary, self._share = new, None, 0.0
            else:
                replaced = [self._canary]
                self._canary, self._share = new, share
            gone = [v for v in replaced if v is not None and v is not self._pinned]
        for version in gone:
            self._retire_later(version)

    def live_versions(self) -> list[tuple[Version, float]]:
        """The versions that answer now, with the share of statements and requests each answers."""
        with self._lock:
            if self._canary is None:
                return [(self._current, 1.0)]
            return [(self._current, 1.0 - self._share), (self._canary, self._share)]

    def pin(self) -> None:
        """A statement starts (the session runs one at a time): its calls go to one version, the
        canary for its share of statements, else the current one."""
        with self._lock:
            canary = self._canary is not None and _random() < self._share
            self._pinned = self._canary if canary else self._current

    def unpin(self) -> None:
        """The statement is done: the version it pinned, if no longer current nor canary, retires."""
        with self._lock:
            old, self._pinned = self._pinned, None
            stale = old is not None and old is not self._current and old is not self._canary
        if stale:
            self._retire_later(old)

    def close(self) -> None:
        """Retire every version (the function is being removed), once its calls return or DRAIN_TIMEOUT_S passed."""
        with self._lock:
            versions = {id(v): v for v in (self._current, self._canary, self._pinned) if v is not None}
        for version in versions.values():
            version.wait_idle(DRAIN_TIMEOUT_S)
            self._retire(version)

    def _retire_later(self, version: Version) -> None:
        def retire() -> None:
            version.wait_idle()
            self._retire(version)

        threading.Thread(target=retire, name=f"rayudf-retire-{self.name}", daemon=True).start()

    @contextmanager
    def using(self) -> Iterator[Version]:
        """The version a call made now runs on (the statement's pinned one, else the current), held
        until the block ends: it is not retired meanwhile."""
        with self._lock:
            version = self._pinned or self._current
            version.enter()
        try:
            yield version
        finally:
            version.leave()

    def __call__(self, *cols: Any) -> pa.Array:
        with self.using() as version:
            scored = score_columns(cols, function=self.name, width=version.width, arrow_type=self.arrow_type, score=version.udf.score)
        self.count(scored.rows, scored.nulled, scored.reason)
        return scored.array

    def count(self, rows: int, nulled: int = 0, reason: str = "") -> None:
        """Add what was scored to the counters: ``rows`` for progress bars, ``nulled`` of them left NULL (for ``reason``)."""
        self._counter.add(rows)
        if nulled:
            self.nulled.add(nulled)
            self.null_reason = reason


def infer_return_type(name: str, udf: Any, width: int | None, sample: Sequence[Any] | None = None) -> str:
    """Probe the model once and name the DuckDB type of what it returns.

    The probe is ``sample`` (the argument columns of some real rows: text, images, anything
    the model takes) when given, else one zero row of the model's input width.
    """
    if sample is not None:
        valid = valid_rows(sample)  # rows with a NULL argument never reach the model
        kept = sample if valid is None else [column.filter(pa.array(valid)) for column in sample]
        return duckdb_type_of(udf.probe(features(kept, function=name, width=width)))
    if not isinstance(width, int):
        raise ConfigError(
            f"function {name}: cannot infer the return type because the model does not say how many "
            'inputs a row has; declare it (returns="DOUBLE[10]") or give rows to try it on (sample="select text from t limit 5")'
        )
    # float64 zeros: a model that follows its input dtype (scikit-learn) then declares
    # the wider type, so float64 inputs are never narrowed on the way out.
    return duckdb_type_of(udf.probe(np.zeros((1, width), dtype=np.float64)))


def keep_workers_busy(con: duckdb.DuckDBPyConnection, udf: Any) -> None:
    """Raise DuckDB's ``threads`` to what keeps ``udf``'s workers busy, if it is lower (a later ``SET threads`` wins).

    DuckDB calls a function from one thread per pipeline: with fewer threads than batches
    the workers can hold, some workers would idle while a query runs.
    """
    wanted = udf.conf.workers * MAX_IN_FLIGHT_PER_WORKER
    (current,), = con.execute("SELECT current_setting('threads')").fetchall()
    if int(current) < wanted:
        con.execute(f"SET threads = {int(wanted)}")


def return_type_of(name: str, udf: Any, returns: str | None = None, sample: Sequence[Any] | None = None) -> str:
    """The DuckDB type ``name(...)`` returns: ``returns`` if given (checked), else what the model says it
    returns (a text model's head), else what a probe of the model gives."""
    returns = returns or (None if sample is not None else udf.info.get("returns"))
    if returns:
        arrow_type(returns)  # a ConfigError now, not at the first query, for a type DuckDB does not know
        return returns
    return infer_return_type(name, udf, udf.info.get("input_width"), sample)


def add_function(con: duckdb.DuckDBPyConnection, fn: ModelFunction) -> None:
    """Make ``fn`` callable from SQL by its name; raises DuckDB's threads to keep its workers busy.

    DuckDB must never remove a function a query is running (it crashes), so a new version
    of a model goes into the same ModelFunction with :meth:`ModelFunction.switch`.
    """
    add_arrow_function(con, fn.name, fn, fn.return_type)
    keep_workers_busy(con, fn.udf)


def add_arrow_function(con: duckdb.DuckDBPyConnection, name: str, func: Callable[..., pa.Array], returns: str) -> None:
    """Create ``name(...)`` in DuckDB as ``func``, which gets Arrow columns and returns one Arrow array of ``returns``."""
    # parameters=None makes DuckDB accept any number of arguments of any type:
    # f(pixels) and f(a, b, c) both reach func with the columns as they are.
    # null_handling="special": DuckDB passes rows with NULL arguments (the model function leaves
    # them NULL, as DuckDB would) and accepts the NULLs of rows on_error="null" gave up on.
    con.create_function(name, func, None, returns, type="arrow", null_handling="special")


def add_python_function(
    con: duckdb.DuckDBPyConnection, name: str, func: Any, returns: str, *, vectorized: bool = False
) -> None:
    """Make a plain Python function callable from SQL, run in-process by DuckDB.

    Row-wise (``vectorized=False``) it gets Python values; vectorized it gets one
    NumPy array per argument and returns one array (or list) for the whole call.
    """
    if not vectorized:
        con.create_function(name, lambda *values: func(*values), None, returns, type="native")
        return
    target = arrow_type(returns)

    def call(*cols: Any) -> pa.Array:
        arrays = [c.to_numpy(zero_copy_only=False) for c in cols]
        return to_arrow([func(*arrays)], target, len(cols[0]) if cols else 0)

    con.create_function(name, call, None, returns, type="arrow")
