"""A session's streams: the ones running in the background, ``!streams``, ``!kill stream <name>``, stopping them all.

Example:
    >>> streams = Streams()
    >>> streams.frame().columns.tolist()[:4]
    ['name', 'state', 'batches', 'rows']
    >>> streams.running()
    []
"""

from __future__ import annotations

import threading

import pandas as pd

from sql_magics.errors import ExecutionError
from sql_magics.streaming.query import FAILED, StreamQuery

STREAM_COLUMNS = [
    "name", "state", "batches", "rows", "rows_per_s", "last_batch_s", "input_lag", "last_error", "skipped_files", "source",
    "sink", "checkpoint",
]


class Streams:
    """The streams a session started (the last one of each name), running or not."""

    def __init__(self) -> None:
        self._queries: dict[str, StreamQuery] = {}  # by stream name
        self._lock = threading.Lock()
        self.progress = False  # whether each batch prints a progress line (rayudf run); !streams shows them anyway

    def refuse_running(self, name: str) -> None:
        """Raise if a stream named ``name`` runs: a second one is refused."""
        with self._lock:
            self._refuse_running(name)

    def _refuse_running(self, name: str) -> None:
        old = self._queries.get(name)
        if old is not None and old.alive():
            raise ExecutionError(f"stream {name} is running already (!kill stream {name} stops it)")

    def start(self, query: StreamQuery) -> None:
        """Run ``query`` in the background; a stream of the same name must not be running."""
        with self._lock:
            self._refuse_running(query.name)
            self._queries[query.name] = query
        try:
            query.start()
        except BaseException:
            with self._lock:
                self._queries.pop(query.name, None)
            raise

    def remember(self, query: StreamQuery) -> None:
        """Keep a stream that runs in the foreground (trigger="once"), for !streams; one of the same
        name must not be running."""
        with self._lock:
            self._refuse_running(query.name)
            self._queries[query.name] = query

    def running(self) -> list[StreamQuery]:
        with self._lock:
            return [q for q in self._queries.values() if q.alive()]

    def failed(self) -> list[StreamQuery]:
        with self._lock:
            return [q for q in self._queries.values() if q.state == FAILED]

    def get(self, name: str) -> StreamQuery:
        with self._lock:
            query = self._queries.get(name)
        if query is None:
            known = ", ".join(self._queries) or "none"
            raise ExecutionError(f"no stream named {name!r} (streams: {known})")
        return query

    def frame(self, names: list[str] | None = None) -> pd.DataFrame:
        """``!streams``: one row per stream."""
        with self._lock:
            queries = [q for q in self._queries.values() if names is None or q.name in names]
        rows = [
            {
                "name": q.name,
                "state": q.state,
                "batches": q.batches,
                "rows": q.rows,
                "rows_per_s": round(q.rows_per_s(), 1),
                "last_batch_s": None if q.last_batch_s is None else round(q.last_batch_s, 3),
                "input_lag": q.lag(),
                "last_error": q.last_error,
                "skipped_files": len(q.skipped),
                "source": q.source.description(),
                "sink": q.sink.description(),
                "checkpoint": str(q.checkpoint.path),
            }
            for q in queries
        ]
        return pd.DataFrame(rows, columns=STREAM_COLUMNS)

    def kill(self, name: str) -> None:
        """Stop stream ``name`` after its batch in progress commits."""
        self.get(name).stop()

    def close(self) -> None:
        """Stop every stream, each after its batch in progress."""
        for query in self.running():
            query.stop()
